"""The shell end to end on one machine: the agent's PTY WebSocket and the master's relay, each under
gunicorn (gthread) in its own process as deployed, and ``dxflow shell`` driven by pexpect.

Only the tunnel (the agent is on "localhost": a plain TCP connection) and the job's environment
(a fixed, clean one) are stand-ins. Run as a script, this file is the server processes' entry point.
"""

from __future__ import annotations

import contextlib
import gc
import getpass
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from gunicorn_proc import Gunicorn, running, serve, tcp_port

ROOT = Path(__file__).resolve().parents[2]
JOB, NODE = "7", "n1"


# -- the servers (run in subprocesses) ----------------------------------------------------------
#: gunicorn's settings for both servers, as deployed: gthread
SETTINGS = {"worker_class": "gthread", "threads": 16, "loglevel": "debug", "graceful_timeout": 1}


def serve_agent(tmp: Path) -> None:
    import dxflow.agent.shell as shell_module
    from dxflow.agent import create_app
    from dxflow.agent.state import AgentState
    from dxflow.auth import fingerprint, new_key, private_pem, public_pem
    from dxflow.signatures import load_private_key  # an agent signs with python-rsa

    key = new_key()
    pub = public_pem(key)
    (tmp / "agent.pub").write_text(pub)
    home = tmp / "home"
    shell_module.job_environment = lambda state: {  # a clean, known environment instead of the job's
        "HOME": str(home), "USER": state.user, "LOGNAME": state.user, "SHELL": "/bin/bash",
        "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "DXFLOW_JOB": JOB, "DXFLOW_AGENT": "1"}
    state = AgentState(scheduler="local", cluster="test", job=JOB, node=NODE, user=getpass.getuser(), home=home,
                       key=load_private_key(private_pem(key)), public_key=pub, audience=fingerprint(pub),
                       user_public_key=(tmp / "user.pub").read_text(), work_dir=str(tmp / "work"))

    serve(create_app(state), tmp / "agent.ready", bind=["127.0.0.1:0"], errorlog=str(tmp / "agent.log"), **SETTINGS)


def serve_master(tmp: Path) -> None:
    from types import SimpleNamespace

    from cryptography.hazmat.primitives import serialization

    import dxflow.master.app as master_app
    from dxflow.auth import fingerprint, mint_token
    from dxflow.errors import NotFound
    from dxflow.edge.channelhttp import TunnelHTTPConnection
    from dxflow.master.tunnels import TunnelPool

    user_key = serialization.load_pem_private_key((tmp / "user.pem").read_bytes(), None)
    agent_pub = (tmp / "agent.pub").read_text()
    port = tcp_port(json.loads((tmp / "agent.ready").read_text()))

    class FakeFleet:  # the registry and scheduler are someone else's: one known agent
        user = getpass.getuser()
        base = tmp / "home" / ".dxflow"
        pool = TunnelPool()
        # the one agent, as `dxflow ls` lists it (the CLI looks its target up there first)
        registry = SimpleNamespace(all=lambda: [SimpleNamespace(
            state="ready", to_dict=lambda: {"job": JOB, "node": NODE, "state": "ready", "detail": ""})])

        def relay_target(self, job, node=None):
            if job != JOB or node not in (None, NODE):
                raise NotFound(f"no agent of job {job} on {node}")
            return SimpleNamespace(state="ready", name=f"test.{JOB}.{NODE}",
                                   reg=SimpleNamespace(address="localhost", port=port, job=JOB, node=NODE,
                                                       public_key=agent_pub))

        def token(self, agent):
            return mint_token(user_key, self.user, fingerprint(agent.reg.public_key))

        def proven_generation(self, agent):
            return None  # an agent on this host: no tunnel to pin

        def connection(self, agent, timeout=60.0):
            return TunnelHTTPConnection(self.pool, "localhost", port, timeout=timeout)

        def acquire(self, agent, timeout=60.0):
            return self.connection(agent, timeout), False

        def release(self, agent, conn, reusable):
            conn.close()

        def refresh(self):
            pass

    master_app.EXTENSIONS = ("dxflow.master.websocket",)  # the console is not under test here
    from dxflow.layout import UserLayout

    sock = UserLayout.of(tmp / "home").ensure().master_sock  # where the CLI (HOME=tmp/home) looks
    serve(master_app.create_app(FakeFleet()), tmp / "master.ready", bind=[f"unix:{sock}"],
          errorlog=str(tmp / "master.log"), **SETTINGS)


# -- fixtures -------------------------------------------------------------------------------------
def _start(mode: str, tmp: Path) -> contextlib.AbstractContextManager[Gunicorn]:
    return running([sys.executable, __file__, mode, str(tmp)], tmp / f"{mode}.ready", tmp / f"{mode}.log",
                   env=dict(os.environ, HOME=str(tmp / "home")), stderr=tmp / f"{mode}.err")


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from dxflow.auth import fingerprint, new_key, private_pem, public_pem
    from dxflow.layout import UserLayout

    tmp = tmp_path_factory.mktemp("shell")
    (tmp / "home" / ".dxflow").mkdir(parents=True, mode=0o700)
    (tmp / "work").mkdir()
    key = new_key()
    (tmp / "user.pem").write_bytes(private_pem(key))
    (tmp / "user.pub").write_text(public_pem(key))
    # the master is started once the agent listens: it reads the agent's port and key
    with _start("agent", tmp) as agent, _start("master", tmp):
        yield {"tmp": tmp, "key": key, "port": agent.port, "aud": fingerprint((tmp / "agent.pub").read_text()),
               "master": UserLayout.of(tmp / "home").master_sock}


class Term:
    """A WebSocket shell session seen from a test: send typed text, wait for output patterns."""

    def __init__(self, ws):
        self.ws = ws
        self.out = b""
        self.texts: list[dict] = []
        self.closed = False

    def type(self, text: str) -> None:
        self.ws.send(text.encode())

    def pump(self, timeout: float) -> None:
        import select

        if self.closed:
            return
        if select.select([self.ws], [], [], timeout)[0]:
            for message in self.ws.receive():
                if message[0] == "binary":
                    self.out += message[1]
                elif message[0] == "text":
                    self.texts.append(json.loads(message[1]))
                else:
                    self.closed = True

    def expect(self, pattern: str, timeout: float = 15) -> re.Match:
        deadline = time.monotonic() + timeout
        start = len(self.out)
        while True:
            m = re.search(pattern.encode(), self.out[max(0, start - 200):])
            if m:
                return m
            if self.closed or time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} in output: {self.out[-2000:]!r}")
            self.pump(0.2)

    def wait_closed(self, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while not self.closed:
            assert time.monotonic() < deadline, f"still open; output: {self.out[-2000:]!r}"
            self.pump(0.2)


def agent_shell(servers, query: str = "cols=80&rows=24", token: str | None = None) -> Term:
    from dxflow.auth import mint_token
    from dxflow.edge.wsclient import WebSocketClient

    sock = socket.create_connection(("127.0.0.1", servers["port"]), timeout=15)
    ws = WebSocketClient(sock)
    tok = token if token is not None else mint_token(servers["key"], getpass.getuser(), servers["aud"])
    ws.handshake(f"/api/shell?{query}", headers=[("Authorization", f"Bearer {tok}")] if tok else [])
    return Term(ws)


def master_shell(servers, path: str) -> Term:
    from dxflow.edge.wsclient import WebSocketClient

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(15)
    sock.connect(str(servers["master"]))
    ws = WebSocketClient(sock)
    ws.handshake(path)
    return Term(ws)


def alive(pid: int) -> bool:
    """Running, or a zombie nobody reaped."""
    return Path(f"/proc/{pid}").exists()


# -- the agent's endpoint ---------------------------------------------------------------------------
def test_agent_shell_runs_in_job_env_and_exits_with_code(servers):
    t = agent_shell(servers)
    t.type("echo $((6*7))x; echo T=$TERM; pwd\r")
    t.expect(r"42x")
    t.expect(r"T=xterm-256color")
    t.expect(re.escape(str(servers["tmp"] / "work")))
    t.type("exit 3\r")
    t.wait_closed()
    assert t.texts[-1] == {"exit": 3}


def test_agent_shell_size_resize_and_bad_control(servers):
    t = agent_shell(servers, "cols=100&rows=30")
    t.type("stty size\r")
    t.expect(r"30 100")
    t.ws.send(json.dumps({"resize": [132, 43]}))
    t.type("stty size\r")
    t.expect(r"43 132")
    t.ws.send(json.dumps({"signal": "BOGUS"}))
    deadline = time.monotonic() + 10
    while not any("error" in x for x in t.texts):
        assert time.monotonic() < deadline, t.texts
        t.pump(0.2)
    t.type("exit\r")
    t.wait_closed()
    assert t.texts[-1] == {"exit": 0}


def test_agent_shell_signal_reaches_foreground_job(servers):
    t = agent_shell(servers)
    t.type("echo go; sleep 30; echo not-interrupted\r")
    t.expect(r"[\r\n]go\r\n")
    time.sleep(0.3)
    t.ws.send(json.dumps({"signal": "INT"}))
    t.type("echo rc=$?x\r")
    t.expect(r"rc=130x", timeout=5)
    assert not re.search(rb"[\r\n]not-interrupted", t.out)  # only in the echoed command line
    t.type("exit\r")
    t.wait_closed()


def test_agent_shell_hung_up_when_client_leaves(servers):
    t = agent_shell(servers)
    t.type("sleep 1001 & echo bg=$!x; echo sh=$$x\r")
    bg = int(t.expect(r"bg=(\d+)x").group(1))
    sh = int(t.expect(r"sh=(\d+)x").group(1))
    t.type("sleep 1002\r")
    time.sleep(0.3)
    assert alive(sh) and alive(bg)
    t.ws.sock.close()  # no close frame: the client just goes away
    deadline = time.monotonic() + 10
    while alive(sh) or alive(bg):
        assert time.monotonic() < deadline, f"shell {sh} or its job {bg} still there after the client left"
        time.sleep(0.1)
    out = subprocess.run(["pgrep", "-f", "sleep 100[12]"], capture_output=True, text=True).stdout
    assert out.strip() == ""


def test_agent_shell_refuses_bad_size_and_missing_token(servers):
    from dxflow.edge.wsclient import HandshakeRejected

    with pytest.raises(HandshakeRejected) as e:
        agent_shell(servers, "cols=wide&rows=24")
    assert e.value.status == 400 and b"cols" in e.value.body
    with pytest.raises(HandshakeRejected) as e:
        agent_shell(servers, token="")
    assert e.value.status == 401


def test_pty_session_in_process(tmp_path):
    """PtySession without a server: a fake WebSocket, a plain sh, exit code and clean up."""
    import queue

    from simple_websocket import ConnectionClosed

    from dxflow.agent.shell import PtySession

    class FakeWS:
        connected = True

        def __init__(self):
            self.inbox: queue.Queue = queue.Queue()
            self.sent: list = []

        def receive(self, timeout=None):
            try:
                return self.inbox.get(timeout=timeout)
            except queue.Empty:
                return None

        def send(self, data):
            if not self.connected:
                raise ConnectionClosed()
            self.sent.append(data)

    gc.collect()  # garbage of earlier tests must not close its descriptors during this one
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(FileNotFoundError):
        PtySession.spawn(["/bin/sh"], {"PATH": "/usr/bin:/bin"}, str(tmp_path / "missing"))
    assert set(os.listdir("/proc/self/fd")) <= fds  # no PTY left open
    session = PtySession.spawn(["/bin/sh"], {"PATH": "/usr/bin:/bin", "PS1": "$ "}, str(tmp_path), 50, 10)
    ws = FakeWS()
    server = threading.Thread(target=session.serve, args=(ws,))
    server.start()

    def output():
        return b"".join(x for x in ws.sent if isinstance(x, bytes))

    ws.inbox.put(b"stty size; echo in=$(pwd)x\n")
    deadline = time.monotonic() + 10
    while b"10 50" not in output():
        assert time.monotonic() < deadline, output()
        time.sleep(0.05)
    ws.inbox.put(json.dumps({"resize": [70, 20]}))
    ws.inbox.put(b"stty size; exit 9\n")
    server.join(15)
    assert not server.is_alive()
    session.close()
    session.close()  # idempotent
    out = b"".join(x for x in ws.sent if isinstance(x, bytes))
    assert b"10 50" in out and b"20 70" in out and f"in={tmp_path}x".encode() in out
    assert ws.sent[-1] == '{"exit": 9}' and session.exit_code == 9
    assert not alive(session.pid)
    # none left open by the session (an earlier test's leftovers may close theirs meanwhile: not a leak)
    assert set(os.listdir("/proc/self/fd")) <= fds


# -- the master's relay -----------------------------------------------------------------------------
def test_master_relays_websocket_to_agent(servers):
    t = master_shell(servers, f"/api/fleet/{JOB}/{NODE}/api/shell?cols=90&rows=20")
    t.type("stty size; echo via-$((40+2))\r")
    t.expect(r"20 90")
    t.expect(r"via-42")
    t.type("exit 5\r")
    t.wait_closed()
    assert t.texts[-1] == {"exit": 5}


def test_master_relays_refusals_and_plain_http(servers):
    from dxflow.master.client import UnixHTTPConnection
    from dxflow.edge.wsclient import HandshakeRejected

    with pytest.raises(HandshakeRejected) as e:
        master_shell(servers, f"/api/fleet/{JOB}/{NODE}/api/shell?rows=0")
    assert e.value.status == 400 and json.loads(e.value.body)["error"] == "UsageError"
    with pytest.raises(HandshakeRejected) as e:
        master_shell(servers, f"/api/fleet/{JOB}/n9/api/shell")
    assert e.value.status == 404
    conn = UnixHTTPConnection(servers["master"], timeout=10)  # the HTTP relay is untouched by the WebSocket route
    conn.request("GET", f"/api/fleet/{JOB}/-/api/health")
    resp = conn.getresponse()
    assert resp.status == 200 and json.loads(resp.read())["node"] == NODE


def test_master_relay_client_leaving_ends_shell(servers):
    t = master_shell(servers, f"/api/fleet/{JOB}/-/api/shell")
    t.type("echo sh=$$x\r")
    sh = int(t.expect(r"sh=(\d+)x").group(1))
    t.ws.sock.close()
    deadline = time.monotonic() + 10
    while alive(sh):
        assert time.monotonic() < deadline, f"shell {sh} still there after the client left the master"
        time.sleep(0.1)


# -- the CLI ------------------------------------------------------------------------------------------
def _cli(servers, *args: str, **kw):
    pexpect = pytest.importorskip("pexpect")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(servers["tmp"] / "home"))
    return pexpect.spawn(sys.executable, ["-m", "dxflow", *args], env=env, timeout=20, dimensions=(24, 80), **kw)


