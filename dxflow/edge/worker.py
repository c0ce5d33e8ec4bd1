"""The gunicorn worker every dxflow server runs (agent and master): one that slow or foreign clients cannot starve.

gunicorn's threaded worker hands a connection to a thread as soon as one byte has arrived, and
the thread then reads the request head with no deadline: a few dozen half-sent heads
(``GET / HTTP/1.1\\r\\n`` and nothing more) hold every thread. :class:`GuardedThreadWorker`

* refuses, at accept and before reading a byte, a peer whose uid (the kernel's word, see
  :mod:`dxflow.edge.peer`) is neither the server's own nor root, on TCP and Unix listeners alike;
* bounds the connections open at once per peer uid (:data:`MAX_CONNECTIONS_PER_PEER`), refusing at accept;
* waits for a complete request head without a thread (the bytes stay in the kernel, peeked at
  through an edge-triggered epoll), and gives the head a total deadline (:data:`HEAD_DEADLINE`)
  that also holds while a thread reads it; it is disarmed before the application runs, so
  streams, WebSockets and uploads keep no timeout but their own;
* serves each listener from its own thread pool of the configured size: the master's Unix
  socket (the CLI) never waits behind its TCP console port.

Written against gunicorn 27.0.1 (``gunicorn/workers/gthread.py``), whose internals it relies on:
``ThreadWorker.accept/enqueue_req/handle/handle_request/murder_pending/get_thread_pool/run``,
the attributes ``poller`` and ``nr_conns``, and ``TConn`` (``sock``, ``parser``, ``close``).
If one is missing the worker logs a warning and serves as the plain ``ThreadWorker`` would.
HTTP/2 is off in dxflow (no TLS, ``http2_cleartext`` "off"); an HTTP/2 connection, which never
reaches ``handle_request``, would be closed at the head deadline.
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import socket
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Hashable, Iterable

import gunicorn
from gunicorn.workers import gthread

from dxflow.edge.peer import peer_uid

#: seconds a connection has to deliver a complete request head: from accept, or from the first
#: byte of a kept-alive connection's next request (its idle time is gunicorn's ``keepalive``)
HEAD_DEADLINE = 10.0
#: connections one peer uid may hold open at once; the next is closed at accept
MAX_CONNECTIONS_PER_PEER = 128
#: a head not complete within this many bytes goes to a thread anyway (gunicorn's own limits
#: apply there, and the deadline still holds); far above what a browser or the CLI sends
HEAD_PEEK = 64 * 1024
#: seconds between two heartbeats to the arbiter (gunicorn's ``timeout`` is far longer: 120 s and more)
NOTIFY_EVERY = 1.0
#: answers whose body is at most this long (Content-Length) leave in one TCP segment with their head
WHOLE_ANSWER = 64 * 1024
TCP = (socket.AF_INET, socket.AF_INET6)
#: at most one log line per kind of refusal and peer in this many seconds (bob must not fill alice's log)
LOG_INTERVAL = 60.0
ROOT = 0
WRITTEN_FOR = (27, 0)  # the gunicorn release whose gthread internals this module was written against
TIMEOUT_408 = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
NO_WAIT = getattr(socket, "MSG_DONTWAIT", 0) | getattr(socket, "MSG_NOSIGNAL", 0)

#: what this module overrides or reads in gunicorn 27.0.1's gthread
THREAD_WORKER_INTERNALS = ("accept", "enqueue_req", "handle", "handle_request", "murder_pending",
                           "get_thread_pool", "run")
INSTANCE_INTERNALS = ("poller", "nr_conns", "sockets")


def missing_internals(worker: Any = None) -> list[str]:
    """The gunicorn and kernel internals this worker needs that are absent (empty: all present)."""
    missing = [f"gthread.{name}" for name in ("TConn", "ThreadWorker") if not hasattr(gthread, name)]
    worker_cls = getattr(gthread, "ThreadWorker", None)
    missing += [f"ThreadWorker.{name}" for name in THREAD_WORKER_INTERNALS if not hasattr(worker_cls, name)]
    missing += [f"TConn.{name}" for name in ("close",) if not hasattr(getattr(gthread, "TConn", None), name)]
    if worker is not None:
        missing += [f"worker.{name}" for name in INSTANCE_INTERNALS if not hasattr(worker, name)]
    missing += [f"select.{name}" for name in ("epoll", "EPOLLET", "EPOLLRDHUP") if not hasattr(select, name)]
    return missing


def head_complete(data: bytes) -> bool:
    return b"\r\n\r\n" in data or b"\n\n" in data


#: gunicorn's connection class; absent, the module still imports and the worker serves plainly
BaseConn: Any = getattr(gthread, "TConn", object)


class GuardedConn(BaseConn):
    """gunicorn's connection plus who is at the other end, its listener's pool, and its head deadline."""

    def __init__(self, cfg, sock: socket.socket, client, server, *, peer: Hashable, pool: int,
                 on_close: Callable[[GuardedConn], None]) -> None:
        super().__init__(cfg, sock, client, server)
        self.peer = peer
        self.pool = pool
        self.head_deadline: float | None = None
        self.head_ready = False  # the gate saw a complete head: a thread may take it
        self._on_close: Callable[[GuardedConn], None] | None = on_close

    def close(self, graceful: bool = False) -> None:
        on_close, self._on_close = self._on_close, None  # once, whichever of gunicorn's paths closes it
        if on_close is not None:
            on_close(self)
        super().close(graceful)


class ListenerPools:
    """One thread pool per listener, in the place of gunicorn's single ``tpool``."""

    def __init__(self, threads: int, listeners: Iterable[int]) -> None:
        self._pools = {fd: ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"listener-{fd}")
                       for fd in listeners}
        self._default = next(iter(self._pools.values()), None) or ThreadPoolExecutor(max_workers=threads)

    def submit(self, fn: Callable[..., Any], conn: Any, *args: Any) -> Future:
        pool = self._pools.get(getattr(conn, "pool", -1), self._default)  # a plain TConn: the first pool
        return pool.submit(fn, conn, *args)

    def shutdown(self, wait: bool = True, **kw: Any) -> None:
        for pool in {*self._pools.values(), self._default}:
            pool.shutdown(wait=wait, **kw)


