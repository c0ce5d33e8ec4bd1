"""``dxflow logs``: a job's stdout or stderr, or its agent's log; ``-f`` follows it live."""

from __future__ import annotations

import argparse
import sys

from dxflow.cli.util import add_wait


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logs", help="show (or follow) a job's output", description=(
        "Show the job's own stdout (or stderr, or the agent's log) as its agent on the node reads "
        "it: the path comes from the scheduler, with %j-style patterns expanded. With -f, new lines "
        "appear as the job writes them, until the job ends or you press Ctrl-C."))
    p.add_argument("target", metavar="JOB[:NODES]", help="the job (and node; default: the job's first node, "
                   "where the batch script's output is written); a node set (JOB:n[1-4], JOB:all) shows every "
                   "node's, each line after `NODE: `, and with -f merges their streams as lines come")
    p.add_argument("--node", help="the node whose agent reads the log (same as JOB:NODE)")
    p.add_argument("--path", metavar="PATTERN",
                   help="read this file on each node instead (per-node output such as `srun -o out-%%N.log`): "
                        "%%N is the node's name, %%j the job id, %%%% a %%; relative to the job's work dir")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--stderr", action="store_true", help="the job's stderr instead of its stdout")
    which.add_argument("--agent", action="store_true", help="the agent's own log on that node")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines as they are written")
    p.add_argument("-n", "--lines", type=int, metavar="K", help="only the last K lines (default: all)")
    add_wait(p)
    p.set_defaults(func=cmd_logs)


def cmd_logs(args: argparse.Namespace) -> int:
    from dxflow.cli import targets
    from dxflow.cli.service import service
    from dxflow.errors import UsageError
    from dxflow.master.client import check

    target = targets.parse(args.target)
    if args.node:
        node_set = targets.parse_parts(args.target, target.job, args.node)
        if target.nodes and target.nodes != node_set.nodes:
            raise UsageError(f"two nodes named: {target.nodes} (in {args.target}) and --node {args.node}")
        target = node_set
    if args.lines is not None and args.lines < 0:
        raise UsageError("--lines must be 0 or more")
    if args.path is not None and (args.agent or args.stderr or not args.path.strip()):
        raise UsageError("--path names the file itself: leave out --stderr and --agent" if args.path.strip()
                         else "--path needs a file name pattern")
    name = "agent" if args.agent else "stderr" if args.stderr else "stdout"
    client = service().ensure()
    where = targets.resolve(client, target, wait=args.wait)
    if target.several or args.path is not None:
        from dxflow.cli.logfan import logs_all

        return logs_all(client, where, name, args.path, args.lines, args.follow, prefix=target.several)
    job, node = where.job, where.nodes[0]
    query = f"?lines={args.lines}" if args.lines is not None else ""
    path = client.agent_path(job, node, f"/api/logs/{name}" + ("/follow" if args.follow else "") + query)
    resp = client.request("GET", path, timeout=None)
    check(resp)
    out = sys.stdout.buffer
    if not args.follow:
        while True:
            chunk = resp.read1(256 * 1024)
            if not chunk:
                return 0
            out.write(chunk)
            out.flush()
    return follow(resp, out, client, job, node)


def read_events(resp):
    """Server-sent events from ``resp``, as (event, data) pairs; comments and ids are skipped."""
    event, data = "", []
    while True:
        raw = resp.readline()
        if not raw:
            return
        line = raw.decode("utf-8", errors="replace").rstrip("\n").rstrip("\r")
        if not line:
            if data or event:
                yield event or "message", "\n".join(data)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            data.append(value)
        elif field == "event":
            event = value


def follow(resp, out, client, job: str, node: str | None) -> int:
    import http.client

    try:
        for event, data in read_events(resp):
            if event == "end":
                print(f"dxflow: {data}", file=sys.stderr)
                return 0
            out.write(data.encode() + b"\n")
            out.flush()
    except (http.client.HTTPException, ConnectionError) as e:
        return _stream_lost(client, job, node, e)
    return _stream_lost(client, job, node, None)


def _stream_lost(client, job: str, node: str | None, error: Exception | None) -> int:
    """The stream broke off without its end event: the job ended (the epilog stops the agent) or the link broke."""
    import time

    from dxflow.errors import AgentUnreachable, DxflowError

    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:  # the master notices a removed registration within a second
        try:
            agents = client.json("GET", "/api/agents?all=1&refresh=1", timeout=5)
        except (DxflowError, OSError):  # the master itself restarts: ask again
            time.sleep(0.3)
            continue
        mine = [a for a in agents if a["job"] == job and (node is None or a["node"] == node)]
        if not mine or all(a["state"] == "gone" for a in mine):
            print(f"dxflow: job {job} ended", file=sys.stderr)
            return 0
        time.sleep(0.3)
    why = f": {error}" if error else ""
    raise AgentUnreachable(f"the log stream of job {job} broke off{why}; run `dxflow logs -f` again")
