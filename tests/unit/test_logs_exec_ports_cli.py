"""The CLI side of logs, exec and forward, with the master faked at the MasterClient seam."""

from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import threading

import pytest

from dxflow.cli import exec as cli_exec
from dxflow.cli import forward as cli_forward
from dxflow.cli import logs as cli_logs


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, status: int = 200):
        super().__init__(data)
        self.status = status


class FakeClient:
    def __init__(self, responses: dict, agents=None):
        self.responses, self.agents, self.asked = responses, agents or [], []
        self.sock = "/nonexistent"

    def ensure(self):
        return self

    def agent_path(self, job, node, path):
        return f"/api/fleet/{job}/{node or '-'}/{path.lstrip('/')}"

    def request(self, method, path, body=None, headers=None, timeout=60.0):
        self.asked.append((method, path, body))
        for prefix, resp in self.responses.items():
            if path.startswith(prefix):
                return resp
        raise AssertionError(f"unexpected {method} {path}")

    def json(self, method, path, body=None, timeout=60.0):
        return self.agents


@pytest.fixture
def fake(monkeypatch):
    holder = {}

    def install(client):
        holder["client"] = client
        monkeypatch.setattr("dxflow.master.client.MasterClient", lambda *a, **k: client)
        return client
    return install


def parse(register, argv):
    p = argparse.ArgumentParser()
    register(p.add_subparsers())
    return p.parse_args(argv)


def test_read_events():
    raw = (b"retry: 1000\n\n: keepalive\n\nid: 4\ndata: one\n\ndata: a\ndata: b\n\n"
           b"event: end\ndata: job 3 ended\n\n")
    assert list(cli_logs.read_events(io.BytesIO(raw))) == [("message", "one"), ("message", "a\nb"),
                                                           ("end", "job 3 ended")]


def test_logs_follow_prints_lines_and_stops_at_end(fake, capsysbinary):
    sse = b"data: hello\n\ndata: world\n\nevent: end\ndata: job 5 ended\n\n"
    client = fake(FakeClient({"/api/fleet/5/n2/api/logs/stderr/follow?lines=3": FakeResponse(sse)}))
    args = parse(cli_logs.register, ["logs", "5", "--node", "n2", "--stderr", "-f", "--lines", "3"])
    assert args.func(args) == 0
    out = capsysbinary.readouterr()
    assert out.out == b"hello\nworld\n" and b"job 5 ended" in out.err
    assert client.asked[0][1] == "/api/fleet/5/n2/api/logs/stderr/follow?lines=3"


def test_logs_follow_broken_stream_of_an_ended_job(fake, capsysbinary):
    fake(FakeClient({"/api/fleet/5/-/api/logs/stdout/follow": FakeResponse(b"data: x\n\n")},
                    agents=[{"job": "5", "node": "n1", "state": "gone"}]))
    args = parse(cli_logs.register, ["logs", "5", "-f"])
    assert args.func(args) == 0
    assert b"job 5 ended" in capsysbinary.readouterr().err


def test_logs_plain_and_agent(fake, capsysbinary):
    client = fake(FakeClient({"/api/fleet/5/n1/api/logs/agent": FakeResponse(b"agent says\n")}))
    args = parse(cli_logs.register, ["logs", "5:n1", "--agent"])
    assert args.func(args) == 0 and capsysbinary.readouterr().out == b"agent says\n"
    assert client.asked[0][1] == "/api/fleet/5/n1/api/logs/agent"


def ndjson(*items) -> bytes:
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


