"""The fleet's state is the truth within seconds (issue #9, item 4).

A SIGKILLed agent of a 2-node job shows ``lost`` for its node only, at once, and its last
numbers are no longer reported as fresh (``metrics_fresh`` false, ``metrics_age`` says how
old they are) while the other node's are current. A job that ends shows ``gone``.
The issue asks for 3 s: the waits below are generous (shared machine), the time taken is printed.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from conftest import Jobs, agent_pids, agents_of, dxflow_json, wait_agents, wait_for

USER = "alice"


def by_node(job: str, *extra: str) -> dict[str, dict]:
    return {a["node"]: a for a in dxflow_json(USER, "ls", *extra) if a["job"] == job}


def agent_pids_on(job: str, node: str) -> list[int]:
    """The processes of the job's agent on NODE (gunicorn's arbiter, whose pid is registered, and its worker)."""
    found = []
    for pid in agent_pids(job):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--node" in argv and argv[argv.index(b"--node") + 1] == node.encode():
            found.append(pid)
    assert found, f"no agent process of job {job} on {node}"
    return found


@pytest.fixture
def two_node_job(lab):
    jobs = Jobs()
    job = jobs.submit(USER, "sleep 600", nodes=2)
    try:
        jobs.wait_running(job)
        wait_agents(USER, job, 2, timeout=60)
        yield jobs, job
    finally:
        jobs.cancel_all()


def test_sigkilled_agent_is_lost_alone_and_its_numbers_are_not_fresh(two_node_job):
    _jobs, job = two_node_job
    agents = by_node(job)
    assert sorted(agents) == ["n1", "n2"]
    for a in agents.values():  # `ls` refreshes what is older than 5 s: both nodes' numbers are current
        assert a["state"] == "ready" and a["metrics_fresh"] is True and a["metrics_age"] <= 5.0, a
    for pid in agent_pids_on(job, "n2"):  # the agent, all of it (as the OOM killer of its cgroup would)
        os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    agents = wait_for(lambda: (lambda ag: ag if ag["n2"]["state"] == "lost" else None)(by_node(job)), 15,
                      interval=0.1, what="n2's agent lost")
    print(f"lost after {time.monotonic() - t0:.1f} s")
    assert agents["n1"]["state"] == "ready" and agents["n1"]["metrics_fresh"] is True
    lost = agents["n2"]
    assert lost["metrics_fresh"] is False  # its last load and memory are not the node's present
    assert lost["metrics_age"] is not None and lost["metrics_age"] >= 0
    time.sleep(6)  # older than 5 s now: still shown with their true age, never as current
    lost = by_node(job)["n2"]
    assert lost["state"] == "lost" and lost["metrics_fresh"] is False and lost["metrics_age"] > 5.0, lost
    assert by_node(job)["n1"]["metrics_fresh"] is True


def test_ended_job_shows_gone(two_node_job):
    jobs, job = two_node_job
    jobs.cancel_all()
    t0 = time.monotonic()
    agents = wait_for(lambda: (lambda ag: ag if ag and all(a["state"] == "gone" for a in ag.values()) else None)(
        by_node(job, "--all")), 20, interval=0.2, what="the ended job's agents gone")
    print(f"gone after {time.monotonic() - t0:.1f} s")
    assert sorted(agents) == ["n1", "n2"]
    assert all(a["metrics_fresh"] is False for a in agents.values())
    assert agents_of(USER, job) == []  # gone agents are left out without --all
