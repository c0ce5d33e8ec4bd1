"""``dxflow cp [-r] SRC JOB:NODESET:PATH``: the same file (a folder with ``-r``) on every node of a set.

The login node sends each file once, to the set's first node; the agents pass it on to the others as
it arrives, along a tree (:func:`tree`: each node passes it to at most ``--fanout`` more, as sbcast's
tree does), and write it on their own disk as it passes. Each node checks the file's sha256 (known
before the copy starts: it is hashed here first) before it takes the name. The answer is one line
per node (NDJSON), which this module folds into one summary, like ``dxflow exec JOB:all``'s.

Where the nodes cannot reach each other (no SSH from node to node, a node's agent lost on the way),
the nodes not reached are sent the file from the login node, one by one, by the single-node upload
(``dxflow.cli.files``), and a note says so: slower, but every reachable node gets it. A node that
still fails is named; the rest complete, and the exit code is 1.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import posixpath
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from dxflow.cli.files import CHUNK, TIMEOUT, Agent, Copier, Location
from dxflow.cli.progress import bar
from dxflow.errors import AgentUnreachable, DxflowError, MasterUnavailable, NotFound, UsageError
from dxflow.master.client import check
from dxflow.schedulers.hostlist import fold

#: each node passes the stream on to at most this many more (``--fanout``): two keeps every node's
#: outgoing traffic at twice the stream while the tree's depth grows with log2 of the set
FANOUT = 2
#: the master's tokens live two minutes: peers are asked for again when the answer is older than this
PEERS_FRESH = 30.0


@dataclass
class Shape:
    """A node and the subtree it passes the stream on to."""

    node: str
    children: list[Shape] = field(default_factory=list)

    def nodes(self) -> list[str]:
        return [self.node, *(n for c in self.children for n in c.nodes())]

    def depth(self) -> int:
        return 1 + max((c.depth() for c in self.children), default=0)


def tree(nodes: list[str], fanout: int = FANOUT) -> Shape:
    """The nodes as a tree rooted at the first, breadth first: node i passes it on to nodes
    i*fanout+1 .. i*fanout+fanout (a heap's layout), so the depth is about log_fanout(len(nodes))."""
    if not nodes:
        raise UsageError("a broadcast needs at least one node")
    if fanout < 1:
        raise UsageError(f"--fanout {fanout}: expected 1 or more")
    shapes = [Shape(n) for n in nodes]
    for i, s in enumerate(shapes):
        s.children = shapes[i * fanout + 1:i * fanout + fanout + 1]
    return shapes[0]


def specs(children: list[Shape], peers: dict[str, dict]) -> list[dict[str, Any]]:
    """The plan's ``children``: each node with what the master said about its agent (address, port,
    public key, token)."""
    return [{**{k: peers[c.node][k] for k in ("node", "address", "port", "public_key", "token")},
             "children": specs(c.children, peers)} for c in children]


@dataclass
class Outcome:
    """What became of one node over the whole copy."""

    node: str
    files: int = 0
    bytes: int = 0
    error: str = ""
    #: sent from the login node because the nodes could not pass it on
    rerouted: bool = False


class Broadcast:
    """The copies to a job's node set: one request per file (or list of folders) through the tree."""

    def __init__(self, client, job: str, nodes: list[str], fanout: int, quiet: bool, recursive: bool) -> None:
        self.client, self.job, self.nodes, self.fanout, self.quiet = client, job, nodes, fanout, quiet
        self.outcomes = {n: Outcome(n) for n in nodes}
        self._peers: dict[str, dict] = {}
        self._peers_at = 0.0
        self.copier = Copier(client, quiet=True, recursive=recursive)  # the login node's own sends, when needed
        self.progress: Any = None

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"dxflow: {text}", file=sys.stderr, flush=True)

    def live(self) -> list[str]:
        return [n for n in self.nodes if not self.outcomes[n].error]

    def peers(self) -> dict[str, dict]:
        """The master's word on each live node's agent (tokens included), asked again once old."""
        if time.monotonic() - self._peers_at > PEERS_FRESH:
            answer = self.client.json("POST", f"/api/broadcast/{self.job}/peers", {"nodes": self.live()})
            self._peers = {p["node"]: p for p in answer["peers"]}
            self._peers_at = time.monotonic()
            for node, p in self._peers.items():
                if "error" in p and node in self.outcomes:
                    self.outcomes[node].error = p["error"]
        return {n: p for n, p in self._peers.items() if "error" not in p}

    # -- one request through the tree ------------------------------------------------------------------
    def send(self, plan: dict[str, Any], body: Iterator[bytes], size: int) -> dict[str, dict]:
        """The plan and ``size`` bytes of ``body`` to every live node; each node's line (nodes that gave
        none: a line saying so, to be sent from here)."""
        peers = self.peers()
        nodes = [n for n in self.live() if n in peers]
        if not nodes:
            return {}
        shape = tree(nodes, self.fanout)
        head = json.dumps({**plan, "children": specs(shape.children, peers)}).encode() + b"\n"
        lines: dict[str, dict] = {}
        try:
            lines.update(self._request(shape.node, head, body, size))
        except (OSError, http.client.HTTPException, AgentUnreachable, NotFound, MasterUnavailable) as e:
            # the first node's agent lost or gone: each node is tried from here
            why = f"the broadcast through {shape.node} broke off ({e})"
            return {n: lines.get(n) or {"node": n, "ok": False, "error": why, "reroute": True} for n in nodes}
        for n in nodes:
            lines.setdefault(n, {"node": n, "ok": False, "error": "no answer came for it", "reroute": True})
        return lines

    def _request(self, root: str, head: bytes, body: Iterator[bytes], size: int) -> Iterator[tuple[str, dict]]:
        self.client.ensure()
        conn = self.client.connection(TIMEOUT)
        try:
            conn.putrequest("PUT", self.client.agent_path(self.job, root, "/api/broadcast"),
                            skip_accept_encoding=True)
            conn.putheader("Content-Type", "application/octet-stream")
            conn.putheader("Content-Length", str(len(head) + size))
            conn.endheaders()
            try:
                conn.send(head)
                for chunk in body:
                    conn.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused before the whole body: its answer says why
            resp = conn.getresponse()
            check(resp)
            out = []
            while True:
                raw = resp.readline()
                if not raw:
                    break
                if raw.strip():
                    line = json.loads(raw)
                    out.append((line["node"], line))
            return iter(out)
        finally:
            conn.close()

    # -- what the command sends ------------------------------------------------------------------------
    def folders(self, paths: list[str]) -> None:
        lines = self.send({"op": "mkdir", "paths": paths}, iter(()), 0)
        for node, line in lines.items():
            if line.get("ok"):
                continue
            if line.get("reroute"):
                self._reroute(node, line["error"], lambda a: [a.mkdir(p) for p in paths])
            else:
                self.outcomes[node].error = line["error"]

    def file(self, src: Path, target: str, sha256: str, size: int) -> None:
        plan = {"op": "file", "path": target, "size": size, "sha256": sha256, "overwrite": True}
        with open(src, "rb") as f:
            lines = self.send(plan, self._chunks(f, src, size), size)
        for node, line in lines.items():
            out = self.outcomes[node]
            if line.get("ok") and line.get("sha256") == sha256 and line.get("size") == size:
                out.files += 1
                out.bytes += size
            elif line.get("ok"):
                out.error = f"{target}: the node reports sha256 {str(line.get('sha256'))[:16]}…, not {sha256[:16]}…"
            elif line.get("reroute"):
                # one try (no resuming loop): a node lost for the tree is likely lost for this too
                if self._reroute(node, line["error"], lambda a: self.copier.upload_once(a, src, target)):
                    out.files += 1
                    out.bytes += size
            else:
                out.error = f"{target}: {line['error']}"

    def _chunks(self, f, src: Path, size: int) -> Iterator[bytes]:
        sent = 0
        while sent < size:
            chunk = f.read(min(CHUNK, size - sent))
            if not chunk:
                raise DxflowError(f"{src} shrank while it was copied")
            sent += len(chunk)
            if self.progress is not None:
                self.progress.update(len(chunk))
            yield chunk

    def _reroute(self, node: str, why: str, send) -> bool:
        """Send from the login node to a node the tree did not reach; False (the node failed) if that fails too."""
        out = self.outcomes[node]
        if not out.rerouted:
            self.note(f"{node}: not reached through the other nodes ({why}); sending from the login node")
            out.rerouted = True
        try:
            send(Agent(self.client, self.job, node))
            return True
        except (DxflowError, OSError) as e:
            out.error = f"{e} (and through the other nodes: {why})"
            return False


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def plan_sources(sources: list[Path], base: str, recursive: bool, many: bool,
                 is_folder: bool) -> tuple[list[str], list[tuple[Path, str]]]:
    """(folders to make on every node, parents first; (local file, remote path) of each file) for the
    sources copied to ``base`` (a folder on the nodes when ``is_folder``)."""
    folders: list[str] = []
    files: list[tuple[Path, str]] = []
    for src in sources:
        if not src.exists():
            raise NotFound(f"{src}: no such file or folder here")
        name = src.resolve().name if src.name in ("", ".", "..") else src.name
        target = posixpath.join(base, name) if is_folder else base
        if src.is_dir():
            if not recursive:
                raise UsageError(f"{src} is a folder: add -r to copy it and everything in it")
            folders.append(target)
            for dirpath, dirnames, filenames in os.walk(src):
                rel = os.path.relpath(dirpath, src)
                remote = target if rel == "." else posixpath.join(target, *Path(rel).parts)
                dirnames[:] = [d for d in sorted(dirnames) if not os.path.islink(os.path.join(dirpath, d))]
                folders.extend(posixpath.join(remote, d) for d in dirnames)
                files.extend((Path(dirpath) / f, posixpath.join(remote, f)) for f in sorted(filenames)
                             if (Path(dirpath) / f).is_file())
        elif src.is_file():
            files.append((src, target))
        else:
            raise UsageError(f"{src} is not a file or folder")
    return folders, files