def test_exec_separates_streams_and_returns_the_exit_code(fake, capsysbinary):
    b64 = lambda s: base64.b64encode(s).decode()  # noqa: E731
    body = ndjson({"stream": "stdout", "data": b64(b"out\n")}, {"stream": "stderr", "data": b64(b"err\n")}) \
        + b"\n" + ndjson({"exit": 3})
    client = fake(FakeClient({"/api/fleet/7/n2/api/exec": FakeResponse(body)}))
    args = parse(cli_exec.register, ["exec", "--env", "A=1", "--cwd", "sub", "7:n2", "--", "sh", "-c", "x"])
    assert args.func(args) == 3
    out = capsysbinary.readouterr()
    assert out.out == b"out\n" and out.err == b"err\n"
    sent = json.loads(client.asked[0][2])
    assert sent == {"argv": ["sh", "-c", "x"], "cwd": "sub", "env": {"A": "1"}}


def test_exec_lost_connection_is_255(fake, capsysbinary):
    fake(FakeClient({"/api/fleet/7/-/api/exec": FakeResponse(b"")}))
    args = parse(cli_exec.register, ["exec", "7", "--", "true"])
    assert args.func(args) == cli_exec.LOST


def test_exec_needs_a_command(fake):
    from dxflow.errors import UsageError
    fake(FakeClient({}))
    args = parse(cli_exec.register, ["exec", "7"])
    with pytest.raises(UsageError):
        args.func(args)


def test_not_found_route():
    assert cli_forward._not_found_route(b'{"error": "not_found", "message": "The requested URL"}')
    assert not cli_forward._not_found_route(b'{"error": "NotFound", "message": "no agent of job 3"}')
    assert not cli_forward._not_found_route(b"<html>")


def test_tcp_connection_pipes_through_an_upgraded_master_connection(tmp_path):
    """One local connection: upgrade request to the (fake) master's socket, then bytes both ways."""
    path = tmp_path / "master.sock"
    master = socket.socket(socket.AF_UNIX)
    master.bind(str(path))
    master.listen()
    seen = {}

    def fake_master():
        c, _ = master.accept()
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += c.recv(4096)
        head, _, rest = buf.partition(b"\r\n\r\n")
        seen["head"] = head.decode()
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: dxflow-tcp\r\n\r\nhello ")
        data = rest
        while True:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        c.sendall(data.upper())
        c.close()
    t = threading.Thread(target=fake_master, daemon=True)
    t.start()

    from dxflow.master.client import MasterClient

    client = MasterClient(tmp_path)  # the real client, on the fake master's socket
    local_a, local_b = socket.socketpair()
    worker = threading.Thread(target=cli_forward._tcp_connection, args=(client, "/api/forward/3/-/80", local_b),
                              daemon=True)
    worker.start()
    local_a.sendall(b"ping")
    local_a.shutdown(socket.SHUT_WR)
    got = b""
    local_a.settimeout(5)
    while True:
        chunk = local_a.recv(4096)
        if not chunk:
            break
        got += chunk
    worker.join(5)
    assert got == b"hello PING"
    assert seen["head"].startswith("GET /api/forward/3/-/80 HTTP/1.1") and "Upgrade: dxflow-tcp" in seen["head"]


def test_tcp_connection_reports_a_refusal_as_502(tmp_path):
    path = tmp_path / "master.sock"
    master = socket.socket(socket.AF_UNIX)
    master.bind(str(path))
    master.listen()

    def fake_master():
        c, _ = master.accept()
        c.recv(4096)
        body = b'{"error": "AccessDenied", "message": "port 8766 belongs to another user"}'
        c.sendall(b"HTTP/1.1 403 FORBIDDEN\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        c.close()
    threading.Thread(target=fake_master, daemon=True).start()

    from dxflow.master.client import MasterClient

    a, b = socket.socketpair()
    cli_forward._tcp_connection(MasterClient(tmp_path), "/api/forward/3/-/8766", b)
    a.settimeout(5)
    reply = a.recv(4096)
    assert reply.startswith(b"HTTP/1.1 502") and b"another user" in reply


def test_listen_prefers_the_remote_port_then_any(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    s = cli_forward._listen(None, port)  # taken: any free port
    assert s.getsockname()[1] != port
    s.close()
    from dxflow.errors import UsageError
    with pytest.raises(UsageError):
        cli_forward._listen(port, port)
    taken.close()
