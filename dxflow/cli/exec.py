"""``dxflow exec JOB[:NODES] -- CMD ARGS...``: run a command in a running job, like ``ssh NODE CMD`` on one
node, or like ``clush -w NODES CMD`` on a node set (:mod:`dxflow.cli.fanout`)."""

from __future__ import annotations

import argparse
import sys

from dxflow.cli.util import add_wait
from dxflow.errors import EXIT_CONNECTION_LOST as LOST


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exec", help="run a command on a node of a running job", description=(
        "Run CMD as you, in the job's environment and work dir, on NODE (default: the job's first node). "
        "The job's environment is the one the job's oldest process on that node started with (on the "
        "batch host, the batch script's: its SLURM_*/PBS_*/LSB_* variables and what it inherited from "
        "sbatch/qsub/bsub), not what the script changed later, such as a `module load`: to get that, "
        "have the script save it (`export -p > job.env`) and run `dxflow exec JOB -- bash -c '. ./job.env "
        "&& CMD'`, or load the modules in the command (`bash -lc 'module load X && CMD'`). Its stdout and stderr "
        "stream to yours as they come; dxflow exits with the command's exit code (255 if the "
        "connection broke). Ctrl-C stops the command. "
        "With a node set (JOB:n[1-4,7], JOB:all or JOB:*), CMD runs on every node of it at once, like "
        "clush or pdsh: each line comes with `NODE: ` before it as it arrives (--no-prefix drops it), or "
        "--gather prints one block per distinct output under its nodes (like clush -b); dxflow exits 0 only "
        "when every node's command did, else with the largest code (124 for a node stopped by --timeout, "
        "255 for one lost) after a summary of the nodes that failed, folded (n[2-3]: exit 1)."),
        usage="dxflow exec [-h] [-i] [--cwd DIR] [--env NAME=VALUE] [--fanout N] [--timeout SECONDS] [--wait SECONDS] "
              "[--no-prefix | --gather | --json] JOB[:NODES] -- CMD [ARGS ...]")
    p.add_argument("-i", "--stdin", action="store_true",
                   help="read all of your stdin first and give it to the command")
    p.add_argument("--cwd", metavar="DIR", help="run in DIR (relative to the job's work dir)")
    p.add_argument("--env", metavar="NAME=VALUE", action="append", default=[],
                   help="set an environment variable for the command (repeatable)")
    p.add_argument("--fanout", type=int, metavar="N",
                   help="with a node set: at most N nodes at once (default: all of them)")
    p.add_argument("--timeout", type=float, metavar="SECONDS",
                   help="stop the command on a node that runs longer, and report it (default: none)")
    add_wait(p)
    how = p.add_mutually_exclusive_group()
    how.add_argument("--no-prefix", action="store_true", help="with a node set: lines without `NODE: `")
    how.add_argument("--gather", action="store_true",
                     help="with a node set: stdout gathered, one block per distinct output headed by its nodes")
    how.add_argument("--json", action="store_true",
                     help="one JSON record per node as it ends: job, node, status, exit, stdout, stderr, error")
    p.add_argument("target", metavar="JOB[:NODES]", help="a job, JOB:NODE, or JOB:NODESET (n[1-4,7], all)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    p.set_defaults(func=cmd_exec)


def cmd_exec(args: argparse.Namespace) -> int:
    import json

    from dxflow.cli import targets
    from dxflow.cli.service import service
    from dxflow.errors import UsageError

    target = targets.parse(args.target)  # before anything is contacted: a bad one exits 2
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("no command given: dxflow exec JOB[:NODES] -- CMD [ARGS ...]")
    if args.fanout is not None and args.fanout < 1:
        raise UsageError("--fanout must be 1 or more")
    if args.timeout is not None and not args.timeout > 0:
        raise UsageError("--timeout must be more than 0 seconds")
    body: dict = {"argv": argv}
    if args.cwd:
        body["cwd"] = args.cwd
    if args.env:
        env = {}
        for item in args.env:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise UsageError(f"--env expects NAME=VALUE, got {item!r}")
            env[name] = value
        body["env"] = env
    if args.stdin:
        body["stdin"] = sys.stdin.buffer.read().decode("utf-8", errors="surrogateescape")
    client = service().ensure()
    where = targets.resolve(client, target, wait=args.wait)
    data = json.dumps(body).encode()
    if target.several or where.missing or args.gather or args.json or args.timeout is not None:
        from dxflow.cli.fanout import exec_all

        if where.nodes == [None]:  # --json or --timeout on the job's first node: name it
            where = targets.Resolved(where.job, [_first_node(client, where.job)])
        return exec_all(client, where, data, prefix=not args.no_prefix, gather=args.gather, as_json=args.json,
                        fanout=args.fanout, timeout=args.timeout)
    return _exec_one(client, where.job, where.nodes[0], data)


def _first_node(client, job: str) -> str:
    """The node the master picks for JOB alone (the job's first), as its agent names it."""
    return str(client.json("GET", client.agent_path(job, None, "/api/node"))["node"])


def _exec_one(client, job: str, node: str | None, data: bytes) -> int:
    """One node: its output as it comes, unchanged; its exit code is dxflow's."""
    import base64
    import http.client
    import json

    from dxflow.master.client import check

    resp = client.request("POST", client.agent_path(job, node, "/api/exec"), data,
                          {"Content-Type": "application/json"}, timeout=None)
    check(resp)
    sinks = {"stdout": sys.stdout.buffer, "stderr": sys.stderr.buffer}
    sys.stdout.flush()
    try:
        while True:
            line = resp.readline()
            if not line:
                break
            if not line.strip():
                continue  # keepalive
            msg = json.loads(line)
            if "exit" in msg:
                return int(msg["exit"])
            sink = sinks.get(msg.get("stream"))
            if sink is not None:
                sink.write(base64.b64decode(msg.get("data", "")))
                sink.flush()
    except (OSError, ValueError, http.client.HTTPException) as e:
        print(f"dxflow: connection to job {job} lost: {e}", file=sys.stderr)
        return LOST
    print(f"dxflow: connection to job {job} lost before the command's exit status arrived", file=sys.stderr)
    return LOST
