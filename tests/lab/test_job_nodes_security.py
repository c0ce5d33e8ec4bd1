"""bob asks for the nodes of alice's job (what ``JOB:all`` means: ``GET /api/jobs/JOB/nodes``, issue #15)
through his own master and through the site service, and learns nothing: he gets the very answer a
job that never existed gets (no node, no user), and ``dxflow exec ALICE_JOB:all`` refuses him as for a
job that never was. alice gets her job's two nodes both ways.
"""

from __future__ import annotations

import json
import re
import shlex
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import DXFLOW, Jobs, run, wait_agents, wait_for
from sitekit import site_up
from dxflow.lab import site

ALICE, BOB = "alice", "bob"
PYTHON = "/opt/dxflow/venv/bin/python"
#: a job id no scheduler of the lab has given
NEVER = "987653"
#: this module's own client config of the lab's site (both replicas), readable by every user
CONFIG = "/var/tmp/dxflow-test-job-nodes.toml"
#: the job's nodes as the CLI's one client asks for them (the master's, or the site's with CONFIG)
ASK = ("import json, sys; from dxflow.cli.service import service; "
       "print(json.dumps(service().ensure().job_nodes(sys.argv[1]), sort_keys=True))")


@pytest.fixture(scope="module")
def site_lab(lab):
    site_up()
    urls = ", ".join(f'"{r.url}"' for r in site.REPLICAS)
    Path(CONFIG).write_text(f'site = [{urls}]\nsite_keys = "/etc/dxflow/site"\n')
    Path(CONFIG).chmod(0o644)
    yield
    Path(CONFIG).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def job(lab):
    jobs = Jobs()
    try:
        job = jobs.submit(ALICE, "sleep 600", nodes=2)
        jobs.wait_running(job, timeout=120)
        wait_agents(ALICE, job, 2, timeout=90)
        yield job
    finally:
        jobs.cancel_all()


def as_user(user: str, argv: list[str], via_site: bool, **kw):
    env = f"DXFLOW_SITE_CONFIG={CONFIG} " if via_site else ""
    return run(["runuser", "-l", user, "-c", f"{env}exec {shlex.join(argv)}"], **kw)


def nodes_of(user: str, job: str, via_site: bool) -> dict:
    return json.loads(as_user(user, [PYTHON, "-c", ASK, job], via_site, timeout=90).stdout)


def alike(text: str) -> str:
    return re.sub(r"\b\d+\b", "N", text)


@pytest.mark.parametrize("via_site", [False, True], ids=["master", "site"])
def test_bob_gets_for_alices_job_nodes_what_a_job_that_never_was_gets(job, site_lab, via_site):
    # the master's answer may be older than the job's start while alice's other commands spend its query cap
    mine = wait_for(lambda: (lambda a: a if a["nodes"] else None)(nodes_of(ALICE, job, via_site)), 90, interval=3,
                    what="alice's job's nodes")
    assert (mine["state"], mine["nodes"], mine["node_set"]) == ("running", ["n1", "n2"], "n[1-2]")

    his, never = nodes_of(BOB, job, via_site), nodes_of(BOB, NEVER, via_site)
    assert (his["state"], his["nodes"], his["node_set"]) == ("ended", [], "")
    assert alike(json.dumps(his)) == alike(json.dumps(never))
    assert "alice" not in json.dumps(his) and "n1" not in json.dumps(his)

    argv = [DXFLOW, "exec", "--wait", "5", "{}:all", "--", "id"]
    with ThreadPoolExecutor(2) as both:   # at once: each waits its 5 s for an agent that never comes
        tried = list(both.map(lambda j: as_user(BOB, [a.format(j) for a in argv], via_site, check=False, timeout=90),
                              (job, NEVER)))
    assert [t.returncode for t in tried] == [5, 5], tried
    assert alike(tried[0].stderr) == alike(tried[1].stderr)
    assert "alice" not in tried[0].stdout + tried[0].stderr
