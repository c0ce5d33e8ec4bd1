"""What the master needs of an SSH transport, and which transport a node gets.

Two transports offer it: paramiko (:class:`dxflow.master.tunnels.TunnelPool`, in-process, no
process per channel) and the user's OpenSSH client (:class:`dxflow.ssh.openssh.OpenSSHPool`, every
``ssh_config`` feature). ``ssh_transport`` chooses: ``"auto"`` (the default) takes paramiko for a
node where it can authenticate with the user's keys or agent and verify the host key against
known_hosts, and OpenSSH otherwise (host certificates, hostbased, GSSAPI, keyboard-interactive/MFA,
or a setting paramiko cannot honour: :meth:`dxflow.ssh.options.HostOptions.why_openssh`);
``"paramiko"`` or ``"openssh"`` forces one. The user's ``~/.dxflow/config`` wins over the site's
``/etc/dxflow/dxflow.toml``. docs/ssh.md explains the choice to admins.
"""

from __future__ import annotations

import re
import socket
import tomllib
from pathlib import Path
from typing import Protocol

from dxflow.config import SiteConfig
from dxflow.errors import ConfigError
from dxflow.layout import UserLayout

TRANSPORTS = ("auto", "paramiko", "openssh")


class Transport(Protocol):
    """One transport per node, reused by every request to that node's agents.

    A *generation* numbers the connections to a node: what was proven about an agent on one
    connection holds for that connection only, so a channel can be asked for "on generation G, or
    not at all". 0 stands for this very host (no tunnel).
    """

    def connect(self, address: str, job: str | None = None) -> int:
        """Connect to the node if needed; the generation of the connection JOB's agents use there (one per
        job where pam_slurm_adopt adopts logins: :mod:`dxflow.ssh.adoption`; else one per node)."""

    def generation(self, address: str, job: str | None = None) -> int | None:
        """The generation of the live connection JOB's agents use on the node; None when none is up.
        Never connects."""

    def note(self, address: str, job: str | None, generation: int) -> str:
        """What JOB's agent says in ``dxflow ls`` about using connection ``generation`` ("" mostly)."""

    def channel(self, address: str, port: int, timeout: float = ..., generation: int | None = None,
                host: str = "127.0.0.1") -> socket.socket:
        """A byte stream to HOST:PORT as seen from the node (socket-like: settimeout, sendall, recv, close)."""

    def read_file(self, address: str, path: str, generation: int | None = None) -> bytes:
        """A file of the node; FileNotFoundError if it does not exist."""

    def status(self) -> dict[str, dict]:
        """Per node: connected, failures, error, transport."""

    def close(self) -> None:
        """Let go of every connection this process made."""


#: a cgroup path of a process pam_slurm_adopt put in a job (sample line of /proc/self/cgroup:
#: ``4:memory:/slurm/uid_1003/job_89/step_extern``; the lab nests it: ``.../dxlab/n1/slurm_n1/uid_1003/...``)
_ADOPTED = re.compile(r"/job_(\d+)/step_extern(?:/|$)", re.MULTILINE)


def adopted_job(cgroups: str) -> str | None:
    """The job whose ``step_extern`` holds the process whose ``/proc/PID/cgroup`` this is; None if none."""
    m = _ADOPTED.search(cgroups)
    return m.group(1) if m else None


class UseOpenSSH(Exception):
    """paramiko cannot connect to this node as the user's OpenSSH would; the message says why."""


def check(value: object, where: str) -> str:
    if value not in TRANSPORTS:
        raise ConfigError(f"{where}: ssh_transport must be one of {', '.join(TRANSPORTS)}, not {value!r}")
    return str(value)


def user_setting(path: Path) -> str | None:
    """``ssh_transport`` from the user's ``~/.dxflow/config``; None when it does not say."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}; fix or remove the file") from e
    if "ssh_transport" not in data:
        return None
    return check(data["ssh_transport"], str(path))


def transport_setting(site: SiteConfig | None = None, layout: UserLayout | None = None) -> str:
    """The user's ``ssh_transport`` if set, else the site's (default ``"auto"``)."""
    layout = layout or UserLayout.of()
    chosen = user_setting(layout.user_config)
    if chosen is not None:
        return chosen
    site = site or SiteConfig.load()
    return check(site.ssh_transport, "site config")
