"""The ``dxflow`` command line: one parser, declared once, built from one module per command group.

Each command module exposes ``register(subparsers)`` which adds its sub-parser(s) and
sets ``func`` (called with the parsed namespace, returns an exit code). Modules are
imported here, but they must import nothing heavy at module level: the scheduler
hooks run through this entry point and must start in a few tens of milliseconds.
"""

from __future__ import annotations

import argparse
import logging
import sys

from dxflow import __version__
from dxflow.cli import sshlogin
from dxflow.errors import EXIT_BROKEN_PIPE, EXIT_INTERRUPTED, DxflowError

COMMAND_MODULES = (
    "dxflow.cli.fleet",   # ls, info
    "dxflow.cli.files",   # cp
    "dxflow.cli.logs",    # logs
    "dxflow.cli.exec",    # exec
    "dxflow.cli.shell",   # shell
    "dxflow.cli.forward", # forward, ports
    "dxflow.cli.console", # console
    "dxflow.cli.metrics", # metrics
    "dxflow.cli.top",     # top
    "dxflow.cli.report",  # report
    "dxflow.cli.master",  # master start|stop|status
    "dxflow.cli.site",    # site init|serve|status (the site service's admin)
    "dxflow.cli.doctor",  # doctor
    "dxflow.cli.hook",    # hook prolog|epilog (run by schedulers, as root)
    "dxflow.cli.agent",   # agent (run an agent by hand: workstation, container)
    "dxflow.cli.lab",     # lab up|down|status
)


#: what a scheduler's hook runs (``dxflow hook prolog|epilog``): its parser is built alone (below)
HOOK_COMMAND, HOOK_MODULE = "hook", "dxflow.cli.hook"


def build_parser(modules: tuple[str, ...] = COMMAND_MODULES) -> argparse.ArgumentParser:
    """The whole CLI (or the commands of ``modules`` only); also used by argparse-manpage to write the man pages."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="dxflow",
        description="Reach the nodes of your running HPC jobs: list their agents, "
        "stream logs, open shells, copy files, open the web console.",
    )
    parser.add_argument("--version", action="version", version=f"dxflow {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (repeat for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def modules_for(argv: list[str]) -> tuple[str, ...]:
    """The command modules a command line needs: the hook's alone for ``dxflow [-v] hook ...`` (every
    prolog and epilog runs it, and registering the other commands' parsers costs ~15 ms of each), else all."""
    words = [a for a in argv if not a.startswith("-")]
    return (HOOK_MODULE,) if words[:1] == [HOOK_COMMAND] else COMMAND_MODULES


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(modules_for(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="dxflow: %(levelname)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return sshlogin.run(args.func, args)  # a node that asks for MFA: the login here, once
    except DxflowError as e:
        print(f"dxflow: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_BROKEN_PIPE
