"""What dxflow keeps in a user's ``~/.dxflow``: every file's name and mode, in one place.

The home is shared by the login nodes and the compute nodes, and a site may have several login
nodes behind one name. So ``~/.dxflow`` holds two kinds of things:

Shared by every host (agents on compute nodes write them, any login node reads them)::

    ~/.dxflow/                      0700  refused when not the user's own (UserLayout.ensure)
      id_rsa                        0600  the user's signing key (dxflow.auth; made on first use)
      id_rsa.pub                    0644
      fleet/                        0700  one registration per agent (dxflow.registration)
        CLUSTER.JOB.NODE.json       0600
      logs/                         0700
        CLUSTER.JOB.NODE.log        0600  an agent's log (dxflow.agent.server)
        hooks.log                   0600  hooks run as the job's user (LSF's default; dxflow.hook)
      run/                          0700  records of the agents such hooks started (dxflow.hook)
      forward/                      0700  `dxflow forward --unix`'s default sockets (0600)
      config                        0600  the user's own settings, TOML (dxflow.ssh.transport)
      reports/                      0700  jobs' resource reports: JOB.json, JOB/NODE.json (dxflow.metrics)

Kept per login host, in ``hosts/HOST/`` (HOST: this host's name, :func:`this_host`), so that two
masters of one user on two login nodes never touch each other's files::

      hosts/HOST/                   0700
        master.sock                 0600  the CLI's way to the master (dxflow.master.client)
        console.sock                0600  the web console, for `ssh -L PORT:SOCKET` (dxflow.master.console)
        master.lock                 0600  held (flock) by the running master for its lifetime
        master.pid                  0644  gunicorn's pid file (gunicorn's mode; informative: the lock decides)
        master.log                  0600  the master's log
        fleet.db                    0600  the master's registry (SQLite; dxflow.master.registry)
        console.json                0600  the console's TCP port, reused by the next master
        ssh/                        0700  OpenSSH ControlMaster sockets to the nodes (dxflow.ssh.control)

A Unix socket on a shared home is reachable only from the host whose kernel listens on it, and
``flock`` over NFS is seen by every client: with the files per host, neither crosses hosts.

Earlier releases kept the per-host files directly in ``~/.dxflow`` (:attr:`UserLayout.legacy`);
:class:`dxflow.master.client.MasterClient` stops a master of that layout running on this host.

Imported by the scheduler hooks: standard library only.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from dxflow.errors import ConfigError

FOLDER_MODE = 0o700
FILE_MODE = 0o600
PUBLIC_KEY_MODE = 0o644

#: dxflow's folder in a user's home.
DOT_DXFLOW = ".dxflow"
# Names, shared by every host.
KEY = "id_rsa"
PUBLIC_KEY = "id_rsa.pub"
FLEET = "fleet"
LOGS = "logs"
RUN = "run"
FORWARD = "forward"
HOOK_LOG = "hooks.log"
USER_CONFIG = "config"
REPORTS = "reports"
HOSTS = "hosts"
# Names, per host (in hosts/HOST/, or in ~/.dxflow itself in the legacy layout).
MASTER_SOCK = "master.sock"
CONSOLE_SOCK = "console.sock"
MASTER_LOCK = "master.lock"
MASTER_PID = "master.pid"
MASTER_LOG = "master.log"
FLEET_DB = "fleet.db"
CONSOLE_STATE = "console.json"
SSH = "ssh"

#: characters a host name may keep in a folder name; anything else becomes "_".
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def this_host() -> str:
    """This host's name (``uname -n``), safe as one folder name."""
    name = _HOST_UNSAFE.sub("_", socket.gethostname())[:64].lstrip(".")
    return name or "localhost"


def user_home() -> Path:
    """The current user's home: ``$HOME``, else the password database's."""
    return Path(os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir)


