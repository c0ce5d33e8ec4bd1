"""Process trees read from /proc: find and stop exactly one agent and what it started.

Standard library only: the epilog imports this and must stay fast.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    pgid: int
    sid: int
    start: int  # clock ticks after boot; with pid, names a process uniquely
    uid: int


def read_proc(pid: int) -> Proc | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        uid = os.stat(f"/proc/{pid}").st_uid
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2:].split()
    state = rest[0]
    if state in (b"Z", b"X"):
        return None
    return Proc(pid=pid, ppid=int(rest[1]), pgid=int(rest[2]), sid=int(rest[3]), start=int(rest[19]), uid=uid)


def all_procs() -> dict[int, Proc]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = read_proc(int(name))
            if p:
                out[p.pid] = p
    return out


def start_time(pid: int) -> int | None:
    p = read_proc(pid)
    return p.start if p else None


def tree(leader: int, uid: int, procs: dict[int, Proc] | None = None, *, leader_alive: bool = True) -> set[int]:
    """The leader, its descendants, and anything still in its session or process group — owned by ``uid`` only.

    With ``leader_alive=False`` the leader's pid may have been reused by an unrelated
    process: only what still carries it as session or process group id is taken.
    """
    procs = all_procs() if procs is None else procs
    children: dict[int, list[int]] = {}
    for p in procs.values():
        children.setdefault(p.ppid, []).append(p.pid)
    found: set[int] = set()
    todo = [leader] if leader_alive and leader in procs else []
    todo += [p.pid for p in procs.values() if p.sid == leader or p.pgid == leader]
    while todo:
        pid = todo.pop()
        if pid in found:
            continue
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return {pid for pid in found if procs[pid].uid == uid and pid != os.getpid()}


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_tree(leader: int, uid: int, timeout: float = 1.0, *, leader_alive: bool = True) -> set[int]:
    """Freeze the whole tree (so nothing respawns or escapes), kill it, wait until gone.

    Returns the pids that were still there at the timeout (empty on success).
    The job has ended: like Slurm with the job's own processes, nothing is waited for
    to tidy up.
    """
    if uid == 0:
        raise ValueError("refusing to stop processes of root")
    frozen: set[int] = set()
    for _ in range(5):  # until no new process appears between two scans
        pids = tree(leader, uid, leader_alive=leader_alive) - frozen
        if not pids:
            break
        _signal(pids, signal.SIGSTOP)
        frozen |= pids
    _signal(frozen, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    alive = frozen
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = {pid for pid in alive if read_proc(pid) is not None}
    return alive
