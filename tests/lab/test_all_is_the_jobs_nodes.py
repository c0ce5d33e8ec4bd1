"""``JOB:all`` is every node of the job as Slurm lists it, not the agents registered so far (issue #15),
on a job of four nodes, as alice.

``dxflow exec JOB:all`` run right after ``sbatch`` (no waiting for the job or its agents first) reaches
all four nodes: it waits for the agents still starting. A node whose agent never registers (its
registration is made impossible: a folder stands where its record would be written, so the agent fails
to start there as when a node's prolog fails) is waited for, then reported as failed with the reason by
``exec`` (non-zero exit, the other three run), ``logs``, ``top``, ``info`` and a broadcast ``cp``; a node set
naming no node of the job is named against Slurm's list, the node without an agent included.

The job's nodes come first from the agents' registrations (each prolog gets the job's node list from
Slurm and hands it to its agent), so the node without an agent is counted even by a master whose
controller query cap is spent: a second login node (a UTS namespace of another host name, as in
test_login_nodes.py) runs alice's master with a cap of one question per 100 minutes, spent before the
job starts.
"""

from __future__ import annotations

import json
import os
import pwd
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import DXFLOW, Jobs, dxflow, popen_as, run, wait_agents, wait_for

SIZE = 4
NODES = [f"n{i}" for i in range(1, SIZE + 1)]


PYTHON = "/opt/dxflow/venv/bin/python"
HOME = Path(os.path.expanduser("~alice"))


@pytest.fixture
def four(lab):
    if len(lab.get("nodes", [])) < SIZE:
        pytest.skip(f"the lab has {len(lab.get('nodes', []))} nodes, fewer than {SIZE}: `dxflow lab up --nodes {SIZE}`")
    jobs = Jobs()
    yield jobs
    jobs.cancel_all()


@pytest.fixture
def blocked(four, lab) -> Iterator[tuple[str, Path]]:
    """A held job of four nodes whose agent on n4 can never register: a folder stands where its record
    would be written, so the agent fails to start there as when a node's prolog fails."""
    job = four.submit("alice", "sleep 300", "--hold", nodes=SIZE)
    fleet = HOME / ".dxflow" / "fleet"
    blocker = fleet / f"{lab['cluster']}.{job}.n4.json"
    blocker.mkdir()
    try:
        yield job, fleet
    finally:
        blocker.rmdir()
        for tmp in fleet.glob(f".{lab['cluster']}.{job}.n4.*.tmp"):
            tmp.unlink()


