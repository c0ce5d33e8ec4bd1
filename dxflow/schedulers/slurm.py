"""Slurm: hook environment of slurmd's Prolog/Epilog, jobs from ``squeue --json``.

22.05 ignores filters with ``--json`` and returns every job ("All other formatting
and filtering arguments will be ignored", squeue(1) 22.05), so the caller filters.
A job object (22.05, trimmed)::

    {"job_id": 12, "user_name": "alice", "job_state": "RUNNING", "nodes": "n[1-2]",
     "name": "wrap", "current_working_directory": "/home/alice",
     "standard_output": "/home/alice/slurm-%j.out", "standard_error": ""}

24.11 prints ``"job_state": ["RUNNING"]`` (a list of flags) — both shapes are read.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from dxflow.schedulers import pyslurm_backend
from dxflow.schedulers.base import JobInfo, JobState, Scheduler, run
from dxflow.schedulers.hostlist import expand_hostlist

log = logging.getLogger(__name__)


class Slurm(Scheduler):
    name = "slurm"
    hook_env = {
        "job": ("SLURM_JOB_ID", "SLURM_JOBID"),
        "user": ("SLURM_JOB_USER",),
        "uid": ("SLURM_JOB_UID", "SLURM_UID"),
        "gid": ("SLURM_JOB_GID",),
        "node": ("SLURMD_NODENAME",),
        "cluster": ("SLURM_CLUSTER_NAME",),
        "work_dir": ("SLURM_JOB_WORK_DIR",),
        "stdout": ("SLURM_JOB_STDOUT",),
        "stderr": ("SLURM_JOB_STDERR",),
        # SLURM_JOB_NODELIST reaches the prolog only from 23.02.6; 22.05 sets SLURM_NODELIST.
        "nodes": ("SLURM_JOB_NODELIST", "SLURM_NODELIST"),
    }
    state_map = {
        "PENDING": JobState.PENDING, "CONFIGURING": JobState.PENDING, "REQUEUED": JobState.PENDING,
        "REQUEUE_HOLD": JobState.PENDING, "REQUEUE_FED": JobState.PENDING, "RESV_DEL_HOLD": JobState.PENDING,
        "RUNNING": JobState.RUNNING, "SUSPENDED": JobState.RUNNING, "STOPPED": JobState.RUNNING,
        "SIGNALING": JobState.RUNNING, "RESIZING": JobState.RUNNING, "STAGE_OUT": JobState.RUNNING,
        "COMPLETING": JobState.ENDING,
        "COMPLETED": JobState.ENDED, "CANCELLED": JobState.ENDED, "FAILED": JobState.ENDED,
        "TIMEOUT": JobState.ENDED, "NODE_FAIL": JobState.ENDED, "PREEMPTED": JobState.ENDED,
        "BOOT_FAIL": JobState.ENDED, "DEADLINE": JobState.ENDED, "OUT_OF_MEMORY": JobState.ENDED,
        "SPECIAL_EXIT": JobState.ENDED, "REVOKED": JobState.ENDED,
    }
    passthrough_env = ("SLURM_CONF",)
    squeue = ("squeue", "--json")
    commands = ("squeue", "sinfo")

    def expand_nodes(self, text: str) -> list[str]:
        return expand_hostlist(text) if text else []

    def jobs(self, user: str | None = None) -> list[JobInfo]:
        if pyslurm_backend.status(self.environ).usable:
            try:
                items = pyslurm_backend.load_jobs()
            except Exception as e:  # noqa: BLE001 - pyslurm raises its own RPCError; squeue still answers
                log.warning("pyslurm could not list jobs (%s: %s): asking squeue", type(e).__name__, e)
            else:
                return [i for i in map(self._info, items) if user is None or i.user == user]
        argv = list(self.squeue) + (["--user", user] if user else [])
        data = json.loads(run(argv))
        infos = [self._info(item) for item in data.get("jobs", [])]
        return [i for i in infos if user is None or i.user == user]

    def backend(self) -> str:
        return "pyslurm" if pyslurm_backend.status(self.environ).usable else " ".join(self.squeue)

    def backend_why(self) -> str:
        st = pyslurm_backend.status(self.environ)
        return st.reason if st.usable else f"{st.reason}; Slurm's own JSON output instead"

    def _info(self, item: dict[str, Any]) -> JobInfo:
        state = item.get("job_state", "")
        if isinstance(state, list):  # 23.02+: a list of flags, the base state first
            native = next((s for s in state if s in self.state_map), state[0] if state else "")
        else:
            native = str(state)
        job = str(item.get("job_id", ""))
        nodes = item.get("nodes") or ""
        return JobInfo(
            job=job, user=str(item.get("user_name", "")), state=self.map_state(native),
            nodes=self.expand_nodes(nodes) if isinstance(nodes, str) else list(nodes),
            name=str(item.get("name", "")),
            work_dir=str(item.get("current_working_directory", "")),
            stdout=expand_pattern(str(item.get("standard_output", "") or ""), item),
            stderr=expand_pattern(str(item.get("standard_error", "") or ""), item),
        )


def expand_pattern(pattern: str, item: dict[str, Any]) -> str:
    """Expand sbatch's filename patterns (%j %u %x %A %a %N %%) as far as squeue tells them."""
    if "%" not in pattern:
        return pattern
    nodes = item.get("nodes") or ""
    first = expand_hostlist(nodes)[0] if isinstance(nodes, str) and nodes else ""
    table = {
        "j": str(item.get("job_id", "")), "u": str(item.get("user_name", "")),
        "x": str(item.get("name", "")), "A": str(item.get("array_job_id", "") or item.get("job_id", "")),
        "a": str(item.get("array_task_id", "") or ""), "N": first, "%": "%",
    }
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "%" and i + 1 < len(pattern):
            j = i + 1
            while j < len(pattern) and pattern[j].isdigit():  # %5j: zero-padded
                j += 1
            key = pattern[j] if j < len(pattern) else ""
            if key in table:
                width = int(pattern[i + 1:j] or 0)
                value = table[key]
                out.append(value.zfill(width) if width and value.isdigit() else value)
                i = j + 1
                continue
        out.append(ch)
        i += 1
    return "".join(out)
