"""``/api/node``: what this node is and how busy it is (read from /proc, no extra package)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

from flask import Blueprint, current_app, jsonify

bp = Blueprint("node", __name__)


def meminfo() -> dict[str, int]:
    """Memory figures in bytes from /proc/meminfo."""
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * (1024 if len(parts) > 1 and parts[1] == "kB" else 1)
    return out


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def uptime() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


def gpus() -> list[dict]:
    """GPUs from ``nvidia-smi`` when it exists; an empty list otherwise."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return []
    query = "index,name,utilization.gpu,memory.used,memory.total,temperature.gpu"
    try:
        out = subprocess.run([exe, f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    result = []
    for line in out.strip().splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) == 6:
            idx, name, util, used, total, temp = cells
            result.append({"index": int(idx), "name": name, "utilization": _num(util),
                           "memory_used": _num(used) * 2**20, "memory_total": _num(total) * 2**20,
                           "temperature": _num(temp)})
    return result


def _num(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


_last_cpu: list[tuple[float, int, int]] = []


def cpu_percent() -> float:
    """CPU use since the previous call (or over 0.1 s on the first)."""
    busy, total = cpu_times()
    if not _last_cpu:
        time.sleep(0.1)
        _last_cpu.append((time.monotonic(), busy, total))
        busy, total = cpu_times()
    _, b0, t0 = _last_cpu[-1]
    _last_cpu[:] = [(time.monotonic(), busy, total)]
    return round(100.0 * (busy - b0) / (total - t0), 1) if total > t0 else 0.0


def node_info() -> dict:
    state = current_app.config["AGENT"]
    mem = meminfo()
    return {
        "hostname": socket.gethostname(),
        "node": state.node, "job": state.job, "cluster": state.cluster, "scheduler": state.scheduler,
        "user": state.user,
        "cpus": os.cpu_count(),
        "cpus_allowed": len(os.sched_getaffinity(0)),
        "cpu_percent": cpu_percent(),
        "memory_total": mem.get("MemTotal", 0),
        "memory_available": mem.get("MemAvailable", 0),
        "load": list(os.getloadavg()),
        "uptime": uptime(),
        "agent_uptime": time.time() - state.started,
        "gpus": gpus(),
    }


@bp.get("/api/node")
def node():
    return jsonify(node_info())
