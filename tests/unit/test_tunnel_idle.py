"""An idle SSH transport's reading thread sleeps (dxflow.ssh.paramiko_login.IDLE_WAKE) and a close still
wakes it at once: QuickAckSocket.close shuts the socket down under a blocked ``recv``."""

from __future__ import annotations

import socket
import threading

from dxflow.ssh import paramiko_login

ANSWER = 10.0  # generous: "ends at all", well under the recv timeout below


def test_close_wakes_a_reader_blocked_far_longer():
    listener = socket.create_server(("127.0.0.1", 0))
    raw = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    sock = paramiko_login.QuickAckSocket(raw)
    sock.settimeout(120.0)  # a reader that would sleep two minutes
    got: list[object] = []

    def read() -> None:
        try:
            got.append(sock.recv(4096))
        except OSError as e:
            got.append(e)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.close()
        reader.join(ANSWER)
        assert not reader.is_alive(), "close did not wake the blocked reader"
        assert got in ([b""],) or isinstance(got[0], OSError)  # the end of the connection, at once
    finally:
        peer.close()


def test_idle_wake_is_well_under_the_keepalive_interval():
    assert paramiko_login.IDLE_WAKE >= 1.0  # at most one wakeup a second per idle node, instead of ten
    assert paramiko_login.IDLE_WAKE * 2 <= paramiko_login.KEEPALIVE  # keepalives still go out about on time
