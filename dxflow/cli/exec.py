"""``dxflow exec JOB[:NODE] -- CMD ARGS...``: run a command in a running job, like ``ssh NODE CMD``."""

from __future__ import annotations

import argparse
import sys

#: exit code when the connection broke before the command's exit status arrived (as ssh does).
LOST = 255


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("exec", help="run a command on a node of a running job", description=(
        "Run CMD as you, in the job's environment (its SLURM_*/PBS_* variables, modules loaded by the "
        "batch script) and work dir, on NODE (default: the job's first node). Its stdout and stderr "
        "stream to yours as they come; dxflow exits with the command's exit code (255 if the "
        "connection broke). Ctrl-C stops the command."),
        usage="dxflow exec [-h] [-i] [--cwd DIR] [--env NAME=VALUE] JOB[:NODE] -- CMD [ARGS ...]")
    p.add_argument("-i", "--stdin", action="store_true",
                   help="read all of your stdin first and give it to the command")
    p.add_argument("--cwd", metavar="DIR", help="run in DIR (relative to the job's work dir)")
    p.add_argument("--env", metavar="NAME=VALUE", action="append", default=[],
                   help="set an environment variable for the command (repeatable)")
    p.add_argument("target", metavar="JOB[:NODE]")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS")
    p.set_defaults(func=cmd_exec)


def cmd_exec(args: argparse.Namespace) -> int:
    import base64
    import http.client
    import json

    from dxflow.cli.util import parse_target
    from dxflow.errors import UsageError
    from dxflow.master.client import MasterClient, check

    job, node = parse_target(args.target)
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise UsageError("no command given: dxflow exec JOB[:NODE] -- CMD [ARGS ...]")
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
    client = MasterClient().ensure()
    resp = client.request("POST", client.agent_path(job, node, "/api/exec"), json.dumps(body).encode(),
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
