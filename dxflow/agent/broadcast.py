"""``PUT /api/broadcast``: one file (or a list of folders) for every node of a set, passed on from node to node.

The body is one JSON line, the *plan*, then the file's bytes. The plan names what to do here
(``op`` "file": write ``size`` bytes to ``path``, verified against ``sha256`` before it takes the
name; ``op`` "mkdir": make each of ``paths``) and the ``children``: the agents this one passes the
same request on to, each with its own children, a tree the login node drew (``dxflow.cli.broadcast``).
Each child is reached as :mod:`dxflow.agent.peers` says (an SSH login as the user, the peer's port
proven the user's and its identity by a signed challenge) with the token the master minted for it.

The bytes are written here and sent on to every child as they arrive: the tree is a pipeline, the
login node sends one copy whatever the number of nodes. The answer is NDJSON, one line per node of
the subtree: this node's first, then each child's lines as they come. A child that cannot be
reached is named with ``reroute``: the login node sends to it itself; its own children are reached
from here instead. A child lost on the way is named, and so is each node under it that never
answered (``reroute`` too). A failure here (the path refused, the disk full, another hash) is this
node's line alone: the bytes still go on to the children.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import stat
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from flask import Blueprint, Response, current_app, request

from dxflow import audit
from dxflow.agent.files import UPLOAD_PREFIX, _put_in_place, roots
from dxflow.agent.writeback import DiskWriter
from dxflow.edge.http import body_pieces
from dxflow.errors import DxflowError, NotFound, UsageError

if TYPE_CHECKING:  # the SSH pool is loaded by a broadcast that passes the file on, not by every agent
    from dxflow.agent.peers import Peer

bp = Blueprint("broadcast", __name__)

#: the plan line's limit: a tree of thousands of nodes, each with a token, fits
PLAN_LIMIT = 4 * 1024 * 1024
#: deepest tree accepted (a plan nested deeper is refused rather than followed)
MAX_DEPTH = 64
SPEC_KEYS = {"node": str, "address": str, "port": int, "public_key": str, "token": str, "children": list}
#: a node that fails this way may get the file from the login node instead
REROUTE = "reroute"
#: chunks (of edge.http.BODY_PIECE bytes) waiting for one child at most
QUEUED = 4
#: seconds the bytes from upstream may pause before this node gives up on them (and its copy): a parent
#: waits ``peers.TIMEOUT`` (30 s) for a stuck child before it names it lost, so a few such on the way stay
#: under this; a relay that froze (stopped, cut off without a reset) would else hold this node's request
#: and its partial copy until the job ends. The node's parent names it lost, and the login node re-sends.
IDLE = 120.0


# -- the plan ----------------------------------------------------------------------------------------------
def read_plan(line: bytes) -> dict[str, Any]:
    """The plan line, checked (UsageError when it is not one)."""
    try:
        plan = json.loads(line)
    except ValueError as e:
        raise UsageError(f"the broadcast's first line is not JSON: {e}") from None
    if not isinstance(plan, dict) or plan.get("op") not in ("file", "mkdir"):
        raise UsageError("the broadcast plan needs op \"file\" or \"mkdir\"")
    if plan["op"] == "file":
        if not isinstance(plan.get("path"), str) or not isinstance(plan.get("size"), int) or plan["size"] < 0:
            raise UsageError("a file's broadcast plan needs path and size")
        if not isinstance(plan.get("sha256"), str) or len(plan["sha256"]) != 64:
            raise UsageError("a file's broadcast plan needs its sha256")
    elif not isinstance(plan.get("paths"), list) or not all(isinstance(p, str) for p in plan["paths"]):
        raise UsageError("a mkdir broadcast plan needs paths")
    check_children(plan.get("children", []), 0)
    return plan


def check_children(children: Any, level: int) -> None:
    if level > MAX_DEPTH:
        raise UsageError(f"the broadcast tree is deeper than {MAX_DEPTH}")
    if not isinstance(children, list):
        raise UsageError("children: expected a list")
    for c in children:
        if not isinstance(c, dict) or any(not isinstance(c.get(k), t) for k, t in SPEC_KEYS.items()):
            raise UsageError(f"each child needs {', '.join(SPEC_KEYS)}")
        check_children(c["children"], level + 1)


def subtree(spec: dict[str, Any]) -> list[str]:
    """The nodes of a child's subtree, itself first."""
    return [spec["node"], *(n for c in spec["children"] for n in subtree(c))]


def depth(spec: dict[str, Any]) -> int:
    """How many levels lie below a child (0: none)."""
    return 1 + max((depth(c) for c in spec["children"]), default=-1)


def failed(node: str, error: str, reroute: bool = False) -> dict[str, Any]:
    return {"node": node, "ok": False, "error": error, REROUTE: reroute}


