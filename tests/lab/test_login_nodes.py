"""Several login nodes sharing one home (issue #10 item 4).

A second login node is a UTS namespace with another host name (``unshare --uts``): same network,
same ``/home``, same kernel — so a Unix socket or a lock in the shared ``~/.dxflow`` would reach
the other "host"'s master, which is exactly what per-host files must prevent. A process kept in
that namespace holds it; each command enters it with ``nsenter --uts``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from conftest import DXFLOW, as_user, dxflow_json, popen_as, run, stop, wait_agents, wait_for

USER = "alice"
HOME = Path(os.path.expanduser(f"~{USER}"))
HERE = socket.gethostname()
PYTHON = "/opt/dxflow/venv/bin/python"
#: holds a lock as a master does (flock, for its lifetime): a master of the old layout, for the test.
HOLDER = ("import fcntl, os, sys, time\n"
          "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
          "fcntl.flock(fd, fcntl.LOCK_EX)\n"
          "print('held', flush=True)\n"
          "time.sleep(120)\n")


class LoginNode:
    """A login node of its own host name, sharing this one's network and /home."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.holder = subprocess.Popen(["unshare", "--uts", "sh", "-c", f"hostname {name} && exec sleep 3600"])
        wait_for(lambda: self.run(["hostname"]).stdout.strip() == name, 10, what=f"the UTS namespace of {name}")

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return run(["nsenter", f"--uts=/proc/{self.holder.pid}/ns/uts", *argv], **kw)

    def dxflow(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.run(["runuser", "-l", USER, "-c", " ".join([DXFLOW, *args])], **kw)

    def dxflow_json(self, *args: str, **kw):
        return json.loads(self.dxflow(*args, "--json", **kw).stdout)

    def close(self) -> None:
        self.dxflow("master", "stop", check=False)
        self.holder.kill()
        self.holder.wait()
        shutil.rmtree(HOME / ".dxflow" / "hosts" / self.name, ignore_errors=True)


@pytest.fixture
def login2(lab) -> Iterator[LoginNode]:
    node = LoginNode("dxlab-login2")
    try:
        yield node
    finally:
        node.close()


@pytest.fixture
def login3(lab) -> Iterator[LoginNode]:
    node = LoginNode("dxlab-login3")
    try:
        yield node
    finally:
        node.close()


def master_pid_here() -> int:
    status = dxflow_json(USER, "master", "status")
    assert status["running"] and status["host"] == HERE, status
    return int(status["pid"])


def test_two_login_nodes_run_a_master_each_and_stop_only_their_own(jobs, login2, login3):
    job = jobs.submit(USER, "sleep 300")
    wait_agents(USER, job, 1)  # this host's master sees the job
    here = master_pid_here()

    # login2: a master of its own, in its own folder, that sees the same job
    wait_for(lambda: [a for a in login2.dxflow_json("ls") if a["job"] == job and a["state"] == "ready"], 60,
             interval=0.5, what=f"job {job} on login2's master")
    there = login2.dxflow_json("master", "status")
    assert there["running"] and there["host"] == login2.name and int(there["pid"]) != here
    folder = HOME / ".dxflow" / "hosts" / login2.name
    assert (folder / "master.sock").exists() and (folder / "fleet.db").exists()
    assert master_pid_here() == here  # both run at once

    # `master stop` on a login node without a master signals nobody, on any host
    stopped = login3.dxflow_json("master", "stop")
    assert stopped == {"running": False, "host": login3.name, "stopped": False}
    assert login2.dxflow_json("master", "status")["pid"] == there["pid"] and master_pid_here() == here

    # `master stop` on login2 stops login2's master only
    assert login2.dxflow_json("master", "stop")["stopped"] is True
    assert login2.dxflow("master", "status", check=False).returncode == 3  # none runs there now
    assert master_pid_here() == here
    assert [a for a in dxflow_json(USER, "ls") if a["job"] == job][0]["state"] == "ready"


def test_console_lines_name_the_login_node_the_console_runs_on(lab, login2):
    mine, theirs = dxflow_json(USER, "console"), login2.dxflow_json("console")
    assert theirs["login_host"] == login2.name and theirs["ssh"].endswith(f"{USER}@{login2.name}")
    assert theirs["socket"] == str(HOME / ".dxflow" / "hosts" / login2.name / "console.sock")
    assert mine["socket"] == str(HOME / ".dxflow" / "hosts" / HERE / "console.sock")
    assert mine["login_host"].split(".")[0] == HERE and theirs["ssh_tcp"].endswith(f"@{login2.name}")
    assert mine["port"] != theirs["port"]  # one network here: each console listens on a port of its own
    for link in (mine, theirs):
        assert f"{link['port']}:{link['socket']}" in link["ssh"]


def test_a_master_of_the_old_layout_is_stopped_from_its_own_host_only(lab, login2):
    """An older dxflow's master holds ~/.dxflow/master.lock on this host: `master stop` on login2
    leaves it alone and says where to stop it; this host's client stops it and clears its files."""
    legacy = HOME / ".dxflow" / "master.lock"
    old = popen_as(USER, [PYTHON, "-c", HOLDER, str(legacy)])
    try:
        assert old.stdout is not None and old.stdout.readline().strip() == "held"
        out = login2.dxflow("master", "stop")
        assert "not running on " + login2.name in out.stdout and "another login node" in out.stderr
        assert old.poll() is None
        stopped = as_user(USER, [PYTHON, "-c", "from dxflow.master.client import MasterClient; "
                                 "print(MasterClient().stop_legacy(timeout=5))"]).stdout.strip()
        assert stopped == "True"
        assert old.wait(10) is not None and not legacy.exists()
    finally:
        stop(old)
        legacy.unlink(missing_ok=True)
