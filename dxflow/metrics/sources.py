"""What a job uses on this node, read from the kernel: its cgroup, its processes, and the node's totals.

Which processes are the job's: the members of the job's own cgroup on the node where the scheduler
makes one (Slurm with proctrack/cgroup: ``.../job_J``, steps included), else the user's processes
that carry the job's id in their environment (``SLURM_JOB_ID``, ``PBS_JOBID``, ``LSB_JOBID``), with
their descendants. In both cases only the job user's processes count (slurmstepd, root's, sits in
the same cgroup), and never the agent's own server (its arbiter and worker): what the agent runs for
the user (``dxflow exec``, a shell) is the user's work and counts.

Where figures come from, best first:

=============  =============================================  ==========================================
figure         cgroup (v1 / v2)                               else
=============  =============================================  ==========================================
CPU seconds    ``cpuacct.usage`` (ns) / ``cpu.stat`` usage_usec  the job's processes' utime+stime (/proc)
memory         ``memory.usage_in_bytes`` / ``memory.current``  —
memory peak    ``memory.max_usage_in_bytes`` / ``memory.peak``  the largest sampled RSS
RSS            —                                              sum of the processes' resident pages
cores          ``cpuset.effective_cpus`` / ``cpuset.cpus.effective``  CPU affinity of a job process
memory limit   ``memory.limit_in_bytes`` / ``memory.max``      —
disk I/O       —                                              ``/proc/PID/io`` read_bytes/write_bytes
network        —                                              the node's ``/proc/net/dev`` (not per job)
=============  =============================================  ==========================================

The cgroup CPU and memory include the agent, which runs inside the job's cgroup (issue #9); the
agent's own share is measured apart (``agent_*``) so that it can be told from the job's.

Counters of processes that come and go are summed as differences between samples. A process that
ends is waited for by its parent, and the kernel adds its CPU time and I/O to the parent's
(``cutime``/``cstime`` in /proc/PID/stat; /proc/PID/io): where the parent is one of the job's
processes, the ended one's last sample is taken off the parent's growth, so its last moments count
once, through the parent. What ends under a parent outside the job (the batch script under
slurmstepd) loses its last moments, up to ``metrics_interval``; the cgroup's figures never do.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from dxflow import jobcgroup

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
#: v1 controllers whose job folder lists the job's processes, best first.
MEMBER_CONTROLLERS = ("memory", "cpuacct", "pids", "freezer", "cpuset")
#: A cgroup "limit" at or above this is no limit (v1 writes 2**63 rounded down to a page).
NO_LIMIT = 2**62


def _read(path: Path | str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def count_cpus(text: str | None) -> int | None:
    """Number of CPUs in a cpuset list such as ``0-3,8,10-11``."""
    if not text or not text.strip():
        return None
    n = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        try:
            n += (int(hi) - int(lo) + 1) if hi else 1
        except ValueError:
            return None
    return n


# -- the job's cgroup ------------------------------------------------------------
def mounts(mountinfo: str) -> list[tuple[str, str, set[str]]]:
    """(root within the hierarchy, mount point, controllers; ``""`` for v2) of each cgroup mount."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        parts, rparts = left.split(), right.split()
        if not sep or len(parts) < 5 or not rparts:
            continue
        if rparts[0] == "cgroup2":
            out.append((parts[3], parts[4], {""}))
        elif rparts[0] == "cgroup" and len(rparts) >= 3:
            out.append((parts[3], parts[4], set(rparts[2].split(","))))
    return out


def locate(controller: str, path: str, mount_list: list[tuple[str, str, set[str]]]) -> Path | None:
    """The folder of cgroup ``path`` (as /proc/PID/cgroup says it) of ``controller`` (``""``: v2)."""
    for root, point, controllers in mount_list:
        if controller not in controllers:
            continue
        root = root.rstrip("/")
        if path == root or path.startswith(root + "/"):
            folder = Path(point + path[len(root):])
            if folder.is_dir():
                return folder
    return None


def job_folder(path: str, job: str) -> str | None:
    """The deepest ancestor of ``path`` (itself included) named after the job (``job_17``,
    ``17.server``…), None when there is none: the job's own cgroup holds all of its steps."""
    token = re.compile(rf"(^|[^0-9A-Za-z]){re.escape(job)}([^0-9A-Za-z]|$)")
    parts = path.rstrip("/").split("/")
    for i in range(len(parts), 0, -1):
        if token.search(parts[i - 1]):
            return "/".join(parts[:i]) or "/"
    return None


@dataclass
class JobCgroup:
    """The job's cgroup folders on this node: one per v1 controller, or the one v2 folder."""

    folders: dict[str, Path] = field(default_factory=dict)  # controller ("" for v2) -> folder

    @property
    def v2(self) -> Path | None:
        return self.folders.get("")

    def _file(self, controller: str, name: str) -> str | None:
        folder = self.v2 or self.folders.get(controller)
        return _read(folder / name) if folder else None

    def members(self) -> set[int]:
        for c in ("",) + MEMBER_CONTROLLERS:
            if c in self.folders:
                return jobcgroup.all_members(self.folders[c])
        return set()

    def cpu_seconds(self) -> float | None:
        if self.v2:
            text = _read(self.v2 / "cpu.stat") or ""
            m = re.search(r"^usage_usec (\d+)", text, re.M)
            return int(m.group(1)) / 1e6 if m else None
        ns = _int(self._file("cpuacct", "cpuacct.usage"))
        return ns / 1e9 if ns is not None else None

    def memory(self) -> tuple[int | None, int | None]:
        """(memory in use, peak) in bytes, page cache included as the limit counts it."""
        if self.v2:
            return _int(self._file("", "memory.current")), _int(self._file("", "memory.peak"))
        return (_int(self._file("memory", "memory.usage_in_bytes")),
                _int(self._file("memory", "memory.max_usage_in_bytes")))

    def memory_limit(self) -> int | None:
        text = self._file("", "memory.max") if self.v2 else self._file("memory", "memory.limit_in_bytes")
        value = _int(text) if text and text.strip() != "max" else None
        return value if value is not None and value < NO_LIMIT else None

    def cores(self) -> int | None:
        if self.v2:
            return count_cpus(self._file("", "cpuset.cpus.effective"))
        return count_cpus(self._file("cpuset", "cpuset.effective_cpus") or self._file("cpuset", "cpuset.cpus"))


