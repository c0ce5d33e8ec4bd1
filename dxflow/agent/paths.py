"""Which paths an agent may touch: the job's work dir, the user's home, the site's scratch roots.

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

:func:`open_regular` is how every file a request names is opened for reading: a FIFO
or a device in a folder must not pin a worker thread (``open(2)`` on a FIFO waits
for a writer, and ``/dev/zero`` never ends).
"""

from __future__ import annotations

import errno
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from dxflow.errors import AccessDenied, UsageError
from dxflow.layout import DOT_DXFLOW

NAME_MAX = 255    # bytes in one path component (Linux file systems)
PATH_MAX = 4096   # bytes in a whole path
#: inside the home, dxflow's own folder (the user's signing key, registrations) is never served.
PRIVATE_DIR = DOT_DXFLOW
#: what a path that is not a regular file is, in the user's words.
KINDS = {stat.S_IFDIR: "a folder", stat.S_IFIFO: "a FIFO (named pipe)", stat.S_IFCHR: "a character device",
         stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket", stat.S_IFLNK: "a symlink"}


@dataclass(frozen=True)
class Root:
    name: str   # "workdir" | "home" | "scratch"
    path: str   # canonical (symlinks resolved), no trailing slash

    def contains(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path.rstrip("/") + "/")

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "path": self.path}


def expand(template: str, user: str, job: str) -> str:
    """``$USER``/``${USER}`` and ``$JOB``/``${JOB}`` in a site's scratch root."""
    for key, value in (("USER", user), ("JOB", job)):
        template = template.replace("${%s}" % key, value).replace("$" + key, value)
    return template


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
                 scratch: list[str] | tuple[str, ...] = ()) -> None:
        self.work_dir = str(work_dir) if work_dir else ""
        self.home = str(home)
        self.scratch = [str(s) for s in scratch if s]

    @classmethod
    def for_agent(cls, state, scratch_templates: list[str] | tuple[str, ...] = ()) -> "Roots":
        scratch = [expand(t, state.user, state.job) for t in scratch_templates]
        return cls(state.work_dir, state.home, scratch)

    def all(self) -> list[Root]:
        """The roots that exist now (a scratch folder may appear after the agent started)."""
        out: list[Root] = []
        for name, path in [("workdir", self.work_dir), ("home", self.home)] + [("scratch", s) for s in self.scratch]:
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
        if follow:
            real = os.path.realpath(joined)
        else:
            head, name = os.path.split(os.path.normpath(joined))
            if name in ("", ".", ".."):
                real = os.path.realpath(joined)
            else:
                real = os.path.join(os.path.realpath(head), name)
        self._check(path, real)
        return Path(real)

    def _check(self, asked: str, real: str) -> None:
        root = self.root_of(real)
        if root is None:
            shown = f"{asked!r}" + (f" (resolves to {real})" if real != os.path.normpath(asked) else "")
            raise AccessDenied(f"{shown} lies outside the folders this agent serves "
                               f"({', '.join(dict.fromkeys(r.path for r in self.all()))}); "
                               "paths must stay in the job's work dir, your home or the site's scratch")
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
