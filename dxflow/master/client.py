"""How the CLI talks to the user's master on this login node: HTTP over its socket
(``~/.dxflow/hosts/HOST/master.sock``, :mod:`dxflow.layout`), starting it on demand.

The CLI's one way to its master: JSON calls (:meth:`MasterClient.json`), streamed requests
(:meth:`MasterClient.request`, :meth:`MasterClient.connection`), raw sockets for the protocols that
take the connection over (``dxflow shell``'s WebSocket, ``dxflow forward``'s TCP pipe:
:meth:`MasterClient.socket`), and one mapping of error answers to dxflow's errors (:func:`check`).
"""

from __future__ import annotations

import fcntl
import http.client
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dxflow.errors import (AccessDenied, AgentUnreachable, AuthError, DxflowError, MasterUnavailable, NotFound,
                           UsageError)
from dxflow import __version__
from dxflow.layout import UserLayout, this_host
from dxflow.locks import locked
from dxflow.procs import open_fds

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0
#: taken (in this host's folder) by a command that restarts an older master
UPGRADE_LOCK = "master.upgrade.lock"
NOT_RUNNING = "the master is not running: start it with `dxflow master start`"
#: the console's TCP port for a master started with it in its environment (``dxflow console --port``).
PORT_ENV = "DXFLOW_CONSOLE_PORT"


def release(version: str) -> tuple[int, ...]:
    """The release numbers of a version (``0.10.2`` -> (0, 10, 2)); pre-release tags are not compared."""
    m = re.match(r"\d+(\.\d+)*", version.strip())
    return tuple(int(n) for n in m.group(0).split(".")) if m else ()


def older(theirs: str, ours: str) -> bool:
    """Whether a master of version ``theirs`` is older than this command (``ours``); an unknown one is."""
    return release(theirs) < release(ours)


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:PORT can be bound (as gunicorn binds it, with SO_REUSEADDR)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _uts(pid: int | str) -> int | None:
    """The host-name namespace of a process (an inode number), None when it cannot be read."""
    try:
        return os.stat(f"/proc/{pid}/ns/uts").st_ino
    except OSError:
        return None


def lock_holders(lock: Path) -> list[int]:
    """This user's processes on this host that have ``lock`` open: the master and its worker (and a
    master starting, waiting for it). Read from ``/proc/PID/fd``, where only one's own processes are
    readable: no other user's process can be among them. A process under another host name (another
    UTS namespace: a second login node sharing this kernel, as in the lab) is not counted either."""
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        return []
    me, host = os.getpid(), _uts("self")
    found = []
    for pid, fds in open_fds(os.getuid()):
        if pid == me or _uts(pid) != host:
            continue
        for fd in fds:
            try:
                target = os.stat(fd)
            except OSError:
                continue
            if (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino):
                found.append(pid)
                break
    return found


