"""How often the master looks and asks (issue #11): the fleet folder, the scheduler, its own idleness.

The fleet folder lives in the shared home, and the scheduler's controller serves every user of the
cluster, so the watcher (:class:`dxflow.master.fleet.Fleet`) spends as little of both as it can:

- :class:`FolderWatch`: one ``stat`` of ``~/.dxflow/fleet`` per look; the folder is read only when
  its modification time changed (every registration is written by a rename and removed by an
  unlink, which both change it), when that time is too recent to trust (a second change within the
  same clock tick would not show), and once a minute in any case;
- :class:`Backoff`: looks every ``fleet_scan_interval`` while something happens, doubling up to
  ``fleet_scan_max`` while nothing does;
- :class:`AskPolicy`: one filtered query for the user's jobs when there is news (a registration
  appeared or went, a command asked), at most every ``master_check_gap``; otherwise every
  ``master_check_interval`` ±20 %, so that many users' masters do not ask together;
- :class:`Clients`: the requests in flight and when the last one ended, for the idle exit.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

#: A folder modified this recently (seconds) is read again at the next look: a file system whose clock
#: ticks coarsely (1 s, 2 s) would show a second change within the same tick as no change.
RECENT = 2.0
#: Seconds between two reads of the folder whatever its modification time says.
RESCAN_EVERY = 60.0


class FolderWatch:
    """Whether a folder may have changed since it was last read (:meth:`changed`, then :meth:`read`)."""

    def __init__(self, path: Path, rescan_every: float = RESCAN_EVERY) -> None:
        self.path = path
        self.rescan_every = rescan_every
        self._seen: tuple[int, int, int] | None = None
        self._read_at = float("-inf")
        self._force = True

    def force(self) -> None:
        """Read it at the next look, whatever it says (a command wants a fresh view)."""
        self._force = True

    def changed(self) -> bool:
        """One ``stat``: True when the folder must be read again."""
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        except OSError:
            stamp = (0, 0, 0)
        now = time.monotonic()
        recent = abs(time.time() - stamp[0] / 1e9) < RECENT
        return self._force or stamp != self._seen or recent or now - self._read_at >= self.rescan_every

    def read(self) -> None:
        """The caller has just read the folder: remember what it looked like."""
        try:
            st = os.stat(self.path)
            self._seen = (st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        except OSError:
            self._seen = (0, 0, 0)
        self._read_at = time.monotonic()
        self._force = False


class Backoff:
    """Seconds to the next look: ``low`` after :meth:`reset`, doubling up to ``high``."""

    def __init__(self, low: float, high: float) -> None:
        self.low = max(0.05, low)
        self.high = max(self.low, high)
        self._next = self.low

    def reset(self) -> None:
        self._next = self.low

    def next(self) -> float:
        out = self._next
        self._next = min(self.high, self._next * 2)
        return out


class AskPolicy:
    """When to ask the scheduler for the user's jobs: on news, at most every ``gap`` seconds; otherwise
    every ``interval`` seconds ±20 %. The first question is due at once."""

    def __init__(self, interval: float, gap: float, rng: random.Random | None = None) -> None:
        self.interval = max(interval, gap, 1.0)
        self.gap = max(gap, 0.0)
        self.rng = rng or random.Random()
        self._wanted = True
        self._last = float("-inf")
        self._next = time.monotonic()
        self.asked_at_wall = 0.0   # time.time() of the last question: answers older than a registration drop nothing

    def want(self) -> None:
        """There is news: ask as soon as the gap allows."""
        self._wanted = True

    def wait(self, now: float | None = None) -> float:
        """Seconds until a question is due (0: now)."""
        now = time.monotonic() if now is None else now
        until = self._last + self.gap if self._wanted else self._next
        return max(0.0, until - now)

    def due(self, now: float | None = None) -> bool:
        return self.wait(now) <= 0.0

    def asked(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._last = now
        self._wanted = False
        self._next = now + self.interval * self.rng.uniform(0.8, 1.2)
        self.asked_at_wall = time.time()


class Clients:
    """Requests in flight from the user's clients (CLI, console) and when the last one ended."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._last = time.monotonic()   # a master just started counts as just used

    def began(self) -> None:
        with self._lock:
            self._active += 1
            self._last = time.monotonic()

    def ended(self) -> None:
        with self._lock:
            self._active = max(0, self._active - 1)
            self._last = time.monotonic()

    def idle_for(self, now: float | None = None) -> float:
        """Seconds since the last request ended; 0 while one is in flight."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return 0.0 if self._active else max(0.0, now - self._last)
