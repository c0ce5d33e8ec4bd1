"""`dxflow forward` started before the service listens: it waits, then connects (issue #9, item 6).

alice starts the forward right after ``sbatch``, before the job runs and before its server
has bound the port. The forward must listen at once, say it waits for NODE:PORT, and hold
alice's connection until the server listens, then carry it. While it waits, the port's owner
is still checked for every connection: when bob's process is the one listening there, alice's
connection gets an error and bob's server never sees a byte.
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shlex
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from conftest import DXFLOW, NETNS, Jobs, Lines, popen_as, stop, wait_agents

PYTHON = "/opt/dxflow/venv/bin/python"

# alice's client: one GET through the forward, however long it is held; prints the status and body
ALICE_GET = textwrap.dedent("""
    import sys, urllib.error, urllib.request
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/{sys.argv[2]}", timeout=120) as r:
            print(r.status, r.read().decode(errors="replace")[:200].replace("\\n", " "))
    except urllib.error.HTTPError as e:
        print(e.code, e.read().decode(errors="replace")[:300].replace("\\n", " "))
""")


def free_port_guess() -> int:
    return random.randint(30000, 39999)


def on_node_popen(node: str, user: str, argv: list[str]) -> subprocess.Popen:
    """A long-running command of ``user`` in a compute node's network namespace (stopped with stop())."""
    return subprocess.Popen(["nsenter", f"--net=/var/run/netns/{NETNS.format(node=node)}", "runuser", "-l", user,
                             "-c", shlex.join(argv)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


@pytest.fixture
def folder(lab):
    pw = pwd.getpwnam("alice")
    d = Path(pw.pw_dir) / f"dxtest-fwait-{os.getpid()}-{int(time.time())}"
    d.mkdir()
    os.chown(d, pw.pw_uid, pw.pw_gid)
    (d / "hello.txt").write_text("hello from the job\n")
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def start_forward(job: str, port: int) -> tuple[subprocess.Popen, Lines, int]:
    proc = popen_as("alice", [DXFLOW, "forward", job, str(port), "--local", "0"])
    out = Lines(proc)
    try:
        first = out.wait_for(r" -> ", 60)
    except AssertionError:
        stop(proc)
        raise AssertionError(f"dxflow forward did not start listening: {proc.stderr.read() if proc.stderr else ''}")
    return proc, out, int(re.match(r"http://127\.0\.0\.1:(\d+)/", first).group(1))


def test_forward_started_before_the_service_waits_and_then_connects(folder):
    port = free_port_guess()
    jobs = Jobs()
    # the job's server binds only once the test says so (the "go" file): Jupyter still starting
    job = jobs.submit("alice", f"cd {folder} && while [ ! -e go ]; do sleep 0.2; done; "
                               f"exec python3 -u -m http.server {port} --bind 127.0.0.1 > http.log 2>&1")
    proc = None
    client = None
    try:
        proc, out, lport = start_forward(job, port)  # right after sbatch: the job may not even run yet
        out.wait_for(rf"waiting for job {job} .*:{port}", 30)
        client = popen_as("alice", [PYTHON, "-c", ALICE_GET, str(lport), "hello.txt"])
        wait_agents("alice", job, 1, timeout=60)
        time.sleep(2)  # the held connection is asked for again meanwhile, and still nothing listens
        assert client.poll() is None, f"alice's connection ended before the service listened: {client.stdout.read()}"
        (folder / "go").touch()
        answer, _ = client.communicate(timeout=90)
        assert answer.startswith("200 hello from the job"), answer
        assert proc.poll() is None, "the forward exited"
    finally:
        if client is not None and client.poll() is None:
            stop(client)
        if proc is not None:
            stop(proc)
        jobs.cancel_all()


def test_forward_waiting_still_refuses_another_users_listener(folder):
    port = free_port_guess()
    jobs = Jobs()
    job = jobs.submit("alice", "sleep 300")
    proc = bob = None
    try:
        jobs.wait_running(job)
        wait_agents("alice", job, 1, timeout=60)
        proc, out, lport = start_forward(job, port)
        out.wait_for(rf"waiting for job {job} .*:{port}", 30)
        node = subprocess.run(["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True, text=True).stdout.strip()
        # bob takes the port alice waits for, on her job's node
        bob = on_node_popen(node, "bob", ["python3", "-u", "-m", "http.server", str(port), "--bind", "127.0.0.1"])
        bob_out = Lines(bob)
        bob_out.wait_for(r"Serving HTTP", 30)
        answer = subprocess.run(["runuser", "-l", "alice", "-c", shlex.join([PYTHON, "-c", ALICE_GET, str(lport),
                                                                            "alice-was-here"])],
                                capture_output=True, text=True, timeout=120).stdout
        assert answer.startswith("502 ") and "another user" in answer, answer
        assert proc.poll() is None, "the forward exited"
        stop(bob)
        logged = bob.stderr.read() if bob.stderr else ""
        assert "alice-was-here" not in logged, f"bob's server saw alice's request: {logged}"
        bob = None
    finally:
        if bob is not None:
            stop(bob)
        if proc is not None:
            stop(proc)
        jobs.cancel_all()
