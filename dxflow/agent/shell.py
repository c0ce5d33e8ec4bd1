"""``/api/shell``: the user's login shell in a PTY, over a WebSocket.

Binary frames carry terminal bytes both ways. Text frames carry JSON control:
``{"resize": [cols, rows]}`` and ``{"signal": "INT"}`` from the client (a text frame
that is not a JSON object is typed into the terminal, for clients that cannot send
binary); ``{"exit": code}`` from the agent, last, when the shell has exited.

The shell runs as the agent's user (the job's), in the job's environment and work
dir, as the leader of its own session with the PTY as controlling terminal; it stays
a child of the agent and in the agent's cgroups (the job's own where the scheduler makes
them: it counts against the job's limits), so the epilog's stop of the agent takes it along. Under
PBS it starts through ``pbs_attach``, which runs it in place as a task of the job
(dxflow/agent/injob.py); LSF's ``blaunch`` gives its task no terminal, so there the shell stays
the agent's child. When
the client goes away the session gets SIGHUP (as on a hang-up of a real terminal)
and the shell is reaped; processes that ignore SIGHUP (``nohup``) live on until the
job ends, as they would after an ``ssh`` logout.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import json
import logging
import os
import select
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Any, Callable

from flask import Blueprint, current_app, request

from dxflow import audit
from dxflow.agent.injob import in_job
from dxflow.agent.jobenv import job_environment, job_workdir
from dxflow.errors import DxflowError, UsageError
from dxflow.procs import all_procs

log = logging.getLogger(__name__)

bp = Blueprint("shell", __name__)

READ = 64 * 1024
HANGUP_GRACE = 3.0     # seconds a shell may take to exit after SIGHUP before SIGKILL
MAX_SIZE = 10000
#: the longest command line `?command=` takes (it travels in the URL)
MAX_COMMAND = 4096
SIGNALS = {name: getattr(signal, f"SIG{name}") for name in ("INT", "TERM", "HUP", "KILL", "QUIT", "TSTP", "CONT",
                                                              "USR1", "USR2")}

#: Runs between fork and the shell: a new session whose controlling terminal is the PTY on fd 0.
#: (subprocess cannot make a controlling terminal, and forking Python code in a threaded server is unsafe.)
CTTY_HELPER = ("import fcntl, os, signal, sys, termios\n"
               "for s in (signal.SIGPIPE, signal.SIGXFSZ): signal.signal(s, signal.SIG_DFL)\n"
               "signal.pthread_sigmask(signal.SIG_SETMASK, [])\n"
               "os.setsid()\n"
               "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"
               "os.execvp(sys.argv[1], sys.argv[1:])\n")

_ERR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

OPENAPI = {
    "/api/shell": {"get": {
        "summary": "an interactive shell in a PTY, over a WebSocket",
        "operationId": "shell", "tags": ["shell"],
        "description": (
            "Upgrade to a WebSocket running the user's login shell (`$SHELL -l`) in a PTY, in the job's "
            "environment and work dir, TERM=xterm-256color. Binary frames are terminal bytes both ways. "
            "Text frames are JSON control: from the client `{\"resize\": [cols, rows]}` and "
            "`{\"signal\": \"INT\"|\"TERM\"|\"HUP\"|\"KILL\"|\"QUIT\"|\"TSTP\"|\"CONT\"|\"USR1\"|\"USR2\"}` "
            "(to the terminal's foreground process group); from the agent `{\"error\": ..., \"message\": ...}` "
            "for a bad control message and, last, `{\"exit\": code}`. Closing the WebSocket hangs up the "
            "terminal (SIGHUP to the shell's session)."),
        "parameters": [
            {"name": "cols", "in": "query", "required": False, "description": "terminal width (default 80)",
             "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SIZE}},
            {"name": "rows", "in": "query", "required": False, "description": "terminal height (default 24)",
             "schema": {"type": "integer", "minimum": 1, "maximum": MAX_SIZE}},
            {"name": "command", "in": "query", "required": False,
             "description": "run this command line with the terminal instead of the login shell, as "
                            "`ssh -t node COMMAND` does: `$SHELL -c COMMAND`",
             "schema": {"type": "string", "minLength": 1, "maxLength": MAX_COMMAND}},
        ],
        "responses": {
            "101": {"description": "switching to the WebSocket protocol"},
            "400": {"description": "not a WebSocket upgrade, or a bad cols/rows/command", **_ERR},
        },
    }},
}


def _command_arg() -> str | None:
    """``?command=``: a command line for the user's shell (``-c``), or None for the login shell."""
    raw = request.args.get("command")
    if raw is None:
        return None
    if not raw.strip() or len(raw) > MAX_COMMAND or "\0" in raw:
        raise UsageError(f"command must be a command line of 1 to {MAX_COMMAND} characters without NUL")
    return raw


