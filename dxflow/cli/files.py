"""``dxflow cp``: copy files and folders between the login node and your jobs' nodes.

Either side may be ``JOB[:NODE]:PATH`` (scp-like; NODE defaults to the job's first
node, PATH to the job's work dir and is relative to it unless absolute); a local path
has no colon before its first slash (``./a:b`` is local). Every file is checked by
sha256 once it has arrived. A download goes to ``DST.dxflow-part`` first and is renamed
only after that check, so running the same command again after an interruption
resumes from the bytes already there. An upload goes to a hidden partial file next to
its target on the node (named by a key of the source: path, size, mtime), which the
agent renames only once it holds the whole file with the source's sha256; the next
upload of the same source continues it. A transfer that breaks off (the node's sshd
restarted, its link down a while) is resumed where it broke by the command itself, a
few times with a growing pause, before it gives up.

A name the agent sends (a listing's entry, a file's own name) becomes a local path only
after :func:`safe_name` accepted it: ``../x`` or ``a/b`` from a broken or hostile agent
must not write outside DST. ``cp -r`` checks the whole remote tree before it writes anything.

To a node set (``JOB:all:PATH``, ``JOB:n[1-4]:PATH``) the copy is a broadcast: :mod:`dxflow.cli.broadcast`.
"""

from __future__ import annotations

# Only modules the CLI has loaded anyway: every command (the scheduler hooks too) imports this
# module to build the parser. hashlib and pathlib are imported where they are used.
import argparse
import collections
import json
import logging
import os
import posixpath
import sys
import threading

from dxflow.errors import DxflowError, UsageError  # loaded by the CLI's entry point anyway

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any, Iterator

log = logging.getLogger("dxflow.cp")

CHUNK = 1024 * 1024
PART_SUFFIX = ".dxflow-part"
TIMEOUT = 600.0  # seconds without a byte moving (or an agent hashing a big file) before giving up
RETRY_PAUSES = (1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0)  # between tries of a broken transfer: ~1 min in all


class TransferBroken(DxflowError):
    """A transfer broke off on the way (connection, tunnel, agent being checked again): it resumes where it broke."""


