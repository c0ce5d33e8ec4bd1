"""bob attacks alice through the site service (issue #17, 2), and an admin (dana, group dxadmin) only looks.

Every user's CLI is pointed at the lab's site (``dxflow lab site up``, tests/lab/sitekit.py) by a
client config of this module's own (``DXFLOW_SITE_CONFIG``, both replicas). alice works as through her
master; bob gets "no such job" for everything on hers — the very answer a job that never existed
gets, so the site does not even confirm it runs; raw
requests without a fresh credential of their own are 401; a site-signed token naming bob is refused by
alice's agent; her console's login link works once and bob's console opens nothing of hers. dana sees
alice's job and its metrics, and is refused everything else (docs/site.md, "What each user sees and does; admins").
"""

from __future__ import annotations

import json
import re
import shlex
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import pytest

from conftest import DXFLOW, Jobs, Lines, as_user, on_node, popen_as, run, stop, wait_for
from sitekit import console_login, http, site_dxflow, site_ls, site_up, wait_site_agents
from dxflow import registration
from dxflow.auth import fingerprint, mint_token
from dxflow.lab import site

ALICE, BOB, DANA = "alice", "bob", "dana"
PYTHON = "/opt/dxflow/venv/bin/python"
#: the port of the web service alice's job runs
SERVICE_PORT = 18765
#: a job id no scheduler of the lab has given (the answer for it is what bob must get for alice's)
NEVER = "987654"


#: this module's own client config (both replicas), in a folder every user can read: a test elsewhere that
#: breaks the lab's shared /etc/dxflow/site-client.toml does not break these
CONFIG = "/var/tmp/dxflow-test-site-security.toml"


@pytest.fixture(scope="module")
def site_lab(lab) -> dict:
    info = site_up()
    urls = ", ".join(f'"{r.url}"' for r in site.REPLICAS)
    Path(CONFIG).write_text(f'site = [{urls}]\nsite_keys = "/etc/dxflow/site"\n')
    Path(CONFIG).chmod(0o644)
    yield info
    Path(CONFIG).unlink(missing_ok=True)


def sd(user: str, *args: str, **kw):
    """``dxflow ARGS`` as USER through the site (this module's client config)."""
    return site_dxflow(user, *args, config=CONFIG, **kw)


@pytest.fixture(scope="module")
def job(site_lab):
    """A job of alice's on n1, ready through the site; it writes a line to its output for `logs` and
    serves a web page on SERVICE_PORT for `forward`."""
    jobs = Jobs()
    job = jobs.submit(ALICE, f"echo alice-output-line; cd /tmp && python3 -m http.server {SERVICE_PORT} "
                      "--bind 127.0.0.1 & sleep 600", "-w", "n1")
    try:
        jobs.wait_running(job, timeout=120)
        wait_site_agents(ALICE, job, {"n1"}, config=CONFIG, timeout=90)
        yield job
    finally:
        jobs.cancel_all()


def api_url() -> str:
    return site.replica("a").url


def refusal(proc) -> str:
    """What a refused command said (its error line; for `forward`, which waits for a job's agent to
    come, its waiting line) with job ids made alike, to compare two refusals."""
    text = proc.stderr.strip() or proc.stdout.strip()
    return re.sub(r"\b\d+\b", "N", text.splitlines()[-1] if text else "")


#: how the CLI and the site say a job is not there (the CLI's own check first: the user's list of agents)
NOT_FOUND = ("is not running: no agent of it", "no agent of job", "no such job")
#: exit code of `timeout` when the command was still running: `dxflow forward` waits for the job's agent
WAITING = 124


def refused(user: str, args: tuple[str, ...], job: str):
    """``dxflow ARGS`` (``{job}`` filled in) as USER through the site; `forward` stopped after a while."""
    argv = [a.format(job=job) for a in args]
    if argv[0] == "forward":
        line = f"DXFLOW_SITE_CONFIG={CONFIG} exec timeout 8 {DXFLOW} {shlex.join(argv)}"
        return run(["runuser", "-l", user, "-c", line], check=False, timeout=60)
    return sd(user, *argv, check=False, timeout=60)


# -- alice: the site works for her as her master does ---------------------------------------------

