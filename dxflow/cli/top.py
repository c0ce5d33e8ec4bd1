"""``dxflow top JOB[:NODES]``: every node of a job at a glance, refreshed every 2 s, like ``htop`` across nodes.

A frame is a table of the job's nodes (state, the job's CPU in % of the cores it has there, cores
busy, memory and its limit, the node's load, GPU use, process count) closed by a row for the whole
job (its node set, folded, and totals), then each node's busiest processes of the job. The figures
come from the master's ``/api/top/JOB``, which asks every node at once and never waits for a lost
one (:mod:`dxflow.master.top`, :mod:`dxflow.agent.top`).

On a terminal the view is live (plain ANSI escapes on the alternate screen, the terminal in cbreak
mode: no dependency); ``c``, ``m``, ``n``, ``g`` sort by CPU, memory, node, GPU, ``q`` or Ctrl-C
quits and the terminal is given back as it was. ``--once`` prints one frame with no terminal
control, as does any run whose output is not a terminal; ``--json`` prints one JSON record per node.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

#: Sort keys: the letter pressed (or ``--sort``) -> what the nodes are ordered by.
SORTS = {"c": "cpu", "m": "memory", "n": "node", "g": "gpu"}
DEFAULT_PROCESSES = 3
NODE_HEADERS = ("NODE", "STATE", "CPU%", "CORES", "MEM", "LIMIT", "LOAD", "GPU%", "PROCS")
PROCESS_HEADERS = ("NODE", "PID", "USER", "CPU%", "MEM", "COMMAND")
#: Escapes of the live view: the alternate screen and a hidden cursor while it runs.
ENTER = "\x1b[?1049h\x1b[?25l"
LEAVE = "\x1b[?25h\x1b[?1049l"
HOME = "\x1b[H"
HOME_CLEAR = HOME + "\x1b[2J"
BOLD, REVERSE, RESET = "\x1b[1m", "\x1b[7m", "\x1b[0m"
STATE_COLOURS = {"ready": "\x1b[32m", "lost": "\x1b[31m", "starting": "\x1b[33m", "incompatible": "\x1b[31m",
                 "no agent": "\x1b[31m"}
#: the state of a node of the job that has no registered agent (a job starting, or its prolog failed there)
NO_AGENT = "no agent"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("top", help="a live view of a job's nodes and busiest processes, like htop", description=(
        "Show every node of JOB (or the nodes of JOB:NODESET) live, refreshed every 2 s: its state, the job's "
        "CPU in % of the cores it has there (100 = all of them busy), cores busy, memory and its limit, the "
        "node's load, GPU use, and the job's busiest processes on it (CPU% as top shows it: 100 = one core). "
        "Keys: c, m, n, g sort by CPU, memory, node, GPU; q or Ctrl-C quits. A node that does not answer "
        "shows as lost. Without a terminal, or with --once, one frame is printed."))
    p.add_argument("target", metavar="JOB[:NODES]")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between refreshes (default 2)")
    p.add_argument("--sort", default="cpu", choices=sorted({*SORTS, *SORTS.values()}),
                   help="order of the nodes: cpu (default), memory, node, gpu (or c, m, n, g)")
    p.add_argument("-n", "--processes", type=int, default=DEFAULT_PROCESSES, metavar="N",
                   help=f"busiest processes shown per node (default {DEFAULT_PROCESSES}, 0 for none)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--once", action="store_true", help="print one frame, without terminal control, and exit")
    out.add_argument("--json", action="store_true", help="print one JSON record per node, and exit")
    p.set_defaults(func=cmd_top)


# -- one frame, from the master's answer (pure: the unit tests render recorded answers) ------------
def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cpu_percent(row: dict) -> float | None:
    """The job's CPU on the node in % of the cores it has there."""
    if row.get("cpu_cores") is None or not row.get("cores"):
        return None
    return 100.0 * row["cpu_cores"] / row["cores"]


def gpu_percent(row: dict) -> float | None:
    """The mean use of the job's GPUs on the node (None: it has none, or they cannot be read)."""
    return _mean([g["utilization"] for g in row.get("gpus") or () if g.get("utilization") is not None])


def sort_key(sort: str) -> Callable[[dict], Any]:
    """Order of the node rows: the busiest first (nodes that did not answer last), or by node name."""
    if sort == "node":
        return lambda row: (0, row["_order"])
    figure: Callable[[dict], float | None] = {
        "cpu": lambda r: r.get("cpu_cores"), "memory": lambda r: r.get("memory_bytes"), "gpu": gpu_percent}[sort]

    def key(row: dict) -> Any:
        value = figure(row) if row.get("state") == "ready" else None
        return (1, 0.0, row["_order"]) if value is None else (0, -value, row["_order"])
    return key


