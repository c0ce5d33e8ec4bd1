"""Jobs' live figures in Prometheus' text format (``prometheus-client`` writes it).

Names follow Prometheus' conventions: a ``dxflow_`` prefix, base units in the name (``_seconds``,
``_bytes``, ``_watts``, ``_celsius``, ``_ratio`` for 0–1), ``_total`` on counters. Labels: ``job``,
``node``, ``user`` on every series, ``gpu`` (the GPU's index, else its UUID) on GPU series. Node
figures (``dxflow_node_*``) are the whole node's, for context: other users' work counts there.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

CONTENT_TYPE = CONTENT_TYPE_LATEST
LABELS = ["job", "node", "user"]
GPU_LABELS = LABELS + ["gpu"]

#: (metric name, help, from the latest sample: its column, or from the summary: "summary.<key>")
GAUGES = (
    ("dxflow_job_cpu_cores", "Cores the job kept busy on the node over the last interval", "cpu_cores"),
    ("dxflow_job_cores_allocated", "Cores allocated to the job on the node", "summary.cores"),
    ("dxflow_job_memory_bytes", "The job's memory on the node (cgroup, page cache included; else RSS)", "memory_bytes"),
    ("dxflow_job_memory_peak_bytes", "Largest sampled memory of the job on the node", "summary.memory_peak_bytes"),
    ("dxflow_job_memory_limit_bytes", "Memory limit (request) of the job on the node", "summary.memory_limit_bytes"),
    ("dxflow_job_rss_bytes", "Resident memory of the job's processes on the node", "rss_bytes"),
    ("dxflow_job_processes", "The job's processes on the node", "processes"),
    ("dxflow_node_cpu_cores", "Cores busy on the whole node (every user)", "node_cpu_cores"),
    ("dxflow_node_memory_bytes", "Memory in use on the whole node (every user)", "node_memory_bytes"),
    ("dxflow_agent_cpu_cores", "Cores the dxflow agent itself kept busy", "agent_cpu_cores"),
    ("dxflow_agent_rss_bytes", "Resident memory of the dxflow agent itself", "agent_rss_bytes"),
    ("dxflow_job_sample_timestamp_seconds", "When the figures were sampled (Unix time)", "t"),
)
COUNTERS = (
    ("dxflow_job_cpu_seconds", "CPU seconds the job used on the node since its agent started", "summary.cpu_seconds"),
    ("dxflow_job_read_bytes", "Bytes the job's processes read from storage on the node", "read_bytes"),
    ("dxflow_job_write_bytes", "Bytes the job's processes wrote to storage on the node", "write_bytes"),
    ("dxflow_node_receive_bytes", "Bytes the node received (all interfaces but loopback) since the agent started", "node_rx_bytes"),
    ("dxflow_node_transmit_bytes", "Bytes the node sent since the agent started", "node_tx_bytes"),
)
#: per GPU: (name, help, column suffix, scale)
GPU_GAUGES = (
    ("dxflow_job_gpu_utilization_ratio", "Share of the last sample period a kernel ran on the GPU (0-1)",
     "utilization_percent", 0.01),
    ("dxflow_job_gpu_memory_bytes", "GPU memory in use", "memory_bytes", 1.0),
    ("dxflow_job_gpu_power_watts", "GPU power draw", "power_watts", 1.0),
    ("dxflow_job_gpu_temperature_celsius", "GPU temperature", "temperature_celsius", 1.0),
)


def _value(payload: dict, latest: dict, source: str) -> float | None:
    if source.startswith("summary."):
        v = payload.get("summary", {}).get(source[8:])
    else:
        v = latest.get(source)
    return None if v is None else float(v)


def latest_row(payload: dict) -> dict:
    """A node's newest sample by column name (empty without one)."""
    rows = payload.get("rows") or []
    return dict(zip(payload.get("columns", []), rows[-1])) if rows else {}


class JobsCollector(Collector):
    """The figures of the nodes given (``/api/metrics`` answers of agents), as metric families."""

    def __init__(self, payloads: Iterable[dict]) -> None:
        self.payloads = list(payloads)

    def collect(self) -> Iterator[Metric]:
        nodes = [(p, latest_row(p), [str(p.get("job", "")), str(p.get("node", "")), str(p.get("user", ""))])
                 for p in self.payloads]
        for name, doc, source in GAUGES:
            fam = GaugeMetricFamily(name, doc, labels=LABELS)
            for p, latest, labels in nodes:
                v = _value(p, latest, source)
                if v is not None:
                    fam.add_metric(labels, v)
            yield fam
        for name, doc, source in COUNTERS:
            fam_c = CounterMetricFamily(name, doc, labels=LABELS)
            for p, latest, labels in nodes:
                v = _value(p, latest, source)
                if v is not None:
                    fam_c.add_metric(labels, v)
            yield fam_c
        for name, doc, suffix, scale in GPU_GAUGES:
            fam = GaugeMetricFamily(name, doc, labels=GPU_LABELS)
            for p, latest, labels in nodes:
                for i, g in enumerate(p.get("gpus", [])):
                    v = latest.get(f"gpu{i}_{suffix}")
                    if v is not None:
                        fam.add_metric(labels + [_gpu_label(g)], float(v) * scale)
            yield fam
        energy = CounterMetricFamily("dxflow_job_gpu_energy_joules", "Energy the GPU used since the agent started",
                                     labels=GPU_LABELS)
        for p, _latest, labels in nodes:
            for g in p.get("summary", {}).get("gpus", []):
                if g.get("power_seconds"):
                    energy.add_metric(labels + [_gpu_label(g)], float(g.get("power_sum", 0.0)))
        yield energy


def _gpu_label(g: dict) -> str:
    return str(g["index"]) if g.get("index") is not None else str(g.get("uuid", ""))


def render(payloads: Iterable[dict]) -> bytes:
    """The text exposition of the given nodes' figures."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(JobsCollector(payloads))
    return generate_latest(registry)
