"""HTTP over an SSH channel (a paramiko ``direct-tcpip`` channel, or a socket): the master's requests to agents.

Kept apart from the pool that opens the channels (:mod:`dxflow.master.tunnels`): these classes are
raw HTTP plumbing on any byte stream, and need nothing of the master but a way to open one
(:class:`ChannelSource`).
"""

from __future__ import annotations

import http.client
import io
from typing import Any, Protocol

RECV_ALL = 1 << 24      # more than any SSH channel window: one recv takes all that has arrived
READ_CHUNK = 256 * 1024


class ChannelSource(Protocol):
    """What opens a byte stream to a port of a node (:class:`dxflow.master.tunnels.TunnelPool`)."""

    def channel(self, address: str, port: int, timeout: float = ..., generation: int | None = None,
                host: str = ...) -> Any: ...


class ChannelReader(io.RawIOBase):
    """Raw reads from a paramiko channel: whatever has arrived, taken in one piece.

    paramiko keeps a channel's received bytes in an array and trims its front on every
    partial read, which costs a copy of all the rest (up to the SSH window) per read; so
    each ``recv`` here takes everything there is, and hands it out from a memoryview.
    """

    def __init__(self, chan) -> None:
        self._chan = chan
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if not self._pending:
            self._pending = memoryview(self._chan.recv(RECV_ALL))
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class ChannelResponse(http.client.HTTPResponse):
    """An HTTP response whose ``read1`` works on a tunnel channel too.

    http.client reads through ``sock.makefile()``; paramiko's ChannelFile has no
    ``read1`` and its ``read(n)`` waits for all n bytes, which would hold back a
    live stream (SSE, logs) and break the relay's ``read1``.
    """

    def __init__(self, sock, *args, **kwargs) -> None:
        super().__init__(sock, *args, **kwargs)
        if not hasattr(self.fp, "read1"):
            self.fp = io.BufferedReader(ChannelReader(sock), READ_CHUNK)


class TunnelHTTPConnection(http.client.HTTPConnection):
    """HTTP over a direct-tcpip channel to an agent (its answers readable piecewise: ``read1``)."""

    response_class = ChannelResponse

    def __init__(self, pool: ChannelSource, address: str, port: int, timeout: float = 60.0,
                 generation: int | None = None) -> None:
        super().__init__("127.0.0.1", port, timeout=timeout)
        self._pool = pool
        self._address = address
        self.generation = generation

    def connect(self) -> None:
        chan = self._pool.channel(self._address, self.port, generation=self.generation)
        chan.settimeout(self.timeout)
        self.sock = chan
