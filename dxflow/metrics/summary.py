"""What a node's samples add up to, and where that is written: the columns of the series, the
running totals and peaks of the job on the node (its part of the job's report), and the report files
in ``~/.dxflow/reports/``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dxflow.layout import UserLayout
from dxflow.metrics.gpus import GpuReading

#: (column, how it is downsampled) of every node, in base units.
BASE_COLUMNS = (
    ("cpu_cores", "mean"),              # cores the job kept busy over the interval (CPU seconds / second)
    ("cpu_seconds", "last"),            # the job's CPU seconds since the agent started
    ("memory_bytes", "max"),            # the job's cgroup memory (page cache included), else its RSS
    ("rss_bytes", "max"),               # resident memory of the job's processes
    ("processes", "max"),               # the job's processes (the user's, the agent's server not counted)
    ("read_bytes", "last"),             # bytes the job's processes read from storage, since the agent started
    ("write_bytes", "last"),            # bytes they wrote
    ("node_cpu_cores", "mean"),         # cores busy on the whole node (every user), for context
    ("node_memory_bytes", "max"),       # memory in use on the whole node
    ("node_rx_bytes", "last"),          # bytes received by the node's interfaces (not per job)
    ("node_tx_bytes", "last"),          # bytes sent
    ("agent_cpu_cores", "mean"),        # the agent's own server
    ("agent_rss_bytes", "max"),
)
#: per GPU i: ``gpu{i}_<name>``
GPU_COLUMNS = (("utilization_percent", "mean"), ("memory_bytes", "max"), ("power_watts", "mean"),
               ("temperature_celsius", "max"))


def columns(gpu_count: int) -> list[tuple[str, str]]:
    return list(BASE_COLUMNS) + [(f"gpu{i}_{name}", kind) for i in range(gpu_count) for name, kind in GPU_COLUMNS]


@dataclass
class GpuSummary:
    index: int | None
    uuid: str
    name: str = ""
    memory_total_bytes: float | None = None
    memory_peak_bytes: float | None = None
    utilization_sum: float = 0.0        # percent × seconds, for the mean over the time it was read
    utilization_seconds: float = 0.0
    utilization_max: float | None = None
    busy_seconds: float = 0.0           # time with utilisation above 0
    power_sum: float = 0.0              # watt-seconds (energy, joules)
    power_seconds: float = 0.0

    def add(self, g: GpuReading, dt: float) -> None:
        self.name = self.name or g.name
        if g.memory_total is not None:
            self.memory_total_bytes = g.memory_total
        if g.memory_used is not None:
            self.memory_peak_bytes = max(self.memory_peak_bytes or 0.0, g.memory_used)
        if g.utilization is not None:
            self.utilization_sum += g.utilization * dt
            self.utilization_seconds += dt
            self.utilization_max = max(self.utilization_max or 0.0, g.utilization)
            if g.utilization > 0:
                self.busy_seconds += dt
        if g.power is not None:
            self.power_sum += g.power * dt
            self.power_seconds += dt


@dataclass
class Summary:
    """One node's totals and peaks since the agent started: its part of the job's report."""

    job: str
    node: str
    user: str
    cluster: str
    scheduler: str
    interval: float
    started: float = 0.0                # first sample (epoch s)
    last: float = 0.0                   # newest sample
    samples: int = 0
    cores: int | None = None            # cores allocated to the job here
    cores_source: str = ""
    memory_limit_bytes: int | None = None  # memory requested (the cgroup's limit) here
    cpu_seconds: float = 0.0
    cpu_source: str = ""                # "cgroup" or "processes"
    memory_peak_bytes: float = 0.0      # largest sampled figure of memory_bytes
    memory_cgroup_peak_bytes: int | None = None  # the kernel's own peak (catches spikes between samples)
    rss_peak_bytes: float = 0.0
    processes_max: int = 0
    read_bytes: float = 0.0
    write_bytes: float = 0.0
    idle_seconds: float = 0.0
    agent_cpu_seconds: float = 0.0
    agent_rss_peak_bytes: float = 0.0
    gpu_reader: str = ""
    gpus: list[GpuSummary] = field(default_factory=list)
    final: bool = False                 # written as the agent stopped or the job's processes ended here

    def to_dict(self) -> dict:
        return asdict(self)


def reports_dir(home: Path) -> Path:
    """``~/.dxflow/reports``: ``JOB.json`` (a whole job's report) and ``JOB/NODE.json`` (its nodes' parts)."""
    return UserLayout.of(home).reports_dir


def safe_name(text: str) -> str:
    """A job or node name as one file name: ``/`` and a leading ``.`` are not kept."""
    return text.replace("/", "_").lstrip(".") or "_"


def report_dir(home: Path, job: str) -> Path:
    """``~/.dxflow/reports/JOB``: the folder of the job's per-node parts."""
    return reports_dir(home) / safe_name(job)


def write_json(path: Path, data: dict) -> None:
    """Write ``path`` whole or not at all (0600; a reader never sees half a file)."""
    path.parent.parent.mkdir(mode=0o700, exist_ok=True)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)
