"""The guarded worker's fast paths (dxflow.edge.worker): what a small request no longer pays for.

* a kept-alive connection its client closes is closed by the main thread at once, without a
  thread: even with every thread busy, the client sees the server's FIN;
* a small answer of known length leaves corked (head and body in one TCP segment), and nothing
  else is corked: streams and large answers are written as they come.

The gunicorn harness is the one of ``test_edge_worker.py`` (a real gunicorn, 4 threads).
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from dxflow.edge.worker import WHOLE_ANSWER, WholeSmallAnswers
from test_edge_worker import ANSWER, THREADS, Server, start, wait_until


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    yield from start(tmp_path, str(tmp_path / "server.sock"))


def test_kept_alive_connection_closed_by_its_client_is_closed_while_every_thread_is_busy(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=ANSWER)
    conn.request("GET", "/")
    assert conn.getresponse().read() == b"hello"  # answered and kept alive
    holders = [threading.Thread(target=_get, args=(server.port, "/hold"), daemon=True) for _ in range(THREADS)]
    for t in holders:
        t.start()
    wait_until(lambda: server.held() == THREADS, what="every thread held")
    sock = conn.sock
    sock.shutdown(socket.SHUT_WR)  # the client is done: its FIN reaches the worker's main loop
    sock.settimeout(5.0)  # well before the held threads are released
    try:
        assert sock.recv(1) == b"", "the server sent bytes after the client closed"
    except socket.timeout:
        pytest.fail("the closed connection waited for a free thread instead of being closed at once")
    finally:
        server.release()
        conn.close()
    for t in holders:
        t.join(ANSWER)


def _get(port: int, path: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ANSWER)
    try:
        conn.request("GET", path)
        conn.getresponse().read()
    finally:
        conn.close()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    served, _ = listener.accept()
    listener.close()
    yield served, client
    served.close()
    client.close()


def corked(sock: socket.socket) -> bool:
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))


def run(app, sock: socket.socket) -> list[bool]:
    """Serve one answer as gunicorn does (start, one write per item, close); whether the socket was
    corked at each write, then after the close."""
    seen = []
    body = WholeSmallAnswers(app)({"gunicorn.socket": sock}, lambda status, headers, exc_info=None: None)
    for item in body:
        sock.sendall(item)
        seen.append(corked(sock))
    getattr(body, "close", lambda: None)()
    seen.append(corked(sock))
    return seen


def test_small_answer_of_known_length_is_corked_until_it_is_closed(tcp_pair):
    served, client = tcp_pair

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "5")])
        return [b"HTTP head as gunicorn writes it", b"hello"]

    assert run(app, served) == [True, True, False]
    client.settimeout(ANSWER)
    assert client.recv(100).endswith(b"hello")


@pytest.mark.parametrize("headers", [[], [("Content-Length", str(WHOLE_ANSWER + 1))]],
                         ids=["stream without length", "large answer"])
def test_streams_and_large_answers_are_never_corked(tcp_pair, headers):
    served, _ = tcp_pair

    def app(environ, start_response):
        start_response("200 OK", headers)
        return iter([b"event: one\n\n", b"event: two\n\n"])

    assert run(app, served) == [False, False, False]


def test_app_that_fails_after_starting_leaves_the_socket_uncorked(tcp_pair):
    served, _ = tcp_pair

    def app(environ, start_response):
        start_response("200 OK", [("Content-Length", "5")])
        raise RuntimeError("broken view")

    with pytest.raises(RuntimeError):
        WholeSmallAnswers(app)({"gunicorn.socket": served}, lambda *a: None)
    assert not corked(served)


def test_unix_socket_answers_pass_through_untouched():
    a, b = socket.socketpair()
    try:
        def app(environ, start_response):
            start_response("200 OK", [("Content-Length", "5")])
            return [b"hello"]

        body = WholeSmallAnswers(app)({"gunicorn.socket": a}, lambda *args: None)
        assert body == [b"hello"]  # nothing to cork on a Unix socket: the app's own body, unwrapped
    finally:
        a.close()
        b.close()


def test_heartbeat_to_the_arbiter_is_written_once_a_second_not_on_every_turn():
    from gunicorn.config import Config
    from gunicorn.workers.workertmp import WorkerTmp

    from dxflow.edge.worker import NOTIFY_EVERY, GuardedThreadWorker

    w = GuardedThreadWorker.__new__(GuardedThreadWorker)  # only what notify() uses: its clock and file
    w._notified = -NOTIFY_EVERY
    w.tmp = WorkerTmp(Config())
    try:
        w.notify()
        first = w.tmp.last_update()
        for _ in range(100):  # a busy main loop's turns
            w.notify()
        assert w.tmp.last_update() == first
        time.sleep(NOTIFY_EVERY + 0.1)
        w.notify()
        assert w.tmp.last_update() > first  # the arbiter still hears, well within gunicorn's timeout
    finally:
        w.tmp.close()