def test_cli_shell_interactive(servers):
    child = _cli(servers, "shell", f"{JOB}:{NODE}")
    child.sendline("stty size; echo cli-$((40+2))")
    child.expect("24 80")
    child.expect("cli-42")
    child.setwinsize(33, 101)
    time.sleep(0.3)
    child.sendline("stty size")
    child.expect("33 101")
    child.sendcontrol("c")  # raw mode: Ctrl-C goes to the remote terminal, not to the CLI
    child.sendline("echo still-here")
    child.expect("still-here")
    child.sendline("exit 4")
    child.expect(pexpect_eof())
    child.close()
    assert child.exitstatus == 4


def test_cli_shell_piped_input(servers):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(servers["tmp"] / "home"))
    proc = subprocess.run([sys.executable, "-m", "dxflow", "shell", JOB], input="echo piped-$((1+1))\nexit 6\n",
                          capture_output=True, text=True, env=env, timeout=30)
    assert "piped-2" in proc.stdout, proc.stdout + proc.stderr
    assert proc.returncode == 6


def test_cli_shell_unknown_node(servers):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HOME=str(servers["tmp"] / "home"))
    proc = subprocess.run([sys.executable, "-m", "dxflow", "shell", f"{JOB}:n9"], stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 5 and "n9" in proc.stderr


def pexpect_eof():
    import pexpect

    return pexpect.EOF


if __name__ == "__main__":
    {"agent": serve_agent, "master": serve_master}[sys.argv[1]](Path(sys.argv[2]))
