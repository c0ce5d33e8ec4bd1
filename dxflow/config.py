"""The site policy from ``/etc/dxflow/dxflow.toml``, and the name of an agent's files.

What dxflow keeps in a user's home is laid out in :mod:`dxflow.layout`. The table of site
config keys in the docs is generated from :class:`SiteConfig` itself, its defaults and its ``#:``
comments: ``python -m dxflow.config --markdown`` (:func:`site_config_table`).

Imported by the scheduler hooks, so it imports only the standard library.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

from dxflow.errors import ConfigError

DEFAULT_SITE_CONFIG = Path("/etc/dxflow/dxflow.toml")
#: The site config this process reads: ``$DXFLOW_SITE_CONFIG`` (a hook given one passes it to its agent).
SITE_CONFIG = Path(os.environ.get("DXFLOW_SITE_CONFIG") or DEFAULT_SITE_CONFIG)


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
    #: The node's own scratch, which agents serve too: ``$TMPDIR`` is the job's (read from its
    #: processes), ``$USER`` and ``$JOB`` are expanded, a folder missing on a node is skipped. Every
    #: user of the node shares them, so there agents serve only what belongs to the job's user: each
    #: folder, file and symlink below the root must be theirs, and listings show only their entries.
    #: [] turns it off.
    node_local_roots: list[str] = field(default_factory=lambda: ["$TMPDIR", "/tmp", "/local"])
    #: Seconds between an agent's samples of its job (CPU, memory, I/O, GPUs; docs/metrics.md). Default
    #: 2; 0 turns sampling (and the job's report) off.
    metrics_interval: float = 2.0
    # -- where the site keeps things (issue #10; docs/admin-slurm.md) --
    #: Folder of the scheduler's client commands (``squeue``, ``qstat``, ``bjobs``), looked in first by
    #: hooks, agents, masters and ``dxflow doctor`` alike. Default "": PATH, then the scheduler's usual
    #: places. Set it where they are outside ``/usr/bin`` (``/opt/slurm/bin``): agents run with a short PATH.
    scheduler_bin: str = ""
    #: Keep each agent's log (``~/.dxflow/logs/CLUSTER.JOB.NODE.log``) after its job ended. Default false:
    #: the epilog removes it with the agent's registration, as the user.
    keep_agent_logs: bool = False
    #: Unix datagram socket of the syslog daemon that receives the audit trail (who did what on which
    #: job: exec, shell, file writes and deletes, proxy and forward use; dxflow.audit).
    audit_socket: str = "/dev/log"
    #: Syslog facility of the audit trail: a name of logging.handlers.SysLogHandler.facility_names.
    audit_facility: str = "authpriv"
    #: How masters reach nodes (docs/ssh.md): "auto" takes paramiko where it can log in with the user's
    #: keys or agent and verify the host key, the user's OpenSSH client otherwise (host certificates,
    #: hostbased, GSSAPI, MFA, settings paramiko cannot honour); "paramiko" or "openssh" forces one.
    #: A user's ``ssh_transport`` in ``~/.dxflow/config`` wins over this.
    ssh_transport: str = "auto"
    # -- the site service (issue #17; docs/site.md) --
    #: "HOST:PORT" of every site service replica's agent gateway. Non-empty: the prolog enrolls each
    #: agent (a gateway key of its own, vouched for by a root MUNGE credential) and the agent dials out
    #: to every gateway (SSH, the gateway's host key pinned), which reaches it through that connection
    #: only: no inbound port on the node, no user's SSH key. Default []: no dial-out.
    site_gateways: list[str] = field(default_factory=list)
    #: Folder the site admin publishes, world-readable (``dxflow site init``): ``gateway_host_key.pub``
    #: (agents pin it), ``token_key.pem`` (agents accept tokens it signs, naming their own user only),
    #: ``tls.pem`` (the CLI pins it for https ``site`` URLs).
    site_keys: str = "/etc/dxflow/site"
    #: URLs of the site service's user API, one per replica (``["https://login1:8470"]``; docs/site.md).
    #: Non-empty: every ``dxflow`` command talks to the site service instead of a per-user master, proving
    #: its user with a MUNGE credential per request; the URLs are tried in order (a replica that does not
    #: answer is skipped). https is verified against ``site_keys``/tls.pem only; http is for loopback
    #: addresses only. Default []: each user's own master, as without a site service.
    site: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path | None = None) -> "SiteConfig":
        path = path or SITE_CONFIG
        data = read_toml(path, "site config")
        if data is None:
            return cls()
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


def read_toml(path: Path, what: str) -> dict | None:
    """The TOML file ``path``; None when there is none; ConfigError naming ``what`` when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}; fix or remove the file") from e


def agent_name(cluster: str, job: str, node: str) -> str:
    """File-name-safe key of one agent: cluster, job and node (one agent per job per node)."""
    return f"{cluster}.{job}.{node}"


def field_docs(cls: type) -> dict[str, str]:
    """What each field of the dataclass ``cls`` sets: the ``#:`` comment lines above it, joined (reST's
    ````literals```` as Markdown's). The docs' tables of config keys are made from these."""
    import inspect  # here, not at the top: the hooks import this module, and their start-up is measured

    docs: dict[str, str] = {}
    comment: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        doc = re.match(r"\s*#:\s?(.*)$", line)
        name = re.match(r"\s*(\w+)\s*:\s*[^=]+=", line)
        if doc:
            comment.append(doc.group(1).strip())
        elif name and comment:
            docs[name.group(1)] = " ".join(comment).replace("``", "`")
            comment = []
        else:
            comment = []
    return docs


def site_config_keys() -> list[tuple[str, str, str]]:
    """``(key, default as TOML, what it sets)`` for every key of :class:`SiteConfig`."""
    docs = field_docs(SiteConfig)
    defaults = SiteConfig()
    return [(f.name, _toml(getattr(defaults, f.name)), docs.get(f.name, "")) for f in fields(SiteConfig)]


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, list)):
        return json.dumps(value)
    return repr(value)


def site_config_table() -> str:
    """The keys of ``/etc/dxflow/dxflow.toml`` as a Markdown table (what the docs show)."""
    lines = ["| key | default | what it sets |", "| --- | --- | --- |"]
    bar = "\\|"  # a "|" in a cell would end it
    lines += [f"| `{key}` | `{default}` | {doc.replace('|', bar)} |" for key, default, doc in site_config_keys()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m dxflow.config --markdown")
    sys.stdout.write(site_config_table())
