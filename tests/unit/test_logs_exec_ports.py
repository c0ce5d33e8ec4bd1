"""Logs, exec, ports, proxy and the OpenAPI document of the agent, in-process (Flask's test client)."""

from __future__ import annotations

import base64
import getpass
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dxflow import auth
from dxflow.agent import create_app, jobwatch, logs, ports
from dxflow.agent.state import AgentState
from dxflow.edge import tcptable
from dxflow.errors import AccessDenied, NotFound, UsageError
from dxflow.schedulers import JobInfo, JobState
from dxflow.schedulers.base import Presence


@pytest.fixture
def agent(tmp_path, monkeypatch):
    user_key = auth.new_key()
    agent_key = auth.new_key()
    pub = auth.public_pem(agent_key)
    home = tmp_path / "home"
    (home / ".dxflow" / "logs").mkdir(parents=True)
    work = tmp_path / "work"
    work.mkdir()
    state = AgentState(scheduler="local", cluster="t", job="42", node="n1", user=getpass.getuser(), home=home,
                       key=agent_key, public_key=pub, audience=auth.fingerprint(pub),
                       user_public_key=auth.public_pem(user_key), work_dir=str(work),
                       stdout=str(work / "out.txt"), stderr=str(work / "err.txt"), started=time.time())
    client = create_app(state, {"TESTING": True}).test_client()
    headers = {"Authorization": f"Bearer {auth.mint_token(user_key, state.user, state.audience)}"}
    return client, state, headers


