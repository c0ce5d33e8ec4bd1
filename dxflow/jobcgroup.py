"""Cgroups on a node, read and written through the cgroup filesystem: join, list, freeze and kill.

Two uses (issue #9, "faithful to the job"):

- the prolog's launcher (:mod:`dxflow.adopt`) puts the agent into the job's own cgroup on the
  node, as ``pam_slurm_adopt`` does for an SSH session, so that the agent and everything it
  starts count against the job's CPU and memory limits and end with the job; and into a cgroup
  dxflow makes for that one agent, so that the epilog can stop everything the agent started at
  once — even a process that forks and exits in a loop, which a scan of /proc never catches;
- the epilog kills those cgroups.

Both kinds of hierarchy are handled. cgroup v2 is one tree, whose every cgroup has
``cgroup.kill`` (Linux 5.14) and ``cgroup.freeze`` (5.2) without any controller. cgroup v1 is
one tree per controller; stopping a cgroup atomically needs the ``freezer`` controller. A
"hybrid" host mounts v1 controllers and a v2 tree without controllers at ``unified``: the job's
cgroups (made by the scheduler) are then v1 ones, and dxflow's own cgroup is made in the v2
tree, which needs no controller to be killed.

Standard library only: the hooks import this and must stay fast.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: The folder, in a hierarchy, under which dxflow makes one cgroup per agent.
OWN_DIR = "dxflow"


@dataclass(frozen=True)
class Hierarchies:
    """The cgroup trees mounted on this host."""

    #: The v2 tree: the root itself on a pure v2 host, ``unified`` on a hybrid one, else None.
    v2: Path | None = None
    #: v1 controller -> its tree (a mount holding several controllers appears under each name).
    v1: dict[str, Path] = field(default_factory=dict)

    @property
    def pure_v2(self) -> bool:
        return self.v2 is not None and not self.v1


def hierarchies(root: Path = CGROUP_ROOT) -> Hierarchies:
    """What ``root`` holds: a v2 tree (``cgroup.controllers`` at its top), v1 trees (``tasks``), or both."""
    if (root / "cgroup.controllers").exists():
        return Hierarchies(v2=root)
    v2 = root / "unified" if (root / "unified" / "cgroup.controllers").exists() else None
    v1: dict[str, Path] = {}
    try:
        entries = sorted(root.iterdir())
    except OSError:
        entries = []
    for entry in entries:
        # cpu -> cpu,cpuacct style links name the same tree; the real folder lists every controller
        if entry.is_symlink() or entry.name == "unified" or not (entry / "tasks").exists():
            continue
        for name in entry.name.split(","):
            v1[name] = entry
    return Hierarchies(v2=v2, v1=v1)


def own_cgroup(h: Hierarchies, name: str) -> Path | None:
    """Where dxflow makes the cgroup of agent ``name``: in the v2 tree, else in v1's freezer; None without either."""
    base = h.v2 or h.v1.get("freezer")
    return base / OWN_DIR / name if base else None


def is_v2(cg: Path) -> bool:
    return (cg / "cgroup.freeze").exists() or (cg / "cgroup.kill").exists()


def create(cg: Path) -> None:
    """Make ``cg`` and its missing parents (root only)."""
    cg.mkdir(mode=0o755, parents=True, exist_ok=True)


def join(cg: Path, pid: int = 0) -> None:
    """Move ``pid`` (default: this process) into ``cg``; its children are born there from now on."""
    with open(cg / "cgroup.procs", "w") as f:
        f.write(f"{pid or os.getpid()}\n")


def members(cg: Path) -> set[int]:
    """Processes in ``cg`` itself (not its children); empty when it does not exist."""
    try:
        text = (cg / "cgroup.procs").read_text()
    except OSError:
        return set()
    return {int(x) for x in text.split()}


def subtree(cg: Path) -> list[Path]:
    """``cg`` and every cgroup below it, deepest first (the order to remove them in)."""
    found: list[Path] = []
    for top, dirs, _files in os.walk(cg, topdown=False):
        found.append(Path(top))
    return found if cg.is_dir() else []


def all_members(cg: Path) -> set[int]:
    """Processes in ``cg`` and below."""
    out: set[int] = set()
    for sub in subtree(cg):
        out |= members(sub)
    return out


def has_members(cg: Path) -> bool:
    return bool(members(cg))


