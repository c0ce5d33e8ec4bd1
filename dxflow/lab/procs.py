"""Pid files and processes, read from /proc: no broad ``pkill``, only pids we can name."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)


def read_pidfile(path: Path) -> int | None:
    """The pid in ``path``, or ``None`` when the file is missing or holds no number."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # "PID (comm) STATE ...": comm may hold spaces and parentheses, so split at the last ')'
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def owner(pid: int) -> int | None:
    try:
        return Path(f"/proc/{pid}").stat().st_uid
    except OSError:
        return None


def running_program(pid: int | None, program: str) -> bool:
    """True when ``pid`` is alive and runs ``program`` (a pid file may outlive its process)."""
    if pid is None or not alive(pid):
        return False
    argv = cmdline(pid)
    return bool(argv) and os.path.basename(argv[0]).startswith(program)


def daemon_pid(pidfile: Path, program: str) -> int | None:
    """The pid of ``program`` recorded in ``pidfile`` when it is running, else ``None``."""
    pid = read_pidfile(pidfile)
    return pid if running_program(pid, program) else None


def find_pids(match: Callable[[int], bool]) -> list[int]:
    """Every live pid (other than ours) for which ``match(pid)`` holds."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            pid = int(entry)
            if pid != os.getpid() and alive(pid) and match(pid):
                found.append(pid)
    return found


def terminate(pids: Iterable[int], *, timeout: float = 10, what: str = "process") -> list[int]:
    """SIGTERM each pid, wait up to ``timeout``, then SIGKILL what is left.

    Returns the pids still alive afterwards (normally none). Gone already is fine.
    """
    pids = [p for p in pids if alive(p)]
    for pid in pids:
        log.debug("stopping %s %d", what, pid)
        _signal(pid, signal.SIGTERM)
    left = wait_gone(pids, timeout)
    for pid in left:
        log.warning("%s %d ignored SIGTERM; killing it", what, pid)
        _signal(pid, signal.SIGKILL)
    return wait_gone(left, 5)


def wait_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Wait until every pid has exited; return those still alive at the deadline."""
    left = [p for p in pids if alive(p)]
    deadline = time.monotonic() + timeout
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if alive(p)]
    return left


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
