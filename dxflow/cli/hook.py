"""``dxflow hook prolog|epilog --scheduler NAME [ARGS…]``: called by the scheduler's scripts, as root."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("hook", help="scheduler prolog/epilog entry point (for site admins)",
                       description="Run by the scheduler's prolog/epilog scripts on each node, as root: "
                       "prolog starts this job's agent as the job's user, epilog stops it and everything "
                       "it started. Always exits 0, logging problems to the site hook log.")
    p.add_argument("phase", choices=("prolog", "epilog"))
    p.add_argument("--scheduler", default="slurm", help="slurm, pbs, torque, lsf, local, or a site's adapter (entry point group dxflow.schedulers; default slurm)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments the scheduler passed to its script")
    p.set_defaults(func=cmd_hook)


def split_hook_args(scheduler: str, rest: list[str]) -> tuple[str, list[str]]:
    """``hook prolog --scheduler pbs -- ARGS…``: argparse hands everything after the phase to the
    REMAINDER, options included; take ``--scheduler`` and one ``--`` off its front, keep the rest verbatim."""
    if len(rest) >= 2 and rest[0] == "--scheduler":
        scheduler, rest = rest[1], rest[2:]
    elif rest and rest[0].startswith("--scheduler="):
        scheduler, rest = rest[0].partition("=")[2], rest[1:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return scheduler, rest


def cmd_hook(args: argparse.Namespace) -> int:
    from dxflow import hook

    phase = hook.prolog if args.phase == "prolog" else hook.epilog
    scheduler, rest = split_hook_args(args.scheduler, list(args.args))
    return phase(scheduler, rest)
