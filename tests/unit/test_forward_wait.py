"""``dxflow forward``: which answers mean "not yet, wait" and which end the connection."""

from __future__ import annotations

import socket

from dxflow.cli.forward import _client_left, _not_yet


def test_nothing_listening_or_no_agent_yet_is_waited_for():
    assert "nothing listens" in _not_yet(404, b'{"error": "NotFound", "message": "nothing listens on port 8888"}')
    assert _not_yet(404, b'{"error": "NotFound", "message": "no agent of job 12"}')
    assert _not_yet(502, b'{"error": "AgentStarting", "message": "agent 12.n1 is still being checked"}')


def test_refusals_and_missing_routes_are_not_waited_for():
    assert _not_yet(403, b'{"error": "AccessDenied", "message": "another user\'s process"}') is None
    assert _not_yet(404, b'{"error": "not_found", "message": "The requested URL was not found"}') is None
    assert _not_yet(400, b'{"error": "UsageError", "message": "port 0"}') is None
    # a lost agent (dead, or its port taken) does not come back by waiting: the forward says so and exits
    assert _not_yet(502, b'{"error": "AgentLost", "message": "agent lost: 12.n1 has stopped"}') is None


def test_a_client_that_closed_is_seen_one_that_sent_a_request_is_not():
    a, b = socket.socketpair()
    try:
        assert not _client_left(a)
        b.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert not _client_left(a)  # waiting data is a client still there
        b.close()
        a.recv(100)
        assert _client_left(a)
    finally:
        a.close()
