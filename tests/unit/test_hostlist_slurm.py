import pytest

from dxflow.errors import UsageError
from dxflow.schedulers import JobState, get_scheduler
from dxflow.schedulers.hostlist import expand_hostlist
from dxflow.schedulers.slurm import Slurm


@pytest.mark.parametrize("text,hosts", [
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("n[1-2,5],gpu[08-10]", ["n1", "n2", "n5", "gpu08", "gpu09", "gpu10"]),
    ("a,b", ["a", "b"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
])
def test_expand_hostlist(text, hosts):
    assert expand_hostlist(text) == hosts


@pytest.mark.parametrize("bad", ["n[1-", "n]1[", "n[a-b]"])
def test_expand_hostlist_refuses_garbage(bad):
    with pytest.raises(UsageError):
        expand_hostlist(bad)


def test_squeue_json_both_shapes(monkeypatch):
    slurm = get_scheduler("slurm")
    old = {"job_id": 7, "user_name": "alice", "job_state": "RUNNING", "nodes": "n[1-2]", "name": "wrap",
           "current_working_directory": "/home/alice", "standard_output": "/home/alice/slurm-%j.out"}
    new = dict(old, job_id=8, job_state=["COMPLETING"], standard_output="/tmp/%x-%5j.out")
    other = dict(old, job_id=9, user_name="bob")
    import json
    monkeypatch.setattr("dxflow.schedulers.slurm.run", lambda argv: json.dumps({"jobs": [old, new, other]}))
    jobs = slurm.jobs()
    assert [j.job for j in jobs] == ["7", "8", "9"]
    assert jobs[0].state is JobState.RUNNING and jobs[0].nodes == ["n1", "n2"]
    assert jobs[0].stdout == "/home/alice/slurm-7.out"
    assert jobs[1].state is JobState.ENDING and jobs[1].stdout == "/tmp/wrap-00008.out"
    assert slurm.job("9").user == "bob"  # 22.05 ignores --jobs with --json: filtered here
    assert slurm.job("404") is None


def test_expand_pattern_keeps_unknown_and_percent():
    assert Slurm({}).expand_output("out-%%-%j-%q", {"job": "3"}) == "out-%-3-%q"


def test_hook_job_from_slurm_env():
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_USER": "root", "SLURM_JOB_UID": "0", "SLURM_JOB_GID": "0",
           "SLURMD_NODENAME": "n1", "SLURM_NODELIST": "n[1-2]", "SLURM_CLUSTER_NAME": "lab",
           "SLURM_JOB_STDOUT": "/tmp/x-%j.out"}
    job = get_scheduler("slurm", env).hook_job()
    assert (job.job, job.node, job.user, job.uid, job.nodes, job.cluster) == ("42", "n1", "root", 0, ["n1", "n2"], "lab")


@pytest.mark.parametrize("field,value", [
    ("SLURM_JOB_ID", "42; rm -rf /"), ("SLURM_JOB_ID", "../../etc"), ("SLURMD_NODENAME", "n1\nx"),
    ("SLURM_JOB_USER", "no-such-user-xyz"), ("SLURM_JOB_UID", "1"), ("SLURM_CLUSTER_NAME", "a/b"),
])
def test_hook_job_refuses_hostile_values(field, value):
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_USER": "root", "SLURM_JOB_UID": "0", "SLURMD_NODENAME": "n1"}
    env[field] = value
    with pytest.raises(UsageError):
        get_scheduler("slurm", env).hook_job()
