"""What dxflow needs to know from a scheduler, asked one way for all of them.

A scheduler module is mostly data: which environment variables (or hook
arguments) name the job in its prolog/epilog, which command lists jobs and which
JSON fields hold what, and how its native states map to :class:`JobState`.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from dxflow.errors import SchedulerError, UsageError

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


def run(argv: Sequence[str], *, timeout: float = 30.0, env: Mapping[str, str] | None = None) -> str:
    """Run a scheduler command and return its stdout; raise :class:`SchedulerError` on any failure."""
    argv = list(argv)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError as e:
        raise SchedulerError(f"{argv[0]} not found: is the scheduler's client installed and on PATH?") from e
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

    def map_state(self, native: str) -> JobState:
        return self.state_map.get(native.upper(), JobState.UNKNOWN)

    def backend(self) -> str:
        """How this adapter talks to its scheduler, for ``dxflow doctor``."""
        return "command line"

    def client_dirs(self) -> list[str]:
        """Folders besides PATH where this scheduler installs its client commands."""
        return []

    def command(self, name: str) -> str:
        """A client command's full path: PATH (of this adapter's environment) first, then
        :meth:`client_dirs`; the bare name when it is nowhere (running it then says so)."""
        dirs = [d for d in self.environ.get("PATH", os.defpath).split(os.pathsep) if d]
        found = shutil.which(name, path=os.pathsep.join(dirs + self.client_dirs()))
        return found or name