def lock_held(lock: Path) -> bool:
    """Whether a master holds ``lock`` (taken and let go at once to find out)."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing lets go of a lock this process took
    return False


def stop_lock_holders(lock: Path, timeout: float) -> bool:
    """SIGTERM this user's processes on this host that hold ``lock`` (:func:`lock_holders`), SIGKILL
    them after ``timeout``; True once the lock is free, False if nobody held it."""
    if not lock_held(lock):
        return False
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in lock_holders(lock):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not lock_held(lock):
                return True
            time.sleep(0.05)
    return not lock_held(lock)


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(str(self.path))
        self.sock = s


class JsonRequests:
    """A JSON request and its answer, mapped to dxflow's errors, on a client's own ``request``: the same
    for the user's master and for the site service (:class:`dxflow.site.client.SiteClient`)."""

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                timeout: float | None = 60.0) -> http.client.HTTPResponse:
        raise NotImplementedError

    def json(self, method: str, path: str, body: Any = None, timeout: float | None = 60.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        resp = self.request(method, path, data, headers, timeout)
        raw = resp.read()
        check(resp, raw)
        return json.loads(raw) if raw else None

    def job_nodes(self, job: str) -> dict:
        """The job's nodes as its scheduler lists them (``GET /api/jobs/JOB/nodes``, :mod:`dxflow.master.jobnodes`):
        ``{"job", "state", "nodes", "node_set", "scheduler", "why"}``."""
        return self.json("GET", f"/api/jobs/{quote(job, safe='')}/nodes", timeout=60)


class MasterClient(JsonRequests):
    """The user's master on this host (``host``, default this one) for the ``~/.dxflow`` folder
    ``base`` (default the user's own)."""

    def __init__(self, base: Path | None = None, host: str | None = None) -> None:
        self.layout = (UserLayout(base, host or this_host()) if base is not None else UserLayout.of(host=host)).ensure()
        self.base = self.layout.base
        self.sock = self.layout.master_sock

    # -- lifecycle ------------------------------------------------------------
    def running(self) -> bool:
        try:
            resp = self.request("GET", "/api/master", timeout=5)
            resp.read()
            resp.close()
            return resp.status == 200
        except (OSError, MasterUnavailable, DxflowError):
            return False

    def start(self, console_port: int | None = None) -> int:
        """Start the master detached unless it answers already (its console on ``console_port`` if
        given, else the one used last time); return its pid."""
        if self.running():
            return int(self.json("GET", "/api/master")["pid"])
        env = dict(os.environ)
        if console_port is not None:
            if not 0 < console_port < 65536:
                raise UsageError(f"console port {console_port}: expected 1-65535")
            if not port_is_free(console_port):
                raise UsageError(f"port {console_port} on 127.0.0.1 is taken: choose another or leave it out")
            env[PORT_ENV] = str(console_port)
        self.stop_legacy()
        out = os.open(self.layout.master_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            subprocess.Popen([sys.executable, "-m", "dxflow.master"], stdin=subprocess.DEVNULL, stdout=out,
                             stderr=out, start_new_session=True, close_fds=True, cwd=str(self.base), env=env)
        finally:
            os.close(out)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if self.running():
                return int(self.json("GET", "/api/master")["pid"])
        raise MasterUnavailable(f"the master did not start within {START_TIMEOUT:.0f} s; "
                                f"see {self.layout.master_log}")

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop this host's master (and one of the old layout, :meth:`stop_legacy`); False if none ran.

        Decided by the master's lock, not its pid file: a pid file left by a killed master may name
        a process that has since taken the pid, or a zombie. Only processes of this user on this
        host that hold the lock open (the master, its worker) are signalled; the master is gone
        when the lock is free. The lock is this host's own (``hosts/HOST/master.lock``): a master
        on another login node sharing the home is never looked at."""
        stopped = stop_lock_holders(self.layout.master_lock, timeout)
        if not stopped:
            self.layout.master_pid.unlink(missing_ok=True)  # stale: nobody holds the lock
        return self.stop_legacy(timeout) or stopped

    def stop_legacy(self, timeout: float = 10.0) -> bool:
        """Stop a master of an older dxflow, which kept its files directly in ``~/.dxflow``, when it
        runs on this host; then move its console port to this host's folder and remove the rest. True if one was stopped. One that runs on another login node (its lock
        held, by no process here) is left alone, and the user is told where to stop it."""
        legacy = self.layout.legacy
        if not any(path.exists() for path in legacy.leftovers):
            return False
        stopped = False
        if lock_held(legacy.master_lock):
            if not lock_holders(legacy.master_lock):
                log.warning("a master of an older dxflow runs on another login node (it holds %s): run "
                            "`dxflow master stop` there", legacy.master_lock)
                return False
            stopped = stop_lock_holders(legacy.master_lock, timeout)
            if not stopped:
                return False
        if legacy.console_state.exists() and not self.layout.console_state.exists():
            os.replace(legacy.console_state, self.layout.console_state)  # the laptop's `ssh -L` keeps working
        for path in legacy.leftovers:
            path.unlink(missing_ok=True)
        return stopped

    def lock_held(self) -> bool:
        """Whether this host's master holds its lock."""
        return lock_held(self.layout.master_lock)

    def ensure(self) -> "MasterClient":
        """This host's master, started if none answers, restarted if it is older than this command."""
        info = self.info()
        if info is None:
            self.start()
        elif older(str(info.get("version", "")), __version__):
            self.replace_older()
        return self

    # -- versions (issue #10: upgrades) -------------------------------------------
    def info(self) -> dict | None:
        """The running master's ``/api/master`` answer (pid, version, ...), None when none answers."""
        try:
            return self.json("GET", "/api/master", timeout=5)
        except (OSError, ValueError, DxflowError):
            return None

    def replace_older(self) -> None:
        """Restart a master older than this command (dxflow was upgraded while it ran): under a lock, so
        that two commands at once restart it once; asked again once the lock is held; stopped through
        its own lock (:meth:`stop`: only this user's processes on this host that hold it), then started
        from this release. The agents need nothing: they keep running and are found again."""
        with locked(self.layout.host_dir / UPGRADE_LOCK, START_TIMEOUT) as held:
            info = self.info()
            if held and info is not None and older(str(info.get("version", "")), __version__):
                log.warning("the master runs dxflow %s, this command is %s: restarting it", info.get("version"),
                            __version__)
                self.stop()
        self.start()  # a no-op when a master answers (another command restarted it)

    # -- requests -------------------------------------------------------------
    def socket(self, timeout: float | None = 60.0) -> socket.socket:
        """A raw connection to the master, for a protocol that takes the connection over."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(str(self.sock))
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            raise MasterUnavailable(NOT_RUNNING) from e
        return s

    def connection(self, timeout: float | None = 60.0) -> "UnixHTTPConnection":
        """An HTTP connection to the master (connected on first use), for a request driven by hand."""
        return UnixHTTPConnection(self.sock, timeout=timeout)

    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                timeout: float | None = 60.0) -> http.client.HTTPResponse:
        conn = self.connection(timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            return conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            conn.close()
            raise MasterUnavailable(NOT_RUNNING) from e

    def auth_headers(self, method: str, target: str) -> list[tuple[str, str]]:
        """Headers a raw socket's upgrade request carries to prove its user: none (the master's socket is
        the user's own; the site service's client sends a MUNGE credential, dxflow.site.client)."""
        return []

    def agent_path(self, job: str, node: str | None, path: str) -> str:
        return f"/api/fleet/{quote(job, safe='')}/{quote(node or '-', safe='')}/{path.lstrip('/')}"


def check(resp: http.client.HTTPResponse, raw: bytes | None = None) -> None:
    """Raise the error a non-2xx answer (from the master or relayed from an agent) stands for."""
    if resp.status < 400:
        return
    raise_for_status(resp.status, resp.read() if raw is None else raw)


def raise_for_status(status: int, raw: bytes) -> None:
    """Raise the dxflow error an error answer (its status and JSON body) stands for."""
    try:
        data = json.loads(raw)
        message = data.get("message") or data.get("error") or raw.decode(errors="replace")
    except (ValueError, AttributeError):
        message = raw.decode(errors="replace")[:300] or f"HTTP {status}"
    cls = {400: UsageError, 401: AuthError, 403: AccessDenied, 404: NotFound,
           502: AgentUnreachable}.get(status, DxflowError)
    raise cls(message)
