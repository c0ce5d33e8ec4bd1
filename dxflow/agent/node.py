"""``/api/node``: what this node is and how busy it is (read from /proc, no extra package).

``/api/metrics?since=``: what the job uses on this node, sampled every ``metrics_interval`` seconds
since the agent started (:mod:`dxflow.metrics`), by a thread of the gunicorn worker that serves it.
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time

from flask import Blueprint, Flask, current_app, jsonify, request

from dxflow.config import SiteConfig
from dxflow.errors import NotFound
from dxflow.metrics import gpus as gpu_alloc
from dxflow.metrics import parse_since, sources
from dxflow.metrics.sampler import Sampler
from dxflow.schedulers import get_scheduler

bp = Blueprint("node", __name__)
log = logging.getLogger(__name__)
#: Where the agent's sampler is kept in :attr:`AgentState.extra`.
SAMPLER = "metrics_sampler"


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


def gpus(state) -> list[dict]:
    """The job's own GPUs on this node as its sampler last read them (never the node's others: another
    user's job may run on them); an empty list when the job has none, or before they are known."""
    sampler = state.extra.get(SAMPLER)
    if sampler is None:
        return []
    # this answer's figures were always numbers (an unknown one 0, as nvidia-smi's [N/A] was read here
    # before); /api/metrics says None where a figure is unknown
    return [{"index": g["index"], "uuid": g["uuid"], "name": g["name"],
             **{k: g[k] or 0.0 for k in ("utilization", "memory_used", "memory_total", "temperature")}}
            for g in sampler.last_gpus()]


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
        "gpus": gpus(state),
    }


@bp.get("/api/node")
def node():
    return jsonify(node_info())


# -- the job's metrics -------------------------------------------------------------------
def job_gpus(pids: set[int]) -> list[str] | None:
    """The job's GPUs: from the agent's environment (what the prolog passed on), else from one of the
    job's processes here, the lowest pid (None while there is none)."""
    envs = [dict(os.environ)] + [sources.environ(pid) for pid in sorted(pids)[:1]]
    return gpu_alloc.allocation(*envs)


def make_sampler(state, interval: float) -> Sampler:
    return Sampler(job=state.job, node=state.node, user=state.user, cluster=state.cluster,
                   scheduler=state.scheduler, home=state.home,
                   job_env_names=tuple(get_scheduler(state.scheduler).hook_env.get("job", ())),
                   interval=interval, gpu_allocation=job_gpus,
                   agent_pids=lambda: {os.getpid(), os.getppid()})


def start_sampling(state, interval: float) -> Sampler:
    """Sample the job in a thread of this process; the report part is written once more at exit."""
    sampler = make_sampler(state, interval)
    state.extra[SAMPLER] = sampler
    threading.Thread(target=sampler.run, daemon=True, name="job-metrics").start()
    atexit.register(sampler.stop)
    return sampler


def init_app(app: Flask) -> None:
    """Start sampling the job: the agent's app is built in its gunicorn worker (dxflow.agent.server),
    the process that serves ``/api/metrics``."""
    state = app.config["AGENT"]
    interval = app.config.get("METRICS_INTERVAL")
    if interval is None:
        interval = SiteConfig.load().metrics_interval
    if interval <= 0 or not app.config.get("METRICS_SAMPLING", os.environ.get("DXFLOW_AGENT") == "1"):
        return  # off at this site, or an app built by a test
    if SAMPLER not in state.extra:
        start_sampling(state, interval)


@bp.get("/api/metrics")
def metrics():
    """The job's series on this node from ``?since=`` (a duration back, ``10m``, or an epoch time;
    default: the whole life), the columns' names, and the summary the report is made of."""
    sampler = current_app.config["AGENT"].extra.get(SAMPLER)
    if sampler is None:
        raise NotFound("this agent does not sample its job (metrics_interval = 0 at this site)")
    since = parse_since(request.args["since"]) if request.args.get("since") else 0.0
    return jsonify(sampler.payload(since))
