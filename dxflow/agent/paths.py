"""Which paths an agent may touch: the job's work dir, the user's home, the site's scratch roots
and the node's own scratch (the job's ``TMPDIR``, ``/tmp``, ``/local``).

Every path that comes from a request goes through :meth:`Roots.resolve` before any
file is opened. A path is relative to the job's work dir (the home when the job has
none) or absolute; it is made canonical with every symlink followed, and the result
must lie inside one of the roots. So ``..`` that climbs out, an absolute path
elsewhere, and a symlink (anywhere in the path) pointing outside are all refused,
before anything is read or changed. NUL bytes and names over the file system's limits
are refused as bad input.

The agent runs as the job's user, so the kernel's permissions still apply beneath
this check (another user's home stays closed whatever it says); the roots keep a
request — or a mistake in one — to the places a job's files belong. A user who
swaps a folder for a symlink between the check and the use only reaches what
their own uid could reach anyway.

Node-local roots (``node_local_roots`` in the site config) are shared by every user of the node,
and ``/tmp`` is writable by all: there the kernel's permissions are not enough, since a file of
another user may be readable, and a symlink another user planted would send a write of the
job's user to wherever it points (the user's own ``~/.bashrc``). So below a node-local root every
name the path passes through — folders, the file, and each symlink met on the way — must belong
to the job's user (:meth:`Roots.resolve` walks the path itself, name by name, to see each one), and
a listing of such a folder shows only the user's own entries (:meth:`Roots.visible`). Another
user can make a name the job's user has not made yet, but never in a folder of that user's, and
never over their file (the sticky bit): uploads create with ``O_EXCL`` or ``link(2)``, which fail
on a name that appeared meanwhile.

:func:`open_regular` is how every file a request names is opened for reading: a FIFO
or a device in a folder must not pin a worker thread (``open(2)`` on a FIFO waits
for a writer, and ``/dev/zero`` never ends).
"""

from __future__ import annotations

import errno
import io
import os
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dxflow.errors import AccessDenied, UsageError
from dxflow.layout import DOT_DXFLOW

NAME_MAX = 255    # bytes in one path component (Linux file systems)
PATH_MAX = 4096   # bytes in a whole path
SYMLOOP_MAX = 40  # symlinks followed while resolving one path (Linux's limit, path_resolution(7))
#: the name of a root that every user of the node shares (node_local_roots)
NODE_LOCAL = "node-local"
#: inside the home, dxflow's own folder (the user's signing key, registrations) is never served.
PRIVATE_DIR = DOT_DXFLOW
#: what a path that is not a regular file is, in the user's words.
KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symlink"}


@dataclass(frozen=True)
class Root:
    name: str   # "workdir" | "home" | "scratch" | "node-local"
    path: str   # canonical (symlinks resolved), no trailing slash

    def contains(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path.rstrip("/") + "/")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path}


def expand(template: str, user: str, job: str, tmpdir: str = "") -> str:
    """``$USER``/``${USER}``, ``$JOB``/``${JOB}`` and ``$TMPDIR``/``${TMPDIR}`` (the job's) in a root;
    "" when it names ``$TMPDIR`` and the job has none."""
    for key, value in (("USER", user), ("JOB", job), ("TMPDIR", tmpdir)):
        if not value and ("${%s}" % key in template or "$" + key in template):
            return ""
        template = template.replace("${%s}" % key, value).replace("$" + key, value)
    return template


def job_tmpdir(state, every: float = 10.0) -> Callable[[], str]:
    """The job's ``TMPDIR`` on this node, read from the job's processes (dxflow.agent.jobenv) at
    most once every ``every`` seconds: a step started later may set it; "" while none does."""
    looked = [-every]
    seen = [""]

    def value() -> str:
        now = time.monotonic()
        if now - looked[0] >= every:
            from dxflow.agent.jobenv import job_environment  # it walks /proc: only when a root names $TMPDIR

            tmpdir = job_environment(state).get("TMPDIR", "")
            looked[0], seen[0] = now, (tmpdir if os.path.isabs(tmpdir) else "")
        return seen[0]
    return value


