"""IBM Spectrum LSF: the job as HOST_PRE_EXEC / HOST_POST_EXEC see it, jobs from ``bjobs -json``.

Hooks (CONTRACTS.md §3). Host-based pre/post-exec run on every host of the job under
``/bin/sh -c`` in /tmp, stdio on /dev/null, with the job's environment: ``LSB_JOBID``,
``LSB_JOBINDEX``, ``LSB_HOSTS`` (one entry per slot), ``LSB_MCPU_HOSTS`` ("hostA 2 hostB 1").
They run as the job's user by default, or as the user ``LSB_PRE_POST_EXEC_USER`` names
(root, at sites that want the agent's record kept by root).

Who the job's user is:
- run as a user: that user — the only one an unprivileged hook can start an agent for;
- run as root: the environment is the job's, written by its user, so it names nobody.
  LSF's own answer is asked instead — ``bjobs`` for the job's USER — with the LSF
  settings (``LSF_ENVDIR``, ``LSF_BINDIR``) of the sbatchd that runs the hook, read from
  /proc, never those of the job's environment.

Queries. ``bjobs -json -o "<fields>"`` (LSF 10.1 FP5 and later); trimmed::

    {"COMMAND": "bjobs", "JOBS": 1,
     "RECORDS": [{"JOBID": "1234", "JOBINDEX": "0", "USER": "alice", "STAT": "RUN",
                  "EXEC_HOST": "2*n1:n2", "JOB_NAME": "run", "EXEC_CWD": "/home/alice",
                  "OUTPUT_FILE": "/home/alice/run.%J.out", "ERROR_FILE": ""}]}

A job LSF no longer knows comes back as ``{"JOBID": "1234", "ERROR": "Job <1234> is not found"}``
(and older releases print that on stderr and exit 255).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
from typing import Any, Sequence

from dxflow.errors import SchedulerError
from dxflow.schedulers.base import SAFE_NAME, JobInfo, JobState, Scheduler, check_name, first_env, run
from dxflow.schedulers.pbs import unique_hosts

log = logging.getLogger(__name__)

#: The LSF settings a query needs, and the daemons whose environment carries the site's values.
LSF_SETTINGS = ("LSF_ENVDIR", "LSF_BINDIR", "LSF_SERVERDIR", "LSF_LIBDIR")
LSF_DAEMONS = ("sbatchd", "res")
#: PATH for anything run as root: fixed, never the job's.
ROOT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"


def lsf_hosts(text: str) -> list[str]:
    """Hosts of ``LSB_MCPU_HOSTS`` ("n1 2 n2 1"), ``LSB_HOSTS`` ("n1 n1 n2") or ``EXEC_HOST`` ("2*n1:n2")."""
    tokens = text.replace(":", " ").split()
    if len(tokens) % 2 == 0 and tokens and all(t.isdigit() for t in tokens[1::2]):
        tokens = tokens[0::2]  # name, slots, name, slots …
    return unique_hosts(t.partition("*")[2] if "*" in t else t for t in tokens)


def daemon_environ(names: Sequence[str] = LSF_DAEMONS, pid: int | None = None, depth: int = 16) -> dict[str, str]:
    """The environment of the nearest root-owned ancestor named in ``names`` (the sbatchd running us); {} if none."""
    pid = os.getppid() if pid is None else pid
    for _ in range(depth):
        if pid <= 1:
            break
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            owner = os.stat(f"/proc/{pid}").st_uid
        except OSError:
            break
        comm = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode(errors="replace")
        if owner == 0 and comm in names:
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    raw = f.read()
            except OSError:
                return {}
            pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
            return {k: v for k, _, v in pairs}
        pid = int(stat[stat.rindex(b")") + 2:].split()[1])
    return {}


def expand_lsf_pattern(path: str, job: str, index: str) -> str:
    """``%J`` and ``%I`` of bsub -o/-e."""
    return path.replace("%J", job).replace("%I", index or "0") if "%" in path else path


class LSF(Scheduler):
    name = "lsf"
    # user: see hook_args — never taken from the environment.
    hook_env = {
        "job": ("LSB_JOBID",),
        "nodes": ("LSB_MCPU_HOSTS", "LSB_HOSTS"),
        "work_dir": ("LS_EXECCWD", "LS_SUBCWD"),
        "stdout": ("LSB_OUTPUTFILE",),
        "stderr": ("LSB_ERRORFILE",),
    }
    state_map = {
        "PEND": JobState.PENDING, "PSUSP": JobState.PENDING, "WAIT": JobState.PENDING,
        "RUN": JobState.RUNNING, "USUSP": JobState.RUNNING, "SSUSP": JobState.RUNNING,
        "PROV": JobState.RUNNING,
        "DONE": JobState.ENDED, "EXIT": JobState.ENDED, "ZOMBI": JobState.ENDED,
        "UNKWN": JobState.UNKNOWN,
    }
    passthrough_env = LSF_SETTINGS
    commands = ("bjobs",)
    fields = ("jobid", "jobindex", "user", "stat", "exec_host", "job_name", "exec_cwd", "output_file", "error_file")

    # -- hooks ---------------------------------------------------------------
    def hook_args(self, argv: Sequence[str]) -> dict[str, str]:
        """The job id (with its array index) and, depending on who runs the hook, its user."""
        job = first_env(self.environ, self.hook_env["job"])
        if not job:
            return {}
        check_name("job id", job)
        index = self.environ.get("LSB_JOBINDEX", "")
        out = {"job": f"{job}[{index}]" if index.isdigit() and index != "0" else job}
        if os.getuid() != 0:
            out["user"] = pwd.getpwuid(os.getuid()).pw_name
            return out
        # root: nothing of the job's environment may decide what root runs or whom it starts an agent for
        trusted = {k: v for k, v in daemon_environ().items() if k in LSF_SETTINGS}
        for key in LSF_SETTINGS:
            self.environ.pop(key, None)
        self.environ.update(trusted, PATH=ROOT_PATH)
        info = self.job(out["job"])
        if info is None or not info.user:
            log.error("job %s: LSF does not know it (bjobs), so its user is unknown", out["job"])
            return out
        out["user"] = info.user
        return out

    def expand_nodes(self, text: str) -> list[str]:
        return lsf_hosts(text)

    # -- queries -------------------------------------------------------------
    def client_dirs(self) -> list[str]:
        return [self.environ["LSF_BINDIR"]] if self.environ.get("LSF_BINDIR") else []

    def backend(self) -> str:
        return "bjobs -json -o FIELDS"

    def backend_why(self) -> str:
        return (f"LSF prints chosen job fields as JSON with bjobs -json -o (10.1 Fix Pack 5 and later); "
                f"FIELDS: {' '.join(self.fields)}")

    def query_env(self) -> dict[str, str]:
        env = {k: v for k, v in self.environ.items() if k in LSF_SETTINGS or k in ("PATH", "HOME", "LANG", "USER")}
        env.setdefault("PATH", ROOT_PATH)
        return env

    def bjobs(self, args: Sequence[str]) -> list[dict[str, Any]]:
        argv = [self.command("bjobs"), "-json", "-o", " ".join(self.fields), *args]
        try:
            out = run(argv, env=self.query_env())
        except SchedulerError as e:
            said = f"{e.stderr}\n{e.stdout}"
            if "is not found" in said or "No unfinished job found" in said or "No job found" in said:
                return []
            raise
        try:
            data = json.loads(out) if out.strip() else {}
        except ValueError as e:
            raise SchedulerError(f"bjobs -json printed invalid JSON ({e})") from e
        records = data.get("RECORDS") or []
        return [r for r in records if isinstance(r, dict) and not r.get("ERROR")]

    def jobs(self, user: str | None = None) -> list[JobInfo]:
        if user is not None:
            check_name("user", user)
        infos = [self._info(r) for r in self.bjobs(["-u", user or "all"])]
        return [i for i in infos if user is None or i.user == user]

    def job(self, job_id: str) -> JobInfo | None:
        check_name("job id", job_id)
        for info in (self._info(r) for r in self.bjobs([job_id])):
            if info.job == job_id:
                return info
        return None

    def _info(self, record: dict[str, Any]) -> JobInfo:
        jobid = str(record.get("JOBID", ""))
        index = str(record.get("JOBINDEX", "") or "")
        job = f"{jobid}[{index}]" if index.isdigit() and index != "0" else jobid
        exec_host = str(record.get("EXEC_HOST", "") or "")
        user = str(record.get("USER", ""))
        return JobInfo(
            job=job, user=user if SAFE_NAME.match(user) else "", state=self.map_state(str(record.get("STAT", ""))),
            nodes=lsf_hosts(exec_host) if exec_host != "-" else [], name=str(record.get("JOB_NAME", "")),
            work_dir=str(record.get("EXEC_CWD", "") or ""),
            stdout=expand_lsf_pattern(str(record.get("OUTPUT_FILE", "") or ""), jobid, index),
            stderr=expand_lsf_pattern(str(record.get("ERROR_FILE", "") or ""), jobid, index),
        )
