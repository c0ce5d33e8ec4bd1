"""How a command the agent starts for the user becomes part of the job on its node: a scheduler's launcher.

Issue #9: whatever dxflow runs for a job (``dxflow exec``, ``dxflow shell``) counts against the
job. Per scheduler, the way in is data (the adapter's ``launcher``), each with its source:

- Slurm: none here. The agent itself joins the job's extern step cgroups at start
  (:mod:`dxflow.adopt`), so everything it starts is born inside them.
- OpenPBS / PBS Pro: ``pbs_attach -j JOB -- CMD ARGS`` (:data:`dxflow.schedulers.pbs.PBS.launcher`):
  MoM takes the command's session as a task of the job (tm_attach), accounts for it, adds it to
  the job's cgroups (pbs_cgroups' execjob_attach) and kills it with the job.
- LSF: ``blaunch -no-shell HOST CMD ARGS`` (:data:`dxflow.schedulers.lsf.LSF.launcher`): sbatchd
  and RES on HOST start the command as a task of the job, tracked and limited with it.
- Torque: none. Its ``pbs_track`` prints its own lines on the command's stdout ("Got arg: …") and
  takes at most 64 arguments (src/cmds/pbs_track.c); the agent joins the job's cgroups instead
  where pbs_mom makes them (:data:`dxflow.schedulers.pbs.Torque.job_cgroup_v1`).

Standard library only: the agent imports it for every command it runs.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launcher:
    """A client command that starts ``CMD ARGS`` as a task of the job on this node.

    ``args`` come between the command and the user's argv, with ``{job}`` (the id as dxflow names
    it), ``{job_base}`` / ``{job_index}`` (an array element's id and index, else the id and "0")
    and ``{node}`` filled in; each stays one argv element (no shell ever sees them). ``env``: the
    variables the launcher reads to know the job, set from the same fields where the command's
    environment lacks them; ``keep_env``: variables of the agent's own environment (handed on by
    the hook) given to the launcher as they are. ``source``: where this is written down.
    """

    command: str
    args: tuple[str, ...]
    source: str
    env: Mapping[str, str] = field(default_factory=dict)
    keep_env: tuple[str, ...] = ()
    #: the command runs in place of the launcher (same process, same terminal): fit for ``dxflow shell``
    keeps_terminal: bool = False

    def fields(self, job: str, node: str) -> dict[str, str]:
        base, _, index = job.partition("[")
        return {"job": job, "job_base": base, "job_index": index.rstrip("]") or "0", "node": node}

    def wrap(self, path: str, job: str, node: str, argv: Sequence[str], env: Mapping[str, str],
             agent_env: Mapping[str, str] = os.environ) -> tuple[list[str], dict[str, str]]:
        """(argv, environment) that run ``argv`` through the launcher at ``path``."""
        values = self.fields(job, node)
        out_env = dict(env)
        for name, template in self.env.items():  # the launcher must name this job, whatever the job's
            out_env[name] = template.format(**values)  # processes carried (an array element's id differs)
        for name in self.keep_env:
            if agent_env.get(name):
                out_env[name] = agent_env[name]
        return [path, *(a.format(**values) for a in self.args), *argv], out_env


def launcher_of(scheduler: object) -> Launcher | None:
    """The adapter's launcher, or None (the scheduler needs none, or dxflow knows none for it)."""
    found = getattr(scheduler, "launcher", None)  # any object: tests hand in stand-in adapters
    return found if isinstance(found, Launcher) else None