def check_text(path: str) -> None:
    """Refuse NUL bytes and names longer than the file system allows (400)."""
    if "\x00" in path:
        raise UsageError("path contains a NUL byte")
    raw = os.fsencode(path)
    if len(raw) > PATH_MAX:
        raise UsageError(f"path is {len(raw)} bytes long; the limit is {PATH_MAX}")
    for part in raw.split(b"/"):
        if len(part) > NAME_MAX:
            raise UsageError(f"a name in the path is {len(part)} bytes long; the limit is {NAME_MAX}: "
                             f"{part[:40].decode(errors='replace')}...")


class Roots:
    """The allowed roots of one agent, and the check every request path goes through."""

    def __init__(self, work_dir: str | os.PathLike[str] | None, home: str | os.PathLike[str],
                 scratch: list[str] | tuple[str, ...] = (), node_local: list[str] | tuple[str, ...] = (),
                 *, uid: int | None = None, job_tmpdir: Callable[[], str] | None = None,
                 user: str = "", job: str = "") -> None:
        self.work_dir = str(work_dir) if work_dir else ""
        self.home = str(home)
        self.scratch = [str(s) for s in scratch if s]
        #: templates: ``$TMPDIR`` is the job's, asked of ``job_tmpdir`` each time (a step may set it later)
        self.node_local = [str(s) for s in node_local if s]
        self.uid = os.getuid() if uid is None else uid
        self._job_tmpdir = job_tmpdir or (lambda: "")
        self._user, self._job = user, job

    @classmethod
    def for_agent(cls, state, scratch_templates: list[str] | tuple[str, ...] = (),
                  node_local_templates: list[str] | tuple[str, ...] = (),
                  job_tmpdir: Callable[[], str] | None = None) -> "Roots":
        scratch = [expand(t, state.user, state.job) for t in scratch_templates]
        return cls(state.work_dir, state.home, scratch, node_local_templates, job_tmpdir=job_tmpdir,
                   user=state.user, job=state.job)

    def _node_local_paths(self) -> list[str]:
        if not self.node_local:
            return []
        tmpdir = self._job_tmpdir() if any("TMPDIR" in t for t in self.node_local) else ""
        return [expand(t, self._user, self._job, tmpdir) for t in self.node_local]

    def all(self) -> list[Root]:
        """The roots that exist now (a scratch folder may appear after the agent started)."""
        out: list[Root] = []
        named = [("workdir", self.work_dir), ("home", self.home)] + [("scratch", s) for s in self.scratch]
        for name, path in named + [(NODE_LOCAL, s) for s in self._node_local_paths()]:
            if not path or not os.path.isabs(path):
                continue
            real = os.path.realpath(path)
            if os.path.isdir(real) and all(r.path != real or r.name != name for r in out):
                out.append(Root(name, real))
        return out

    @property
    def base(self) -> str:
        """Where a relative path starts: the job's work dir, or the home when there is none."""
        for candidate in (self.work_dir, self.home):
            if candidate and os.path.isabs(candidate) and os.path.isdir(candidate):
                return os.path.realpath(candidate)
        raise AccessDenied("neither the job's work dir nor the home exists on this node")

    def root_of(self, real: str) -> Root | None:
        best = None
        for root in self.all():
            if root.contains(real) and (best is None or len(root.path) > len(best.path)):
                best = root
        return best

    def resolve(self, path: str | None, *, follow: bool = True) -> Path:
        """The canonical path a request names, if it lies in a root; :class:`AccessDenied` otherwise.

        ``follow=False`` leaves the last name as it is (a symlink itself, for delete,
        move and the like): its folder must lie in a root.
        """
        path = path or ""
        check_text(path)
        joined = os.path.join(self.base, path)  # an absolute ``path`` replaces the base
        shared, own = self._shared_and_own()
        if not follow:
            head, name = os.path.split(os.path.normpath(joined))
            follow = name in ("", ".", "..")
        real = self._walk(path, joined, shared, own, follow_last=follow)
        self._check(path, real)
        return Path(real)

    def _walk(self, asked: str, path: str, shared: list[str], own: list[str], *, follow_last: bool) -> str:
        """``os.path.realpath`` done name by name, so that each name met below a node-local root
        (``shared``) is seen as it is: one that is not the user's is refused, unless it is in, or on
        the way to, one of the user's own roots (``own``)."""
        if not shared:  # nothing shared among users: the kernel's permissions are the whole story
            if follow_last:
                return os.path.realpath(path)
            head, name = os.path.split(os.path.normpath(path))
            return os.path.join(os.path.realpath(head), name)
        todo = [p for p in reversed(path.split("/")) if p not in ("", ".")]
        real, links = "/", 0
        while todo:
            name = todo.pop()
            if name == "..":
                real = os.path.dirname(real)
                continue
            here = os.path.join(real, name)
            try:
                st = os.lstat(here)
            except (FileNotFoundError, NotADirectoryError):
                # the rest does not exist (yet): named as asked, as realpath does
                return os.path.normpath(os.path.join(here, *reversed(todo)))
            if st.st_uid != self.uid and any(here.startswith(root.rstrip("/") + "/") for root in shared) \
                    and not any(o == here or o.startswith(here + "/") or here.startswith(o + "/") for o in own):
                raise AccessDenied(f"{asked!r}: {here} belongs to another user (uid {st.st_uid}), and "
                                   f"{self._shared_root(here, shared)} is shared by every user of the node: "
                                   "agents serve there only what is yours")
            if stat.S_ISLNK(st.st_mode) and (todo or follow_last):
                links += 1
                if links > SYMLOOP_MAX:
                    raise UsageError(f"{asked!r}: more than {SYMLOOP_MAX} symlinks on the way (a loop?)")
                target = os.readlink(here)
                if target.startswith("/"):
                    real = "/"
                todo.extend(p for p in reversed(target.split("/")) if p not in ("", "."))
                continue
            real = here
        return real

    def _shared_and_own(self) -> tuple[list[str], list[str]]:
        """The node-local roots, and the others that lie below none of them or strictly below one (a
        work dir or home in /tmp is the user's as anywhere else; a work dir that *is* /tmp is shared)."""
        roots = self.all()
        shared = [r.path for r in roots if r.name == NODE_LOCAL]
        own = [r.path for r in roots if r.name != NODE_LOCAL
               and not any(r.path == s or s.startswith(r.path.rstrip("/") + "/") for s in shared)]
        return shared, own

    @staticmethod
    def _shared_root(path: str, shared: list[str]) -> str:
        return max((r for r in shared if path.startswith(r.rstrip("/") + "/")), key=len)

    def visible(self, folder: str | os.PathLike[str], st: os.stat_result) -> bool:
        """Whether a listing of ``folder`` shows an entry with stat ``st``: below a node-local root
        (``/tmp`` itself included), only the user's own entries are shown."""
        if st.st_uid == self.uid:
            return True
        real = str(folder)
        shared, own = self._shared_and_own()
        if any(real == o or real.startswith(o.rstrip("/") + "/") for o in own):
            return True
        return not any(real == s or real.startswith(s.rstrip("/") + "/") for s in shared)

    def _check(self, asked: str, real: str) -> None:
        root = self.root_of(real)
        if root is None:
            shown = f"{asked!r}" + (f" (resolves to {real})" if real != os.path.normpath(asked) else "")
            raise AccessDenied(f"{shown} lies outside the folders this agent serves "
                               f"({', '.join(dict.fromkeys(r.path for r in self.all()))}); "
                               "paths must stay in the job's work dir, your home, the site's scratch "
                               "or the node's own scratch")
        home = os.path.realpath(self.home) if self.home else ""
        private = os.path.join(home, PRIVATE_DIR) if home else ""
        if private and (real == private or real.startswith(private + "/")):
            raise AccessDenied(f"{asked!r} is inside {private}, dxflow's own folder (your signing key), "
                               "which agents never serve")

    def is_root(self, real: str | os.PathLike[str]) -> bool:
        return any(r.path == str(real) for r in self.all())


def open_regular(path: str | os.PathLike[str], *, follow: bool = True) -> io.BufferedReader:
    """``path`` opened for binary reading if it is a regular file; :class:`UsageError` if it is not.

    Opened with ``O_NONBLOCK`` so that a FIFO or a device answers at once instead of
    waiting for a writer; the flag is cleared once ``fstat`` has said "regular file", for
    the reads. ``follow=False`` adds ``O_NOFOLLOW`` (for a path already made canonical:
    a symlink there now was put there since the check). Other errors are the
    :class:`OSError` that ``open`` raises (a missing file, a permission).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a device without its driver
            raise UsageError(f"{os.fsdecode(path)} is not a regular file: only files can be read") from e
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = KINDS.get(stat.S_IFMT(mode), "a special file")
            raise UsageError(f"{os.fsdecode(path)} is {kind}, not a file: only regular files can be read")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
