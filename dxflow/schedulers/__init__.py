"""Scheduler adapters, looked up by name. Each module is imported only when asked for.

All scheduler knowledge lives here, as data with its sources (docs/schedulers.md). Modules:

- ``base``     what dxflow asks of every scheduler (:class:`Scheduler`), and ``run`` for its commands
- ``signs``    whether a job runs on this node, from files its daemon keeps there (no controller call)
- ``patterns`` output file name patterns (``%j``, ``%J``, ``^array_index^``), expanded one way
- ``hostlist`` host names in node lists: Slurm's expressions, PBS's and LSF's lists
- ``launch``   how a command becomes a task of the job (``pbs_attach``, ``blaunch``)
- ``slurm`` (with ``pyslurm_backend``), ``pbs`` (OpenPBS, PBS Pro, Torque; ``torque_xml``), ``lsf``,
  ``local``: the adapters

dxflow's own adapters are in :data:`ADAPTERS`. A site adds one of its own by installing a
distribution that declares it in the entry-point group ``dxflow.schedulers`` — the way submitit
finds its plugins (``submitit/core/plugins.py``): the entry's name is the scheduler's name (what
``--scheduler`` and the hooks say), its value ``module:Class``, a subclass of
:class:`~dxflow.schedulers.base.Scheduler` whose ``name`` is that name::

    [options.entry_points]
    dxflow.schedulers =
        mysched = mysite_dxflow.mysched:MySched

The built-in table is read first and wins: an entry named like a built-in adapter is ignored (with a
warning), so no installed package replaces the adapter that root's hooks run. Entry points are read
only for a name the table does not have, and to list every adapter (``dxflow doctor``).
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Mapping

from dxflow.errors import ConfigError, DxflowError, UsageError
from dxflow.schedulers.base import SAFE_NAME, HookJob, JobInfo, JobState, Scheduler

log = logging.getLogger(__name__)

#: scheduler name -> "module:Class", dxflow's own adapters.
ADAPTERS: dict[str, str] = {
    "slurm": "dxflow.schedulers.slurm:Slurm",
    "pbs": "dxflow.schedulers.pbs:PBS",
    "torque": "dxflow.schedulers.pbs:Torque",
    "lsf": "dxflow.schedulers.lsf:LSF",
    "local": "dxflow.schedulers.local:Local",
}
#: The entry-point group in which other distributions declare their adapters.
ENTRY_POINTS = "dxflow.schedulers"


@functools.lru_cache(maxsize=1)
def site_adapters() -> dict[str, str]:
    """name -> "module:Class" of the adapters installed distributions declare in :data:`ENTRY_POINTS`
    (read once per process; ``site_adapters.cache_clear()`` reads again)."""
    import importlib.metadata  # here: the prolog imports this module, and ~9 ms of its start-up is this

    out: dict[str, str] = {}
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS):
        if entry.name in ADAPTERS:
            if entry.value != ADAPTERS[entry.name]:
                log.warning("scheduler adapter %s = %s ignored: %r is dxflow's own (%s)", entry.name,
                            entry.value, entry.name, ADAPTERS[entry.name])
        elif not SAFE_NAME.match(entry.name):
            log.warning("scheduler adapter %r ignored: a scheduler's name is letters, digits and . _ - @ +",
                        entry.name)
        else:
            out.setdefault(entry.name, entry.value)
    return out


def adapters() -> dict[str, str]:
    """Every adapter this process can use, dxflow's own first."""
    return {**ADAPTERS, **site_adapters()}


def adapter_class(name: str) -> type[Scheduler]:
    """The adapter class of scheduler ``name``: UsageError when no adapter has that name, ConfigError
    when a site's adapter cannot be loaded or is not one."""
    target = ADAPTERS.get(name) or site_adapters().get(name)
    if target is None:
        raise UsageError(f"unknown scheduler {name!r}; known: {', '.join(adapters())}")
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"scheduler {name!r}: cannot load its adapter {target} ({e})") from e
    if not (isinstance(cls, type) and issubclass(cls, Scheduler)):
        raise ConfigError(f"scheduler {name!r}: {target} is not a subclass of dxflow.schedulers.base.Scheduler")
    if cls.name != name:
        raise ConfigError(f"scheduler {name!r}: {target} names itself {cls.name!r}; its name must be {name!r}")
    return cls


def get_scheduler(name: str, environ: Mapping[str, str] | None = None) -> Scheduler:
    return adapter_class(name)(environ)


def has_controller(name: str) -> bool:
    """Whether scheduler ``name`` has a controller to ask about its jobs (False for a name no adapter
    has: nothing can be asked, and its agents are not dropped for a job nobody can confirm)."""
    try:
        return adapter_class(name).has_controller
    except DxflowError:
        return False


__all__ = ["ADAPTERS", "ENTRY_POINTS", "HookJob", "JobInfo", "JobState", "Scheduler", "adapter_class",
           "adapters", "get_scheduler", "has_controller", "site_adapters"]
