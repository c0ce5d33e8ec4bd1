"""One site service, two clusters (issue #17, 4): the lab's Slurm ``dxlab`` and the PBS stand-in ``pbslab``.

alice has a Slurm job N on n1 and a PBS job ``N.pbslab`` on n2 — the same number on both clusters,
which pbslab hands out on purpose (dxflow/lab/pbslab.py). Through the site, ``dxflow ls`` shows both
with a CLUSTER column, ``CLUSTER/JOB`` reaches the one named, and a bare ``N`` is refused (exit 2)
naming both clusters rather than guessed.
"""

from __future__ import annotations

import pytest

from conftest import Jobs
from sitekit import site_dxflow, site_ls, site_up, wait_site_agents
from dxflow.lab import pbslab
from dxflow.lab.layout import Layout

USER = "alice"


@pytest.fixture(scope="module")
def two_jobs(lab):
    """(N, N.pbslab): alice's Slurm job N on n1, and her pbslab job of the same number on n2."""
    site_up()
    jobs = Jobs()
    pbs = pbslab.PbsLab(Layout())
    pbs_job = ""
    try:
        slurm_job = jobs.submit(USER, "sleep 600", "-w", "n1")
        jobs.wait_running(slurm_job, timeout=120)
        pbs_job = pbslab.start_job(pbs, slurm_job, USER, ["n2"])
        wait_site_agents(USER, slurm_job, {"n1"}, cluster="dxlab")
        wait_site_agents(USER, pbs_job, {"n2"}, cluster="pbslab")
        yield slurm_job, pbs_job
    finally:
        jobs.cancel_all()
        if pbs_job:
            pbslab.end_job(pbs, pbs_job)


def test_ls_shows_each_jobs_cluster(two_jobs):
    slurm_job, pbs_job = two_jobs
    mine = {(a["cluster"], a["job"], a["node"]) for a in site_ls(USER) if a["job"] in two_jobs}
    assert mine == {("dxlab", slurm_job, "n1"), ("pbslab", pbs_job, "n2")}
    table = site_dxflow(USER, "ls").stdout.splitlines()
    assert "CLUSTER" in table[0].split(), table[0]
    rows = {line.split()[table[0].split().index("CLUSTER")] for line in table[1:]
            if slurm_job in line.split() or pbs_job in line.split()}
    assert rows == {"dxlab", "pbslab"}, table


def test_cluster_slash_job_reaches_the_cluster_named(two_jobs):
    slurm_job, _ = two_jobs
    assert site_dxflow(USER, "exec", f"pbslab/{slurm_job}", "--", "hostname").stdout.strip() == "n2"
    assert site_dxflow(USER, "exec", f"dxlab/{slurm_job}", "--", "hostname").stdout.strip() == "n1"


def test_a_job_id_both_clusters_have_is_refused_naming_both(two_jobs):
    slurm_job, _ = two_jobs
    proc = site_dxflow(USER, "exec", slurm_job, "--", "hostname", check=False)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "dxlab" in proc.stderr and "pbslab" in proc.stderr, proc.stderr
    assert proc.stdout == ""  # nothing ran


def test_bob_sees_neither_of_alices_jobs(two_jobs):
    assert not [a for a in site_ls("bob") if a["job"] in two_jobs]
    proc = site_dxflow("bob", "exec", f"pbslab/{two_jobs[0]}", "--", "hostname", check=False)
    assert proc.returncode != 0 and proc.stdout == ""