class ResumeRefused(UsageError):
    """The agent refused to continue an upload's kept bytes (completed or removed meanwhile, another hash)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cp", help="copy files to and from your jobs' nodes", description=(
        "Copy files between this machine and the nodes of your running jobs, like scp. "
        "Write a node's side as JOB[:NODE]:PATH: NODE defaults to the job's first node; PATH is "
        "relative to the job's work dir unless absolute, and must stay in the work dir, your home, "
        "the site's scratch or the node's own ($TMPDIR, /tmp, /local: your own files there). A local path has no colon before its first slash (write ./a:b for a "
        "local file named a:b). Each file is checked by sha256 after the copy. A transfer that breaks "
        "off is resumed where it broke, a few times; an interrupted download leaves DST.dxflow-part, an "
        "interrupted upload a hidden .dxflow-upload-*.part next to its target: run the same command "
        "again to resume either. To a node set (JOB:all:PATH, JOB:n[1-4]:PATH) the same files go to every "
        "node, passed on from node to node; a node that fails is named and the others complete."),
        epilog="examples: dxflow cp input.dat 1234:  |  dxflow cp -r 1234:n2:results ./  |  "
               "dxflow cp 1234:/scratch/alice/out.h5 .  |  dxflow cp -r inputs 1234:all:/tmp/")
    p.add_argument("src", nargs="+", metavar="SRC", help="file or folder to copy (several: DST must be a folder)")
    p.add_argument("dst", metavar="DST", help="where to copy to")
    p.add_argument("-r", "--recursive", action="store_true", help="copy folders and everything in them")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar and no notes")
    p.add_argument("--fanout", type=int, default=2, metavar="K",
                   help="to a node set (JOB:all:PATH, JOB:n[1-4]:PATH): each node passes the file on to at "
                        "most K more, as sbcast's tree does (default 2)")
    p.set_defaults(func=cmd_cp)


# -- locations ---------------------------------------------------------------------
class Location(collections.namedtuple("Location", "path job node", defaults=(None, None))):
    """One side of a copy: a local path, or PATH on JOB's NODE (None: the job's first node)."""

    __slots__ = ()

    @property
    def remote(self) -> bool:
        return self.job is not None

    def __str__(self) -> str:
        if not self.remote:
            return self.path
        return f"{self.job}:{self.node + ':' if self.node else ''}{self.path}"


def parse_location(text: str) -> Location:
    """``JOB[:NODE]:PATH`` or a local path (no colon before the first slash)."""
    colon, slash = text.find(":"), text.find("/")
    if colon < 0 or (0 <= slash < colon):
        return Location(text)
    from dxflow.errors import UsageError

    job, rest = text[:colon], text[colon + 1:]
    if not job:
        raise UsageError(f"{text!r}: JOB is missing before ':' (write ./{text} for a local file)")
    colon, slash = rest.find(":"), rest.find("/")
    node = None
    if colon >= 0 and (slash < 0 or colon < slash):
        node, rest = rest[:colon] or None, rest[colon + 1:]
    from dxflow.cli.targets import parse_parts

    parse_parts(text, job, node)  # a malformed job id or node set exits 2 before anything is contacted
    return Location(rest, job, node)


def safe_name(name: object, where: str) -> str:
    """``name`` if it is one plain entry name that can be joined to a local folder; AccessDenied if not.

    The agent's file system cannot hold ``/`` or NUL in a name, nor an entry called ``.``
    or ``..``: such a name in an answer is a broken or hostile agent trying to write
    outside the destination (``../../.bashrc``)."""
    from dxflow.errors import AccessDenied

    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\x00" in name:
        raise AccessDenied(f"the agent sent {name!r} in {where}: not one plain file name, it could write "
                           "outside the destination; nothing was copied")
    return name


# -- talking to one agent through the master ----------------------------------------
class Agent:
    """The files API of one job's node, reached through the user's master."""

    def __init__(self, client, job: str, node: str | None) -> None:
        self.client = client
        self.job = job
        self.node = node

    def url(self, endpoint: str, **query: Any) -> str:
        from urllib.parse import urlencode

        q = urlencode({k: v for k, v in query.items() if v is not None})
        return self.client.agent_path(self.job, self.node, endpoint) + (f"?{q}" if q else "")

    def request(self, method: str, url: str, body: Any = None, headers: dict | None = None):
        """One request through the master; restart the master once if it has gone away meanwhile."""
        from dxflow.errors import MasterUnavailable

        try:
            return self.client.request(method, url, body, headers or {}, TIMEOUT)
        except MasterUnavailable:  # raised on connecting, before any of the body was read: safe to retry
            self.client.ensure()
            return self.client.request(method, url, body, headers or {}, TIMEOUT)

    def upload(self, url: str, body: Any, headers: dict):
        """PUT a streamed body, and read the answer even when the other side answered early and closed
        (a refused upload): http.client alone would only report the broken pipe."""
        import http.client

        self.client.ensure()
        conn = self.client.connection(TIMEOUT)
        try:
            conn.request("PUT", url, body=body, headers=headers)
        except (BrokenPipeError, ConnectionResetError) as e:
            try:
                return conn.getresponse()
            except (OSError, http.client.HTTPException):
                raise e from None
        return conn.getresponse()

    def call(self, method: str, endpoint: str, body: Any = None, **query: Any) -> Any:
        from dxflow.master.client import check

        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        resp = self.request(method, self.url(endpoint, **query), data, headers)
        raw = resp.read()
        check(resp, raw)
        return json.loads(raw) if raw else None

    def stat(self, path: str, sha256: bool = False) -> dict | None:
        """The entry at path (symlinks followed), or None if there is none."""
        from dxflow.errors import NotFound

        try:
            return self.call("GET", "/api/files/stat", path=path, sha256="1" if sha256 else None)
        except NotFound:
            return None

    def listdir(self, path: str) -> list[dict]:
        return self.call("GET", "/api/files", path=path)["entries"]

    def mkdir(self, path: str) -> str:
        return self.call("POST", "/api/files/mkdir", {"path": path, "parents": True})["path"]


class _Background:
    """One call in a daemon thread (an interrupted copy does not wait for it)."""

    def __init__(self, fn, *args: Any) -> None:
        self._result: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._result = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller by get()
            self._error = e

    def get(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


# -- the command ----------------------------------------------------------------------
class Copier:
    def __init__(self, client, quiet: bool, recursive: bool) -> None:
        self.client = client
        self.quiet = quiet
        self.recursive = recursive
        self.files = 0
        self.bytes = 0

    def note(self, text: str) -> None:
        if not self.quiet:
            print(f"dxflow: {text}", file=sys.stderr, flush=True)

    def agent(self, loc: Location) -> Agent:
        return Agent(self.client, loc.job, loc.node)

    def resuming(self, what: str, transfer, *args: Any) -> None:
        """Run one file's ``transfer``; when it breaks off on the way, run it again (it resumes where
        the bytes stop) after a pause, up to len(RETRY_PAUSES) times."""
        import time

        from dxflow.errors import AgentUnreachable, MasterUnavailable

        for pause in (*RETRY_PAUSES, None):
            try:
                transfer(*args)
                return
            except (TransferBroken, AgentUnreachable, MasterUnavailable) as e:
                if pause is None:
                    raise TransferBroken(f"{what}: {e}; gave up after {len(RETRY_PAUSES)} tries: run the same "
                                         "command again to resume") from e
                self.note(f"{what}: {e}; resuming in {pause:.0f} s")
                time.sleep(pause)

    # downloads ------------------------------------------------------------------------
    def download(self, src: Location, dst_text: str, many: bool, suffix: str = "") -> None:
        """``suffix``: added to the copy's name in DST (``.NODE`` when several nodes' files come, as
        ``clush --rcopy`` and ``rpdcp`` name them)."""
        from pathlib import Path

        from dxflow.errors import NotFound, UsageError

        agent = self.agent(src)
        st = agent.stat(src.path)
        if st is None:
            raise NotFound(f"{src}: no such file or folder on the node")
        dst = Path(dst_text or ".")
        if dst.is_dir():
            dst = dst / (safe_name(st.get("name"), f"its answer about {src}") + suffix)
        elif many or dst_text.endswith("/"):
            raise NotFound(f"{dst_text}: no such folder here")
        elif not dst.parent.is_dir():
            raise NotFound(f"{dst.parent}: no such folder here")
        if st["type"] == "dir":
            if not self.recursive:
                raise UsageError(f"{src} is a folder: add -r to copy it and everything in it")
            self.download_tree(agent, st["path"], dst)
        elif st["type"] == "file":
            self.resuming(str(src), self.download_file, agent, st["path"], st["size"], dst)
        else:
            raise UsageError(f"{src} is not a file or folder ({st['type']})")

    def download_tree(self, agent: Agent, folder: str, dst: Path) -> None:
        """The whole remote tree is listed (and every name checked) first, then copied."""
        folders, files = self.plan_tree(agent, folder, dst)
        for local in folders:
            local.mkdir(exist_ok=True)
        for path, size, local in files:
            self.resuming(path, self.download_file, agent, path, size, local)

    def plan_tree(self, agent: Agent, folder: str, dst: Path) -> tuple[list[Path], list[tuple[str, int, Path]]]:
        """(local folders to make, parents first; (remote path, size, local path) of each file)."""
        folders: list[Path] = [dst]
        files: list[tuple[str, int, Path]] = []
        pending = collections.deque([(folder, dst)])
        while pending:
            remote, local = pending.popleft()
            entries = agent.listdir(remote)
            names = [safe_name(e.get("name"), f"its listing of {remote}") for e in entries]
            for e, name in zip(entries, names):
                path = posixpath.join(remote, name)
                kind, size = e["type"], e["size"]
                if kind == "link":
                    target = agent.stat(path)
                    if target is None or target["type"] != "file":
                        self.note(f"skipping symlink {path} (to a folder, or dangling)")
                        continue
                    kind, size = "file", target["size"]
                if kind == "dir":
                    folders.append(local / name)
                    pending.append((path, local / name))
                elif kind == "file":
                    files.append((path, size, local / name))
                else:
                    self.note(f"skipping {path}: not a file or folder")
        return folders, files

    def download_file(self, agent: Agent, path: str, size: int, dst: Path) -> None:
        from dxflow.master.client import check

        import hashlib
        import http.client

        from dxflow.cli.progress import bar
        from dxflow.errors import DxflowError

        # a device or pipe (/dev/null, a fifo) is written straight: no part file, no resume
        direct = dst.exists() and not dst.is_file() and not dst.is_dir()
        part = dst if direct else dst.with_name(dst.name + PART_SUFFIX)
        digest = hashlib.sha256()
        offset = part.stat().st_size if part.exists() and not direct else 0
        if offset > size:  # the file on the node shrank: what we have is stale
            offset = 0
        if offset:
            with open(part, "rb") as f:
                digest = hashlib.file_digest(f, "sha256")
            self.note(f"resuming {path} at byte {offset} of {size} (from {part})")
        # the node hashes its file while it sends it (on a real cluster, another machine's CPU)
        remote = _Background(agent.stat, path, True)
        received = 0
        with open(part, "wb" if direct or not part.exists() else "r+b") as out:
            if not direct:
                out.seek(offset)
                out.truncate()
            if offset < size or size == 0:
                headers = {"Range": f"bytes={offset}-"} if offset else {}
                resp = agent.request("GET", agent.url("/api/files/content", path=path), None, headers)
                check(resp)
                if resp.status == 200 and offset:  # the agent sent the whole file after all
                    offset = 0
                    out.seek(0)
                    out.truncate()
                    digest = hashlib.sha256()
                elif resp.status == 206 and not (resp.getheader("Content-Range") or "").startswith(f"bytes {offset}-"):
                    raise DxflowError(f"{path}: the agent answered range {resp.getheader('Content-Range')!r}, "
                                      f"not from byte {offset}; remove {part} and retry")
                expected = int(resp.getheader("Content-Length") or -1)
                progress = bar(offset + max(expected, 0), offset, posixpath.basename(path), not self.quiet)
                buf = memoryview(bytearray(CHUNK))
                try:
                    while True:
                        try:
                            n = resp.readinto(buf)  # whole CHUNKs until the end: few, large writes
                        except (OSError, http.client.HTTPException) as e:
                            n = 0
                            log.info("%s: reading broke off: %s", path, e)
                        if not n:
                            break
                        out.write(buf[:n])
                        digest.update(buf[:n])
                        received += n
                        progress.update(n)
                finally:
                    progress.close()
                    resp.close()
                if expected >= 0 and received != expected:
                    raise TransferBroken(f"{path}: transfer broken off after {offset + received} of "
                                         f"{offset + expected} bytes")
        log.info("%s: %d bytes requested from byte %d, %d received", path, size - offset, offset, received)
        self.verify(path, remote.get(), None if direct else part, digest.hexdigest(), offset + received)
        if not direct:
            os.replace(part, dst)
        self.files += 1
        self.bytes += received

    def verify(self, path: str, st: dict | None, part: Path | None, local_sha: str, local_size: int) -> None:
        """Compare what arrived with the node's ``stat?sha256=1`` of the file; drop the copy if they differ."""
        from dxflow.errors import DxflowError, NotFound

        if st is None:
            raise NotFound(f"{path} vanished from the node during the copy")
        if st.get("sha256") != local_sha or st["size"] != local_size:
            if part is not None:
                part.unlink(missing_ok=True)
            raise DxflowError(f"{path}: the copy's sha256 {local_sha[:16]}… ({local_size} bytes) differs from "
                              f"the node's {str(st.get('sha256'))[:16]}… ({st['size']} bytes): the file may have "
                              "changed while it was copied; the partial copy was removed, run the command again")

    # uploads --------------------------------------------------------------------------
    def upload(self, src: Path, dst: Location, many: bool) -> None:
        from dxflow.errors import NotFound, UsageError

        if not src.exists():
            raise NotFound(f"{src}: no such file or folder here")
        agent = self.agent(dst)
        st = agent.stat(dst.path)
        name = src.resolve().name if src.name in ("", ".", "..") else src.name
        if st is not None and st["type"] == "dir":
            target = posixpath.join(st["path"], name)
        elif st is None and (many or dst.path.endswith("/")):
            raise NotFound(f"{dst}: no such folder on the node")
        elif many:
            raise UsageError(f"{dst} is not a folder: several sources need a folder to copy into")
        else:
            target = dst.path
        if src.is_dir():
            if not self.recursive:
                raise UsageError(f"{src} is a folder: add -r to copy it and everything in it")
            self.upload_tree(agent, src, target)
        else:
            if st is None:  # a new file: its folder must exist (a clearer error than a refused body)
                parent = posixpath.dirname(target)
                pst = agent.stat(parent)
                if pst is None or pst["type"] != "dir":
                    raise NotFound(f"{dst.job}:{parent or '.'}: no such folder on the node")
            self.upload_file(agent, src, target)

    def upload_tree(self, agent: Agent, src: Path, target: str) -> None:
        from pathlib import Path

        base = agent.mkdir(target)
        for dirpath, dirnames, filenames in os.walk(src):
            rel = os.path.relpath(dirpath, src)
            remote = base if rel == "." else posixpath.join(base, *Path(rel).parts)
            for d in list(dirnames):
                if os.path.islink(os.path.join(dirpath, d)):
                    self.note(f"skipping symlink to a folder {os.path.join(dirpath, d)}")
                    continue
                agent.mkdir(posixpath.join(remote, d))
            for f in filenames:
                local = Path(dirpath) / f
                if not local.is_file():
                    self.note(f"skipping {local}: not a file")
                    continue
                self.upload_file(agent, local, posixpath.join(remote, f))

    def upload_file(self, agent: Agent, src: Path, target: str) -> None:
        self.resuming(str(src), self.upload_once, agent, src, target)

    def upload_once(self, agent: Agent, src: Path, target: str) -> None:
        """Send what the node lacks of ``src``: the rest after the partial file a broken upload of the
        same source left there (with the whole file's sha256, which the agent checks), else all of it;
        when the kept bytes cannot be continued (the agent refuses: gone meanwhile, another hash), all of it."""
        try:
            self.upload_from(agent, src, target, None)
        except ResumeRefused as e:
            self.note(f"{src}: the kept bytes cannot be continued ({e}); sending the whole file")
            self.upload_from(agent, src, target, 0)

    def upload_from(self, agent: Agent, src: Path, target: str, start: int | None) -> int:
        """One PUT of ``src`` from byte ``start`` (None: from where the kept partial file ends); the
        byte it started from; ResumeRefused when the agent refuses to continue the kept bytes."""
        from dxflow.master.client import check

        import hashlib
        import http.client

        from dxflow.cli.progress import bar

        with open(src, "rb") as f:
            st = os.fstat(f.fileno())
            size = st.st_size
            key = resume_key(src, st, agent, target)
            part = posixpath.join(posixpath.dirname(target), f".dxflow-upload-{key}.part")
            offset = 0
            if start is None:
                kept = agent.stat(part)
                offset = kept["size"] if kept and kept["type"] == "file" and kept["size"] <= size else 0
            query = {"path": target, "overwrite": "1", "resume": key, "offset": str(offset)}
            digest = hashlib.sha256()
            if offset:
                self.note(f"resuming the upload of {src} at byte {offset} of {size} (kept on the node in {part})")
                query["sha256"] = hashlib.file_digest(f, "sha256").hexdigest()  # the agent checks the whole
                f.seek(0)
                while f.tell() < offset:  # the bytes already there count in this side's digest too
                    chunk = f.read(min(CHUNK, offset - f.tell()))
                    if not chunk:
                        raise DxflowError(f"{src} shrank while it was copied")
                    digest.update(chunk)
            progress = bar(size, offset, src.name, not self.quiet)

            def body() -> Iterator[bytes]:
                sent = offset
                while sent < size:
                    try:
                        chunk = f.read(min(CHUNK, size - sent))
                    except OSError as e:  # this side's file: not a transfer to retry
                        raise DxflowError(f"{src}: {e.strerror or e}") from e
                    if not chunk:
                        raise DxflowError(f"{src} shrank while it was copied")
                    digest.update(chunk)
                    sent += len(chunk)
                    progress.update(len(chunk))
                    yield chunk

            try:
                resp = agent.upload(agent.url("/api/files/content", **query), body(),
                                    {"Content-Length": str(size - offset),
                                     "Content-Type": "application/octet-stream"})
                raw = resp.read()
            except (OSError, http.client.HTTPException) as e:
                raise TransferBroken(f"{src}: the upload broke off ({e})") from e
            finally:
                progress.close()
        try:
            check(resp, raw)
        except UsageError as e:
            if offset:
                raise ResumeRefused(str(e)) from e
            raise
        answer = json.loads(raw)
        if answer["sha256"] != digest.hexdigest() or answer["size"] != size:
            raise DxflowError(f"{answer['path']} on the node has sha256 {answer['sha256'][:16]}… "
                              f"({answer['size']} bytes), not {digest.hexdigest()[:16]}… ({size} bytes) "
                              f"like {src}: run the command again")
        log.info("%s -> %s: %d bytes from byte %d, sha256 %s", src, answer["path"], size - offset, offset,
                 answer["sha256"])
        self.files += 1
        self.bytes += size - offset
        return offset


