"""pyslurm for the Slurm adapter: used when installed, matching the installed Slurm, and safe to import.

Three rules (docs/schedulers.md, "pyslurm"):

- pyslurm MAJOR.MINOR follows Slurm's (22.5.x for 22.05, 23.2.x for 23.02 …); any other
  pairing is refused before anything is imported.
- ``import pyslurm`` calls ``slurm_init()``, which ends the process (``exit(1)``, after
  retrying for up to a minute) where no Slurm configuration can be found. So pyslurm is
  imported only where a slurm.conf exists, and first in a throwaway child process; only
  when that child imported it and listed the jobs is it imported here.
- pyslurm 22.5.2 added the object API (``pyslurm.Jobs.load()``); 22.5.0/22.5.1 have only the
  old dict API (``pyslurm.job().get()``). Both are read.

Nothing here runs until the Slurm adapter is asked for jobs (never in a prolog/epilog).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any, Mapping

from dxflow.schedulers.base import command_path

log = logging.getLogger(__name__)

#: Where Slurm looks for its configuration when SLURM_CONF is not set (Debian/Ubuntu, RHEL, source builds).
CONF_PATHS = ("/etc/slurm/slurm.conf", "/etc/slurm-llnl/slurm.conf", "/usr/local/etc/slurm.conf")
#: The child that proves pyslurm imports and answers here (exits 0 and prints its version).
PROBE = ("import pyslurm\n"
         "jobs = pyslurm.Jobs.load() if hasattr(pyslurm, 'Jobs') else pyslurm.job().get()\n"
         "print(getattr(pyslurm, '__version__', ''))\n")
PROBE_TIMEOUT = 20.0


@dataclass(frozen=True)
class Status:
    """Whether pyslurm is used, and why (or why not)."""

    usable: bool
    reason: str
    pyslurm_version: str = ""
    slurm_version: str = ""


_lock = threading.Lock()
_cache: dict[tuple, Status] = {}


def major_minor(version: str) -> tuple[int, int] | None:
    """``22.05.8`` -> (22, 5); ``22.5.3`` -> (22, 5)."""
    m = re.match(r"^\D*(\d+)\.(\d+)", version or "")
    return (int(m.group(1)), int(m.group(2))) if m else None


def slurm_conf(environ: Mapping[str, str]) -> str:
    """The slurm.conf Slurm would read here, or '' (then importing pyslurm would end the process)."""
    candidates = [environ["SLURM_CONF"]] if environ.get("SLURM_CONF") else list(CONF_PATHS)
    return next((p for p in candidates if os.path.isfile(p)), "")


def pyslurm_version() -> str:
    """The installed pyslurm's version from its metadata (nothing imported); '' when not installed."""
    from importlib import metadata

    try:
        return metadata.version("pyslurm")
    except metadata.PackageNotFoundError:
        return ""


def slurm_version(environ: Mapping[str, str]) -> str:
    """``sinfo --version`` -> ``22.05.8`` (only where a slurm.conf exists: without one sinfo stops)."""
    try:
        out = subprocess.run([command_path("sinfo", environ.get("PATH", os.defpath)), "--version"],
                             capture_output=True, text=True, timeout=10,
                             env=dict(environ), stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    m = re.search(r"(\d+\.\d+\.\d+)", out.stdout)
    return m.group(1) if m and out.returncode == 0 else ""


def status(environ: Mapping[str, str] | None = None, *, probe: bool = True) -> Status:
    """Decide once per process (per SLURM_CONF) whether pyslurm is used; cheap checks first."""
    environ = dict(os.environ if environ is None else environ)
    key = (environ.get("SLURM_CONF", ""), environ.get("PATH", ""), probe)
    with _lock:
        if key not in _cache:
            _cache[key] = _decide(environ, probe)
        return _cache[key]


def _decide(environ: dict[str, str], probe: bool) -> Status:
    have = pyslurm_version()
    if not have:
        return Status(False, "pyslurm is not installed")
    conf = slurm_conf(environ)
    if not conf:
        return Status(False, "no slurm.conf here (SLURM_CONF or /etc/slurm/slurm.conf): importing pyslurm "
                      "would end the process", pyslurm_version=have)
    slurm = slurm_version(environ)
    if not slurm:
        return Status(False, "cannot tell Slurm's version (sinfo --version failed)", pyslurm_version=have)
    if major_minor(have) != major_minor(slurm):
        return Status(False, f"pyslurm {have} does not match Slurm {slurm} (MAJOR.MINOR must be equal)",
                      pyslurm_version=have, slurm_version=slurm)
    if probe:
        try:
            child = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                                   timeout=PROBE_TIMEOUT, env=dict(environ), stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as e:
            return Status(False, f"pyslurm did not load in a test process: {e}", have, slurm)
        if child.returncode != 0:
            tail = " | ".join((child.stderr or child.stdout).strip().splitlines()[-2:])
            return Status(False, f"pyslurm failed in a test process (exit {child.returncode}): {tail}", have, slurm)
    return Status(True, f"pyslurm {have} matches Slurm {slurm} ({conf})", have, slurm)


def load_jobs() -> list[dict[str, Any]]:
    """Every job slurmctld knows, as plain dicts with squeue-like keys (call only when ``status().usable``)."""
    import pyslurm  # noqa: PLC0415 - lazily, and only after status() proved it safe

    out = []
    if hasattr(pyslurm, "Jobs"):  # 22.5.2 and later
        for job in pyslurm.Jobs.load().values():
            out.append({
                "job_id": job.id, "user_name": job.user_name or "", "job_state": str(job.state or ""),
                "nodes": job.allocated_nodes or "", "name": job.name or "",
                "current_working_directory": job.working_directory or "",
                "standard_output": job.standard_output or "", "standard_error": job.standard_error or "",
            })
        return out
    import pwd

    for job_id, job in pyslurm.job().get().items():  # 22.5.0 / 22.5.1: the dict API
        try:
            user = pwd.getpwuid(int(job.get("user_id", -1))).pw_name
        except (KeyError, ValueError, OverflowError):
            user = ""
        out.append({
            "job_id": job_id, "user_name": user, "job_state": str(job.get("job_state") or ""),
            "nodes": job.get("nodes") or "", "name": job.get("name") or "",
            "current_working_directory": job.get("work_dir") or "",
            "standard_output": job.get("std_out") or "", "standard_error": job.get("std_err") or "",
        })
    return out
