"""dxflow.edge.worker under a real gunicorn: slow and foreign clients cannot starve the server.

Each test starts gunicorn in its own process with :class:`GuardedThreadWorker`, 4 threads, a tiny
WSGI app, and two listeners: 127.0.0.1, port 0, and a Unix socket. The app answers ``/`` at once and
holds ``/hold`` until the test creates a ``release`` file. The test with another uid needs root.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from gunicorn_proc import python, running

from dxflow.edge import worker

THREADS = 4
BOB = 1002
PARTIAL_HEAD = b"GET / HTTP/1.1\r\n"
REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
ANSWER = 30.0  # generous: "answers at all"

SERVE = textwrap.dedent("""
    import sys, time, uuid
    from pathlib import Path
    from gunicorn_proc import serve

    run = Path(sys.argv[1])

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/hold":
            (run / "held" / uuid.uuid4().hex).touch()
            deadline = time.monotonic() + 60
            while not (run / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        body = b"hello"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]

    (run / "held").mkdir()
    serve(app, run / "ready.json", bind=sys.argv[2:], worker_class="dxflow.edge.worker.GuardedThreadWorker",
          threads=%(threads)d, keepalive=30, timeout=120, graceful_timeout=1, errorlog=str(run / "server.log"),
          accesslog=None, loglevel="info")
""") % {"threads": THREADS}


@dataclass
class Server:
    run: Path
    port: int
    unix: str

    def log(self) -> str:
        return (self.run / "server.log").read_text()

    def held(self) -> int:
        return len(list((self.run / "held").iterdir()))

    def release(self) -> None:
        (self.run / "release").touch()


def start(run: Path, unix: str) -> Iterator[Server]:
    with running(python(SERVE, str(run), "127.0.0.1:0", f"unix:{unix}"), run / "ready.json",
                 run / "server.log") as gunicorn:
        server = Server(run, gunicorn.port, unix)
        yield server
        server.release()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    yield from start(tmp_path, str(tmp_path / "server.sock"))


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def connection(server: Server, listener: str, timeout: float = ANSWER) -> http.client.HTTPConnection:
    if listener == "unix":
        return UnixHTTPConnection(server.unix, timeout)
    return http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)


def get(server: Server, listener: str, path: str = "/", timeout: float = ANSWER) -> tuple[int, bytes]:
    conn = connection(server, listener, timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def raw(server: Server, listener: str = "tcp") -> socket.socket:
    if listener == "unix":
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(server.unix)
    else:
        s = socket.create_connection(("127.0.0.1", server.port))
    s.settimeout(ANSWER)
    return s


def read_to_end(s: socket.socket) -> bytes:
    """All a server sends until it closes (a reset counts as a close)."""
    data = b""
    while True:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def wait_until(predicate, timeout: float = ANSWER, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_installed_gunicorn_has_what_the_worker_relies_on():
    assert worker.missing_internals() == []


@pytest.mark.parametrize("listener", ["tcp", "unix"])
def test_forty_half_sent_heads_do_not_stop_a_request(server, listener):
    held = [raw(server, listener) for _ in range(40)]
    try:
        for s in held:
            s.sendall(PARTIAL_HEAD)  # plain gthread: 4 threads block on these for good
        assert get(server, listener) == (200, b"hello")
    finally:
        for s in held:
            s.close()
    assert "serves as plain gunicorn" not in server.log()


#: half-sent heads by where they wait: in the worker's gate (no thread), in a thread (a head
#: longer than the gate peeks at), in a thread after a whole request (read ahead by gunicorn)
HALF_SENT = {
    "partial": PARTIAL_HEAD,
    "long": PARTIAL_HEAD + b"".join(b"X-Long-%d: %s\r\n" % (i, b"a" * 7000) for i in range(10)),
    "pipelined": REQUEST + PARTIAL_HEAD,
}


@pytest.mark.parametrize("kind", sorted(HALF_SENT))
def test_half_sent_head_is_closed_after_the_deadline(server, kind):
    s = raw(server)
    started = time.monotonic()
    s.sendall(HALF_SENT[kind])
    answer = read_to_end(s)
    waited = time.monotonic() - started
    s.close()
    if kind == "pipelined":
        assert answer.startswith(b"HTTP/1.1 200 ")  # the whole request is answered first
    assert answer.endswith(worker.TIMEOUT_408)
    assert waited > worker.HEAD_DEADLINE - 1.5  # not earlier than the deadline says
    assert "no complete request head within" in server.log()


def test_head_dripped_byte_by_byte_is_closed_at_the_deadline(server):
    """Every byte comes well within any per-read timeout; the head as a whole still has a deadline."""
    s = raw(server)
    s.sendall(PARTIAL_HEAD + b"X-Drip: ")
    answer = None
    deadline = time.monotonic() + ANSWER
    while answer is None and time.monotonic() < deadline:
        try:
            s.sendall(b"a")
        except OSError:  # reset or broken pipe: the server closed it
            answer = b""
        if select.select([s], [], [], 0.5)[0]:
            answer = read_to_end(s)
    s.close()
    assert answer is not None, f"a head dripped for {ANSWER:.0f} s was still being read"
    assert answer in (b"", worker.TIMEOUT_408)


@pytest.mark.parametrize("busy, free", [("tcp", "unix"), ("unix", "tcp")])
def test_each_listener_has_its_own_thread_pool(server, busy, free):
    holders = [connection(server, busy) for _ in range(THREADS)]
    for conn in holders:
        conn.request("GET", "/hold")
    wait_until(lambda: server.held() == THREADS, what=f"{THREADS} held requests on {busy}")
    # every thread of the busy listener is in the app now; one shared pool would have none left
    assert get(server, free) == (200, b"hello")
    server.release()
    for conn in holders:
        assert conn.getresponse().status == 200
        conn.close()


def test_connections_per_peer_are_bounded(server):
    kept: list[http.client.HTTPConnection] = []
    try:
        for _ in range(worker.MAX_CONNECTIONS_PER_PEER):
            conn = connection(server, "tcp")
            conn.request("GET", "/")
            assert conn.getresponse().read() == b"hello"  # kept alive: no head deadline runs
            kept.append(conn)
        over = raw(server)
        try:
            over.sendall(REQUEST)
        except OSError:
            pass
        assert read_to_end(over) == b""
        over.close()
        kept.pop().close()

        def answered() -> bool:
            s = raw(server)
            try:
                s.sendall(REQUEST)
                return read_to_end_or_answer(s).startswith(b"HTTP/1.1 200 ")
            except OSError:
                return False
            finally:
                s.close()
        wait_until(answered, what="a connection accepted once one of the peer's closed")
    finally:
        for conn in kept:
            conn.close()
    assert f"holds {worker.MAX_CONNECTIONS_PER_PEER} connections already" in server.log()


def read_to_end_or_answer(s: socket.socket) -> bytes:
    """What the server sends up to the end of the first answer's head, or until it closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


