"""Bob takes the port of alice's dead agent: the master sends him nothing, alice's commands say "agent lost".
On both of the master's SSH transports: paramiko, and the user's OpenSSH (a ControlMaster, through whose
socket an agent's end and the ControlMaster's look alike: the tunnel is asked which it was).

Alice's agent is killed with SIGKILL (its registration file stays, as after an out-of-memory kill)
and bob binds the same port on that node's 127.0.0.1. Whatever alice runs next (info, exec, cp,
logs, shell, forward, the relay the web console uses) must fail with exit code 7 ("agent lost")
and bob's listener must receive zero bytes: no command, no token, not even an identity challenge.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import DXFLOW, NETNS, agents_of, as_user, dxflow, dxflow_json, on_node, wait_agents, wait_for
from dxflow.layout import UserLayout

SLEEP = "sleep 600"
ALICE = Path("/home/alice")
LOST = 7  # AgentUnreachable / AgentLost
#: bob's server: accepts on 127.0.0.1:PORT and writes the total of bytes received to a file after every read.
THIEF = """
import os, socket, sys, threading
port, count = int(sys.argv[1]), sys.argv[2]
with open(count + ".pid", "w") as f:
    f.write(str(os.getpid()))
total, lock = [0], threading.Lock()
def note(n):
    with lock:
        total[0] += n
        with open(count, "w") as f:
            f.write(str(total[0]))
note(0)
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", port))
s.listen(64)
print("listening", flush=True)
def serve(c):
    while True:
        data = c.recv(65536)
        if not data:
            return
        note(len(data))
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def registration(job: str, node: str) -> dict:
    return json.loads(Path(f"~alice/.dxflow/fleet/dxlab.{job}.{node}.json").expanduser().read_text())


def kill_agent(job: str, node: str) -> dict:
    """SIGKILL to the agent's process group (arbiter and worker): no epilog, no cleanup, the file stays."""
    reg = registration(job, node)
    pid = reg["pid"]
    assert os.getpgid(pid) == pid, "the agent's arbiter leads its own process group"
    os.killpg(pid, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             10, what="the agent's arbiter dead")
    assert Path(f"~alice/.dxflow/fleet/dxlab.{job}.{node}.json").expanduser().exists()
    return reg


def state(job: str, node: str) -> str:
    return next((a["state"] for a in agents_of("alice", job) if a["node"] == node), "absent")


class Thief:
    """Bob's listener on PORT inside NODE's network namespace, counting every byte it is sent."""

    def __init__(self, node: str, port: int) -> None:
        bob = pwd.getpwnam("bob")
        self.dir = Path(tempfile.mkdtemp(prefix="dxflow-thief-"))
        os.chown(self.dir, bob.pw_uid, bob.pw_gid)
        self.count = self.dir / "count"
        script = self.dir / "thief.py"
        script.write_text(THIEF)
        os.chmod(script, 0o644)
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/var/run/netns/{NETNS.format(node=node)}", "runuser", "-l", "bob", "-c",
             shlex.join(["/usr/bin/python3", str(script), str(port), str(self.count)])],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line == "listening", f"bob could not bind port {port}: {line} {self.proc.stderr.read() if self.proc.poll() is not None else ''}"

    def received(self) -> int:
        return int(self.count.read_text() or 0)

    def stop(self) -> None:
        pid = Path(f"{self.count}.pid")  # runuser -l starts it in a session of its own: killed by its pid
        for target in ([int(pid.read_text())] if pid.exists() else []):
            try:
                os.kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(autouse=True)
def fresh_master(lab):
    """Alice's master runs the code under test (a running master keeps the code it started with)."""
    dxflow("alice", "master", "stop", check=False)


@pytest.fixture(params=["paramiko", "openssh"])
def transport(request, fresh_master):
    """alice's own ``ssh_transport`` (~/.dxflow/config) for this test; removed after, her master stopped and
    her ControlMasters ended (a later master would take one that still answers)."""
    config = ALICE / ".dxflow" / "config"
    as_user("alice", ["sh", "-c", f"mkdir -p ~/.dxflow && echo 'ssh_transport = \"{request.param}\"' > ~/.dxflow/config"])
    yield request.param
    config.unlink(missing_ok=True)
    dxflow("alice", "master", "stop", check=False)
    for sock in ALICE.glob(".dxflow/hosts/*/ssh/*"):
        as_user("alice", ["ssh", "-S", str(sock), "-O", "exit", "n1"], check=False)


