"""A node whose SSH server asks the user something (MFA, a password): the login, once, in the user's terminal.

The master has no terminal, so it cannot answer a prompt: it reports such a node as needing a
login (``login_needed`` in ``GET /api/master``'s tunnels). When a command fails because an agent
cannot be reached and such nodes exist, the CLI runs ``ssh -M -N -f`` for each in the foreground,
where ssh asks and the user answers; ssh then keeps the connection as a ControlMaster in the
background, and the master uses its socket (:mod:`dxflow.ssh.control`). The command is run again
once. Without a terminal nothing is asked: the error stands, saying what to do.

Imported by every command, the scheduler hooks' too: what it needs is imported where it is used.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from dxflow.errors import AgentUnreachable, DxflowError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable

LOGIN_TIMEOUT = 300.0   # a person reading a code off a phone


def nodes_needing_login() -> list[str]:
    """The nodes the master could not log in to without a prompt."""
    from dxflow.master.client import MasterClient

    try:
        info = MasterClient().json("GET", "/api/master", timeout=10)
    except (DxflowError, OSError):
        return []
    tunnels = info.get("tunnels", {}) if isinstance(info, dict) else {}
    return sorted(a for a, s in tunnels.items() if isinstance(s, dict) and s.get("login_needed"))


def log_in(node: str) -> bool:
    """Start the node's ControlMaster in this terminal (ssh asks here); whether it came up."""
    import subprocess  # here, not at the top: every command (and the hooks) imports this module

    from dxflow.ssh import control

    ctl = control.control_path(node)
    control.ensure_control_dir()
    print(f"dxflow: {node} asks for more than your SSH keys; log in once (ssh keeps the connection):",
          file=sys.stderr)
    try:
        return subprocess.run(control.login_argv(node, ctl), timeout=LOGIN_TIMEOUT).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as e:
        print(f"dxflow: ssh to {node}: {e}", file=sys.stderr)
        return False


def interactive() -> bool:
    return os.isatty(0) and os.isatty(2)


def run(func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """``func(args)``; when it cannot reach an agent because a node needs a login, log in and run it again."""
    try:
        return int(func(args) or 0)
    except AgentUnreachable:
        if not interactive():
            raise
        nodes = nodes_needing_login()
        if not nodes or not all([log_in(n) for n in nodes]):
            raise
    return int(func(args) or 0)
