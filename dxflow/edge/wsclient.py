"""A small blocking WebSocket client over any connected stream socket (the master's Unix socket too).

wsproto does the protocol (handshake, masking, framing, close); this class only
moves its bytes. Messages come out as ``("binary", bytes)``, ``("text", str)``
and, once, ``("close", code)``. The socket's ``fileno()`` can be given to
``select`` next to other fds: one ``receive()`` per readable event.
"""

from __future__ import annotations

import socket
from typing import Iterable

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Ping, RejectConnection, RejectData,
                            Request, TextMessage)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from dxflow.errors import DxflowError

RECV = 64 * 1024
MAX_REJECT_BODY = 64 * 1024


class HandshakeRejected(DxflowError):
    """The server answered the upgrade with an ordinary HTTP response."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"WebSocket upgrade refused with HTTP {status}: {body[:300].decode(errors='replace')}")
        self.status = status
        self.body = body


class WebSocketClient:
    """One client connection on an already connected socket; call :meth:`handshake` first."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._text: list[str] = []
        self._binary: list[bytes] = []
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def handshake(self, target: str, host: str = "localhost", headers: Iterable[tuple[str, str]] = ()) -> None:
        """Send the upgrade request for ``target`` (path and query); raise :class:`HandshakeRejected` on refusal."""
        extra = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]  # wsproto's header type
        self.sock.sendall(self.ws.send(Request(host=host, target=target, extra_headers=extra)))
        status = 0
        body = b""
        while True:
            data = self.sock.recv(RECV)
            try:
                self.ws.receive_data(data or None)
                events = list(self.ws.events())
            except RemoteProtocolError as e:
                raise DxflowError(f"bad WebSocket handshake answer: {e}") from e
            for event in events:
                if isinstance(event, AcceptConnection):
                    return
                if isinstance(event, RejectConnection):
                    status = event.status_code
                    if not event.has_body:
                        raise HandshakeRejected(status, b"")
                elif isinstance(event, RejectData):
                    body += event.data
                    if event.body_finished or len(body) > MAX_REJECT_BODY:
                        raise HandshakeRejected(status, body)
            if not data:
                if status:
                    raise HandshakeRejected(status, body)
                raise DxflowError("the server closed the connection during the WebSocket handshake")

    def send(self, data: bytes | str) -> None:
        """A binary frame for bytes, a text frame for str."""
        event = BytesMessage(data=data) if isinstance(data, (bytes, bytearray)) else TextMessage(data=data)
        self.sock.sendall(self.ws.send(event))

    def receive(self) -> list[tuple]:
        """Read once from the socket (blocking) and return the complete messages it finished."""
        if self.closed:
            return [("close", 1006)]
        try:
            data = self.sock.recv(RECV)
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        try:
            self.ws.receive_data(data or None)
        except LocalProtocolError:
            self.closed = True
            return [("close", 1006)]
        return self._events()

    def _events(self) -> list[tuple]:
        out: list[tuple] = []
        for event in self.ws.events():
            if isinstance(event, BytesMessage):
                self._binary.append(bytes(event.data))
                if event.message_finished:
                    out.append(("binary", b"".join(self._binary)))
                    self._binary.clear()
            elif isinstance(event, TextMessage):
                self._text.append(event.data)
                if event.message_finished:
                    out.append(("text", "".join(self._text)))
                    self._text.clear()
            elif isinstance(event, Ping):
                self._send_quietly(event.response())
            elif isinstance(event, CloseConnection):
                if self.ws.state is ConnectionState.REMOTE_CLOSING:
                    self._send_quietly(event.response())
                self.closed = True
                out.append(("close", event.code))
        return out

    def close(self, code: int = 1000) -> None:
        """Send a close frame (once) and close the socket."""
        if self.ws.state is ConnectionState.OPEN:
            self._send_quietly(CloseConnection(code=code))
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def _send_quietly(self, event) -> None:
        try:
            self.sock.sendall(self.ws.send(event))
        except (OSError, LocalProtocolError):
            pass
