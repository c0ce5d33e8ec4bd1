"""Fuzz the agent's and the master's APIs from their OpenAPI documents (schemathesis): no request may get a 5xx.

The agent runs as the lab user alice (never as root: the files API is fuzzed too),
with a throwaway HOME and the ``local`` scheduler, on 127.0.0.1 of the login node.
``POST /api/exec`` is left out (it would run whatever the fuzzer makes up), and so
are the endless streams (log follow, shell). Bounded: a few examples per
operation and :data:`SECONDS` for each API. schemathesis spends all of a time budget
(its fuzzing phase repeats until the time is up), so the budget is what the test takes;
its run report must show every operation tested, so a budget too short to reach them
all fails instead of passing unseen.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import Jobs, dxflow, wait_agents
from dxflow import auth
from dxflow.layout import UserLayout

PYTHON = "/opt/dxflow/venv/bin/python"
ST = "/opt/dxflow/venv/bin/st"
USER = "alice"
EXCLUDE = r"^/api/exec$|/follow$|^/api/shell$|^/api/heartbeat$|^/proxy/"
#: the time budget of each API's run: every operation is reached in a few seconds; the rest is more fuzzing
SECONDS = 15


@pytest.fixture
def fuzz_agent(lab):
    if not os.path.exists(ST):
        pytest.fail(f"schemathesis is not installed: {PYTHON} -m pip install schemathesis")
    pw = pwd.getpwnam(USER)
    home = Path(tempfile.mkdtemp(prefix="dxfuzz-"))
    (home / "work").mkdir()
    (home / "work" / "out.txt").write_text("hello\n")
    for p in (home, home / "work", home / "work" / "out.txt"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(home, 0o700)
    argv = ["runuser", "-u", USER, "--", "env", "-i", f"HOME={home}", "PATH=/usr/local/bin:/usr/bin:/bin",
            "LANG=C.UTF-8", PYTHON, "-I", "-m", "dxflow.agent", "--scheduler", "local", "--cluster", "fuzz",
            "--job", "fuzz", "--node", "fuzz", "--work-dir", str(home / "work"),
            "--stdout", str(home / "work" / "out.txt"), "--foreground"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(home / "agent.err", "wb"), start_new_session=True)
    try:
        reg_path = home / ".dxflow" / "fleet" / "fuzz.fuzz.fuzz.json"
        deadline = time.monotonic() + 30
        while not reg_path.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the agent did not start: {(home / 'agent.err').read_text()[-2000:]}")
            time.sleep(0.1)
        reg = json.loads(reg_path.read_text())
        key = auth.user_key(home / ".dxflow")
        token = auth.mint_token(key, USER, auth.fingerprint(reg["public_key"]))
        yield {"url": f"http://127.0.0.1:{reg['port']}", "token": token, "home": home}
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)
        shutil.rmtree(home, ignore_errors=True)


def test_fuzz_agent_api_no_server_errors(fuzz_agent, tmp_path):
    req = urllib.request.Request(fuzz_agent["url"] + "/api/openapi.json",
                                 headers={"Authorization": f"Bearer {fuzz_agent['token']}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        schema = json.load(resp)
    assert {"/api/health", "/api/logs", "/api/ports", "/api/exec"} <= set(schema["paths"])
    fuzz(schema, fuzz_agent["url"], tmp_path, EXCLUDE, examples=8, seconds=SECONDS,
         headers=[f"Authorization: Bearer {fuzz_agent['token']}"])


def fuzz(schema: dict, url: str, tmp_path: Path, exclude: str, examples: int, seconds: int,
         headers: list[str] = ()) -> None:
    """Run schemathesis over ``schema`` against ``url``: it must find no 5xx (and no crash), and have
    tested every operation it selected."""
    (tmp_path / "openapi.json").write_text(json.dumps(schema))
    argv = [ST, "run", str(tmp_path / "openapi.json"), "--url", url,
            *(arg for h in headers for arg in ("-H", h)),
            "--checks", "not_a_server_error", "--max-examples", str(examples), "--max-time", str(seconds),
            "--request-timeout", "15", "--exclude-path-regex", exclude,
            # one worker: two make hypothesis call ast.parse from two threads, which CPython 3.11 does not
            # survive ("SystemError: AST constructor recursion depth mismatch", a crash of the fuzzer's own)
            "--workers", "1",
            "--generation-database", "none", "--no-color", "--seed", "1",
            "--report", "json", "--report-json-path", str(tmp_path / "report.json")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 180, cwd=tmp_path)
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"schemathesis found server errors at {url}:\n{report}"
    assert "not_a_server_error" in proc.stdout or "passed" in proc.stdout.lower(), report
    # tested: at least one request answered and checked (schemathesis' own count, per operation)
    operations = json.loads((tmp_path / "report.json").read_text())["operations"]
    assert operations["selected"] > 0 and operations["tested"] == operations["selected"], (operations, report)


# -- the master's API, on its socket and through the relay to a real agent -------------------------------
MASTER_EXCLUDE = r"/api/exec$|/follow$|/api/shell$|/api/heartbeat$|/proxy/"


def _unix_forwarder(sock_path: str) -> tuple[socket.socket, threading.Thread]:
    """127.0.0.1:PORT -> the master's Unix socket, for the fuzzer's HTTP client (which speaks TCP only)."""
    from dxflow.edge.pipes import pipe

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)

    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            up = socket.socket(socket.AF_UNIX)
            try:
                up.connect(sock_path)
            except OSError:  # the master is gone: the fuzzer sees a network error, the loop goes on
                conn.close()
                up.close()
                continue

            def relay(a=conn, b=up):
                try:
                    pipe(a, b)
                finally:
                    a.close()
                    b.close()
            threading.Thread(target=relay, daemon=True).start()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return server, t


def test_fuzz_master_api_no_server_errors(lab, tmp_path):
    jobs = Jobs()
    job = jobs.submit(USER, "sleep 600")
    server = None
    try:
        jobs.wait_running(job, timeout=120)
        agents = wait_agents(USER, job, 1, timeout=60)
        node = agents[0]["node"]
        dxflow(USER, "master", "start")
        sock = str(UserLayout.of(os.path.expanduser(f"~{USER}")).master_sock)
        server, _ = _unix_forwarder(sock)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        with urllib.request.urlopen(url + "/api/openapi.json", timeout=10) as resp:
            schema = json.load(resp)
        with urllib.request.urlopen(url + f"/api/fleet/{job}/-/api/openapi.json", timeout=10) as resp:
            agent_schema = json.load(resp)
        # the agent's operations as the relay serves them: /api/fleet/{job}/{node}/<path>, this job's node
        fixed = [{"name": "job", "in": "path", "required": True, "schema": {"type": "string", "enum": [job]}},
                 {"name": "node", "in": "path", "required": True, "schema": {"type": "string", "enum": [node, "-"]}}]
        for path, ops in agent_schema["paths"].items():
            relayed = {}
            for method, op in ops.items():
                op = dict(op, operationId=f"relay_{op.get('operationId', method + path)}")
                op["parameters"] = fixed + list(op.get("parameters", []))
                relayed[method] = op
            schema["paths"][f"/api/fleet/{{job}}/{{node}}{path}"] = relayed
        for name, sub in agent_schema.get("components", {}).get("schemas", {}).items():
            schema["components"]["schemas"].setdefault(name, sub)
        assert {"/api/agents", "/api/forward/{job}/{node}/{port}", "/api/fleet/{job}/{node}/api/node"} <= \
            set(schema["paths"])
        fuzz(schema, url, tmp_path, MASTER_EXCLUDE, examples=6, seconds=SECONDS)
        # the master and the agent are still there and answer
        assert dxflow(USER, "info", job).returncode == 0
    finally:
        if server is not None:
            server.close()
        jobs.cancel_all()
