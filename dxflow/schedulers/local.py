"""No scheduler: an agent started by hand on a workstation or in a container.

The "job" is named by the user (default ``local``) and is running for as long as
the agent runs.
"""

from __future__ import annotations

from dxflow.schedulers.base import JobInfo, JobState, Presence, Scheduler


class Local(Scheduler):
    name = "local"
    has_controller = False   # no controller: nothing to ask, and nothing ends the job but the agent
    started_by_hand = True
    hook_env = {
        "job": ("DXFLOW_JOB",),
        "user": ("DXFLOW_USER", "USER"),
        "node": ("DXFLOW_NODE",),
        "cluster": ("DXFLOW_CLUSTER",),
        "work_dir": ("DXFLOW_WORK_DIR", "PWD"),
    }

    def jobs(self, user: str | None = None) -> list[JobInfo]:
        return []

    def job_state(self, job_id: str) -> JobState:
        return JobState.RUNNING  # nothing can end it but the agent itself

    def job_here(self, job_id: str, node: str) -> Presence:
        return Presence.LASTING  # the same: it runs here for as long as the agent does
