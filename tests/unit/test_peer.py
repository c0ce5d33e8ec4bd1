"""dxflow.edge.peer: the uid at the other end of a real connection, as the kernel tells it.

Every test uses real sockets in this process; the one with another uid forks a child that
becomes bob (uid 1002) before it connects, so it needs root.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from dxflow.edge import peer

BOB = 1002
LOOKUPS: dict[str, Callable[[socket.socket], int | None]] = {
    "sock_diag": peer.uid_by_sock_diag, "proc": peer.uid_by_proc, "peer_uid": peer.peer_uid}


@pytest.fixture(params=sorted(LOOKUPS))
def lookup(request) -> Callable[[socket.socket], int | None]:
    """Each way of asking: the netlink query, the /proc tables, and the public function."""
    return LOOKUPS[request.param]


@contextmanager
def accepted(family: int, bind: str, connect: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.socket(family, socket.SOCK_STREAM) as server:
        server.bind((bind, 0))
        server.listen()
        with socket.create_connection((connect, server.getsockname()[1]), timeout=10) as client:
            conn, _ = server.accept()
            with conn:
                yield conn, client


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_loopback_tcp_peer_is_this_process_uid(lookup):
    with accepted(socket.AF_INET, "127.0.0.1", "127.0.0.1") as (conn, client):
        assert lookup(conn) == os.getuid()
        assert lookup(client) == os.getuid()  # the other direction: the server's socket is found as well
        assert peer.allowed(conn)


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this machine")
def test_ipv6_loopback_peer_is_this_process_uid(lookup):
    with accepted(socket.AF_INET6, "::1", "::1") as (conn, _client):
        assert lookup(conn) == os.getuid()


@pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 on this machine")
def test_ipv4_client_of_a_dual_stack_listener_seen_through_its_mapped_address(lookup):
    with accepted(socket.AF_INET6, "::", "127.0.0.1") as (conn, _client):
        assert conn.getpeername()[0] == "::ffff:127.0.0.1"
        assert lookup(conn) == os.getuid()


def test_unix_socketpair_peer_is_this_process_uid():
    a, b = socket.socketpair()
    with a, b:
        assert peer.peer_uid(a) == os.getuid()
        assert peer.allowed(a) and not peer.allowed(a, uid=os.getuid() + 1)


def test_closed_client_cannot_be_told(lookup):
    """Once the client closed its socket the kernel reports no owner (uid 0 for time-wait): None, never root."""
    with accepted(socket.AF_INET, "127.0.0.1", "127.0.0.1") as (conn, client):
        client.close()
        assert lookup(conn) is None
        assert not peer.allowed(conn, uid=0)


def test_unconnected_socket_cannot_be_told(lookup):
    for family in (socket.AF_INET, socket.AF_UNIX):
        with socket.socket(family) as s:
            assert lookup(s) is None


def non_loopback_ipv4() -> str | None:
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        address = line.split()[3].split("/")[0]
        if not address.startswith("127."):
            return address
    return None


@pytest.mark.skipif(non_loopback_ipv4() is None, reason="this machine has no non-loopback IPv4 address")
def test_non_loopback_peer_is_not_told(lookup):
    """A client reaching a wildcard listener from a non-loopback address is not vouched for."""
    with accepted(socket.AF_INET, "0.0.0.0", non_loopback_ipv4() or "") as (conn, _client):
        assert lookup(conn) is None


# -- another user -----------------------------------------------------------------------------------

@contextmanager
def as_bob(connect: Callable[[], socket.socket]) -> Iterator[None]:
    """Fork a child that becomes bob, connects, and holds the connection while the block runs."""
    release_r, release_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, only os._exit
        code = 1
        try:
            os.close(release_w)
            os.close(ready_r)
            os.setgroups([])
            os.setgid(BOB)
            os.setuid(BOB)
            sock = connect()
            os.write(ready_w, b"1")
            os.read(release_r, 1)
            sock.close()
            code = 0
        finally:
            os._exit(code)
    os.close(release_r)
    os.close(ready_w)
    try:
        assert os.read(ready_r, 1) == b"1", "bob's child could not connect"
        yield
    finally:
        os.close(release_w)
        os.close(ready_r)
        os.waitpid(pid, 0)


needs_root = pytest.mark.skipif(os.getuid() != 0, reason="becoming bob (uid 1002) needs root")


@needs_root
def test_tcp_client_running_as_another_uid_is_seen_as_that_uid(lookup):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = server.getsockname()
        with as_bob(lambda: socket.create_connection(address, timeout=10)):
            conn, _ = server.accept()
            with conn:
                assert lookup(conn) == BOB
                assert not peer.allowed(conn)
                assert peer.allowed(conn, uid=BOB)


@needs_root
def test_unix_client_running_as_another_uid_is_seen_as_that_uid():
    name = f"\0dxflow-test-peer-{os.getpid()}"  # abstract: reachable by bob without a file mode to pass

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX)
        s.connect(name)
        return s

    with socket.socket(socket.AF_UNIX) as server:
        server.bind(name)
        server.listen()
        with as_bob(connect):
            conn, _ = server.accept()
            with conn:
                assert peer.peer_uid(conn) == BOB
                assert not peer.allowed(conn)
