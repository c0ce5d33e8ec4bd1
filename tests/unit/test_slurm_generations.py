"""The Slurm adapter reads every generation's real output the same way (issue #12).

The fixtures under tests/fixtures/slurm/<generation>/ were printed by a real Slurm of that generation
(``python -m dxflow.lab.capture``: two slurmd in a throwaway namespace, the same jobs submitted as
alice each time, so job ids agree across generations). ``files.txt`` lists the output files slurmstepd
actually made, so an output path dxflow computes is checked against Slurm itself, not against a guess.
"""

from __future__ import annotations

import json
import pwd
from pathlib import Path

import pytest

from dxflow.errors import SchedulerError
from dxflow.schedulers.base import JobInfo, JobState
from dxflow.schedulers.slurm import (TESTED_GENERATIONS, Slurm, generation_note, job_items, release)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "slurm"
GENERATIONS = sorted(p.name for p in FIXTURES.iterdir() if (p / "squeue.json").is_file())
SLURM = Slurm(environ={})


def load(gen: str, name: str) -> str:
    return (FIXTURES / gen / name).read_text()


def infos(gen: str) -> dict[str, JobInfo]:
    return {i.job: i for i in SLURM._infos(job_items(load(gen, "squeue.json")))}


def resolved(info: JobInfo, path: str) -> str:
    """Where the file is: a relative output path is under the job's working directory (as the agent reads it)."""
    return path if path.startswith("/") else f"{info.work_dir}/{path}"


def test_every_tested_generation_has_fixtures():
    assert GENERATIONS == sorted(TESTED_GENERATIONS)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_the_fixtures_were_printed_by_that_generation(gen):
    assert load(gen, "version.txt").split()[-1].startswith(gen + ".")
    assert release(json.loads(load(gen, "squeue.json"))).startswith(gen + ".")


@pytest.mark.parametrize("gen", GENERATIONS)
def test_output_paths_are_the_files_slurm_wrote(gen):
    """Every running job's stdout and stderr, as dxflow computes them, is a file slurmstepd made: %j %A %a
    %N %u %x, defaults (slurm-%j.out, slurm-%A_%a.out), an array, a heterogeneous job, %a outside an array."""
    files = set(load(gen, "files.txt").split())
    running = [i for i in infos(gen).values() if i.state is JobState.RUNNING]
    assert len(running) == 12
    for info in running:
        assert resolved(info, info.stdout) in files, (info.job, info.stdout)
        assert resolved(info, info.stderr) in files, (info.job, info.stderr)


@pytest.mark.parametrize("gen", GENERATIONS)
def test_json_agrees_with_the_plain_queries(gen):
    """squeue --json and the plain ``%A|%u|%T|%N`` lines slurm.py polls with say the same of each job."""
    by_json = infos(gen)
    lines = [line.split("|") for line in load(gen, "squeue-plain.txt").splitlines() if line]
    assert {job for job, *_ in lines} == set(by_json)
    for job, user, state, nodes in lines:
        info = by_json[job]
        assert (info.user, info.state, info.nodes) == (user, SLURM.map_state(state), SLURM.expand_nodes(nodes))


def test_every_generation_gives_the_same_jobs():
    """The same submissions read from 22.05, 24.11 and 26.05 give equal JobInfo (output paths resolved)."""
    def normal(gen: str) -> list[tuple]:
        return sorted((i.job, i.user, i.state, tuple(i.nodes), i.name, i.work_dir, resolved(i, i.stdout),
                       resolved(i, i.stderr)) for i in infos(gen).values())

    first = normal(GENERATIONS[0])
    for gen in GENERATIONS[1:]:
        assert normal(gen) == first, gen


@pytest.mark.parametrize("gen", GENERATIONS)
def test_the_jobs_read_are_the_jobs_submitted(gen):
    submitted = json.loads(load(gen, "jobs.json"))
    read = infos(gen)
    by_label = {label: read[info["job"]] for label, info in submitted.items()}
    assert by_label["pending"].state is JobState.PENDING and by_label["pending"].nodes == []
    assert by_label["multi_node"].nodes == ["node1", "node2"]
    assert by_label["running"].stdout == "/home/alice/out/run1-2-alice-node1.out"
    assert by_label["not_array_a"].stdout == "/home/alice/out/notarr-4-4294967294.out"
    assert read["10"].stdout == "/home/alice/out/het-9.out"  # the heterogeneous job's second component
    assert {i.name for i in read.values()} == {"held", "run1", "plain", "notarr", "arr", "arrdef", "tasks",
                                               "twonodes", "het"}