def sorted_rows(data: dict, sort: str) -> list[dict]:
    from dxflow.schedulers.hostlist import sort_hosts

    order = {n: i for i, n in enumerate(sort_hosts(r["node"] for r in data.get("nodes", ())))}
    rows = [{**r, "_order": order[r["node"]]} for r in data.get("nodes", ())]
    return sorted(rows, key=sort_key(SORTS.get(sort, sort)))


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def node_cells(row: dict) -> list[str]:
    from dxflow.cli.util import human_bytes

    if row.get("state") != "ready":
        return [row["node"], row.get("state", "?"), *["-"] * (len(NODE_HEADERS) - 2)]
    cores = f"{row['cpu_cores']:.2f}/{row['cores']}" if row.get("cpu_cores") is not None else "-"
    gpu = gpu_percent(row)
    n_gpus = len(row.get("gpus") or ())
    return [row["node"], "ready", _num(cpu_percent(row), ".1f"), cores, human_bytes(row.get("memory_bytes")),
            human_bytes(row.get("memory_limit_bytes")) if row.get("memory_limit_bytes") else "-",
            _num((row.get("load") or [None])[0], ".2f"),
            f"{gpu:.0f}" + (f" ×{n_gpus}" if n_gpus > 1 else "") if gpu is not None else "-",
            str(row.get("process_count", "-"))]


def total_cells(data: dict, rows: list[dict]) -> list[str]:
    """The whole job: its node set, how many nodes answer, and the sums (the load's mean)."""
    from dxflow.cli.util import human_bytes

    ready = [r for r in rows if r.get("state") == "ready"]
    cores = sum(r.get("cores") or 0 for r in ready)
    busy = sum(r.get("cpu_cores") or 0.0 for r in ready)
    limits = [r.get("memory_limit_bytes") for r in ready]
    loads = [r["load"][0] for r in ready if r.get("load")]
    gpus = [g for g in (gpu_percent(r) for r in ready) if g is not None]
    return [data.get("node_set") or "-", f"{len(ready)}/{len(rows)} up",
            _num(100.0 * busy / cores if cores else None, ".1f"), f"{busy:.2f}/{cores}" if ready else "-",
            human_bytes(sum(r.get("memory_bytes") or 0 for r in ready)) if ready else "-",
            human_bytes(sum(x or 0 for x in limits)) if ready and all(limits) else "-",
            _num(_mean(loads), ".2f"), _num(_mean(gpus), ".0f"),
            str(sum(r.get("process_count") or 0 for r in ready)) if ready else "-"]


