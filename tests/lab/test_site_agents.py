"""Agents dial out to a site gateway on the lab (issue #17): enrollment by the real prolog (root's MUNGE
credential), the real Slurm asked whether the job runs, bob's attempts to pass for alice's agent.

The test runs a gateway of its own, as the service account ``dxflow``, on the lab bridge (10.77.0.1),
with the site's real store (SQLite) and fleet (the lab's squeue), and a small control port on the
login node's loopback through which the test asks it things (:data:`GATEWAY`). Agents are started by
``dxflow hook prolog`` run by hand as root in a node's namespace, with a site config that names that
gateway and its keys, for a real running job under the cluster name ``qlab``: the job's own agent
(``dxlab``) started by slurmd is left alone.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import DXFLOW, Jobs, node_nsenter, run, wait_for

from dxflow import enroll

PYTHON = "/opt/dxflow/venv/bin/python"
CLUSTER = "qlab"
BRIDGE = "10.77.0.1"
#: Seconds a job may wait for its node: other tests' jobs may hold every node of the lab for a while.
BUSY_LAB = 600

#: The gateway under test and its control port: run as ``dxflow`` with one argument, its folder.
GATEWAY = r'''
import json, sys, threading, time, urllib.parse
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from dxflow import auth
from dxflow.site.config import ClusterConfig, SiteServiceConfig
from dxflow.site.fleet import SiteFleet
from dxflow.site.gateway import Gateway
from dxflow.site.store import Store

folder = Path(sys.argv[1])
config = SiteServiceConfig(state_dir=str(folder / "state"), publish_dir=str(folder / "publish"), replica="q",
                           clusters={"qlab": ClusterConfig("qlab", "slurm")})
store = Store(str(folder / "state" / "site.db"))
fleet = SiteFleet(config, store)
gw = Gateway(config, store, fleet, listen=("10.77.0.1", 0))
fleet.gateway = gw
gw.start()
token_key = serialization.load_pem_private_key((folder / "state" / "token_key.pem").read_bytes(), None)

def exchange(chan, request):
    chan.settimeout(20)
    chan.sendall(request)
    out = b""
    while len(out) < 65536:
        chunk = chan.recv(65536)
        if not chunk:
            break
        out += chunk
    chan.close()
    return out

class Control(BaseHTTPRequestHandler):
    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        name = q.get("name", "")
        try:
            if url.path == "/connected":
                a = store.agent(name)
                out = {"connected": gw.connected(name), "user": a.reg.user if a else None,
                       "port": a.reg.port if a else None}
            elif url.path == "/api":  # a request to the agent's API with a token the site signs
                a = store.agent(name)
                token = auth.mint_token(token_key, a.reg.user, auth.fingerprint(a.reg.public_key))
                if q.get("user"):  # a site token naming someone else
                    token = auth.mint_token(token_key, q["user"], auth.fingerprint(a.reg.public_key))
                req = (f"GET {q['path']} HTTP/1.0\r\nHost: agent\r\nAuthorization: Bearer {token}\r\n\r\n").encode()
                out = {"answer": exchange(gw.channel(name, 20), req).decode(errors="replace")}
            elif url.path == "/raw":  # a channel that names another port of the node
                t = gw._conns[name].transport
                chan = t.open_channel("forwarded-tcpip", dest_addr=("127.0.0.1", int(q["port"])),
                                      src_addr=("127.0.0.1", 0), timeout=20)
                out = {"answer": exchange(chan, b"GET /api/health HTTP/1.0\r\n\r\n").decode(errors="replace")}
            else:
                out = {"status": gw.status()}
            body, code = json.dumps(out).encode(), 200
        except Exception as e:
            body, code = json.dumps({"error": f"{type(e).__name__}: {e}"}).encode(), 500
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

control = ThreadingHTTPServer(("127.0.0.1", 0), Control)
print(json.dumps({"gateway": gw.address[1], "control": control.server_address[1]}), flush=True)
control.serve_forever()
'''

#: bob's SSH client: logs in to the gateway as USERNAME with CREDENTIAL and the signature of this session
#: by the private key in KEYFILE (an enrollment password, as an agent makes it), "IN" or "OUT why".
ATTACK = r'''
import socket, sys, paramiko
from dxflow import enroll
host, port, username, credential, keyfile = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
t = paramiko.Transport(socket.create_connection((host, port), timeout=20))
t.start_client(timeout=20)
try:
    e = enroll.Enrollment(username, open(keyfile).read(), "", credential)
    t.auth_password(username, enroll.password(e, t.session_id))
    print("IN" if t.is_authenticated() else "OUT")
except paramiko.AuthenticationException as e:
    print("OUT", e)
t.close()
'''


def write_key_pair(folder: Path) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private, public


@pytest.fixture(scope="module")
def site():
    """The gateway (as ``dxflow``) and the agents' site config; yields (folder, config path, ports)."""
    from dxflow import auth

    folder = Path(tempfile.mkdtemp(prefix="dxflow-q-site-", dir="/var/tmp"))  # the nodes see /var/tmp, not /tmp
    folder.chmod(0o755)
    dx = pwd.getpwnam("dxflow")
    state, publish = folder / "state", folder / "publish"
    state.mkdir(mode=0o700)
    publish.mkdir(mode=0o755)
    private, public = write_key_pair(folder)
    (state / "gateway_host_key").write_text(private)
    token_key = auth.new_key()
    (state / "token_key.pem").write_bytes(auth.private_pem(token_key))
    (publish / "gateway_host_key.pub").write_text(public + "\n")
    (publish / "token_key.pem").write_text(auth.public_pem(token_key))
    for p in [state, *state.iterdir()]:
        os.chown(p, dx.pw_uid, dx.pw_gid)
    for p in publish.iterdir():
        p.chmod(0o644)
    (folder / "gateway.py").write_text(GATEWAY)
    (folder / "attack.py").write_text(ATTACK)
    proc = subprocess.Popen(["runuser", "-u", "dxflow", "--", PYTHON, str(folder / "gateway.py"), str(folder)],
                            stdout=subprocess.PIPE, stderr=open(folder / "gateway.log", "w"), text=True,
                            start_new_session=True)
    try:
        ports = json.loads(proc.stdout.readline() or "{}")
        assert ports, f"the gateway did not start: {(folder / 'gateway.log').read_text()[-2000:]}"
        config = folder / "dxflow.toml"
        config.write_text(f'site_gateways = ["{BRIDGE}:{ports["gateway"]}"]\nsite_keys = "{publish}"\n'
                          f'runtime_dir = "/run/dxflow-q-test"\nhook_log = "{folder}/hooks.log"\n')
        config.chmod(0o644)
        yield folder, config, ports
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(10)
        shutil.rmtree(folder, ignore_errors=True)