# -- /proc/net/tcp ----------------------------------------------------------------------------------------

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:223D 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 43121 1 0 100 0 0 10 0
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 43122 1 0 100 0 0 10 0
   2: 0100007F:C350 0100007F:223D 01 00000000:00000000 00:00000000 00000000  1000        0 43123 1 0 20 4 30 10 -1
   3: 024D0A0A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 43124 1 0 100 0 0 10 0
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:2242 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5001 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:2243 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5002 1 0 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:2244 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5003 1 0 100 0 0 10 0
"""


def test_parse_proc_net_tcp_listeners_only():
    found = tcptable.parse_listeners(PROC_NET_TCP)
    assert [(s.address, s.port, s.uid, s.inode) for s in found] == [
        ("127.0.0.1", 8765, 1000, 43121), ("0.0.0.0", 8080, 1001, 43122), ("10.10.77.2", 80, 1000, 43124)]
    six = tcptable.parse_listeners(PROC_NET_TCP6)
    assert [(s.address, s.port) for s in six] == [("::", 8770), ("::1", 8771), ("::ffff:127.0.0.1", 8772)]


def test_parse_proc_net_tcp_skips_garbage():
    assert tcptable.parse_listeners("header\n 0: zz:1 00:00 0A 0 0 0 1000 0 1\n\nshort line\n") == []


def L(address, port, uid, inode):
    return tcptable.Listener(address, port, uid, inode)


def test_check_port_mine_other_missing_own(monkeypatch):
    uid = os.getuid()
    found = [L("0.0.0.0", 8000, uid, 1), L("127.0.0.1", 8001, uid + 1, 2), L("::1", 8002, uid, 3),
             L("10.77.0.2", 8003, uid, 4), L("::", 8004, uid, 5), L("127.0.0.1", 8004, uid + 1, 6),
             L("127.0.0.1", 8005, uid, 7), L("10.77.0.2", 8006, uid + 1, 8)]
    owners = {1: 100, 3: 101, 4: 102, 5: 103, 7: os.getpid()}
    assert ports.check_port(8000, found, owners)["connect"] == "127.0.0.1"
    assert ports.check_port(8002, found, owners)["connect"] == "::1"
    assert ports.check_port(8003, found, owners)["connect"] == "10.77.0.2"
    with pytest.raises(AccessDenied, match="another user"):
        ports.check_port(8001, found, owners)
    with pytest.raises(AccessDenied, match="another user"):  # ours on ::, someone else's on 127.0.0.1
        ports.check_port(8004, found, owners)
    with pytest.raises(AccessDenied, match="agent's own"):
        ports.check_port(8005, found, owners)
    with pytest.raises(AccessDenied):
        ports.check_port(8006, found, owners)
    with pytest.raises(NotFound, match="nothing listens"):
        ports.check_port(9999, found, owners)
    with pytest.raises(UsageError):
        ports.check_port(70000, found, owners)


def test_check_port_same_uid_but_socket_not_held_by_our_processes():
    found = [L("0.0.0.0", 8000, os.getuid(), 1)]
    with pytest.raises(AccessDenied):
        ports.check_port(8000, found, {})


@pytest.fixture
def listener():
    """A process of ours (not the test process) listening on a free port of 127.0.0.1."""
    code = ("import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    yield proc, port
    proc.kill()
    proc.wait()


def test_own_ports_real_proc(listener, agent):
    proc, port = listener
    mine = {p["port"]: p for p in ports.own_ports()}
    assert port in mine and mine[port]["pid"] == proc.pid and mine[port]["process"].startswith("python")
    assert ports.check_port(port)["pid"] == proc.pid
    client, _, headers = agent
    body = client.get("/api/ports", headers=headers).get_json()
    assert any(p["port"] == port and p["address"] == "127.0.0.1" for p in body)
    assert client.get(f"/api/ports/{port}", headers=headers).get_json()["connect"] == "127.0.0.1"


def test_own_ports_excludes_the_agents_own_sockets(agent):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        assert port not in {p["port"] for p in ports.own_ports()}
        client, _, headers = agent
        resp = client.get(f"/api/ports/{port}", headers=headers)
        assert resp.status_code == 403 and "own port" in resp.get_json()["message"]
        assert client.get(f"/proxy/{port}/", headers=headers).status_code == 403
    finally:
        s.close()


# -- log paths ---------------------------------------------------------------------------------------------

class FakeScheduler:
    def __init__(self, info=None, state=JobState.RUNNING, fail=False):
        self.info, self.state, self.fail, self.asked = info, state, fail, 0

    def job(self, job_id):
        self.asked += 1
        if self.fail:
            from dxflow.errors import SchedulerError
            raise SchedulerError("squeue failed")
        return self.info

    def job_state(self, job_id):
        return self.state


def _state(**kw):
    base = dict(scheduler="slurm", cluster="c", job="77", node="n2", user="alice", home=Path("/home/alice"),
                key=None, public_key="", audience="", user_public_key="", work_dir="/home/alice/run")
    base.update(kw)
    return AgentState(**base)


def test_expand_pattern():
    st = _state()
    assert logs.expand_pattern("/o/slurm-%j.out", st) == "/o/slurm-77.out"
    assert logs.expand_pattern("%u-%N-%8j-%%-%x-%A", st, "train") == "alice-n2-00000077-%-train-%A"
    assert logs.expand_pattern("%x.out", st) == "%x.out"  # the name is unknown here: left alone


def test_paths_given_plainly_need_no_scheduler(monkeypatch):
    sched = FakeScheduler()
    monkeypatch.setattr(logs, "get_scheduler", lambda name: sched)
    st = _state(stdout="out.txt")
    assert logs.job_output_paths(st) == {"stdout": "/home/alice/run/out.txt", "stderr": "/home/alice/run/out.txt"}
    assert sched.asked == 0


def test_pattern_or_empty_asks_the_scheduler_once(monkeypatch):
    info = JobInfo(job="77", user="alice", state=JobState.RUNNING, name="train", work_dir="/home/alice/run",
                   stdout="/home/alice/run/train-77.out", stderr="")
    sched = FakeScheduler(info)
    monkeypatch.setattr(logs, "get_scheduler", lambda name: sched)
    for given in ("/home/alice/run/%x-%j.out", ""):
        st = _state(stdout=given)
        sched.asked = 0
        for _ in range(3):
            assert logs.job_output_paths(st) == {"stdout": "/home/alice/run/train-77.out",
                                                 "stderr": "/home/alice/run/train-77.out"}
        assert sched.asked == 1


def test_scheduler_down_falls_back_to_local_expansion(monkeypatch):
    sched = FakeScheduler(fail=True)
    monkeypatch.setattr(logs, "get_scheduler", lambda name: sched)
    st = _state(stdout="/home/alice/slurm-%j.out")
    assert logs.job_output_paths(st)["stdout"] == "/home/alice/slurm-77.out"
    assert logs.job_output_paths(_state(stdout=""))["stdout"] == "/home/alice/run/slurm-77.out"  # Slurm's default
    assert "log_paths" not in st.extra  # asked again later


def test_tail_offset():
    import io
    cases = [(b"a\nb", 1, b"b"), (b"a\nb\n", 1, b"b\n"), (b"a\nb\n", 5, b"a\nb\n"), (b"", 3, b""),
             (b"x" * 200_000 + b"\nlast\n", 1, b"last\n"), (b"a\nb\n", 0, b"")]
    for data, k, want in cases:
        f = io.BytesIO(data)
        assert data[logs.tail_offset(f, k):] == want


def test_sse_event_format():
    assert logs.sse_event("hi", event_id=3) == b"id: 3\ndata: hi\n\n"
    assert logs.sse_event("a\rb") == b"data: a\ndata: b\n\n"
    assert logs.sse_event("bye", event="end") == b"event: end\ndata: bye\n\n"


# -- /api/logs ---------------------------------------------------------------------------------------------

def test_list_and_read_logs(agent):
    client, state, headers = agent
    Path(state.stdout).write_text("one\ntwo\nthree\n")
    body = {x["name"]: x for x in client.get("/api/logs", headers=headers).get_json()}
    assert body["stdout"]["size"] == 14 and body["stdout"]["exists"]
    assert body["stderr"]["exists"] is False and body["agent"]["path"].endswith("/t.42.n1.log")
    resp = client.get("/api/logs/stdout?lines=2", headers=headers)
    assert resp.status_code == 200 and resp.data == b"two\nthree\n"
    assert client.get("/api/logs/stdout", headers=headers).data == b"one\ntwo\nthree\n"
    assert client.get("/api/logs/stdout?lines=x", headers=headers).status_code == 400
    assert client.get("/api/logs/stdout?lines=-1", headers=headers).status_code == 400
    assert client.get("/api/logs/stderr", headers=headers).status_code == 404
    assert client.get("/api/logs/passwd", headers=headers).status_code == 404


def _events(resp, until, timeout=5.0):
    """Read SSE events from a streamed test-client response until ``until(events)``; in a thread, bounded."""
    events, buf = [], b""
    done = threading.Event()

    def reader():
        nonlocal buf
        for chunk in resp.response:
            buf += chunk
            while b"\n\n" in buf:
                raw, buf = buf.split(b"\n\n", 1)
                fields = {}
                for line in raw.decode().split("\n"):
                    k, _, v = line.partition(": ")
                    fields.setdefault(k, []).append(v)
                if "data" in fields:
                    events.append((fields.get("event", ["message"])[0], "\n".join(fields["data"])))
            if until(events):
                break
        done.set()

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    done.wait(timeout)
    return events


def test_follow_sends_new_lines_then_end(agent, monkeypatch):
    client, state, headers = agent
    Path(state.stdout).write_text("old1\nold2\n")
    resp = client.get("/api/logs/stdout/follow?lines=1", headers=headers, buffered=False)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"

    def writer():
        time.sleep(0.2)
        with open(state.stdout, "a") as f:
            f.write("new1\nnew2 part")
            f.flush()
            time.sleep(0.1)
            f.write("ial\n")
    threading.Thread(target=writer, daemon=True).start()
    t0 = time.monotonic()
    events = _events(resp, lambda ev: len(ev) >= 3)
    assert [d for _, d in events[:3]] == ["old2", "new1", "new2 partial"]
    assert time.monotonic() - t0 < 2
    resp.close()


def test_follow_ends_with_the_job(agent, monkeypatch):
    """The end comes from the agent's own look at its node (its job watch), not from the scheduler."""
    client, state, headers = agent
    Path(state.stdout).write_text("x\n")
    ended = Presence.LASTING

    class Node(FakeScheduler):
        name = "slurm"

        def job_here(self, job_id, node):
            return ended

        def job_state(self, job_id):
            raise AssertionError("a follower never asks the scheduler")

    watch = jobwatch.JobWatch(Node(), state.job, state.node, look_every=60, ask_every=60)
    state.extra[jobwatch.KEY] = watch
    watch.look()  # its batch step is seen ...
    ended = Presence.ABSENT  # ... and then gone
    resp = client.get("/api/logs/stdout/follow", headers=headers, buffered=False)
    events = _events(resp, lambda ev: any(e == "end" for e, _ in ev))
    assert events[0] == ("message", "x") and events[-1][0] == "end"