class QuietLog:
    """Logs one line per key and interval, and says how many were left out meanwhile."""

    def __init__(self, log: Any, interval: float = LOG_INTERVAL) -> None:
        self.log = log
        self.interval = interval
        self._last: dict[tuple, tuple[float, int]] = {}

    def warning(self, key: tuple, message: str, *args: Any) -> None:
        now = time.monotonic()
        last, left_out = self._last.get(key, (-self.interval, 0))
        if now - last < self.interval:
            self._last[key] = (last, left_out + 1)
            return
        self._last[key] = (now, 0)
        if left_out:
            message += f" ({left_out} more like it since the last such line)"
        self.log.warning(message, *args)


class WholeSmallAnswers:
    """WSGI middleware: a small answer of known length leaves a TCP connection as one segment.

    gunicorn writes an answer's head and body with two ``sendall`` calls; with ``TCP_NODELAY`` they
    leave as two segments, which an SSH tunnel carries as two packets, each encrypted, sent, decrypted
    and handed to the relay on its own (about a tenth of a small relayed request's cost). The socket
    is corked (``TCP_CORK``, ``man 7 tcp``) from the answer's start to its end, so both leave
    together. Only answers whose body is at most :data:`WHOLE_ANSWER` bytes by their Content-Length:
    those are in memory already, so nothing live (a stream, an upload's progress) is held back.
    """

    def __init__(self, app: Callable) -> None:
        self.app = app

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        sock = environ.get("gunicorn.socket")
        corked: list[socket.socket] = []

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable:
            # a Unix socket has nothing to cork: its reader gets both writes at once anyway
            if isinstance(sock, socket.socket) and sock.family in TCP and not corked and _small(headers):
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                    corked.append(sock)
                except OSError:  # closed meanwhile: the write fails as it would have
                    pass
            return start_response(status, headers, exc_info)

        try:
            body = self.app(environ, start)
        except BaseException:
            _uncork(corked)
            raise
        return ClosingBody(body, lambda: _uncork(corked)) if corked else body


