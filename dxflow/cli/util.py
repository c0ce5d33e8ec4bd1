"""Small helpers shared by the CLI modules: JOB[:NODE] parsing (kept for its callers; :mod:`dxflow.cli.targets`
is the one parser), tables, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Iterable, Sequence

#: seconds a command waits for the agents of a starting job's nodes (``--wait``): the agents of a 64-node
#: job were all up 19 s after sbatch on the lab (issue #15)
AGENT_WAIT = 30.0
#: the longest --wait taken
MAX_WAIT = 3600.0


def wait_seconds(text: str) -> float:
    """``--wait``'s value: seconds from 0 to MAX_WAIT."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of seconds") from None
    if not 0 <= value <= MAX_WAIT:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 to {MAX_WAIT:g} seconds")
    return value


def add_wait(parser: argparse.ArgumentParser) -> None:
    """``--wait SECONDS``, for commands that take a node set (JOB:all)."""
    parser.add_argument("--wait", type=wait_seconds, default=AGENT_WAIT, metavar="SECONDS",
                        help=f"with nodes of the job whose agent has not registered yet (a job just started): "
                             f"wait this long for them (default {AGENT_WAIT:g}; 0: not at all), then go on "
                             "without them and report them as failed")


def parse_target(text: str) -> tuple[str, str | None]:
    """``JOB`` or ``JOB:NODES`` -> (job, the nodes as a comma-separated list, or None for the job's
    first node or ``all``), checked by :func:`dxflow.cli.targets.parse` (exit 2 for a malformed one);
    for commands that hand the node list on to the master as it is (``dxflow metrics``). The others
    resolve targets with :mod:`dxflow.cli.targets`."""
    from dxflow.cli.targets import parse
    from dxflow.schedulers.hostlist import node_set

    target = parse(text)
    if target.nodes is None or target.nodes == "all":
        return target.job, None
    return target.job, ",".join(node_set(target.nodes))


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    rows = [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers).rstrip())
    for r in rows:
        print(fmt.format(*r).rstrip())


def human_bytes(n: float | None) -> str:
    """``n`` bytes in binary units with one decimal, as the CLI's tables show them ("1.5 GiB")."""
    from dxflow.metrics.report import human_bytes as in_units

    return in_units(n, decimals=1)


def human_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s"