def test_follow_resumes_after_last_event_id(agent):
    client, state, headers = agent
    Path(state.stdout).write_text("aa\nbb\ncc\n")
    resp = client.get("/api/logs/stdout/follow", headers={**headers, "Last-Event-ID": "3"}, buffered=False)
    assert [d for _, d in _events(resp, lambda ev: len(ev) >= 2)][:2] == ["bb", "cc"]
    resp.close()
    assert client.get("/api/logs/stdout/follow?offset=x", headers=headers).status_code == 400


# -- /api/exec -----------------------------------------------------------------------------------------------

def _run(client, headers, body):
    resp = client.post("/api/exec", json=body, headers=headers)
    out = {"stdout": b"", "stderr": b""}
    result = None
    for line in resp.data.splitlines():
        if not line.strip():
            continue
        msg = json.loads(line)
        if "exit" in msg:
            result = msg
        else:
            out[msg["stream"]] += base64.b64decode(msg["data"])
    return resp, out, result


def test_exec_streams_separately_and_exits(agent):
    client, state, headers = agent
    resp, out, result = _run(client, headers, {"argv": ["sh", "-c", "echo out; echo err >&2; pwd; exit 3"]})
    assert resp.status_code == 200 and resp.mimetype == "application/x-ndjson"
    assert out["stdout"] == f"out\n{state.work_dir}\n".encode() and out["stderr"] == b"err\n"
    assert result == {"exit": 3}


