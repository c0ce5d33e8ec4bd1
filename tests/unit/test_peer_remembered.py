"""dxflow.edge.peer.peer_uid remembers a connection's peer: the worker asks at accept, the audit asks
again for each request on a kept-alive connection, and the answer cannot change in between."""

from __future__ import annotations

import os
import socket

from dxflow.edge import peer


def test_peer_is_remembered_for_the_connection():
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    served, _ = listener.accept()
    listener.close()
    try:
        assert peer.peer_uid(served) == os.getuid()
        client.close()  # the kernel no longer knows who that was (the client's socket has no owner now)
        assert peer._ask_kernel(served) is None
        assert peer.peer_uid(served) == os.getuid()  # the connection's peer, as it was at accept
    finally:
        served.close()


def test_peer_of_another_connection_is_asked_anew():
    listener = socket.create_server(("127.0.0.1", 0))
    first = socket.create_connection(listener.getsockname())
    a, _ = listener.accept()
    assert peer.peer_uid(a) == os.getuid()
    first.close()
    a.close()
    second = socket.create_connection(listener.getsockname())
    b, _ = listener.accept()
    try:
        second.close()
        assert peer.peer_uid(b) is None  # nothing remembered for this one: the kernel's word, "cannot tell"
    finally:
        b.close()
        listener.close()
