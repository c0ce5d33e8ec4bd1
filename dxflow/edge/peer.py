"""Who is at the other end of an accepted connection: the uid the kernel records for it.

A port on 127.0.0.1 is reachable by every user of a shared login node (or of a compute node),
and nothing a client sends can prove who it is. The kernel knows: for a Unix socket it keeps the
connecting process's credentials (``SO_PEERCRED``); for a loopback TCP connection the client's
own socket is in the same kernel's table, owned by the uid that created it. Every dxflow
listener asks :func:`allowed` before it reads or sends a byte, and refuses when the answer is
anything but its own uid — including "cannot tell" (``None``).

For TCP the peer's socket is the one whose local address is our remote address and whose
remote address is our local address. It is looked up exactly by that 4-tuple through
``NETLINK_SOCK_DIAG`` (as ``ss`` does; see ``man 7 sock_diag``), else found in
``/proc/net/tcp`` and ``/proc/net/tcp6``. IPv4-mapped IPv6 addresses are compared as IPv4:
the kernel files such sockets under IPv4 in both places.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
import weakref
from typing import Iterator, Union

from dxflow.edge import tcptable

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Endpoint = tuple[Address, int]


_known: weakref.WeakKeyDictionary[socket.socket, int] = weakref.WeakKeyDictionary()
_known_lock = threading.Lock()


def peer_uid(sock: socket.socket) -> int | None:
    """The uid of the process at the other end of ``sock``, or None when the kernel cannot say.

    Unix sockets: the credentials taken at ``connect()``. TCP: only loopback connections,
    whose client socket is in this network namespace's table. A connection's peer does not
    change: the answer is remembered for the socket object (asked at accept, again by the audit
    of every request on a kept-alive connection).
    """
    with _known_lock:
        known = _known.get(sock)
    if known is not None:
        return known
    uid = _ask_kernel(sock)
    if uid is not None:
        try:
            with _known_lock:
                _known[sock] = uid
        except TypeError:  # an object without weak references (a test's stand-in): not remembered
            pass
    return uid


def _ask_kernel(sock: socket.socket) -> int | None:
    if sock.family == socket.AF_UNIX:
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return None
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid if uid >= 0 else None  # -1: no peer credentials (an unconnected socket)
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    uid = uid_by_sock_diag(sock)
    return uid if uid is not None else uid_by_proc(sock)


def allowed(sock: socket.socket, uid: int | None = None) -> bool:
    """Whether the peer of ``sock`` runs as ``uid`` (default: this process's uid)."""
    want = os.getuid() if uid is None else uid
    return peer_uid(sock) == want


def _endpoints(sock: socket.socket) -> tuple[Endpoint, Endpoint] | None:
    """(the peer's local end, the peer's remote end) = (our remote end, our local end), loopback only."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        ours, theirs = sock.getsockname(), sock.getpeername()
    except OSError:  # not connected (any more)
        return None
    local, remote = (_address(ours[0]), ours[1]), (_address(theirs[0]), theirs[1])
    if not remote[0].is_loopback:
        return None  # a client on another host has no socket here; a match would be a coincidence
    return remote, local


def _address(text: str | bytes) -> Address:
    """An address as text (a scope ``%lo`` allowed) or packed bytes; IPv4-mapped IPv6 as IPv4."""
    ip = ipaddress.ip_address(text.split("%", 1)[0] if isinstance(text, str) else text)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def uid_by_sock_diag(sock: socket.socket) -> int | None:
    """The peer's uid, found by an exact 4-tuple query to ``NETLINK_SOCK_DIAG``; None if not found."""
    ends = _endpoints(sock)
    if ends is None:
        return None
    (src, sport), (dst, dport) = ends
    family = socket.AF_INET if src.version == 4 else socket.AF_INET6
    try:
        found = tcptable.diag_lookup(family, (src.packed, sport), (dst.packed, dport))
    except OSError:  # no netlink here (a sandbox, an old kernel): the caller falls back to /proc
        return None
    return _owner(*found) if found else None


def uid_by_proc(sock: socket.socket) -> int | None:
    """The peer's uid, found in ``/proc/net/tcp`` and ``/proc/net/tcp6``; None if not found."""
    ends = _endpoints(sock)
    if ends is None:
        return None
    for local, remote, uid, inode in _proc_entries():
        if (local, remote) == ends:
            return _owner(uid, inode)
    return None


def _owner(uid: int, inode: int) -> int | None:
    """The uid of a socket entry that still belongs to a process.

    Inode 0: the client closed its socket (or it lingers in time-wait, for which the kernel
    reports uid 0, as if root). Nobody is left to serve, and uid 0 must never be taken for root.
    """
    return uid if inode != 0 else None


def _proc_entries() -> Iterator[tuple[Endpoint, Endpoint, int, int]]:
    """(local end, remote end, uid, inode) of every TCP socket of this network namespace."""
    for text in tcptable.proc_tables():
        for e in tcptable.parse(text):
            yield (_address(e.local[0]), e.local[1]), (_address(e.remote[0]), e.remote[1]), e.uid, e.inode
