"""Where dxflow keeps things, and the site policy from ``/etc/dxflow/dxflow.toml``.

Imported by the scheduler hooks, so it imports only the standard library.
"""

from __future__ import annotations

import os
import pwd
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from dxflow.errors import ConfigError

SITE_CONFIG = Path(os.environ.get("DXFLOW_SITE_CONFIG", "/etc/dxflow/dxflow.toml"))


@dataclass(frozen=True)
class SiteConfig:
    """Site policy. Every key is optional in the TOML file; unknown keys are an error."""

    #: Root-owned folder where hooks keep one record per agent they started (pid, start time, uid).
    runtime_dir: str = "/run/dxflow"
    #: Where hooks log what they did and why they did nothing.
    hook_log: str = "/var/log/dxflow/hooks.log"
    #: Python that runs the agent (default: the one running the hook).
    python: str = ""
    #: gunicorn threads per agent (streams and WebSockets each hold one).
    agent_threads: int = 32
    #: Seconds between the agent's checks that its job still runs (at most one scheduler query a minute).
    job_check_interval: float = 60.0
    #: Seconds the epilog waits for an agent to stop after SIGTERM before SIGKILL.
    stop_timeout: float = 1.0
    #: Extra roots agents may serve files from; ``$USER`` and ``$JOB`` are expanded.
    scratch_roots: list[str] = field(default_factory=list)
    #: Cluster name when the scheduler does not tell.
    cluster: str = ""

    @classmethod
    def load(cls, path: Path | None = None) -> "SiteConfig":
        path = path or SITE_CONFIG
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            return cls()
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"cannot read site config {path}: {e}; fix or remove the file") from e
        known = {f.name: f for f in fields(cls)}
        data = data.get("dxflow", data)
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        for key, value in data.items():
            default = getattr(cls(), key)
            if isinstance(default, float) and isinstance(value, int):
                data[key] = float(value)
            elif not isinstance(value, type(default)):
                raise ConfigError(f"{path}: {key} must be {type(default).__name__}, not {value!r}")
        return cls(**data)


def user_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """``~/.dxflow`` of the current (or given home's) user."""
    if home is None:
        home = os.environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
    return Path(home) / ".dxflow"


def ensure_user_dir(home: str | os.PathLike[str] | None = None) -> Path:
    """Create ``~/.dxflow`` (0700) and its sub-folders; refuse one that is not ours or is open to others."""
    base = user_dir(home)
    for path in (base, base / "fleet", base / "logs"):
        path.mkdir(mode=0o700, exist_ok=True)
    st = base.lstat()
    if st.st_uid != os.getuid() or not base.is_dir() or base.is_symlink():
        raise ConfigError(f"{base} is not a folder owned by you; remove it and retry")
    if st.st_mode & 0o077:
        os.chmod(base, 0o700)
    return base


def agent_name(cluster: str, job: str, node: str) -> str:
    """File-name-safe key of one agent: cluster, job and node (one agent per job per node)."""
    return f"{cluster}.{job}.{node}"
