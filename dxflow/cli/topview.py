"""The live terminal of ``dxflow top`` (:mod:`dxflow.cli.top` renders the frames).

The terminal is put in cbreak mode (keys come one at a time, unechoed; Ctrl-C still interrupts) on
the alternate screen with the cursor hidden, and given back exactly as it was however the view ends:
``q``, Ctrl-C, SIGTERM or SIGHUP, or an error. The master is asked from a thread, so that a slow
answer never holds up a key: ``q`` quits at once, a new sort key redraws at once (and asks again).
A signal the kernel delivers to that thread rather than the one drawing has its handler run only once
the drawing thread wakes, which a late answer may not do for a long while: the asking thread blocks the
view's signals, and every signal also writes to the pipe the view waits on (``signal.set_wakeup_fd``),
so Ctrl-C ends the view at once.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import termios
import threading
import tty
from typing import Any, Callable

from dxflow.cli.top import ENTER, HOME, HOME_CLEAR, LEAVE, SORTS
from dxflow.errors import DxflowError

QUIT_KEYS = ("q", "Q")  # not Escape: arrow keys send it first
#: the signals the view answers: blocked in the asking thread, so that the kernel hands them to the drawing one
SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGWINCH}


class _Stop(Exception):
    """A signal asked the view to end."""


def live_view(fetch: Callable[[str], dict], draw: Callable[[dict, str, os.terminal_size, str], list[str]],
              sort: str, interval: float) -> int:
    """Run the view until ``q`` (or Ctrl-C, SIGTERM, SIGHUP): ``fetch(sort)`` every ``interval`` s in a
    thread, ``draw(data, sort, size, error)`` on every answer, key and resize."""
    fd_in, out = sys.stdin.fileno(), sys.stdout
    saved = termios.tcgetattr(fd_in)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)   # as set_wakeup_fd needs; a full pipe wakes the view anyway
    shared: dict[str, Any] = {"sort": SORTS.get(sort, sort), "data": None, "error": ""}
    lock = threading.Lock()
    again, stopped = threading.Event(), threading.Event()

    def wake(*_args: Any) -> None:
        try:
            os.write(wake_w, b".")
        except OSError:
            pass  # the view has ended

    def fetcher() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)   # the drawing thread's to take
        while not stopped.is_set():
            with lock:
                sort_now = shared["sort"]
            try:
                data, error = fetch(sort_now), ""
            except DxflowError as e:
                data, error = None, str(e)
            with lock:
                if data is not None:
                    shared["data"] = data
                shared["error"] = error
            wake()
            again.wait(interval)
            again.clear()

    def stop(*_args: Any) -> None:
        raise _Stop

    old_handlers = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    old_handlers[signal.SIGWINCH] = signal.signal(signal.SIGWINCH, wake)
    old_wakeup = signal.set_wakeup_fd(wake_w)
    try:
        tty.setcbreak(fd_in, termios.TCSANOW)
        out.write(ENTER + HOME_CLEAR + "dxflow top: asking the job's nodes…")
        out.flush()
        threading.Thread(target=fetcher, daemon=True, name="top-fetch").start()
        while True:
            ready, _, _ = select.select([fd_in, wake_r], [], [])
            if wake_r in ready:
                os.read(wake_r, 4096)
            if fd_in in ready:
                keys = os.read(fd_in, 64).decode(errors="ignore")
                if any(k in QUIT_KEYS for k in keys):
                    return 0
                for k in keys:
                    if k.lower() in SORTS:
                        with lock:
                            shared["sort"] = SORTS[k.lower()]
                        again.set()
            with lock:
                data, sort_now, error = shared["data"], shared["sort"], shared["error"]
            if data is None:
                if error:
                    out.write(HOME_CLEAR + f"dxflow top: {error}")
                    out.flush()
                continue
            size = shutil.get_terminal_size()
            # over the last frame, each line cleared to its end: no flicker of a whole-screen clear
            out.write(HOME + "\x1b[K\n".join(draw(data, sort_now, size, error)) + "\x1b[K\x1b[J")
            out.flush()
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        stopped.set()
        again.set()
        signal.set_wakeup_fd(old_wakeup)
        for s, handler in old_handlers.items():
            signal.signal(s, handler)
        out.write(LEAVE)
        out.flush()
        termios.tcsetattr(fd_in, termios.TCSADRAIN, saved)
        # the pipe stays open: the fetcher may still be waiting for an answer, and would write to
        # whatever a closed descriptor's number came to be used for (the command ends right after)
