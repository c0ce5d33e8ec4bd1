"""OpenPBS / PBS Pro and Torque: the job as their hooks name it, jobs from ``qstat``.

Hooks (docs/schedulers.md). The classic ``mom_priv/prologue`` and ``epilogue`` are run by
pbs_mom as root with the job on argv: 1 job id, 2 user, 3 group (the epilogue gets more,
unused here). Torque's ``prologue.parallel`` / ``epilogue.parallel`` get the same first
three on the sister nodes. The PBS Pro hook ``pbs/dxflow_hook.py`` calls the same routine
with the same three values (``e.job.id``, ``euser``, ``egroup``), so a classic script and
the hook name an agent alike — cluster, job, node — and whichever runs second finds the
first one's agent alive and starts nothing.

OpenPBS's classic prologue gets only MoM's environment — the lines of
``$PBS_HOME/pbs_environment`` (``setup_env``) — plus ``PBS_JOBDIR``, which is the user's
home (``prolog.c`` ``run_pelog``): no ``PBS_O_WORKDIR``. The job's work dir and output
paths are then asked of ``qstat`` by the prolog (:meth:`PBS.complete_hook_job`).

Output. pbs_mom writes a batch job's stdout/stderr to ``$PBS_HOME/spool/<job id>.OU`` /
``.ER`` on the primary execution host and copies them to ``Output_Path`` / ``Error_Path``
only when the job ends (:meth:`PBS.spool_paths` has the rules and their source); the agent
reads the spool while the job runs.

Queries. OpenPBS and PBS Pro (18+) print JSON with ``qstat -f -F json``; trimmed::

    {"timestamp": 1700000000, "pbs_version": "23.06.06", "pbs_server": "head",
     "Jobs": {"123.head": {"Job_Name": "run", "Job_Owner": "alice@login", "job_state": "R",
              "euser": "alice", "egroup": "alice", "exec_host": "n1/0*2+n2/0",
              "Output_Path": "login:/home/alice/run.o123", "Error_Path": "login:/home/alice/run.e123",
              "Join_Path": "n", "Keep_Files": "n",
              "Variable_List": {"PBS_O_WORKDIR": "/home/alice", "PBS_O_HOST": "login"}}}}

Torque's qstat has no JSON; ``qstat -f -x`` prints the same attributes as (almost) XML —
see :mod:`dxflow.schedulers.torque_xml`::

    <Data><Job><Job_Id>123.head</Job_Id><Job_Name>run</Job_Name><Job_Owner>alice@login</Job_Owner>
    <job_state>R</job_state><exec_host>n1/0-1+n2/0</exec_host><Output_Path>login:/home/alice/run.o123</Output_Path>
    <Variable_List>PBS_O_HOME=/home/alice,PBS_O_WORKDIR=/home/alice</Variable_List></Job></Data>
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import re
import stat
from pathlib import Path
from typing import Any, Sequence

from dxflow.errors import SchedulerError, UsageError
from dxflow.jobcgroup import CGROUP_ROOT, JobCgroups, job_cgroups
from dxflow.schedulers import torque_xml
from dxflow.schedulers.base import (SAFE_NAME, HookJob, JobInfo, JobState, LocalSign, Scheduler, check_name,
                                    first_env, run)
from dxflow.schedulers.hostlist import unique_hosts
from dxflow.schedulers.launch import Launcher

log = logging.getLogger(__name__)

#: A node file (PBS_NODEFILE, ``$PBS_HOME/aux/<job>``) holds one line per slot; read no more than this.
MAX_HOSTFILE = 1 << 20


def read_hostfile(path: str) -> list[str]:
    """Host names of a node file, one line per slot; [] when it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return []
            text = f.read(MAX_HOSTFILE).decode("utf-8", "replace")
    except OSError:
        return []
    return unique_hosts(line.split()[0] for line in text.splitlines() if line.strip())


def exec_hosts(value: str) -> list[str]:
    """Hosts of ``exec_host``: ``n1/0*2+n2/0`` (OpenPBS) or ``n1/0-1+n2/0`` (Torque) -> n1 n2."""
    return unique_hosts(part.split("/")[0] for part in str(value or "").split("+") if part)


