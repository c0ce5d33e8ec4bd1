"""The OpenSSH ControlMaster of a node: where its socket lives, and the argv of every ssh command on it.

One ControlMaster per node (``ssh -M``; per job where pam_slurm_adopt adopts logins) carries every
channel dxflow opens to that node (``ssh -S CTL -W 127.0.0.1:PORT NODE``) and every file it reads
(``ssh -S CTL NODE cat PATH``). Its socket lies in ``~/.dxflow/hosts/HOST/ssh/`` (0700; per login
host, :mod:`dxflow.layout`: two login nodes sharing one home keep their own), named by a hash of the
node's name, and of the job's for a job's own (a socket's path has ~108 bytes, and ssh adds a 17-byte
suffix while it creates one).

The master (no terminal) starts ControlMasters with ``BatchMode=yes``; a node that needs a prompt
(MFA, a password) is started by the CLI in the user's terminal with :func:`login_argv`, and the
master then uses its socket. Standard library only: the CLI imports it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

from dxflow.errors import ConfigError
from dxflow.layout import UserLayout, ensure_private_dir

SSH = "ssh"
#: a ControlMaster with no channel for this long exits (the master holds one per agent, so only
#: nodes without agents go idle): nothing dxflow starts outlives its use by more than this.
PERSIST = 600
SERVER_ALIVE = 15

#: the ControlMaster carries dxflow's channels only: nothing the user's config would add to an
#: interactive login (forwardings, a local command, a tty)
MASTER_OPTIONS = ("-o", "ClearAllForwardings=yes", "-o", "PermitLocalCommand=no", "-o", "RequestTTY=no",
                  "-o", f"ServerAliveInterval={SERVER_ALIVE}", "-o", f"ControlPersist={PERSIST}")
#: a client of the ControlMaster never connects on its own: no master, no connection
#: (ProxyCommand=none would not stop it; a proxy that fails does)
CLIENT_OPTIONS = ("-o", "ControlMaster=no", "-o", "BatchMode=yes", "-o", "ProxyJump=none",
                  "-o", "ProxyCommand=/bin/false", "-o", "ClearAllForwardings=yes", "-o", "PermitLocalCommand=no",
                  "-T")

_MASTER_PID = re.compile(r"Master running \(pid=(\d+)\)")


#: the longest socket path ssh can create (sun_path's 108 bytes less its 17-byte temporary suffix)
MAX_PATH = 90


def control_dir(layout: UserLayout | None = None) -> Path:
    """``~/.dxflow/hosts/HOST/ssh``: this login host's ControlMaster sockets."""
    return (layout or UserLayout.of()).ssh_dir


def ensure_control_dir(layout: UserLayout | None = None) -> Path:
    """Create the folder (0700, as every folder up to ``~/.dxflow``); refuse one that is not ours."""
    layout = (layout or UserLayout.of()).ensure()
    return ensure_private_dir(control_dir(layout))


def control_path(node: str, layout: UserLayout | None = None, job: str | None = None) -> Path:
    """The ControlMaster socket for ``node`` (as dxflow names it: the registration's address), or for one
    job's agents on it (where pam_slurm_adopt puts each login in a job: :mod:`dxflow.ssh.adoption`).

    The same length either way: a hash of the node's name, and of the job's after a NUL (no name has one).
    """
    key = node if job is None else f"{node}\0{job}"
    path = control_dir(layout) / hashlib.sha256(key.encode()).hexdigest()[:16]
    if len(str(path).encode()) > MAX_PATH:
        raise ConfigError(f"{path}: too long for a socket ({MAX_PATH} bytes at most); "
                          "set ssh_transport = \"paramiko\" or use a home with a shorter path")
    return path


def _s(path: Path) -> str:
    return str(path).replace("%", "%%")  # ssh expands %-tokens in a ControlPath


def _node(node: str) -> str:
    if not node or node.startswith("-") or any(c.isspace() for c in node):
        raise ConfigError(f"{node!r} is not a node SSH can connect to")
    return node


def _ssh(config_file: str | None) -> list[str]:
    return [SSH, "-F", config_file] if config_file else [SSH]


def master_argv(node: str, ctl: Path, config_file: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """Start the node's ControlMaster without a terminal: it authenticates without asking, or fails.

    ``extra``: ``-o`` options of the caller's, placed first (ssh takes the first value it is given, so
    they win over :data:`MASTER_OPTIONS` and over the user's ssh_config)."""
    return [*_ssh(config_file), "-f", "-N", "-M", "-S", _s(ctl), *extra, *MASTER_OPTIONS, "-o", "BatchMode=yes",
            _node(node)]


def login_argv(node: str, ctl: Path, config_file: str | None = None) -> list[str]:
    """Start the node's ControlMaster in the user's terminal: prompts (MFA, password) reach the user once."""
    return [*_ssh(config_file), "-f", "-N", "-M", "-S", _s(ctl), *MASTER_OPTIONS, _node(node)]


def check_argv(node: str, ctl: Path, config_file: str | None = None) -> list[str]:
    return [*_ssh(config_file), "-S", _s(ctl), "-O", "check", _node(node)]


def exit_argv(node: str, ctl: Path, config_file: str | None = None) -> list[str]:
    return [*_ssh(config_file), "-S", _s(ctl), "-O", "exit", _node(node)]


def channel_argv(node: str, ctl: Path, host: str, port: int, config_file: str | None = None) -> list[str]:
    """A byte stream to HOST:PORT as seen from the node, on stdin/stdout."""
    if not 0 < port < 65536 or not re.fullmatch(r"[\w.:-]+", host):
        raise ConfigError(f"{host}:{port} is not an address a channel can go to")
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return [*_ssh(config_file), "-S", _s(ctl), *CLIENT_OPTIONS, "-W", where, _node(node)]


def command_argv(node: str, ctl: Path, remote: str, config_file: str | None = None) -> list[str]:
    """Run ``remote`` (a command line for the user's shell there, already quoted) on the node."""
    return [*_ssh(config_file), "-S", _s(ctl), *CLIENT_OPTIONS, _node(node), remote]


def master_pid(check_output: str) -> int | None:
    """The ControlMaster's pid from ``ssh -O check`` (sample: ``Master running (pid=4242)``)."""
    m = _MASTER_PID.search(check_output)
    return int(m.group(1)) if m else None


def needs_prompt(stderr: str) -> bool:
    """Whether a BatchMode login failed only because the server wants answers typed by a person.

    Sample: ``alice@n3: Permission denied (keyboard-interactive).`` — the methods still open
    are listed; a prompt can help when one of them asks the user something.
    """
    m = re.search(r"Permission denied \(([^)]*)\)", stderr)
    if m is None:
        return False
    return any(k in m.group(1).split(",") for k in ("keyboard-interactive", "password"))
