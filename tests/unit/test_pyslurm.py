"""pyslurm in the Slurm adapter: when it is used, when not and why; and, where it is really
installed and matches Slurm, that it lists the same jobs as ``squeue --json``."""

from __future__ import annotations

import pytest

from dxflow.schedulers import pyslurm_backend as pb
from dxflow.schedulers.slurm import Slurm


@pytest.fixture(autouse=True)
def fresh_cache():
    pb._cache.clear()
    yield
    pb._cache.clear()


def test_major_minor():
    assert pb.major_minor("22.05.8") == pb.major_minor("22.5.3") == (22, 5)
    assert pb.major_minor("slurm 24.11.1") == (24, 11)
    assert pb.major_minor("") is None


def test_not_installed(monkeypatch):
    monkeypatch.setattr(pb, "pyslurm_version", lambda: "")
    st = pb.status({})
    assert not st.usable and st.reason == "pyslurm is not installed"
    sched = Slurm({})
    assert sched.backend() == "squeue --json"
    assert "not installed" in sched.backend_why() and "JSON" in sched.backend_why()


def test_never_imported_without_a_slurm_conf(monkeypatch, tmp_path):
    """Importing pyslurm where no configuration exists ends the process: not even tried."""
    monkeypatch.setattr(pb, "pyslurm_version", lambda: "22.5.3")
    monkeypatch.setattr(pb, "CONF_PATHS", (str(tmp_path / "slurm.conf"),))

    def no_probe(*a, **k):
        raise AssertionError("must not start the probe without a slurm.conf")

    monkeypatch.setattr(pb.subprocess, "run", no_probe)
    st = pb.status({"SLURM_CONF": str(tmp_path / "missing.conf")})
    assert not st.usable and "no slurm.conf" in st.reason
    assert not pb.status({}).usable


def test_version_mismatch_refused(monkeypatch, tmp_path):
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\n")
    monkeypatch.setattr(pb, "pyslurm_version", lambda: "23.2.1")
    monkeypatch.setattr(pb, "slurm_version", lambda env: "22.05.8")
    st = pb.status({"SLURM_CONF": str(conf)})
    assert not st.usable and "23.2.1 does not match Slurm 22.05.8" in st.reason


def test_probe_failure_keeps_squeue(monkeypatch, tmp_path):
    """A pyslurm that exits its process (or fails) in the throwaway child is never imported here."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\n")
    monkeypatch.setattr(pb, "pyslurm_version", lambda: "22.5.3")
    monkeypatch.setattr(pb, "slurm_version", lambda env: "22.05.8")
    monkeypatch.setattr(pb, "PROBE", "import sys; print('fatal: Unable to process configuration file'); sys.exit(1)")
    st = pb.status({"SLURM_CONF": str(conf)})
    assert not st.usable and "exit 1" in st.reason and "Unable to process" in st.reason
    monkeypatch.setattr(pb, "PROBE", "print('22.5.3')")
    pb._cache.clear()
    st = pb.status({"SLURM_CONF": str(conf)})
    assert st.usable and "matches Slurm 22.05.8" in st.reason


def test_adapter_uses_pyslurm_rows_like_squeue_rows(monkeypatch):
    monkeypatch.setattr(pb, "status", lambda environ=None, probe=True: pb.Status(True, "test"))
    monkeypatch.setattr(pb, "load_jobs", lambda: [
        {"job_id": 7, "user_name": "alice", "job_state": "RUNNING", "nodes": "n[1-2]", "name": "w",
         "current_working_directory": "/home/alice", "standard_output": "/home/alice/slurm-7.out",
         "standard_error": ""},
        {"job_id": 8, "user_name": "bob", "job_state": "PENDING", "nodes": "", "name": "x",
         "current_working_directory": "", "standard_output": "", "standard_error": ""},
    ])
    jobs = [j for j in Slurm({}).jobs() if j.user == "alice"]  # one user's jobs are asked of squeue --user
    assert [(j.job, j.user, j.nodes, j.state.value) for j in jobs] == [("7", "alice", ["n1", "n2"], "running")]
    assert Slurm({}).backend() == "pyslurm"


def test_pyslurm_error_falls_back_to_squeue(monkeypatch):
    import dxflow.schedulers.slurm as slurm_mod

    monkeypatch.setattr(pb, "status", lambda environ=None, probe=True: pb.Status(True, "test"))

    def broken():
        raise RuntimeError("slurm_load_jobs: Unable to contact slurm controller")

    monkeypatch.setattr(pb, "load_jobs", broken)
    monkeypatch.setattr(slurm_mod, "run", lambda argv: '{"jobs": [{"job_id": 3, "user_name": "alice", '
                                                       '"job_state": "RUNNING", "nodes": "n1"}]}')
    assert [j.job for j in Slurm({}).jobs()] == ["3"]


def test_real_pyslurm_matches_squeue():
    """Runs where pyslurm is installed, matches Slurm and loads; skipped, with the reason, elsewhere."""
    st = pb.status()
    if not st.usable:
        pytest.skip(f"pyslurm not used on this host: {st.reason}")
    import shutil

    from dxflow.schedulers import base

    rows = {str(r["job_id"]): r for r in pb.load_jobs()}
    if shutil.which("squeue"):
        import json

        squeue = {str(j["job_id"]) for j in json.loads(base.run(["squeue", "--json"])).get("jobs", [])}
        assert len(squeue - set(rows)) <= 2  # a job or two may be submitted between the two calls
    for job in Slurm().jobs():
        assert job.job in rows and job.user