def _write(path: Path, text: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(text)
        return True
    except OSError as e:
        log.debug("cannot write %r to %s: %s", text, path, e)
        return False


def _freeze(cg: Path, deadline: float) -> bool:
    """Freeze ``cg`` (and below) and wait, until ``deadline``, for the kernel to say it is frozen."""
    if (cg / "cgroup.freeze").exists():  # v2: cgroup.events says "frozen 1" once every process stopped
        if not _write(cg / "cgroup.freeze", "1"):
            return False
        while time.monotonic() < deadline:
            try:
                if "frozen 1" in (cg / "cgroup.events").read_text():
                    return True
            except OSError:
                return False
            time.sleep(0.005)
        return False
    if (cg / "freezer.state").exists():  # v1 freezer: FREEZING until every process stopped
        if not _write(cg / "freezer.state", "FROZEN"):
            return False
        while time.monotonic() < deadline:
            try:
                if (cg / "freezer.state").read_text().strip() == "FROZEN":
                    return True
            except OSError:
                return False
            time.sleep(0.005)
    return False


def _thaw(cg: Path) -> None:
    if (cg / "cgroup.freeze").exists():
        _write(cg / "cgroup.freeze", "0")
    elif (cg / "freezer.state").exists():
        _write(cg / "freezer.state", "THAWED")


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def kill(cg: Path, timeout: float = 2.0) -> set[int]:
    """SIGKILL every process in ``cg`` and below; return those still there after ``timeout`` seconds.

    ``cgroup.kill`` (v2) is atomic, forks in flight included. Elsewhere the cgroup is frozen
    first, so that no process can fork between the listing and the signal; the kill lands when
    the cgroup is thawed. A v1 cgroup without the freezer is killed in rounds until it is empty
    or the deadline passes. Never waits past ``timeout``.
    """
    deadline = time.monotonic() + timeout
    if not cg.is_dir():
        return set()
    if not ((cg / "cgroup.kill").exists() and _write(cg / "cgroup.kill", "1")):
        _freeze(cg, time.monotonic() + timeout / 2)
        _signal_all(all_members(cg), signal.SIGKILL)
        _thaw(cg)  # a frozen process dies only once thawed
    left = all_members(cg)
    while left and time.monotonic() < deadline:
        time.sleep(0.01)
        _signal_all(left, signal.SIGKILL)  # processes forked before the freeze held
        left = all_members(cg)
    return left


def remove(cg: Path, timeout: float = 1.0) -> bool:
    """Remove ``cg`` and the cgroups below it (they must be empty). True when it is gone.

    A cgroup whose last tasks were just killed refuses ``rmdir`` (EBUSY) until the kernel has
    finished their exit, which ``cgroup.procs`` no longer shows; so busy ones are retried until
    ``timeout`` seconds have passed, never longer.
    """
    deadline = time.monotonic() + timeout
    while True:
        busy = False
        for sub in subtree(cg):
            try:
                sub.rmdir()
            except FileNotFoundError:
                pass
            except OSError as e:
                busy = busy or e.errno == errno.EBUSY
                log.debug("cannot remove cgroup %s: %s", sub, e)
        if not busy or not cg.exists() or time.monotonic() >= deadline:
            return not cg.exists()
        time.sleep(0.02)


def init_path(v2: Path) -> str:
    """Where init (pid 1) sits in the v2 tree, as Slurm 24.11 reads it (``"/"`` at the root)."""
    try:
        for line in Path("/proc/1/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                path = line[3:].strip() or "/"
                return "/" if path == "/" else os.path.dirname(path)
    except OSError:
        pass
    return "/"


def of_process(pid: int) -> dict[str, str]:
    """``/proc/PID/cgroup`` as hierarchy -> path (``""`` is the v2 tree), as seen from this cgroup namespace."""
    out: dict[str, str] = {}
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        _num, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


def usable(cg: Path) -> bool:
    """The v1 cgroup ``cg`` exists and can take a process: a cpuset refuses one (ENOSPC) until its cpus and
    mems are set."""
    if not cg.is_dir():
        return False
    for name in ("cpuset.cpus", "cpuset.mems"):
        try:
            if not (cg / name).read_text().strip():
                return False
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return True


@dataclass(frozen=True)
class JobCgroups:
    """The job's own cgroups on this node, as its scheduler makes them: what the launcher waits for and joins.

    ``groups`` are alternatives (the layout differs between versions and builds of a scheduler), each
    a tuple of folders joined together. v1: one folder per controller. When the job is set up on this
    node depends on the scheduler: ``populated`` — once the group's first folder holds a process
    (Slurm makes the extern step's folders, writes their limits, and puts its ``sleep`` there last);
    otherwise once the folders exist (PBS's cgroup hook and Torque's pbs_mom write the limits as they
    make the folders, on every host of the job, before any prologue — a sister host gets a process
    there only with a task, maybe never). v2: one folder, joined once it exists.
    """

    groups: tuple[tuple[str, ...], ...]
    v2: bool
    wait: float  # seconds the launcher waits for them: they appear only after the prolog has returned
    populated: bool = True

    def ready(self) -> list[Path] | None:
        """The folders to join once the job is set up on this node, else None (not yet, or never)."""
        for group in self.groups:
            paths = [Path(d) for d in group]
            if not paths:
                continue
            if self.v2:  # (an empty cpuset.cpus in v2 means the parent's: no wait for it)
                if paths[0].is_dir():
                    return [p for p in paths if p.is_dir()]
            elif not self.populated:
                if usable(paths[0]) and all(usable(p) for p in paths if p.is_dir()):
                    return [p for p in paths if p.is_dir()]
            elif has_members(paths[0]):
                return [p for p in paths if p.is_dir()]
        return None

    def to_dict(self) -> dict:
        return {"groups": [list(g) for g in self.groups], "v2": self.v2, "wait": self.wait,
                "populated": self.populated}

    @classmethod
    def from_dict(cls, data: dict) -> "JobCgroups":
        return cls(groups=tuple(tuple(str(d) for d in g) for g in data.get("groups", ())),
                   v2=bool(data.get("v2")), wait=float(data.get("wait", 0)),
                   populated=bool(data.get("populated", True)))


Templates = Iterable[Iterable[str]]


def job_cgroups(mount: Path, v1: Templates, v2: Templates, wait: float, *, populated: bool = True,
                **fields: str) -> JobCgroups | None:
    """Fill a scheduler's templates (groups of paths relative to ``mount``, with ``{job}``, ``{uid}``...
    and, for v2, ``{init}``) for the kind of tree ``mount`` holds. None when there is nothing to wait for.
    ``populated``: see :class:`JobCgroups`."""
    if wait <= 0:
        return None
    is_v2 = (mount / "cgroup.controllers").exists()
    if is_v2:
        fields = {**fields, "init": init_path(mount).strip("/")}
    groups: dict[tuple[str, ...], None] = {}
    for group in (v2 if is_v2 else v1):
        groups[tuple(os.path.normpath(mount / t.format(**fields).lstrip("/")) for t in group)] = None
    return JobCgroups(tuple(groups), is_v2, wait, populated) if groups else None