def test_exec_env_cwd_stdin(agent):
    client, state, headers = agent
    os.mkdir(os.path.join(state.work_dir, "sub"))
    _, out, result = _run(client, headers, {"argv": ["sh", "-c", "echo $DXFLOW_JOB $FOO; pwd; cat"],
                                            "env": {"FOO": "bar"}, "cwd": "sub", "stdin": "piped\n"})
    assert out["stdout"].decode().split("\n")[:3] == ["42 bar", os.path.join(state.work_dir, "sub"), "piped"]
    assert result == {"exit": 0}


def test_exec_signal_and_missing_command(agent):
    client, _, headers = agent
    _, _, result = _run(client, headers, {"argv": ["sh", "-c", "kill -9 $$"]})
    assert result == {"exit": 137, "signal": 9}
    _, out, result = _run(client, headers, {"argv": ["no-such-command-dxflow"]})
    assert result == {"exit": 127} and b"command not found" in out["stderr"]


@pytest.mark.parametrize("body", [None, {}, {"argv": []}, {"argv": "ls"}, {"argv": [1]}, {"argv": [""]},
                                  {"argv": ["ls"], "env": {"A=B": "x"}}, {"argv": ["ls"], "env": []},
                                  {"argv": ["ls"], "cwd": "no/such/dir"}, {"argv": ["ls"], "stdin": 5},
                                  {"argv": ["a\0b"]}])
def test_exec_bad_requests(agent, body):
    client, _, headers = agent
    resp = client.post("/api/exec", data=json.dumps(body), content_type="application/json", headers=headers)
    assert resp.status_code == 400 and resp.get_json()["error"] == "UsageError"


def test_exec_killed_when_client_goes_away(agent):
    client, _, headers = agent
    resp = client.post("/api/exec", json={"argv": ["sh", "-c", "echo $$; exec sleep 30"]}, headers=headers,
                       buffered=False)
    first = next(iter(resp.response))
    pid = int(base64.b64decode(json.loads(first)["data"]))
    assert os.path.exists(f"/proc/{pid}")
    resp.close()  # the generator is closed, as gunicorn does when the client is gone
    deadline = time.monotonic() + 3
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")


def test_exec_keepalive_during_silence(agent, monkeypatch):
    from dxflow.agent import exec as agent_exec
    monkeypatch.setattr(agent_exec, "KEEPALIVE", 0.1)
    client, _, headers = agent
    resp = client.post("/api/exec", json={"argv": ["sleep", "0.35"]}, headers=headers)
    lines = resp.data.split(b"\n")
    assert lines.count(b"") >= 3 and json.loads([x for x in lines if x][-1]) == {"exit": 0}


# -- /proxy -------------------------------------------------------------------------------------------------

SSE_SERVER = textwrap.dedent("""
    import sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            if self.path.startswith("/events"):
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                self.wfile.write(b"data: first\\n\\n"); self.wfile.flush()
                time.sleep(10)
                self.wfile.write(b"data: second\\n\\n")
                return
            body = ("path=" + self.path).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Set-Cookie", "a=1")
            self.send_header("Set-Cookie", "b=2")
            self.end_headers()
            self.wfile.write(body)
        def do_POST(self):
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n)
            auth = self.headers.get("Authorization", "none")
            out = b"got " + body + b" auth=" + auth.encode()
            self.send_response(201)
            self.send_header("Content-Length", str(len(out)))
            self.end_headers()
            self.wfile.write(out)

    s = ThreadingHTTPServer(("127.0.0.1", 0), H)
    print(s.server_address[1], flush=True)
    s.serve_forever()
""")


