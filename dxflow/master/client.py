"""How the CLI talks to the user's master: HTTP over ``~/.dxflow/master.sock``, starting it on demand."""

from __future__ import annotations

import http.client
import json
import os
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

    def start(self) -> int:
        """Start the master detached unless it answers already; return its pid."""
        if self.running():
            return int(self.json("GET", "/api/master")["pid"])
        log = open(self.base / "logs" / "master.log", "ab")
        subprocess.Popen([sys.executable, "-m", "dxflow.master"], stdin=subprocess.DEVNULL, stdout=log,
                         stderr=log, start_new_session=True, close_fds=True, cwd=str(self.base))
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if self.running():
                return int(self.json("GET", "/api/master")["pid"])
        raise MasterUnavailable(f"the master did not start within {START_TIMEOUT:.0f} s; "
                                f"see {self.base / 'logs' / 'master.log'}")

    def stop(self, timeout: float = 10.0) -> bool:
        pidfile = self.base / "master.pid"
        try:
            pid = int(pidfile.read_text().strip())
        except (OSError, ValueError):
            return False
        try:
            os.kill(pid, 15)
        except ProcessLookupError:
            pidfile.unlink(missing_ok=True)
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            time.sleep(0.05)
        os.kill(pid, 9)
        return True

    def ensure(self) -> "MasterClient":
        if not self.running():
            self.start()
        return self

    # -- requests -------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                timeout: float | None = 60.0) -> http.client.HTTPResponse:
        conn = UnixHTTPConnection(self.sock, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            return conn.getresponse()
        except (FileNotFoundError, ConnectionRefusedError) as e:
            conn.close()
            raise MasterUnavailable("the master is not running: start it with `dxflow master start`") from e

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
    raw = resp.read() if raw is None else raw
    try:
        data = json.loads(raw)
        message = data.get("message") or data.get("error") or raw.decode(errors="replace")
    except ValueError:
        message = raw.decode(errors="replace")[:300]
    cls = {400: UsageError, 401: AuthError, 403: AccessDenied, 404: NotFound,
           502: AgentUnreachable}.get(resp.status, DxflowError)
    raise cls(message)
