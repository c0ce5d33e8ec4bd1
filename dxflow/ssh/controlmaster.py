"""One OpenSSH ControlMaster as the master knows it: started, found on its socket, watched, ended.

A ControlMaster is an ``ssh -f -N -M -S CTL NODE`` process; this module starts one (``BatchMode``: the
master has no terminal), takes one that already answers on a socket (an earlier master's, or the one
the CLI started in the user's terminal for a prompt: :mod:`dxflow.cli.sshlogin`), watches its process
through a pidfd (each process is one *generation*), and ends it with ``ssh -O exit``. Which one serves
which node or job is the pool's business (:mod:`dxflow.ssh.openssh`).
"""

from __future__ import annotations

import logging
import os
import select
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dxflow.errors import AgentUnreachable, ConfigError
from dxflow.layout import UserLayout
from dxflow.ssh import control

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 30.0   # a login through several hops and a GSSAPI exchange can take a while
COMMAND_TIMEOUT = 15.0


class LoginNeeded(AgentUnreachable):
    """The node's SSH server wants answers only the user can type (MFA, a password): run a dxflow
    command in a terminal once, and it asks."""


@dataclass
class ControlMaster:
    """One ControlMaster: a node's, or one job's on a node (pam_slurm_adopt)."""

    ctl: Path   # its socket: its job's own, or the node's (a first login, before adoption is seen; the CLI's)
    lock: threading.Lock = field(default_factory=threading.Lock)
    pid: int = 0
    pidfd: int = -1
    generation: int = 0
    failures: int = 0
    retry_at: float = 0.0
    error: str = ""
    login_needed: bool = False
    refusals: int = 0   # ControlMasters ended at once since the last one kept (logins in an ending job)
    procs: list[subprocess.Popen] = field(default_factory=list)   # channel processes, reaped as they end
    #: held while the pidfd is read, closed or replaced: a number closed under a reader may be another file's next
    fd_lock: threading.Lock = field(default_factory=threading.Lock)

    def _exited(self) -> bool | None:
        """Whether its process has exited; None when none is watched (one look at the pidfd, under its lock)."""
        with self.fd_lock:
            if self.pidfd < 0:
                return None
            readable, _, _ = select.select([self.pidfd], [], [], 0)  # a pidfd turns readable when the process ends
        return bool(readable)

    def alive(self) -> bool:
        return self._exited() is False

    def ended(self) -> bool:
        """It was up, and its process is gone (not: it failed to start, or was ended by dxflow)."""
        return self._exited() is True

    def ends_within(self, timeout: float) -> bool:
        """Whether its process has ended or ends within TIMEOUT seconds (True when none is watched)."""
        with self.fd_lock:   # a copy of its own to wait on: forget() may close the pidfd meanwhile
            try:
                fd = os.dup(self.pidfd) if self.pidfd >= 0 else -1
            except OSError:
                return True
        if fd < 0:
            return True
        try:
            readable, _, _ = select.select([fd], [], [], timeout)
            return bool(readable)
        finally:
            os.close(fd)

    def forget(self) -> None:
        with self.fd_lock:
            if self.pidfd >= 0:
                os.close(self.pidfd)
            self.pidfd, self.pid = -1, 0

    def take(self, address: str, ctl: Path, config: str | None, numbers: Iterator[int],
             known: Callable[[int], bool]) -> bool:
        """Take the ControlMaster that answers on ``ctl``, unless ``known(pid)`` (it is then another's)."""
        if not ctl.exists():
            return False
        try:
            proc = subprocess.run(control.check_argv(address, ctl, config), stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired):
            return False
        pid = control.master_pid(proc.stderr) if proc.returncode == 0 else None
        if pid is None:
            if "Connection refused" in proc.stderr:   # its ssh was killed: nobody listens; ssh -M would not start
                ctl.unlink(missing_ok=True)
            return False
        if known(pid):
            return False
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return False
        self.forget()
        with self.fd_lock:
            self.ctl, self.pid, self.pidfd = ctl, pid, pidfd
        self.generation = next(numbers)
        log.info("SSH ControlMaster for %s: pid %d (%s)", address, pid, ctl)
        return True

    def start(self, address: str, layout: UserLayout, config: str | None, numbers: Iterator[int],
              known: Callable[[int], bool], extra: Sequence[str] = ()) -> None:
        """Log in on ``self.ctl`` without a terminal: it authenticates without asking, or fails (``extra``:
        :func:`dxflow.ssh.control.master_argv`'s)."""
        try:
            control.ensure_control_dir(layout)
        except ConfigError as e:
            raise AgentUnreachable(f"{address}: {e}") from e
        argv = control.master_argv(address, self.ctl, config, extra)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, timeout=CONNECT_TIMEOUT)
        except subprocess.TimeoutExpired as e:
            raise AgentUnreachable(f"{address}: `ssh` did not log in within {CONNECT_TIMEOUT:.0f} s") from e
        except OSError as e:
            raise AgentUnreachable(f"{address}: cannot run ssh: {e}") from e
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:]) or f"ssh exited {proc.returncode}"
            if control.needs_prompt(proc.stderr):
                self.login_needed = True
                raise LoginNeeded(f"{address}: SSH asks for more than keys ({tail}): run any dxflow command on "
                                  "this job in a terminal and answer the prompt once")
            raise AgentUnreachable(f"{address}: cannot connect by SSH: {tail}")
        if not self.take(address, self.ctl, config, numbers, known):
            raise AgentUnreachable(f"{address}: ssh logged in but its ControlMaster does not answer on {self.ctl}")
        self.login_needed = False

    def end(self, address: str, config: str | None) -> None:
        """End it now (``ssh -O exit``: it removes its socket)."""
        if self.alive():
            try:
                subprocess.run(control.exit_argv(address, self.ctl, config),
                               stdin=subprocess.DEVNULL, capture_output=True, timeout=COMMAND_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired) as e:
                log.warning("%s: cannot end the ControlMaster (pid %d): %s", address, self.pid, e)
        self.forget()