def read_mounts() -> list[tuple[str, str, set[str]]]:
    """This process's cgroup mounts (:func:`mounts` of /proc/self/mountinfo)."""
    return mounts(_read("/proc/self/mountinfo") or "")


def find_job_cgroup(pid: int, job: str, mountinfo: str | None = None,
                    mount_list: list[tuple[str, str, set[str]]] | None = None) -> JobCgroup | None:
    """The job's cgroup as process ``pid`` sees it (``pid`` is in the job: the agent itself, or a job
    process), None when no folder of it is named after the job or none can be found on disk."""
    if mount_list is None:
        mount_list = mounts(mountinfo) if mountinfo is not None else read_mounts()
    found = JobCgroup()
    for controller, path in jobcgroup.of_process(pid).items():
        if jobcgroup.OWN_DIR in path.strip("/").split("/"):
            continue  # the cgroup dxflow made for the agent alone (named CLUSTER.JOB.NODE): not the job's
        top = job_folder(path, job)
        if top is None:
            continue
        folder = locate(controller, top, mount_list)
        if folder is not None:
            found.folders[controller] = folder
    return found if found.folders else None


# -- processes -------------------------------------------------------------------
@dataclass(frozen=True)
class ProcSample:
    pid: int
    ppid: int
    start: int          # clock ticks after boot: (pid, start) names a process
    uid: int
    cpu_seconds: float  # utime + stime
    children_cpu_seconds: float  # cutime + cstime: of the children it has waited for
    rss_bytes: int
    read_bytes: int | None
    write_bytes: int | None
    comm: bytes = b""   # the program's name: changes at exec, with the environment


def read_process(pid: int, uid: int | None = None) -> ProcSample | None:
    """One process's counters (None when it is gone, a zombie, or not ``uid``'s). Its I/O counters are
    read apart (:func:`with_io`): only the job's processes need them."""
    try:
        owner = os.stat(f"/proc/{pid}").st_uid
        if uid is not None and owner != uid:
            return None
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rindex(b")") + 2:].split()
    if rest[0] in (b"Z", b"X"):
        return None
    cpu = (int(rest[11]) + int(rest[12])) / CLOCK_TICKS
    children = (int(rest[13]) + int(rest[14])) / CLOCK_TICKS
    rss = int(rest[21]) * PAGE_SIZE
    return ProcSample(pid, int(rest[1]), int(rest[19]), owner, cpu, children, rss, None, None,
                      data[data.index(b"(") + 1:data.rindex(b")")])


def with_io(p: ProcSample) -> ProcSample:
    """``p`` with its storage I/O counters (None where /proc/PID/io cannot be read)."""
    io = _read(f"/proc/{p.pid}/io") or ""
    rb = re.search(r"^read_bytes: (\d+)", io, re.M)
    wb = re.search(r"^write_bytes: (\d+)", io, re.M)
    return replace(p, read_bytes=int(rb.group(1)) if rb else None, write_bytes=int(wb.group(1)) if wb else None)


def environ_has(pid: int, names: tuple[str, ...], job: str) -> bool:
    """Whether process ``pid``'s environment sets one of ``names`` to ``job`` (False if unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    wanted = {f"{n}={job}".encode() for n in names}
    return any(item in wanted for item in raw.split(b"\0"))


def environ(pid: int) -> dict[str, str]:
    """Process ``pid``'s environment (empty when unreadable: another user's, or gone)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return {}
    out = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def descendants(roots: set[int], parents: dict[int, int]) -> set[int]:
    """``roots`` and every process below them, given pid -> ppid."""
    children: dict[int, list[int]] = {}
    for pid, ppid in parents.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, ()))
    return out


# -- the node ----------------------------------------------------------------------
def node_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the node since boot, all CPUs."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is already in user time (proc(5)): leave it out of the total
    total = sum(fields[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def node_memory() -> tuple[int, int]:
    """(used, total) bytes: total less what is available (MemAvailable, as ``free`` shows it)."""
    values: dict[str, int] = {}
    for line in (_read("/proc/meminfo") or "").splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            values[key] = int(parts[0]) * 1024
    total = values.get("MemTotal", 0)
    return total - values.get("MemAvailable", values.get("MemFree", 0)), total


def node_network(text: str | None = None) -> tuple[int, int]:
    """(received, sent) bytes of the node's interfaces but loopback since they came up."""
    rx = tx = 0
    for line in (text if text is not None else _read("/proc/net/dev") or "").splitlines()[2:]:
        name, _, rest = line.partition(":")
        values = rest.split()
        if name.strip() == "lo" or len(values) < 9:
            continue
        rx += int(values[0])
        tx += int(values[8])
    return rx, tx
