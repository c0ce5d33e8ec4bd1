"""bob attacks alice's `dxflow forward` on the shared login node, and gets nothing.

alice's job serves ``python3 -m http.server`` on n1; alice forwards it to the login node.
A forward's 127.0.0.1 port is reachable by every user there: bob connects and sends a
request, and must get zero bytes back while the job's server logs no request from him.
With ``--unix`` bob cannot even open the socket, and were it opened to him by mistake,
the peer check would still refuse him. alice's own requests work all along.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import DXFLOW, Jobs, Lines, as_user, popen_as, stop, uid, wait_agents, wait_for

PYTHON = "/opt/dxflow/venv/bin/python"
REQUEST_LINE = re.compile(r'"[A-Z]+ \S* HTTP/1\.[01]"')  # http.server's log: 127.0.0.1 - - [..] "GET / HTTP/1.1" 200 -

# bob: connect, send a request, read until the end; print how many bytes came back and how it ended
BOB_TCP = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=20)
    got, end = b"", "eof"
    try:
        s.sendall(b"GET /bob-was-here HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n")
        while True:
            data = s.recv(65536)
            if not data:
                break
            got += data
    except OSError as e:
        end = type(e).__name__
    print(len(got), end)
""")

BOB_UNIX = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(20)
    try:
        s.connect(sys.argv[1])
    except OSError as e:
        print(0, "connect:" + type(e).__name__)
        raise SystemExit
    got, end = b"", "eof"
    try:
        s.sendall(b"GET /bob-was-here HTTP/1.1\\r\\nHost: localhost\\r\\n\\r\\n")
        while True:
            data = s.recv(65536)
            if not data:
                break
            got += data
    except OSError as e:
        end = type(e).__name__
    print(len(got), end)
""")

ALICE_TCP = textwrap.dedent("""
    import sys, urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/?alice-tcp", timeout=20) as r:
        print(r.status)
""")

ALICE_UNIX = textwrap.dedent("""
    import http.client, socket, sys

    class UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.settimeout(20)
            self.sock.connect(sys.argv[1])

    c = UnixConnection("localhost", timeout=20)
    c.request("GET", "/?alice-unix")
    r = c.getresponse()
    r.read()
    print(r.status)
""")


@pytest.fixture(scope="module")
def job(lab):
    """alice's one-node job serving its folder with http.server on a free port, its log in that folder."""
    pw = pwd.getpwnam("alice")
    jobs = Jobs()
    d = Path(pw.pw_dir) / f"dxtest-forward-{os.getpid()}-{int(time.time())}"
    d.mkdir()
    os.chown(d, pw.pw_uid, pw.pw_gid)
    log = d / "http.log"
    try:
        job_id = jobs.submit("alice", f"cd {d} && exec python3 -u -m http.server 0 --bind 127.0.0.1 > {log} 2>&1")
        jobs.wait_running(job_id)
        wait_agents("alice", job_id, 1)
        line = wait_for(lambda: re.search(r"port (\d+)", log.read_text()) if log.exists() else None, 30,
                        what="http.server listening in alice's job")
        yield {"id": job_id, "port": int(line.group(1)), "log": log}
    finally:
        jobs.cancel_all()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def requests_logged(job: dict) -> list[str]:
    return [line for line in job["log"].read_text().splitlines() if REQUEST_LINE.search(line)]


def start_forward(job: dict, *options: str) -> tuple[subprocess.Popen, Lines, str]:
    """alice's ``dxflow forward`` in the background, its output, and its first line (where it listens)."""
    proc = popen_as("alice", [DXFLOW, "forward", job["id"], str(job["port"]), *options])
    out = Lines(proc)
    try:
        first = out.wait_for(r" -> ", 30)
    except AssertionError:
        stop(proc)
        raise AssertionError(f"dxflow forward did not start: {proc.stderr.read() if proc.stderr else ''}")
    return proc, out, first


def stderr_of(proc: subprocess.Popen) -> str:
    stop(proc)
    return proc.stderr.read() if proc.stderr else ""


