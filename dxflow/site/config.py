"""The site service's own config, ``/etc/dxflow/site.toml`` (``$DXFLOW_SITE_SERVICE_CONFIG``).

Read by ``dxflow site init|serve|status`` only; users' commands, hooks and agents read
``/etc/dxflow/dxflow.toml`` (:mod:`dxflow.config`), where ``site``, ``site_gateways`` and
``site_keys`` tell them that a site service exists and how to trust it. The table of keys in
docs/site.md is generated from the ``#:`` comments here (:func:`site_service_table`).

Example::

    listen = "10.0.0.1:8470"
    database = "postgresql:///dxflow?host=/run/postgresql"
    [clusters.cluster1]
    scheduler = "slurm"
    env = { SLURM_CONF = "/etc/slurm/slurm.conf" }
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path

from dxflow.config import _toml, field_docs, read_toml
from dxflow.errors import ConfigError
from dxflow.schedulers import adapters
from dxflow.schedulers.base import SAFE_NAME

DEFAULT_PATH = Path("/etc/dxflow/site.toml")
PATH_ENV = "DXFLOW_SITE_SERVICE_CONFIG"
#: A cluster's name as the scheduler hooks report it (Slurm's ClusterName): it names agents and files.
CLUSTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Environment variable names a cluster's ``env`` may set for its scheduler's commands.
ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")

#: Files in ``state_dir`` (private to the service account) and ``publish_dir`` (world-readable).
GATEWAY_HOST_KEY = "gateway_host_key"
TOKEN_KEY = "token_key.pem"
TLS_KEY = "tls.key"
TLS_CERT = "tls.pem"
DATABASE_FILE = "site.db"


def config_path() -> Path:
    return Path(os.environ.get(PATH_ENV) or DEFAULT_PATH)


def host_port(text: str, key: str = "address") -> tuple[str, int]:
    """``"HOST:PORT"`` (``"[::1]:8470"`` for IPv6) as a pair; ConfigError naming ``key`` otherwise."""
    m = re.fullmatch(r"\[(?P<v6>[0-9A-Fa-f:.]+)\]:(?P<port>\d{1,5})|(?P<host>[A-Za-z0-9_.-]+):(?P<p>\d{1,5})", text)
    if not m:
        raise ConfigError(f"{key} = {text!r}: expected HOST:PORT (e.g. \"127.0.0.1:8470\")")
    host = m.group("v6") or m.group("host")
    port = int(m.group("port") or m.group("p"))
    if not 0 < port < 65536:
        raise ConfigError(f"{key} = {text!r}: port {port} is not in 1..65535")
    if m.group("v6"):
        try:
            ipaddress.IPv6Address(host)
        except ValueError as e:
            raise ConfigError(f"{key} = {text!r}: {e}") from e
    return host, port


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) is this machine's loopback: ``localhost``, 127.0.0.0/8, ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ClusterConfig:
    """How the site service asks one cluster's scheduler whether a job runs (``[clusters.NAME]``)."""

    name: str
    #: The cluster's scheduler: an adapter name of dxflow.schedulers ("slurm", "pbs", "lsf", or a site's own).
    scheduler: str = "slurm"
    #: Folder of that scheduler's client commands for this cluster (looked in first). "": the service's PATH.
    scheduler_bin: str = ""
    #: Environment for this cluster's scheduler commands, e.g. { SLURM_CONF = "/etc/slurm-c2/slurm.conf" }.
    env: dict[str, str] = field(default_factory=dict)

    def command_env(self) -> dict[str, str]:
        """The environment this cluster's scheduler commands run in: the service's, ``env``, and
        ``scheduler_bin`` first on PATH."""
        out = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "PBS_CONF_FILE", "LSF_ENVDIR")}
        out.update(self.env)
        if self.scheduler_bin:
            out["PATH"] = os.pathsep.join([self.scheduler_bin, out.get("PATH", os.defpath)])
        return out


