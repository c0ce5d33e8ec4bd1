"""Work done by root (a scheduler's hook) as the job's user instead, in a child with a deadline.

The hooks touch a user's home only this way (:func:`as_user`): a root-squashed home (NFS, GPFS: root
is nobody there) refuses root, a link the user put there must never be followed as root, and a hung
file server must cost the hook its deadline, never the node. Standard library only, as the hook.
"""

from __future__ import annotations

import logging
import os
import select
import signal
import time
from typing import Callable

log = logging.getLogger("dxflow.hook")  # the hook's own log (dxflow.hook configures it)


def as_user(uid: int, gid: int, groups: list[int], work: Callable[[], bool], timeout: float,
            what: str = "work in a home") -> bool | None:
    """Run ``work`` in a child that is the job's user, given ``timeout`` seconds, then killed; True or
    False as ``work`` answered (an exception: False), None when it was killed at its deadline.

    The hook touches the user's home only this way. Root drops to the user's groups, gid and uid
    before the home is looked at: a root-squashed home (NFS, GPFS: root is nobody there) of mode 0700
    refuses root, and a link the user put there is never followed as root. The child holds none of
    the hook's output pipes (slurmd waits for them to close), and a hung file server or a FIFO in the
    home costs the hook ``timeout`` seconds, never the node.
    """
    pid = os.fork()
    if pid == 0:  # child
        code = 2
        try:
            devnull = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            if os.getuid() == 0:
                os.setgroups(groups)  # groups first: they cannot be set once root is gone
                os.setgid(gid)
                os.setuid(uid)
            code = 0 if work() else 1
        except BaseException:
            code = 2
        finally:
            os._exit(code)
    status = wait_child(pid, timeout)
    if status is not None:
        return os.waitstatus_to_exitcode(status) == 0
    os.kill(pid, signal.SIGKILL)
    # A child stuck in the kernel (a hard NFS mount) dies only when its call returns: not waited for.
    time.sleep(0.05)
    os.waitpid(pid, os.WNOHANG)
    log.error("%s took over %.0f s: child %d killed (it ran as uid %d)", what, timeout, pid, uid)
    return None


def wait_child(pid: int, timeout: float) -> int | None:
    """The wait status of child ``pid`` once it exits within ``timeout`` seconds, else None (still running).

    Woken by the child's exit itself (a pidfd, Linux 5.3): a home looked at in 2 ms costs the prolog
    2 ms, not a polling interval. Without pidfds, polled every 10 ms."""
    deadline = time.monotonic() + timeout
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = -1
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if fd >= 0:
                select.select([fd], [], [], left)  # readable when the child has exited
            else:
                time.sleep(min(0.01, left))
    finally:
        if fd >= 0:
            os.close(fd)


def user_groups(user: str, gid: int) -> list[int]:
    """The user's groups as a login would set them (a home may be open to one of them only)."""
    try:
        return os.getgrouplist(user, gid)
    except (KeyError, OSError):  # gone from the name service since the prolog: the primary group
        return [gid]


def home_reachable(home: str) -> bool:
    return os.path.isdir(home) and os.access(home, os.R_OK | os.W_OK | os.X_OK)
