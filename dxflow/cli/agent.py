"""``dxflow agent``: run an agent by hand (workstation, container) without a scheduler."""

from __future__ import annotations

import argparse
import socket


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("agent", help="run an agent here, in the foreground, without a scheduler",
                       description="Run this node's agent in the foreground (node-embedded use: a "
                       "workstation or a container). It registers in ~/.dxflow/fleet like a job's agent.")
    p.add_argument("--job", default="local", help="name to show as the job (default: local)")
    p.add_argument("--node", default=socket.gethostname().split(".")[0], help="node name (default: hostname)")
    p.add_argument("--cluster", default="local")
    p.add_argument("--bind", default="127.0.0.1:0", help="address:port to listen on (default 127.0.0.1:0)")
    p.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> int:
    from dxflow.agent.server import serve
    from dxflow.schedulers.base import check_name

    check_name("job", args.job)
    check_name("node", args.node)
    return serve("local", args.cluster, args.job, args.node, bind=args.bind, foreground=True)
