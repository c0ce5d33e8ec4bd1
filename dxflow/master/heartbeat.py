"""Heartbeats: one open stream per checked agent, all read by one thread, so an agent's end is seen at once.

Once an agent has passed its check, the master keeps its ``GET /api/heartbeat`` open: the agent
writes a short line every few seconds and never ends the answer. When the agent's process dies,
its kernel closes the socket, sshd on the node sends the channel's EOF, and the stream ends here
within milliseconds, before anyone could bind the freed port and be sent a user's request.

* A paramiko channel's far side ended the stream (the channel's EOF): the agent is gone (``dead``).
* A paramiko channel was cut because its transport closed, or any stream stayed silent for
  :data:`SILENT`: that proves nothing either way; the agent must be checked again before it is used.
* A socket ended (EOF or reset): through an OpenSSH ControlMaster that is what both the agent's end
  and the ControlMaster's look like, so the end is reported as undecided (``dead=None``) and the
  fleet asks the tunnel which it was (:meth:`dxflow.master.agentcheck.AgentChecks.judge_end`).

Every end is reported with the tunnel generation its stream was opened on: a check may have proven the
agent again on a newer one meanwhile, and what ends with an old stream is only what that stream proved.

One thread serves every stream through a selector, not a thread per agent: a master holds
hundreds of agents. A paramiko channel offers ``fileno()`` for that: a pipe, readable while data
or the end is pending (two file descriptors per channel, hence the raised soft limit).
Streams are keyed by the agent's listener, (node address, port): several registrations naming
the same listener share one stream.
"""

from __future__ import annotations

import logging
import os
import resource
import selectors
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import paramiko

from dxflow.edge.http import parse_head, read_head
from dxflow.errors import AgentUnreachable
from dxflow.master.tunnels import TunnelPool

log = logging.getLogger(__name__)

Key = tuple[str, int]   # (node address, agent port)
Stream = Union[paramiko.Channel, socket.socket]

#: the agent writes every 15 s (``dxflow.agent.health.BEAT_EVERY``); this long without a byte is "silent".
SILENT = 50.0
SCAN_EVERY = 5.0
CHUNK = 4096
OPEN_TIMEOUT = 15.0


def open_stream(pool: TunnelPool, address: str, port: int, token: str, generation: int) -> Stream:
    """The agent's ``GET /api/heartbeat`` answer, its head read, through ``pool`` on that tunnel generation."""
    stream = pool.channel(address, port, generation=generation)
    try:
        stream.settimeout(OPEN_TIMEOUT)
        stream.sendall(f"GET /api/heartbeat HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {token}\r\n"
                       "Accept: text/event-stream\r\n\r\n".encode())
        status, _ = parse_head(read_head(stream)[0])
    except (OSError, EOFError, ValueError) as e:
        _close(stream)
        raise AgentUnreachable(f"{address}:{port}: the agent's heartbeat stream failed: {e}") from e
    if status != 200:
        _close(stream)
        raise AgentUnreachable(f"{address}:{port}: the agent answered {status} to its heartbeat stream "
                               "(an agent older than this master? restart the job's agents)")
    return stream


@dataclass(eq=False)
class _Watched:
    key: Key
    stream: Stream
    generation: int
    last: float


#: ``on_end(key, generation, why, dead)``: dead is True (the agent ended), False (unknown: check it again)
#: or None (a socket's end: the agent's or its tunnel's; the tunnel says which).
OnEnd = Callable[[Key, int, str, Optional[bool]], None]


