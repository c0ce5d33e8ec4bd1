"""``/api/ports``: the TCP ports the job's user listens on here, and the check the proxy relies on.

A listening socket counts as the user's only when its inode is held open by one of
the user's own processes (``/proc/<pid>/fd``), read against the listeners of this
node's network namespace (netlink sock_diag, else ``/proc/net/tcp`` and ``tcp6``). A port that another
user's socket could answer on the loopback address is refused as a whole.
"""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Blueprint, current_app, jsonify

from dxflow.edge.tcptable import REACHES_LOOPBACK4, Listener, listeners
from dxflow.errors import AccessDenied, NotFound, UsageError
from dxflow.procs import open_fds

bp = Blueprint("ports", __name__)

def socket_owners(uid: int | None = None) -> dict[int, int]:
    """Socket inode -> pid, over the processes of ``uid`` (default: ours) whose fds we can read."""
    owners: dict[int, int] = {}
    for pid, fds in open_fds(os.getuid() if uid is None else uid):
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owners.setdefault(int(target[8:-1]), pid)
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


_PORT_ITEM: dict[str, Any] = {"type": "object", "properties": {
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
