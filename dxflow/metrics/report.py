"""A job's efficiency report: its nodes' summaries merged, set against what it was given, with notes.

Like ``seff``, but from what the job's agents measured on every node (not from accounting's averages):

- CPU efficiency = CPU seconds used on all nodes / (cores allocated × wall time), summed per node
  (a node's wall time is the span its agent sampled: the job's life on that node);
- memory: the job's processes' resident memory at its sampled peak (as ``seff``'s MaxRSS; the
  cgroup's own peak, which also holds the agent and the page cache, is given beside it), each node's
  against its memory limit (the cgroup's: what was requested); the fullest node decides;
- each GPU: mean and highest utilisation, the share of time it was busy, its memory peak against its
  memory, energy;
- idle time: the time no core (above :data:`~dxflow.metrics.sampler.IDLE_CORES`) nor GPU was busy.

Notes say in plain words what is off; thresholds are data (:data:`THRESHOLDS`) for a site to read.
"""

from __future__ import annotations

from typing import Any

#: When a note is made. Figures are fractions.
THRESHOLDS = {
    "cpu_low": 0.5,          # CPU efficiency below this: "only N % of the CPU time allocated was used"
    "memory_low": 0.25,      # memory peak below this share of the request: "memory peak was N % of …"
    "memory_high": 0.9,      # above this: close to the limit (the job risks being killed)
    "gpu_unused": 0.0,       # a GPU whose highest utilisation is at most this was never used
    "gpu_low": 0.3,          # mean utilisation below this (of the time read)
    "idle_high": 0.25,       # idle share of the wall time above this
}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def merge(parts: list[dict]) -> dict:
    """One job's report from its nodes' summaries (``~/.dxflow/reports/JOB/NODE.json``)."""
    if not parts:
        raise ValueError("no node of the job has reported")
    parts = sorted(parts, key=lambda p: p.get("node", ""))
    nodes = []
    cpu_used = cpu_avail = 0.0
    cores_known = True  # on every node
    gpus = []
    for p in parts:
        wall = max(0.0, float(p.get("last", 0)) - float(p.get("started", 0)))
        cores = p.get("cores")
        if cores:
            cpu_avail += cores * wall
        else:
            cores_known = False
        cpu_used += float(p.get("cpu_seconds", 0.0))
        limit = p.get("memory_limit_bytes")
        # the job's processes' resident memory, as seff's MaxRSS: the cgroup's figure also holds the
        # agent (it runs in the job's cgroup) and the page cache, and is shown beside it
        peak = float(p.get("rss_peak_bytes") or 0.0)
        nodes.append({
            "node": p["node"], "wall_seconds": wall, "cores": cores, "cpu_seconds": p.get("cpu_seconds", 0.0),
            "cpu_efficiency": (p.get("cpu_seconds", 0.0) / (cores * wall)) if cores and wall > 0 else None,
            "memory_peak_bytes": peak, "memory_limit_bytes": limit,
            "memory_cgroup_peak_bytes": p.get("memory_cgroup_peak_bytes") or p.get("memory_peak_bytes"),
            "memory_efficiency": peak / limit if limit else None,
            "rss_peak_bytes": p.get("rss_peak_bytes"), "processes_max": p.get("processes_max"),
            "read_bytes": p.get("read_bytes", 0.0), "write_bytes": p.get("write_bytes", 0.0),
            "idle_seconds": p.get("idle_seconds", 0.0), "cpu_source": p.get("cpu_source", ""),
            "final": bool(p.get("final")), "agent_cpu_seconds": p.get("agent_cpu_seconds", 0.0),
            "agent_rss_peak_bytes": p.get("agent_rss_peak_bytes", 0.0),
        })
        for g in p.get("gpus", []):
            seconds = g.get("utilization_seconds") or 0.0
            total = g.get("memory_total_bytes")
            gpus.append({
                "node": p["node"], "index": g.get("index"), "uuid": g.get("uuid", ""), "name": g.get("name", ""),
                "utilization_mean": (g["utilization_sum"] / seconds / 100) if seconds else None,
                "utilization_max": None if g.get("utilization_max") is None else g["utilization_max"] / 100,
                "busy_share": (g.get("busy_seconds", 0.0) / wall) if wall > 0 and seconds else None,
                "memory_peak_bytes": g.get("memory_peak_bytes"), "memory_total_bytes": total,
                "memory_efficiency": (g["memory_peak_bytes"] / total) if total and g.get("memory_peak_bytes") is not None else None,
                "energy_joules": g.get("power_sum") or None,
            })
    wall_total = sum(n["wall_seconds"] for n in nodes)
    first = parts[0]
    report: dict[str, Any] = {
        "job": first["job"], "user": first.get("user", ""), "cluster": first.get("cluster", ""),
        "scheduler": first.get("scheduler", ""),
        "started": min(float(p.get("started", 0)) for p in parts), "ended": max(float(p.get("last", 0)) for p in parts),
        "complete": all(n["final"] for n in nodes),
        "nodes": nodes, "gpus": gpus,
        "cores": sum(n["cores"] or 0 for n in nodes) if cores_known else None,
        "cpu_seconds": cpu_used,
        "cpu_efficiency": cpu_used / cpu_avail if cores_known and cpu_avail > 0 else None,
        "cores_known": cores_known,
        "memory_peak_bytes": sum(n["memory_peak_bytes"] for n in nodes),
        "memory_limit_bytes": (sum(n["memory_limit_bytes"] for n in nodes)
                               if all(n["memory_limit_bytes"] for n in nodes) else None),
        "idle_share": (sum(n["idle_seconds"] for n in nodes) / wall_total) if wall_total > 0 else None,
    }
    effs = [n["memory_efficiency"] for n in nodes if n["memory_efficiency"] is not None]
    report["memory_efficiency"] = max(effs) if effs else None  # the tightest node decides
    report["wall_seconds"] = report["ended"] - report["started"]
    report["notes"] = notes(report)
    return report


