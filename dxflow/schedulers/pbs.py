"""OpenPBS / PBS Pro and Torque: the job as their hooks name it, jobs from ``qstat``.

Hooks (CONTRACTS.md §2). The classic ``mom_priv/prologue`` and ``epilogue`` are run by
pbs_mom as root with the job on argv: 1 job id, 2 user, 3 group (the epilogue gets more,
unused here). Torque's ``prologue.parallel`` / ``epilogue.parallel`` get the same first
three on the sister nodes. The PBS Pro hook ``pbs/dxflow_hook.py`` calls the same routine
with the same three values (``e.job.id``, ``euser``, ``egroup``), so a classic script and
the hook name an agent alike — cluster, job, node — and whichever runs second finds the
first one's agent alive and starts nothing.

Queries. OpenPBS and PBS Pro (18+) print JSON with ``qstat -f -F json``; trimmed::

    {"timestamp": 1700000000, "pbs_version": "23.06.06", "pbs_server": "head",
     "Jobs": {"123.head": {"Job_Name": "run", "Job_Owner": "alice@login", "job_state": "R",
              "euser": "alice", "egroup": "alice", "exec_host": "n1/0*2+n2/0",
              "Output_Path": "login:/home/alice/run.o123", "Error_Path": "login:/home/alice/run.e123",
              "Variable_List": {"PBS_O_WORKDIR": "/home/alice", "PBS_O_HOST": "login"}}}}

Torque's qstat has no JSON; ``qstat -f -x`` prints the same attributes as XML::

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
from typing import Any, Iterable, Sequence

from dxflow.errors import SchedulerError, UsageError
from dxflow.schedulers.base import SAFE_NAME, JobInfo, JobState, Scheduler, check_name, first_env, run

log = logging.getLogger(__name__)

#: A node file (PBS_NODEFILE, ``$PBS_HOME/aux/<job>``) holds one line per slot; read no more than this.
MAX_HOSTFILE = 1 << 20
_ADDRESS = re.compile(r"^[\d.]+$|:")


def short_host(name: str) -> str:
    """``n1.cluster.example`` -> ``n1`` (node names are compared with the short host name); addresses stay."""
    name = name.strip()
    return name if _ADDRESS.search(name) else name.split(".")[0]


def unique_hosts(names: Iterable[str]) -> list[str]:
    """Short, safe, distinct host names in first-seen order; anything that is not a host name is dropped."""
    out: list[str] = []
    for name in names:
        host = short_host(name)
        if host and SAFE_NAME.match(host) and host not in out:
            out.append(host)
    return out


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
        # Torque's prologue environment and pbs/dxflow_hook.py carry PBS_O_WORKDIR; PBS_JOBDIR is
        # the job's staging folder when it runs in a sandbox.
        "work_dir": ("PBS_O_WORKDIR", "PBS_JOBDIR"),
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
    passthrough_env = ("PBS_CONF_FILE", "PBS_HOME", "PBS_EXEC", "PBS_SERVER")
    commands = ("qstat",)
    #: every job the server knows, full attributes, as JSON
    qstat = ("qstat", "-f", "-F", "json")
    #: added when asking for one job: -x also shows finished jobs (job history)
    qstat_one = ("-x",)
    #: what qstat says for a job it does not know (any more)
    unknown_job = ("unknown job id", "job has finished")
    conf_env = "PBS_CONF_FILE"
    conf_file = "/etc/pbs.conf"
    home_env = ("PBS_HOME",)
    default_home = "/var/spool/pbs"
    default_bin = ("/opt/pbs/bin",)

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

    def job(self, job_id: str) -> JobInfo | None:
        check_name("job id", job_id)
        try:
            found = self.query([*self.qstat_one, job_id])
        except SchedulerError as e:
            said = f"{e.stderr}\n{e.stdout}".lower()
            if any(phrase in said for phrase in self.unknown_job):
                return None
            raise
        for job, attrs in found:
            if job == job_id or job.split(".")[0] == job_id:
                return self._info(job, attrs)
        return None

    def query(self, extra: Sequence[str] = ()) -> list[tuple[str, dict[str, Any]]]:
        """(job id, attributes) of every job ``qstat`` lists."""
        out = run([self.command(self.qstat[0]), *self.qstat[1:], *extra])
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
        return JobInfo(
            job=job, user=str(attrs.get("euser") or owner), state=self.map_state(str(attrs.get("job_state", ""))),
            nodes=exec_hosts(attrs.get("exec_host", "")), name=str(attrs.get("Job_Name", "")),
            work_dir=variables.get("PBS_O_WORKDIR") or str(attrs.get("init_work_dir", "") or attrs.get("jobdir", "")),
            stdout=strip_host(attrs.get("Output_Path", "")), stderr=strip_host(attrs.get("Error_Path", "")),
        )


class Torque(PBS):
    """Torque (and its pbs_mom): same scripts and attributes; XML instead of JSON."""

    name = "torque"
    passthrough_env = ("PBS_SERVER_HOME", "TORQUE_HOME", "PBS_DEFAULT")
    qstat = ("qstat", "-f", "-x")
    qstat_one = ()  # Torque shows completed jobs (C) for keep_completed seconds anyway
    unknown_job = ("unknown job id",)
    conf_env = ""
    conf_file = ""  # Torque has no pbs.conf
    home_env = ("TORQUE_HOME", "PBS_SERVER_HOME", "PBS_HOME")
    default_home = "/var/spool/torque"
    default_bin = ("/usr/local/bin", "/opt/torque/bin")

    def client_dirs(self) -> list[str]:
        return list(self.default_bin)

    def backend_why(self) -> str:
        return "Torque's qstat has no JSON output; -x prints the same attributes as XML"

    def query(self, extra: Sequence[str] = ()) -> list[tuple[str, dict[str, Any]]]:
        import xml.etree.ElementTree as ET  # only the agent and master ask; the hooks never do

        out = run([self.command(self.qstat[0]), *self.qstat[1:], *extra])
        if not out.strip():
            return []
        try:
            root = ET.fromstring(out)
        except ET.ParseError as e:
            raise SchedulerError(f"qstat -x printed invalid XML ({e})") from e
        found = []
        for el in root.iter("Job"):
            attrs: dict[str, Any] = {}
            for child in el:
                if len(child):  # Resource_List, resources_used: one level of sub-elements
                    for sub in child:
                        attrs[f"{child.tag}.{sub.tag}"] = sub.text or ""
                else:
                    attrs[child.tag] = child.text or ""
            if attrs.get("Job_Id"):
                found.append((attrs["Job_Id"], attrs))
        return found
