"""``dxflow metrics JOB[:NODES]``: what a job uses on its nodes, sampled by its agents every 2 s."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("metrics", help="show what a job uses on its nodes (CPU, memory, I/O, GPUs)", description=(
        "Show what JOB uses on each of its nodes, as its agents sampled it (every 2 s by default) since the "
        "job started: CPU cores busy, memory, processes, disk I/O, and the job's own GPUs. Without --json or "
        "--csv: a line per node over the time asked for, then the whole job. NODES is one node or several, "
        "comma-separated. See docs/metrics.md for every figure and where it comes from."))
    p.add_argument("target", metavar="JOB[:NODES]")
    p.add_argument("--since", default="", metavar="DURATION",
                   help="only the last DURATION (10m, 90s, 2h) or since an epoch time; default: the job's whole life")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print every node's series and summary as JSON")
    fmt.add_argument("--csv", action="store_true", help="print the series as CSV, one row per node and sample")
    p.set_defaults(func=cmd_metrics)


def _mean(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def _max(values: list) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def cmd_metrics(args: argparse.Namespace) -> int:
    import csv
    import sys
    from urllib.parse import quote

    from dxflow.cli.service import service
    from dxflow.cli.util import human_bytes, parse_target, print_json, print_table
    from dxflow.metrics import parse_since

    job, nodes = parse_target(args.target)
    query = []
    if args.since:
        query.append(f"since={parse_since(args.since)!r}")  # checked here: a typo is the user's to fix
    if nodes:
        query.append(f"node={quote(nodes, safe=',')}")
    client = service().ensure()
    data = client.json("GET", f"/api/metrics/{quote(job, safe='')}" + ("?" + "&".join(query) if query else ""))
    if args.json:
        print_json(data)
        return 0
    if args.csv:
        out = csv.writer(sys.stdout)
        columns = None
        for n in data["nodes"]:
            if columns is None:
                columns = n["columns"]
                out.writerow(["node", *columns])
            for row in n["rows"]:
                out.writerow([n["node"], *("" if v is None else v for v in row[:len(columns)])])
        return 0
    rows = []
    for n in data["nodes"]:
        cols = {c: i for i, c in enumerate(n["columns"])}
        series = {c: [r[i] for r in n["rows"]] for c, i in cols.items()}
        s = n["summary"]
        gpu_util = [_mean(series[f"gpu{i}_utilization_percent"]) for i in range(len(n["gpus"]))]
        gpu_text = " ".join(f"{u:.0f}%" if u is not None else "-" for u in gpu_util) or "-"
        cores_now = series["cpu_cores"][-1] if series["cpu_cores"] else None
        rows.append([n["node"], len(n["rows"]),
                     f"{cores_now:.2f}" if cores_now is not None else "-",
                     f"{_mean(series['cpu_cores']):.2f}" if _mean(series["cpu_cores"]) is not None else "-",
                     s.get("cores") or "-",
                     human_bytes(series["memory_bytes"][-1]) if series["memory_bytes"] else "-",
                     human_bytes(_max(series["memory_bytes"])),
                     human_bytes(s.get("memory_limit_bytes")) if s.get("memory_limit_bytes") else "-",
                     int(series["processes"][-1] or 0) if series["processes"] else "-",
                     human_bytes(s.get("read_bytes")), human_bytes(s.get("write_bytes")), gpu_text])
    print_table(["NODE", "SAMPLES", "CORES NOW", "CORES AVG", "ALLOC", "MEM NOW", "MEM PEAK", "MEM LIMIT",
                 "PROCS", "READ", "WRITE", "GPU AVG"], rows)
    for node, why in sorted(data.get("errors", {}).items()):
        print(f"{node}: not read: {why}", file=sys.stderr)
    return 0
