"""The live view of ``dxflow top`` on a real pseudo-terminal: it ends on Ctrl-C even while the master's answer
is late, and gives the terminal back as it was (the view against a real job: tests/lab/test_top_on_lab.py)."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import sys
import termios
import threading
import time

import pytest

from dxflow.cli.topview import SIGNALS, live_view


def _view_in_child(fetch) -> tuple[int, int]:
    """Fork a child running ``live_view(fetch, ...)`` on a new pty (its controlling terminal); (pid, pty master)."""
    pid, master = pty.fork()
    if pid == 0:  # the child
        code = 1
        try:  # the pty, not pytest's capture
            sys.stdin = open(0, closefd=False)
            sys.stdout = open(1, "w", closefd=False)
            code = live_view(fetch, lambda data, sort, size, error: ["frame"], "node", 0.2)
        finally:
            os._exit(code)
    return pid, master


def _read_until(master: int, marker: bytes, timeout: float) -> bytes:
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} within {timeout:.0f} s: {seen[-300:]!r}")
        if select.select([master], [], [], left)[0]:
            seen += os.read(master, 4096)
    return seen


def _ended_within(pid: int, master: int, timeout: float) -> int | None:
    """The child's exit code if it ends within ``timeout`` (its terminal drained meanwhile), else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if select.select([master], [], [], 0.1)[0]:
            try:
                os.read(master, 4096)
            except OSError:
                pass
    return None


@pytest.fixture
def child():
    started: list[tuple[int, int]] = []

    def start(fetch) -> tuple[int, int]:
        started.append(_view_in_child(fetch))
        return started[-1]
    yield start
    for pid, master in started:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):   # ended already, and reaped
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(master)


def test_the_thread_that_asks_never_takes_ctrl_c_and_the_view_ends_while_the_answer_is_late(child):
    """The kernel hands a process's signal to any thread that does not block it; Python runs the handler in the
    drawing thread only once that wakes, which a late answer may not make it do. The asking thread blocks the
    view's signals (exit code 3 here if it does not), so Ctrl-C reaches the drawing thread at once."""
    calls = []

    def fetch(sort: str) -> dict:
        calls.append(sort)
        if not SIGNALS <= signal.pthread_sigmask(signal.SIG_BLOCK, []):
            os._exit(3)
        if len(calls) > 1:
            time.sleep(0.5)   # the view drew the first answer, and waits in select()
            os.kill(os.getpid(), signal.SIGINT)
            threading.Event().wait()   # the master never answers again
        return {"rows": []}

    pid, master = child(fetch)
    assert _ended_within(pid, master, 10) == 0


def test_ctrl_c_on_the_terminal_ends_the_view_and_gives_the_terminal_back(child):
    def fetch(sort: str) -> dict:
        time.sleep(0.05)
        return {"rows": []}

    pid, master = child(fetch)
    modes = termios.tcgetattr(master)
    _read_until(master, b"frame", 10)
    live = termios.tcgetattr(master)
    assert not live[3] & termios.ECHO and not live[3] & termios.ICANON   # cbreak while it runs
    os.write(master, b"\x03")
    assert _ended_within(pid, master, 10) == 0
    assert termios.tcgetattr(master)[3] == modes[3]


if sys.platform != "linux":  # pragma: no cover - pseudo-terminals as Linux has them
    pytestmark = pytest.mark.skip(reason="Linux only")