@dataclass(frozen=True)
class SiteServiceConfig:
    """The site service's settings. Every key is optional; unknown keys are an error."""

    #: HOST:PORT of the user API (the CLI's `site` URLs). Not on loopback: https with the published tls.pem.
    listen: str = "127.0.0.1:8470"
    #: HOST:PORT of the web console (one-time login links from `dxflow console`).
    console_listen: str = "127.0.0.1:8472"
    #: HOST:PORT where agents dial in (SSH, the gateway host key; the `site_gateways` of dxflow.toml).
    gateway_listen: str = "0.0.0.0:8471"
    #: Private folder of the service account (mode 0700): the private keys, the SQLite database.
    state_dir: str = "/var/lib/dxflow-site"
    #: World-readable folder where `dxflow site init` publishes the public halves (the `site_keys` of dxflow.toml).
    publish_dir: str = "/etc/dxflow/site"
    #: "" keeps the state in SQLite in state_dir (one replica); "postgresql://..." (a libpq URL) for replicas.
    database: str = ""
    #: This replica's name in logs and `dxflow site status`. "": the host name.
    replica: str = ""
    #: Unix group whose members see every job's state and metrics, read-only.
    admin_group: str = "dxadmin"
    #: Let admin_group members act on other users' jobs too (files, exec, shell, proxy, forward). Default false.
    admins_may_act: bool = False
    #: Account the service runs as; `dxflow site init` makes state_dir its own, `site serve --user` drops to it.
    service_user: str = "dxflow"
    #: The clusters whose agents may enroll: [clusters.NAME] tables (scheduler, scheduler_bin, env).
    clusters: dict[str, ClusterConfig] = field(default_factory=dict)

    # -- derived --------------------------------------------------------------
    @property
    def replica_name(self) -> str:
        return self.replica or socket.gethostname().split(".")[0]

    @property
    def state(self) -> Path:
        return Path(self.state_dir)

    @property
    def publish(self) -> Path:
        return Path(self.publish_dir)

    @property
    def gateway_host_key(self) -> Path:
        return self.state / GATEWAY_HOST_KEY

    @property
    def token_key(self) -> Path:
        return self.state / TOKEN_KEY

    @property
    def tls_key(self) -> Path:
        return self.state / TLS_KEY

    @property
    def tls_cert(self) -> Path:
        return self.state / TLS_CERT

    @property
    def database_url(self) -> str:
        """What :func:`dxflow.site.store.open_store` opens: the PostgreSQL URL, or the SQLite file."""
        return self.database or str(self.state / DATABASE_FILE)

    def cluster(self, name: str) -> ClusterConfig:
        try:
            return self.clusters[name]
        except KeyError:
            raise ConfigError(f"cluster {name!r} is not in the site service's config ({config_path()}); "
                              f"known: {', '.join(sorted(self.clusters)) or 'none'}") from None

    # -- loading --------------------------------------------------------------
    @classmethod
    def load(cls, path: Path | None = None) -> "SiteServiceConfig":
        path = path or config_path()
        data = read_toml(path, "the site service config")
        return cls() if data is None else cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, where: str = "site.toml") -> "SiteServiceConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values: dict = {}
        defaults = cls()
        for key, value in data.items():
            if key == "clusters":
                values[key] = _clusters(value, where)
                continue
            default = getattr(defaults, key)
            if not isinstance(value, type(default)):
                raise ConfigError(f"{where}: {key} must be {type(default).__name__}, not {value!r}")
            values[key] = value
        cfg = cls(**values)
        ports = {key: host_port(getattr(cfg, key), f"{where}: {key}")[1]
                 for key in ("listen", "console_listen", "gateway_listen")}
        if len(set(ports.values())) < len(ports):  # the app tells the user API from the console by its port
            raise ConfigError(f"{where}: listen, console_listen and gateway_listen need ports of their own, not "
                              f"{', '.join(f'{k} {p}' for k, p in ports.items())}")
        for key in ("state_dir", "publish_dir"):
            if not os.path.isabs(getattr(cfg, key)):
                raise ConfigError(f"{where}: {key} = {getattr(cfg, key)!r} must be an absolute path")
        if cfg.database and not cfg.database.startswith(("postgresql://", "postgres://")):
            raise ConfigError(f"{where}: database = {cfg.database!r}: expected \"\" (SQLite in state_dir) or a "
                              "postgresql:// URL")
        for key in ("replica", "admin_group", "service_user"):
            value = getattr(cfg, key)
            if value and not SAFE_NAME.match(value):
                raise ConfigError(f"{where}: {key} = {value!r}: letters, digits and . _ - only")
        return cfg


def _clusters(value: object, where: str) -> dict[str, ClusterConfig]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: clusters must be tables [clusters.NAME], not {value!r}")
    out = {}
    names = adapters()
    allowed = {f.name for f in fields(ClusterConfig)} - {"name"}
    for name, table in value.items():
        here = f"{where}: [clusters.{name}]"
        if not CLUSTER_NAME.fullmatch(name):
            raise ConfigError(f"{here}: a cluster name is letters, digits, . _ - (as the scheduler reports it)")
        if not isinstance(table, dict):
            raise ConfigError(f"{here} must be a table")
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise ConfigError(f"{here}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}")
        scheduler = table.get("scheduler", "slurm")
        if scheduler not in names:
            raise ConfigError(f"{here}: scheduler {scheduler!r} has no adapter; known: {', '.join(sorted(names))}")
        scheduler_bin = table.get("scheduler_bin", "")
        if not isinstance(scheduler_bin, str) or (scheduler_bin and not os.path.isabs(scheduler_bin)):
            raise ConfigError(f"{here}: scheduler_bin must be an absolute path, not {scheduler_bin!r}")
        env = table.get("env", {})
        if not isinstance(env, dict) or not all(isinstance(k, str) and ENV_NAME.fullmatch(k) and isinstance(v, str)
                                                for k, v in env.items()):
            raise ConfigError(f"{here}: env must be a table of NAME = \"value\" strings, not {env!r}")
        out[name] = ClusterConfig(name=name, scheduler=scheduler, scheduler_bin=scheduler_bin, env=dict(env))
    return out


def site_service_keys() -> list[tuple[str, str, str]]:
    """``(key, default as TOML, what it sets)`` for every key of :class:`SiteServiceConfig` and of a
    ``[clusters.NAME]`` table, read from the ``#:`` comments above each field."""
    out = []
    for cls, prefix in ((SiteServiceConfig, ""), (ClusterConfig, "clusters.NAME.")):
        docs = field_docs(cls)
        defaults = cls() if cls is SiteServiceConfig else ClusterConfig(name="NAME")
        for f in fields(cls):
            if f.name in docs and f.name != "clusters":
                out.append((prefix + f.name, _toml(getattr(defaults, f.name)), docs[f.name]))
    return out


def site_service_table() -> str:
    """The keys of ``/etc/dxflow/site.toml`` as a Markdown table (docs/site.md)."""
    lines = ["| key | default | what it sets |", "| --- | --- | --- |"]
    lines += [f"| `{key}` | `{default}` | {doc.replace('|', chr(92) + '|')} |"
              for key, default, doc in site_service_keys()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m dxflow.site.config --markdown")
    sys.stdout.write(site_service_table())
