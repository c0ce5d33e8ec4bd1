"""Run the user's master on this login node under gunicorn: ``master.sock`` for the CLI, and for
the web console ``console.sock`` and a TCP port on 127.0.0.1.

One master per user and login node. One worker with threads holds the fleet (tunnels, registry,
watcher); its files are this host's (``~/.dxflow/hosts/HOST/``, :mod:`dxflow.layout`): the sockets
live in that 0700 folder and are themselves 0600, so only the user reaches them, and a master on
another login node sharing the home never touches them.
The TCP port can be reached by every user of the login node: the worker
(:mod:`dxflow.edge.worker`) closes connections of other users at accept, and the
console's guard (:mod:`dxflow.master.console`) wants a session on every request.
"""

from __future__ import annotations

import fcntl
import getpass
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from gunicorn.app.base import BaseApplication

from dxflow.edge.worker import ClosingBody
from dxflow.layout import UserLayout, this_host

if TYPE_CHECKING:  # for the annotation only: load() imports it when the worker loads the app
    from dxflow.master.fleet import Fleet

log = logging.getLogger("dxflow.master")

#: Seconds a master being started waits for the lock of one that is stopping (its idle exit).
STOPPING_WAIT = 5.0


class ClientActivity:
    """WSGI middleware: tells the fleet's :class:`~dxflow.master.pace.Clients` when a request of the
    user's clients begins and when its answer (a stream, a WebSocket: however long) is done, so that
    a master in use never exits for idleness."""

    def __init__(self, app: Callable, clients: Any) -> None:
        self.app = app
        self.clients = clients

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        self.clients.began()
        try:
            body = self.app(environ, start_response)
        except BaseException:
            self.clients.ended()
            raise
        return ClosingBody(body, self.clients.ended)


class MasterServer(BaseApplication):
    """The master of the ``~/.dxflow`` folder ``base`` on ``host`` (default: this one)."""

    def __init__(self, base: Path, threads: int = 64, host: str | None = None) -> None:
        self.base = base
        self.layout = UserLayout(base, host or this_host()).ensure()
        self.threads = threads
        self.fleet: Fleet | None = None
        self.console_port = 0
        super().__init__()

    def load_config(self) -> None:
        from dxflow.master.console import console_port

        self.console_port = console_port(self.layout)
        settings = {
            "bind": [f"unix:{self.layout.master_sock}", f"unix:{self.layout.console_sock}",
                     f"127.0.0.1:{self.console_port}"],
            "workers": 1, "control_socket_disable": True, "worker_class": "dxflow.edge.worker.GuardedThreadWorker",
            "threads": self.threads, "timeout": 300, "graceful_timeout": 3, "umask": 0o077,
            "pidfile": str(self.layout.master_pid), "errorlog": str(self.layout.master_log),
            "loglevel": "info", "proc_name": "dxflow-master", "post_worker_init": self._post_worker_init,
            "worker_exit": self._worker_exit, "when_ready": self._when_ready,
        }
        for key, value in settings.items():
            if key in self.cfg.settings:  # settings added by newer gunicorn releases are skipped on older ones
                self.cfg.set(key, value)

    def load(self):
        from dxflow.master.app import create_app
        from dxflow.master.fleet import Fleet

        from dxflow.schedulers.base import QUERY_BUDGET

        self.fleet = Fleet(self.base, getpass.getuser(), host=self.layout.host)
        QUERY_BUDGET.resize(self.fleet.site.controller_queries_per_minute)  # this master's every query counts
        app = create_app(self.fleet)
        app.wsgi_app = ClientActivity(app.wsgi_app, self.fleet.clients)
        app.config["CONSOLE_PORT"] = self.console_port
        return app

    def _when_ready(self, server) -> None:
        from dxflow.master.console import remember_port

        remember_port(self.layout, self.console_port)  # listening now: the next start reuses it

    def _post_worker_init(self, worker) -> None:
        # idle (no live agent, no client for master_idle_exit s): the arbiter stops, as on `master stop`
        assert self.fleet is not None  # load() made it, before any worker started
        self.fleet.on_idle = lambda: os.kill(os.getppid(), signal.SIGTERM)
        self.fleet.start()

    def _worker_exit(self, server, worker) -> None:
        if self.fleet:
            self.fleet.stop()


def serve() -> int:
    os.umask(0o077)  # every file of the master (registry, console state, pid file) is the user's alone
    layout = UserLayout.of().ensure()
    fd = os.open(layout.master_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [master] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # One master per user and host: the lock is held for the master's lifetime (the arbiter keeps the fd).
    lock = os.open(layout.master_lock, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + STOPPING_WAIT
    while True:  # a master that is exiting (idle) holds it a moment longer: this one takes over then
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.info("another master of this user is running on this host: nothing to do")
                return 0
            time.sleep(0.2)
    for stale in (layout.master_sock, layout.console_sock):  # left by a master that died: no one holds the lock
        stale.unlink(missing_ok=True)
    # The lock, not the pid file, says whether a master runs: a SIGKILLed one leaves its pid file,
    # whose pid may now be a zombie or another process, and gunicorn would refuse to start over it.
    layout.master_pid.unlink(missing_ok=True)
    MasterServer(layout.base, host=layout.host).run()
    return 0