@pytest.fixture
def backend():
    proc = subprocess.Popen([sys.executable, "-c", SSE_SERVER], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    yield port
    proc.kill()
    proc.wait()


def test_proxy_http(agent, backend):
    client, _, headers = agent
    resp = client.get(f"/proxy/{backend}/some/path?x=1&y=%2F", headers=headers)
    assert resp.status_code == 200 and resp.data == b"path=/some/path?x=1&y=%2F"
    assert resp.headers.getlist("Set-Cookie") == ["a=1", "b=2"]
    assert client.get(f"/proxy/{backend}", headers=headers).data == b"path=/"
    resp = client.post(f"/proxy/{backend}/p", data=b"hello", headers=headers)
    assert resp.status_code == 201 and resp.data == b"got hello auth=none"  # the dxflow token stays here


def test_proxy_sse_first_event_arrives_at_once(agent, backend):
    client, _, headers = agent
    t0 = time.monotonic()
    resp = client.get(f"/proxy/{backend}/events", headers=headers, buffered=False)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    chunk = next(iter(resp.response))
    assert b"data: first" in chunk and time.monotonic() - t0 < 3
    resp.close()


def test_proxy_refuses_unknown_and_closed_ports(agent):
    client, _, headers = agent
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    resp = client.get(f"/proxy/{port}/", headers=headers)
    assert resp.status_code == 404 and "nothing listens" in resp.get_json()["message"]
    assert client.get("/proxy/0/", headers=headers).status_code == 400


def test_proxy_target_uri():
    from dxflow.agent.proxy import target_uri
    assert target_uri({"RAW_URI": "/proxy/80/a%2Fb?q=1"}, "a/b") == "/a%2Fb?q=1"
    assert target_uri({"RAW_URI": "/proxy/80"}, "") == "/"
    assert target_uri({"RAW_URI": "/proxy/80?x"}, "") == "/?x"
    assert target_uri({"QUERY_STRING": "z=1"}, "p/q") == "/p/q?z=1"


# -- OpenAPI ------------------------------------------------------------------------------------------------

def test_openapi_document(agent):
    client, _, headers = agent
    doc = client.get("/api/openapi.json", headers=headers).get_json()
    assert doc["openapi"].startswith("3.")
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert doc["security"] == [{"bearer": []}]
    for path in ("/api/health", "/api/node", "/api/logs", "/api/logs/{name}/follow", "/api/exec", "/api/ports",
                 "/proxy/{port}/{path}", "/api/openapi.json"):
        assert path in doc["paths"], path
    for ops in doc["paths"].values():
        for op in ops.values():
            assert "401" in op["responses"]
    assert client.get("/api/openapi.json").status_code == 401


def test_sock_diag_agrees_with_proc_net_tcp():
    """Both sources of listeners see the same sockets (IPv4 and IPv6) in this namespace."""
    code = ("import socket,time; a=socket.socket(); a.bind(('127.0.0.1',0)); a.listen(); "
            "b=socket.socket(socket.AF_INET6); b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); "
            "b.bind(('::',0)); b.listen(); print(a.getsockname()[1], b.getsockname()[1], flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        p4, p6 = map(int, proc.stdout.readline().split())
        diag = tcptable.diag_listeners(socket.AF_INET) + tcptable.diag_listeners(socket.AF_INET6)
        table = []
        for path in tcptable.PROC_TABLES:
            with open(path) as f:
                table += tcptable.parse_listeners(f.read())
        ours = lambda found: {s for s in found if s.port in (p4, p6)}  # noqa: E731
        assert ours(diag) == ours(table)
        assert {(s.address, s.port) for s in ours(diag)} == {("127.0.0.1", p4), ("::", p6)}
        assert ports.check_port(p6)["connect"] == "127.0.0.1"  # dual-stack: reached on 127.0.0.1
    finally:
        proc.kill()
        proc.wait()


def test_proxy_keeps_dxflow_credentials_to_itself():
    from dxflow.agent.proxy import HOP_HEADERS
    from dxflow.edge.http import forwarded_headers
    headers = {"Authorization": "Bearer x", "Cookie": "dxflow_agent=s1; jupyter=abc; dxflow_console=s2",
               "Accept": "*/*", "Connection": "keep-alive"}
    assert forwarded_headers(headers.items(), HOP_HEADERS) == [("Cookie", "jupyter=abc"), ("Accept", "*/*")]
    assert forwarded_headers({"Cookie": "dxflow_agent=s1; dxflow_service=x"}.items(), HOP_HEADERS) == []
