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

What each daemon keeps on the node while the job runs there, and removes at its end (the agent's
local signs, issue #11): pbs_mom, ``$PBS_HOME/mom_priv/jobs/<job id>.JB`` on every host and ``.SC``
on the primary, root's, mode 0600 in a folder of mode 0751 (pbs_postinstall), removed when the job
is purged (``job_purge``: the .SC, then the .JB). sbatchd, on the first execution host, the job's
own folder ``/tmp/<job id>.tmpdir`` (``<job id>_<index>.tmpdir`` for an array element), mode 0700,
the job's user's, made before the pre-execution commands and removed when the job is done (lsf.conf
LSB_JOB_TMPDIR; openlava ``createJobTmpDir``), and the job file above.

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


def pbs_job_arrive(pbs_home: Path, job: str, primary: bool = True) -> None:
    """pbs_mom takes the job (before any prologue or hook): its job file, and the script on the primary."""
    jobs = pbs_home / "mom_priv" / "jobs"
    jobs.mkdir(parents=True, exist_ok=True)
    jobs.chmod(0o751)
    (jobs / f"{job}.JB").write_bytes(b"\0" * 64)
    (jobs / f"{job}.JB").chmod(0o600)
    if primary:
        (jobs / f"{job}.SC").write_text("#!/bin/sh\n")
        (jobs / f"{job}.SC").chmod(0o700)


def pbs_job_purge(pbs_home: Path, job: str) -> None:
    """pbs_mom purges the job once it is over (after the epilogue and the copy of its output)."""
    jobs = pbs_home / "mom_priv" / "jobs"
    (jobs / f"{job}.SC").unlink(missing_ok=True)
    (jobs / f"{job}.JB").unlink(missing_ok=True)


def pbs_stage_out(spool_file: Path, final: Path, user: str) -> None:
    """The end of the job: the spooled stream copied to its final path (as the user), then removed."""
    shutil.copyfile(spool_file, final)
    _give(final, user, 0o644)
    spool_file.unlink()


def lsf_tmpdir(job: str, index: str = "0", tmp: Path = Path("/tmp")) -> Path:
    return tmp / (f"{job}_{index}.tmpdir" if index not in ("", "0") else f"{job}.tmpdir")


def lsf_spool_open(user: str, job: str, index: str = "0") -> tuple[Path, Path]:
    """(job file, its .out) as sbatchd creates them when the job starts, and the job's own /tmp folder."""
    folder = lsf_tmpdir(job, index)
    folder.mkdir(exist_ok=True)
    _give(folder, user, 0o700)
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
    """The end of the job: <job file>.out copied to bsub -o's file, the spool files and the job's /tmp
    folder removed."""
    out = job_file.with_name(job_file.name + ".out")
    shutil.copyfile(out, final)
    _give(final, user, 0o644)
    out.unlink()
    job_file.unlink()
    job, _, index = job_file.name.partition(".")[2].partition(".")
    shutil.rmtree(lsf_tmpdir(job, index or "0"), ignore_errors=True)
