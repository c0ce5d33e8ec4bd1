"""Count what dxflow's processes ask of shared infrastructure, with ``strace`` (issue #11).

Two things are counted, for the lab tests and ``bench/load.py``:

- every scheduler client command a traced process tree runs (``execve`` of ``squeue``, ``scontrol``
  …): each is at least one call to the controller;
- every file-system call that names a path under a given folder (``~/.dxflow/fleet``): the
  metadata operations the shared home's file server sees.

``strace -f`` follows the traced processes' threads and children; it attaches to running processes
(``-p``) or starts a command. Stopping it (SIGTERM) detaches it and leaves the processes running.
Nothing is changed on the cluster: no wrapper on PATH, no site setting.
"""

from __future__ import annotations

import ast
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

#: Commands that talk to a scheduler's controller (Slurm, PBS/Torque, LSF).
SCHEDULER_COMMANDS = frozenset({"squeue", "scontrol", "sinfo", "sacct", "sbatch", "srun", "salloc", "scancel",
                                "sstat", "sprio", "qstat", "pbsnodes", "bjobs", "bhosts"})
#: What is traced: every call that names a path, with execve among them.
SYSCALLS = "%file,getdents64"

_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<time>\d+\.\d+)\s+(?P<rest>.*)$")
_CALL = re.compile(r'^(?P<name>\w+)\((?P<args>.*)')
_EXEC = re.compile(r'^execve\("(?P<path>[^"]*)", (?P<argv>\[.*?\])(?:\.\.\.)?, ')
_PATH = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclass
class Call:
    pid: int
    at: float
    name: str
    path: str          # the first path the call names ('' for none)
    argv: list[str]    # for execve
    ok: bool


def parse(text: str) -> list[Call]:
    """The calls of an ``strace -f -ttt`` output, an interrupted call joined to its resumption."""
    pending: dict[int, tuple[float, str]] = {}
    calls: list[Call] = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid, at, rest = int(m["pid"]), float(m["time"]), m["rest"]
        if rest.endswith("<unfinished ...>"):
            pending[pid] = (at, rest[: -len("<unfinished ...>")])
            continue
        if rest.startswith("<... "):
            start = pending.pop(pid, None)
            if start is None:
                continue
            at, head = start
            rest = head + rest.split("resumed>", 1)[-1]
        c = _CALL.match(rest)
        if not c:
            continue
        result = rest.rsplit("=", 1)[-1].strip()
        ok = result.split()[0].lstrip("-").isdigit() and not result.startswith("-")
        path, argv = "", []
        if c["name"] == "execve":
            e = _EXEC.match(rest)
            if e:
                path = e["path"]
                try:
                    argv = [str(a) for a in ast.literal_eval(e["argv"])]
                except (ValueError, SyntaxError):
                    argv = [path]
        else:
            p = _PATH.search(c["args"])
            path = p.group(1) if p else ""
        calls.append(Call(pid, at, c["name"], path, argv, ok))
    return calls


class Trace:
    """``strace`` on processes (``pids``) or on a command (``argv``), written to ``out``."""

    def __init__(self, out: Path, *, pids: Sequence[int] = (), argv: Sequence[str] = (),
                 syscalls: str = SYSCALLS) -> None:
        if not pids and not argv:
            raise ValueError("trace what? give pids or argv")
        self.out = out
        cmd = ["strace", "-f", "-qq", "-ttt", "-s", "512", "-e", f"trace={syscalls}", "-o", str(out)]
        for pid in pids:
            cmd += ["-p", str(pid)]
        self.proc = subprocess.Popen(cmd + list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, start_new_session=True)
        if pids:
            time.sleep(0.5)  # attached (strace prints nothing when it is)

    def stop(self, timeout: float = 10.0) -> None:
        """Detach (the traced processes go on) and wait for the output to be complete."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)

    def calls(self) -> list[Call]:
        try:
            return parse(self.out.read_text(errors="replace"))
        except FileNotFoundError:
            return []


def scheduler_commands(calls: Sequence[Call]) -> list[Call]:
    """The scheduler client commands that were run (successful execve)."""
    return [c for c in calls if c.name == "execve" and c.ok and os.path.basename(c.path) in SCHEDULER_COMMANDS]


def under(calls: Sequence[Call], folder: str | Path) -> list[Call]:
    """The calls that name ``folder`` or a path in it (execve excluded)."""
    folder = str(folder).rstrip("/")
    return [c for c in calls if c.name not in ("execve", "getcwd")
            and (c.path == folder or c.path.startswith(folder + "/"))]
