"""The kernel's table of TCP sockets: who listens where, and who owns a connection's other end.

Read through netlink ``NETLINK_SOCK_DIAG`` (as ``ss`` does; ``man 7 sock_diag``), which answers a
precise question (the listeners only, or one socket by its 4-tuple) without walking every
connection, else parsed from ``/proc/net/tcp`` and ``/proc/net/tcp6`` — text that can also come
from another node (the master reads a node's tables through SFTP). The agent's ``/api/ports``,
the master's check of an agent's port and every listener's peer check all read it here.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Iterator

PROC_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
TCP_LISTEN = 10   # the kernel's TCP_LISTEN state ("0A" in /proc/net/tcp)
#: listening addresses that take a connection to 127.0.0.1 (``::`` too, unless the socket is IPv6-only,
#: which the table does not say: counted, to be safe).
REACHES_LOOPBACK4 = frozenset({"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0"})

# <linux/netlink.h>, <linux/sock_diag.h>, <linux/inet_diag.h>
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
INET_DIAG_NOCOOKIE = 0xFFFFFFFF
_NLMSG = struct.Struct("=IHHII")                  # nlmsghdr: len, type, flags, seq, pid
_REQ = struct.Struct("=BBBxI48s")                 # inet_diag_req_v2: family, protocol, ext, pad, states, id
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")   # inet_diag_msg: ..., sport, dport, src, dst, if, cookie, ..., uid, inode
DIAG_TIMEOUT = 2.0


@dataclass(frozen=True)
class Listener:
    """A listening socket: its address and port, the uid that made it, its inode (0: unknown)."""

    address: str
    port: int
    uid: int
    inode: int = 0


@dataclass(frozen=True)
class Entry:
    """Any TCP socket of the table: both ends, state, owner."""

    local: tuple[str, int]
    remote: tuple[str, int]
    state: int
    uid: int
    inode: int


def decode_address(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (IPv4) or 32 hex digits ``:PORT`` (IPv6), as the kernel prints them:
    each 32-bit word of the address in host (little-endian) order, the port in hex."""
    host, _, port = text.partition(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
    elif len(raw) == 16:
        addr = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    else:
        raise ValueError(f"bad address {text!r}")
    return addr, int(port, 16)


def parse(text: str) -> list[Entry]:
    """Every socket of one ``/proc/net/tcp[6]`` table (lines that do not parse are skipped).

    Sample (a header, then one line per socket; ``st`` 0A is LISTEN, then uid and inode)::

          sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
           0: 0100007F:223D 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 43121 1 ...
    """
    out = []
    for line in text.splitlines()[1:]:
        cells = line.split()
        if len(cells) < 10:
            continue
        try:
            out.append(Entry(decode_address(cells[1]), decode_address(cells[2]), int(cells[3], 16),
                             int(cells[7]), int(cells[9])))
        except ValueError:
            continue
    return out


def parse_listeners(text: str) -> list[Listener]:
    """The listening sockets of one ``/proc/net/tcp[6]`` table."""
    return [Listener(e.local[0], e.local[1], e.uid, e.inode) for e in parse(text) if e.state == TCP_LISTEN]


def proc_tables() -> Iterator[str]:
    """The text of this network namespace's tables (no IPv6 table on a kernel without IPv6)."""
    for path in PROC_TABLES:
        try:
            with open(path, encoding="ascii") as f:
                yield f.read()
        except FileNotFoundError:
            continue


def _diag(request: bytes, flags: int) -> Iterator[tuple]:
    """inet_diag_msg tuples the kernel answers to one request."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(DIAG_TIMEOUT)
        nl.sendall(_NLMSG.pack(_NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | flags, 1, 0)
                   + request)
        while True:
            data = nl.recv(65536)
            if not data:
                return
            pos = 0
            while pos + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, pos)
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR or length < _NLMSG.size:
                    if flags & NLM_F_DUMP:
                        raise OSError("sock_diag refused the request")
                    return  # a lookup: -ENOENT, no such socket
                yield _MSG.unpack_from(data, pos + _NLMSG.size)
                pos += (length + 3) & ~3
            if not flags & NLM_F_DUMP:
                return


def diag_listeners(family: int) -> list[Listener]:
    """The listening sockets of one address family, from sock_diag (OSError where it is not there)."""
    request = _REQ.pack(family, socket.IPPROTO_TCP, 0, 1 << TCP_LISTEN, bytes(48))
    out = []
    for fam, _, _, _, sport, _, src, _, _, _, _, _, _, uid, inode in _diag(request, NLM_F_DUMP):
        raw = src[:4] if fam == socket.AF_INET else src
        out.append(Listener(socket.inet_ntop(fam, raw), int.from_bytes(sport, "big"), uid, inode))
    return out


def listeners() -> list[Listener]:
    """Listening TCP sockets of this network namespace (IPv4 and IPv6): sock_diag, else /proc."""
    try:
        return diag_listeners(socket.AF_INET) + diag_listeners(socket.AF_INET6)
    except OSError:
        return [lst for text in proc_tables() for lst in parse_listeners(text)]


def diag_lookup(family: int, local: tuple[bytes, int], remote: tuple[bytes, int]) -> tuple[int, int] | None:
    """(uid, inode) of the one socket with this local and remote end (packed addresses), from sock_diag;
    None when there is none. OSError where sock_diag is not there."""
    sockid = (struct.pack("!HH", local[1], remote[1]) + local[0].ljust(16, b"\0") + remote[0].ljust(16, b"\0")
              + struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    for msg in _diag(_REQ.pack(family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF, sockid), 0):
        return msg[13], msg[14]
    return None
