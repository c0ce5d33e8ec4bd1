"""``JOB:all`` is every node of the job as Slurm lists it, not the agents registered so far (issue #15),
on a job of four nodes, as alice.

``dxflow exec JOB:all`` run right after ``sbatch`` (no waiting for the job or its agents first) reaches
all four nodes: it waits for the agents still starting. A node whose agent never registers (its
registration is made impossible: a folder stands where its record would be written, so the agent fails
to start there as when a node's prolog fails) is waited for, then reported as failed with the reason by
``exec`` (non-zero exit, the other three run), ``logs``, ``top``, ``info`` and a broadcast ``cp``; a node set
naming no node of the job is named against Slurm's list, the node without an agent included.
"""

from __future__ import annotations

import json
import os
import pwd
import time
from pathlib import Path

import pytest

from conftest import Jobs, dxflow, run, wait_agents

SIZE = 4
NODES = [f"n{i}" for i in range(1, SIZE + 1)]


@pytest.fixture
def four(lab):
    if len(lab.get("nodes", [])) < SIZE:
        pytest.skip(f"the lab has {len(lab.get('nodes', []))} nodes, fewer than {SIZE}: `dxflow lab up --nodes {SIZE}`")
    jobs = Jobs()
    yield jobs
    jobs.cancel_all()


def test_exec_all_right_after_sbatch_reaches_every_node_of_the_job(four):
    job = four.submit("alice", "sleep 300", nodes=SIZE)
    out = dxflow("alice", "exec", "--wait", "150", f"{job}:all", "--", "hostname", timeout=240)
    assert sorted(out.stdout.splitlines()) == [f"{n}: {n}" for n in NODES], out.stderr


def test_a_node_whose_agent_never_registers_is_reported_failed_and_the_others_run(four, lab):
    job = four.submit("alice", "sleep 300", "--hold", nodes=SIZE)
    fleet = Path(pwd.getpwnam("alice").pw_dir) / ".dxflow" / "fleet"
    blocker = fleet / f"{lab['cluster']}.{job}.n4.json"
    blocker.mkdir()  # the agent on n4 cannot put its record there: it never registers
    try:
        run(["scontrol", "release", job])
        wait_agents("alice", job, SIZE - 1, timeout=120)

        out = dxflow("alice", "exec", "--wait", "10", f"{job}:all", "--", "hostname", check=False, timeout=120)
        assert out.returncode == 255, out.stderr
        assert sorted(out.stdout.splitlines()) == [f"{n}: {n}" for n in NODES[:3]]
        assert "dxflow: waiting for agents on n4 (job" in out.stderr
        assert f"dxflow: job {job}: 1 of 4 nodes failed: n4: error: no agent registered within 10 s" in out.stderr

        records = [json.loads(line) for line in dxflow("alice", "exec", "--wait", "0", "--json", f"{job}:all", "--",
                                                       "true", check=False, timeout=120).stdout.splitlines()]
        assert sorted((r["node"], r["status"]) for r in records) == [("n1", "ok"), ("n2", "ok"), ("n3", "ok"),
                                                                      ("n4", "error")]

        logs = dxflow("alice", "logs", f"{job}:all", "--wait", "0", check=False, timeout=120)
        assert logs.returncode == 1 and "dxflow: n4: not read: no agent registered" in logs.stderr, logs.stderr

        top = [json.loads(line) for line in dxflow("alice", "top", job, "--json", timeout=120).stdout.splitlines()]
        assert {r["node"]: r["state"] for r in top}["n4"] == "no agent"
        assert sorted(r["node"] for r in top) == NODES

        src = Path("/home/alice") / f"dxtest-allnodes-{os.getpid()}-{int(time.time())}.txt"
        src.write_text("same on every node\n")
        os.chown(src, pwd.getpwnam("alice").pw_uid, pwd.getpwnam("alice").pw_gid)
        try:
            cp = dxflow("alice", "cp", str(src), f"{job}:all:/tmp/", check=False, timeout=180)
        finally:
            src.unlink()
        assert cp.returncode == 1, cp.stderr
        assert f"dxflow: job {job}: n4: not copied: no agent registered within 30 s" in cp.stderr

        info = dxflow("alice", "info", f"{job}:all", "--json", check=False, timeout=120)  # the default wait, 30 s
        assert info.returncode == 1
        assert {i["node"]: i.get("error") for i in json.loads(info.stdout)}["n4"] == "no agent registered within 30 s"

        bad = dxflow("alice", "exec", f"{job}:n[90-93]", "--", "true", check=False, timeout=60)
        assert bad.returncode == 5  # NotFound, as for every target naming what is not there
        assert bad.stderr.strip().endswith(f"job {job} runs on n[1-4]: n[90-93] is not one of its nodes")
    finally:
        blocker.rmdir()
        for tmp in fleet.glob(f".{lab['cluster']}.{job}.n4.*.tmp"):
            tmp.unlink()
