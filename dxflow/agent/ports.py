"""``/api/ports``: the TCP ports the job's user listens on here, and the check the proxy relies on.

A listening socket counts as the user's only when its inode is held open by one of
the user's own processes (``/proc/<pid>/fd``), read against the listeners of this
node's network namespace (netlink sock_diag, else ``/proc/net/tcp`` and ``tcp6``). A port that another
user's socket could answer on the loopback address is refused as a whole.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from dataclasses import dataclass

from flask import Blueprint, current_app, jsonify

from dxflow.errors import AccessDenied, NotFound, UsageError

bp = Blueprint("ports", __name__)

TCP_LISTEN = "0A"
#: addresses whose listener answers a connection to 127.0.0.1 (the proxy's target).
REACHES_LOOPBACK4 = {"127.0.0.1", "0.0.0.0", "::", "::ffff:127.0.0.1", "::ffff:0.0.0.0"}
PROC_NET = ("/proc/net/tcp", "/proc/net/tcp6")


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    uid: int
    inode: int


def decode_address(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (IPv4) or 32 hex digits ``:PORT`` (IPv6), as the kernel prints them."""
    host, _, port = text.partition(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
    elif len(raw) == 16:  # four 32-bit words, each in host (little-endian) order
        addr = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4)))
    else:
        raise ValueError(f"bad address {text!r}")
    return addr, int(port, 16)


def parse_proc_net_tcp(text: str) -> list[Listener]:
    """Listening sockets in a ``/proc/net/tcp[6]`` table.

    Sample (header, then one line per socket)::

          sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
           0: 0100007F:223D 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 43121 1 ...
    """
    out = []
    for line in text.splitlines()[1:]:
        cells = line.split()
        if len(cells) < 10 or cells[3] != TCP_LISTEN:
            continue
        try:
            addr, port = decode_address(cells[1])
            out.append(Listener(addr, port, int(cells[7]), int(cells[9])))
        except ValueError:
            continue
    return out


# sock_diag (netlink): the kernel lists only listening sockets, where reading /proc/net/tcp walks
# every connection's hash bucket (over 10 ms on a big node). /proc/net/tcp stays the fallback.
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN_STATE = 10
_NLMSG = struct.Struct("=IHHII")                 # nlmsghdr
_REQ = struct.Struct("=BBBBI48s")                 # inet_diag_req_v2 (family, protocol, ext, pad, states, id)
_MSG = struct.Struct("=BBBB2s2s16s16sI8sIIIII")   # inet_diag_msg


def _diag_listeners(family: int) -> list[Listener]:
    out: list[Listener] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        req = _REQ.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN_STATE, bytes(48))
        nl.sendall(_NLMSG.pack(_NLMSG.size + len(req), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req)
        while True:
            data = nl.recv(65536)
            if not data:
                return out
            pos = 0
            while pos + _NLMSG.size <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, pos)
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR or length < _NLMSG.size:
                    raise OSError("sock_diag refused the request")
                (fam, _, _, _, sport, _, src, _, _, _, _, _, _, uid, inode) = _MSG.unpack_from(data, pos + _NLMSG.size)
                raw = src[:4] if fam == socket.AF_INET else src
                out.append(Listener(socket.inet_ntop(fam, raw), int.from_bytes(sport, "big"), uid, inode))
                pos += (length + 3) & ~3


def listeners() -> list[Listener]:
    """Listening TCP sockets of this node's network namespace (IPv4 and IPv6)."""
    try:
        return _diag_listeners(socket.AF_INET) + _diag_listeners(socket.AF_INET6)
    except OSError:
        pass
    out: list[Listener] = []
    for path in PROC_NET:
        try:
            with open(path) as f:
                out += parse_proc_net_tcp(f.read())
        except FileNotFoundError:  # no IPv6 on this node
            continue
    return out


def socket_owners(uid: int | None = None) -> dict[int, int]:
    """Socket inode -> pid, over the processes of ``uid`` (default: ours) whose fds we can read."""
    uid = os.getuid() if uid is None else uid
    owners: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            fds = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owners.setdefault(int(target[8:-1]), int(entry))
    return owners


OWNER_TTL = 5.0
_owner_cache: dict[int, tuple[float, int]] = {}


def owners_of(inodes: set[int]) -> dict[int, int]:
    """Socket inode -> pid for these inodes; a full scan only when one of them was not seen lately.

    A socket's inode stays with its socket, so a recent answer for it still holds.
    """
    now = time.monotonic()
    hits = {i: _owner_cache[i] for i in inodes if i in _owner_cache}
    if len(hits) == len(inodes) and all(now - t < OWNER_TTL for t, _ in hits.values()):
        return {i: pid for i, (_, pid) in hits.items()}
    owners = socket_owners()
    _owner_cache.clear()
    _owner_cache.update({i: (now, pid) for i, pid in owners.items()})
    return owners


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def is_agent(pid: int) -> bool:
    """The process is a dxflow agent (this job's or another's): its ports are not the job's services."""
    if pid in (os.getpid(), os.getppid()):
        return True
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return any(a == b"-m" and b == b"dxflow.agent" for a, b in zip(argv, argv[1:]))


