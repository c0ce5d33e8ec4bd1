"""Output file name patterns: one expander, each scheduler's tokens as data (sbatch -o, bsub -o, qsub -o)."""

from __future__ import annotations

import pytest

from dxflow.schedulers import get_scheduler
from dxflow.schedulers.lsf import LSF
from dxflow.schedulers.pbs import PBS, Torque
from dxflow.schedulers.slurm import Slurm

SLURM = Slurm({})


@pytest.mark.parametrize("pattern,fields,expanded", [
    ("/o/slurm-%j.out", {"job": "77"}, "/o/slurm-77.out"),
    ("%u-%N-%8j-%%-%x-%A", {"job": "77", "user": "alice"}, "alice-%N-00000077-%-%x-%A"),  # unknown: left
    ("%x_%A_%a.out", {"job": "78", "name": "t", "array_job": "70", "array_task": "8"}, "t_70_8.out"),
    ("%A.out", {"job": "78", "array_job": ""}, "78.out"),      # known not to be an array: the job's own id
    ("%12j|%3N|%n|%t|%J", {"job": "5", "node": "n1"}, "0000000005|n1|0|0|5"),  # at most 10 digits; names unpadded
    ("out-%%-%j-%q-%b-%s", {"job": "3"}, "out-%-3-%q-%b-%s"),  # not Slurm's, or not expanded here: left
    ("a\\b-%j.out", {"job": "3"}, "ab-%j.out"),                # a backslash: taken literally (print_fields.c)
])
def test_slurm_tokens(pattern, fields, expanded):
    assert SLURM.expand_output(pattern, fields) == expanded


def test_lsf_tokens_and_array_ids():
    lsf = LSF({})
    assert lsf.expand_output("run.%J.%I.out", lsf.output_fields("1234[5]")) == "run.1234.5.out"
    assert lsf.expand_output("run.%J.%I.out", lsf.output_fields("1234")) == "run.1234.0.out"
    assert lsf.expand_output("run.%j.%4J", lsf.output_fields("1234")) == "run.%j.%4J"  # no others, no width


def test_pbs_array_index_and_torque_none():
    pbs = PBS({})
    assert pbs.expand_output("/o/run.^array_index^.out", pbs.output_fields("12[3].srv")) == "/o/run.3.out"
    assert pbs.expand_output("/o/run.^array_index^.out", pbs.output_fields("12.srv")) == "/o/run.^array_index^.out"
    assert pbs.expand_output("/o/run.%j", pbs.output_fields("12.srv")) == "/o/run.%j"
    assert Torque({}).expand_output("/o/run.^array_index^", {"array_task": "3"}) == "/o/run.^array_index^"


def test_a_path_is_a_pattern_only_with_the_schedulers_own_tokens():
    assert SLURM.output_is_pattern("/o/slurm-%5j.out") and SLURM.output_is_pattern("100%%.out")
    assert not SLURM.output_is_pattern("/o/100%.out") and not SLURM.output_is_pattern("/o/a\\%j")
    assert LSF({}).output_is_pattern("run.%I") and not LSF({}).output_is_pattern("run.%j")
    assert not get_scheduler("local").output_is_pattern("/o/%j")


def record(**kw):
    """A job as squeue --json shows it (22.05, trimmed)."""
    item = {"job_id": 161, "user_name": "alice", "job_state": "RUNNING", "nodes": "n[1-2]", "batch_host": "n2",
            "name": "train", "current_working_directory": "/home/alice", "array_job_id": 0, "array_task_id": None,
            "batch_flag": True, "standard_output": "", "standard_error": ""}
    item.update(kw)
    return item


def test_slurm_record_expands_with_what_squeue_says():
    info = SLURM._info(record(standard_output="/o/%x-%j-%N.out", standard_error="/o/%u.err"))
    assert (info.stdout, info.stderr) == ("/o/train-161-n2.out", "/o/alice.err")
    info = SLURM._info(record(job_id=172, array_job_id={"set": True, "number": 170},
                              array_task_id={"set": True, "number": 0}, standard_output="/o/%A_%a.out"))
    assert info.stdout == "/o/170_0.out"  # index 0 is an index (23.02+ shape)


def test_slurm_default_output_of_a_batch_job_and_of_an_array_element():
    assert SLURM._info(record()).stdout == "slurm-161.out"  # relative: the agent puts it in the work dir
    assert SLURM._info(record(job_id=172, array_job_id=170, array_task_id=2)).stdout == "slurm-170_2.out"
    assert SLURM._info(record(batch_flag=False)).stdout == ""  # salloc: no file


def test_agent_expands_what_its_node_knows_when_the_scheduler_cannot_tell(tmp_path):
    """The agent's best effort before the controller answers: the job id and the user, nothing else."""
    from dxflow.agent import logs
    from dxflow.agent.state import AgentState

    state = AgentState(user="alice", home=tmp_path, scheduler="lsf", cluster="c", job="1234[5]", node="n1",
                       key=None, public_key="", audience="", user_public_key=None, work_dir="/w",
                       stdout="run.%J.%I.out", stderr="", started=0.0)
    # no bjobs on this host: the lookup fails, the paths are what the node can expand (not cached)
    state.extra["log_lookup_retry"] = float("inf")  # do not even try: the controller is not asked here
    assert logs.job_output_paths(state) == {"stdout": "/w/run.1234.5.out", "stderr": "/w/run.1234.5.out"}
    assert "log_paths" not in state.extra
