"""The WebSocket client of ``dxflow shell`` against a wsproto server on a socket pair, and the CLI's helpers."""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Message, Ping, Pong, RejectConnection,
                            RejectData, Request, TextMessage)

from dxflow.errors import DxflowError
from dxflow.edge.wsclient import HandshakeRejected, WebSocketClient


class Server:
    """The other end of a socket pair, speaking server-side WebSocket with wsproto."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.ws = WSConnection(ConnectionType.SERVER)
        self.request: Request | None = None

    def events(self):
        while True:
            self.ws.receive_data(self.sock.recv(65536) or None)
            events = list(self.ws.events())
            if events:
                return events

    def accept(self) -> Request:
        (req,) = self.events()
        assert isinstance(req, Request)
        self.request = req
        self.sock.sendall(self.ws.send(AcceptConnection()))
        return req

    def send(self, event) -> None:
        self.sock.sendall(self.ws.send(event))


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield WebSocketClient(a), Server(b)
    a.close()
    b.close()


def _in_thread(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_handshake_sends_target_and_headers(pair):
    client, server = pair
    t = _in_thread(server.accept)
    client.handshake("/api/fleet/7/-/api/shell?cols=80&rows=24", headers=[("Authorization", "Bearer x")])
    t.join(5)
    assert server.request.target == "/api/fleet/7/-/api/shell?cols=80&rows=24"
    assert (b"authorization", b"Bearer x") in [(k.lower(), v) for k, v in server.request.extra_headers]


def test_frames_both_ways_fragments_ping_and_close(pair):
    client, server = pair
    t = _in_thread(server.accept)
    client.handshake("/")
    t.join(5)
    client.send(b"\x00\xffbytes")
    client.send(json.dumps({"resize": [10, 20]}))
    got = server.events()
    while len(got) < 2:
        got += server.events()
    assert isinstance(got[0], BytesMessage) and got[0].data == b"\x00\xffbytes"
    assert isinstance(got[1], TextMessage) and json.loads(got[1].data) == {"resize": [10, 20]}

    # a binary message in two fragments, a ping, a text message, then the close
    server.send(Message(data=b"ab", message_finished=False))
    server.send(Message(data=b"cd", message_finished=True))
    server.send(Ping(payload=b"p"))
    server.send(TextMessage(data='{"exit": 3}'))
    server.send(CloseConnection(code=1000))
    messages = []
    while not messages or messages[-1][0] != "close":
        messages += client.receive()
    assert messages == [("binary", b"abcd"), ("text", '{"exit": 3}'), ("close", 1000)]
    answers = server.events()
    while not any(isinstance(e, CloseConnection) for e in answers):
        answers += server.events()
    assert any(isinstance(e, Pong) and e.payload == b"p" for e in answers)
    client.close()


def test_connection_lost_is_a_close(pair):
    client, server = pair
    t = _in_thread(server.accept)
    client.handshake("/")
    t.join(5)
    server.sock.close()
    assert client.receive() == [("close", 1006)]
    assert client.receive() == [("close", 1006)]


def test_rejected_handshake_keeps_status_and_body(pair):
    client, server = pair
    body = json.dumps({"error": "NotFound", "message": "job 7 has no agent on node n9"}).encode()

    def refuse():
        server.events()
        server.send(RejectConnection(status_code=404, headers=[(b"content-length", str(len(body)).encode()),
                                                               (b"content-type", b"application/json")],
                                     has_body=True))
        server.send(RejectData(data=body, body_finished=True))

    t = _in_thread(refuse)
    with pytest.raises(HandshakeRejected) as e:
        client.handshake("/api/fleet/7/n9/api/shell")
    t.join(5)
    assert e.value.status == 404 and e.value.body == body


def test_server_closing_during_handshake(pair):
    client, server = pair

    def hang_up():
        server.events()
        server.sock.shutdown(socket.SHUT_RDWR)

    _in_thread(hang_up)
    with pytest.raises(DxflowError):
        client.handshake("/")


def test_cli_error_mapping_and_helpers():
    from types import SimpleNamespace

    from dxflow.cli.shell import control, terminal_size
    from dxflow.errors import AgentUnreachable, NotFound
    from dxflow.master.client import check

    with pytest.raises(NotFound, match="n9"):
        check(SimpleNamespace(status=404), b'{"error": "NotFound", "message": "no agent on n9"}')
    with pytest.raises(AgentUnreachable):
        check(SimpleNamespace(status=502), b"bad gateway")
    assert control('{"exit": 7}') == {"exit": 7}
    assert control('{"error": "bad_request", "message": "bad size"}') == {"error": "bad size"}
    assert control("not json") == {} and control("[1]") == {} and control('{"exit": "x"}') == {}
    r, w = os.pipe()
    try:
        assert terminal_size(r) == (80, 24)  # not a terminal
    finally:
        os.close(r)
        os.close(w)


def test_cli_registers_shell():
    from dxflow.cli import build_parser

    args = build_parser().parse_args(["shell", "7:n2"])
    assert args.target == "7:n2" and args.func.__name__ == "cmd_shell"


def test_relay_request_head_keeps_websocket_headers_only():
    from flask import Flask

    from dxflow.edge.http import parse_head as _parse_head
    from dxflow.master.websocket import _request_head

    app = Flask("t")
    headers = {"Upgrade": "websocket", "Connection": "keep-alive, Upgrade", "Sec-WebSocket-Key": "abc==",
               "Sec-WebSocket-Version": "13", "Cookie": "dxflow_session=secret", "Authorization": "Bearer user's",
               "Origin": "http://127.0.0.1:8080", "Keep-Alive": "300", "Host": "127.0.0.1:8080"}
    with app.test_request_context("/api/fleet/7/n1/api/shell?cols=80", headers=headers):
        head = _request_head("/api/shell?cols=80", 4242, "TOKEN").decode()
    lines = head.split("\r\n")
    assert lines[0] == "GET /api/shell?cols=80 HTTP/1.1" and head.endswith("\r\n\r\n")
    fields = [tuple(x.split(": ", 1)) for x in lines[1:] if x]
    assert ("Host", "127.0.0.1:4242") in fields and ("Authorization", "Bearer TOKEN") in fields
    assert ("Upgrade", "websocket") in fields and ("Connection", "Upgrade") in fields
    assert ("Sec-Websocket-Key", "abc==") in fields or ("Sec-WebSocket-Key", "abc==") in fields
    names = [k.lower() for k, _ in fields]
    assert "cookie" not in names and "keep-alive" not in names
    assert names.count("host") == 1 and names.count("authorization") == 1 and names.count("connection") == 1
    status, parsed = _parse_head(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                 b"Sec-WebSocket-Accept: xyz\r\n\r\n")
    assert status == 101 and ("Sec-WebSocket-Accept", "xyz") in parsed
    with pytest.raises(ValueError):
        _parse_head(b"garbage\r\n\r\n")
