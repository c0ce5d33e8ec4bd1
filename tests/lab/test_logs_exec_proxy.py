"""Logs, exec, ports, forward and the proxy on the lab, as alice with a 2-node job.

The job (batch script on n1) serves ``python3 -m http.server 8765`` and a small
server-sent-events app on 8767, and prints whatever the test drops into
``~/dxtest-JOB/say``. bob serves 8766 on n1 too: alice must not reach it.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from conftest import DXFLOW, NETNS, Jobs, Lines, as_user, dxflow, popen_as, stop, wait_agents, wait_for

HTTP_PORT, BOB_PORT, SSE_PORT = 8765, 8766, 8767
PYTHON = "/opt/dxflow/venv/bin/python"

SSE_APP = textwrap.dedent("""
    import sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            self.wfile.write(b"data: first\\n\\n")
            self.wfile.flush()
            time.sleep(10)
            self.wfile.write(b"data: second\\n\\n")

    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")

JOB_SCRIPT = (f"cd {{dir}} && python3 -m http.server {HTTP_PORT} --bind 127.0.0.1 >/dev/null 2>&1 & "
              f"python3 {{dir}}/sse.py {SSE_PORT} >/dev/null 2>&1 & "
              "echo job-started; "
              "while true; do if [ -f {dir}/say ]; then cat {dir}/say; rm -f {dir}/say; fi; sleep 0.05; done")



@pytest.fixture(scope="module")
def job(lab):
    pw = pwd.getpwnam("alice")
    jobs = Jobs()
    bob = None
    tag = f"{os.getpid()}-{int(time.time())}"
    d = Path(pw.pw_dir) / f"dxtest-{tag}"
    d.mkdir()
    (d / "sse.py").write_text(SSE_APP)
    for p in (d, d / "sse.py"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    try:
        job_id = jobs.submit("alice", JOB_SCRIPT.format(dir=d), nodes=2)
        jobs.wait_running(job_id)
        wait_agents("alice", job_id, 2)
        # bob serves a port on n1 too
        bob = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{NETNS.format(node='n1')}", "runuser", "-u", "bob",
                                "--", "python3", "-m", "http.server", str(BOB_PORT), "--bind", "127.0.0.1",
                                "--directory", "/tmp"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: HTTP_PORT in _ports(job_id) and SSE_PORT in _ports(job_id), 20,
                 what="the job's servers listening on n1")
        yield {"id": job_id, "dir": d}
    finally:
        if bob:
            stop(bob)
        jobs.cancel_all()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def _ports(job_id: str) -> set[int]:
    out = dxflow("alice", "ports", f"{job_id}:n1", "--json", check=False)
    return {p["port"] for p in json.loads(out.stdout)} if out.returncode == 0 else set()


def _say(job: dict, text: str) -> None:
    tmp = job["dir"] / ".say.tmp"
    tmp.write_text(text + "\n")
    pw = pwd.getpwnam("alice")
    os.chown(tmp, pw.pw_uid, pw.pw_gid)
    os.replace(tmp, job["dir"] / "say")


def master_get(path: str, timeout: float = 30) -> tuple[int, bytes]:
    """GET through alice's master (on its Unix socket), as alice."""
    code = textwrap.dedent(f"""
        import sys
        from dxflow.master.client import MasterClient
        resp = MasterClient().ensure().request("GET", {path!r}, timeout=20)
        body = resp.read()
        sys.stdout.write(str(resp.status) + "\\n")
        sys.stdout.flush()
        sys.stdout.buffer.write(body)
    """)
    out = as_user("alice", [PYTHON, "-c", code], timeout=timeout)
    status, _, body = out.stdout.partition("\n")
    return int(status), body.encode()


# -- logs ---------------------------------------------------------------------------------------------------

def test_logs_follow_shows_a_line_written_after_it_started(job):
    proc = popen_as("alice", [DXFLOW, "logs", job["id"], "-f"])
    try:
        lines = Lines(proc)
        lines.wait_for("job-started", 20)
        marker = f"marker-{time.time_ns()}"
        t0 = time.monotonic()
        _say(job, marker)
        lines.wait_for(marker, 10)
        assert time.monotonic() - t0 < 5
    finally:
        stop(proc)


def test_logs_tail_and_agent_log(job):
    _say(job, "tail-check")
    wait_for(lambda: "tail-check" in dxflow("alice", "logs", job["id"], "--lines", "5").stdout, 10,
             what="the line in the job's stdout")
    assert dxflow("alice", "logs", job["id"], "--lines", "1").stdout.count("\n") == 1
    assert "registered" in dxflow("alice", "logs", f"{job['id']}:n2", "--agent").stdout