def test_alice_works_through_the_site_as_through_her_master(job, tmp_path):
    listed = [a for a in site_ls(ALICE, CONFIG) if a["job"] == job]
    assert [(a["cluster"], a["node"], a["state"]) for a in listed] == [("dxlab", "n1", "ready")]
    table = sd(ALICE, "ls").stdout
    assert job in table and "n1" in table

    via_site = sd(ALICE, "exec", job, "--", "sh", "-c", "hostname; id -un; echo $SLURM_JOB_ID").stdout
    via_master = as_user(ALICE, [DXFLOW, "exec", job, "--", "sh", "-c", "hostname; id -un; echo $SLURM_JOB_ID"]).stdout
    assert via_site == via_master == f"n1\nalice\n{job}\n"

    info = json.loads(sd(ALICE, "info", job, "--json").stdout)
    assert (info["node"], info["user"], info["job"]) == ("n1", ALICE, job)

    src = Path(f"/home/{ALICE}/site-cp-{job}.txt")
    src.write_text("through the site\n")
    run(["chown", ALICE, str(src)])
    sd(ALICE, "cp", str(src), f"{job}:/tmp/site-cp.txt")
    back = Path(f"/home/{ALICE}/site-cp-{job}.back")
    sd(ALICE, "cp", f"{job}:/tmp/site-cp.txt", str(back))
    assert back.read_text() == "through the site\n"
    src.unlink()
    back.unlink()

    logs = wait_for(lambda: "alice-output-line" in sd(ALICE, "logs", job).stdout, 30,
                    what="the job's output through the site")
    assert logs
    shell = sd(ALICE, "shell", job, "--", "echo", "shell-$(id -un)-ok;", "exit", "3", check=False)
    assert shell.returncode == 3 and "shell-alice-ok" in shell.stdout, shell


def test_alice_follows_logs_and_forwards_a_port_through_the_site(job):
    follow = popen_as(ALICE, ["env", f"DXFLOW_SITE_CONFIG={CONFIG}", DXFLOW, "logs", "-f", job])
    try:
        Lines(follow).wait_for("alice-output-line", 60)
    finally:
        stop(follow)
    forward = popen_as(ALICE, ["env", f"DXFLOW_SITE_CONFIG={CONFIG}", DXFLOW, "forward", job, str(SERVICE_PORT),
                               "--local", "0"])
    try:
        banner = Lines(forward).wait_for(r"^http://127\.0\.0\.1:\d+/", 60)
        local = re.match(r"^http://127\.0\.0\.1:(\d+)/", banner).group(1)  # type: ignore[union-attr]
        page = wait_for(lambda: (lambda out: out if "Directory listing" in out else None)(
            as_user(ALICE, [PYTHON, "-c", GET, f"http://127.0.0.1:{local}/"], check=False, timeout=60).stdout),
            60, interval=1, what="alice's job's web page through `dxflow forward` via the site")
        assert page
    finally:
        stop(forward)


GET = ("import sys, urllib.request\n"
       "try:\n    print(urllib.request.urlopen(sys.argv[1], timeout=20).read().decode(errors='replace'))\n"
       "except Exception as e:\n    print('failed', e)\n")


# -- bob: nothing of alice's, and no more than a job that never was ----------------------------------

@pytest.mark.parametrize("args", [
    ("info", "{job}"),
    ("exec", "{job}", "--", "id"),
    ("cp", "{job}:/etc/hostname", "/tmp/bob-steals"),
    ("logs", "{job}"),
    ("shell", "{job}", "--", "id"),
    ("ports", "{job}"),
    ("forward", "{job}", "8888"),
    ("metrics", "{job}"),
])
def test_bob_gets_no_such_job_for_alices(job, args):
    with ThreadPoolExecutor(2) as both:   # at once: each waits the same few seconds for an agent that never comes
        mine, never = both.map(lambda j: refused(BOB, args, j), (job, NEVER))
    expected = WAITING if args[0] == "forward" else 5  # NotFound; forward waits for an agent of the job
    assert mine.returncode == never.returncode == expected, (mine, never)
    assert refusal(mine) == refusal(never), (mine.stdout, mine.stderr, never.stdout, never.stderr)
    assert any(words in refusal(mine) for words in NOT_FOUND), refusal(mine)
    assert "alice" not in mine.stdout + mine.stderr


def test_bob_lists_none_of_alices_jobs(job):
    assert all(a["job"] != job for a in site_ls(BOB, CONFIG))
    rows = [line.split() for line in sd(BOB, "ls", "-a").stdout.splitlines()[1:]]
    assert all(job not in row[:2] for row in rows), rows  # the CLUSTER and JOB columns, not a CPU %


def test_bob_cannot_reach_alices_service_through_the_proxy(job):
    """The relay path to a port of alice's job, asked as bob with a good credential of his own."""
    path = f"/api/fleet/{job}/-/proxy/8888/"
    status, body = raw_request(BOB, "GET", path)
    assert status == 404 and "alice" not in body, body


