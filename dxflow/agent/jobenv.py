"""The job's own environment on this node, for ``exec`` and ``shell``.

The scheduler puts the job id into the environment of every process of the job
(``SLURM_JOB_ID``, ``PBS_JOBID``, ``LSB_JOBID``). The oldest of the user's
processes on this node that carries this job's id gives the environment a command
run "in the job" should see. Without one (a node where no step runs yet), a clean
login-like environment with the scheduler's job variables is used.
"""

from __future__ import annotations

import os
import pwd

from dxflow.agent.state import AgentState
from dxflow.metrics.sources import environ
from dxflow.procs import read_proc
from dxflow.schedulers import get_scheduler

#: variables never taken from the job's processes (they belong to that process, not the job).
SKIP = {"PWD", "OLDPWD", "SHLVL", "_", "TERM", "COLUMNS", "LINES"}


def job_environment(state: AgentState) -> dict[str, str]:
    """Environment for a command run in the job on this node (never the agent's own)."""
    names = get_scheduler(state.scheduler).hook_env.get("job", ())
    uid = os.getuid()
    best: tuple[int, dict[str, str]] | None = None
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        p = read_proc(pid)
        if p is None or p.uid != uid:
            continue
        env = environ(pid)  # empty when unreadable: matches no job
        if env.get("DXFLOW_AGENT"):
            continue  # the agent's own processes and what it started
        if any(env.get(n) == state.job for n in names) and (best is None or p.start < best[0]):
            best = (p.start, env)
    pw = pwd.getpwuid(uid)
    base = {"HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "SHELL": pw.pw_shell or "/bin/sh",
            "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": os.environ.get("LANG", "C.UTF-8")}
    if best:
        base.update({k: v for k, v in best[1].items() if k not in SKIP})
    elif names:
        base[names[0]] = state.job
    base.update({"DXFLOW_JOB": state.job, "DXFLOW_NODE": state.node, "DXFLOW_CLUSTER": state.cluster,
                 "DXFLOW_AGENT": "1"})
    return base


def job_workdir(state: AgentState) -> str:
    """The job's work dir when it exists on this node, else the user's home."""
    if state.work_dir and os.path.isdir(state.work_dir):
        return state.work_dir
    return str(state.home)
