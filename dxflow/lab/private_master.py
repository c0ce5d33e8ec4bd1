"""A lab user's master in a folder of its own, for the benches and tests that count what one master does.

The lab's users run their everyday masters from ``~/.dxflow``, which every test shares; a bench that
counts one master's controller calls or file-system look-ups, or measures its memory, needs a master
nobody else talks to. :class:`PrivateMaster` gives it one: a folder ``~/NAME`` with the user's own key
(so the agents' tokens verify), an empty ``fleet/`` that receives only the registrations handed to it
(:meth:`adopt`), and the installed code run as the user (:meth:`argv`, or :meth:`start`).
Used by ``bench/load.py``, ``bench/fleet_scale.py`` and ``tests/lab/test_controller_load.py``.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping

from dxflow import layout
from dxflow.layout import UserLayout, this_host

PYTHON = "/opt/dxflow/venv/bin/python"
#: what the master's process runs: the installed server, on the private folder given as its argument
MASTER = ("import sys; from pathlib import Path; from dxflow.master.server import MasterServer; "
          "MasterServer(Path(sys.argv[1])).run()")


class PrivateMaster:
    """``user``'s master in ``~/NAME`` (:attr:`files`: its layout), with ``env`` added to its environment.
    ``share_fleet``: its ``fleet/`` is the user's own (a symlink), so it sees every agent of the user,
    instead of only those handed to it."""

    def __init__(self, user: str, name: str, env: Mapping[str, str] | None = None, *,
                 share_fleet: bool = False) -> None:
        self.pw = pwd.getpwnam(user)
        self.base = Path(self.pw.pw_dir) / name
        self.files = UserLayout(self.base, this_host())
        self.env = dict(env or {})
        self.share_fleet = share_fleet
        self.proc: subprocess.Popen | None = None

    def prepare(self) -> "PrivateMaster":
        """Make the folder, owned by the user, with the user's key from ``~/.dxflow`` (made first, as the
        user, where no dxflow command of theirs has made it yet: a fresh lab)."""
        own = UserLayout.of(self.pw.pw_dir)
        if not own.key.exists():
            subprocess.run(["runuser", "-u", self.pw.pw_name, "--", "env", f"HOME={self.pw.pw_dir}", PYTHON, "-c",
                            "from dxflow.auth import user_key; from dxflow.layout import UserLayout; "
                            "user_key(UserLayout.of().ensure_shared().base)"], check=True, timeout=60)
        self.files.logs_dir.mkdir(parents=True, mode=layout.FOLDER_MODE)
        if self.share_fleet:
            self.files.fleet_dir.symlink_to(own.fleet_dir)
        else:
            self.files.fleet_dir.mkdir(mode=layout.FOLDER_MODE)
        for src, dst in ((own.key, self.files.key), (own.public_key, self.files.public_key)):
            shutil.copy2(src, dst)
        for path in [self.base, *self.base.rglob("*")]:
            os.lchown(path, self.pw.pw_uid, self.pw.pw_gid)
        return self

    def argv(self) -> list[str]:
        """The command (run as root) that runs the master as the user, in the foreground."""
        env = [f"{k}={v}" for k, v in self.env.items()]
        return ["runuser", "-u", self.pw.pw_name, "--", "env", f"HOME={self.pw.pw_dir}", *env,
                PYTHON, "-c", MASTER, str(self.base)]

    def start(self, timeout: float = 60) -> int:
        """Start the master and wait for its socket; its arbiter's pid."""
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        self.wait_ready(timeout)
        return self.pid()

    def wait_ready(self, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
        """Wait until the master answers on its socket (``proc``: the process to watch, if not ours)."""
        proc = proc or self.proc
        deadline = time.monotonic() + timeout
        while not (self.files.master_sock.exists() and self.files.master_pid.exists()):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"the private master did not start; see {self.files.master_log}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the private master did not start within {timeout:.0f} s; "
                                   f"see {self.files.master_log}")
            time.sleep(0.1)

    def pid(self) -> int:
        """The master's gunicorn arbiter."""
        return int(self.files.master_pid.read_text())

    def adopt(self, registrations: Iterable[Path]) -> list[Path]:
        """Hand the master these agents' registrations (copies, owned by the user); the copies."""
        copies = []
        for src in registrations:
            dst = self.files.fleet_dir / src.name
            shutil.copy2(src, dst)
            os.chown(dst, self.pw.pw_uid, self.pw.pw_gid)
            copies.append(dst)
        return copies

    def stop(self, timeout: float = 30) -> None:
        """Stop the master (SIGTERM to its arbiter) and wait for the process we started."""
        try:
            os.kill(self.pid(), signal.SIGTERM)
        except (OSError, ValueError):
            pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def remove(self) -> None:
        """Remove the folder (after :meth:`stop`)."""
        shutil.rmtree(self.base, ignore_errors=True)
