"""Issue #10 item 6 on the lab: dxflow upgraded while masters and agents of the old release run.

"The old release" is a copy of this checkout whose version (and, for the agent, agent API) is
lowered, put first on PYTHONPATH: a real master and a real agent of another release, started as
alice. Each test gives alice a home of its own (HOME=a temporary folder of hers), so that its
masters and registrations never meet those of the other tests running on the lab.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import DXFLOW, NETNS, run, wait_for

import dxflow

ALICE = pwd.getpwnam("alice")
PYTHON = "/opt/dxflow/venv/bin/python"


def node_of(job: str) -> str:
    """The node a one-node job runs on (whichever was free: other tests share the lab)."""
    return run(["squeue", "-h", "-j", job, "-o", "%N"]).stdout.strip()


def alice(home: Path, *argv: str, old: Path | None = None, check: bool = True,
          timeout: float = 60) -> subprocess.CompletedProcess:
    """argv as alice with HOME=home; with ``old``, the old release first on PYTHONPATH."""
    env = [f"HOME={home}", "PATH=/usr/local/bin:/usr/bin:/bin"] + ([f"PYTHONPATH={old}"] if old else [])
    return run(["runuser", "-u", "alice", "--", "env", "-i", *env, *argv], check=check, timeout=timeout)


@pytest.fixture
def home(lab) -> Iterator[Path]:
    """A home of alice's own for one test; its master stopped and the folder removed after."""
    path = Path(tempfile.mkdtemp(prefix="dxflow-upgrade-"))
    os.chown(path, ALICE.pw_uid, ALICE.pw_gid)
    path.chmod(0o755)  # alice's agent on a node and her master both reach it
    yield path
    alice(path, DXFLOW, "master", "stop", check=False)
    shutil.rmtree(path, ignore_errors=True)


def old_release(version: str, api: int) -> Path:
    """A copy of this checkout's dxflow package as release ``version`` speaking agent API ``api``."""
    folder = Path(tempfile.mkdtemp(prefix="dxflow-old-"))
    folder.chmod(0o755)
    shutil.copytree(Path(dxflow.__file__).parent, folder / "dxflow", ignore=shutil.ignore_patterns("__pycache__"))
    init = folder / "dxflow" / "__init__.py"
    text = re.sub(r'__version__ = "[^"]*"', f'__version__ = "{version}"', init.read_text())
    init.write_text(re.sub(r"API_VERSION = \d+", f"API_VERSION = {api}", text))
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


@pytest.fixture
def old() -> Iterator[Path]:
    folder = old_release("0.0.1", dxflow.API_VERSION)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def old_api() -> Iterator[Path]:
    folder = old_release("0.0.1", dxflow.API_VERSION - 1)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def status(home: Path) -> dict:
    return json.loads(alice(home, DXFLOW, "master", "status", "--json", check=False).stdout)


def test_a_master_older_than_the_command_is_restarted_once_by_commands_run_together(home, old):
    alice(home, DXFLOW, "master", "start", old=old)
    before = status(home)
    assert before["running"] and before["version"] == "0.0.1"
    # two commands of the new release at once: each sees the old master; it is restarted once
    procs = [subprocess.Popen(["runuser", "-u", "alice", "--", "env", "-i", f"HOME={home}",
                               "PATH=/usr/local/bin:/usr/bin:/bin", DXFLOW, "ls", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=90) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all(json.loads(out) == [] for out, _err in outs)
    assert sum("restarting it" in err for _out, err in outs) == 1, [err for _out, err in outs]
    after = status(home)
    assert after["running"] and after["version"] == dxflow.__version__ and after["pid"] != before["pid"]
    # a master of the same release is left alone
    alice(home, DXFLOW, "ls")
    assert status(home)["pid"] == after["pid"]


def test_a_master_newer_than_the_command_is_left_running(home, old):
    alice(home, DXFLOW, "master", "start")
    pid = status(home)["pid"]
    alice(home, DXFLOW, "ls", old=old)  # an old command must not stop a newer master
    assert status(home)["pid"] == pid


def test_an_agent_of_another_agent_api_shows_as_incompatible_not_lost(home, old_api, jobs):
    job = jobs.submit("alice", "sleep 300")
    jobs.wait_running(job, timeout=120)
    node = node_of(job)
    # the old release's agent for this job, started by hand on n1 as its prolog would (alice, detached)
    agent = subprocess.Popen(
        ["nsenter", f"--net=/var/run/netns/{NETNS.format(node=node)}", "runuser", "-u", "alice", "--", "env", "-i",
         f"HOME={home}", "PATH=/usr/bin:/bin", f"PYTHONPATH={old_api}", PYTHON, "-m", "dxflow.agent",
         "--scheduler", "slurm", "--cluster", "dxlab", "--job", job, "--node", node],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        cwd="/")  # `python -m` puts the working folder first: a checkout there would shadow the old release
    try:
        reg = home / ".dxflow" / "fleet" / f"dxlab.{job}.{node}.json"
        wait_for(reg.exists, 60, what="the old agent's registration")
        assert json.loads(reg.read_text())["api_version"] == dxflow.API_VERSION - 1

        def listed():
            rows = [a for a in json.loads(alice(home, DXFLOW, "ls", "--json").stdout) if a["job"] == job]
            return rows if rows and rows[0]["state"] != "starting" else None
        rows = wait_for(listed, 60, interval=1, what="the agent checked")
        assert [r["state"] for r in rows] == ["incompatible"], rows
        assert f"agent API {dxflow.API_VERSION - 1}" in rows[0]["detail"] and "0.0.1" in rows[0]["detail"]
        refused = alice(home, DXFLOW, "exec", job, "--", "true", check=False)
        assert refused.returncode != 0 and "incompatible" in refused.stderr, refused.stderr
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(15)
