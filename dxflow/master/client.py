"""How the CLI talks to the user's master: HTTP over ``~/.dxflow/master.sock``, starting it on demand.

The CLI's one way to its master: JSON calls (:meth:`MasterClient.json`), streamed requests
(:meth:`MasterClient.request`, :meth:`MasterClient.connection`), raw sockets for the protocols that
take the connection over (``dxflow shell``'s WebSocket, ``dxflow forward``'s TCP pipe:
:meth:`MasterClient.socket`), and one mapping of error answers to dxflow's errors (:func:`check`).
"""

from __future__ import annotations

import fcntl
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from dxflow.config import ensure_user_dir
from dxflow.errors import (AccessDenied, AgentUnreachable, AuthError, DxflowError, MasterUnavailable, NotFound,
                           UsageError)

START_TIMEOUT = 15.0
LOCK_FILE = "master.lock"  # held by the running master for its lifetime (dxflow.master.server)
PID_FILE = "master.pid"
NOT_RUNNING = "the master is not running: start it with `dxflow master start`"
#: the console's TCP port for a master started with it in its environment (``dxflow console --port``).
PORT_ENV = "DXFLOW_CONSOLE_PORT"


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


def lock_holders(lock: Path) -> list[int]:
    """This user's processes that have ``lock`` open: the master and its worker (and a master
    starting, waiting for it). Read from ``/proc/PID/fd``, where only one's own processes are
    readable: no other user's process can be among them."""
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        return []
    uid, me = os.getuid(), os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        fds = f"/proc/{entry}/fd"
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            names = os.listdir(fds)
        except OSError:  # gone, or not ours
            continue
        for name in names:
            try:
                target = os.stat(f"{fds}/{name}")
            except OSError:
                continue
            if (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino):
                found.append(int(entry))
                break
    return found


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: Path, timeout: float | None = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(str(self.path))
        self.sock = s


class MasterClient:
    def __init__(self, base: Path | None = None) -> None:
        self.base = base or ensure_user_dir()
        self.sock = self.base / "master.sock"

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
        log = open(self.base / "logs" / "master.log", "ab")
        subprocess.Popen([sys.executable, "-m", "dxflow.master"], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log, start_new_session=True, close_fds=True, cwd=str(self.base), env=env)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if self.running():
                return int(self.json("GET", "/api/master")["pid"])
        raise MasterUnavailable(f"the master did not start within {START_TIMEOUT:.0f} s; "
                                f"see {self.base / 'logs' / 'master.log'}")

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop the master; False if none was running.

        Decided by the master's lock, not its pid file: a pid file left by a killed master may name
        a process that has since taken the pid, or a zombie. Only processes of this user that hold
        ``master.lock`` open (the master, its worker) are signalled; the master is gone when the
        lock is free."""
        pidfile = self.base / PID_FILE
        if not self.lock_held():
            pidfile.unlink(missing_ok=True)  # stale: nobody holds the lock
            return False
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            for pid in lock_holders(self.base / LOCK_FILE):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not self.lock_held():
                    return True
                time.sleep(0.05)
        return not self.lock_held()

    def lock_held(self) -> bool:
        """Whether a master holds ``master.lock`` (taken and let go at once to find out)."""
        try:
            fd = os.open(self.base / LOCK_FILE, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing lets go of a lock this process took
        return False

    def ensure(self) -> "MasterClient":
        if not self.running():
            self.start()
        return self

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

    def json(self, method: str, path: str, body: Any = None, timeout: float | None = 60.0) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        resp = self.request(method, path, data, headers, timeout)
        raw = resp.read()
        check(resp, raw)
        return json.loads(raw) if raw else None

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