def control(ports: dict, route: str, **query: str) -> dict:
    url = f"http://127.0.0.1:{ports['control']}{route}?" + "&".join(f"{k}={v}" for k, v in query.items())
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as e:
        return json.load(e)


def hook(kind: str, config: Path, job: str, user: str, node: str) -> None:
    """``dxflow hook prolog|epilog`` as slurmd runs it, by hand, in the node's namespace, for cluster qlab."""
    uid = pwd.getpwnam(user).pw_uid
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job, "SLURM_JOB_USER": user, "SLURM_JOB_UID": str(uid),
           "SLURM_JOB_GID": str(pwd.getpwnam(user).pw_gid), "SLURMD_NODENAME": node, "SLURM_CLUSTER_NAME": CLUSTER,
           "DXFLOW_SITE_CONFIG": str(config)}
    run([*node_nsenter(node), "env", "-i", *[f"{k}={v}" for k, v in env.items()], DXFLOW, "hook", kind,
         "--scheduler", "slurm"], timeout=60)


@pytest.fixture(scope="module")
def agent(site):
    """alice's running job on n1 and its qlab agent, started by the prolog with the site config; the
    agent's name. One for the module's tests, which only look at it and attack it; stopped by the epilog
    afterwards."""
    folder, config, ports = site
    jobs = Jobs()
    try:
        job = jobs.submit("alice", "sleep 600", "-w", "n1", "--mem=64M")
        jobs.wait_running(job, BUSY_LAB)
        hook("prolog", config, job, "alice", "n1")
        name = f"{CLUSTER}.{job}.n1"
        try:
            wait_for(lambda: control(ports, "/connected", name=name).get("connected"), 60,
                     what=f"{name} connected to the gateway (hook log: {folder}/hooks.log)")
            yield job, name
        finally:
            hook("epilog", config, job, "alice", "n1")
    finally:
        jobs.cancel_all()


def attack(site, username: str, credential: str, private_key: str, node: str = "n2") -> str:
    """bob, on ``node``, logs in to the gateway as ``username`` with ``credential``, signing the session
    with ``private_key`` (as an agent enrolls): "IN" or "OUT ..."."""
    folder, _, ports = site
    keyfile = Path(tempfile.mktemp(dir=folder, prefix="key-"))
    keyfile.write_text(private_key)
    keyfile.chmod(0o644)  # bob's, in the test: he holds the key he signs with
    return run([*node_nsenter(node), "runuser", "-u", "bob", "--", PYTHON, str(folder / "attack.py"), BRIDGE,
                str(ports["gateway"]), username, credential, str(keyfile)], timeout=60).stdout.strip()


