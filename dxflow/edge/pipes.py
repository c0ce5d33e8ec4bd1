"""The one byte pipe between two sockets or paramiko channels (upgrades, port forwards, the WebSocket relay)."""

from __future__ import annotations

import selectors
import socket
import time
from typing import Any


def pipe(a, b, bufsize: int = 64 * 1024, close_grace: float | None = None) -> None:
    """Copy bytes both ways between two sockets (or paramiko channels) until both directions ended.

    End of input on one side is passed on as a half close of the other (``shutdown(SHUT_WR)``,
    a channel's ``shutdown_write``); an error on either side ends both directions. With
    ``close_grace``, once one direction has ended the other may go on that many seconds at most
    (a peer that never finishes its close cannot hold the pipe).
    """
    peer = {a: b, b: a}
    deadline: float | None = None
    # a selector, not select(): a master with hundreds of tunnels has descriptors above FD_SETSIZE
    with selectors.DefaultSelector() as sel:
        for end in (a, b):
            sel.register(end, selectors.EVENT_READ)
        while sel.get_map():
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready = sel.select(timeout)
            if not ready and deadline is not None:
                return
            for key, _ in ready:
                src: Any = key.fileobj  # one of a and b: a socket or a paramiko channel
                dst = peer[src]
                try:
                    data = src.recv(bufsize)
                except OSError:
                    return
                if data:
                    try:
                        dst.sendall(data)
                    except OSError:
                        return
                    continue
                sel.unregister(src)
                _shutdown_write(dst)
                if close_grace is not None and deadline is None:
                    deadline = time.monotonic() + close_grace


def _shutdown_write(sock) -> None:
    try:
        if hasattr(sock, "shutdown_write"):  # a paramiko Channel
            sock.shutdown_write()
        else:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
