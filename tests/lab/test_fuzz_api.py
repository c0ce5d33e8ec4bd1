"""Fuzz the agent's API from its own OpenAPI document (schemathesis): no request may get a 5xx.

The agent runs as the lab user alice (never as root: the files API is fuzzed too),
with a throwaway HOME and the ``local`` scheduler, on 127.0.0.1 of the login node.
``POST /api/exec`` is left out (it would run whatever the fuzzer makes up), and so
are the endless streams (log follow, shell). Bounded: a few examples per
operation, 60 s in all.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from dxflow import auth

PYTHON = "/opt/dxflow/venv/bin/python"
ST = "/opt/dxflow/venv/bin/st"
USER = "alice"
EXCLUDE = r"^/api/exec$|/follow$|^/api/shell$|^/proxy/"


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
    (tmp_path / "openapi.json").write_text(json.dumps(schema))
    argv = [ST, "run", str(tmp_path / "openapi.json"), "--url", fuzz_agent["url"],
            "-H", f"Authorization: Bearer {fuzz_agent['token']}",
            "--checks", "not_a_server_error", "--max-examples", "8", "--max-time", "60",
            "--request-timeout", "10", "--exclude-path-regex", EXCLUDE, "--workers", "2",
            "--generation-database", "none", "--no-color", "--seed", "1"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, f"schemathesis found server errors:\n{report}"
    assert "not_a_server_error" in proc.stdout or "passed" in proc.stdout.lower(), report
