"""The Debian packages the lab needs, checked with dpkg-query and installed with apt-get."""

from __future__ import annotations

import logging
from typing import Sequence

from dxflow.errors import UsageError
from dxflow.lab.runner import run

log = logging.getLogger(__name__)

REQUIRED_PACKAGES: tuple[str, ...] = (
    "slurm-wlm",       # slurmctld, slurmd, sbatch, srun, sinfo ...
    "munge",           # Slurm's authentication
    "openssh-server",  # one sshd per node
    "iproute2",        # ip: bridge, veth, netns
    "python3-venv",    # the /opt/dxflow venv, from Debian's python3
    "util-linux",      # nsenter, unshare, runuser
)

APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}


def parse_dpkg_status(output: str) -> set[str]:
    """Installed package names from ``dpkg-query -W -f='${Package} ${db:Status-Abbrev}\\n'``.

    Sample line: ``munge ii `` (the second field starts with ``ii`` when installed).
    """
    installed = set()
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1].startswith("ii"):
            installed.add(parts[0].split(":")[0])  # drop an ":amd64" architecture suffix
    return installed


def missing_packages(packages: Sequence[str] = REQUIRED_PACKAGES) -> list[str]:
    """The ones of ``packages`` that dpkg does not list as installed."""
    proc = run(["dpkg-query", "-W", "-f=${Package} ${db:Status-Abbrev}\\n", *packages], check=False,
               what="checking installed packages")
    installed = parse_dpkg_status(proc.stdout)
    return [p for p in packages if p not in installed]


def ensure_packages(*, install: bool = True) -> list[str]:
    """Install what is missing (``apt-get``); return the names installed.

    With ``install=False`` a missing package is an error that names each one.
    """
    missing = missing_packages()
    if not missing:
        return []
    if not install:
        raise UsageError(f"missing packages: {' '.join(missing)}; install them with "
                         f"`apt-get install -y {' '.join(missing)}` or run `dxflow lab up` without --no-install")
    log.info("installing packages: %s", " ".join(missing))
    run(["apt-get", "update"], env=APT_ENV, timeout=900, what="apt-get update")
    run(["apt-get", "install", "-y", *missing], env=APT_ENV, timeout=1800, what="installing packages")
    still = missing_packages()
    if still:
        raise UsageError(f"apt-get ran but these packages are still missing: {' '.join(still)}")
    return missing