def _size_arg(name: str, default: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name} must be a whole number of characters, not {raw!r}") from None
    if not 1 <= value <= MAX_SIZE:
        raise UsageError(f"{name} must be between 1 and {MAX_SIZE}, not {value}")
    return value


@bp.before_request
def check_size():
    # Checked before the upgrade so that a bad size is a plain 400, not a WebSocket that closes at once.
    if request.endpoint == "shell.shell":
        _size_arg("cols", 80)
        _size_arg("rows", 24)
        _command_arg()


@bp.route("/api/shell", websocket=True)
def shell():
    """flask-sock's WebSocket view of :func:`serve_shell`, made when the first shell is asked for:
    flask-sock and simple-websocket bring asyncio along (2.5 MiB in every worker), and most agents
    never open a shell."""
    return _websocket_view()()


@functools.cache
def _websocket_view() -> Callable[[], Any]:
    from flask_sock import Sock

    class Keep:
        """Where flask-sock registers the view it wraps (its ``bp``): kept here instead, the route is ours."""

        view: Callable[[], Any]

        def route(self, path: str, **options: Any) -> Callable[[Callable], Callable]:
            def keep(view: Callable[[], Any]) -> Callable[[], Any]:
                self.view = view
                return view
            return keep

    kept = Keep()
    Sock().route("/api/shell", bp=kept)(serve_shell)
    return kept.view


def serve_shell(ws) -> None:
    """A shell for the WebSocket ``ws`` (simple-websocket's), until one of the two ends."""
    state = current_app.config["AGENT"]
    cols, rows = _size_arg("cols", 80), _size_arg("rows", 24)
    command = _command_arg()
    try:
        env = job_environment(state)
        env["TERM"] = "xterm-256color"
        cwd = job_workdir(state)
        argv = login_shell(env) if command is None else [*login_shell(env)[:1], "-c", command]
        argv, env = in_job(state, argv, cwd, env, terminal=True)  # PBS: pbs_attach, in place
        session = PtySession.spawn(argv, env, cwd, cols, rows)
    except (OSError, DxflowError) as e:  # the upgrade is done: say it in the protocol, not as an HTTP 500
        log.warning("cannot start a shell: %s", e)
        ws.send(json.dumps({"error": "shell_failed", "message": f"cannot start a shell: {e}"}))
        return
    log.info("shell %d started (%dx%d)", session.pid, cols, rows)
    audit.record("shell", argv, state, request.environ, cwd=cwd, pid=session.pid)
    try:
        session.serve(ws)
    finally:
        session.close()
        log.info("shell %d ended (exit %s)", session.pid, session.exit_code)


def login_shell(env: dict[str, str]) -> list[str]:
    shell = env.get("SHELL", "")
    if not (os.path.isabs(shell) and os.access(shell, os.X_OK)):
        shell = "/bin/sh"
    return [shell, "-l"]