def notes(r: dict) -> list[str]:
    """Plain words about what is off in report ``r``."""
    t = THRESHOLDS
    out = []
    if not r["complete"]:
        out.append("the job may still run, or an agent was stopped before it could write its last "
                   "figures: this report covers what was sampled until then")
    if r["cpu_efficiency"] is not None and r["cpu_efficiency"] < t["cpu_low"]:
        out.append(f"only {_pct(r['cpu_efficiency'])} of the CPU time allocated was used "
                   f"({r['cores']} cores): ask for fewer cores, or check that the program runs in parallel")
    if not r["cores_known"]:
        out.append("the cores allocated are not known on every node: no CPU efficiency")
    for n in r["nodes"]:
        eff = n["memory_efficiency"]
        if eff is None:
            continue
        where = f" on {n['node']}" if len(r["nodes"]) > 1 else ""
        if eff < t["memory_low"]:
            out.append(f"memory peak{where} was {_pct(eff)} of what was requested")
        elif eff > t["memory_high"]:
            out.append(f"memory peak{where} was {_pct(eff)} of what was requested: close to the limit")
    if r["memory_limit_bytes"] is None:
        out.append("no memory limit was set for the job: nothing to compare its memory peak with")
    gpus = r["gpus"]
    unused = [g for g in gpus if g["utilization_max"] is not None and g["utilization_max"] <= t["gpu_unused"]]
    if unused:
        out.append(f"{len(unused)} of {len(gpus)} GPUs were never used")
    low = [g for g in gpus if g not in unused and g["utilization_mean"] is not None
           and g["utilization_mean"] < t["gpu_low"]]
    for g in low:
        out.append(f"GPU {g['index'] if g['index'] is not None else g['uuid']} on {g['node']} was busy "
                   f"{_pct(g['utilization_mean'])} of the time on average")
    unread = [g for g in gpus if g["utilization_max"] is None]
    if unread:
        out.append(f"{len(unread)} GPU(s) could not be read (a MIG device, or no NVML / nvidia-smi on the node)")
    if r["idle_share"] is not None and r["idle_share"] > t["idle_high"]:
        out.append(f"the job was idle (no core nor GPU busy) {_pct(r['idle_share'])} of its time")
    return out


