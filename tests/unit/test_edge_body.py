"""dxflow.edge.http.body_pieces under a real gunicorn: a body read straight from the connection arrives
whole and in order after a line read through gunicorn, and the connection stays usable for the next
request (a pipelined one included).

The app reads one line with ``wsgi.input.readline``, then ``?take=N`` bytes (default: the rest) with
``body_pieces`` in small pieces, and answers the line, the count and the sha256 of those bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import textwrap
import time
from pathlib import Path
from typing import Iterator

import pytest
from gunicorn_proc import python, running

SERVE = textwrap.dedent("""
    import hashlib, json, sys
    from pathlib import Path
    from urllib.parse import parse_qs
    from dxflow.edge.http import body_pieces
    from gunicorn_proc import serve
    run = Path(sys.argv[1])
    def app(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        line = environ["wsgi.input"].readline(1 << 20) if length else b""
        query = parse_qs(environ.get("QUERY_STRING", ""))
        take = int(query.get("take", [length - len(line)])[0])
        idle = float(query["idle"][0]) if "idle" in query else None
        digest, got, pieces = hashlib.sha256(), 0, 0
        for piece in body_pieces(environ, take, piece=4096, idle=idle):
            digest.update(piece)
            got += len(piece)
            pieces += 1
        if idle is not None:  # what the app saw, for a client that will get no answer
            (run / "idle-got.part").write_text(str(got))
            (run / "idle-got.part").rename(run / "idle-got")
        rest = environ["wsgi.input"].read()  # what the app did not take, through gunicorn
        body = json.dumps({"line": line.decode(), "got": got, "pieces": pieces, "sha256": digest.hexdigest(),
                           "rest": len(rest)}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]
    serve(app, run / "ready.json", bind=["127.0.0.1:0"], threads=2,
          worker_class="dxflow.edge.worker.GuardedThreadWorker", keepalive=30,
          errorlog=str(run / "server.log"), accesslog=None)
""")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[int, Path]]:
    run = tmp_path_factory.mktemp("body")
    with running(python(SERVE, str(run)), run / "ready.json", run / "server.log") as proc:
        yield proc.port, run


@pytest.fixture(scope="module")
def port(server) -> int:
    return server[0]


def put(body: bytes, query: str = "") -> bytes:
    return (f"PUT /{query} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def answers(sock: socket.socket, count: int) -> list[dict]:
    """``count`` JSON answers read off one kept-alive connection."""
    got, data = [], b""
    while len(got) < count:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].decode()
            length = int(next(h.split(":")[1] for h in head.split("\r\n") if h.lower().startswith("content-length")))
            if len(data) >= head_end + 4 + length:
                assert head.startswith("HTTP/1.1 200"), head
                got.append(json.loads(data[head_end + 4:head_end + 4 + length]))
                data = data[head_end + 4 + length:]
                continue
        more = sock.recv(65536)
        assert more, f"connection closed after {len(got)} answers"
        data += more
    return got


def test_a_body_after_its_first_line_arrives_whole_and_in_order(port):
    payload = os.urandom(3 * 1024 * 1024 + 17)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(put(b'{"plan": 1}\n' + payload))
        [a] = answers(sock, 1)
    assert a["line"] == '{"plan": 1}\n'
    assert (a["got"], a["sha256"], a["rest"]) == (len(payload), hashlib.sha256(payload).hexdigest(), 0)
    assert a["pieces"] > len(payload) // 4096  # in pieces of the size asked for, not one buffer


def test_a_pipelined_next_request_is_left_to_gunicorn(port):
    """Both requests in one send: the first body's read must stop at its end, and the second is answered."""
    first, second = os.urandom(100_000), os.urandom(5000)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(put(b"one\n" + first) + put(b"two\n" + second))
        a, b = answers(sock, 2)
    assert (a["line"], a["got"], a["sha256"]) == ("one\n", len(first), hashlib.sha256(first).hexdigest())
    assert (b["line"], b["got"], b["sha256"]) == ("two\n", len(second), hashlib.sha256(second).hexdigest())


def test_what_the_app_does_not_take_is_still_read_through_gunicorn(port):
    body = os.urandom(50_000)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(put(b"x\n" + body, "?take=1000") + put(b"y\n"))
        a, b = answers(sock, 2)
    assert (a["got"], a["sha256"], a["rest"]) == (1000, hashlib.sha256(body[:1000]).hexdigest(), len(body) - 1000)
    assert (b["line"], b["got"]) == ("y\n", 0)


def test_a_client_that_stops_sending_ends_the_pieces_short(port):
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(put(b"z\n" + b"a" * 100_000)[:-50_000])
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    # gunicorn answers what the app saw of a body cut short: fewer bytes than announced, and no hang
    assert b"\"got\": 50000" in data, data[:300]


def test_a_client_silent_past_idle_ends_the_pieces_short_and_its_connection_is_cut(server):
    """A sender that stops mid-body but keeps its connection open (a relay that froze): after ``idle``
    seconds the reader has what came and the connection is cut: no answer, and the bytes the client sends
    later are never taken for a request."""
    port, run = server
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:  # 30 s: a guard, not a measure
        sock.sendall(put(b"s\n" + b"a" * 100_000, "?idle=1")[:-60_000])
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
            sock.sendall(put(b"late\n"))  # the rest would be this: never answered
            data += sock.recv(65536)
        except ConnectionError:  # the cut, seen as a reset or a broken pipe: as good as an end here
            pass
    assert b"HTTP/1.1" not in data, data[:500]
    # the pieces ended with what had come (the app writes it once they end, just after the cut)
    seen = run / "idle-got"
    for _ in range(200):  # up to 10 s: a guard on a busy machine, not a measure
        if seen.exists():
            break
        time.sleep(0.05)
    assert seen.read_text() == "40000"
