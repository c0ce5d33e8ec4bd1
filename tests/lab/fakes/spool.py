"""Stand-ins for how pbs_mom and sbatchd keep a running job's output, and hand it over at the end.

OpenPBS / PBS Pro and Torque (``std_file_name`` / ``open_std_file``, src/resmom/start_exec.c):
a batch job's stdout and stderr are ``$PBS_HOME/spool/<job id>.OU`` / ``.ER`` on the primary
execution host, created as the job's user (mkstemp, then renamed; mode 0666 less the umask)
in a spool folder of mode 1777 (pbs_postinstall). When the job ends, MoM copies them to
``Output_Path`` / ``Error_Path`` and removes the spool files.

LSF (openlava's sbatchd, src ``sbatchd/file.c``; IBM support note "LSF Job File"): the job file
``<submit time>.<job id>`` is written as the job's user in ``$HOME/.lsbatch`` (no
``JOB_SPOOL_DIR``), the job's environment names it in ``LSB_JOBFILENAME``, and unless
``LSB_STDOUT_DIRECT=Y`` the job's output goes to ``<job file>.out`` (mode 0600), which is
copied to ``bsub -o``'s file when the job finishes and then removed.

The functions run as root (the lab tests do) and hand every file to the job's user.
"""
from __future__ import annotations

import os
import pwd
import shutil
import time
from pathlib import Path


def _give(path: Path, user: str, mode: int) -> None:
    pw = pwd.getpwnam(user)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    path.chmod(mode)


def pbs_spool_open(pbs_home: Path, job: str, user: str, suffix: str = ".OU") -> Path:
    """The spooled stream pbs_mom creates when the job starts."""
    spool = pbs_home / "spool"
    spool.mkdir(exist_ok=True)
    spool.chmod(0o1777)
    path = spool / f"{job}{suffix}"
    path.touch()
    _give(path, user, 0o644)
    return path


def pbs_stage_out(spool_file: Path, final: Path, user: str) -> None:
    """The end of the job: the spooled stream copied to its final path (as the user), then removed."""
    shutil.copyfile(spool_file, final)
    _give(final, user, 0o644)
    spool_file.unlink()


def lsf_spool_open(user: str, job: str, index: str = "0") -> tuple[Path, Path]:
    """(job file, its .out) as sbatchd creates them when the job starts."""
    home = Path(pwd.getpwnam(user).pw_dir)
    folder = home / ".lsbatch"
    folder.mkdir(exist_ok=True)
    _give(folder, user, 0o700)
    name = f"{int(time.time())}.{job}" + (f".{index}" if index not in ("", "0") else "")
    job_file = folder / name
    job_file.write_text("#! /bin/sh\n")
    _give(job_file, user, 0o700)
    out = folder / f"{name}.out"
    out.touch()
    _give(out, user, 0o600)
    return job_file, out


def lsf_copy_out(job_file: Path, final: Path, user: str) -> None:
    """The end of the job: <job file>.out copied to bsub -o's file, the spool files removed."""
    out = job_file.with_name(job_file.name + ".out")
    shutil.copyfile(out, final)
    _give(final, user, 0o644)
    out.unlink()
    job_file.unlink()
