"""Processes read from /proc: find and stop exactly one agent and what it started, and whose
open files are whose (:func:`open_fds`).

Standard library only: the epilog imports this and must stay fast.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from typing import Iterator


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


def open_fds(uid: int) -> Iterator[tuple[int, list[str]]]:
    """``(pid, ["/proc/PID/fd/N", …])`` for each process of ``uid`` whose fds this process may list:
    a user lists only their own processes' (root anyone's), so no other user's process is among
    them. Processes that end meanwhile are skipped, and so are fds closed before they are read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fd_dir = f"/proc/{entry}/fd"
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            names = os.listdir(fd_dir)
        except OSError:  # gone, or not ours to read
            continue
        yield int(entry), [f"{fd_dir}/{name}" for name in names]


def _members(leader: int, uid: int, procs: dict[int, Proc], leader_alive: bool) -> dict[int, Proc]:
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
    return {pid: procs[pid] for pid in found if procs[pid].uid == uid and pid != os.getpid()}


def tree(leader: int, uid: int, procs: dict[int, Proc] | None = None, *, leader_alive: bool = True) -> set[int]:
    """The leader, its descendants, and anything still in its session or process group — owned by ``uid`` only.

    With ``leader_alive=False`` only what still carries the leader's pid as session or process
    group id is taken (the kernel does not give a pid to a new process while any process still
    uses it as a session or group id, so those are the leader's).
    """
    return set(_members(leader, uid, all_procs() if procs is None else procs, leader_alive))


def leader_state(leader: int, start: int | None) -> str:
    """``"alive"`` (pid and start time match), ``"gone"`` (no such process) or ``"reused"`` (another
    process has the pid now: nothing carries the old one as session or group id any more)."""
    p = read_proc(leader)
    if p is None:
        return "gone"
    return "alive" if start is not None and p.start == start else "reused"


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _kill_groups(pgids: set[int], uid: int) -> None:
    """SIGKILL each process group none of whose visible members is another user's: one call reaches
    every member atomically, one forked after the last scan included."""
    procs = all_procs()
    for pgid in pgids:
        if pgid > 1 and pgid != os.getpgrp() and all(p.uid == uid for p in procs.values() if p.pgid == pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def stop_tree(leader: int, uid: int, timeout: float = 1.0, *, leader_alive: bool = True,
              start: int | None = None) -> set[int]:
    """Stop the tree (so nothing respawns or escapes), kill it, wait until gone; never past ``timeout``.

    With ``start`` (the leader's recorded start time) the leader is identified by pid *and* start
    time: when another process has the pid now, nothing is signalled. Returns the pids still
    there at the timeout (empty on success). The job has ended: like Slurm with the job's own
    processes, nothing is waited for to tidy up.

    Without a cgroup this is best effort. Scans of /proc SIGSTOP what the previous ones missed
    until three in a row find nothing new; then every process group seen, and the leader's own
    (the agent leads its session and group), is killed at once — which catches a process forking
    in a loop, whose short-lived generations a scan may miss but which all stay in their group. A
    process that leaves its session and group (setsid) *and* whose parent has already exited is
    out of reach: a cgroup is what closes that gap.
    """
    if uid == 0:
        raise ValueError("refusing to stop processes of root")
    if start is not None:
        state = leader_state(leader, start)
        if state == "reused":
            return set()
        leader_alive = state == "alive"
    deadline = time.monotonic() + timeout
    seen: dict[int, Proc] = {}
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        found = {pid: p for pid, p in _members(leader, uid, all_procs(), leader_alive).items() if pid not in seen}
        quiet = 0 if found else quiet + 1
        _signal(set(found), signal.SIGSTOP)  # a stopped process cannot fork
        seen.update(found)
    # the leader's pid names its group while any member is left (the kernel does not reuse it meanwhile)
    verified = start is not None or leader_alive
    _kill_groups({p.pgid for p in seen.values()} | ({leader} if verified else set()), uid)
    _signal(set(seen), signal.SIGKILL)
    alive = set(seen)
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = {pid for pid in alive if read_proc(pid) is not None}
    return {pid for pid in alive if read_proc(pid) is not None}
