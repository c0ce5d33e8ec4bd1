"""IBM Spectrum LSF: the job as HOST_PRE_EXEC / HOST_POST_EXEC see it, jobs from ``bjobs -json``.

Hooks (docs/schedulers.md). Host-based pre/post-exec run on every host of the job under
``/bin/sh -c`` in /tmp, stdio on /dev/null, with the job's environment: ``LSB_JOBID``,
``LSB_JOBINDEX``, ``LSB_HOSTS`` (one entry per slot), ``LSB_MCPU_HOSTS`` ("hostA 2 hostB 1").
They run as the job's user — LSF's default, and the only way dxflow's hooks work:

- run as a user, the hook starts an agent for that user and nobody else;
- run as root (``LSB_PRE_POST_EXEC_USER=root`` in lsf.sudoers, queue level), nothing tells
  root whose job it is in a way the job's user cannot forge: the environment is the job's,
  written by its user, and with LSF's default ``LSF_ROOT_USER=N`` root may not run ``bjobs``
  (only ``badmin ckconfig``, the ``ls*`` queries, ``lsrun`` and a few others — lsf.conf
  reference, LSF_ROOT_USER). So a hook run as root starts nothing and logs an error that
  says what to configure instead (docs/admin-lsf.md).

Output. Unless ``LSB_STDOUT_DIRECT=Y`` (lsf.conf), sbatchd writes a job's stdout/stderr to
a temporary file and copies it to ``bsub -o``/``-e``'s path when the job finishes (bsub -o
reference); the temporary file is ``<job file>.out`` / ``.err`` next to the job file
``<submit time>.<job id>[.<index>]`` in ``JOB_SPOOL_DIR`` or ``$HOME/.lsbatch``
(:meth:`LSF.spooled_output`). The agent reads it while the job runs.

Queries. ``bjobs -json -o "<fields>"`` (LSF 10.1 Fix Pack 2 and later); trimmed::

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
import re
from typing import Any, Sequence

from dxflow.errors import SchedulerError, UsageError
from dxflow.schedulers.base import SAFE_NAME, JobInfo, JobState, LocalSign, Scheduler, check_name, first_env, run
from dxflow.schedulers.launch import Launcher
from dxflow.schedulers.hostlist import unique_hosts

log = logging.getLogger(__name__)

#: The LSF settings a query needs.
LSF_SETTINGS = ("LSF_ENVDIR", "LSF_BINDIR", "LSF_SERVERDIR", "LSF_LIBDIR")
#: PATH for a query when the environment has none.
ROOT_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin"
#: The job file's name: "<submit time>.<job id>" (".<index>" for an array element) — IBM support note
#: "LSF Job File" (https://www.ibm.com/support/pages/node/629135); mbatchd's "%ld.%s" in openlava.
JOB_FILE = re.compile(r"^\d+\.(\d+)(?:\.(\d+))?$")
#: What a hook run as root logs: LSF gives root no way to tell whose job it is (module docstring).
AS_ROOT = ("LSF runs this hook as root (LSB_PRE_POST_EXEC_USER=root in /etc/lsf.sudoers): root may not ask "
           "bjobs whose job it is (LSF_ROOT_USER=N) and the job's environment is its user's to write, so no "
           "agent is started. Let HOST_PRE_EXEC/HOST_POST_EXEC run as the job's user: drop "
           "LSB_PRE_POST_EXEC_USER, or configure dxflow's two lines in an application profile "
           "(lsb.applications, DEFAULT_APPLICATION in lsb.params), whose commands run as the submitter; "
           "see docs/admin-lsf.md")


def lsf_hosts(text: str) -> list[str]:
    """Hosts of ``LSB_MCPU_HOSTS`` ("n1 2 n2 1"), ``LSB_HOSTS`` ("n1 n1 n2") or ``EXEC_HOST`` ("2*n1:n2")."""
    tokens = text.replace(":", " ").split()
    if len(tokens) % 2 == 0 and tokens and all(t.isdigit() for t in tokens[1::2]):
        tokens = tokens[0::2]  # name, slots, name, slots …
    return unique_hosts(t.partition("*")[2] if "*" in t else t for t in tokens)


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
    #: LSB_JOBFILENAME names the job file, next to which the job's output is spooled (spooled_output);
    #: the job's hosts are what blaunch checks a task's host against (launcher). Never LSB_JOBID: the
    #: agent would look like the job's own process to dxflow.agent.jobenv.
    passthrough_env = LSF_SETTINGS + ("LSB_JOBFILENAME", "LSB_MCPU_HOSTS", "LSB_HOSTS")
    commands = ("bjobs",)
    #: How ``dxflow exec`` commands become the job's (dxflow.schedulers.launch): ``blaunch -no-shell HOST CMD
    #: ARGS`` has sbatchd and RES on HOST start CMD as a task of the job, tracked, limited and killed with it
    #: (LSF command reference, blaunch: "works only under LSF … to launch tasks on hosts that are part of
    #: a job allocation"; rsh-style "blaunch host_name command"; -no-shell: no intermediate shell, so each
    #: argument stays one; options first, as SALOME's ContainerManager runs it). blaunch knows the job by
    #: LSB_JOBID / LSB_JOBINDEX and its hosts by LSB_MCPU_HOSTS / LSB_HOSTS (both handed on by
    #: lsf/host_pre_exec). Its task gets no terminal: ``dxflow shell`` stays the agent's child.
    launcher = Launcher("blaunch", ("-no-shell", "{node}"),
                        source="IBM Spectrum LSF 10.1 command reference, blaunch",
                        env={"LSB_JOBID": "{job_base}", "LSB_JOBINDEX": "{job_index}"},
                        keep_env=LSF_SETTINGS + ("LSB_MCPU_HOSTS", "LSB_HOSTS"))
    fields = ("jobid", "jobindex", "user", "stat", "exec_host", "job_name", "exec_cwd", "output_file", "error_file")

    # -- hooks ---------------------------------------------------------------
    def hook_args(self, argv: Sequence[str]) -> dict[str, str]:
        """The job id (with its array index) and the hook's own user, who is the job's."""
        job = first_env(self.environ, self.hook_env["job"])
        if not job:
            return {}
        check_name("job id", job)
        if os.getuid() == 0:
            raise UsageError(AS_ROOT)
        index = self.environ.get("LSB_JOBINDEX", "")
        return {"job": f"{job}[{index}]" if index.isdigit() and index != "0" else job,
                "user": pwd.getpwuid(os.getuid()).pw_name}

    def expand_nodes(self, text: str) -> list[str]:
        return lsf_hosts(text)

    # -- the job's own cgroups on a node (issue #9) ---------------------------
    # With LSF_PROCESS_TRACKING=Y and LSF_LINUX_CGROUP_ACCT=Y (or LSB_RESOURCE_ENFORCE="memory cpu",
    # which turns accounting on) sbatchd makes one cgroup per job and host, ".../lsf/<cluster>/job.…"
    # (IBM Support, "How does LSF calculate max memory usage from cgroup?"; "Which cgroup subsystems
    # will be used by LSF?": freezer, cpuacct, memory, and cpuset for affinity jobs). Nothing is
    # declared here on purpose: dxflow's LSF hook runs as the job's user (AS_ROOT above), and a user
    # cannot move a process into a cgroup (v1: cgroup.procs belongs to root; v2: the common ancestor's
    # cgroup.procs must be writable), so the prolog never starts the joining launcher (hook.py:
    # start_agent). The rest of the folder name (submit time, index) is not in IBM's documentation
    # either. Where LSF starts HOST_PRE_EXEC inside the job's cgroup the agent is born there;
    # otherwise a command counts against the job only when started with blaunch (docs/admin-lsf.md).
    job_cgroup_v1: tuple[tuple[str, ...], ...] = ()
    job_cgroup_v2: tuple[tuple[str, ...], ...] = ()

    # -- output files: "%J" in bsub -o / -e is the job id, "%I" the array index, 0 outside an array
    # (bsub -o, -e, -oo, -eo reference). Without -o LSF mails the output: no file to read.
    output_patterns = {"%J": ("job",), "%I": ("array_task", "=0")}

    def output_fields(self, job_id: str, user: str = "", name: str = "") -> dict[str, str]:
        """As :meth:`Scheduler.output_fields`, with ``1234[5]`` split into job 1234 and index 5."""
        base, _, index = job_id.partition("[")
        return {**super().output_fields(base, user, name), "array_task": index.rstrip("]")}

    # -- is the job still running on this host, without asking mbatchd (issue #11) -------------------------
    # When sbatchd starts a job on its first execution host it makes, before any pre-execution command,
    # a folder of the job's own, "<jobID>.tmpdir" ("<arrayID>_<arrayIndex>.tmpdir" for an array element)
    # in LSB_JOB_TMPDIR, else LSF_TMPDIR, else /tmp, "permission 0700 and owned by the execution user",
    # and removes it when the job is done (lsf.conf reference, LSB_JOB_TMPDIR, LSF_TMPDIR; "Temporary job
    # directories"; openlava sbatchd/job.c createJobTmpDir before runUPre, removed in finishJob).
    # Other hosts have it only while a blaunch task with TMPDIR runs there (LSF 8 reference, LSF_TMPDIR).
    # The job file "<submit time>.<job id>" that the job's environment names in LSB_JOBFILENAME is made
    # by the child sbatchd before the job starts and removed "when the job finishes" (IBM support note
    # "LSF Job File"); it lives in JOB_SPOOL_DIR or the user's ~/.lsbatch, often on a shared file system,
    # so it is looked at only where the tmpdir is not (the other hosts: one stat per look).
    local_signs = (
        LocalSign("{job_tmp}/{tmp_name}.tmpdir", lasting=True, user_owned=True,
                  source="sbatchd's job-specific temporary folder on the first execution host "
                         "(lsf.conf LSB_JOB_TMPDIR, LSF_TMPDIR)"),
        LocalSign("{job_file}", lasting=True, user_owned=True,
                  source="the job file LSB_JOBFILENAME names (IBM support note \"LSF Job File\")"),
    )
    #: where the job-specific temporary folder is when lsf.conf names no LSB_JOB_TMPDIR or LSF_TMPDIR
    default_tmp = "/tmp"

    def local_sign_fields(self, node: str, job_id: str = "") -> dict[str, str] | None:
        """``{job_tmp}`` from ``$LSF_ENVDIR/lsf.conf`` (read once; not with a ``%H`` in it, which names the
        first host), ``{tmp_name}`` from the job id, ``{job_file}`` when LSB_JOBFILENAME is this job's."""
        conf = self.__dict__.get("_lsf_conf")
        if conf is None:
            envdir = self.environ.get("LSF_ENVDIR") or "/etc"
            conf = self.__dict__["_lsf_conf"] = read_lsf_conf(os.path.join(envdir, "lsf.conf"))
        base, _, index = job_id.partition("[")
        index = index.rstrip("]")
        fields = {"tmp_name": f"{base}_{index}" if index not in ("", "0") else base}
        tmp = conf.get("LSB_JOB_TMPDIR") or conf.get("LSF_TMPDIR") or self.default_tmp
        if "%" not in tmp and os.path.isabs(tmp):
            fields["job_tmp"] = tmp.rstrip("/") or "/"
        named = self.environ.get("LSB_JOBFILENAME", "")
        if os.path.isabs(named) and self._is_job_file(os.path.basename(named), base, index):
            fields["job_file"] = named
        return fields

    # -- queries -------------------------------------------------------------
    def client_dirs(self) -> list[str]:
        return [self.environ["LSF_BINDIR"]] if self.environ.get("LSF_BINDIR") else []

    def backend(self) -> str:
        return "bjobs -json -o FIELDS"

    def backend_why(self) -> str:
        return (f"LSF prints chosen job fields as JSON with bjobs -json -o (10.1 Fix Pack 2 and later); "
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

    def spooled_output(self, job_id: str) -> dict[str, str]:
        """``<job file>.out`` / ``.err`` while the job runs (sbatchd's ``%s.out`` in openlava's
        ``sbatchd/file.c``; the stderr file exists only with ``bsub -e``, else stderr goes to the
        ``.out``). The job file is the one ``LSB_JOBFILENAME`` names (passed on by the hook) when its
        name is this job's, else the newest ``<time>.<job id>`` in ``$HOME/.lsbatch`` — where LSF
        keeps it when ``JOB_SPOOL_DIR`` (lsb.params) is not set. With ``LSB_STDOUT_DIRECT=Y`` the
        ``.out`` is a symlink to the final file, which the caller then reads by its own name."""
        base, _, index = job_id.partition("[")
        index = index.rstrip("]")
        named = self.environ.get("LSB_JOBFILENAME", "")
        home = self.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
        job_file = ""
        if self._is_job_file(os.path.basename(named), base, index):
            job_file = named if os.path.isabs(named) else os.path.join(home, ".lsbatch", named)
        else:
            spool = os.path.join(home, ".lsbatch")
            try:
                names = [n for n in os.listdir(spool) if self._is_job_file(n, base, index)]
            except OSError:
                names = []
            if names:
                job_file = os.path.join(spool, max(names, key=lambda n: int(n.partition(".")[0])))
        return {"stdout": job_file + ".out", "stderr": job_file + ".err"} if job_file else {}

    @staticmethod
    def _is_job_file(name: str, job: str, index: str) -> bool:
        m = JOB_FILE.match(name)
        return bool(m and m.group(1) == job and (m.group(2) or "") == (index if index not in ("", "0") else ""))

    def _info(self, record: dict[str, Any]) -> JobInfo:
        jobid = str(record.get("JOBID", ""))
        index = str(record.get("JOBINDEX", "") or "")
        job = f"{jobid}[{index}]" if index.isdigit() and index != "0" else jobid
        fields = self.output_fields(job)
        exec_host = str(record.get("EXEC_HOST", "") or "")
        user = str(record.get("USER", ""))
        return JobInfo(
            job=job, user=user if SAFE_NAME.match(user) else "", state=self.map_state(str(record.get("STAT", ""))),
            nodes=lsf_hosts(exec_host) if exec_host != "-" else [], name=str(record.get("JOB_NAME", "")),
            work_dir=str(record.get("EXEC_CWD", "") or ""),
            stdout=self.expand_output(str(record.get("OUTPUT_FILE", "") or ""), fields),
            stderr=self.expand_output(str(record.get("ERROR_FILE", "") or ""), fields),
        )


def read_lsf_conf(path: str) -> dict[str, str]:
    """``NAME=value`` lines of lsf.conf (quotes removed); {} when it cannot be read."""
    try:
        with open(path, errors="replace") as f:
            text = f.read(1 << 20)
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key and not key.startswith("#"):
            out[key.strip()] = value.strip().strip("\"'")
    return out