def human_bytes(n: float | None, decimals: int = 2) -> str:
    """``n`` bytes in binary units ("1.50 GiB"), with ``decimals`` digits past the point; "-" for None."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.{decimals}f} {unit}"
        n /= 1024
    return f"{n:.{decimals}f} TiB"


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 86400}-{s % 86400 // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 86400 else \
        f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _memory_line(r: dict) -> str:
    if r["memory_efficiency"] is None:
        return "- (no memory limit)"
    if len(r["nodes"]) == 1:
        return f"{_pct(r['memory_efficiency'])} of {human_bytes(r['memory_limit_bytes'])}"
    n = max((n for n in r["nodes"] if n["memory_efficiency"] is not None), key=lambda n: n["memory_efficiency"])
    return (f"{_pct(n['memory_efficiency'])} on {n['node']}, the fullest node "
            f"({human_bytes(n['memory_peak_bytes'])} of {human_bytes(n['memory_limit_bytes'])})")


def text(r: dict) -> str:
    """The report as ``seff`` prints one, with a line per node and per GPU, then the notes."""
    lines = [
        f"Job ID: {r['job']}",
        f"Cluster: {r['cluster']}",
        f"User: {r['user']}",
        f"State: {'ended' if r['complete'] else 'running, or not all nodes reported their end'}",
        f"Nodes: {len(r['nodes'])}",
        f"Cores: {r['cores'] if r['cores'] is not None else 'unknown'}",
        f"CPU utilized: {_duration(r['cpu_seconds'])}",
        f"CPU efficiency: {_pct(r['cpu_efficiency'])} of {_duration(sum(n['wall_seconds'] * (n['cores'] or 0) for n in r['nodes']))} core-walltime",
        f"Job wall-clock time: {_duration(r['wall_seconds'])}",
        f"Memory utilized: {human_bytes(r['memory_peak_bytes'])}"
        + (" (sum of the nodes' peaks)" if len(r["nodes"]) > 1 else ""),
        f"Memory efficiency: {_memory_line(r)}",
        f"Idle: {_pct(r['idle_share'])} of the time",
    ]
    if len(r["nodes"]) > 1:
        lines.append("")
        lines.append(f"{'NODE':<12} {'CORES':>5} {'CPU EFF':>8} {'MEM PEAK':>11} {'MEM EFF':>8} {'READ':>11} {'WRITE':>11}")
        for n in r["nodes"]:
            lines.append(f"{n['node']:<12} {n['cores'] or '-':>5} {_pct(n['cpu_efficiency']):>8} "
                         f"{human_bytes(n['memory_peak_bytes']):>11} {_pct(n['memory_efficiency']):>8} "
                         f"{human_bytes(n['read_bytes']):>11} {human_bytes(n['write_bytes']):>11}")
    if r["gpus"]:
        lines.append("")
        lines.append(f"{'GPU':<24} {'UTIL MEAN':>9} {'UTIL MAX':>9} {'BUSY':>6} {'MEM PEAK':>11} {'MEM EFF':>8}")
        for g in r["gpus"]:
            name = f"{g['node']}:{g['index'] if g['index'] is not None else g['uuid']}"
            lines.append(f"{name:<24} {_pct(g['utilization_mean']):>9} {_pct(g['utilization_max']):>9} "
                         f"{_pct(g['busy_share']):>6} {human_bytes(g['memory_peak_bytes']):>11} {_pct(g['memory_efficiency']):>8}")
    if r["notes"]:
        lines.append("")
        lines.append("Notes:")
        lines += [f"  - {n}" for n in r["notes"]]
    return "\n".join(lines)
