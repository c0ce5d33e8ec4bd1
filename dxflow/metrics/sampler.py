"""The agent's sampling of its job on its node: every ``metrics_interval`` seconds, one sample.

A sample turns the kernel's counters (:mod:`~dxflow.metrics.sources`) and the job's GPUs
(:mod:`~dxflow.metrics.gpus`) into figures in base units (seconds, bytes, watts, °C), adds them to
the node's :class:`~dxflow.metrics.history.History` and to a running
:class:`~dxflow.metrics.summary.Summary` (totals and peaks over the job's whole life, at full
resolution, which the report is made of).

The summary is written as the node's part of the job's report, ``~/.dxflow/reports/JOB/NODE.json``:
every :data:`REPORT_EVERY` seconds, at once when the job's last process on the node ends, and when the
agent stops. At the job's end the scheduler ends the agent with the job (Slurm: its extern step; the
epilog SIGKILLs what is left): the sampler watches the job's processes between samples (pidfd) and
samples at once when the last one ends, so the report's end is written before; the writes every
:data:`REPORT_EVERY` seconds bound what a crash loses.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from pathlib import Path
from typing import Callable

from dxflow.metrics import sources
from dxflow.metrics.gpus import GpuReader
from dxflow.metrics.history import History
from dxflow.metrics.summary import GPU_COLUMNS, GpuSummary, Summary, columns, report_dir, safe_name, write_json

log = logging.getLogger(__name__)

#: Seconds between writes of the node's report part while the job runs: each is a file written on the
#: shared home by every node of the job, so rarely (issue #11: load on the shared file system must not
#: grow with the fleet); the end of the job writes it at once anyway.
REPORT_EVERY = 600.0
#: Job processes watched for their end between samples (the oldest: a job's main processes).
WATCH_MAX = 64
#: Processes remembered as looked at for the job's cgroup (then forgotten, and looked at again).
CG_TRIED_MAX = 10000
#: Seconds between looks at whether sampling was stopped, while waiting.
STOP_CHECK = 0.5
#: Below this many cores busy (and no GPU busy) a sample counts as idle time.
IDLE_CORES = 0.05

def job_cpu_of(p: sources.ProcSample) -> float:
    """A job process's CPU seconds, with those of the children it has waited for."""
    return p.cpu_seconds + p.children_cpu_seconds