def set_size(fd: int, cols: int, rows: int) -> None:
    """Set a terminal's size; on a PTY the kernel sends SIGWINCH to its foreground process group."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class PtySession:
    """One shell on one PTY, owned by the thread that serves its WebSocket."""

    def __init__(self, proc: subprocess.Popen, master: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.master = master
        self.exit_code: int | None = None
        self.client_gone = threading.Event()
        self._pidfd = _pidfd_open(proc.pid)
        from simple_websocket import ConnectionClosed  # imported with the first shell (see shell())

        #: what the client's WebSocket raises once the client is gone
        self.closed: type[Exception] = ConnectionClosed

    @classmethod
    def spawn(cls, argv: list[str], env: dict[str, str], cwd: str, cols: int = 80, rows: int = 24) -> "PtySession":
        master, slave = os.openpty()  # both non-inheritable: only the dup2'd 0/1/2 reach the shell
        try:
            set_size(master, cols, rows)
            os.set_blocking(master, False)  # a shell that does not read its input must not block the agent
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", CTTY_HELPER, *argv], stdin=slave,
                                    stdout=slave, stderr=slave, env=env, cwd=cwd, close_fds=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        return cls(proc, master)

    # -- the two directions --------------------------------------------------
    def serve(self, ws) -> None:
        """Terminal output to the client here; client input in a helper thread. Returns when the shell has exited."""
        reader = threading.Thread(target=self._from_client, args=(ws,), name=f"shell-{self.pid}-in", daemon=True)
        reader.start()
        self._to_client(ws)
        if self.exit_code is not None:
            try:
                ws.send(json.dumps({"exit": self.exit_code}))
            except (self.closed, OSError):
                pass
        self.client_gone.set()
        reader.join()  # it notices within a second; only then may close() release the PTY

    def _to_client(self, ws) -> None:
        fds = [self.master] + ([self._pidfd] if self._pidfd is not None else [])
        output_open = True
        deadline = None
        while True:
            if self.client_gone.is_set() and deadline is None:
                self.hangup()
                deadline = time.monotonic() + HANGUP_GRACE
            if deadline is not None and time.monotonic() > deadline:
                self.kill()
                deadline = float("inf")
            ready, _, _ = select.select(fds if output_open else fds[1:], [], [], 0.5 if self._pidfd else 0.1)
            if self.master in ready:
                data = self._read()
                if data:
                    if not self._send(ws, data):
                        self.client_gone.set()
                elif data is not None:
                    output_open = False  # every holder of the terminal closed it
            if self.proc.poll() is not None:
                while output_open and (data := self._read()):  # what the shell wrote last
                    if not self._send(ws, data):
                        break
                code = self.proc.returncode
                self.exit_code = code if code >= 0 else 128 - code
                return

    def _read(self) -> bytes | None:
        """Terminal output; b"" once nothing holds the terminal any more, None when nothing is there yet."""
        try:
            return os.read(self.master, READ)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EIO, errno.EBADF):  # EIO: no process holds the terminal any more
                return b""
            raise

    def _send(self, ws, data: bytes) -> bool:
        if self.client_gone.is_set():
            return False
        try:
            ws.send(data)
            return True
        except (self.closed, OSError):
            return False

    def _from_client(self, ws) -> None:
        try:
            while not self.client_gone.is_set():
                try:
                    message = ws.receive(timeout=0.5)
                except self.closed:
                    break
                if message is None:
                    if not ws.connected:
                        break
                    continue
                if isinstance(message, str):
                    self.control(message, ws)
                else:
                    self.write(message)
        except Exception:  # noqa: BLE001 - whatever broke, the terminal must still be hung up
            log.exception("shell %d: reading from the client failed", self.pid)
        finally:
            self.client_gone.set()

    # -- what the client may do -----------------------------------------------
    def write(self, data: bytes) -> None:
        """Type ``data`` into the terminal, waiting while its input queue is full (until the client leaves)."""
        view = memoryview(data)
        while view and not self.client_gone.is_set():
            try:
                view = view[os.write(self.master, view):]
            except BlockingIOError:
                select.select([], [self.master], [], 0.5)
            except OSError as e:
                if e.errno in (errno.EIO, errno.EBADF):
                    return
                raise

    def control(self, text: str, ws) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            message = None
        if not isinstance(message, dict):
            self.write(text.encode())
            return
        try:
            if "resize" in message:
                cols, rows = (int(x) for x in message["resize"])
                if not (1 <= cols <= MAX_SIZE and 1 <= rows <= MAX_SIZE):
                    raise ValueError(f"size out of range: {cols}x{rows}")
                set_size(self.master, cols, rows)
            if "signal" in message:
                name = str(message["signal"]).upper().removeprefix("SIG")
                if name not in SIGNALS:
                    raise ValueError(f"unknown signal {message['signal']!r}; known: {', '.join(SIGNALS)}")
                self.signal_foreground(SIGNALS[name])
        except (TypeError, ValueError) as e:
            try:
                ws.send(json.dumps({"error": "bad_request", "message": f"bad control message {text[:200]!r}: {e}"}))
            except (self.closed, OSError):
                pass

    def signal_foreground(self, sig: int) -> None:
        """Send ``sig`` to what runs in the foreground of the terminal (the shell itself at its prompt)."""
        try:
            pgrp = os.tcgetpgrp(self.master)
        except OSError:
            pgrp = self.pid
        try:
            os.killpg(pgrp, sig)
        except (ProcessLookupError, PermissionError):
            pass

    # -- the end ----------------------------------------------------------------
    def session_pids(self) -> set[int]:
        """Processes still in the shell's session (the shell, its jobs, what they started)."""
        uid = os.getuid()
        return {p.pid for p in all_procs().values() if p.sid == self.pid and p.uid == uid}

    def hangup(self) -> None:
        """What a terminal hang-up does: SIGHUP (then SIGCONT, for stopped jobs) to the session."""
        pids = self.session_pids()
        if self.proc.poll() is None:
            pids.add(self.pid)
        for sig in (signal.SIGHUP, signal.SIGCONT):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def kill(self) -> None:
        if self.proc.poll() is None:
            log.warning("shell %d ignored SIGHUP for %.0f s: killing it", self.pid, HANGUP_GRACE)
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Hang up, reap the shell (SIGKILL after a grace period), release the PTY. Idempotent."""
        if self.proc.poll() is None:
            self.hangup()
            try:
                self.proc.wait(timeout=HANGUP_GRACE)
            except subprocess.TimeoutExpired:
                self.kill()
                self.proc.wait()
        else:
            self.hangup()  # the shell's jobs, as a terminal hang-up would
        if self.exit_code is None:
            code = self.proc.returncode
            self.exit_code = code if code >= 0 else 128 - code
        for fd in (self.master, self._pidfd):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.master = -1
        self._pidfd = None


def _pidfd_open(pid: int) -> int | None:
    """A pidfd (readable when the process exits) where the kernel has them (Linux 5.3+), else None: poll."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