def test_an_alice_job_agent_enrolls_and_its_api_answers_through_the_gateway(site, agent):
    folder, config, ports = site
    job, name = agent
    state = control(ports, "/connected", name=name)
    assert state["user"] == "alice" and state["port"]
    answer = control(ports, "/api", name=name, path="/api/health")["answer"]
    assert answer.startswith("HTTP/1.") and " 200 " in answer.splitlines()[0], answer[:300]
    # the enrollment was read once and removed: the file the agent was given is gone
    pids = run(["pgrep", "-f", f"dxflow.agent .*--cluster {CLUSTER} --job {job} "], check=False).stdout.split()
    assert pids
    given = [v.split(b"=", 1)[1] for pid in pids for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
             if v.startswith(b"DXFLOW_GATEWAY_ENROLLMENT=")]
    assert given and not any(Path(os.fsdecode(p)).exists() for p in given)
    assert not list(Path("~alice/.dxflow/run").expanduser().glob(f"{name}.gateway.*"))


def test_a_site_token_naming_bob_is_refused_by_alices_agent(site, agent):
    folder, config, ports = site
    job, name = agent
    answer = control(ports, "/api", name=name, path="/api/health", user="bob")["answer"]
    assert " 401 " in answer.splitlines()[0], answer[:300]


def test_a_forwarded_channel_reaches_only_the_agents_own_port(site, agent):
    folder, config, ports = site
    job, name = agent
    answer = control(ports, "/raw", name=name, port="22")["answer"]  # sshd of the node listens on 22
    assert not answer.startswith("SSH-"), answer[:100]
    assert answer.startswith("HTTP/1.") and "401" in answer.splitlines()[0], answer[:300]


def test_bob_cannot_enroll_as_alices_agent(site, agent, jobs):
    folder, config, ports = site
    job, name = agent
    private, public = write_key_pair(folder)
    # his own credential (bob's uid, not root's), naming alice's agent and a key he holds
    payload = enroll.payload(CLUSTER, job, "n1", "alice", public).decode()
    own = run([*node_nsenter("n2"), "runuser", "-u", "bob", "--", "munge", "-s", payload]).stdout.strip()
    assert attack(site, name, own, private).startswith("OUT")
    # a root credential of his own job's agent (his to read), presented under alice's agent's name
    bobs = jobs.submit("bob", "sleep 300", "-w", "n2", "--mem=64M")
    jobs.wait_running(bobs, BUSY_LAB)
    his = enroll.make(CLUSTER, bobs, "n2", "bob")
    assert attack(site, name, his.credential, his.private_key).startswith("OUT")
    # root's credential for alice's agent itself (as if stolen), with a key of his own: the key it names is not his
    hers = enroll.make(CLUSTER, job, "n1", "alice")
    assert attack(site, name, hers.credential, private).startswith("OUT")
    assert control(ports, "/connected", name=name)["user"] == "alice"  # alice's agent is still hers, connected
    assert control(ports, "/connected", name=name)["connected"]


def test_a_replayed_credential_without_its_keys_signature_is_refused(site, jobs):
    folder, config, ports = site
    bobs = jobs.submit("bob", "sleep 300", "-w", "n2", "--mem=64M")
    jobs.wait_running(bobs, BUSY_LAB)
    his = enroll.make(CLUSTER, bobs, "n2", "bob")
    assert attack(site, his.name, his.credential, his.private_key).startswith("IN")  # its first use
    wait_for(lambda: control(ports, "/connected", name=his.name)["user"] == "bob", 10, what="bob's agent enrolled")
    # the same credential again, the session signed by another key: munged is not asked again (the decode is
    # kept for the agent's retries), and the kept decode names the agent's key, not this one
    assert attack(site, his.name, his.credential, write_key_pair(folder)[0]).startswith("OUT")
    # its own key holder, on a fresh session, within its time to live: let in (a retry, on this or another replica)
    assert attack(site, his.name, his.credential, his.private_key).startswith("IN")


def test_a_credential_for_n2_is_refused_where_the_scheduler_says_the_job_is_not_on_n2(site, jobs):
    folder, config, ports = site
    job = jobs.submit("alice", "sleep 300", "-w", "n1", "--mem=64M")
    jobs.wait_running(job, BUSY_LAB)
    assert run(["squeue", "-h", "-j", job, "-o", "%N"]).stdout.strip() == "n1"
    there = enroll.make(CLUSTER, job, "n1", "alice")
    elsewhere = enroll.make(CLUSTER, job, "n2", "alice")  # root's word for n2, where the job does not run
    assert attack(site, elsewhere.name, elsewhere.credential, elsewhere.private_key).startswith("OUT")
    assert control(ports, "/connected", name=elsewhere.name)["user"] is None
    # the same, for the node where the job runs, is let in: the scheduler's answer made the difference
    assert attack(site, there.name, there.credential, there.private_key, node="n1").startswith("IN")