# -- this node's part ----------------------------------------------------------------------------------------
class LocalFile:
    """The file written here: a hidden temporary file in the target's folder, renamed over the target once
    complete with the plan's sha256 (as an upload, :mod:`dxflow.agent.files`)."""

    def __init__(self, path: str, size: int, sha256: str, overwrite: bool) -> None:
        r = roots()
        self.target = target = r.resolve(path)
        if r.is_root(target) or target.is_dir():
            raise UsageError(f"{target} is a folder: name the file to write inside it")
        self.existing = target.exists()
        if self.existing and not overwrite:
            raise UsageError(f"{target} exists: pass overwrite to replace it")
        if not target.parent.is_dir():
            raise NotFound(f"folder {target.parent} does not exist on this node")
        self.mode = (stat.S_IMODE(target.stat().st_mode) if self.existing
                     else 0o666 & ~current_app.config["FILE_UMASK"])
        self.size, self.sha256, self.overwrite = size, sha256, overwrite
        self.fd, name = tempfile.mkstemp(prefix=UPLOAD_PREFIX, dir=target.parent)
        self.tmp = Path(name)
        os.fchmod(self.fd, self.mode)
        self.disk = DiskWriter(self.fd, size)
        self.digest = hashlib.sha256()
        self.written = 0

    def write(self, chunk: bytes | memoryview) -> None:
        self.disk.write(chunk)
        self.digest.update(chunk)
        self.written += len(chunk)

    def finish(self) -> dict[str, Any]:
        """Make it the target if it is whole and has the plan's sha256; the node's line of the answer."""
        try:
            self.disk.finish()
            os.fsync(self.fd)
            self.close()
            got = self.digest.hexdigest()
            if self.written != self.size or got != self.sha256:
                raise DxflowError(f"{self.written} of {self.size} bytes arrived with sha256 {got[:16]}…, not "
                                  f"{self.sha256[:16]}…: dropped, {self.target} was left as it was")
            _put_in_place(self.tmp, self.target, self.overwrite)
        except BaseException:
            self.abort()
            raise
        return {"path": str(self.target), "size": self.written, "sha256": got}

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def abort(self) -> None:
        self.close()
        self.tmp.unlink(missing_ok=True)


def node_error(e: BaseException) -> str:
    if isinstance(e, OSError):
        return f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}"
    return str(e) or type(e).__name__


def make_folders(paths: list[str]) -> dict[str, Any]:
    r = roots()
    made = []
    for p in paths:
        path = r.resolve(p)
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise UsageError(f"{path} exists and is not a folder")
        made.append(str(path))
    return {"paths": made}


# -- the children ----------------------------------------------------------------------------------------------
def reach(children: list[dict[str, Any]], lines: list[dict[str, Any]]) -> list[tuple[Peer, dict[str, Any]]]:
    """The children proven and ready (in parallel); a child that cannot be reached gets a line in ``lines``
    and its own children are reached from here instead."""
    if not children:
        return []
    from dxflow.agent.peers import Peer
    job = current_app.config["AGENT"].job  # the pool's threads have no app context

    def one(spec: dict[str, Any]) -> tuple[Peer | None, str]:
        peer = Peer(spec, job)
        try:
            peer.open()
            return peer, ""
        except (DxflowError, OSError) as e:
            peer.close()
            return None, str(e)

    out: list[tuple[Peer, dict[str, Any]]] = []
    orphans: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=len(children)) as pool:
        for spec, (peer, why) in zip(children, pool.map(one, children)):
            if peer is None:
                lines.append(failed(spec["node"], f"not reachable from {_here()}: {why}", reroute=True))
                orphans.extend(spec["children"])
            else:
                out.append((peer, spec))
    return out + reach(orphans, lines)


def _here() -> str:
    return current_app.config["AGENT"].node


