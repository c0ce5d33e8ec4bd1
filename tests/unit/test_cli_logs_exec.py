"""`dxflow logs` and `dxflow exec` (:mod:`dxflow.cli.logs`, :mod:`dxflow.cli.exec`), with the master faked at
the MasterClient seam."""

from __future__ import annotations

import argparse
import base64
import io
import json

import pytest

from dxflow.cli import exec as cli_exec
from dxflow.cli import logs as cli_logs


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, status: int = 200):
        super().__init__(data)
        self.status = status


#: the master's agent list the commands look their target up in: jobs 5 and 7 run on n1 and n2
RUNNING = [{"job": j, "node": n, "state": "ready", "detail": ""} for j in ("5", "7") for n in ("n1", "n2")]


class FakeClient:
    def __init__(self, responses: dict, agents=None, later=None):
        # `agents` answers the first question (the target's lookup), `later` the ones after it
        self.responses, self.agents, self.later, self.asked = responses, RUNNING if agents is None else agents, later, []
        self.questions = 0
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
        self.questions += 1
        return self.later if self.later is not None and self.questions > 1 else self.agents

    def job_nodes(self, job):
        return None  # an older master: the job's nodes are its registered agents'


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
                    later=[{"job": "5", "node": "n1", "state": "gone"}]))
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