class CappedLogin:
    """A login node of its own host name (a UTS namespace sharing this one's network and /home) where
    alice's master runs with a controller query cap of one question per 100 minutes: spent by its
    first question, it stays spent for the test."""

    NAME = "dxlab-login-capped"

    def __init__(self) -> None:
        self.config = Path(f"/tmp/dxtest-capped-{os.getpid()}.toml")
        self.config.write_text("controller_queries_per_minute = 0.01\n")
        self.config.chmod(0o644)
        self.holder = subprocess.Popen(["unshare", "--uts", "sh", "-c", f"hostname {self.NAME} && exec sleep 3600"])
        wait_for(lambda: self.as_alice(["hostname"]).stdout.strip() == self.NAME, 10, what="the capped login node")

    def as_alice(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        command = shlex.join(["env", f"DXFLOW_SITE_CONFIG={self.config}", *argv])
        return run(["nsenter", f"--uts=/proc/{self.holder.pid}/ns/uts", "runuser", "-l", "alice", "-c", command],
                   **kw)

    def dxflow(self, *args: str, **kw) -> subprocess.CompletedProcess:
        return self.as_alice([DXFLOW, *args], **kw)

    def job_nodes(self, job: str) -> dict:
        """The master's ``/api/jobs/JOB/nodes`` answer, as the CLI asks it."""
        code = ("import json, sys\nfrom dxflow.master.client import MasterClient\n"
                "print(json.dumps(MasterClient().ensure().job_nodes(sys.argv[1])))")
        return json.loads(self.as_alice([PYTHON, "-c", code, job], timeout=60).stdout)

    def close(self) -> None:
        self.dxflow("master", "stop", check=False)
        self.holder.kill()
        self.holder.wait()
        self.config.unlink(missing_ok=True)
        shutil.rmtree(HOME / ".dxflow" / "hosts" / self.NAME, ignore_errors=True)


@pytest.fixture
def capped_login(lab) -> Iterator[CappedLogin]:
    login = CappedLogin()
    try:
        yield login
    finally:
        login.close()


def test_exec_all_right_after_sbatch_reaches_every_node_of_the_job(four):
    job = four.submit("alice", "sleep 300", nodes=SIZE)
    out = dxflow("alice", "exec", "--wait", "150", f"{job}:all", "--", "hostname", timeout=240)
    assert sorted(out.stdout.splitlines()) == [f"{n}: {n}" for n in NODES], out.stderr


def test_a_node_whose_agent_never_registers_is_reported_failed_and_the_others_run(blocked):
    """The commands that wait for n4's agent (exec --wait 10; top, cp and info with their default 30 s)
    run at once and share that wait; those told not to wait run meanwhile."""
    job, fleet = blocked
    run(["scontrol", "release", job])
    wait_agents("alice", job, SIZE - 1, timeout=120)

    src = HOME / f"dxtest-allnodes-{os.getpid()}-{int(time.time())}.txt"
    src.write_text("same on every node\n")
    os.chown(src, pwd.getpwnam("alice").pw_uid, pwd.getpwnam("alice").pw_gid)
    waiting = {name: popen_as("alice", [DXFLOW, *args]) for name, args in (
        ("exec", ["exec", "--wait", "10", f"{job}:all", "--", "hostname"]),
        ("top", ["top", job, "--json"]),
        ("cp", ["cp", str(src), f"{job}:all:/tmp/"]),
        ("info", ["info", f"{job}:all", "--json"]))}
    try:
        records = [json.loads(line) for line in dxflow("alice", "exec", "--wait", "0", "--json", f"{job}:all", "--",
                                                       "true", check=False, timeout=120).stdout.splitlines()]
        assert sorted((r["node"], r["status"]) for r in records) == [("n1", "ok"), ("n2", "ok"), ("n3", "ok"),
                                                                      ("n4", "error")]

        logs = dxflow("alice", "logs", f"{job}:all", "--wait", "0", check=False, timeout=120)
        assert logs.returncode == 1 and "dxflow: n4: not read: no agent registered" in logs.stderr, logs.stderr

        bad = dxflow("alice", "exec", f"{job}:n[90-93]", "--", "true", check=False, timeout=60)
        assert bad.returncode == 5  # NotFound, as for every target naming what is not there
        assert bad.stderr.strip().endswith(f"job {job} runs on n[1-4]: n[90-93] is not one of its nodes")

        done = {name: (proc.communicate(timeout=180), proc.returncode) for name, proc in waiting.items()}
    finally:
        for proc in waiting.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        src.unlink()

    (out, err), code = done["exec"]
    assert code == 255, err
    assert sorted(out.splitlines()) == [f"{n}: {n}" for n in NODES[:3]]
    assert "dxflow: waiting for agents on n4 (job" in err
    assert f"dxflow: job {job}: 1 of 4 nodes failed: n4: error: no agent registered within 10 s" in err

    (out, err), code = done["top"]
    top = [json.loads(line) for line in out.splitlines()]
    assert {r["node"]: r["state"] for r in top}["n4"] == "no agent", err
    assert sorted(r["node"] for r in top) == NODES

    (out, err), code = done["cp"]
    assert code == 1, err
    assert f"dxflow: job {job}: n4: not copied: no agent registered within 30 s" in err

    (out, err), code = done["info"]  # the default wait, 30 s
    assert code == 1, err
    assert {i["node"]: i.get("error") for i in json.loads(out)}["n4"] == "no agent registered within 30 s"


def test_all_counts_a_node_whose_agent_never_registers_when_the_controller_cannot_be_asked(blocked, capped_login):
    """With the master's query cap spent while the job was pending, only the agents' registrations know the
    job's nodes: JOB:all is still all four, n4 reported failed, not silently left out."""
    job, _ = blocked
    before = capped_login.job_nodes(job)  # starts the capped master; its one question is spent
    assert before["state"] in ("pending", "unknown"), before
    run(["scontrol", "release", job])
    wait_agents("alice", job, SIZE - 1, timeout=120)
    wait_for(lambda: len([a for a in json.loads(capped_login.dxflow("ls", "--json").stdout)
                          if a["job"] == job and a["state"] == "ready"]) == SIZE - 1,
             60, interval=0.5, what="the capped master's three ready agents")

    answer = capped_login.job_nodes(job)
    assert (answer["state"], answer["node_set"], answer["source"]) == ("running", "n[1-4]", "agents"), answer

    out = capped_login.dxflow("exec", "--wait", "0", f"{job}:all", "--", "hostname", check=False, timeout=120)
    assert out.returncode == 255, out.stderr
    assert sorted(out.stdout.splitlines()) == [f"{n}: {n}" for n in NODES[:3]]
    assert f"dxflow: job {job}: 1 of 4 nodes failed: n4: error: no agent registered" in out.stderr
    assert "could not say" not in out.stderr
