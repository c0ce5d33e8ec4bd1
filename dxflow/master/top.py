"""``GET /api/top/JOB``: every node of a job asked at once what it runs now (``dxflow top``, the console).

Each node's agent answers ``/api/top`` (:mod:`dxflow.agent.top`). The nodes are asked in parallel and
the answer is sent after :data:`DEADLINE` seconds at the most, whatever is still missing: a node that
is lost, or slow to answer, is a row that says so, and never holds up the others' figures (a live
view refreshes every 2 s). Only the user's own agents are asked, with the user's tokens.
"""

from __future__ import annotations

import time
from concurrent.futures import ALL_COMPLETED, Future, ThreadPoolExecutor, wait

from dxflow.errors import DxflowError, NotFound, UsageError
from dxflow.metrics.top import MAX_PROCESSES, PROCESS_SORTS
from dxflow.schedulers.hostlist import fold, sort_hosts

#: Seconds one agent may take to answer.
ASK_TIMEOUT = 4.0
#: Seconds the whole answer may take: what has not come by then is named as not answering.
DEADLINE = 5.0
#: Agents asked at once (a 64-node job is asked all at once).
PARALLEL = 64


def _row(fleet, job: str, node: str, path: str) -> dict:
    agent = fleet.relay_target(job, node)
    status, data = fleet.ask(agent, path, timeout=ASK_TIMEOUT)
    if status != 200:
        raise DxflowError(f"{status}: {data.get('message', data)}")
    return {**data, "node": node, "state": "ready"}


def agent_path(processes: str = "", sort: str = "") -> str:
    """The agent's ``/api/top`` with the user's ``processes`` and ``sort``, checked here (UsageError):
    a typo is the user's to fix, not a node to call lost."""
    query = []
    if processes:
        if not processes.isdigit() or int(processes) > MAX_PROCESSES:
            raise UsageError(f"processes must be a whole number from 0 to {MAX_PROCESSES}, not {processes!r}")
        query.append(f"processes={int(processes)}")
    if sort:
        if sort not in PROCESS_SORTS:
            raise UsageError(f"sort must be one of {', '.join(PROCESS_SORTS)}, not {sort!r}")
        query.append(f"sort={sort}")
    return "/api/top" + ("?" + "&".join(query) if query else "")


def ask_nodes(fleet, job: str, nodes: list[str] | None, processes: str = "", sort: str = "") -> dict:
    """Every node of ``job`` (or those of ``nodes``) asked what it runs: one row per node, in node
    order, the nodes that did not answer with their state (``lost``, ``starting``…) and why."""
    path = agent_path(processes, sort)
    fleet.find(job)  # NotFound in the user's words when the job has no agent
    states = {a.reg.node: a.state for a in fleet.registry.of_job(job) if a.state != "gone"}
    have = sort_hosts(states)
    unknown = sorted(set(nodes or ()) - set(have))
    if unknown:
        raise NotFound(f"job {job} runs on {fold(have)}: {fold(unknown)} is not one of its nodes")
    wanted = [n for n in have if not nodes or n in nodes]
    pool = ThreadPoolExecutor(max_workers=min(PARALLEL, len(wanted)) or 1, thread_name_prefix="top")
    try:
        futures: dict[str, Future] = {n: pool.submit(_row, fleet, job, n, path) for n in wanted}
        wait(futures.values(), timeout=DEADLINE, return_when=ALL_COMPLETED)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a node still being asked ends on its own timeout
    rows = []
    for node, future in futures.items():
        state = "lost" if states[node] == "ready" else states[node]
        if not future.done():
            rows.append({"node": node, "state": state, "error": f"no answer within {DEADLINE:g} s"})
            continue
        try:
            rows.append(future.result())
        except DxflowError as e:
            rows.append({"node": node, "state": state, "error": str(e)})
    return {"job": job, "time": time.time(), "nodes": rows, "node_set": fold(wanted)}
