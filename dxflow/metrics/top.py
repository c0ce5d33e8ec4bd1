"""What the job runs on this node right now, for ``dxflow top`` and the console's job view (issue #15).

The agent's ``/api/top`` answers with the node's row (the job's CPU, memory and GPUs now, the node's
load) and the job's busiest processes. A process's CPU is its CPU time's growth between two looks:
this look and the newest earlier one at least :data:`MIN_WINDOW` seconds old, so that two viewers
asking a moment apart (a terminal and the console) still get figures over a window long enough for
the kernel's clock ticks (10 ms) to add up; the very first look measures over :data:`FIRST_WINDOW`.

Which processes are the job's is the sampler's word (:mod:`dxflow.metrics.sampler`: the job's cgroup,
else the job's environment): the same processes ``dxflow metrics`` counts, the agent's own left out.
CPU is given as ``top`` gives it: 100 is one core busy.
"""

from __future__ import annotations

import os
import pwd
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from dxflow.metrics import sources

#: Seconds a look's CPU figures are measured over at the least (when an older look is kept).
MIN_WINDOW = 1.0
#: Seconds the first look waits to measure CPU (no earlier look to compare with).
FIRST_WINDOW = 0.25
#: Looks kept to compare with: older than this many seconds they are forgotten.
KEEP = 30.0
#: The most processes one answer lists.
MAX_PROCESSES = 50
#: Characters of a command line kept (arguments can be long: a list of input files).
COMMAND_MAX = 256
#: Sort keys of processes, as ``dxflow top`` names them.
PROCESS_SORTS = ("cpu", "memory")


@dataclass(frozen=True)
class Look:
    """One look at the job's processes: when, each one's CPU seconds by (pid, start), the cgroup's,
    and the agent's own (it runs in the job's cgroup, issue #9: its CPU is not the job's)."""

    t: float
    cpu: dict[tuple[int, int], float]
    cgroup_cpu: float | None
    agent_cpu: dict[tuple[int, int], float]


def command_line(pid: int, comm: bytes) -> str:
    """The process's command line (its name in brackets when it has none: a kernel-like thread)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(COMMAND_MAX * 4)
    except OSError:
        raw = b""
    text = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return (text or f"[{comm.decode(errors='replace')}]")[:COMMAND_MAX]


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


class Top:
    """The job's processes on this node, with CPU rates between looks. Safe to share between threads."""

    def __init__(self, job_pids: Callable[[], set[int]], cgroup: Callable[[], sources.JobCgroup | None],
                 agent_pids: Callable[[], set[int]], uid: int | None = None) -> None:
        self.job_pids = job_pids
        self.cgroup = cgroup
        self.agent_pids = agent_pids
        self.uid = os.getuid() if uid is None else uid
        self._looks: list[Look] = []
        self._lock = threading.Lock()

    def _look(self) -> tuple[Look, dict[int, sources.ProcSample]]:
        procs = {}
        for pid in self.job_pids():
            p = sources.read_process(pid, self.uid)
            if p is not None:
                procs[pid] = p
        agent = [p for p in map(sources.read_process, self.agent_pids()) if p is not None]
        cg = self.cgroup()
        return (Look(time.time(), {(p.pid, p.start): p.cpu_seconds for p in procs.values()},
                     cg.cpu_seconds() if cg is not None else None,
                     {(p.pid, p.start): p.cpu_seconds for p in agent}), procs)

    def _baseline(self, now: float) -> Look | None:
        """The newest kept look at least MIN_WINDOW old, else the oldest kept one (None: none kept)."""
        old = [look for look in self._looks if now - look.t >= MIN_WINDOW]
        return old[-1] if old else (self._looks[0] if self._looks else None)

    def processes(self, n: int = 10, sort: str = "cpu") -> dict:
        """The job's ``n`` busiest processes (by ``sort``: cpu or memory), its CPU in cores over the
        same window, and how many processes it has here."""
        with self._lock:
            look, procs = self._look()
            base = self._baseline(look.t)
            if base is None or look.t - base.t <= 0:
                self._looks.append(look)
                time.sleep(FIRST_WINDOW)
                base = look
                look, procs = self._look()
            self._looks = [old for old in self._looks if look.t - old.t <= KEEP] + [look]
        dt = look.t - base.t
        rows: list[dict[str, Any]] = []
        for p in procs.values():
            # a process younger than the window: its whole CPU time is within it
            grew = p.cpu_seconds - base.cpu.get((p.pid, p.start), 0.0)
            rows.append({"pid": p.pid, "ppid": p.ppid, "user": user_name(p.uid),
                         "cpu_percent": round(max(0.0, grew) / dt * 100, 1) if dt > 0 else 0.0,
                         "memory_bytes": p.rss_bytes, "name": p.comm.decode(errors="replace")})
        key = "memory_bytes" if sort == "memory" else "cpu_percent"
        rows.sort(key=lambda r: (-r[key], r["pid"]))
        if look.cgroup_cpu is not None and base.cgroup_cpu is not None and dt > 0:
            agent = sum(max(0.0, cpu - base.agent_cpu.get(k, cpu)) for k, cpu in look.agent_cpu.items())
            cores = max(0.0, look.cgroup_cpu - base.cgroup_cpu - agent) / dt
            source = "cgroup"
        else:  # no cgroup: the processes' sum (what ended within the window is not in it)
            cores = sum(r["cpu_percent"] for r in rows) / 100
            source = "processes"
        rows = rows[:max(0, min(n, MAX_PROCESSES))]
        for r in rows:  # only the shown ones' command lines are read
            r["command"] = command_line(r["pid"], r["name"].encode())
        return {"processes": rows, "process_count": len(procs),
                "rss_bytes": sum(p.rss_bytes for p in procs.values()), "cpu_cores": round(cores, 3),
                "cpu_source": source, "window": round(dt, 3)}
