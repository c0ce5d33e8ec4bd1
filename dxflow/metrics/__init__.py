"""Job metrics (issue #16): what one job uses on each of its nodes, over its whole life.

The agent of each node samples its job every ``metrics_interval`` seconds and keeps the series;
the master merges a job's nodes and serves them to the CLI, the console and Prometheus.

- :mod:`~dxflow.metrics.sources` — reads the job's cgroup, its processes and the node (/proc, /sys);
- :mod:`~dxflow.metrics.gpus` — the job's GPUs: which ones (the scheduler's variables) and their
  readings (NVML, ``nvidia-smi``, ``rocm-smi``);
- :mod:`~dxflow.metrics.history` — the series in bounded memory (full resolution for the last hour,
  coarser before);
- :mod:`~dxflow.metrics.sampler` — the agent's sampling thread: one sample at a time;
- :mod:`~dxflow.metrics.summary` — the series' columns, a node's running totals and peaks (its part of
  the job's report) and the report files in ``~/.dxflow/reports/``;
- :mod:`~dxflow.metrics.report` — the efficiency report of a whole job (several nodes), with notes;
- :mod:`~dxflow.metrics.prometheus` — the live series in Prometheus' text format.

Nothing here imports Flask, the agent or the master: both use it.
"""

from __future__ import annotations

import re
import time

from dxflow.errors import UsageError

#: ``10m``, ``90s``, ``2h``, ``1d`` or a number of seconds.
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float | None = None) -> float:
    """The epoch time ``?since=`` / ``--since`` stands for: a duration back from now (``10m``, ``90s``,
    ``2h``, ``600``) or an epoch time in seconds (any number above 10**9). UsageError otherwise."""
    now = time.time() if now is None else now
    m = _DURATION.match(text or "")
    if not m:
        raise UsageError(f"since must be a duration such as 10m, 90s, 2h or an epoch time, not {text!r}")
    value = float(m.group(1)) * _UNIT[m.group(2)]
    if not m.group(2) and value > 1e9:
        return value
    return now - value