def _table(headers: tuple[str, ...], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    out = []
    for r in [list(headers), *rows]:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def render(data: dict, sort: str = "cpu", processes: int = DEFAULT_PROCESSES, width: int | None = None,
           height: int | None = None, live: bool = False, error: str = "") -> list[str]:
    """One frame's lines. With ``height``, the processes per node shrink (then the nodes are cut, the
    busiest kept) to fit; with ``width``, lines are cut; ``live`` adds the keys and colours."""
    from dxflow.cli.util import human_bytes

    sort = SORTS.get(sort, sort)
    rows = sorted_rows(data, sort)
    clock = time.strftime("%H:%M:%S", time.localtime(data.get("time") or time.time()))
    head = f"dxflow top · job {data.get('job', '?')} · {len(rows)} nodes · {clock} · sort: {sort}"
    if live:
        head += "  [c]pu [m]emory [n]ode [g]pu  [q]uit"
    lines = [head] + ([f"! {error}"] if error else []) + [""]
    table = _table(NODE_HEADERS, [node_cells(r) for r in rows] + [total_cells(data, rows)], {2, 3, 4, 5, 6, 7, 8})
    node_lines, total_line = table[1:-1], table[-1]
    budget = None if height is None else height - len(lines) - 2  # the headers and the total
    if budget is not None and len(node_lines) > budget:
        more = len(node_lines) - max(0, budget - 1)
        node_lines = node_lines[:max(0, budget - 1)] + [f"… {more} more nodes (make the window taller)"]
        processes = 0
    lines += [table[0], *node_lines, total_line]
    ready = [r for r in rows if r.get("state") == "ready"]
    shown = [(r["node"], p) for r in ready for p in (r.get("processes") or [])[:processes]]
    room = None if height is None else max(0, height - len(lines) - 2)  # a blank line and the header
    if room is not None and len(shown) > room:
        per_node = room // max(1, len(ready))
        if per_node:
            shown = [(r["node"], p) for r in ready for p in (r.get("processes") or [])[:per_node]]
        else:  # more nodes than lines: the job's busiest processes, whichever nodes they run on
            key = "memory_bytes" if sort == "memory" else "cpu_percent"
            shown = sorted(shown, key=lambda np: -(np[1].get(key) or 0))[:room]
    prows = [[name, str(p["pid"]), p.get("user", ""), f"{p['cpu_percent']:.1f}", human_bytes(p.get("memory_bytes")),
              p.get("command") or p.get("name", "")] for name, p in shown]
    notes = [f"{r['node']}: {r.get('state')}: {r.get('error', 'no answer')}" for r in rows if r.get("state") != "ready"]
    if prows:
        lines += ["", *_table(PROCESS_HEADERS, prows, {1, 3, 4})]
    if notes and (height is None or height - len(lines) > len(notes)):
        lines += ["", *notes]
    if width is not None:
        lines = [line[:width] for line in lines]
    if height is not None:
        lines = lines[:height]
    if live:
        lines = _colour(lines)
    return lines


def _colour(lines: list[str]) -> list[str]:
    """The column headers in reverse video (as htop has them) and node states in their colour."""
    out = []
    for line in lines:
        if line.startswith(("NODE ", "NODE\t")):
            out.append(REVERSE + line + RESET)
            continue
        for state, colour in STATE_COLOURS.items():
            marker = f"  {state}  "
            if marker in line[:64]:
                line = line.replace(marker, f"  {colour}{state}{RESET}  ", 1)
                break
        out.append(line)
    return out


def with_missing(data: dict, job_nodes: list[str], why: dict[str, str]) -> dict:
    """The master's answer with a row for each node of ``job_nodes`` it does not have (no agent registered
    there, or it is gone): ``state`` "no agent" and why; the summary's node set is then the job's."""
    from dxflow.schedulers.hostlist import fold

    have = {r["node"] for r in data.get("nodes", ())}
    extra = [{"node": n, "state": NO_AGENT, "error": why.get(n) or "no agent registered"}
             for n in job_nodes if n not in have]
    if not extra:
        return data
    return {**data, "nodes": [*data.get("nodes", ()), *extra], "node_set": fold([*have, *(r["node"] for r in extra)])}


def records(data: dict) -> list[dict]:
    """``--json``: one record per node, in node order."""
    return [{"job": data.get("job"), **{k: v for k, v in r.items() if k != "_order"}}
            for r in sorted_rows(data, "node")]


# -- the command -------------------------------------------------------------------------------------
def cmd_top(args: argparse.Namespace) -> int:
    import json
    import sys
    from urllib.parse import quote

    from dxflow.cli import targets
    from dxflow.cli.topview import live_view
    from dxflow.errors import UsageError
    from dxflow.cli.service import service

    if not 0.2 <= args.interval <= 3600:
        raise UsageError(f"--interval must be from 0.2 to 3600 seconds, not {args.interval:g}")
    if not 0 <= args.processes <= 50:
        raise UsageError(f"--processes must be from 0 to 50, not {args.processes}")
    target = targets.parse(args.target, command="top")
    if target.nodes is None:  # `dxflow top JOB` is every node of the job
        target = target._replace(nodes="all")
    client = service().ensure()
    live = not (args.once or args.json) and sys.stdout.isatty() and sys.stdin.isatty()
    # the live view does not wait for a starting job's agents: their nodes show as "no agent" until they come
    resolved = targets.resolve(client, target, wait=0.0 if live else targets.WAIT)
    nodes = [n for n in resolved.nodes if n]
    why = dict(resolved.missing)
    job_nodes = [*nodes, *why]
    base = f"/api/top/{quote(resolved.job, safe='')}?processes={args.processes}"
    if nodes and target.nodes != "all":
        base += "&node=" + quote(",".join(nodes), safe=",")

    def fetch(sort: str) -> dict:
        by = "memory" if SORTS.get(sort, sort) == "memory" else "cpu"
        if not nodes:  # none of the nodes has an agent (yet): nothing to ask
            return with_missing({"job": resolved.job, "time": time.time(), "nodes": []}, job_nodes, why)
        return with_missing(client.json("GET", f"{base}&sort={by}", timeout=30), job_nodes, why)

    if args.json:
        for record in records(fetch(args.sort)):
            sys.stdout.write(json.dumps(record) + "\n")
        return 0
    if not live:
        sys.stdout.write("\n".join(render(fetch(args.sort), args.sort, args.processes)) + "\n")
        return 0
    return live_view(fetch, lambda data, sort, size, error: render(
        data, sort, args.processes, size.columns, size.lines, live=True, error=error), args.sort, args.interval)