# -- exec ---------------------------------------------------------------------------------------------------

def test_exec_exit_code_streams_and_job_environment(job):
    out = dxflow("alice", "exec", f"{job['id']}:n2", "--", "sh", "-c",
                 "echo out $SLURM_JOB_ID $(uname -n) $(id -un); echo err >&2; exit 3", check=False)
    assert out.returncode == 3, out
    assert out.stdout == f"out {job['id']} n2 alice\n"
    assert out.stderr == "err\n"
    assert dxflow("alice", "exec", job["id"], "--", "true").returncode == 0
    missing = dxflow("alice", "exec", job["id"], "--", "no-such-command-xyz", check=False)
    assert missing.returncode == 127 and "command not found" in missing.stderr


# -- ports, proxy, forward -----------------------------------------------------------------------------------

def test_ports_lists_the_jobs_servers_not_bobs_nor_agents(job):
    ports = json.loads(dxflow("alice", "ports", f"{job['id']}:n1", "--json").stdout)
    by_port = {p["port"]: p for p in ports}
    assert HTTP_PORT in by_port and SSE_PORT in by_port and BOB_PORT not in by_port
    assert by_port[HTTP_PORT]["process"].startswith("python")
    assert not any("dxflow.agent" in p.get("command", "") for p in ports)


def test_proxy_through_the_master(job):
    status, body = master_get(f"/api/fleet/{job['id']}/n1/proxy/{HTTP_PORT}/")
    assert status == 200 and b"Directory listing" in body and b"sse.py" in body
    status, body = master_get(f"/api/fleet/{job['id']}/n1/proxy/{BOB_PORT}/")
    assert status == 403 and b"another user" in body
    status, body = master_get(f"/api/fleet/{job['id']}/n2/proxy/{HTTP_PORT}/")  # nothing of the job there
    assert status == 404


def test_sse_first_event_through_the_proxy_before_the_stream_ends(job):
    code = textwrap.dedent(f"""
        import time
        from dxflow.master.client import MasterClient
        c = MasterClient().ensure()
        t0 = time.monotonic()
        resp = c.request("GET", "/api/fleet/{job['id']}/n1/proxy/{SSE_PORT}/events", timeout=30)
        line = resp.readline()
        print(resp.status, round(time.monotonic() - t0, 3), line.decode().strip())
    """)
    status, elapsed, line = as_user("alice", [PYTHON, "-c", code], timeout=30).stdout.split(" ", 2)
    assert status == "200" and line.strip() == "data: first"
    assert float(elapsed) < 5.0  # the next event comes 10 s later: the first was not held back


@pytest.mark.parametrize("mode", [[], ["--http"]], ids=["default", "http"])
def test_forward_reaches_the_jobs_server_and_streams_sse(job, mode):
    http_fwd = popen_as("alice", [DXFLOW, "forward", f"{job['id']}:n1", str(HTTP_PORT), "--local", "0", *mode])
    sse_fwd = popen_as("alice", [DXFLOW, "forward", f"{job['id']}:n1", str(SSE_PORT), "--local", "0", *mode])
    try:
        # as alice: the forward refuses every other user's connection (root's too)
        url = Lines(http_fwd).wait_for(r"^http://127\.0\.0\.1:\d+/", 30).split()[0]
        code = textwrap.dedent("""
            import sys, urllib.request
            with urllib.request.urlopen(sys.argv[1], timeout=10) as resp:
                print(resp.status, b"Directory listing" in resp.read())
        """)
        assert as_user("alice", [PYTHON, "-c", code, url], timeout=30).stdout.split() == ["200", "True"]
        sse_url = Lines(sse_fwd).wait_for(r"^http://127\.0\.0\.1:\d+/", 30).split()[0]
        code = textwrap.dedent("""
            import sys, time, urllib.request
            t0 = time.monotonic()
            with urllib.request.urlopen(sys.argv[1], timeout=10) as resp:
                line = resp.readline()
            print(round(time.monotonic() - t0, 3), line.decode().strip())
        """)
        elapsed, line = as_user("alice", [PYTHON, "-c", code, sse_url + "events"], timeout=30).stdout.split(" ", 1)
        assert line.strip() == "data: first"
        assert float(elapsed) < 5.0  # the next event comes 10 s later: the first was not held back
    finally:
        stop(http_fwd)
        stop(sse_fwd)


def test_forward_refuses_bobs_port(job):
    out = dxflow("alice", "forward", f"{job['id']}:n1", str(BOB_PORT), "--local", "0", check=False, timeout=30)
    assert out.returncode != 0 and "another user" in out.stderr
