"""``dxflow lab up|down|status``: a real, throwaway Slurm cluster on this one machine (as root)."""

from __future__ import annotations

import argparse
import logging

EXIT_DOWN = 3       # `lab status`: no lab here
EXIT_DEGRADED = 1   # `lab status`: parts of a lab, not all running


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="build, check or remove a throwaway Slurm cluster on this machine (root)",
                       description="A real Slurm cluster on this one machine: compute nodes n1..nN are "
                       "network namespaces on the bridge dxlab0 (10.77.0.0/24), each with its own slurmd, "
                       "sshd, /tmp and /local (/home is shared); the users alice and bob reach every node "
                       "with `ssh nX`. Needs root. `down` removes everything `up` made.")
    lsub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    q = lsub.add_parser("up", help="build the lab, or repair a running one")
    q.add_argument("--nodes", "-N", type=int, default=2, metavar="N", help="number of compute nodes (default 2)")
    q.add_argument("--no-install", action="store_true",
                   help="do not apt-get install missing packages; fail and name them instead")
    q.add_argument("--json", action="store_true", help="print the lab's status as JSON when up")
    q.add_argument("--site", action="store_true",
                   help="also the federated site service: `dxflow lab site up` (docs/lab.md, docs/site.md)")
    _slurm_option(q)
    q.set_defaults(func=cmd_lab)

    q = lsub.add_parser("down", help="stop the lab and remove everything it made")
    _slurm_option(q)
    q.set_defaults(func=cmd_lab)

    q = lsub.add_parser("status", help="daemons, nodes and users of the lab (exit 3 when there is none)")
    q.add_argument("--json", action="store_true", help="print JSON")
    _slurm_option(q)
    q.set_defaults(func=cmd_lab)

    q = lsub.add_parser("exec", help="run a command on the lab's login node as a user would (login shell)",
                        description="Runs CMD ARGS... as USER in a login shell on the login node of the lab "
                        "(the host itself for the host's Slurm; inside a generation lab's namespaces otherwise), "
                        "with the lab's dxflow on PATH. Exits with CMD's exit code.")
    _slurm_option(q)
    q.add_argument("--user", "-u", default="root", metavar="USER", help="who runs it (default root)")
    q.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD ARGS...")
    q.set_defaults(func=cmd_exec)

    q = lsub.add_parser("restart-node", help="restart a node's slurmd and sshd inside all of its namespaces",
                        description="Makes NODE's mount namespace (its own /tmp and /local, docs/lab.md) if it "
                        "has none, then restarts its slurmd and sshd inside the node's namespaces when they run "
                        "outside them; daemons already in place are left alone. Running job steps and open SSH "
                        "sessions keep the files they started with; what starts afterwards sees the node's own.")
    q.add_argument("node", metavar="NODE", help="a node of the host's lab: n1, n2, ...")
    q.set_defaults(func=cmd_restart_node)

    q = lsub.add_parser("site", help="add the site service to the running lab, or take it out (docs/lab.md)",
                        description="Two replicas of `dxflow site serve` (as the service account dxflow) on one "
                        "PostgreSQL of the lab's own, the admin user dana (group dxadmin), the second cluster "
                        "pbslab (PBS stand-ins on the lab's nodes), site_gateways in /etc/dxflow/dxflow.toml (every "
                        "agent dials out) and /etc/dxflow/site-client.toml for the CLI (DXFLOW_SITE_CONFIG). "
                        "`down` removes all of it and leaves the lab as it was.")
    q.add_argument("site_action", choices=("up", "down", "status"), metavar="up|down|status")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_site)

    q = lsub.add_parser("profile", help="add an SSH set-up of real sites to the running lab (docs/ssh.md)",
                        description="Extra sshd on the nodes, for the user carol: host certificates (certs), "
                        "hostbased authentication (hostbased), a TOTP code after the key (mfa), two ProxyJump hops "
                        "(jump), a key named in an Include'd file (include), pam_slurm_adopt (adopt). `up` also rewrites carol's ~/.ssh "
                        "for that profile.")
    q.add_argument("profile_action", choices=("up", "down", "status"), metavar="up|down|status")
    q.add_argument("name", nargs="?", choices=("certs", "hostbased", "mfa", "jump", "include", "adopt"), metavar="NAME",
                   help="certs, hostbased, mfa, jump, include or adopt")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=cmd_profile)


