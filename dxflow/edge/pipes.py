"""Byte pipes between two sockets or paramiko channels (WebSocket upgrades, port forwards)."""

from __future__ import annotations

import select
import socket


def pipe(a, b, bufsize: int = 64 * 1024) -> None:
    """Copy bytes both ways between two sockets (or paramiko channels) until both directions ended.

    End of input on one side is passed on as a half close (``shutdown(SHUT_WR)``) of the
    other; an error on either side ends both directions.
    """
    peer = {a: b, b: a}
    reading = {a, b}
    while reading:
        ready, _, _ = select.select(list(reading), [], [])
        for src in ready:
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
            reading.discard(src)
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass
