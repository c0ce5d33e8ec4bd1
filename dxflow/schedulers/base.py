"""What dxflow needs to know from a scheduler, asked one way for all of them.

A scheduler module is mostly data: which environment variables (or hook
arguments) name the job in its prolog/epilog, which command lists jobs and which
JSON fields hold what, and how its native states map to :class:`JobState`.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from dxflow import config
from dxflow.errors import DxflowError, SchedulerError, UsageError
from dxflow.jobcgroup import CGROUP_ROOT, JobCgroups, job_cgroups
from dxflow.schedulers import patterns, signs
from dxflow.schedulers.launch import Launcher
from dxflow.schedulers.signs import LocalSign, Presence

log = logging.getLogger(__name__)

#: Job ids, node and user names that may enter file names and argv: refuse anything else.
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@+\-\[\]]{0,127}$")


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    ENDING = "ending"    # epilog phase: the agent should be going away
    ENDED = "ended"
    UNKNOWN = "unknown"  # the scheduler could not be asked

    @property
    def alive(self) -> bool:
        return self in (JobState.PENDING, JobState.RUNNING, JobState.UNKNOWN)


@dataclass
class HookJob:
    """The job as a prolog/epilog sees it on one node."""

    scheduler: str
    cluster: str
    job: str
    node: str
    user: str
    uid: int
    gid: int
    work_dir: str = ""
    stdout: str = ""
    stderr: str = ""
    nodes: list[str] = field(default_factory=list)


@dataclass
class JobInfo:
    """The job as the scheduler reports it to anyone asking."""

    job: str
    user: str
    state: JobState
    nodes: list[str] = field(default_factory=list)
    name: str = ""
    work_dir: str = ""
    stdout: str = ""
    stderr: str = ""


def check_name(kind: str, value: str) -> str:
    """Refuse a job id, node or user name that could do harm in a path or argv."""
    if not isinstance(value, str) or not SAFE_NAME.match(value) or ".." in value:
        raise UsageError(f"invalid {kind} {value!r}: expected letters, digits and . _ - @ + [ ]")
    return value


def site_bin() -> list[str]:
    """The site's folder of scheduler commands (``scheduler_bin`` in the site config), looked in before
    anything else by every dxflow process: hooks, agents (whose PATH is short), masters, ``dxflow doctor``.
    [] when unset, or when the site config cannot be read (whoever loads it reports that)."""
    return _site_bin(str(config.SITE_CONFIG))


@functools.lru_cache(maxsize=4)
def _site_bin(path: str) -> list[str]:
    try:
        folder = config.SiteConfig.load(Path(path)).scheduler_bin
    except DxflowError:
        return []
    return [folder] if folder else []


def command_path(name: str, path: str | None = None, extra: Sequence[str] = ()) -> str:
    """The one place a scheduler command's name becomes the path run: :func:`site_bin` first, then
    ``path`` (a PATH string; default this process's), then ``extra`` (the adapter's usual places);
    the bare name when it is nowhere (running it then says so). A name with a ``/`` stays as it is."""
    if os.sep in name:
        return name
    dirs = site_bin() + [d for d in (os.environ.get("PATH", os.defpath) if path is None else path).split(os.pathsep)
                         if d] + list(extra)
    return shutil.which(name, path=os.pathsep.join(dirs)) or name


def run(argv: Sequence[str], *, timeout: float = 30.0, env: Mapping[str, str] | None = None,
        errors: str = "strict") -> str:
    """Run a scheduler command and return its stdout; raise :class:`SchedulerError` on any failure.
    A bare command name is looked up by :func:`command_path` (the site's ``scheduler_bin`` first).

    ``errors="replace"`` for a command that prints users' bytes as they are (Torque's XML). A command
    that asks the controller about jobs (:data:`QUERY_COMMANDS`) draws from :data:`QUERY_BUDGET` first:
    when it is spent, SchedulerError and nothing is run (the caller asks later)."""
    argv = list(argv)
    argv[0] = command_path(argv[0], None if env is None else env.get("PATH", os.defpath))
    if os.path.basename(argv[0]) in QUERY_COMMANDS and not QUERY_BUDGET.take():
        raise SchedulerError(f"{argv[0]} not run: the cap of {QUERY_BUDGET.per_minute:g} controller queries a "
                             "minute of this process is reached (controller_queries_per_minute, "
                             "/etc/dxflow/dxflow.toml); asked again later")
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL, errors=errors)
    except FileNotFoundError as e:
        raise SchedulerError(f"{argv[0]} not found: is the scheduler's client installed, and on PATH or in the "
                             f"site's scheduler_bin ({config.SITE_CONFIG})?") from e
    except subprocess.TimeoutExpired as e:
        raise SchedulerError(f"{argv[0]} did not answer within {timeout:.0f} s", argv=argv) from e
    if proc.returncode != 0:
        raise SchedulerError(f"{argv[0]} failed", argv=argv, returncode=proc.returncode,
                             stdout=proc.stdout, stderr=proc.stderr)
    return proc.stdout


def first_env(environ: Mapping[str, str], names: Sequence[str]) -> str:
    for name in names:
        value = environ.get(name)
        if value:
            return value
    return ""


# -- load on the controller (issue #11): a cap on queries, and what a node knows by itself ------------

#: Client commands that ask the controller about jobs: every run of one draws from :data:`QUERY_BUDGET`.
QUERY_COMMANDS = frozenset({"squeue", "qstat", "bjobs"})


class QueryBudget:
    """At most ``per_minute`` controller queries a minute from this process: a token bucket holding one
    minute's worth (at least one query). 0: no cap. :func:`run` draws from :data:`QUERY_BUDGET`, which
    the agent and the master size from the site's ``controller_queries_per_minute`` (hooks and the CLI
    leave it uncapped)."""

    def __init__(self, per_minute: float = 0.0) -> None:
        self._lock = threading.Lock()
        self.per_minute = 0.0
        self._tokens = 1.0
        self._at = time.monotonic()
        self.resize(per_minute)

    def resize(self, per_minute: float) -> None:
        with self._lock:
            self.per_minute = max(0.0, float(per_minute))
            self._tokens = max(1.0, self.per_minute)
            self._at = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(max(1.0, self.per_minute), self._tokens + (now - self._at) * self.per_minute / 60.0)
        self._at = now

    def available(self) -> bool:
        """Whether a query may be asked now (nothing spent)."""
        with self._lock:
            if self.per_minute <= 0:
                return True
            self._refill()
            return self._tokens >= 1.0

    def take(self) -> bool:
        """Spend one query if the budget allows it now."""
        with self._lock:
            if self.per_minute <= 0:
                return True
            self._refill()
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True


#: What every controller query of this process draws from; no cap until the process sets one.
QUERY_BUDGET = QueryBudget()


class Scheduler:
    """Base of every scheduler adapter. Subclasses fill in the tables and a few methods."""

    name: str = ""
    #: generic field -> environment variables that carry it in the hooks, first set wins.
    hook_env: dict[str, tuple[str, ...]] = {}
    #: native state -> JobState.
    state_map: dict[str, JobState] = {}
    #: hook environment variables the agent needs to query the scheduler (config locations).
    passthrough_env: tuple[str, ...] = ()
    #: the scheduler's client commands this adapter runs (``dxflow doctor`` reports where they are).
    commands: tuple[str, ...] = ()
    #: Whether a controller knows this scheduler's jobs and can be asked about them. False ("local"):
    #: the job is the agent's own life, so a master never asks and never drops an agent for its job.
    has_controller: bool = True
    #: Whether the user starts this scheduler's agents by hand rather than a hook (the agent then says
    #: how to reach its console).
    started_by_hand: bool = False

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)

    # -- hooks ---------------------------------------------------------------
    def hook_job(self, argv: Sequence[str] = ()) -> HookJob:
        """Read the job from the hook's environment (and arguments, for schedulers that pass them)."""
        import pwd
        import socket

        values = {key: first_env(self.environ, names) for key, names in self.hook_env.items()}
        values.update({k: v for k, v in self.hook_args(argv).items() if v})
        job = values.get("job", "")
        user = values.get("user", "")
        if not job or not user:
            wanted = ", ".join(self.hook_env.get("job", ()) + self.hook_env.get("user", ()))
            raise UsageError(f"no job id or user in the hook environment (looked for {wanted})")
        check_name("job id", job)
        check_name("user", user)
        node = values.get("node") or socket.gethostname().split(".")[0]
        check_name("node", node)
        try:
            pw = pwd.getpwnam(user)
        except KeyError as e:
            raise UsageError(f"user {user!r} of job {job} does not exist on this node") from e
        uid = int(values["uid"]) if values.get("uid", "").isdigit() else pw.pw_uid
        if uid != pw.pw_uid:
            raise UsageError(f"job {job}: uid {uid} does not match user {user} ({pw.pw_uid})")
        gid = int(values["gid"]) if values.get("gid", "").isdigit() else pw.pw_gid
        cluster = values.get("cluster") or "default"
        check_name("cluster", cluster)
        return HookJob(
            scheduler=self.name, cluster=cluster, job=job, node=node, user=user, uid=uid, gid=gid,
            work_dir=values.get("work_dir", ""), stdout=values.get("stdout", ""),
            stderr=values.get("stderr", ""), nodes=self.expand_nodes(values.get("nodes", "")),
        )

    def hook_args(self, argv: Sequence[str]) -> dict[str, str]:
        """Fields carried by hook arguments (PBS, Torque); none by default."""
        return {}

    def complete_hook_job(self, job: HookJob) -> None:
        """Fill in, for the prolog, what the hook's environment does not carry but the scheduler
        knows (OpenPBS's classic prologue gets no work dir). Nothing by default; never raises."""

    def expand_nodes(self, text: str) -> list[str]:
        return [n for n in text.replace(",", " ").split() if n]

    # -- queries -------------------------------------------------------------
    def jobs(self, user: str | None = None) -> list[JobInfo]:
        """The jobs the scheduler knows, optionally only one user's."""
        raise NotImplementedError

    def job(self, job_id: str) -> JobInfo | None:
        """One job, or None when the scheduler no longer knows it."""
        for info in self.jobs():
            if info.job == job_id:
                return info
        return None

    def job_state(self, job_id: str) -> JobState:
        info = self.job(job_id)
        return info.state if info else JobState.ENDED

    def spooled_output(self, job_id: str) -> dict[str, str]:
        """Where the job's stdout and stderr are *while it runs*, for a scheduler that holds them in a
        spool of its own and copies them to the final path only when the job ends (PBS, Torque,
        LSF by default): ``{"stdout": path, "stderr": path}``, either key may be missing. Asked by the
        agent, as the job's user, on the job's node (a spool is local to the node that writes it); the
        caller reads a path only if a regular file is there, else the final path. {} for a scheduler
        that writes the final path directly (Slurm)."""
        return {}

    def map_state(self, native: str) -> JobState:
        return self.state_map.get(native.upper(), JobState.UNKNOWN)

    def backend(self) -> str:
        """How this adapter talks to its scheduler, for ``dxflow doctor``."""
        return "command line"

    def backend_why(self) -> str:
        """Why :meth:`backend` is what it is, for ``dxflow doctor``; "" when there is nothing to say."""
        return ""

    # -- where the job's output goes (sbatch -o, qsub -o, bsub -o) -------------------------------------
    #: Tokens the scheduler expands in the output paths users give: token -> the fields that give its
    #: value, first known one wins (``=text``: a constant); see :mod:`dxflow.schedulers.patterns`.
    #: Empty: paths are taken as written.
    output_patterns: dict[str, tuple[str, ...]] = {}
    #: Whether a number between "%" and the letter zero-pads (Slurm's ``%4j``).
    output_pattern_width: bool = False
    #: A character that, anywhere in a path, turns expansion off (Slurm's backslash).
    output_pattern_literal: str = ""
    #: Where a batch job's stdout (and stderr) go when its user named no file: a pattern relative to
    #: the job's work dir; "" when the scheduler then writes no file the agent can read.
    default_output: str = ""

    def output_fields(self, job_id: str, user: str = "", name: str = "") -> dict[str, str]:
        """The pattern fields that the job's id (and its user and name, when known) tell on any node.
        A field left out is unknown, and its tokens stay as they are."""
        fields = {"job": job_id}
        if user:
            fields["user"] = user
        if name:
            fields["name"] = name
        return fields

    def output_is_pattern(self, path: str) -> bool:
        """Whether ``path`` holds a token the scheduler expands (it is then not yet the file's name)."""
        return patterns.has_tokens(path, self.output_patterns, width=self.output_pattern_width,
                                   literal=self.output_pattern_literal)

    def expand_output(self, pattern: str, fields: Mapping[str, str]) -> str:
        """An output path with the tokens of :attr:`output_patterns` whose fields are known expanded."""
        return patterns.expand(pattern, self.output_patterns, fields, width=self.output_pattern_width,
                               literal=self.output_pattern_literal)

    def client_dirs(self) -> list[str]:
        """Folders besides PATH where this scheduler installs its client commands."""
        return []

    def command(self, name: str) -> str:
        """A client command's full path: the site's ``scheduler_bin``, PATH (of this adapter's
        environment), then :meth:`client_dirs` (:func:`command_path`)."""
        return command_path(name, self.environ.get("PATH", os.defpath), self.client_dirs())

    # -- the job's own cgroups on a node (issue #9: everything dxflow runs counts against the job) --
    #: Where the scheduler keeps the job's processes on a node outside any task it launched: groups of
    #: paths relative to its cgroup mount, with ``{job}``, ``{uid}``, ``{user}``, ``{node}`` (v2 also
    #: ``{init}``); see :class:`dxflow.jobcgroup.JobCgroups`. Empty: none known, the agent runs beside the job.
    job_cgroup_v1: tuple[tuple[str, ...], ...] = ()
    job_cgroup_v2: tuple[tuple[str, ...], ...] = ()

    def cgroup_setup(self) -> tuple[Path, float]:
        """Where this scheduler's cgroup plugin finds the cgroup trees, and how many seconds after the
        prolog the job's own cgroups may take to appear on a node (0: they never do)."""
        return CGROUP_ROOT, 0.0

    def job_cgroups(self, job: HookJob) -> JobCgroups | None:
        """The job's own cgroups on this node for the prolog's launcher to join, or None."""
        if not (self.job_cgroup_v1 or self.job_cgroup_v2):
            return None
        mount, wait = self.cgroup_setup()
        return job_cgroups(mount, self.job_cgroup_v1, self.job_cgroup_v2, wait,
                           job=job.job, uid=str(job.uid), user=job.user, node=job.node)

    # -- what dxflow runs for the user counts against the job (issue #9) ------------------------------
    #: The client command that starts a command as a task of the job on its node (``pbs_attach``,
    #: ``blaunch``: :mod:`dxflow.schedulers.launch`); None where the agent, inside the job's own
    #: cgroups, needs none (Slurm, Torque) or dxflow knows none.
    launcher: Launcher | None = None

    # -- is the job still running on this node, asked without the controller (issue #11) --------------
    #: What the scheduler keeps on a node while a job runs there (:class:`LocalSign`). Empty: nothing
    #: known, and the agent asks the controller instead, rarely (``controller_check_interval``).
    local_signs: tuple[LocalSign, ...] = ()

    def local_sign_fields(self, node: str, job_id: str = "") -> dict[str, str] | None:
        """The adapter's own fields of its sign patterns on ``node`` for the job (a field left out: the
        signs that need it are not looked for); None when none can be known."""
        return {}

    def job_here(self, job_id: str, node: str) -> Presence:
        """Whether the job runs on this node (``node`` as the scheduler names it), from a look at the
        node's own files: no controller call. Asked by the agent, as the job's user, on the job's node."""
        fields = self.local_sign_fields(node, job_id) if self.local_signs else None
        if fields is None:
            return Presence.UNKNOWN
        values = {"job": job_id, "node": node, "uid": str(os.getuid()), **fields}
        if any("{user}" in sign.pattern for sign in self.local_signs):  # a name lookup may go to LDAP
            import pwd

            values["user"] = pwd.getpwuid(os.getuid()).pw_name
        return signs.look(self.local_signs, values)