def own_ports(found: list[Listener] | None = None, owners: dict[int, int] | None = None) -> list[dict]:
    """The user's listening ports (not the agent's own), one entry per address and port."""
    found = listeners() if found is None else found
    owners = socket_owners() if owners is None else owners
    uid = os.getuid()
    out, seen = [], set()
    for sock in found:
        pid = owners.get(sock.inode)
        if pid is None or sock.uid != uid or (sock.address, sock.port) in seen or is_agent(pid):
            continue
        seen.add((sock.address, sock.port))
        out.append({"port": sock.port, "address": sock.address, "pid": pid, "process": process_name(pid),
                    "command": command_line(pid)})
    return sorted(out, key=lambda p: (p["port"], p["address"]))


def check_port(port: int, found: list[Listener] | None = None, owners: dict[int, int] | None = None) -> dict:
    """Where to connect for ``port`` on this node, if every socket that could answer there is the user's.

    Raises AccessDenied (someone else's socket, or the agent's own) or NotFound (nothing listens).
    """
    if not 1 <= port <= 65535:
        raise UsageError(f"port {port} is not a TCP port (1-65535)")
    found = listeners() if found is None else found
    uid = os.getuid()
    on_port = [s for s in found if s.port == port]
    owners = owners_of({s.inode for s in on_port}) if owners is None else owners
    if not on_port:
        raise NotFound(f"nothing listens on port {port} on this node: start your service first "
                       f"(see `dxflow ports` for the ports your job listens on)")

    def mine(s: Listener) -> bool:
        return s.uid == uid and s.inode in owners

    if any(s.inode in owners and is_agent(owners[s.inode]) for s in on_port):
        raise AccessDenied(f"port {port} is a dxflow agent's own port, not a service of your job")
    for target, group in (("127.0.0.1", [s for s in on_port if s.address in REACHES_LOOPBACK4]),
                          ("::1", [s for s in on_port if s.address == "::1"])):
        if not group:
            continue
        others = [s for s in group if not mine(s)]
        if others:
            raise AccessDenied(f"port {port} on this node belongs to another user's process (uid "
                               f"{others[0].uid}): dxflow only reaches services your own job runs")
        return _entry(port, group[0], target, owners)
    # listening only on a specific address of this node (e.g. its cluster network address)
    for s in on_port:
        if mine(s):
            return _entry(port, s, s.address, owners)
    raise AccessDenied(f"port {port} on this node belongs to another user's process (uid {on_port[0].uid}): "
                       f"dxflow only reaches services your own job runs")


def _entry(port: int, sock: Listener, connect: str, owners: dict[int, int]) -> dict:
    pid = owners[sock.inode]
    return {"port": port, "address": sock.address, "connect": connect, "pid": pid, "process": process_name(pid)}


@bp.get("/api/ports")
def ports():
    return jsonify(own_ports())


@bp.get("/api/ports/<int:port>")
def port_check(port: int):
    if current_app.config["AGENT"].port == port:
        raise AccessDenied(f"port {port} is the dxflow agent's own port, not a service of your job")
    return jsonify(check_port(port))


_PORT_ITEM = {"type": "object", "properties": {
    "port": {"type": "integer"}, "address": {"type": "string"}, "pid": {"type": "integer"},
    "process": {"type": "string"}, "command": {"type": "string"}}}
_JSON_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_ERRORS = {code: {"description": text, "content": _JSON_ERROR}
           for code, text in (("403", "another user's port, or the agent's own"), ("404", "nothing listens there"),
                              ("400", "not a TCP port"))}

OPENAPI = {
    "/api/ports": {"get": {
        "summary": "the job user's listening TCP ports on this node", "operationId": "listPorts", "tags": ["ports"],
        "responses": {"200": {"description": "one entry per address and port", "content": {
            "application/json": {"schema": {"type": "array", "items": _PORT_ITEM}}}}}}},
    "/api/ports/{port}": {"get": {
        "summary": "whether the proxy may reach PORT, and at which address", "operationId": "checkPort",
        "tags": ["ports"],
        "parameters": [{"name": "port", "in": "path", "required": True,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 65535}}],
        "responses": {"200": {"description": "the user's port", "content": {"application/json": {"schema": {
            "type": "object", "properties": {**_PORT_ITEM["properties"], "connect": {"type": "string"}}}}}},
            **_ERRORS}}},
}
