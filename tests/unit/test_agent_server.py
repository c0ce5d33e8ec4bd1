"""The agent as the lab runs it (``python -m dxflow.agent``, gunicorn; :mod:`dxflow.agent.server`): raw
sockets, streaming, upgrades — what the in-process tests (test_agent_logs, _exec, _proxy) cannot show.

The agent runs as the current user with a throwaway HOME and the ``local``
scheduler, on 127.0.0.1, port 0 — nothing outside the test's folders is touched.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dxflow import auth


def start_agent(home: Path, work: Path, stdout: Path, env: dict | None = None):
    """Start ``python -m dxflow.agent`` in the foreground; return (process, port, headers)."""
    (home / ".dxflow").mkdir(mode=0o700, parents=True, exist_ok=True)
    e = {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
         "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "dxflow.agent", "--scheduler", "local", "--cluster", "ut",
                             "--job", "9", "--node", "here", "--work-dir", str(work), "--stdout", str(stdout),
                             "--foreground"], env=e, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    reg_path = home / ".dxflow" / "fleet" / "ut.9.here.json"
    deadline = time.monotonic() + 20
    while not reg_path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_agent(proc)
            raise AssertionError("the agent did not register")
        time.sleep(0.05)
    reg = json.loads(reg_path.read_text())
    key = auth.user_key(home / ".dxflow")
    token = auth.mint_token(key, reg["user"], auth.fingerprint(reg["public_key"]))
    return proc, reg["port"], {"Authorization": f"Bearer {token}"}


def stop_agent(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("agent")
    work = base / "work"
    work.mkdir()
    stdout = work / "job.out"
    stdout.write_text("first line\n")
    proc, port, headers = start_agent(base / "home", work, stdout)
    yield {"port": port, "headers": headers, "stdout": stdout, "work": work}
    stop_agent(proc)


ECHO_UPGRADE = textwrap.dedent("""
    import socket, sys, threading
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
    print(s.getsockname()[1], flush=True)
    def serve(c):
        buf = b""
        while b"\\r\\n\\r\\n" not in buf:
            buf += c.recv(4096)
        head = buf.split(b"\\r\\n\\r\\n")[0].decode()
        ok = "upgrade: websocket" in head.lower() and "authorization" not in head.lower()
        c.sendall(b"HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\n\\r\\n"
                  if ok else b"HTTP/1.1 400 Bad Request\\r\\nContent-Length: 0\\r\\n\\r\\n")
        while True:
            data = c.recv(4096)
            if not data:
                break
            c.sendall(data.upper())
        c.close()
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")


def test_upgrade_pipes_both_ways(server):
    backend = subprocess.Popen([sys.executable, "-c", ECHO_UPGRADE], stdout=subprocess.PIPE, text=True)
    try:
        bport = int(backend.stdout.readline())
        s = socket.create_connection(("127.0.0.1", server["port"]), timeout=10)
        s.sendall((f"GET /proxy/{bport}/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                   f"Authorization: {server['headers']['Authorization']}\r\n\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(4096)
        assert buf.startswith(b"HTTP/1.1 101"), buf
        for word in (b"hello", b"again"):
            s.sendall(word)
            assert s.recv(4096) == word.upper()
        s.close()
    finally:
        backend.kill()
        backend.wait()


def _get(server, path, **kw):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    conn.request("GET", path, headers=server["headers"], **kw)
    return conn, conn.getresponse()


def test_follow_streams_each_line_at_once(server):
    conn, resp = _get(server, "/api/logs/stdout/follow?lines=1")
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    got = []
    deadline = time.monotonic() + 10
    while not any("first line" in g for g in got) and time.monotonic() < deadline:
        got.append(resp.readline().decode())
    delays = []
    with open(server["stdout"], "a") as f:
        for i in range(5):
            t0 = time.monotonic()
            f.write(f"line {i}\n")
            f.flush()
            while True:
                line = resp.readline().decode()
                if line.startswith("data: line"):
                    assert line.strip() == f"data: line {i}"
                    delays.append(time.monotonic() - t0)
                    break
    conn.close()
    assert sorted(delays)[2] < 0.2, delays  # polled every 25 ms, no buffering on the way


def test_exec_over_http_and_kill_on_disconnect(server):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    body = json.dumps({"argv": ["sh", "-c", "echo $$; echo oops >&2; exec sleep 60"]})
    conn.request("POST", "/api/exec", body=body, headers={**server["headers"], "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    seen = {}
    while len(seen) < 2:
        msg = json.loads(resp.readline())
        seen[msg["stream"]] = base64.b64decode(msg["data"])
    pid = int(seen["stdout"])
    assert seen["stderr"] == b"oops\n" and os.path.exists(f"/proc/{pid}")
    conn.close()  # the client goes away: the agent sees the socket close and stops the command
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{pid}")


def test_exec_child_of_the_agent(server):
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=10)
    body = json.dumps({"argv": ["sh", "-c", "cat /proc/$$/stat"]})
    conn.request("POST", "/api/exec", body=body, headers={**server["headers"], "Content-Type": "application/json"})
    out = b""
    for line in conn.getresponse().read().splitlines():
        msg = json.loads(line) if line.strip() else {}
        if msg.get("stream") == "stdout":
            out += base64.b64decode(msg["data"])
    fields = out.decode().rsplit(")", 1)[1].split()
    ppid, sid = int(fields[1]), int(fields[3])
    with open(f"/proc/{ppid}/cmdline", "rb") as f:
        assert b"dxflow.agent" in f.read()  # its parent is the agent's worker, not a detached shell
    with open(f"/proc/{ppid}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[3]) == sid  # same session as the agent worker
