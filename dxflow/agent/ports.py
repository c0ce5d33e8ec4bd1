"""``/api/ports``: the TCP ports the job's user listens on here, and the check the proxy relies on.

A listening socket counts as the user's only when its inode is held open by one of
the user's own processes (``/proc/<pid>/fd``), read against the listeners of this
node's network namespace (``/proc/net/tcp`` and ``tcp6``). A port that another
user's socket could answer on the loopback address is refused as a whole.
"""

from __future__ import annotations

import os
import socket
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


def listeners() -> list[Listener]:
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


def own_ports(found: list[Listener] | None = None, owners: dict[int, int] | None = None) -> list[dict]:
    """The user's listening ports (not the agent's own), one entry per address and port."""
    found = listeners() if found is None else found
    owners = socket_owners() if owners is None else owners
    uid, me = os.getuid(), os.getpid()
    out, seen = [], set()
    for sock in found:
        pid = owners.get(sock.inode)
        if pid is None or sock.uid != uid or pid == me or (sock.address, sock.port) in seen:
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
    owners = socket_owners() if owners is None else owners
    uid, me = os.getuid(), os.getpid()
    on_port = [s for s in found if s.port == port]
    if not on_port:
        raise NotFound(f"nothing listens on port {port} on this node: start your service first "
                       f"(see `dxflow ports` for the ports your job listens on)")

    def mine(s: Listener) -> bool:
        return s.uid == uid and s.inode in owners

    if any(owners.get(s.inode) == me for s in on_port):
        raise AccessDenied(f"port {port} is the dxflow agent's own port, not a service of your job")
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
_ERRORS = {code: {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
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
