"""``/api/top``: what the job runs on this node right now, for ``dxflow top`` and the console's job view.

One answer holds the node's row (the job's CPU in cores, its memory and limit, its cores, its GPUs,
the node's load) and the job's busiest processes (:mod:`dxflow.metrics.top`). Only the job user's
own processes are ever read: the agent runs as the user.
"""

from __future__ import annotations

import os
import socket
import time

from flask import Blueprint, current_app, jsonify, request

from dxflow.agent.node import SAMPLER
from dxflow.errors import UsageError
from dxflow.metrics import sources
from dxflow.metrics.top import MAX_PROCESSES, PROCESS_SORTS, Top

bp = Blueprint("top", __name__)
#: Where the agent's :class:`Top` is kept in :attr:`AgentState.extra`.
TOP = "top"


def _agent_pids() -> set[int]:
    return {os.getpid(), os.getppid()}


def _make_top(state) -> Top:
    sampler = state.extra.get(SAMPLER)
    if sampler is not None:
        return Top(sampler.job_processes, lambda: sampler.cgroup, _agent_pids)
    # sampling is off at this site: the job's cgroup as the agent (which runs in it) sees it
    cgroup = sources.find_job_cgroup(os.getpid(), state.job)
    return Top(lambda: (cgroup.members() - _agent_pids()) if cgroup else set(), lambda: cgroup, _agent_pids)


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    text = request.args.get(name, "")
    if not text:
        return default
    if not text.isdigit() or not low <= int(text) <= high:
        raise UsageError(f"{name} must be a whole number from {low} to {high}, not {text!r}")
    return int(text)


@bp.get("/api/top")
def top():
    """``?processes=N`` (default 10) busiest processes by ``?sort=cpu|memory``, and the node's row."""
    n = _int_arg("processes", 10, 0, MAX_PROCESSES)
    sort = request.args.get("sort", "cpu")
    if sort not in PROCESS_SORTS:
        raise UsageError(f"sort must be one of {', '.join(PROCESS_SORTS)}, not {sort!r}")
    state = current_app.config["AGENT"]
    viewer = state.extra.get(TOP) or state.extra.setdefault(TOP, _make_top(state))
    figures = viewer.processes(n, sort)
    cgroup = viewer.cgroup()
    sampler = state.extra.get(SAMPLER)
    summary = sampler.summary if sampler is not None else None
    memory, _peak = cgroup.memory() if cgroup is not None else (None, None)
    used, total = sources.node_memory()
    cores = (summary.cores if summary else None) or (cgroup.cores() if cgroup else None)
    limit = (summary.memory_limit_bytes if summary else None) or (cgroup.memory_limit() if cgroup else None)
    gpus = sampler.last_gpus() if sampler is not None else []
    return jsonify(
        node=state.node, job=state.job, user=state.user, hostname=socket.gethostname(), time=time.time(),
        cores=cores or len(os.sched_getaffinity(0)),
        memory_bytes=memory if memory is not None else figures["rss_bytes"],
        memory_source="cgroup" if memory is not None else "processes",
        memory_limit_bytes=limit, node_memory_used_bytes=used, node_memory_bytes=total,
        node_cpus=os.cpu_count(), load=list(os.getloadavg()),
        gpus=[{k: g.get(k) for k in ("index", "name", "utilization", "memory_used", "memory_total")}
              for g in gpus],
        **figures)


OPENAPI = {
    "/api/top": {"get": {
        "summary": "the job on this node now: its CPU (cores), memory, GPUs, the node's load, and its busiest "
                   "processes (docs/metrics.md)", "operationId": "top", "tags": ["agent"],
        "parameters": [
            {"name": "processes", "in": "query", "required": False,
             "schema": {"type": "integer", "minimum": 0, "maximum": MAX_PROCESSES, "default": 10}},
            {"name": "sort", "in": "query", "required": False,
             "schema": {"type": "string", "enum": list(PROCESS_SORTS), "default": "cpu"}}],
        "responses": {"200": {"description": "the node's row and processes",
                              "content": {"application/json": {"schema": {"type": "object"}}}},
                      "400": {"description": "processes or sort out of range",
                              "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}}}},
}