def strip_host(path: str) -> str:
    """``login:/home/alice/run.o1`` -> ``/home/alice/run.o1`` (Output_Path / Error_Path name the host)."""
    path = str(path or "")
    head, sep, tail = path.partition(":")
    return tail if sep and "/" not in head else path


def parse_variable_list(value: Any) -> dict[str, str]:
    """``Variable_List``: a dict in qstat's JSON, ``A=1,B=x\\,y`` in Torque's XML."""
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    out: dict[str, str] = {}
    for item in re.split(r"(?<!\\),", str(value or "")):
        key, sep, val = item.partition("=")
        if sep:
            out[key.strip()] = val.replace("\\,", ",")
    return out


def sandbox_dir(attrs: dict[str, Any]) -> str:
    """``sandbox=PRIVATE``: the job runs (and spools) in its own staging and execution directory, ``jobdir``."""
    if str(attrs.get("sandbox", "")).upper() != "PRIVATE":
        return ""
    return str(attrs.get("jobdir", "") or "")


def read_conf(path: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of /etc/pbs.conf; {} when it is missing."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            out[key.strip()] = value.strip()
    return out


class PBS(Scheduler):
    """OpenPBS and PBS Professional."""

    name = "pbs"
    # Job, user and group come from argv (hook_args), never from the environment.
    hook_env = {
        # Torque's prologue environment (prolog.c, 4.2.10+) and pbs/dxflow_hook.py carry
        # PBS_O_WORKDIR; OpenPBS's classic prologue does not (complete_hook_job asks qstat). Not
        # PBS_JOBDIR: run_pelog sets it to the user's home, whatever the job's sandbox.
        "work_dir": ("PBS_O_WORKDIR",),
        # set by pbs/dxflow_hook.py from the job's Output_Path / Error_Path
        "stdout": ("DXFLOW_JOB_STDOUT",),
        "stderr": ("DXFLOW_JOB_STDERR",),
    }
    state_map = {
        "Q": JobState.PENDING, "H": JobState.PENDING, "W": JobState.PENDING, "T": JobState.PENDING,
        "R": JobState.RUNNING, "S": JobState.RUNNING, "U": JobState.RUNNING, "B": JobState.RUNNING,
        "E": JobState.ENDING,
        "F": JobState.ENDED, "X": JobState.ENDED, "M": JobState.ENDED, "C": JobState.ENDED,
    }
    passthrough_env: tuple[str, ...] = ("PBS_CONF_FILE", "PBS_HOME", "PBS_EXEC", "PBS_SERVER")
    commands = ("qstat",)
    #: How ``dxflow exec`` / ``shell`` commands become the job's (dxflow.schedulers.launch): ``pbs_attach -j
    #: JOB -- CMD ARGS`` asks the local MoM (tm_attach) to take the caller's session as a task of the job, then
    #: execs CMD in place (src/cmds/pbs_attach.c, pbs_attach_sup.c: getopt "+j:p:h:m:sP", execvp). MoM
    #: accounts for the task, kills it with the job, and the pbs_cgroups hook adds it to the job's cgroups
    #: (execjob_attach). It finds MoM's port in pbs.conf: the hook's PBS_* settings go along. Without -s
    #: the session attached is the agent's own (exec) or the shell's (its own session): the agent too
    #: then counts as the job's; a session attached already is fine (TM_ESESSION is not an error there).
    launcher: Launcher | None = Launcher("pbs_attach", ("-j", "{job}", "--"),
                                         source="OpenPBS src/cmds/pbs_attach.c, pbs_attach_sup.c",
                                         keep_env=passthrough_env, keeps_terminal=True)
    #: every job the server knows, full attributes, as JSON
    qstat: tuple[str, ...] = ("qstat", "-f", "-F", "json")
    #: added when asking for one job: -x also shows finished jobs (job history)
    qstat_one: tuple[str, ...] = ("-x",)
    #: what qstat says for a job it does not know (any more)
    unknown_job: tuple[str, ...] = ("unknown job id", "job has finished")
    conf_env = "PBS_CONF_FILE"
    conf_file = "/etc/pbs.conf"
    home_env: tuple[str, ...] = ("PBS_HOME",)
    default_home = "/var/spool/pbs"
    default_bin: tuple[str, ...] = ("/opt/pbs/bin",)
    #: seconds the prolog waits for qstat: well inside pbs_mom's $prologalarm (30 s by default)
    hook_query_timeout = 10.0
    #: Keep_Files letter for "write the final path directly" (OpenPBS/PBS Pro 19+); Torque has none
    keep_direct = "d"
    #: a kept array subjob file ends in .<index> (OpenPBS std_file_name); Torque's does not
    keep_array_index = True

    # -- hooks ---------------------------------------------------------------
    def hook_args(self, argv: Sequence[str]) -> dict[str, str]:
        """Job id, user and group from the scheduler's argv (classic scripts and the PBS Pro hook alike)."""
        args = list(argv)
        if len(args) < 2:
            raise UsageError(f"{self.name} hook: expected the scheduler's arguments JOB_ID USER [GROUP …], "
                             f"got {len(args)}: is the script installed as the prologue/epilogue?")
        job = check_name("job id", args[0])
        user = check_name("user", args[1])
        out = {"job": job, "user": user, "cluster": self.cluster_of(job)}
        if len(args) > 2:
            gid = self.group_gid(user, args[2])
            if gid is not None:
                out["gid"] = str(gid)
        out["nodes"] = " ".join(self.nodefile_hosts(job))
        for key in ("stdout", "stderr"):  # Output_Path / Error_Path name the submit host: host:/path
            value = first_env(self.environ, self.hook_env[key])
            if value:
                out[key] = strip_host(value)
        return out

    def complete_hook_job(self, job: HookJob) -> None:
        """OpenPBS's classic prologue has no PBS_O_WORKDIR: ask qstat (as root, with MoM's own
        environment) for the work dir and output paths. A failure only logs: the agent then works
        in the home and asks again for its logs."""
        if job.work_dir:
            return
        try:
            info = self.job(job.job, timeout=self.hook_query_timeout)
        except (SchedulerError, UsageError, OSError, ValueError) as e:
            log.warning("job %s: qstat does not say where the job works (%s): the agent starts in the home",
                        job.job, e)
            return
        if info is None:
            log.warning("job %s: unknown to qstat: the agent starts in the home", job.job)
            return
        for key in ("work_dir", "stdout", "stderr"):  # the job's user chose these: one argv element each, no NUL
            value = getattr(info, key)
            if value and "\0" not in value and not getattr(job, key):
                setattr(job, key, value)

    @staticmethod
    def cluster_of(job: str) -> str:
        """``123.head.example`` -> ``head``: the server names the cluster (classic and hook alike)."""
        server = job.partition(".")[2].split(".")[0]
        return server if server and SAFE_NAME.match(server) else ""

    @staticmethod
    def group_gid(user: str, group: str) -> int | None:
        """The job's group (``egroup``) when the user really is in it; None otherwise (the user's own)."""
        if not SAFE_NAME.match(group or ""):
            return None
        try:
            gr = grp.getgrnam(group)
            pw = pwd.getpwnam(user)
        except KeyError:
            return None
        if gr.gr_gid in os.getgrouplist(user, pw.pw_gid):
            return gr.gr_gid
        log.warning("group %r of the job is not one of %s's groups: using the user's own", group, user)
        return None

    def conf(self) -> dict[str, str]:
        path = (self.environ.get(self.conf_env) if self.conf_env else "") or self.conf_file
        return read_conf(path) if path else {}

    def home(self) -> str:
        for name in self.home_env:
            if self.environ.get(name):
                return self.environ[name]
        return self.conf().get("PBS_HOME") or self.default_home

    def nodefile_hosts(self, job: str) -> list[str]:
        """The job's hosts from its node file (``PBS_NODEFILE``, else ``$PBS_HOME/aux/<job>``); [] if unreadable."""
        path = self.environ.get("PBS_NODEFILE") or os.path.join(self.home(), "aux", job)
        return read_hostfile(path)

    # -- is the job still running on this host, without asking the server (issue #11) --------------------
    # pbs_mom keeps a job it runs in "$PBS_HOME/mom_priv/jobs/": "<job id>.JB" (the job, on every host
    # of it: the primary writes it when the job is queued to it, a sister when it joins) and, on the
    # primary, "<job id>.SC" (the script). The name is the job's id: the server sends it as the
    # "hashname" attribute (req_runjob.c) and MoM takes it as the file prefix (req_quejob.c, mom_comm.c
    # JOINJOB; job_save_fs in job_recov_fs.c falls back to the id itself). Both stay until the job is
    # purged from MoM — after the epilogue and the copy of its output — when job_purge removes the .SC,
    # the task folder and then the .JB (src/server/job_func.c). mom_priv and mom_priv/jobs are mode
    # 0751 (pbs_postinstall): the job's user can stat a file there by its name, not list the folder.
    # Torque's MoM keeps the same two files in "$TORQUE_HOME/mom_priv/jobs/" (0751, pbs_mkdirs), named
    # after the job id cut to 61 characters (determine_job_file_name, req_quejob.c; PBS_JOBBASE) and
    # removed when the job is purged (mom_job_func.c); a MoM built for several MoMs per host appends
    # its port, which is not looked for (the controller is then asked, as before).
    local_signs = (
        LocalSign("{home}/mom_priv/jobs/{job}.JB", lasting=True,
                  source="pbs_mom's job file, on every host of the job from its arrival to its purge "
                         "(OpenPBS job_save_fs, job_purge; Torque mom_job_func.c)"),
        LocalSign("{home}/mom_priv/jobs/{job}.SC", lasting=True,
                  source="pbs_mom's copy of the job script, on the primary execution host"),
    )

    def local_sign_fields(self, node: str, job_id: str = "") -> dict[str, str] | None:
        """``{home}``: PBS_HOME (TORQUE_HOME) from the hook's environment or pbs.conf, read once."""
        home = self.__dict__.get("_sign_home")
        if home is None:
            home = self.__dict__["_sign_home"] = self.home()
        return {"home": home}

    # -- output files: "^array_index^" in qsub -o / -e becomes the subjob's index (subst_array_index,
    # src/server/array_func.c; PBS_FILE_ARRAY_INDEX_TAG, job.h); nothing else is expanded, and qstat
    # shows Output_Path with it already replaced. Without -o the server names the file
    # "<job name>.o<sequence number>" in the submission folder (svr_jobfunc.c), as qstat shows it.
    output_patterns = {"^array_index^": ("array_task",)}

    def output_fields(self, job_id: str, user: str = "", name: str = "") -> dict[str, str]:
        """As :meth:`Scheduler.output_fields`, with the index of a subjob ``123[4].server``."""
        index = re.search(r"\[(\d+)\]", job_id)
        return {**super().output_fields(job_id, user, name), "array_task": index.group(1) if index else ""}

    # -- the job's own cgroups on a node (issue #9) ---------------------------
    # The cgroup hook of OpenPBS / PBS Pro, pbs_cgroups (src/hooks/cgroups/pbs_cgroups.PY, openpbs
    # cd7ab5e), makes at execjob_begin, on every host of the job and before any prologue, one folder
    # per controller it manages: "<controller mount>/<cgroup_prefix>.service/jobid/<job id>"
    # (_assemble_path, _cgroup_path, create_job), the prefix "pbs_jobs" by default (pbs_cgroups.CF);
    # controllers cpuacct, cpuset and memory by default, devices and hugetlb when the site enables
    # them, and the name=systemd tree whenever any is (_target_subsystems). The limits are written in
    # the same event (configure_job); the job's processes are added at execjob_launch (the job's shell,
    # on the primary host, once the prologue has returned) and execjob_attach (pbs_attach, tm tasks on
    # any host) (add_pids), and whatever is left in them is killed with the job. The launcher joins
    # them as soon as they exist (JobCgroups, populated=False): their limits are set by then, and on a
    # sister host no process may ever come (no task there yet). Alternatives differ only in which
    # controller is looked at first, for sites that disable memory or cpuset.
    job_cgroup_v1 = tuple(
        tuple(f"{c}/{{prefix}}.service/jobid/{{job}}"
              for c in (first, *(c for c in ("memory", "cpuset", "cpuacct", "devices", "hugetlb", "systemd")
                                 if c != first)))
        for first in ("memory", "cpuset", "cpuacct"))
    # cgroup v2: OpenPBS's hook has none (v1 only at cd7ab5e); PBS Pro 2022.1+ supports v2 under
    # "<prefix>.service/jobs/…". The folder name is not documented: exporters for PBS Pro (e.g.
    # 0nebody/pbs_exporter, internal/utils) accept both "jobs/<job id>" and other names. Only the
    # exact job id is tried: another name is never guessed, so another job's cgroup is never joined;
    # where it is not found, the agent runs outside the job's limits as before (the hook log says so).
    job_cgroup_v2: tuple[tuple[str, ...], ...] = (("{prefix}.service/jobs/{job}",),)
    #: The hook's name, as MoM keeps its copy in ``$PBS_HOME/mom_priv/hooks/<name>.HK`` / ``.CF``.
    cgroup_hook = "pbs_cgroups"
    cgroup_prefix_default = "pbs_jobs"
    #: Where the hook finds the controllers (it reads /proc/mounts; the CF's mount_path is not read here).
    cgroup_root: Path = CGROUP_ROOT
    #: Seconds the launcher waits for the job's cgroups to be made (made before any prologue on every
    #: host: the wait covers only a dxflow hook ordered before the cgroup hook). Where none appear in
    #: time the agent starts outside the job's limits, and the hook log says so.
    cgroup_wait = 20.0

    def cgroup_hook_file(self, suffix: str) -> Path:
        return Path(self.home()) / "mom_priv" / "hooks" / f"{self.cgroup_hook}{suffix}"

    def cgroup_setup(self) -> tuple[Path, float]:
        """A wait only where MoM holds the cgroup hook enabled: the server copies every hook to MoM's
        ``mom_priv/hooks``, writing ``enabled=false`` in its ``.HK`` only when it is not (hook.c
        writes non-default attributes only; HOOK_ENABLED_DEFAULT is TRUE)."""
        hk = self.cgroup_hook_file(".HK")
        if not hk.is_file():
            return self.cgroup_root, 0.0
        enabled = read_conf(str(hk)).get("enabled", "true").strip().lower() not in ("false", "0", "f", "n", "no")
        return self.cgroup_root, self.cgroup_wait if enabled else 0.0

    def cgroup_prefix(self) -> str:
        """``cgroup_prefix`` of the hook's JSON configuration; the default where unset or unreadable."""
        try:
            value = json.loads(self.cgroup_hook_file(".CF").read_text()).get("cgroup_prefix")
        except (OSError, ValueError, AttributeError):
            return self.cgroup_prefix_default
        return value if isinstance(value, str) and SAFE_NAME.match(value) and ".." not in value \
            else self.cgroup_prefix_default

    def job_cgroups(self, job: HookJob) -> JobCgroups | None:
        """As :meth:`Scheduler.job_cgroups`, with the hook's prefix as ``{prefix}``."""
        if not (self.job_cgroup_v1 or self.job_cgroup_v2):
            return None
        mount, wait = self.cgroup_setup()
        if wait <= 0:
            return None
        return job_cgroups(mount, self.job_cgroup_v1, self.job_cgroup_v2, wait, populated=False, job=job.job,
                           uid=str(job.uid), user=job.user, node=job.node, prefix=self.cgroup_prefix())

    # -- queries -------------------------------------------------------------
    def client_dirs(self) -> list[str]:
        exec_dir = self.environ.get("PBS_EXEC") or self.conf().get("PBS_EXEC", "")
        return ([os.path.join(exec_dir, "bin")] if exec_dir else []) + list(self.default_bin)

    def backend(self) -> str:
        return " ".join(self.qstat)

    def backend_why(self) -> str:
        return "OpenPBS / PBS Pro print every job attribute as JSON with qstat -F json (18.1 and later)"

    def jobs(self, user: str | None = None) -> list[JobInfo]:
        infos = [self._info(job, attrs) for job, attrs in self.query()]
        return [i for i in infos if user is None or i.user == user]

    def job(self, job_id: str, *, timeout: float = 30.0) -> JobInfo | None:
        found = self.job_attrs(job_id, timeout=timeout)
        return self._info(*found) if found else None

    def job_attrs(self, job_id: str, *, timeout: float = 30.0) -> tuple[str, dict[str, Any]] | None:
        """(job id, qstat's attributes) of one job, or None when qstat does not know it (any more)."""
        check_name("job id", job_id)
        try:
            found = self.query([*self.qstat_one, job_id], timeout=timeout)
        except SchedulerError as e:
            said = f"{e.stderr}\n{e.stdout}".lower()
            if any(phrase in said for phrase in self.unknown_job):
                return None
            raise
        for job, attrs in found:
            if job == job_id or job.split(".")[0] == job_id:
                return job, attrs
        return None

    def spooled_output(self, job_id: str) -> dict[str, str]:
        found = self.job_attrs(job_id)
        return self.spool_paths(*found) if found else {}

    def spool_paths(self, job: str, attrs: dict[str, Any]) -> dict[str, str]:
        """Where pbs_mom writes the job's stdout/stderr while it runs, on the primary execution host.

        ``std_file_name()`` in ``src/resmom/start_exec.c`` (OpenPBS; Torque's is the same
        function with fewer branches): an interactive job's output is its terminal (nothing
        here); a stream kept with ``qsub -k o|e`` (and not ``d``) goes to
        ``$HOME/<job name>.o<sequence number>`` (``.<index>`` for an array subjob in
        OpenPBS); with ``sandbox=PRIVATE`` to ``<jobdir>/<job id>.OU``; otherwise to
        ``$PBS_HOME/spool/<job id>.OU`` / ``.ER``. Direct write (``-k d``) and Torque's
        ``$spool_as_final_name`` write the final path instead: no spool file then exists, and
        the caller reads the final path. ``Join_Path`` ``oe`` sends stderr into the stdout
        file, ``eo`` the reverse (only one file is opened)."""
        if str(attrs.get("interactive", "")).strip() not in ("", "0", "False", "false"):
            return {}
        keep = str(attrs.get("Keep_Files", "") or "")
        name = str(attrs.get("Job_Name", "") or "").rpartition("/")[2]
        seq = job[:len(job) - len(job.lstrip("0123456789"))]  # the sequence number: the id's leading digits
        index = re.search(r"\[(\d+)\]", job)
        sandbox = sandbox_dir(attrs)
        out: dict[str, str] = {}
        for key, letter, suffix in (("stdout", "o", ".OU"), ("stderr", "e", ".ER")):
            if letter in keep and not (self.keep_direct and self.keep_direct in keep) and name:
                home = self.user_home(attrs)
                if not home:
                    continue
                kept = f"{name}.{letter}{seq}"
                if self.keep_array_index and index:
                    kept += f".{index.group(1)}"
                out[key] = os.path.join(home, kept)
            else:
                folder = sandbox or os.path.join(self.home(), "spool")
                out[key] = os.path.join(folder, job + suffix)
        join = str(attrs.get("Join_Path", "") or "n")
        if join == "oe" and "stdout" in out:
            out["stderr"] = out["stdout"]
        elif join == "eo" and "stderr" in out:
            out["stdout"] = out["stderr"]
        return out

    @staticmethod
    def user_home(attrs: dict[str, Any]) -> str:
        user = str(attrs.get("euser") or str(attrs.get("Job_Owner", "")).partition("@")[0])
        try:
            return pwd.getpwnam(user).pw_dir if SAFE_NAME.match(user) else ""
        except KeyError:
            return ""

    def query(self, extra: Sequence[str] = (), *, timeout: float = 30.0) -> list[tuple[str, dict[str, Any]]]:
        """(job id, attributes) of every job ``qstat`` lists."""
        out = run([self.command(self.qstat[0]), *self.qstat[1:], *extra], timeout=timeout)
        try:
            data = json.loads(out) if out.strip() else {}
        except ValueError as e:
            raise SchedulerError(f"qstat -F json printed invalid JSON ({e}); some PBS Pro releases do not "
                                 "escape job variables: update PBS or report the job") from e
        jobs = data.get("Jobs") or {}
        if not isinstance(jobs, dict):
            raise SchedulerError(f"qstat -F json: 'Jobs' is {type(jobs).__name__}, expected an object")
        return [(str(k), v) for k, v in jobs.items() if isinstance(v, dict)]

    def _info(self, job: str, attrs: dict[str, Any]) -> JobInfo:
        owner = str(attrs.get("Job_Owner", "")).partition("@")[0]
        variables = parse_variable_list(attrs.get("Variable_List"))
        sandbox = sandbox_dir(attrs)
        stdout = strip_host(attrs.get("Output_Path", ""))
        stderr = strip_host(attrs.get("Error_Path", ""))
        join = str(attrs.get("Join_Path", "") or "n")
        if join == "oe":    # qsub -j oe: one file, Output_Path; Error_Path is still set but never written
            stderr = stdout
        elif join == "eo":
            stdout = stderr
        return JobInfo(
            job=job, user=str(attrs.get("euser") or owner), state=self.map_state(str(attrs.get("job_state", ""))),
            nodes=exec_hosts(attrs.get("exec_host", "")), name=str(attrs.get("Job_Name", "")),
            work_dir=sandbox or variables.get("PBS_O_WORKDIR") or str(attrs.get("init_work_dir", "") or
                                                                         attrs.get("jobdir", "")),
            stdout=stdout, stderr=stderr,
        )


class Torque(PBS):
    """Torque (and its pbs_mom): same scripts and attributes; XML instead of JSON."""

    name = "torque"
    passthrough_env = ("PBS_SERVER_HOME", "TORQUE_HOME", "PBS_DEFAULT")
    # No launcher: Torque has no pbs_attach, and its pbs_track prints lines of its own on the command's
    # stdout ("Got arg: …", src/cmds/pbs_track.c) and takes at most 64 arguments. Commands count against
    # the job through the job's cgroups the agent joins (job_cgroup_v1 below), where pbs_mom makes them.
    launcher = None
    qstat = ("qstat", "-f", "-x")
    qstat_one = ()  # Torque shows completed jobs (C) for keep_completed seconds anyway
    unknown_job = ("unknown job id",)
    conf_env = ""
    conf_file = ""  # Torque has no pbs.conf
    home_env = ("TORQUE_HOME", "PBS_SERVER_HOME", "PBS_HOME")
    default_home = "/var/spool/torque"
    default_bin = ("/usr/local/bin", "/opt/torque/bin")
    keep_direct = ""
    keep_array_index = False
    #: Torque expands nothing in qsub -o / -e: an array's subjobs get "-<index>" appended by the server
    output_patterns: dict[str, tuple[str, ...]] = {}

    # Torque 6 built with --enable-cgroups: pbs_mom makes "<controller mount>/torque/<job id>" in
    # cpu, cpuacct, cpuset, memory and devices (init_subsystems, trq_cg_create_all_cgroups in
    # src/resmom/trq_cgroups.c, adaptivecomputing/torque 34ff845), writes the job's limits there, and
    # puts the job's first process in them (trq_cg_add_process_to_all_cgroups) before that process
    # runs the prologue (TMomFinalizeChild -> setup_batch_job -> handle_prologs, start_exec.c): on
    # the mother superior the prologue, and so the agent, already starts inside. Joining again makes
    # that explicit and recorded. Sister hosts: the folders are made when the host joins the job
    # (mom_comm.c) and get a process only with a task (tm, pbsdsh), maybe never: the launcher joins
    # them once they exist (PBS.job_cgroups: populated=False). cpu is left out: it shares its tree
    # with cpuacct on every systemd host. Torque has no cgroup v2 support.
    job_cgroup_v1 = tuple(
        tuple(f"{c}/torque/{{job}}" for c in (first, *(c for c in ("memory", "cpuset", "cpuacct", "devices")
                                                         if c != first)))
        for first in ("memory", "cpuset", "cpuacct"))
    job_cgroup_v2 = ()
    cgroup_wait = 10.0

    def cgroup_setup(self) -> tuple[Path, float]:
        """A wait only where pbs_mom has made its ``torque`` folder (init_torque_cgroups, trq_cgroups.c: at
        start-up and for each job): a Torque built without cgroups never does."""
        made = any((self.cgroup_root / c / "torque").is_dir() for c in ("memory", "cpuset", "cpuacct"))
        return self.cgroup_root, self.cgroup_wait if made else 0.0

    def cgroup_prefix(self) -> str:
        return ""

    def client_dirs(self) -> list[str]:
        return list(self.default_bin)

    def backend_why(self) -> str:
        return "Torque's qstat has no JSON output; -x prints the same attributes as XML"

    def query(self, extra: Sequence[str] = (), *, timeout: float = 30.0) -> list[tuple[str, dict[str, Any]]]:
        # Torque prints a job's name and variables byte for byte: never let one job's bytes fail the listing
        out = run([self.command(self.qstat[0]), *self.qstat[1:], *extra], timeout=timeout, errors="replace")
        if not out.strip():
            return []
        try:
            found = torque_xml.jobs(out)
        except ValueError as e:
            raise SchedulerError(f"qstat -x printed output that is not Torque's XML ({e})") from e
        return [(job, dict(attrs)) for job, attrs in found]