def resume_key(src: Path, st: os.stat_result, agent: Agent, target: str) -> str:
    """The name of one upload of one source: the same source (path, size, mtime) to the same place
    continues the bytes a broken try left; a changed source starts afresh."""
    import hashlib

    ident = "\0".join([os.path.abspath(src), str(st.st_size), str(st.st_mtime_ns), agent.job, agent.node or "",
                        target])
    return hashlib.sha256(ident.encode()).hexdigest()[:32]


def _on_nodes(client, loc: Location, missing: list | None = None) -> list[Location]:
    """The remote side ``loc`` once its job and nodes are looked up: one Location per node with an agent;
    the nodes of a set that have none (after the wait: dxflow.cli.targets) are named on stderr and added
    to ``missing``."""
    from dxflow.cli.targets import parse_parts, resolve

    where = resolve(client, parse_parts(str(loc), loc.job, loc.node))
    for node, why in where.missing:
        print(f"dxflow: job {where.job}: {node}: not copied: {why}", file=sys.stderr, flush=True)
    if missing is not None:
        missing.extend(node for node, _ in where.missing)
    return [Location(loc.path, where.job, node) for node in where.nodes]


def cmd_cp(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dxflow.cli.service import service
    from dxflow.cli.targets import parse_parts
    from dxflow.errors import DxflowError, UsageError

    sources = [parse_location(s) for s in args.src]
    dst = parse_location(args.dst)
    many = len(sources) > 1
    if any(s.remote for s in sources) and dst.remote:
        raise UsageError("copying from one node to another is not supported: copy to this machine first")
    if not dst.remote and not any(s.remote for s in sources):
        raise UsageError("neither SRC nor DST is on a node: write a node's side as JOB[:NODE]:PATH "
                         "(or use plain cp)")
    if any(not s.remote for s in sources) and any(s.remote for s in sources):
        raise UsageError("all SRC must be on the same side")
    several = dst.remote and parse_parts(args.dst, dst.job, dst.node).several
    client = service().ensure()
    absent: list[str] = []  # nodes of a set without an agent: named, and the exit is 1
    if several:  # the same files on every node of a set, passed on through the nodes
        from dxflow.cli.broadcast import broadcast_cp

        each = _on_nodes(client, dst, absent)  # an ended job, nodes not the job's: named before anything moves
        code = broadcast_cp(client, sources, each[0], [one.node for one in each], recursive=args.recursive,
                            quiet=args.quiet, fanout=args.fanout) if each else 1
        return max(code, 1 if absent else 0)
    copier = Copier(client, args.quiet, args.recursive)
    if dst.remote:
        dst = _on_nodes(client, dst)[0]  # an ended job, a node not the job's: named before anything moves
    for src in sources:
        try:
            if dst.remote:
                copier.upload(Path(src.path), dst, many)
                continue
            each = _on_nodes(client, src, absent)
            several = parse_parts(str(src), src.job, src.node).several
            for one in each:  # several nodes: NAME.NODE in DST, which must be a folder
                copier.download(one, dst.path, many or several, f".{one.node}" if several else "")
        except OSError as e:  # a local file (or the master's socket) failed
            raise DxflowError(f"{e.filename + ': ' if e.filename else ''}{e.strerror or e}") from e
    log.info("%d file(s), %d bytes copied", copier.files, copier.bytes)
    return 1 if absent else 0
