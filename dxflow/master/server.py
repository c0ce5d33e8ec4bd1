"""Run the user's master under gunicorn on ``~/.dxflow/master.sock`` and on 127.0.0.1 for the console.

One worker with threads holds the fleet (tunnels, registry, watcher); the socket
lives in ``~/.dxflow`` (0700) and is itself 0600, so only the user reaches it.
The TCP port is open to every user of the login node: there the console's guard
(``dxflow.master.console``) answers only requests with the user's session cookie.
"""

from __future__ import annotations

import fcntl
import getpass
import logging
import os
import sys
from pathlib import Path

from gunicorn.app.base import BaseApplication

from dxflow.config import ensure_user_dir

log = logging.getLogger("dxflow.master")


def socket_path(base: Path) -> Path:
    return base / "master.sock"


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
            "bind": [f"unix:{socket_path(self.base)}", f"127.0.0.1:{self.console_port}"],
            "workers": 1, "control_socket_disable": True, "worker_class": "gthread",
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

        self.fleet = Fleet(self.base, getpass.getuser())
        app = create_app(self.fleet)
        app.config["CONSOLE_PORT"] = self.console_port
        return app

    def _when_ready(self, server) -> None:
        from dxflow.master.console import remember_port

        remember_port(self.base, self.console_port)  # listening now: the next start reuses it

    def _post_worker_init(self, worker) -> None:
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
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("another master of this user is running: nothing to do")
        return 0
    socket_path(base).unlink(missing_ok=True)  # left by a master that died: no one holds the lock
    MasterServer(base).run()
    return 0