def test_bob_on_a_dead_agents_port_gets_no_byte_and_alice_is_told_agent_lost(jobs, transport):
    job = jobs.submit("alice", SLEEP, "--nodelist=n1")
    wait_agents("alice", job, 1, timeout=60)
    assert dxflow_json("alice", "master", "status")["tunnels"]["n1"]["transport"] == transport  # the control
    as_user("alice", ["sh", "-c", "echo secret > ~/dxflow-lost-file.txt"])
    assert dxflow("alice", "info", job).returncode == 0  # the control: the relay works
    reg = kill_agent(job, "n1")
    wait_for(lambda: state(job, "n1") == "lost", 15, what="the killed agent shown lost")
    thief = Thief("n1", reg["port"])
    try:
        commands = [
            ["info", job],
            ["exec", job, "--", "true"],
            ["cp", f"{job}:dxflow-lost-file.txt", "/tmp/dxflow-lost-copy.txt"],
            ["logs", job, "--lines", "1"],
            ["forward", job, "8888", "--local", "0"],
        ]
        for argv in commands:
            out = dxflow("alice", *argv, check=False, timeout=60)
            assert out.returncode == LOST, f"dxflow {' '.join(argv)}: exit {out.returncode}\n{out.stdout}{out.stderr}"
            assert "lost" in out.stderr + out.stdout, f"dxflow {' '.join(argv)}: {out.stderr}"
            assert thief.received() == 0, f"bob received bytes after dxflow {' '.join(argv)}"
        # the relay the web console uses (the same route, here on the master's socket)
        curl = as_user("alice", ["curl", "-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket",
                                 str(UserLayout.of("/home/alice").master_sock), f"http://master/api/fleet/{job}/-/api/node"],
                       check=False, timeout=60)
        body, _, code = curl.stdout.rpartition("\n")
        assert code == "502" and "agent lost" in body, curl.stdout
        assert thief.received() == 0, "bob received bytes after the console's relay request"
        # the shell (a WebSocket through the master)
        shell = subprocess.run(["runuser", "-l", "alice", "-c", shlex.join(["script", "-qec",
                                                                              shlex.join([DXFLOW, "shell", job]),
                                                                              "/dev/null"])],
                               capture_output=True, text=True, timeout=60)
        assert "lost" in shell.stdout + shell.stderr, shell
        assert shell.returncode == LOST, shell
        assert thief.received() == 0, "bob received bytes after dxflow shell"
        # the watcher keeps retrying the lost agent: still nothing for bob
        time.sleep(5)
        assert state(job, "n1") == "lost"
        assert thief.received() == 0, "bob received bytes from the master's own checks"
        detail = next(a["detail"] for a in agents_of("alice", job) if a["node"] == "n1")
        assert "held by another user's process" in detail, detail
        # the control: bob's counter does count what reaches him
        on_node("n1", "bob", ["/usr/bin/python3", "-c", "import socket,sys; "
                              "socket.create_connection(('127.0.0.1', int(sys.argv[1]))).sendall(b'abc')",
                              str(reg["port"])])
        wait_for(lambda: thief.received() == 3, 10, what="bob's own 3 bytes counted")
    finally:
        thief.stop()
        Path("/tmp/dxflow-lost-copy.txt").unlink(missing_ok=True)
        as_user("alice", ["rm", "-f", "/home/alice/dxflow-lost-file.txt"], check=False)


def test_a_killed_agent_is_shown_lost_and_its_jobs_other_agent_stays_ready(jobs):
    job = jobs.submit("alice", SLEEP, nodes=2)
    wait_agents("alice", job, 2, timeout=60)
    kill_agent(job, "n2")
    # seen through its heartbeat's end, in about a second; generous here (the machine is shared)
    wait_for(lambda: state(job, "n2") == "lost", 15, what="the killed agent on n2 shown lost")
    assert state(job, "n1") == "ready"
    time.sleep(3)
    assert state(job, "n1") == "ready" and state(job, "n2") == "lost"
    assert dxflow("alice", "info", f"{job}:n1").returncode == 0
    out = dxflow("alice", "info", f"{job}:n2", check=False)
    assert out.returncode == LOST and "lost" in out.stderr, out
