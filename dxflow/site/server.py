"""Run the site service under gunicorn: ``dxflow site serve`` (as the service account, never root).

One worker with threads holds the fleet, the store's connections and the gateway (the agents'
dial-out connections are this process's), as a user's master holds its tunnels
(:mod:`dxflow.master.server`). It listens on ``listen`` (the user API; over TLS with the key
``dxflow site init`` made when it is not on loopback) and ``console_listen`` (the web console, plain
http for an ``ssh -L`` or a TLS-terminating proxy), and runs the gateway on ``gateway_listen`` in the
same process.

The worker is dxflow's guarded one (:mod:`dxflow.edge.worker`: head deadlines, a thread pool per
listener, a bound on connections per peer) admitting every user: each request proves its user
itself (MUNGE or a console session, :mod:`dxflow.site.users`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Hashable

from gunicorn.app.base import BaseApplication

from dxflow.edge.worker import GuardedConn, GuardedThreadWorker
from dxflow.errors import ConfigError, UsageError
from dxflow.schedulers.base import QUERY_BUDGET
from dxflow.site.config import SiteServiceConfig, host_port, is_loopback
from dxflow.site.fleet import SiteFleet, load_token_key
from dxflow.site.store import Store, open_store

log = logging.getLogger("dxflow.site")

THREADS = 64


class TLSSettings:
    """gunicorn's settings with TLS on, for the connections of the user API's listener only (gunicorn's own
    ``certfile`` would put every listener on TLS, the console's too, which a browser reaches by
    ``ssh -L`` on plain http)."""

    is_ssl = True

    def __init__(self, cfg: Any, certfile: str, keyfile: str) -> None:
        self._cfg = cfg
        self.certfile = certfile
        self.keyfile = keyfile

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cfg, name)


class SiteWorker(GuardedThreadWorker):
    """The guarded worker, admitting every user (each request is authenticated by the app), with TLS on
    the user API's listener when it is not on loopback."""

    def admits(self, uid: int | None) -> bool:
        return True

    def peer_key(self, uid: int | None, client: Any) -> Hashable:
        # another host's connections have no uid here: each host gets a bound of its own
        if uid is None and isinstance(client, tuple) and client:
            return ("host", client[0])
        return uid

    def init_process(self) -> None:
        config: SiteServiceConfig = getattr(self.app, "config")  # noqa: B009 - the SiteServer
        self.tls: TLSSettings | None = None
        self.api_port = host_port(config.listen)[1]
        if not on_loopback(config.listen):  # users' credentials cross the network: TLS, the pinned certificate
            self.tls = TLSSettings(self.cfg, str(config.tls_cert), str(config.tls_key))
        super().init_process()

    def enqueue_req(self, conn) -> None:
        if self.tls is not None and isinstance(conn, GuardedConn) and _port(conn.server) == self.api_port:
            conn.cfg = self.tls  # before its first request, when the thread's init() wraps the socket
            # the kernel holds TLS records, never a readable request head, so the gate cannot see one arrive
            # (nor peek at a TLS socket): a thread does the handshake and reads each head, under the same
            # head deadline
            conn.head_ready = True
        super().enqueue_req(conn)


def _port(address: Any) -> int | None:
    return address[1] if isinstance(address, tuple) and len(address) >= 2 else None


def on_loopback(address: str) -> bool:
    return is_loopback(host_port(address)[0])


class SiteServer(BaseApplication):
    def __init__(self, config: SiteServiceConfig, threads: int = THREADS) -> None:
        self.config = config
        self.threads = threads
        self.store: Store | None = None
        self.fleet: SiteFleet | None = None
        self.gateway: Any = None
        super().__init__()

    def load_config(self) -> None:
        settings: dict[str, Any] = {
            "bind": [self.config.listen, self.config.console_listen],
            "workers": 1, "control_socket_disable": True, "worker_class": "dxflow.site.server.SiteWorker",
            "threads": self.threads, "timeout": 300, "graceful_timeout": 3, "umask": 0o077,
            "errorlog": "-", "loglevel": "info", "proc_name": f"dxflow-site-{self.config.replica_name}",
            "post_worker_init": self._post_worker_init, "worker_exit": self._worker_exit,
            # the user API's TLS is the worker's (SiteWorker): a file sent by sendfile() would skip it
            "sendfile": False,
        }
        for key, value in settings.items():
            if key in self.cfg.settings:  # settings added by newer gunicorn releases are skipped on older ones
                self.cfg.set(key, value)

    def load(self):
        from dxflow.site.app import create_app

        _log_to_stderr(self.config.replica_name)  # gunicorn's logging setup took the root logger's handlers
        self.store = open_store(self.config)
        self.fleet = SiteFleet(self.config, self.store, load_token_key(self.config))
        return create_app(self.fleet)

    def _post_worker_init(self, worker) -> None:
        from dxflow.site.gateway import Gateway  # Q's; the agents' side of the service

        assert self.fleet is not None and self.store is not None  # load() made them, before any worker ran
        self.gateway = Gateway(self.config, self.store, self.fleet)
        self.fleet.gateway = self.gateway
        self.gateway.start()
        self.fleet.start()
        log.info("site replica %s: user API %s, console %s, gateway %s, database %s", self.config.replica_name,
                 self.config.listen, self.config.console_listen, self.config.gateway_listen, self.store.kind)

    def _worker_exit(self, server, worker) -> None:
        if self.fleet is not None:
            self.fleet.stop()
        if self.gateway is not None:
            self.gateway.stop()


def _log_to_stderr(replica: str) -> None:
    """dxflow's own log lines (enrollments, refusals, drops) to stderr: the journal under systemd."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stderr))
    for handler in root.handlers:  # the CLI's own format says neither when nor which replica
        handler.setFormatter(logging.Formatter(f"%(asctime)s [site {replica}] %(levelname)s %(name)s: %(message)s"))
    root.setLevel(logging.INFO)


def check_ready(config: SiteServiceConfig) -> None:
    """Refuse to serve as root, or before `dxflow site init`: ConfigError/UsageError saying what to do."""
    if os.geteuid() == 0:
        raise UsageError("the site service does not run as root: `dxflow site serve --user "
                         f"{config.service_user}` drops to its account (or run it as that user)")
    for path in (config.token_key, config.gateway_host_key):
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{path} is missing or not readable by this account: run `dxflow site init` as root")
    if not on_loopback(config.listen) and not os.access(config.tls_key, os.R_OK):
        raise ConfigError(f"{config.tls_key} is missing: `dxflow site init` makes it (listen = {config.listen} "
                          "is not on loopback, so the user API speaks TLS)")


def serve(config: SiteServiceConfig) -> int:
    check_ready(config)
    os.umask(0o077)
    _log_to_stderr(config.replica_name)
    QUERY_BUDGET.resize(0)  # the site asks per user and caches (dxflow.site.fleet); each ask is a child process
    SiteServer(config).run()
    return 0
