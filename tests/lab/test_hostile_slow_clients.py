"""Issue 8, item 6 on the lab: bob holds hundreds of half-sent requests against alice's servers and she is still served.

Bob opens 200 connections to alice's agent port on node n1 (from inside the node, where that port
is reachable by every user) and 200 to her master's console port on the login node, sends half a
request head on each and keeps them open. Alice's ``dxflow info`` and ``dxflow ls`` must still
answer. Before dxflow.edge.worker, 32 such connections held every thread of her agent.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import NETNS, dxflow, wait_agents
from dxflow.layout import UserLayout

ALICE_DXFLOW = Path(os.path.expanduser("~alice")) / ".dxflow"
CONNECTIONS = 200
ANSWER_TIMEOUT = 15.0  # seconds: alice's commands must answer at all, not fast

#: bob's script: open the connections, send half a head on each, say how many the server closed
#: (waiting up to 20 s), then hold them all open on his side
HOLD = """
import json, select, socket, sys, time
port, count = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(count):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(b"GET / HTTP/1.1\\r\\n")
    except OSError:
        pass
    held.append(s)
open_ = set(held)
answered = 0
deadline = time.monotonic() + 20
while open_ and time.monotonic() < deadline:
    for s in select.select(list(open_), [], [], 1)[0]:
        try:
            data = s.recv(1)
        except OSError:
            data = b""
        answered += bool(data)  # the server read bob's bytes and answered: it must not
        open_.discard(s)
print(json.dumps({"opened": len(held), "closed_by_server": len(held) - len(open_), "answered": answered}),
      flush=True)
time.sleep(120)
"""


def hold_connections(user: str, port: int, node: str | None = None) -> subprocess.Popen:
    """Bob's script, in the background, on the login node or inside a node's network namespace."""
    argv = ["runuser", "-l", user, "-c", shlex.join(["/usr/bin/python3", "-c", HOLD, str(port), str(CONNECTIONS)])]
    if node is not None:
        argv = ["nsenter", f"--net=/var/run/netns/{NETNS.format(node=node)}", *argv]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def report(proc: subprocess.Popen, what: str) -> dict:
    """The line bob's script prints once its connections are open."""
    line = proc.stdout.readline() if proc.stdout else ""
    assert line, f"bob's connections to {what} did not open: {proc.stderr.read() if proc.stderr else ''}"
    return json.loads(line)


@pytest.fixture
def attackers() -> Iterator[list[subprocess.Popen]]:
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(10)


def timed_dxflow(*args: str) -> float:
    started = time.monotonic()
    dxflow("alice", *args, timeout=ANSWER_TIMEOUT)  # raises unless it succeeded in time
    return time.monotonic() - started


def test_half_sent_requests_from_bob_do_not_starve_alices_agent_and_master(jobs, attackers):
    dxflow("alice", "master", "stop")  # the next command starts a master that runs this code
    job = jobs.submit("alice", "sleep 300", "--nodelist=n1")
    wait_agents("alice", job, 1)
    [registration] = (ALICE_DXFLOW / "fleet").glob(f"*.{job}.n1.json")
    agent_port = json.loads(registration.read_text())["port"]
    console_port = json.loads(UserLayout.of(ALICE_DXFLOW.parent).console_state.read_text())["port"]

    attackers.append(hold_connections("bob", agent_port, node="n1"))
    attackers.append(hold_connections("bob", console_port))
    on_agent, on_console = report(attackers[0], "the agent"), report(attackers[1], "the console")
    print(f"bob -> agent 127.0.0.1:{agent_port} on n1: {on_agent}; "
          f"bob -> console 127.0.0.1:{console_port}: {on_console}")
    assert on_agent["opened"] == on_console["opened"] == CONNECTIONS

    # bob's connections are held open on his side while alice works
    info = timed_dxflow("info", job)
    listing = timed_dxflow("ls")
    print(f"while held: `dxflow info {job}` answered in {info:.2f} s, `dxflow ls` in {listing:.2f} s")
    assert all(proc.poll() is None for proc in attackers), "bob's script ended before alice was done"
    # the servers closed bob's connections at accept, without a byte read
    assert on_agent["closed_by_server"] == on_console["closed_by_server"] == CONNECTIONS
    assert on_agent["answered"] == on_console["answered"] == 0