BOB_CLIENT = textwrap.dedent("""
    import json, socket, sys
    results = {}
    for name, family, address in (("tcp", socket.AF_INET, ("127.0.0.1", int(sys.argv[1]))),
                                  ("unix", socket.AF_UNIX, sys.argv[2])):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(20)
        s.connect(address)
        data = b""
        try:
            s.sendall(b"GET / HTTP/1.1\\r\\nHost: test\\r\\n\\r\\n")
            while chunk := s.recv(4096):
                data += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        results[name] = data.decode(errors="replace")
    print(json.dumps(results))
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="connecting as another uid (bob, 1002) needs root to setuid")
def test_other_uid_is_closed_with_zero_bytes(tmp_path):
    open_dir = Path(tempfile.mkdtemp(prefix="dxflow-worker-test-"))
    open_dir.chmod(0o711)  # bob may reach the socket: the worker is all that stands in his way
    try:
        for server in start(tmp_path, str(open_dir / "server.sock")):
            for listener in ("tcp", "unix"):
                assert get(server, listener) == (200, b"hello")  # root, and this server's uid, get in
            proc = subprocess.run([sys.executable, "-I", "-c", BOB_CLIENT, str(server.port), server.unix],
                                  user=BOB, group=BOB, extra_groups=[], cwd="/", capture_output=True,
                                  text=True, timeout=60)
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout) == {"tcp": "", "unix": ""}
            log = server.log()
            for listener in (f"127.0.0.1:{server.port}", f"unix:{server.unix}"):
                assert f"refused a connection on {listener} from uid {BOB}" in log
    finally:
        shutil.rmtree(open_dir, ignore_errors=True)