class Branch:
    """One child and its subtree during a broadcast: the bytes go on to it until it fails.

    Each child is sent to by a thread of its own (:meth:`_pump`), from a short queue: this node reads,
    writes and hashes the next chunk while the previous ones go out to every child at once, and a
    slow child holds the others back by QUEUED chunks at most (then the reading waits for it)."""

    def __init__(self, peer: Peer, spec: dict[str, Any], relay: str) -> None:
        self.peer, self.spec, self.relay = peer, spec, relay
        self.error = ""
        self._queue: queue.Queue[bytes | memoryview | None] = queue.Queue(QUEUED)
        self._pumping: threading.Thread | None = None

    def start(self, plan: dict[str, Any], size: int) -> None:
        head = json.dumps({**plan, "children": self.spec["children"]}).encode() + b"\n"
        self.call(self.peer.start, head, size)
        self._pumping = threading.Thread(target=self._pump, daemon=True, name=f"broadcast-to-{self.spec['node']}")
        self._pumping.start()

    def send(self, chunk: bytes | memoryview) -> None:
        if not self.error:
            self._queue.put(chunk)

    def end(self) -> None:
        """No more bytes: the thread sends what is queued and stops."""
        if self._pumping is not None:
            self._queue.put(None)

    def _pump(self) -> None:
        while True:
            chunk = self._queue.get()
            if chunk is None:
                return
            if not self.error:  # after a failure the queue is only drained: the reading never waits on it
                self.call(self.peer.send, chunk)

    def call(self, fn, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 - any failure of one child stops that branch alone
            self.error = f"lost on the way from {self.relay}: {node_error(e)}"

    def answers(self, out: queue.Queue) -> None:
        """Its subtree's lines into ``out``; every node of the subtree that never answered is named."""
        seen: set[str] = set()
        if self._pumping is not None:
            self._pumping.join()
        try:
            # after a failed send the child may still have answered (a refusal): read it all the same
            for line in self.peer.answers(depth(self.spec)):
                if isinstance(line, dict) and isinstance(line.get("node"), str):
                    seen.add(line["node"])
                    out.put(line)
        except Exception as e:  # noqa: BLE001
            self.error = self.error or f"lost on the way from {self.relay}: {node_error(e)}"
        finally:
            self.peer.close()
            for node in subtree(self.spec):
                if node not in seen:
                    why = self.error if node == self.spec["node"] else f"not reached: {self.spec['node']} " \
                        f"(which passed it on) failed: {self.error or 'no answer'}"
                    out.put(failed(node, why or "no answer", reroute=True))
            out.put(None)


# -- the request ------------------------------------------------------------------------------------------------
@bp.put("/api/broadcast")
def broadcast() -> Response:
    state = current_app.config["AGENT"]
    length = request.content_length
    if length is None:
        raise UsageError("a broadcast needs a Content-Length")
    stream = request.environ["wsgi.input"]  # not werkzeug's wrapper: the bytes after the plan come by body_pieces
    head = stream.readline(PLAN_LIMIT + 1)
    if not head.endswith(b"\n"):
        raise UsageError("the broadcast's first line (its plan) is missing or over "
                         f"{PLAN_LIMIT // (1024 * 1024)} MiB")
    plan = read_plan(head)
    size = length - len(head)
    if plan["op"] == "file" and size != plan["size"]:
        raise UsageError(f"the body holds {size} bytes, the plan says {plan['size']}")
    lines: list[dict[str, Any]] = []
    branches = [Branch(peer, spec, state.node) for peer, spec in reach(plan.get("children", []), lines)]
    for b in branches:
        b.start(plan, size)
    mine: dict[str, Any] = {"node": state.node, "ok": True}
    local: LocalFile | None = None
    try:
        if plan["op"] == "file":
            audit.record("write", plan["path"], state, request.environ, broadcast=True)
            local = LocalFile(plan["path"], plan["size"], plan["sha256"], bool(plan.get("overwrite")))
        else:
            audit.record("mkdir", plan["paths"], state, request.environ, broadcast=True)
            mine.update(make_folders(plan["paths"]))
    except (DxflowError, OSError) as e:
        mine = failed(state.node, node_error(e))
    received = 0
    try:
        for chunk in body_pieces(request.environ, size, idle=IDLE):
            received += len(chunk)
            for b in branches:  # on its way down the tree first: the children need not wait for this disk
                b.send(chunk)
            if local is not None:
                try:
                    local.write(chunk)
                except OSError as e:  # this node's disk: the others go on
                    local.abort()
                    local, mine = None, failed(state.node, node_error(e))
        if received < size:  # the sender went away: nothing takes the name anywhere below
            raise UsageError(f"the broadcast broke off after {received} of {size} bytes")
        if local is not None:
            try:
                mine.update(local.finish())
            except (DxflowError, OSError) as e:
                mine = failed(state.node, node_error(e))
            local = None
    finally:
        if local is not None:
            local.abort()
        if received < size:
            for b in branches:
                b.peer.close()
        for b in branches:
            b.end()
    return Response(answer([mine, *lines], branches), mimetype="application/x-ndjson")


def answer(first: list[dict[str, Any]], branches: list[Branch]) -> Iterator[bytes]:
    """This node's line and the unreachable children's, then every child's subtree's as they come."""
    for line in first:
        yield json.dumps(line).encode() + b"\n"
    out: queue.Queue = queue.Queue()
    for b in branches:
        threading.Thread(target=b.answers, args=(out,), daemon=True, name=f"broadcast-{b.spec['node']}").start()
    pending = len(branches)
    while pending:
        line = out.get()
        if line is None:
            pending -= 1
            continue
        yield json.dumps(line).encode() + b"\n"


_ERR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

OPENAPI = {
    "/api/broadcast": {"put": {
        "summary": "write a file (or make folders) here and pass the same request on to other nodes' agents",
        "operationId": "broadcast", "tags": ["files"],
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": {
            "type": "string", "format": "binary",
            "description": 'one JSON line, the plan: {"op": "file", "path", "size", "sha256", "overwrite", '
                           '"children"} or {"op": "mkdir", "paths", "children"}; each child {"node", "address", '
                           '"port", "public_key", "token", "children"}; then the file\'s bytes'}}}},
        "responses": {
            "200": {"description": 'one line per node of the subtree: {"node", "ok": true, "path", "size", '
                                   '"sha256"} or {"node", "ok": false, "error", "reroute"}',
                    "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
            "400": {"description": "no Content-Length, a malformed plan, or a body of another length", **_ERR}}}},
}
