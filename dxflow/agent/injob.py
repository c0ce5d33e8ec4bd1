"""Run a command for the user *in the job*: through the scheduler's launcher where it has one.

``dxflow exec`` and ``dxflow shell`` start the user's commands as children of the agent. Where the
agent sits in the job's own cgroups (Slurm's extern step, a PBS or Torque job's cgroups, joined
by :mod:`dxflow.adopt`) that is enough. Where the scheduler tracks a job's processes itself,
the command goes through the adapter's launcher (:mod:`dxflow.schedulers.launch`): PBS's
``pbs_attach``, LSF's ``blaunch`` — so that it counts against the job and ends with it even when
the agent was started outside the job (LSF's pre-exec runs as the user, who cannot join a cgroup).

A launcher that is not installed on the node leaves the command to run as before, beside the
job; the agent log says so once.
"""

from __future__ import annotations

import logging
import os
import shutil

from dxflow.agent.state import AgentState
from dxflow.schedulers import get_scheduler
from dxflow.schedulers.launch import Launcher, launcher_of

log = logging.getLogger(__name__)

_missing_said: set[str] = set()


def launcher_path(state: AgentState) -> tuple[Launcher, str] | None:
    """The job's launcher and where it is on this node, or None (none needed, or not installed)."""
    sched = get_scheduler(state.scheduler)  # the agent's environment: what the hook handed on
    launcher = launcher_of(sched)
    if launcher is None:
        return None
    path = sched.command(launcher.command)
    if os.path.isabs(path) and os.access(path, os.X_OK):
        return launcher, path
    if launcher.command not in _missing_said:
        _missing_said.add(launcher.command)
        log.warning("%s is not installed on this node (PATH and the scheduler's client folders): commands "
                    "of dxflow exec and shell run beside the job, not as its tasks", launcher.command)
    return None


def check_runnable(command: str, cwd: str, env: dict[str, str]) -> None:
    """Raise what starting ``command`` directly would (FileNotFoundError, PermissionError): behind a
    launcher the user would get the launcher's own message and exit code instead of a shell's."""
    if "/" in command:
        path = os.path.join(cwd, command)
        if not os.path.exists(path):
            raise FileNotFoundError(2, "No such file or directory", command)
        if os.path.isdir(path) or not os.access(path, os.X_OK):
            raise PermissionError(13, "Permission denied", command)
    elif shutil.which(command, path=env.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(2, "command not found", command)


def in_job(state: AgentState, argv: list[str], cwd: str, env: dict[str, str], *,
           terminal: bool = False) -> tuple[list[str], dict[str, str]]:
    """(argv, env) that run ``argv`` (in ``cwd``) as part of the job on this node. ``terminal``: the
    command needs the terminal it is started on (``dxflow shell``), which only a launcher that runs
    it in place keeps; without one it runs as a child of the agent, inside whatever the agent is in."""
    found = launcher_path(state)
    if found is None:
        return argv, env
    launcher, path = found
    if terminal and not launcher.keeps_terminal:
        return argv, env
    check_runnable(argv[0], cwd, env)
    return launcher.wrap(path, state.job, state.node, argv, env)