@pytest.mark.parametrize("mode", [[], ["--http"]], ids=["tcp", "http"])
def test_bob_gets_nothing_from_alices_forwarded_port(job, mode):
    proc, _out, first = start_forward(job, "--local", "0", *mode)
    try:
        lport = re.match(r"http://127\.0\.0\.1:(\d+)/", first).group(1)
        before = requests_logged(job)
        bob = as_user("bob", [PYTHON, "-c", BOB_TCP, lport], timeout=60)
        nbytes, end = bob.stdout.split()
        assert nbytes == "0", f"bob got {nbytes} bytes from alice's forward ({end})"
        # alice's request after bob's: once it is logged, bob's would have been too
        assert as_user("alice", [PYTHON, "-c", ALICE_TCP, lport], timeout=60).stdout.strip() == "200"
        wait_for(lambda: len(requests_logged(job)) > len(before), 20, what="alice's request in the job's log")
        after = requests_logged(job)
        assert not any("bob-was-here" in line for line in after)
        assert len(after) == len(before) + 1 and "alice-tcp" in after[-1]
    finally:
        err = stderr_of(proc)
    assert f"refused a connection from uid {uid('bob')} (bob)" in err


def kill_forward(job: dict) -> None:
    """SIGKILL alice's forwards of the job's port (runuser -c starts them in a session of their own)."""
    pattern = f"dxflow forward {job['id']} {job['port']} "
    for pid in subprocess.run(["pgrep", "-u", "alice", "-f", pattern], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGKILL)
    wait_for(lambda: subprocess.run(["pgrep", "-u", "alice", "-f", pattern]).returncode == 1, 10,
             what="the killed forward gone")


def unix_path(first: str) -> Path:
    return Path(first.split(" -> ", 1)[0])


def test_bob_cannot_open_alices_unix_forward_and_is_refused_even_if_he_could(job):
    proc, _out, first = start_forward(job, "--unix")
    try:
        path = unix_path(first)
        alice = pwd.getpwnam("alice")
        assert path.parent == Path(alice.pw_dir) / ".dxflow" / "forward"
        st, folder = path.lstat(), path.parent.lstat()
        assert stat.S_ISSOCK(st.st_mode) and st.st_uid == alice.pw_uid and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(folder.st_mode) == 0o700
        before = requests_logged(job)

        bob = as_user("bob", [PYTHON, "-c", BOB_UNIX, str(path)], timeout=60)
        assert bob.stdout.split() == ["0", "connect:PermissionError"]

        # a mistake opens the socket to everyone, and it shows up where bob can reach it
        reachable = Path(tempfile.mkdtemp(prefix="dxtest-forward-link-"))
        os.chmod(reachable, 0o755)
        os.link(path, reachable / "alice.sock")
        os.chmod(path, 0o666)
        try:
            bob = as_user("bob", [PYTHON, "-c", BOB_UNIX, str(reachable / "alice.sock")], timeout=60)
        finally:
            os.chmod(path, 0o600)
            shutil.rmtree(reachable)
        nbytes, end = bob.stdout.split()
        assert nbytes == "0" and not end.startswith("connect:"), f"bob: {bob.stdout} {bob.stderr}"

        assert as_user("alice", [PYTHON, "-c", ALICE_UNIX, str(path)], timeout=60).stdout.strip() == "200"
        wait_for(lambda: len(requests_logged(job)) > len(before), 20, what="alice's request in the job's log")
        after = requests_logged(job)
        assert not any("bob-was-here" in line for line in after)
        assert len(after) == len(before) + 1 and "alice-unix" in after[-1]
    finally:
        err = stderr_of(proc)
    assert f"refused a connection from uid {uid('bob')} (bob)" in err
    assert not path.exists(), "the forward left its socket behind"


def test_unix_forward_prints_the_ssh_line_replaces_a_stale_socket_and_refuses_a_live_one(job):
    proc, out, first = start_forward(job, "--unix", "--local", "8888")
    path = unix_path(first)
    try:
        ssh = out.wait_for(r"ssh ", 10)
        assert re.search(rf"ssh -N -L 8888:{re.escape(str(path))} alice@\S+$", ssh.strip()), ssh
        kill_forward(job)  # no chance to clean up: its socket file stays, stale
        proc.wait(10)
        assert stat.S_ISSOCK(path.lstat().st_mode)
        proc, out, first = start_forward(job, "--unix", "--local", "8888")
        assert unix_path(first) == path
        second = as_user("alice", [DXFLOW, "forward", job["id"], str(job["port"]), "--unix"], check=False,
                         timeout=60)
        assert second.returncode != 0 and "another `dxflow forward` listens on" in second.stderr
        assert as_user("alice", [PYTHON, "-c", ALICE_UNIX, str(path)], timeout=60).stdout.strip() == "200"
    finally:
        stop(proc)
