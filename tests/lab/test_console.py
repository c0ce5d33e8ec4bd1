"""The web console in a real browser (Debian's chromium driven by Playwright) on the lab cluster.

One 2-node job of alice's serves all the tests of this module, in order: the fleet,
a node's metrics, the terminal, files (upload by button and by drag and drop), the
log view, the job's web service, the refusal of requests without the session
cookie, and the message shown once the job has ended. Screenshots of each page go
to ``artifacts/screenshots/``; with ``DXFLOW_UPDATE_SCREENSHOTS=1`` they are also
copied to ``docs/screenshots/`` for the README.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import DXFLOW, Jobs, as_user, dxflow, on_node, run, wait_agents, wait_for
from dxflow.layout import UserLayout


ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "artifacts" / "screenshots"
DOC_SHOTS = ROOT / "docs" / "screenshots"
ALICE_HOME = Path(os.path.expanduser("~alice"))
#: the job: a folder of its own, a web server on a free port, a numbered line on stdout every second
SCRIPT = ('d=$HOME/console-$SLURM_JOB_ID; mkdir -p $d && cd $d && echo "hello from job $SLURM_JOB_ID" > from-the-job.txt; '
          'python3 -u -m http.server 0 --bind 127.0.0.1 > http.log 2>&1 & '
          'for i in $(seq 1 900); do echo "console-line $i from $(hostname)"; sleep 1; done')
TIMEOUT = 20_000  # ms, for the browser's waits


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    if os.environ.get("DXFLOW_UPDATE_SCREENSHOTS") == "1":
        DOC_SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, DOC_SHOTS / path.name)


def console_link() -> dict:
    proc = dxflow("alice", "console", "--json", check=False)
    if proc.returncode != 0 and "no web console" in proc.stderr:  # a master from before the console: restart it
        dxflow("alice", "master", "stop")
        proc = dxflow("alice", "console", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def job(lab):
    jobs = Jobs()
    job = jobs.submit("alice", SCRIPT, nodes=2)
    try:
        jobs.wait_running(job, timeout=180)
        wait_agents("alice", job, 2, timeout=60)
        yield job
    finally:
        jobs.cancel_all()
        shutil.rmtree(ALICE_HOME / f"console-{job}", ignore_errors=True)


@pytest.fixture(scope="module")
def console(browser, job):
    """A logged-in page: the printed URL opened in a fresh browser context."""
    link = console_link()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/login\?token=[\w-]+", link["url"])
    sock = str(UserLayout.of(ALICE_HOME).console_sock)  # this login node's
    assert link["socket"] == sock
    assert link["ssh"] == f"ssh -N -L {link['port']}:{sock} alice@{link['login_host']}"
    assert link["ssh_tcp"] == f"ssh -N -L {link['port']}:127.0.0.1:{link['port']} alice@{link['login_host']}"
    context = browser.new_context(viewport={"width": 1400, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(link["url"])
    page.wait_for_url(re.compile(r"/console/"))
    base = f"http://127.0.0.1:{link['port']}"
    yield {"page": page, "base": base, "job": job, "link": link, "context": context, "errors": errors}
    context.close()
    assert not errors, f"JavaScript errors on the console: {errors}"


def node_url(c: dict, node: str, tab: str, query: str = "") -> str:
    return f"{c['base']}/console/#/node/{c['job']}/{node}/{tab}{query}"


def test_fleet_shows_both_nodes(console):
    page, job = console["page"], console["job"]
    card = page.locator(f'section.job[data-job="{job}"]')
    for node in ("n1", "n2"):
        row = card.locator(f'tr[data-node="{node}"]')
        row.locator(".badge-ready").wait_for(timeout=TIMEOUT)
        # CPU and memory figures arrive from the node (live, through the master)
        wait_for(lambda: "%" in row.locator("td").nth(3).inner_text() and "GiB" in row.locator("td").nth(4).inner_text(),
                 20, what=f"CPU and memory of {node}")
    assert card.locator("tr[data-node]").count() == 2
    assert "alice" in page.locator("#user").inner_text()
    shot(page, "fleet")


def test_node_metrics(console):
    page, job = console["page"], console["job"]
    page.locator(f'section.job[data-job="{job}"] tr[data-node="n1"] a.node-link').click()
    page.wait_for_url(re.compile(rf"#/node/{job}/n1/overview"))
    hostname = page.locator(".fact").first
    wait_for(lambda: "n1" in hostname.inner_text(), 20, what="the node's hostname")
    page.wait_for_timeout(10_000)  # a few samples in the charts
    assert page.locator(".chart").count() >= 3
    assert page.locator(".chart path[d^='M']").count() >= 3
    shot(page, "node")


def test_terminal_runs_hostname_on_the_node(console):
    page = console["page"]
    page.goto(node_url(console, "n2", "terminal"))
    page.locator(".pill-live").wait_for(timeout=TIMEOUT)
    rows = page.locator(".xterm-rows")
    wait_for(lambda: "$" in rows.inner_text(), 20, what="a shell prompt")
    page.locator(".term-screen").click()
    page.keyboard.type("hostname")
    page.keyboard.press("Enter")
    wait_for(lambda: any(line.strip() == "n2" for line in rows.inner_text().splitlines()), 20,
             what="`hostname` printing n2 in the terminal")
    page.keyboard.type("echo \"I am $(whoami) in job $SLURM_JOB_ID\"")
    page.keyboard.press("Enter")
    wait_for(lambda: f"I am alice in job {console['job']}" in (line.strip() for line in rows.inner_text().splitlines()),
             20, what="the job's environment")
    shot(page, "terminal")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _node_sha256(node: str, path: Path) -> str:
    return on_node(node, "alice", ["sha256sum", str(path)]).stdout.split()[0]


def test_upload_lands_on_the_node_with_the_same_sha256(console, tmp_path):
    page, job = console["page"], console["job"]
    folder = ALICE_HOME / f"console-{job}"
    wait_for(lambda: (folder / "from-the-job.txt").exists(), 30, what="the job's folder")
    page.goto(node_url(console, "n1", "files", f"?path={folder}"))
    page.locator('tr[data-name="from-the-job.txt"]').wait_for(timeout=TIMEOUT)

    local = tmp_path / "upload-by-button.bin"
    local.write_bytes(secrets.token_bytes(3 * 1024 * 1024 + 17))
    page.locator('input[type=file]').set_input_files(str(local))
    done = page.locator(f'.upload.upload-done[data-name="{local.name}"]')
    done.wait_for(timeout=60_000)
    assert done.get_attribute("data-sha256") == _sha256(local)
    page.locator(f'tr[data-name="{local.name}"]').wait_for(timeout=TIMEOUT)
    assert _node_sha256("n1", folder / local.name) == _sha256(local)
    shot(page, "files")

    # drag and drop: a file dropped on the listing is uploaded the same way
    content = secrets.token_hex(4096)
    page.evaluate("""([name, text]) => {
        const dt = new DataTransfer();
        dt.items.add(new File([text], name, {type: 'text/plain'}));
        const card = document.querySelector('.files-card');
        for (const type of ['dragenter', 'dragover', 'drop']) {
          card.dispatchEvent(new DragEvent(type, {dataTransfer: dt, bubbles: true, cancelable: true}));
        }
    }""", ["dropped.txt", content])
    page.locator('.upload.upload-done[data-name="dropped.txt"]').wait_for(timeout=TIMEOUT)
    assert _node_sha256("n1", folder / "dropped.txt") == hashlib.sha256(content.encode()).hexdigest()

    # mkdir, rename and delete through the page's dialogs
    page.get_by_role("button", name="New folder").click()
    page.locator(".modal input").fill("made-in-browser")
    page.locator(".modal button[type=submit]").click()
    page.locator('tr[data-name="made-in-browser"]').wait_for(timeout=TIMEOUT)
    assert (folder / "made-in-browser").is_dir()
    page.get_by_role("button", name="Rename dropped.txt").click()
    page.locator(".modal input").fill("renamed.txt")
    page.locator(".modal button[type=submit]").click()
    page.locator('tr[data-name="renamed.txt"]').wait_for(timeout=TIMEOUT)
    assert (folder / "renamed.txt").is_file() and not (folder / "dropped.txt").exists()
    page.get_by_role("button", name="Delete renamed.txt").click()
    page.locator(".modal button[type=submit]").click()
    page.locator('tr[data-name="renamed.txt"]').wait_for(state="detached", timeout=TIMEOUT)
    assert not (folder / "renamed.txt").exists()

    # download: the same bytes come back
    with page.expect_download() as dl:
        page.get_by_role("link", name=f"Download {local.name}").click()
    assert _sha256(Path(dl.value.path())) == _sha256(local)


def _numbers(page) -> list[int]:
    text = page.locator(".log").inner_text()
    return [int(n) for n in re.findall(r"console-line (\d+)", text)]


def test_log_view_follows_the_job(console):
    page = console["page"]
    page.goto(node_url(console, "n1", "logs", "?name=stdout"))
    page.locator(".pill-live").wait_for(timeout=TIMEOUT)
    wait_for(lambda: _numbers(page), 20, what="the job's lines in the log view")
    first = max(_numbers(page))
    wait_for(lambda: max(_numbers(page)) >= first + 2, 20, what="a new line the job writes, shown live")

    page.get_by_role("button", name="Pause").click()
    held = max(_numbers(page))
    page.wait_for_timeout(2500)
    assert max(_numbers(page)) <= held + 1  # at most one line already on its way
    assert "new" in page.locator(".pill").inner_text()
    page.get_by_role("button", name="Resume").click()
    wait_for(lambda: max(_numbers(page)) > held + 1, 10, what="the held lines after resume")

    page.get_by_placeholder("Search").fill(f"console-line {first}")
    wait_for(lambda: page.locator(".log mark").count() >= 1, 10, what="the search highlighting a match")
    assert f"console-line {first}" in page.locator(".log").inner_text()
    page.get_by_label("matching lines only").uncheck()  # every line, the matches highlighted
    page.get_by_placeholder("Search").fill("from n1")
    wait_for(lambda: page.locator(".log mark").count() >= 5, 10, what="every match highlighted")
    shot(page, "logs")
    page.get_by_placeholder("Search").fill("")


def test_service_opens_through_the_proxy(console):
    page, job = console["page"], console["job"]
    log = ALICE_HOME / f"console-{job}" / "http.log"
    found = wait_for(lambda: re.search(r"port (\d+)", log.read_text() if log.exists() else ""), 30,
                     what="the job's web server saying its port")
    page.goto(node_url(console, "n1", "services"))
    row = page.locator(f'table.services tr[data-port="{found.group(1)}"]')
    row.wait_for(timeout=TIMEOUT)
    assert "http.server" in row.inner_text()
    shot(page, "services")
    with page.expect_popup() as popup:
        row.get_by_role("link").click()
    service = popup.value
    service.wait_for_load_state()
    assert "Directory listing" in service.content()
    # on an origin of its own, never the console's
    assert re.fullmatch(rf"http://p{found.group(1)}-n1-{job}\.localhost:{console['link']['port']}/", service.url), \
        service.url
    shot(service, "service-page")
    service.get_by_role("link", name="from-the-job.txt").click()
    service.wait_for_load_state()
    assert re.search(rf"\bhello from job {job}\b", service.content())
    service.close()


def test_requests_without_the_session_cookie_are_refused(console, browser):
    base, job = console["base"], console["job"]
    # a plain client without the cookie (another user on the login node, say)
    for path in ("/api/agents", f"/api/fleet/{job}/n1/api/node", f"/api/fleet/{job}/n1/api/files?path=/",
                 "/console/config.json"):
        req = urllib.request.Request(base + path)
        try:
            urllib.request.build_opener(_NoRedirect).open(req, timeout=10)
            raise AssertionError(f"{path} answered without a session")
        except urllib.error.HTTPError as e:
            assert e.code in (401, 302), (path, e.code)
    # another user of the login node gets nothing at all: the connection is closed before any answer
    probe = ("import sys, urllib.request, urllib.error\n"
             "for path in sys.argv[2:]:\n"
             "    try:\n"
             "        r = urllib.request.urlopen(sys.argv[1] + path, timeout=10)\n"
             "        print(path, r.status)\n"
             "    except urllib.error.HTTPError as e:\n"
             "        print(path, e.code)\n"
             "    except (OSError, urllib.error.URLError) as e:\n"
             "        print(path, 'closed')\n")
    out = as_user("bob", ["python3", "-c", probe, base, "/console/", "/login", "/api/agents",
                          f"/api/fleet/{job}/n1/api/node"]).stdout
    answers = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert set(answers.values()) == {"closed"} and len(answers) == 4, out
    # a browser without the cookie sees the login page and nothing else
    stranger = browser.new_context()
    page = stranger.new_page()
    page.goto(base + "/console/")
    page.wait_for_url(re.compile(r"/login$"))
    assert "Log in to your console" in page.content()
    # none of the fleet's data: no job card, no node row (a job id like 1 is a substring of any page)
    assert page.locator("[data-job], [data-node]").count() == 0
    assert not re.search(rf"\b(job {job}|n1|n2)\b", page.locator("body").inner_text())
    assert page.request.get(base + "/api/agents").status == 401
    shot(page, "login")
    # a used token does not log in again
    page.goto(console["link"]["url"])
    assert "not valid" in page.content()
    stranger.close()
    # with the cookie, a state change still needs the CSRF header
    resp = console["page"].request.post(base + f"/api/fleet/{job}/n1/api/files/mkdir",
                                        data={"path": "nope", "parents": False})
    assert resp.status == 403


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(req.full_url, code, msg, headers, fp)


def test_lost_node_is_said_plainly(console):
    """The agent on n2 dies (its job goes on): the node's pages say it cannot be reached."""
    page, job = console["page"], console["job"]
    record = next((ALICE_HOME / ".dxflow" / "fleet").glob(f"*.{job}.n2.json"))
    page.goto(node_url(console, "n2", "overview"))
    page.locator(".node-title .badge-ready").wait_for(timeout=TIMEOUT)
    os.killpg(json.loads(record.read_text())["pid"], 9)  # the agent's own process group, nothing else
    banner = page.locator("#banner")
    wait_for(lambda: banner.is_visible() and "cannot be reached" in banner.inner_text(), 30,
             what="the console saying the node cannot be reached")
    shot(page, "lost")


