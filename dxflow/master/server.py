"""Run the user's master under gunicorn: ``~/.dxflow/master.sock`` for the CLI, and for the web
console ``~/.dxflow/console.sock`` and a TCP port on 127.0.0.1.

One worker with threads holds the fleet (tunnels, registry, watcher); the sockets
live in ``~/.dxflow`` (0700) and are themselves 0600, so only the user reaches them.
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
from typing import Any, Callable, Iterable

from gunicorn.app.base import BaseApplication

from dxflow.config import ensure_user_dir

log = logging.getLogger("dxflow.master")

#: Seconds a master being started waits for the lock of one that is stopping (its idle exit).
STOPPING_WAIT = 5.0


def socket_path(base: Path) -> Path:
    from dxflow.master.console import CLI_SOCKET

    return base / CLI_SOCKET


def console_socket_path(base: Path) -> Path:
    from dxflow.master.console import CONSOLE_SOCKET

    return base / CONSOLE_SOCKET


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
        return _Answer(body, self.clients.ended)


class _Answer:
    """A response body that reports its end once, when the server closes it."""

    def __init__(self, body: Iterable[bytes], ended: Callable[[], None]) -> None:
        self.body = body
        self._ended: Callable[[], None] | None = ended

    def __iter__(self):
        return iter(self.body)

    def close(self) -> None:
        try:
            close = getattr(self.body, "close", None)
            if close is not None:
                close()
        finally:
            if self._ended is not None:
                self._ended, ended = None, self._ended
                ended()


class MasterServer(BaseApplication):
    def __init__(self, base: Path, threads: int = 64) -> None:
        self.base = base
        self.threads = threads
        self.fleet = None
        self.console_port = 0
        super().__init__()

    def load_config(self) -> None:
        from dxflow.master.console import console_port

        self.console_port = console_port(self.base)
        settings = {
            "bind": [f"unix:{socket_path(self.base)}", f"unix:{console_socket_path(self.base)}",
                     f"127.0.0.1:{self.console_port}"],
            "workers": 1, "control_socket_disable": True, "worker_class": "dxflow.edge.worker.GuardedThreadWorker",
            "threads": self.threads, "timeout": 300, "graceful_timeout": 3, "umask": 0o077,
            "pidfile": str(self.base / "master.pid"), "errorlog": str(self.base / "logs" / "master.log"),
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

        self.fleet = Fleet(self.base, getpass.getuser())
        QUERY_BUDGET.resize(self.fleet.site.controller_queries_per_minute)  # this master's every query counts
        app = create_app(self.fleet)
        app.wsgi_app = ClientActivity(app.wsgi_app, self.fleet.clients)  # type: ignore[method-assign]
        app.config["CONSOLE_PORT"] = self.console_port
        return app

    def _when_ready(self, server) -> None:
        from dxflow.master.console import remember_port

        remember_port(self.base, self.console_port)  # listening now: the next start reuses it

    def _post_worker_init(self, worker) -> None:
        # idle (no live agent, no client for master_idle_exit s): the arbiter stops, as on `master stop`
        self.fleet.on_idle = lambda: os.kill(os.getppid(), signal.SIGTERM)
        self.fleet.start()

    def _worker_exit(self, server, worker) -> None:
        if self.fleet:
            self.fleet.stop()


def serve() -> int:
    base = ensure_user_dir()
    log_path = base / "logs" / "master.log"
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [master] %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # One master per user: the lock is held for the master's lifetime (the arbiter keeps the fd).
    lock = os.open(base / "master.lock", os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + STOPPING_WAIT
    while True:  # a master that is exiting (idle) holds it a moment longer: this one takes over then
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.info("another master of this user is running: nothing to do")
                return 0
            time.sleep(0.2)
    for stale in (socket_path(base), console_socket_path(base)):  # left by a master that died: no one holds the lock
        stale.unlink(missing_ok=True)
    # The lock, not the pid file, says whether a master runs: a SIGKILLed one leaves its pid file,
    # whose pid may now be a zombie or another process, and gunicorn would refuse to start over it.
    (base / "master.pid").unlink(missing_ok=True)
    MasterServer(base).run()
    return 0