def summary(outcomes: list[Outcome]) -> str:
    """The nodes that failed, folded by what went wrong: ``n3: …; n[5-6]: …``."""
    by: dict[str, list[str]] = {}
    for o in outcomes:
        if o.error:
            by.setdefault(o.error, []).append(o.node)
    return "; ".join(f"{fold(nodes)}: {what}" for what, nodes in by.items())


def broadcast_cp(client, sources: list[Location], dst: Location, nodes: list[str], *, recursive: bool,
                 quiet: bool, fanout: int) -> int:
    """``dxflow cp`` to several nodes: 0 when every node has every file with its sha256, else 1 with a
    summary naming the nodes that failed."""
    first = Agent(client, dst.job, nodes[0])
    st = first.stat(dst.path)
    many = len(sources) > 1
    if st is None and (many or dst.path.endswith("/")):
        raise NotFound(f"{dst.job}:{nodes[0]}:{dst.path}: no such folder on the node")
    if st is not None and st["type"] != "dir" and many:
        raise UsageError(f"{dst} is not a folder: several sources need a folder to copy into")
    base = st["path"] if st is not None and st["type"] == "dir" else dst.path
    folders, files = plan_sources([Path(s.path) for s in sources], base, recursive, many,
                                  st is not None and st["type"] == "dir")
    sums = [(src, target, sha256_of(src), src.stat().st_size) for src, target in files]
    job = Broadcast(client, dst.job, nodes, fanout, quiet, recursive)
    total = sum(size for *_, size in sums)
    job.progress = bar(total, 0, f"{len(sums)} file(s) to {fold(nodes)}", not quiet)
    try:
        if folders:
            job.folders(folders)
        for src, target, sha, size in sums:
            job.file(src, target, sha, size)
    finally:
        job.progress.close()
    outcomes = list(job.outcomes.values())
    failed = [o for o in outcomes if o.error]
    if failed:
        print(f"dxflow: job {dst.job}: {len(failed)} of {len(outcomes)} nodes failed: {summary(outcomes)}",
              file=sys.stderr)
        return 1
    job.note(f"{len(sums)} file(s), {total} bytes on each of {fold(nodes)}, sha256 checked on every node")
    return 0