def test_ended_job_is_said_plainly(console):
    page, job = console["page"], console["job"]
    page.goto(node_url(console, "n1", "overview"))
    page.locator(".node-title .badge-ready").wait_for(timeout=TIMEOUT)
    run(["scancel", job])
    banner = page.locator("#banner")
    wait_for(lambda: banner.is_visible() and "has ended" in banner.inner_text(), 60,
             what="the console saying the job has ended")
    shot(page, "ended")


def test_agent_serves_its_own_console(browser, lab):
    """Node mode: `dxflow agent` (a workstation, a container) serves the same console for its node."""
    job = f"console-{secrets.token_hex(3)}"
    agent = subprocess.Popen(["runuser", "-l", "alice", "-c", f"exec {DXFLOW} agent --job {job}"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    fleet = ALICE_HOME / ".dxflow" / "fleet"
    record = None
    try:
        record = wait_for(lambda: next(iter(fleet.glob(f"*.{job}.*.json")), None), 30, what="the agent's registration")
        link = json.loads(dxflow("alice", "console", "--agent", job, "--json").stdout)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        page.goto(link["url"])
        page.wait_for_url(re.compile(rf"#/node/{job}/"))
        page.locator(".node-title .badge-ready").wait_for(timeout=TIMEOUT)
        assert "node" in page.locator("#mode").inner_text()
        page.goto(link["url"].split("/console/")[0] + f"/console/#/node/{job}/{link['node']}/terminal")
        page.locator(".pill-live").wait_for(timeout=TIMEOUT)
        page.locator(".term-screen").click()
        page.keyboard.type("echo node-mode-$((6*7))")
        page.keyboard.press("Enter")
        wait_for(lambda: "node-mode-42" in page.locator(".xterm-rows").inner_text(), 20, what="the shell's answer")
        # the link logs in once; without the cookie the API stays closed
        stranger = browser.new_context().new_page()
        stranger.goto(link["url"])
        assert "used already" in stranger.content()
        assert stranger.request.get(link["url"].split("/console/")[0] + "/api/node").status == 401
        context.close()
    finally:  # stop the agent by the pid it registered (its gunicorn arbiter); runuser then exits
        if record is not None:
            os.kill(json.loads(record.read_text())["pid"], 15)
        else:
            agent.terminate()
        agent.wait(timeout=15)
