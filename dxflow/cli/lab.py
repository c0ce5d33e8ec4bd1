"""``dxflow lab up|down|status``: a real, throwaway Slurm cluster on this one machine (as root)."""

from __future__ import annotations

import argparse
import logging

EXIT_DOWN = 3       # `lab status`: no lab here
EXIT_DEGRADED = 1   # `lab status`: parts of a lab, not all running


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="build, check or remove a throwaway Slurm cluster on this machine (root)",
                       description="A real Slurm cluster on this one machine: compute nodes n1..nN are "
                       "network namespaces on the bridge dxlab0 (10.77.0.0/24), each with its own slurmd "
                       "and sshd; the users alice and bob reach every node with `ssh nX`. "
                       "Needs root. `down` removes everything `up` made.")
    lsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    q = lsub.add_parser("up", help="build the lab, or repair a running one")
    q.add_argument("--nodes", "-N", type=int, default=2, metavar="N", help="number of compute nodes (default 2)")
    q.add_argument("--no-install", action="store_true",
                   help="do not apt-get install missing packages; fail and name them instead")
    q.add_argument("--json", action="store_true", help="print the lab's status as JSON when up")
    q.set_defaults(func=cmd_lab)

    q = lsub.add_parser("down", help="stop the lab and remove everything it made")
    q.set_defaults(func=cmd_lab)

    q = lsub.add_parser("status", help="daemons, nodes and users of the lab (exit 3 when there is none)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_lab)


def cmd_lab(args: argparse.Namespace) -> int:
    from dxflow.cli.util import print_json
    from dxflow.lab import cluster

    # progress lines for a person watching `lab up` / `lab down`
    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)

    if args.action == "up":
        info = cluster.up(args.nodes, install_packages=not args.no_install)
    elif args.action == "down":
        cluster.down()
        return 0
    else:
        info = cluster.status()
    if getattr(args, "json", False):
        print_json(info)
    else:
        print(cluster.status_table(info))
    return {"up": 0, "down": EXIT_DOWN}.get(info["state"], EXIT_DEGRADED)
