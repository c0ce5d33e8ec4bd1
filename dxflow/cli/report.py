"""``dxflow report JOB``: a job's efficiency, like ``seff``, from what its agents measured on every node."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="show a job's efficiency report (CPU, memory, GPUs), like seff", description=(
        "Show how well JOB used what it was given, from what its agents measured on every node: CPU efficiency "
        "against the cores allocated, memory peak against the memory requested, each GPU's utilisation and "
        "memory peak, idle time, and notes in plain words when something is off. Written while the job runs "
        "and when it ends, to ~/.dxflow/reports/JOB.json. See docs/metrics.md."))
    p.add_argument("job", metavar="JOB")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    from urllib.parse import quote

    from dxflow.cli.service import service
    from dxflow.cli.util import print_json
    from dxflow.metrics.report import text

    client = service().ensure()
    report = client.json("GET", f"/api/report/{quote(args.job, safe='')}")
    if args.json:
        print_json(report)
    else:
        print(text(report))
    return 0