class Heartbeats:
    """The open heartbeat streams; ``on_end`` (:data:`OnEnd`) is called from their thread when one ends."""

    def __init__(self, on_end: OnEnd) -> None:
        self._on_end = on_end
        self._lock = threading.Lock()
        self._watched: dict[Key, _Watched] = {}
        self._changes: list[tuple[bool, _Watched]] = []   # (add?, stream) for the thread to apply
        self._selector: selectors.BaseSelector | None = None
        self._wake: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    def generation(self, key: Key) -> int | None:
        """The tunnel generation of the stream open on KEY, or None when there is none."""
        with self._lock:
            w = self._watched.get(key)
            return w.generation if w else None

    def add(self, key: Key, stream: Stream, generation: int) -> None:
        """Watch STREAM (an answer to ``GET /api/heartbeat``, its head already read) for KEY; replaces any other."""
        stream.setblocking(False)
        w = _Watched(key, stream, generation, time.monotonic())
        with self._lock:
            if self._stopped:
                _close(stream)
                return
            self._start()
            old = self._watched.pop(key, None)
            if old is not None:
                self._changes.append((False, old))
            self._watched[key] = w
            self._changes.append((True, w))
        self._poke()

    def drop(self, key: Key) -> None:
        """Close the stream of KEY, if any (no ``on_end``)."""
        with self._lock:
            old = self._watched.pop(key, None)
            if old is None:
                return
            self._changes.append((False, old))
        self._poke()

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._changes.extend((False, w) for w in self._watched.values())
            self._watched.clear()
        self._poke()

    def __len__(self) -> int:
        return len(self._watched)

    # -- the thread ---------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is not None:
            return
        _raise_fd_limit()
        self._selector = selectors.DefaultSelector()
        self._wake = os.pipe()
        for fd in self._wake:   # the thread drains without waiting; a poke to a full pipe is not needed
            os.set_blocking(fd, False)
        self._selector.register(self._wake[0], selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
        self._thread.start()

    def _poke(self) -> None:
        # under the lock: the thread closes the pipe under it, and a closed number may be another file's next
        with self._lock:
            if self._wake is None:
                return
            try:
                os.write(self._wake[1], b"x")
            except BlockingIOError:  # the pipe is full: the thread is awake anyway
                pass
            except OSError as e:  # closed under us: the thread still looks within SCAN_EVERY
                log.warning("cannot wake the heartbeat thread: %s", e)

    def _run(self) -> None:
        assert self._selector is not None and self._wake is not None
        next_scan = time.monotonic() + SCAN_EVERY
        while True:
            if not self._apply():
                break
            for key, _ in self._selector.select(timeout=SCAN_EVERY):
                if key.data is None:
                    _drain(self._wake[0])
                else:
                    self._read(key.data)
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + SCAN_EVERY
                with self._lock:
                    silent = [w for w in self._watched.values() if now - w.last > SILENT]
                for w in silent:
                    self._end(w, f"its heartbeat was silent for {SILENT:.0f} s", dead=False)
        self._selector.close()
        with self._lock:
            wake, self._wake = self._wake, None
        for fd in wake:
            os.close(fd)

    def _apply(self) -> bool:
        """Register added streams, close dropped ones; False once stopped."""
        assert self._selector is not None
        with self._lock:
            changes, self._changes = self._changes, []
            stopped = self._stopped
        for add, w in changes:
            if add:
                try:
                    self._selector.register(w.stream, selectors.EVENT_READ, w)
                except (OSError, ValueError) as e:
                    self._end(w, f"its heartbeat stream cannot be watched: {e}", dead=False)
            else:
                self._forget(w)
        return not stopped

    def _read(self, w: _Watched) -> None:
        with self._lock:
            if self._watched.get(w.key) is not w:
                return  # dropped or replaced meanwhile; _apply closes it
        while True:
            try:
                data = w.stream.recv(CHUNK)
            except (socket.timeout, BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._end(w, f"agent stopped: its connection broke ({e})", dead=_dead(w.stream))
                return
            if not data:
                if isinstance(w.stream, paramiko.Channel) and not w.stream.eof_received:
                    # closed by our side of the tunnel (the transport went down), not by the agent's end
                    self._end(w, "the tunnel to its node closed", dead=False)
                else:
                    self._end(w, "agent stopped: its connection closed", dead=_dead(w.stream))
                return
            w.last = time.monotonic()

    def _end(self, w: _Watched, why: str, dead: bool | None) -> None:
        with self._lock:
            mine = self._watched.get(w.key) is w
            if mine:
                del self._watched[w.key]
        self._forget(w)
        if not mine:
            return
        log.info("heartbeat of %s:%d ended: %s", w.key[0], w.key[1], why)
        try:
            self._on_end(w.key, w.generation, why, dead)
        except Exception:  # noqa: BLE001 - the thread serves every other agent too
            log.exception("handling the end of the heartbeat of %s:%d", *w.key)

    def _forget(self, w: _Watched) -> None:
        assert self._selector is not None
        try:
            self._selector.unregister(w.stream)
        except (KeyError, ValueError, OSError):
            pass
        _close(w.stream)


def _dead(stream: Stream) -> bool | None:
    """What the far end of STREAM ending says: a paramiko channel's EOF comes from the agent's end (True); a
    socket's (a ControlMaster's forwarding) may be the agent's or the ControlMaster's (None: undecided)."""
    return True if isinstance(stream, paramiko.Channel) else None


def _close(stream: Stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _raise_fd_limit() -> None:
    """Soft limit of open files up to the hard one: each watched channel takes two descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536),
                                                        hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit (%d): %s", soft, e)