@pytest.mark.parametrize("gen", GENERATIONS)
def test_cancelled_jobs_read_as_ended_or_are_gone(gen):
    """Right after scancel, 22.05 still lists every job (CANCELLED); 24.11 and 26.05 list none (squeue
    leaves out ended jobs by default): both mean ENDED to dxflow."""
    ended = SLURM._infos(job_items(load(gen, "squeue-ended.json")))
    if gen == "22.05":
        assert {i.job for i in ended} == set(infos(gen)) and {i.state for i in ended} == {JobState.ENDED}
    else:
        assert ended == []


@pytest.mark.parametrize("gen", [g for g in GENERATIONS if (FIXTURES / g / "scontrol-job.json").is_file()])
def test_scontrol_json_gives_the_same_jobs_as_squeue(gen):
    """scontrol --json (23.02+; 22.05 has no --json: scontrol-job.error.txt) shares squeue's job shape."""
    from_scontrol = SLURM._infos(job_items(load(gen, "scontrol-job.json")))
    assert sorted(map(repr, from_scontrol)) == sorted(map(repr, infos(gen).values()))


@pytest.mark.parametrize("gen", GENERATIONS)
def test_squeue_json_filters_from_23_02_on(gen):
    """``squeue --json --jobs 2``: 22.05 lists every job anyway (so Slurm.job filters what it reads),
    24.11 and 26.05 only job 2."""
    one = {i.job for i in SLURM._infos(job_items(load(gen, "squeue-one.json")))}
    assert one == (set(infos(gen)) if gen == "22.05" else {"2"})


def test_22_05_scontrol_has_no_json():
    assert "unrecognized option '--json'" in load("22.05", "scontrol-job.error.txt")


def hook_envs(gen: str, kind: str) -> list[tuple[str, str, dict[str, str]]]:
    out = []
    for path in sorted((FIXTURES / gen / "hookenv").glob(f"{kind}.*.env")):
        _, job, node, _ = path.name.split(".")
        env = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
        out.append((job, node, env))
    return out


def alice_is_1001() -> bool:
    try:
        return pwd.getpwnam("alice").pw_uid == 1001
    except KeyError:
        return False


@pytest.mark.skipif(not alice_is_1001(), reason="the hook reads the job's user from this host's passwd: "
                    "needs the lab's alice (uid 1001)")
@pytest.mark.parametrize("kind", ["prolog", "epilog"])
@pytest.mark.parametrize("gen", GENERATIONS)
def test_hook_environment_of_each_generation(gen, kind):
    """The job as a prolog/epilog of that generation's slurmd sees it: its id, node, user, work dir and
    every node of the job (SLURM_JOB_NODELIST from 23.02, SLURM_NODELIST before)."""
    jobs = infos(gen)
    envs = hook_envs(gen, kind)
    assert len(envs) == 13  # one per running job and node: 12 jobs, the two-node one on both
    for job, node, env in envs:
        hook = Slurm(environ=env).hook_job()
        assert (hook.job, hook.node, hook.user, hook.uid, hook.cluster) == (job, node, "alice", 1001, "dxcap")
        assert hook.work_dir == "/home/alice"
        assert hook.nodes == jobs[job].nodes
        assert ("SLURM_JOB_NODELIST" in env) == (gen != "22.05")


def test_a_document_of_another_shape_is_refused_with_the_release():
    doc = {"meta": {"slurm": {"release": "27.11.0"}}, "jobs": {"1": {}}}
    with pytest.raises(SchedulerError, match=r"Slurm 27\.11\.0 .*shape dxflow does not know"):
        job_items(json.dumps(doc))
    with pytest.raises(SchedulerError, match="not JSON"):
        job_items("slurm_load_jobs error: Unable to contact slurm controller")


def test_doctor_says_whether_this_slurm_was_tested():
    assert generation_note("24.11.5") == "Slurm 24.11.5: a tested generation"
    assert "newer than any generation" in generation_note("27.05.1")
    assert "older than any generation" in generation_note("21.08.8")
    assert "between the generations" in generation_note("23.11.10")
    assert generation_note("") == ""
