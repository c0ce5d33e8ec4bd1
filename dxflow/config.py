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
    # -- load on the scheduler's controller and the shared file system (issue #11; docs/admin-*.md) --
    #: Seconds between an agent's looks, on its own node, at whether its job still runs there (Slurm:
    #: slurmstepd's sockets in slurmd's spool folder; no controller call, no shared file system).
    #: Default 10: a look lists one local folder; an agent whose epilog did not run outlives its job by
    #: at most this much where such a look can tell.
    job_check_interval: float = 10.0
    #: Seconds between an agent's questions to the controller, asked only where no look on the node can
    #: tell (Slurm without PrologFlags=Contain, on nodes other than the batch host; PBS, LSF), filtered
    #: to its one job. The first comes at a random point of the first interval, then every interval
    #: ±10 %, so a large job's agents never ask together. Default 600: the epilog stops the agent when
    #: the job ends; this is only the safety net for a node where no epilog ran.
    controller_check_interval: float = 600.0
    #: At most this many controller queries a minute from one dxflow process, whatever asks: an agent
    #: (one job on one node) or a user's master; past it a query is skipped and retried later. Default
    #: 6: above what the intervals below ever need, low enough that nothing dxflow does can flood
    #: slurmctld. 0 lifts the cap.
    controller_queries_per_minute: float = 6.0
    #: Seconds between a master's questions to the scheduler (one filtered query for its user) while
    #: nothing changes, ±20 %. Default 120: registrations appearing or going, and the user's commands,
    #: ask at once; this only catches jobs that ended where no epilog removed their agents.
    master_check_interval: float = 120.0
    #: Seconds at least between two of a master's questions asked on news (a registration appeared or
    #: went, `dxflow ls`). Default 10: a 1,000-node job's registrations arrive within a few seconds and
    #: are confirmed by one or two queries, not one each.
    master_check_gap: float = 10.0
    #: Seconds between a master's looks at ~/.dxflow/fleet while agents start or the user works (one
    #: stat of the folder; it is read only when its modification time changed). Default 0.5: a new
    #: agent is seen within half a second.
    fleet_scan_interval: float = 0.5
    #: Seconds the looks back off to, doubling, while nothing starts. Default 5: twelve stats a minute
    #: of an idle folder on the shared home; a command (`dxflow ls`) looks at once anyway.
    fleet_scan_max: float = 5.0
    #: Seconds after which a master with no live agent (starting or ready) and no client exits; the
    #: next command starts it again. Default 900 (15 minutes); 0 keeps masters running.
    master_idle_exit: float = 900.0
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
