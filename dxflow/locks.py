"""A lock on a file that is never waited for without a deadline (the hooks must not hang a job).

Standard library only: the hooks import this and must stay fast.
"""

from __future__ import annotations

import fcntl
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

POLL = 0.01


@contextmanager
def locked(path: Path, timeout: float) -> Iterator[bool]:
    """Hold an exclusive ``flock`` on ``path`` (created 0600) for the ``with`` block.

    Yields True once it is held, False when ``timeout`` seconds passed first (the block then runs
    without it, and decides what to do). The lock goes with the file descriptor: a child that
    inherits it would keep it held, so it is opened close-on-exec and a forked child must not
    outlive the block holding it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                held = True
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    held = False
                    break
                time.sleep(POLL)
        yield held
    finally:
        os.close(fd)  # releases the lock
