"""A real gunicorn in a process of its own, for tests that need a server as deployed.

Two halves, one per process:

- in the server's process, :func:`serve` runs a WSGI app under gunicorn and, once the worker
  listens, writes the worker's addresses to a *ready file* (whole: written aside, then renamed);
- in the test's process, :func:`running` starts that process in a session of its own (stopping the
  session stops gunicorn's arbiter and worker together), waits for the ready file, hands back the
  addresses, and stops the server at the end (SIGTERM, then SIGKILL if it lingers).

The server's process is any Python script: this test file run as one, or a script given as a string.
Either way ``tests/unit`` is on its path, so it can ``import gunicorn_proc``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
#: generous: gunicorn and the app's imports on a busy shared machine
START_TIMEOUT = 30.0


# -- in the server's process ----------------------------------------------------------------------------

def serve(app: Any, ready: Path, on_ready: Callable[[Any], None] | None = None, **settings: Any) -> None:
    """Run ``app`` under gunicorn with ``settings`` (gunicorn's names; one worker and no control socket
    unless they say otherwise) until signalled. Once the worker listens, ``on_ready(worker)`` runs and
    then the worker's addresses are written to ``ready``: ``[host, port]`` for TCP, a path for Unix."""
    from gunicorn.app.base import BaseApplication

    def post_worker_init(worker: Any) -> None:
        if on_ready is not None:
            on_ready(worker)
        write_whole(ready, json.dumps([s.getsockname() for s in worker.sockets]))

    config = {"workers": 1, "control_socket_disable": True, **settings, "post_worker_init": post_worker_init}

    class Server(BaseApplication):
        def load_config(self) -> None:
            for key, value in config.items():
                if key in self.cfg.settings:  # a setting this gunicorn lacks (control_socket_disable: 23+)
                    self.cfg.set(key, value)

        def load(self) -> Any:
            return app

    Server().run()


def write_whole(path: Path, text: str) -> None:
    """Write ``path`` so that a reader sees it whole or not at all (write_text alone may be seen empty)."""
    aside = path.with_name(f".{path.name}.{os.getpid()}")
    aside.write_text(text)
    aside.rename(path)


# -- in the test's process ------------------------------------------------------------------------------

@dataclass
class Gunicorn:
    """A started server: its process (the leader of its session) and the addresses its worker listens on."""

    proc: subprocess.Popen
    addresses: list

    @property
    def port(self) -> int:
        return tcp_port(self.addresses)


def tcp_port(addresses: list) -> int:
    """The port of the first TCP listener among addresses as :func:`serve` writes them."""
    return next(a[1] for a in addresses if isinstance(a, list))


def python(script: str, *args: str) -> list[str]:
    """argv that runs ``script`` (Python source, given as a string) with ``args``."""
    return [sys.executable, "-c", script, *args]


@contextlib.contextmanager
def running(argv: list[str], ready: Path, log: Path, *, env: dict[str, str] | None = None,
            stderr: Path | None = None, stop_signal: signal.Signals = signal.SIGTERM,
            timeout: float = START_TIMEOUT) -> Iterator[Gunicorn]:
    """Start ``argv`` (a Python process that calls :func:`serve` with ``ready``) and yield it once ready.

    The test fails with the tail of ``log`` (gunicorn's errorlog) and of ``stderr`` if the process ends
    or ``timeout`` passes first. ``stop_signal`` goes to the whole session at the end; a server the test
    already killed is fine.
    """
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), str(HERE), env.get("PYTHONPATH")) if p)
    ready.unlink(missing_ok=True)  # a server started before in the same directory is not this one
    with contextlib.ExitStack() as cleanup:
        err = cleanup.enter_context(open(stderr, "wb")) if stderr else subprocess.DEVNULL
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err)
        cleanup.callback(stop, proc, stop_signal)
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                why = f"not ready in {timeout:.0f} s" if proc.returncode is None else f"exited with {proc.returncode}"
                raise AssertionError(f"gunicorn ({' '.join(argv[:2])}...) {why}:\n{_tail(log)}\n{_tail(stderr)}")
            time.sleep(0.05)
        yield Gunicorn(proc, json.loads(ready.read_text()))


def stop(proc: subprocess.Popen, first: signal.Signals = signal.SIGTERM, grace: float = 10.0) -> None:
    """Signal ``proc``'s session with ``first``, then SIGKILL if it has not ended after ``grace`` seconds."""
    try:
        os.killpg(proc.pid, first)
    except ProcessLookupError:  # the session is gone already (the test killed it); reap the leader
        proc.wait()
        return
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _tail(path: Path | None, size: int = 2000) -> str:
    if path is None:
        return ""
    try:
        return path.read_text(errors="replace")[-size:]
    except FileNotFoundError:
        return f"(no {path.name})"