@dataclass(frozen=True)
class UserLayout:
    """The paths of one user's ``~/.dxflow`` (``base``) as seen from one host (``host``)."""

    base: Path
    host: str

    @classmethod
    def of(cls, home: str | os.PathLike[str] | None = None, host: str | None = None) -> "UserLayout":
        """The layout of ``home`` (default: the current user's) on ``host`` (default: this one)."""
        return cls(Path(home if home is not None else user_home()) / DOT_DXFLOW, host or this_host())

    # -- shared by every host -------------------------------------------------------------------
    @property
    def key(self) -> Path:
        return self.base / KEY

    @property
    def public_key(self) -> Path:
        return self.base / PUBLIC_KEY

    @property
    def fleet_dir(self) -> Path:
        return self.base / FLEET

    @property
    def logs_dir(self) -> Path:
        return self.base / LOGS

    @property
    def run_dir(self) -> Path:
        return self.base / RUN

    @property
    def forward_dir(self) -> Path:
        return self.base / FORWARD

    @property
    def user_config(self) -> Path:
        return self.base / USER_CONFIG

    @property
    def reports_dir(self) -> Path:
        return self.base / REPORTS

    def agent_log(self, name: str) -> Path:
        """The log of the agent ``name`` (:func:`dxflow.config.agent_name`)."""
        return self.logs_dir / f"{name}.log"

    @property
    def hook_log(self) -> Path:
        return self.logs_dir / HOOK_LOG

    # -- this host's ------------------------------------------------------------------------------
    @property
    def host_dir(self) -> Path:
        return self.base / HOSTS / self.host

    @property
    def master_sock(self) -> Path:
        return self.host_dir / MASTER_SOCK

    @property
    def console_sock(self) -> Path:
        return self.host_dir / CONSOLE_SOCK

    @property
    def master_lock(self) -> Path:
        return self.host_dir / MASTER_LOCK

    @property
    def master_pid(self) -> Path:
        return self.host_dir / MASTER_PID

    @property
    def master_log(self) -> Path:
        return self.host_dir / MASTER_LOG

    @property
    def fleet_db(self) -> Path:
        return self.host_dir / FLEET_DB

    @property
    def console_state(self) -> Path:
        return self.host_dir / CONSOLE_STATE

    @property
    def ssh_dir(self) -> Path:
        return self.host_dir / SSH

    @property
    def legacy(self) -> "LegacyFiles":
        """Where dxflow kept this host's files before they moved to ``hosts/HOST/``."""
        return LegacyFiles(self.base)

    # -- making it ----------------------------------------------------------------------------------
    def ensure_shared(self) -> "UserLayout":
        """Create ``~/.dxflow`` and its shared folders (0700), as an agent needs them; refuse a
        ``~/.dxflow`` that is not a folder of the user's own, and close one open to others."""
        ensure_private_dir(self.base)
        for path in (self.fleet_dir, self.logs_dir):
            path.mkdir(mode=FOLDER_MODE, exist_ok=True)
        return self

    def ensure(self) -> "UserLayout":
        """:meth:`ensure_shared`, and this host's folder (0700), as a master and its CLI need it."""
        self.ensure_shared()
        (self.base / HOSTS).mkdir(mode=FOLDER_MODE, exist_ok=True)
        ensure_private_dir(self.host_dir)
        return self


def ensure_private_dir(path: Path) -> Path:
    """``path`` made (0700) if missing; refused when it is not a folder of the current user's (a
    symlink, another owner); its mode closed to others when it was open."""
    path.mkdir(mode=FOLDER_MODE, exist_ok=True)
    st = path.lstat()
    if st.st_uid != os.getuid() or not path.is_dir() or path.is_symlink():
        raise ConfigError(f"{path} is not a folder owned by you; remove it and retry")
    if st.st_mode & 0o077:
        os.chmod(path, FOLDER_MODE)
    return path


@dataclass(frozen=True)
class LegacyFiles:
    """The per-host files as dxflow kept them before ``hosts/HOST/``: directly in ``~/.dxflow``."""

    base: Path

    @property
    def master_lock(self) -> Path:
        return self.base / MASTER_LOCK

    @property
    def console_state(self) -> Path:
        return self.base / CONSOLE_STATE

    @property
    def leftovers(self) -> tuple[Path, ...]:
        """What a stopped master of the old layout leaves behind (its registry too: the next master
        rebuilds it from the registrations in ``fleet/``)."""
        return tuple(self.base / name for name in (MASTER_SOCK, CONSOLE_SOCK, MASTER_PID, MASTER_LOCK, CONSOLE_STATE,
                                                   FLEET_DB, f"{FLEET_DB}-wal", f"{FLEET_DB}-shm"))
