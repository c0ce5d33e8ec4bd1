"""Registration records: how an agent tells its user's master "I am here".

One JSON file per agent in ``~/.dxflow/fleet/`` (the home is shared by the login
and compute nodes), written atomically so a reader never sees half a record.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Mapping

from dxflow import API_VERSION, __version__

log = logging.getLogger(__name__)

#: Agent API versions this release's master talks to. An agent's API changes (a route, a field, a
#: token) only with a new number; an agent of another number is shown as ``incompatible`` with the
#: reason, never contacted (docs/install.md, "Upgrading while jobs run").
COMPATIBLE_API = frozenset({API_VERSION})
#: How the prolog hands the agent its job's nodes (folded, ``n[1-4]``): the hook sets it in the agent's
#: environment (:func:`dxflow.hook.agent_passthrough`), the agent copies it into its registration
#: (:func:`job_nodes_of`). The commands the agent runs for the user get the job's own environment
#: (:mod:`dxflow.agent.jobenv`), not this.
JOB_NODES_ENV = "DXFLOW_JOB_NODES"
#: The longest ``job_nodes`` a registration may carry: a folded set is short (``n[1-4096]``); this
#: bounds what a master reads for a record whatever is written in it.
JOB_NODES_MAX = 65536


@dataclass
class Registration:
    cluster: str
    scheduler: str
    job: str
    node: str
    address: str      # how the login node reaches the node (host name or address) for SSH
    port: int         # the agent's port on the node's 127.0.0.1
    pid: int
    user: str
    started: str      # ISO 8601, UTC
    public_key: str   # PEM; the agent signs identity challenges with its private half
    api_version: int
    version: str
    #: Every node of the job, folded (``n[1-4]``), as the scheduler told the prolog (Slurm's
    #: SLURM_JOB_NODELIST, PBS's node file, LSF's LSB_MCPU_HOSTS): ``JOB:all`` without asking the
    #: controller (:func:`dxflow.master.jobnodes.from_agents`). "": not known (an agent started by hand,
    #: or by an older release: records without the field still load).
    job_nodes: str = ""

    @property
    def name(self) -> str:
        return f"{self.cluster}.{self.job}.{self.node}"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def incompatibility(self) -> str:
        """Why this release cannot talk to the registered agent; "" when it can."""
        if self.api_version in COMPATIBLE_API:
            return ""
        return (f"agent of dxflow {self.version} speaks agent API {self.api_version}; this master "
                f"(dxflow {__version__}) speaks {', '.join(map(str, sorted(COMPATIBLE_API)))}: the agent ends "
                "with its job, and new jobs get agents of the installed release")

    @classmethod
    def from_dict(cls, data: dict) -> "Registration":
        """A record as written; fields added since (with a default) may be missing, unknown ones are
        ignored (a newer release's record)."""
        names = {f.name for f in fields(cls)}
        required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
        missing = required - set(data)
        if missing:
            raise ValueError(f"registration lacks {', '.join(sorted(missing))}")
        job_nodes = data.get("job_nodes", "")
        if not isinstance(job_nodes, str) or len(job_nodes) > JOB_NODES_MAX:
            raise ValueError(f"registration's job_nodes is not a node set of at most {JOB_NODES_MAX} characters")
        return cls(**{k: data[k] for k in names if k in data})


def job_nodes_of(environ: Mapping[str, str]) -> str:
    """The job's nodes the prolog handed the agent (:data:`JOB_NODES_ENV`), for its registration; ""
    when none were (an agent started by hand, a hook of an older release) or the value is too long."""
    value = environ.get(JOB_NODES_ENV, "").strip()
    return value if len(value) <= JOB_NODES_MAX else ""


def write(fleet_dir: Path, reg: Registration) -> Path:
    path = fleet_dir / f"{reg.name}.json"
    tmp = fleet_dir / f".{reg.name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(reg.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_all(fleet_dir: Path, cache: dict | None = None) -> list[Registration]:
    """Every readable record; unreadable ones are logged and skipped (a writer may be mid-way).

    With ``cache`` (kept by the caller between calls), a file whose size and mtime did
    not change is not read again: the master reads the folder whenever it changed
    (:class:`dxflow.master.pace.FolderWatch`), and most files have not.
    """
    out = []
    seen = set()
    try:
        entries = list(os.scandir(fleet_dir))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.endswith(".json"):
            continue
        try:
            st = entry.stat()
            key = (st.st_mtime_ns, st.st_size)
            if cache is not None and cache.get(entry.name, (None,))[0] == key:
                reg = cache[entry.name][1]
            else:
                with open(entry.path) as f:
                    reg = Registration.from_dict(json.load(f))
                if cache is not None:
                    cache[entry.name] = (key, reg)
            out.append(reg)
            seen.add(entry.name)
        except (OSError, ValueError, TypeError) as e:
            log.warning("skipping registration %s: %s", entry.path, e)
    if cache is not None:
        for name in set(cache) - seen:
            del cache[name]
    return out


def remove(fleet_dir: Path, name: str, pid: int | None = None) -> None:
    """Remove a record; with ``pid``, only if it is still that agent's (a newer agent may have replaced it)."""
    path = fleet_dir / f"{name}.json"
    if pid is not None:
        try:
            with open(path) as f:
                if json.load(f).get("pid") != pid:
                    return
        except (OSError, ValueError):
            return
    path.unlink(missing_ok=True)