class Sampler:
    """Samples one job on one node. ``tick`` takes one sample; ``run`` loops in a thread until ``stop``."""

    def __init__(self, *, job: str, node: str, user: str, cluster: str, scheduler: str, home: Path,
                 job_env_names: tuple[str, ...], interval: float,
                 gpu_allocation: Callable[[set[int]], list[str] | None],
                 agent_pids: Callable[[], set[int]], gpu_path: str | None = None,
                 report_every: float = REPORT_EVERY) -> None:
        self.job, self.node = job, node
        self.home = home
        self.uid = os.getuid()
        self.job_env_names = job_env_names
        self.interval = interval
        self.agent_pids = agent_pids
        self.report_every = report_every
        self.gpu_allocation = gpu_allocation
        self.gpu_path = gpu_path
        self.gpu_reader = GpuReader([], path=gpu_path)
        self.gpus_known = False
        self.gpu_count = 0
        self.history = History(columns(0), interval)
        self.summary = Summary(job=job, node=node, user=user, cluster=cluster, scheduler=scheduler,
                               interval=interval)
        self.cgroup: sources.JobCgroup | None = None
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self._prev: dict[tuple[int, int], sources.ProcSample] = {}
        self._env_checked: dict[tuple[int, int, bytes], bool] = {}
        self._cg_cpu: float | None = None
        self._node_cpu: tuple[float, float] | None = None
        self._net0: tuple[int, int] | None = None
        self._t: float | None = None
        self._written = 0.0
        self._had_processes = False
        self._agent_in_cgroup = False
        self._pids: set[int] = set()        # the job's processes at the last sample
        self._last_gpus: list[dict] = []
        self._cg_tried: set[int] = set()    # processes whose cgroups were looked at for the job's

    # -- which processes ---------------------------------------------------------------
    def _find_cgroup(self, candidates: list[int]) -> None:
        """Look for the job's cgroup from processes not looked from yet (the agent first, then job
        processes as they appear: where a scheduler makes none, a few reads per new process)."""
        fresh = [pid for pid in candidates if pid not in self._cg_tried]
        if not fresh:
            return
        if len(self._cg_tried) > CG_TRIED_MAX:  # bounded: a pid looked at again costs a few reads
            self._cg_tried.clear()
        mount_list = sources.read_mounts()
        for pid in fresh:
            self._cg_tried.add(pid)
            self.cgroup = sources.find_job_cgroup(pid, self.job, mount_list=mount_list)
            if self.cgroup:
                log.info("job %s: sampling its cgroup %s", self.job,
                         ", ".join(str(p) for p in self.cgroup.folders.values()))
                return

    def _job_pids(self, procs: dict[int, sources.ProcSample]) -> set[int]:
        """The job's processes of the user, the agent's server left out."""
        agent = self.agent_pids()
        if self.cgroup is not None:
            members = self.cgroup.members()
            self._agent_in_cgroup = bool(agent & members)
            return {p for p in members if p in procs and p not in agent}
        marked = set()
        for pid, p in procs.items():
            if pid in agent:
                continue
            key = (pid, p.start, p.comm)  # an exec (same pid and start) brings a new environment
            if key not in self._env_checked:
                self._env_checked[key] = sources.environ_has(pid, self.job_env_names, self.job)
            if self._env_checked[key]:
                marked.add(pid)
        # only processes still there are remembered: a long job starts millions
        self._env_checked = {k: v for k, v in self._env_checked.items()
                             if k[0] in procs and procs[k[0]].start == k[1]}
        parents = {pid: p.ppid for pid, p in procs.items()}
        return sources.descendants(marked, parents) - agent

    def _user_procs(self) -> dict[int, sources.ProcSample]:
        """The user's processes worth a look: once the job's cgroup is known, its members and the
        agent's own (nothing else on the node is read: a busy node has thousands of processes, and a
        sample every 2 s must stay cheap); before that, every process of /proc."""
        if self.cgroup is not None:
            candidates = self.cgroup.members() | self.agent_pids()
        else:
            candidates = {int(entry) for entry in os.listdir("/proc") if entry.isdigit()}
        out = {}
        for pid in candidates:
            p = sources.read_process(pid, self.uid)
            if p is not None:
                out[p.pid] = p
        return out

    # -- one sample ------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> dict[str, float | None]:
        """Take one sample now; returns it by column name."""
        now = time.time() if now is None else now
        procs = self._user_procs()
        pids = self._job_pids(procs)
        if self.cgroup is None:
            self._find_cgroup([os.getpid()] + sorted(pids))
            if self.cgroup is not None:
                pids = self._job_pids(procs)
        agent = self.agent_pids() & set(procs)
        for pid in pids:
            procs[pid] = sources.with_io(procs[pid])
        dt = now - self._t if self._t is not None else 0.0
        s = self.summary

        proc_cpu = self._growth(procs, pids, job_cpu_of)
        agent_cpu = self._growth(procs, agent, lambda p: p.cpu_seconds)
        cg_cpu = self.cgroup.cpu_seconds() if self.cgroup else None
        if cg_cpu is not None:
            # the agent runs in the job's cgroup (issue #9): its own CPU is not the job's
            own = agent_cpu if self._agent_in_cgroup else 0.0
            job_cpu = max(0.0, cg_cpu - self._cg_cpu - own) if self._cg_cpu is not None else 0.0
            self._cg_cpu = cg_cpu
            s.cpu_source = "cgroup"
        else:
            job_cpu = proc_cpu
            s.cpu_source = "processes"
        read_b = self._growth(procs, pids, lambda p: p.read_bytes)
        write_b = self._growth(procs, pids, lambda p: p.write_bytes)
        rss = float(sum(procs[p].rss_bytes for p in pids))
        cg_mem, cg_peak = self.cgroup.memory() if self.cgroup else (None, None)
        memory = float(cg_mem) if cg_mem is not None else rss
        agent_rss = float(sum(procs[p].rss_bytes for p in agent))
        self._prev = {(pid, p.start): p for pid, p in procs.items() if pid in pids or pid in agent}

        busy, total = sources.node_cpu()
        node_cores = None
        if self._node_cpu is not None and total > self._node_cpu[1]:
            node_cores = (busy - self._node_cpu[0]) / (total - self._node_cpu[1]) * (os.cpu_count() or 1)
        self._node_cpu = (busy, total)
        node_mem, _node_total = sources.node_memory()
        rx, tx = sources.node_network()
        if self._net0 is None:
            self._net0 = (rx, tx)
        if not self.gpus_known:
            self._learn_gpus(pids)
        gpus = self.gpu_reader.read()

        with self.lock:
            if not s.samples:
                s.started = now
            if not s.cores or (self.cgroup is not None and s.cores_source != "cgroup cpuset"):
                self._locate_allocation(pids)  # until known: no job process yet, or the cgroup found late
            s.samples += 1
            s.last = now
            s.cpu_seconds += job_cpu
            s.read_bytes += read_b
            s.write_bytes += write_b
            s.agent_cpu_seconds += agent_cpu
            s.memory_peak_bytes = max(s.memory_peak_bytes, memory)
            if cg_peak is not None:
                s.memory_cgroup_peak_bytes = cg_peak
            s.rss_peak_bytes = max(s.rss_peak_bytes, rss)
            s.agent_rss_peak_bytes = max(s.agent_rss_peak_bytes, agent_rss)
            s.processes_max = max(s.processes_max, len(pids))
            s.gpu_reader = self.gpu_reader.how
            if not s.gpus:
                s.gpus = [GpuSummary(index=g.index, uuid=g.uuid, name=g.name) for g in gpus]
            for summary, g in zip(s.gpus, gpus):
                summary.add(g, dt)
            cores = job_cpu / dt if dt > 0 else None
            if dt > 0 and (cores or 0.0) < IDLE_CORES and not any((g.utilization or 0) > 0 for g in gpus):
                s.idle_seconds += dt
            values: list[float | None] = [
                cores, s.cpu_seconds, memory, rss, float(len(pids)), s.read_bytes, s.write_bytes,
                node_cores, float(node_mem), float(rx - self._net0[0]), float(tx - self._net0[1]),
                agent_cpu / dt if dt > 0 else None, agent_rss]
            for i in range(self.gpu_count):
                if i < len(gpus):
                    values += [gpus[i].utilization, gpus[i].memory_used, gpus[i].power, gpus[i].temperature]
                else:
                    values += [None] * len(GPU_COLUMNS)
            self.history.add(now, values)
            self._last_gpus = [g.to_dict() for g in gpus]
        self._t = now
        self._pids = pids
        ended_here = self._had_processes and not pids
        self._had_processes = self._had_processes or bool(pids)
        if ended_here or now - self._written >= self.report_every:
            self.write_report(final=ended_here)
        return dict(zip(["t", *self.history.names], [now, *values]))

    def _growth(self, procs: dict[int, sources.ProcSample], pids: set[int],
                figure: Callable[[sources.ProcSample], float | None]) -> float:
        """How much a counter of the processes ``pids`` grew since the last sample (sources' docstring)."""
        total = 0.0
        for pid in pids:
            p = procs[pid]
            now_v = figure(p)
            if now_v is None:
                continue
            before = self._prev.get((pid, p.start))
            then_v = figure(before) if before is not None else None
            if then_v is None:
                # new since the last sample: all of it is the job's; at the first sample, none (its past
                # is before the agent's)
                then_v = 0.0 if self._t is not None else now_v
            total += now_v - then_v
        # An ended process was waited for by its parent, whose figure now holds its whole count; a parent
        # that ended too passed both on to its own parent, and so on up. What was already counted of each
        # is taken off where the chain reaches a job process that lives on (and was sampled before).
        ended = {pid: before for (pid, start), before in self._prev.items()
                 if not (pid in procs and procs[pid].start == start)}
        for pid, before in ended.items():
            up, seen = before.ppid, {pid}
            while up in ended and up not in seen:
                seen.add(up)
                up = ended[up].ppid
            if up in pids and (up, procs[up].start) in self._prev:
                last = figure(before)
                if last is not None:
                    total -= last
        return max(0.0, total)

    def _learn_gpus(self, pids: set[int]) -> None:
        """The job's GPUs, once known: from the agent's environment at once, else from a job process's
        (the prolog runs before any); the series gains their columns from then on."""
        wanted = self.gpu_allocation(pids)
        if wanted is None and not pids:
            return  # no job process yet to ask: again next time
        self.gpus_known = True
        if not wanted:
            return
        with self.lock:
            old = self.history.rows()
            self.gpu_reader = GpuReader(wanted, path=self.gpu_path)
            self.gpu_count = len(wanted)
            self.history = History(columns(self.gpu_count), self.interval)
            for row in old:
                self.history.add(row[0], row[1:] + [None] * (len(GPU_COLUMNS) * self.gpu_count))
        log.info("job %s: GPUs %s", self.job, ",".join(wanted))

    def _locate_allocation(self, pids: set[int]) -> None:
        """Cores and memory the job was given here: its cgroup's cpuset and limit, else a job process's
        CPU affinity (no memory figure then)."""
        s = self.summary
        if self.cgroup is not None:
            s.cores = self.cgroup.cores()
            s.cores_source = "cgroup cpuset" if s.cores else ""
            s.memory_limit_bytes = self.cgroup.memory_limit()
        if not s.cores:
            for pid in sorted(pids):
                try:
                    s.cores, s.cores_source = len(os.sched_getaffinity(pid)), "CPU affinity"
                    break
                except OSError:
                    continue

    # -- the report part and the loop ---------------------------------------------------------
    def report_path(self) -> Path:
        return report_dir(self.home, self.job) / f"{safe_name(self.node)}.json"

    def write_report(self, final: bool = False) -> None:
        with self.lock:
            if not self.summary.samples:
                return
            self.summary.final = final or self.summary.final
            data = self.summary.to_dict()
        self._written = time.time()
        try:
            write_json(self.report_path(), data)
        except OSError as e:
            log.warning("cannot write the report of job %s: %s", self.job, e)

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - sampling must go on; the log says why
                log.exception("sampling job %s", self.job)
            self.wait(self.interval)

    def wait(self, timeout: float) -> None:
        """Wait ``timeout`` seconds, or less: until every job process seen at the last sample has
        ended. The scheduler kills the agent with the rest of the job right after the job's last
        process ends (Slurm: its extern step); sampling at once is what gets the report's end written."""
        deadline = time.monotonic() + timeout
        fds: list[int] = []
        for pid in sorted(self._pids)[:WATCH_MAX]:
            try:
                fds.append(os.pidfd_open(pid))  # readable once the process has ended (Linux 5.3)
            except (OSError, AttributeError):
                continue
        try:
            if not fds:
                self.stopped.wait(timeout)
                return
            poller = select.poll()
            for fd in fds:
                poller.register(fd, select.POLLIN)
            alive = len(fds)
            while alive and not self.stopped.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                for fd, _event in poller.poll(min(left, STOP_CHECK) * 1000):
                    poller.unregister(fd)
                    alive -= 1
        finally:
            for fd in fds:
                os.close(fd)

    def stop(self) -> None:
        """Stop sampling and write the report part as final (the agent is stopping)."""
        self.stopped.set()
        self.write_report(final=True)

    def job_processes(self) -> set[int]:
        """The job's processes now (``dxflow top``): its cgroup's members but the agent's server, else
        the ones of the newest sample."""
        if self.cgroup is not None:
            return self.cgroup.members() - self.agent_pids()
        return set(self._pids)

    def last_gpus(self) -> list[dict]:
        """The job's GPUs as the newest sample read them."""
        with self.lock:
            return [dict(g) for g in self._last_gpus]

    def payload(self, since: float = 0.0) -> dict:
        """What ``/api/metrics`` answers: the series from ``since``, the columns, the summary so far."""
        with self.lock:
            rows = self.history.rows(since)
            return {"job": self.job, "node": self.node, "user": self.summary.user, "interval": self.interval,
                    "columns": ["t", *self.history.names], "rows": rows,
                    "gpus": [{"index": g.index, "uuid": g.uuid, "name": g.name} for g in self.summary.gpus],
                    "summary": self.summary.to_dict(), "history_bytes": self.history.nbytes()}