def _small(headers: list[tuple[str, str]]) -> bool:
    length = next((v for k, v in headers if k.lower() == "content-length"), "")
    return length.isdigit() and int(length) <= WHOLE_ANSWER


def _uncork(corked: list[socket.socket]) -> None:
    """Send what the cork holds, now."""
    while corked:
        try:
            corked.pop().setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
        except OSError:  # closed meanwhile: nothing left to send
            pass


class ClosingBody:
    """A WSGI answer's body that calls ``ended`` once, when the server closes it (after its last write):
    the one wrapper for "the answer is done" (uncorking here, the master's count of clients at work)."""

    def __init__(self, body: Iterable[bytes], ended: Callable[[], None]) -> None:
        self.body = body
        self._ended: Callable[[], None] | None = ended

    def __iter__(self):
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            ended = self._ended
            if ended is not None:
                self._ended = None  # once only
                ended()


class GuardedThreadWorker(gthread.ThreadWorker):
    """gunicorn's threaded worker, guarded at accept and while reading heads (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.missing = missing_internals()
        self.guarded = not self.missing
        self.uid = os.geteuid()
        self._per_peer: Counter[Hashable] = Counter()  # peer_key() -> connections open
        self._gate: select.epoll | None = None
        self._gated: dict[int, GuardedConn] = {}  # fd -> connection waiting for its head (main thread only)
        self._reading: set[GuardedConn] = set()   # heads being read by a thread
        self._lock = threading.Lock()             # guards _reading, _per_peer and deadlines across threads
        self._quiet = QuietLog(self.log)
        self._notified = -NOTIFY_EVERY  # the first turn of the main loop tells the arbiter at once

    # gunicorn's worker, overridden -------------------------------------------------------------
    def notify(self) -> None:
        """gunicorn calls this on every turn of its main loop, several times per request, and each call
        writes the heartbeat file's time (a syscall on /tmp). The arbiter only needs to hear once
        within ``timeout`` (two minutes and more): once every :data:`NOTIFY_EVERY` seconds will do."""
        now = time.monotonic()
        if now - self._notified >= NOTIFY_EVERY:
            self._notified = now
            super().notify()

    def load_wsgi(self) -> None:
        super().load_wsgi()
        app: Callable = getattr(self, "wsgi")  # noqa: B009 - set by gunicorn's untyped base class
        self.wsgi = WholeSmallAnswers(app)

    def admits(self, uid: int | None) -> bool:
        """Whether a peer of ``uid`` (None: the kernel cannot say) may connect: the server's own user and
        root. The site service, which every user reaches, admits anyone and authenticates each request."""
        return uid in (self.uid, ROOT)

    def peer_key(self, uid: int | None, client: Any) -> Hashable:
        """What the bound of :data:`MAX_CONNECTIONS_PER_PEER` counts by: the peer's uid (the site service,
        which hosts other than its own reach, counts those by their address)."""
        return uid

    def get_thread_pool(self):
        if not self.guarded:
            return super().get_thread_pool()
        return ListenerPools(self.cfg.threads, [listener.fileno() for listener in self.sockets])

    def run(self) -> None:
        self.missing = self.missing or missing_internals(self)
        if self.missing:
            self.guarded = False
            self.log.warning("dxflow's guarded worker serves as plain gunicorn gthread: this gunicorn lacks %s",
                             ", ".join(self.missing))
            return super().run()
        if tuple(gunicorn.version_info[:2]) != WRITTEN_FOR:
            self.log.warning("dxflow's guarded worker was written for gunicorn %s, this is %s: check its tests",
                             ".".join(map(str, WRITTEN_FOR)), gunicorn.__version__)
        self._gate = select.epoll()
        self.poller.register(self._gate, selectors.EVENT_READ, self._on_gate)
        try:
            return super().run()
        finally:
            self._gate.close()

    def accept(self, listener) -> None:
        if not self.guarded:
            return super().accept(listener)
        try:
            sock, client = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        try:
            uid = peer_uid(sock)
        except Exception as e:  # a failed lookup refuses this connection; it must not stop the worker
            self.log.warning("cannot tell who is at the other end of a connection: %s", e)
            uid = None
        if not self.admits(uid):
            return self._refuse(sock, listener, uid,
                                "refused a connection on %s from uid %s: not this server's user")
        key = self.peer_key(uid, client)
        with self._lock:
            full = self._per_peer[key] >= MAX_CONNECTIONS_PER_PEER
            if not full:
                self._per_peer[key] += 1
        if full:
            return self._refuse(sock, listener, uid, "refused a connection on %s from uid %s: "
                                f"it holds {MAX_CONNECTIONS_PER_PEER} connections already")
        self.nr_conns += 1
        conn = GuardedConn(self.cfg, sock, client, listener.getsockname(), peer=key, pool=listener.fileno(),
                           on_close=self._forget)
        self.enqueue_req(conn)

    def enqueue_req(self, conn) -> None:
        """Hand a connection to a thread once its head is complete; until then it waits in the gate."""
        if not self.guarded or not isinstance(conn, GuardedConn) or conn.head_ready or _read_ahead(conn):
            # read-ahead: gunicorn already holds bytes of the next head, so the kernel cannot tell
            # when it is complete; the thread reads it under the deadline
            if isinstance(conn, GuardedConn):
                conn.head_ready = False
            return super().enqueue_req(conn)
        arrived = _peek(conn.sock)
        if arrived == b"":
            # the client closed a kept-alive connection (the CLI does after each answer): closed here,
            # without waking a thread to find out
            return self._close_ended(conn)
        if arrived is not None and head_complete(arrived):
            # the usual case (a kept-alive relay channel, a client that wrote its request at once): the
            # whole head is in the kernel already, so a thread reads it without waiting; going through
            # the gate would only cost another turn of the main loop per request
            with self._lock:
                conn.head_deadline = time.monotonic() + HEAD_DEADLINE
            conn.data_ready = True  # gunicorn's thread need not wait for it with a selector of its own
            return super().enqueue_req(conn)
        assert self._gate is not None
        fd = conn.sock.fileno()
        conn.head_deadline = time.monotonic() + HEAD_DEADLINE
        self._gated[fd] = conn
        # edge-triggered: one event per arrival of bytes, none while they sit unread (peeked) in the
        # kernel; epoll reports a socket that is readable already at registration once
        self._gate.register(fd, select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLET)

    def handle(self, conn):
        if not self.guarded or not isinstance(conn, GuardedConn):
            return super().handle(conn)
        with self._lock:
            if conn.head_deadline is None:
                conn.head_deadline = time.monotonic() + HEAD_DEADLINE
            self._reading.add(conn)
        try:
            return super().handle(conn)
        finally:
            self._disarm(conn)

    def handle_request(self, req, conn):
        if isinstance(conn, GuardedConn) and not self._disarm(conn):
            return False  # the deadline passed as the head completed: the socket is shut already
        return super().handle_request(req, conn)

    def murder_pending(self) -> None:
        """gunicorn calls this once per turn of its main loop: the head deadlines are enforced here too."""
        super().murder_pending()
        if self.guarded:
            self._enforce_deadlines()

    # the guard ------------------------------------------------------------------------------------
    def _on_gate(self, _gate) -> None:
        assert self._gate is not None
        for fd, events in self._gate.poll(0):
            conn = self._gated.get(fd)
            if conn is None:
                continue
            ended = bool(events & (select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR))  # no more bytes come
            failed = False
            try:
                head = conn.sock.recv(HEAD_PEEK, socket.MSG_PEEK | NO_WAIT)
            except BlockingIOError:
                continue
            except OSError:
                head, ended, failed = b"", True, True  # a thread meets the same error and closes as gunicorn does
            if head and not ended and not head_complete(head) and len(head) < HEAD_PEEK:  # b"": the end
                continue
            self._ungate(conn)
            if not head and not failed:  # closed before a byte of a request: no thread for it
                self._close_ended(conn)
                continue
            conn.head_ready = True  # complete, or the end of the connection: either way no thread waits
            conn.data_ready = True
            self.enqueue_req(conn)

    def _close_ended(self, conn: GuardedConn) -> None:
        """Close, in the main thread, a connection whose client closed it without sending a request."""
        self.nr_conns -= 1
        conn.close()

    def _ungate(self, conn: GuardedConn) -> None:
        assert self._gate is not None
        fd = conn.sock.fileno()
        self._gated.pop(fd, None)
        try:
            self._gate.unregister(fd)
        except (OSError, ValueError):
            pass

    def _disarm(self, conn: GuardedConn) -> bool:
        """Stop the head deadline of a connection a thread reads; False if it had expired already."""
        with self._lock:
            armed = conn in self._reading
            self._reading.discard(conn)
            conn.head_deadline = None
        return armed

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        late = [c for c in self._gated.values() if not self.alive or (c.head_deadline or 0) <= now]
        for conn in late:
            self._ungate(conn)
            if self.alive:  # a stopping worker drops, quietly, connections that sent no whole request yet
                self._too_slow(conn, answer=_has_bytes(conn.sock))
            self.nr_conns -= 1
            conn.close()
        with self._lock:
            reading = [c for c in self._reading if (c.head_deadline or 0) <= now]
            for conn in reading:
                self._reading.discard(conn)
                # the thread's read returns end of input: gunicorn closes the connection as usual
                self._too_slow(conn, answer=True)
                _shutdown(conn.sock)

    def _too_slow(self, conn: GuardedConn, *, answer: bool) -> None:
        if answer:
            try:
                conn.sock.send(TIMEOUT_408, NO_WAIT)
            except OSError:
                pass
        self._quiet.warning(("slow head", conn.peer), "closed a connection from uid %s: no complete request "
                            "head within %.0f s", conn.peer, HEAD_DEADLINE)

    def _refuse(self, sock: socket.socket, listener, uid: int | None, message: str) -> None:
        sock.close()  # before a byte is read or sent
        name = _listener_name(listener)
        self._quiet.warning((message, name, uid), message, name, uid)

    def _forget(self, conn: GuardedConn) -> None:
        with self._lock:
            self._per_peer[conn.peer] -= 1
            if self._per_peer[conn.peer] <= 0:
                del self._per_peer[conn.peer]


def _read_ahead(conn: Any) -> bool:
    """Whether gunicorn's parser holds bytes already read from this connection (unknown: yes)."""
    parser = getattr(conn, "parser", None)
    if parser is None:
        return False
    try:
        return bool(parser.unreader.buf.getvalue())
    except AttributeError:
        return True


def _peek(sock: socket.socket) -> bytes | None:
    """What waits in the kernel for ``sock``, left there; b"" when the client closed, None when nothing
    has arrived yet or the socket failed (the gate and a thread handle that as they do)."""
    try:
        return sock.recv(HEAD_PEEK, socket.MSG_PEEK | NO_WAIT)
    except OSError:
        return None


def _has_bytes(sock: socket.socket) -> bool:
    try:
        return bool(sock.recv(1, socket.MSG_PEEK | NO_WAIT))
    except OSError:
        return False


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _listener_name(listener) -> str:
    name = listener.getsockname()
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    if isinstance(name, bytes):  # an abstract socket, written as ss does
        return "unix:@" + name.lstrip(b"\0").decode(errors="replace")
    return f"unix:{name}"
