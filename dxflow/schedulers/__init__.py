"""Scheduler adapters, looked up by name. Each module is imported only when asked for."""

from __future__ import annotations

import importlib
from typing import Mapping

from dxflow.errors import UsageError
from dxflow.schedulers.base import HookJob, JobInfo, JobState, Scheduler

#: scheduler name -> "module:Class". Sites may add their own.
ADAPTERS: dict[str, str] = {
    "slurm": "dxflow.schedulers.slurm:Slurm",
    "pbs": "dxflow.schedulers.pbs:PBS",
    "torque": "dxflow.schedulers.pbs:Torque",
    "lsf": "dxflow.schedulers.lsf:LSF",
    "local": "dxflow.schedulers.local:Local",
}


def get_scheduler(name: str, environ: Mapping[str, str] | None = None) -> Scheduler:
    try:
        module_name, class_name = ADAPTERS[name].split(":")
    except KeyError as e:
        raise UsageError(f"unknown scheduler {name!r}; known: {', '.join(ADAPTERS)}") from e
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(environ)


__all__ = ["ADAPTERS", "HookJob", "JobInfo", "JobState", "Scheduler", "get_scheduler"]