# -- raw requests: a credential of their own, or nothing ------------------------------------------------

RAW = """
import json, ssl, sys, urllib.request, urllib.error
from dxflow.site.client import request_credential
url, method, path, how = sys.argv[1:5]
# https: the site's published certificate and nothing else, as the CLI trusts it
context = ssl.create_default_context(cafile="/etc/dxflow/site/tls.pem") if url.startswith("https") else None
headers = {}
if how == "own":
    headers["Authorization"] = "MUNGE " + request_credential(method, path)
elif how.startswith("cred:"):
    headers["Authorization"] = "MUNGE " + how[5:]
elif how == "garbage":
    headers["Authorization"] = "MUNGE AAAAgarbage=="
req = urllib.request.Request(url + path, method=method, headers=headers)
try:
    with urllib.request.urlopen(req, timeout=30, context=context) as r:
        print(json.dumps([r.status, r.read().decode(errors="replace")]))
except urllib.error.HTTPError as e:
    print(json.dumps([e.code, e.read().decode(errors="replace")]))
"""


def raw_request(user: str, method: str, path: str, how: str = "own") -> tuple[int, str]:
    out = as_user(user, [PYTHON, "-c", RAW, api_url(), method, path, how], timeout=60).stdout
    status, body = json.loads(out)
    return status, body


def credential_of(user: str, method: str, path: str) -> str:
    return as_user(user, [PYTHON, "-c", "import sys; from dxflow.site.client import request_credential; "
                          "print(request_credential(sys.argv[1], sys.argv[2]))", method, path]).stdout.strip()


def test_raw_requests_without_their_own_fresh_credential_are_refused(job):
    assert raw_request(BOB, "GET", "/api/agents")[0] == 200  # the way that works, for contrast
    assert raw_request(BOB, "GET", "/api/agents", "none")[0] == 401
    assert raw_request(BOB, "GET", "/api/agents", "garbage")[0] == 401

    alices = credential_of(ALICE, "GET", "/api/agents")  # seen on the wire, say
    assert raw_request(BOB, "GET", f"/api/fleet/{job}/-/api/node", f"cred:{alices}")[0] == 401  # another path
    assert raw_request(BOB, "POST", "/api/agents", f"cred:{alices}")[0] == 401  # another method

    used = credential_of(ALICE, "GET", "/api/agents")
    assert raw_request(ALICE, "GET", "/api/agents", f"cred:{used}")[0] == 200
    status, body = raw_request(BOB, "GET", "/api/agents", f"cred:{used}")  # replayed
    assert status == 401 and "alice" not in body


def test_a_site_token_naming_bob_is_refused_by_alices_agent(job):
    """Signed by the site's own token key, for alice's agent's key, but naming bob: 401 at her agent, even
    shown from alice's own uid (which her agent's port admits); the same token naming alice is taken.
    bob's own connections to her agent's port are closed unanswered, whatever they carry."""
    reg = next(r for r in registration.read_all(Path(f"/home/{ALICE}/.dxflow/fleet")) if r.job == job)
    from cryptography.hazmat.primitives import serialization

    config = site.replica("a").config
    key = serialization.load_pem_private_key(Path(site_service_state(config), "token_key.pem").read_bytes(), None)
    bobs = mint_token(key, BOB, fingerprint(reg.public_key), lifetime=60)
    alices = mint_token(key, ALICE, fingerprint(reg.public_key), lifetime=60)
    probe = ("import sys, urllib.request, urllib.error\n"
             "req = urllib.request.Request(sys.argv[1], headers={'Authorization': 'Bearer ' + sys.argv[2]})\n"
             "try:\n    print(urllib.request.urlopen(req, timeout=10).status)\n"
             "except urllib.error.HTTPError as e:\n    print(e.code)\n"
             "except OSError as e:\n    print('closed')\n")
    url = f"http://127.0.0.1:{reg.port}/api/node"
    assert on_node("n1", ALICE, [PYTHON, "-c", probe, url, bobs]).stdout.strip() == "401"
    assert on_node("n1", ALICE, [PYTHON, "-c", probe, url, alices]).stdout.strip() == "200"
    assert on_node("n1", BOB, [PYTHON, "-c", probe, url, alices]).stdout.strip() == "closed"


def site_service_state(config_path) -> str:
    from dxflow.site.config import SiteServiceConfig

    return SiteServiceConfig.load(Path(config_path)).state_dir


# -- the console -----------------------------------------------------------------------------------------

