"""The state file: what ``lab up`` made, so that ``lab down`` undoes exactly that."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from dxflow.errors import ConfigError

log = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclass
class LabState:
    """Everything ``up`` created or changed. Saved after every step, so a half-failed
    ``up`` can still be undone."""

    node_count: int = 0
    nodes: list[str] = field(default_factory=list)
    users: list[str] = field(default_factory=list)
    users_created: list[str] = field(default_factory=list)
    munged_started: bool = False
    pids: dict[str, int] = field(default_factory=dict)
    backups: dict[str, str] = field(default_factory=dict)      # original path -> backup path
    files_written: list[str] = field(default_factory=list)     # config files the lab wrote
    hook_files: list[str] = field(default_factory=list)
    dirs_created: list[str] = field(default_factory=list)      # outside the lab root, removed if empty
    slurm_version: str = ""
    #: "per-node" (each node has its own cgroups, Slurm runs its cgroup plugins) or "" (it does not)
    cgroups: str = ""
    cgroups_why_not: str = ""
    #: v1 tree folder name -> the cgroup the nodes' folders were made under (``lab up``'s own, the first time)
    cgroup_trees: dict[str, str] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = 0.0
    version: int = STATE_VERSION

    def remember(self, attr: str, value: str) -> None:
        """Append ``value`` to list ``attr`` once."""
        items = getattr(self, attr)
        if value not in items:
            items.append(value)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict) -> "LabState":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            log.debug("ignoring unknown state keys: %s", ", ".join(sorted(unknown)))
        return cls(**{k: v for k, v in data.items() if k in known})


def load(path: Path) -> LabState | None:
    """The saved state, or ``None`` when there is none."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigError(f"cannot read the lab state file {path}: {e}") from e
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return LabState.from_dict(data)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"the lab state file {path} is damaged ({e}); "
                          f"`dxflow lab down` cleans up by name without it") from e


def save(state: LabState, path: Path) -> None:
    """Write atomically (temporary file + rename), readable by every user (it holds no secrets)."""
    state.updated_at = time.time()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(state.to_json())
    os.replace(tmp, path)