def _slurm_option(q: argparse.ArgumentParser) -> None:
    q.add_argument("--slurm", metavar="G", default=None,
                   help="Slurm generation: 22.05, 24.11 or 26.05 (default: the host's own Slurm; another one "
                   "runs in a root file system of the Debian release that ships it, beside the host's lab)")


def cmd_exec(args: argparse.Namespace) -> int:
    import os

    from dxflow.lab import generation
    from dxflow.lab.cluster import require_root

    require_root()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    argv = generation.exec_argv(args.slurm, args.user, command)
    os.execvp(argv[0], argv)
    return 1  # not reached


def cmd_restart_node(args: argparse.Namespace) -> int:
    from dxflow.errors import UsageError
    from dxflow.lab import daemons
    from dxflow.lab.cluster import require_root
    from dxflow.lab.layout import Layout, Node
    from dxflow.lab.state import load, save

    require_root()
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    layout = Layout()
    state = load(layout.state_file)
    if state is None:
        raise UsageError("there is no lab here to restart a node of; `dxflow lab up` makes one")
    if not (args.node[:1] == "n" and args.node[1:].isdigit()):
        raise UsageError(f"{args.node!r} is not a lab node name (n1, n2, ...)")
    daemons.restart_node(layout, Node(int(args.node[1:]), layout.prefix), state)
    save(state, layout.state_file)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from dxflow.cli.util import print_json
    from dxflow.errors import UsageError
    from dxflow.lab import ssh_profiles

    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    if args.profile_action != "status" and not args.name:
        raise UsageError(f"`dxflow lab profile {args.profile_action}` needs a profile name")
    if args.profile_action == "up":
        ssh_profiles.up(args.name)
    elif args.profile_action == "down":
        ssh_profiles.down(args.name)
    info = ssh_profiles.status()
    if args.json:
        print_json(info if not args.name else info[args.name])
    else:
        for name, p in info.items():
            print(f"{name:10} {'-' if p['up'] is None else 'up' if p['up'] else 'down':5} {' '.join(p['sshd']) or '-':22} {p['what']}")
    return 0


def cmd_site(args: argparse.Namespace) -> int:
    from dxflow.cli.util import print_json
    from dxflow.lab import site
    from dxflow.lab.cluster import require_root

    require_root()
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    if args.site_action == "up":
        info = site.up()
    elif args.site_action == "down":
        site.down()
        return 0
    else:
        info = site.status()
    if args.json:
        print_json(info)
    else:
        print(site.status_table(info))
    return {"up": 0, "down": EXIT_DOWN}.get(info["state"], EXIT_DEGRADED)


def cmd_lab(args: argparse.Namespace) -> int:
    from dxflow.cli.util import print_json
    from dxflow.lab import cluster, generation

    # progress lines for a person watching `lab up` / `lab down`
    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)

    if not generation.is_host(args.slurm):
        cluster.require_root()
        if args.action == "up":
            info = generation.up(args.slurm, args.nodes)
        elif args.action == "down":
            generation.down(args.slurm)
            return 0
        else:
            info = generation.status(args.slurm)
    elif args.action == "up":
        info = cluster.up(args.nodes, install_packages=not args.no_install)
        if args.site:
            from dxflow.lab import site

            info["site"] = site.up()
    elif args.action == "down":
        cluster.down()
        return 0
    else:
        info = cluster.status()
        # the generation labs that run beside this one (`dxflow lab status --slurm G` for each)
        info["generation_labs"] = generation.running()
    if getattr(args, "json", False):
        print_json(info)
    else:
        print(cluster.status_table(info))
        if info.get("generation_labs"):
            print("  beside it: Slurm " + ", ".join(info["generation_labs"]) + " (dxflow lab status --slurm G)")
    return {"up": 0, "down": EXIT_DOWN}.get(info["state"], EXIT_DEGRADED)
