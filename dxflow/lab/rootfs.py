"""A cached root file system per Slurm generation: built once with mmdebstrap, then reused (issue #12).

A site may run any Slurm from 22.05 on, and Slurm's clients must match its controller's generation,
so a lab of another generation runs inside a root file system of the Debian release that ships it.
Each is built once into ``/var/cache/dxflow-lab/rootfs/<generation>``; a marker file in it, written
last, lists the versions installed and says the build finished. A directory without the marker is
what an interrupted build left: it is removed and built again.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from dxflow.errors import UsageError
from dxflow.lab.runner import LabError, run

log = logging.getLogger(__name__)

#: Where every generation's root file system is kept between runs.
CACHE = Path("/var/cache/dxflow-lab/rootfs")
#: Written last by a build, inside the root: ``{"generation", "suite", "packages": {name: version}}``.
MARKER = ".dxflow-rootfs.json"
MIRROR = "http://deb.debian.org/debian"

#: What a generation's root holds: Slurm's daemons and clients, their authentication, an sshd for the
#: lab's nodes and its client (dxflow's master reads ``ssh -G``; sid's openssh-server no longer pulls it
#: in), Python for dxflow, ``ip`` for the lab's network, and curl, which the lab tests run in there call.
#: A cached root that lacks one of them is built again.
PACKAGES: tuple[str, ...] = (
    "munge", "slurmctld", "slurmd", "slurm-client", "openssh-server", "openssh-client", "python3",
    "python3-venv", "iproute2", "procps", "curl",
)


@dataclass(frozen=True)
class Generation:
    """A Slurm generation a site may run, and the Debian release whose packages ship it."""

    name: str      # "24.11": what ``dxflow lab up --slurm`` takes
    suite: str     # the Debian suite mmdebstrap builds from
    version: str   # slurm-wlm's version in that suite when this table was written
    source: str    # where the pairing was read


#: Measured with ``apt-cache policy slurm-wlm`` against deb.debian.org on the lab machine (issue #12).
GENERATIONS: dict[str, Generation] = {g.name: g for g in (
    Generation("22.05", "bookworm", "22.05.8",
               "Debian 12 (bookworm), slurm-wlm 22.05.8-4: the host's own Slurm"),
    Generation("24.11", "trixie", "24.11.5",
               "Debian 13 (trixie), slurm-wlm 24.11.5"),
    Generation("26.05", "sid", "26.05.5",
               "Debian unstable (sid, and forky), slurm-wlm 26.05.5"),
)}


def generation(name: str) -> Generation:
    """The generation called ``name``; a clear error naming the known ones otherwise."""
    try:
        return GENERATIONS[name]
    except KeyError:
        raise UsageError(f"unknown Slurm generation {name!r}: the lab knows "
                         f"{', '.join(GENERATIONS)}") from None


def path(name: str, cache: Path = CACHE) -> Path:
    return cache / generation(name).name


def read_marker(root: Path) -> dict | None:
    """The marker of a finished build, or None (absent, unreadable, or not ours)."""
    try:
        data = json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("packages"), dict) else None


def inside_root(top: Path = Path("/")) -> bool:
    """True when this process runs in a generation's root (its marker is at ``/``): a generation lab."""
    return (top / MARKER).is_file()


def is_complete(root: Path, packages: tuple[str, ...] = PACKAGES) -> bool:
    """A finished build holding every one of ``packages`` (a root built from an older list is not)."""
    marker = read_marker(root)
    if marker is None:
        return False
    # one the marker does not list may have come in as another's dependency: the root's dpkg knows
    unlisted = tuple(p for p in packages if p not in marker["packages"])
    return not unlisted or set(unlisted) <= set(installed_versions(root, unlisted))


def installed_versions(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    """``{package: version}`` of ``packages`` in ``root``, read from its dpkg database (nothing runs in it).

    Sample line of ``dpkg-query -W -f='${Package} ${Version} ${db:Status-Abbrev}\\n'``:
    ``slurmd 24.11.5-1 ii ``."""
    proc = run(["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W",
                "-f=${Package} ${Version} ${db:Status-Abbrev}\\n", *packages],
               check=False, what="reading the root file system's packages")
    versions = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[2].startswith("ii"):
            versions[parts[0].split(":")[0]] = parts[1]
    return versions


def ensure(name: str, *, cache: Path = CACHE, mirror: str = MIRROR, timeout: float = 3600) -> Path:
    """The root file system of generation ``name``, built first when the cache has no finished one."""
    gen = generation(name)
    root = cache / gen.name
    if is_complete(root):
        return root
    if root.exists():
        log.info("removing the unfinished or outdated root file system %s", root)
        shutil.rmtree(root)
    if shutil.which("mmdebstrap") is None:
        raise LabError("mmdebstrap is not installed: `apt-get install -y mmdebstrap` "
                       "(dxflow lab up installs it with the lab's packages)")
    cache.mkdir(parents=True, exist_ok=True)
    log.info("building the Slurm %s root file system from Debian %s into %s (once)", gen.name, gen.suite, root)
    # minbase: no init system nor daemons started; the lab starts what it needs itself. Valid-Until off:
    # the archive this machine reaches is a frozen snapshot whose sid Release file has expired ("Release
    # file ... is expired", seen 2026-11); its signature is still checked.
    run(["mmdebstrap", "--variant=minbase", "--mode=root", f"--include={','.join(PACKAGES)}",
         '--aptopt=Acquire::Check-Valid-Until "false"', gen.suite, str(root), mirror], timeout=timeout, what=f"building the Slurm {gen.name} root file system")
    versions = installed_versions(root)
    missing = [p for p in PACKAGES if p not in versions]
    if missing:
        raise LabError(f"the Slurm {gen.name} root file system lacks {' '.join(missing)} after mmdebstrap; "
                       f"it stays unfinished in {root} and is rebuilt next time")
    marker = {"generation": gen.name, "suite": gen.suite, "packages": versions}
    tmp = root / (MARKER + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    tmp.rename(root / MARKER)  # the marker appears whole or not at all
    return root