def test_a_console_link_works_once_and_is_its_users_only(job):
    link = json.loads(sd(ALICE, "console", "--json").stdout)
    status, headers, _ = http(link["url"])
    assert status == 303 and "dxflow_site_console=" in (headers.get("Set-Cookie") or "")
    assert http(link["url"])[0] == 403  # used: no second session from it

    base, alice_cookie = base_and_cookie(headers, link["url"])
    status, _, body = http(f"{base}/api/agents", alice_cookie)
    assert status == 200 and any(a["job"] == job for a in json.loads(body))

    base, bob_cookie = console_login(BOB, CONFIG)
    status, _, body = http(f"{base}/api/agents", bob_cookie)
    assert status == 200 and all(a["job"] != job for a in json.loads(body))
    status, _, body = http(f"{base}/console/open?job={job}&node=n1&port=8888", bob_cookie)
    assert status == 404 and b"ticket" not in body  # no ticket for a service of alice's job
    status, _, _ = http(f"{base}/api/fleet/{job}/-/api/node", bob_cookie)
    assert status == 404
    assert http(f"{base}/api/agents")[0] == 401  # no cookie: nothing


def test_alices_service_opens_on_its_own_origin_by_a_one_time_ticket(job):
    """The console's Open button for alice's own service: a ticket to the service's own origin
    (LABEL.localhost, the label naming cluster, job, node and port), used once, then its own cookie."""
    base, cookie = console_login(ALICE, CONFIG)
    status, headers, _ = http(f"{base}/console/open?job={job}&node=n1&port={SERVICE_PORT}", cookie)
    assert status == 303, status
    where = urllib.parse.urlsplit(headers["Location"])
    label = where.hostname.split(".")[0]  # type: ignore[union-attr]
    assert where.hostname == f"{label}.localhost" and "dxlab" in label and job in label, where
    login = f"{where.path}?{where.query}"
    status, answer = on_origin(where, login)
    assert status == 303, status
    service_cookie = "; ".join(c.split(";")[0] for c in answer.headers.get_all("Set-Cookie") or [])
    assert service_cookie.startswith("dxflow_service=")
    assert on_origin(where, login)[0] == 403  # the ticket is spent
    status, page = on_origin(where, "/", service_cookie)
    assert status == 200 and b"Directory listing" in page.read()
    assert on_origin(where, "/")[0] == 401  # no cookie of the origin's own: nothing


def on_origin(where, target: str, cookie: str = ""):
    """(status, response) of a GET on a service's own origin, as the browser sends it through the
    console's port (Host: LABEL.localhost:PORT)."""
    conn = HTTPConnection("127.0.0.1", where.port, timeout=30)
    conn.request("GET", target, headers={"Host": where.netloc, **({"Cookie": cookie} if cookie else {})})
    resp = conn.getresponse()
    return resp.status, resp


def base_and_cookie(headers, url: str) -> tuple[str, str]:
    cookie = "; ".join(c.split(";")[0] for c in headers.get_all("Set-Cookie") or [])
    return url.split("/login")[0], cookie


# -- dana, the admin: looks, never acts -------------------------------------------------------------------

def test_an_admin_sees_every_job_and_its_metrics(job):
    listed = [a for a in site_ls(DANA, CONFIG) if a["job"] == job]
    assert [(a["user"], a["node"]) for a in listed] == [(ALICE, "n1")]
    table = sd(DANA, "ls").stdout
    assert "USER" in table.splitlines()[0] and ALICE in table
    info = json.loads(sd(DANA, "info", job, "--json").stdout)
    assert info["user"] == ALICE and info["node"] == "n1"
    metrics = sd(DANA, "metrics", job, "--json", check=False)
    assert metrics.returncode == 0, metrics.stderr


@pytest.mark.parametrize("args", [
    ("exec", "{job}", "--", "id"),
    ("cp", "{job}:/etc/hostname", "/tmp/dana-reads"),
    ("logs", "{job}"),
    ("shell", "{job}", "--", "id"),
    ("ports", "{job}"),
    ("forward", "{job}", "8888"),
])
def test_an_admin_is_refused_every_act_on_another_users_job(job, args):
    """Refused with AccessDenied (exit 9) saying what admins may do: dana sees the job, so there is no
    existence to hide from her."""
    proc = refused(DANA, args, job)
    assert proc.returncode == 9, proc
    assert "act only on their own jobs" in proc.stderr, proc.stderr


def test_an_admins_proxy_request_is_refused(job):
    assert raw_request(DANA, "GET", f"/api/fleet/{job}/-/proxy/{SERVICE_PORT}/")[0] == 403
    assert raw_request(DANA, "GET", f"/api/fleet/{job}/-/api/node")[0] == 200
