"""`dxflow forward` (:mod:`dxflow.cli.forward`): local connections piped through the master's socket, a fake
master on the other end."""

from __future__ import annotations

import socket
import threading

import pytest

from dxflow.cli import forward as cli_forward
from dxflow.cli import forward_local


def test_not_found_route():
    assert cli_forward._not_found_route(b'{"error": "not_found", "message": "The requested URL"}')
    assert not cli_forward._not_found_route(b'{"error": "NotFound", "message": "no agent of job 3"}')
    assert not cli_forward._not_found_route(b"<html>")


def test_tcp_connection_pipes_through_an_upgraded_master_connection(tmp_path):
    """One local connection: upgrade request to the (fake) master's socket, then bytes both ways."""
    from dxflow.master.client import MasterClient

    path = MasterClient(tmp_path).sock
    master = socket.socket(socket.AF_UNIX)
    master.bind(str(path))
    master.listen()
    seen = {}

    def fake_master():
        c, _ = master.accept()
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += c.recv(4096)
        head, _, rest = buf.partition(b"\r\n\r\n")
        seen["head"] = head.decode()
        c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: dxflow-tcp\r\n\r\nhello ")
        data = rest
        while True:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        c.sendall(data.upper())
        c.close()
    t = threading.Thread(target=fake_master, daemon=True)
    t.start()

    from dxflow.master.client import MasterClient

    client = MasterClient(tmp_path)  # the real client, on the fake master's socket
    local_a, local_b = socket.socketpair()
    worker = threading.Thread(target=cli_forward._tcp_connection, args=(client, "/api/forward/3/-/80", local_b),
                              daemon=True)
    worker.start()
    local_a.sendall(b"ping")
    local_a.shutdown(socket.SHUT_WR)
    got = b""
    local_a.settimeout(5)
    while True:
        chunk = local_a.recv(4096)
        if not chunk:
            break
        got += chunk
    worker.join(5)
    assert got == b"hello PING"
    assert seen["head"].startswith("GET /api/forward/3/-/80 HTTP/1.1") and "Upgrade: dxflow-tcp" in seen["head"]


def test_tcp_connection_reports_a_refusal_as_502(tmp_path):
    from dxflow.master.client import MasterClient

    path = MasterClient(tmp_path).sock
    master = socket.socket(socket.AF_UNIX)
    master.bind(str(path))
    master.listen()

    def fake_master():
        c, _ = master.accept()
        c.recv(4096)
        body = b'{"error": "AccessDenied", "message": "port 8766 belongs to another user"}'
        c.sendall(b"HTTP/1.1 403 FORBIDDEN\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        c.close()
    threading.Thread(target=fake_master, daemon=True).start()

    from dxflow.master.client import MasterClient

    a, b = socket.socketpair()
    cli_forward._tcp_connection(MasterClient(tmp_path), "/api/forward/3/-/8766", b)
    a.settimeout(5)
    reply = a.recv(4096)
    assert reply.startswith(b"HTTP/1.1 502") and b"another user" in reply


def test_listen_prefers_the_remote_port_then_any(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    s = forward_local.listen_tcp(None, port)  # taken: any free port
    assert s.getsockname()[1] != port
    s.close()
    from dxflow.errors import UsageError
    with pytest.raises(UsageError):
        forward_local.listen_tcp(port, port)
    taken.close()
