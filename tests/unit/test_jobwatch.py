"""The agent's job watch (issue #11): looks at its node first, asks slurmctld only where a look cannot
tell, filtered to its one job, jittered, within the process's cap. Slurm's local signs are read from a
spool folder laid out as slurmd lays it out (real unix sockets); the scheduler seam is faked in one place."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dxflow.agent import jobwatch
from dxflow.errors import SchedulerError
from dxflow.schedulers import JobState
from dxflow.schedulers import slurm as slurm_mod
from dxflow.schedulers import base
from dxflow.schedulers.base import QUERY_BUDGET, LocalSign, Presence, Scheduler
from dxflow.schedulers.lsf import LSF
from dxflow.schedulers.pbs import PBS, Torque
from dxflow.schedulers.slurm import Slurm

BATCH, EXTERN = "4294967291", "4294967292"


@pytest.fixture(autouse=True)
def no_cap():
    QUERY_BUDGET.resize(0)
    yield
    QUERY_BUDGET.resize(0)


@pytest.fixture
def spool(tmp_path):
    """A slurm.conf whose SlurmdSpoolDir has %n, and a function that starts a step's socket there."""
    conf = tmp_path / "slurm.conf"
    conf.write_text(f"ClusterName=t\nSlurmdSpoolDir={tmp_path}/spool/%n   # per node\n"
                    "NodeName=n1 CPUs=2\n")
    (tmp_path / "spool" / "n1").mkdir(parents=True)
    socks: list[socket.socket] = []

    def step(name: str) -> Path:
        path = tmp_path / "spool" / "n1" / name
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen()
        socks.append(s)
        return path
    yield Slurm({"SLURM_CONF": str(conf)}), step
    for s in socks:
        s.close()


def test_slurm_spool_folder_from_slurm_conf(spool, tmp_path):
    sched, _ = spool
    assert sched.local_sign_fields("n1") == {"spool": f"{tmp_path}/spool/n1"}
    assert Slurm({"SLURM_CONF": str(tmp_path / "none.conf")}).local_sign_fields("n1") == {"spool": "/var/spool/slurmd"}


def test_slurm_batch_or_extern_step_is_a_lasting_sign(spool):
    sched, step = spool
    assert sched.job_here("161", "n1") is Presence.ABSENT
    path = step(f"n1_161.{BATCH}")
    assert sched.job_here("161", "n1") is Presence.LASTING
    path.unlink()
    step(f"n1_161.{EXTERN}")
    assert sched.job_here("161", "n1") is Presence.LASTING


def test_slurm_other_step_is_a_passing_sign(spool):
    sched, step = spool
    step("n1_161.0")
    assert sched.job_here("161", "n1") is Presence.PASSING
    step("n1_161.1.0")  # a heterogeneous job's component (23.02+)
    assert sched.job_here("161", "n1") is Presence.PASSING


def test_slurm_signs_of_other_jobs_and_nodes_do_not_count(spool):
    sched, step = spool
    step(f"n1_1611.{BATCH}")
    step(f"n1_16.{BATCH}")
    step(f"n2_161.{BATCH}")
    assert sched.job_here("161", "n1") is Presence.ABSENT


def test_slurm_without_a_spool_folder_cannot_tell(spool):
    sched, _ = spool
    assert sched.job_here("161", "n9") is Presence.UNKNOWN  # spool/n9 does not exist


def test_job_ids_are_not_wildcards(tmp_path):
    class Arrays(Scheduler):
        name = "arrays"
        local_signs = (LocalSign(str(tmp_path) + "/job.{job}", lasting=True, source="test"),)
    (tmp_path / "job.123").write_text("")
    assert Arrays({}).job_here("12[3]", "n1") is Presence.ABSENT
    (tmp_path / "job.12[3]").write_text("")
    assert Arrays({}).job_here("12[3]", "n1") is Presence.LASTING


def test_adapter_without_signs_cannot_tell():
    assert Scheduler({}).job_here("1", "n1") is Presence.UNKNOWN


# -- slurmctld is asked about one job, or one user, as plain text ----------------------------------------

@pytest.fixture
def asked(monkeypatch):
    calls: list[list[str]] = []
    answers: list = []

    def fake(argv):
        calls.append(list(argv))
        answer = answers.pop(0) if answers else ""
        if isinstance(answer, Exception):
            raise answer
        return answer
    monkeypatch.setattr(slurm_mod, "run", fake)
    return calls, answers


def test_job_state_asks_for_that_job_alone(asked):
    calls, answers = asked
    answers.append("161|alice|RUNNING|n[1-2]\n")
    assert Slurm({}).job_state("161") is JobState.RUNNING
    assert calls == [["squeue", "--noheader", "--format=%A|%u|%T|%N", "--jobs", "161"]]
    answers.append("161|alice|COMPLETING|n2\n")
    assert Slurm({}).job_state("161") is JobState.ENDING
    answers.append("")  # no longer listed
    assert Slurm({}).job_state("161") is JobState.ENDED
    answers.append(SchedulerError("squeue failed", argv=["squeue"], returncode=1,
                                  stderr="slurm_load_jobs error: Invalid job id specified"))
    assert Slurm({}).job_state("161") is JobState.ENDED


def test_controller_down_is_an_error_not_an_end(asked):
    _, answers = asked
    answers.append(SchedulerError("squeue failed", argv=["squeue"], returncode=1,
                                  stderr="slurm_load_jobs error: Unable to contact slurm controller"))
    with pytest.raises(SchedulerError):
        Slurm({}).job_state("161")


def test_a_users_jobs_are_asked_for_that_user_alone(asked):
    calls, answers = asked
    answers.append("161|alice|RUNNING|n[1-2]\n162|alice|PENDING|\n")
    jobs = Slurm({}).jobs(user="alice")
    assert calls[-1] == ["squeue", "--noheader", "--format=%A|%u|%T|%N", "--user", "alice"]
    assert [(j.job, j.state, j.nodes) for j in jobs] == [("161", JobState.RUNNING, ["n1", "n2"]),
                                                        ("162", JobState.PENDING, [])]


@pytest.fixture
def ran(monkeypatch):
    """Commands base.run really starts (the process seam below it), each answering one squeue line."""
    started: list[list[str]] = []

    def fake(argv, **kw):
        started.append(list(argv))
        return subprocess.CompletedProcess(argv, 0, "161|alice|RUNNING|n2\n", "")
    monkeypatch.setattr(base.subprocess, "run", fake)
    return started


def test_cap_refuses_queries_without_running_them(ran):
    QUERY_BUDGET.resize(2)
    base.run(["squeue", "-h"])
    base.run(["/usr/bin/squeue", "-h"])
    with pytest.raises(SchedulerError, match="cap of 2 controller queries a minute"):
        base.run(["squeue", "-h"])
    base.run(["srun", "--jobid=1", "true"])  # not a query: never capped
    assert [os.path.basename(a[0]) for a in ran] == ["squeue", "squeue", "srun"]  # names resolved to paths


# -- the watch ------------------------------------------------------------------------------------------

class Node(Scheduler):
    """The one seam: what a look at the node shows, and what the controller says, as a test sets them."""

    name = "slurm"

    def __init__(self, presence: Presence, state: JobState = JobState.RUNNING) -> None:
        super().__init__({})
        self.presence, self.state = presence, state
        self.looks = self.asks = 0

    def job_here(self, job_id, node):
        self.looks += 1
        return self.presence

    def job_state(self, job_id):
        self.asks += 1
        return self.state


def test_seen_then_gone_ends_the_job_without_the_controller():
    node = Node(Presence.ABSENT)
    watch = jobwatch.JobWatch(node, "161", "n1", look_every=1, ask_every=0.0)
    node.presence = Presence.LASTING
    watch.tick()
    assert not watch.ended.is_set()
    node.presence = Presence.ABSENT
    watch.tick()
    assert watch.ended.is_set() and node.asks == 0


def test_a_step_on_the_node_means_running_no_question():
    node = Node(Presence.PASSING, JobState.ENDED)
    watch = jobwatch.JobWatch(node, "161", "n2", look_every=1, ask_every=0.0)
    for _ in range(5):
        watch.tick()
    assert node.asks == 0 and not watch.ended.is_set()


def test_where_a_look_cannot_tell_the_controller_is_asked_on_its_schedule():
    node = Node(Presence.ABSENT)  # a node of the job with no step: Slurm without PrologFlags=Contain
    watch = jobwatch.JobWatch(node, "161", "n2", look_every=1, ask_every=0.3, rng=random.Random(1))
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        watch.tick()
        time.sleep(0.01)
    assert 2 <= node.asks <= 5  # about one per 0.3 s (±10 %), the first within the first 0.3 s
    node.state = JobState.ENDED
    time.sleep(0.35)
    watch.tick()
    assert watch.ended.is_set()


def test_a_large_jobs_agents_never_ask_together():
    """1,000 agents started at once: their first questions spread over the whole interval."""
    ask_every = 600.0
    firsts = sorted(jobwatch.JobWatch(Node(Presence.UNKNOWN), "1", f"n{i}", 10, ask_every).next_ask_in()
                    for i in range(1000))
    assert firsts[0] >= 0 and firsts[-1] <= ask_every
    assert firsts[-1] - firsts[0] > 0.9 * ask_every
    busiest = max(sum(1 for f in firsts if t <= f < t + 1) for t in range(int(ask_every)))
    assert busiest <= 12  # ~1.7 a second on average


def test_the_cap_holds_whatever_the_interval(ran, tmp_path):
    """The real Slurm adapter, squeue faked where every command starts: 3 a minute, not 50."""
    QUERY_BUDGET.resize(3)
    sched = Slurm({"SLURM_CONF": str(tmp_path / "slurm.conf")})  # no spool folder here: looks cannot tell
    watch = jobwatch.JobWatch(sched, "161", "n2", look_every=1, ask_every=0.001)
    for _ in range(50):
        watch.tick()
        time.sleep(0.002)
    assert len(ran) == 3 and all(argv[-2:] == ["--jobs", "161"] for argv in ran)


def test_a_follower_looks_at_most_every_max_age_and_never_asks_where_a_look_tells():
    node = Node(Presence.LASTING, JobState.ENDED)
    watch = jobwatch.JobWatch(node, "161", "n2", look_every=60, ask_every=0.0)
    for _ in range(20):
        assert not watch.over(max_age=10.0)
    assert node.looks == 1 and node.asks == 0


def test_a_follower_where_no_look_tells_asks_at_most_every_follow_interval(monkeypatch):
    """No sign on the node (an adapter without any, or none seen here): a follower must still see the job
    end, so the followed node's agent asks about its one job, at most every FOLLOW_ASK seconds."""
    node = Node(Presence.UNKNOWN, JobState.RUNNING)
    watch = jobwatch.JobWatch(node, "161", "n2", look_every=60, ask_every=600)
    for _ in range(20):
        assert not watch.over(max_age=0.0)
    assert node.asks == 1
    monkeypatch.setattr(watch, "_next_follow_ask", 0.0)  # FOLLOW_ASK seconds later
    node.state = JobState.ENDED
    assert watch.over(max_age=0.0) and node.asks == 2


def test_an_ended_job_stops_the_agent(monkeypatch):
    monkeypatch.setattr(jobwatch, "END_GRACE", 0.0)
    stopped: list[str] = []
    node = Node(Presence.LASTING)
    watch = jobwatch.JobWatch(node, "161", "n1", look_every=0.02, ask_every=600, stop=lambda: stopped.append("x"))
    import threading
    t = threading.Thread(target=watch.run, daemon=True)
    t.start()
    time.sleep(0.1)
    node.presence = Presence.ABSENT
    t.join(5)
    assert stopped == ["x"] and "is gone" in watch.why


def test_intervals_from_the_site_and_the_test_knob(monkeypatch):
    from dxflow.config import SiteConfig

    monkeypatch.delenv(jobwatch.INTERVAL_ENV, raising=False)
    assert jobwatch.intervals(SiteConfig()) == (10.0, 600.0)
    assert jobwatch.intervals(SiteConfig(job_check_interval=30, controller_check_interval=3600)) == (30, 3600)
    monkeypatch.setenv(jobwatch.INTERVAL_ENV, "1")
    assert jobwatch.intervals(SiteConfig()) == (1.0, 1.0)


# -- PBS, Torque and LSF: the daemons' job files (issue #11 item 1) ------------------------------------------

@pytest.fixture
def mom(tmp_path):
    """A PBS_HOME as pbs_postinstall lays it out (mom_priv and mom_priv/jobs 0751), and pbs_mom's job files."""
    home = tmp_path / "pbs_home"
    jobs = home / "mom_priv" / "jobs"
    jobs.mkdir(parents=True)
    for d in (home / "mom_priv", jobs):
        d.chmod(0o751)

    def arrive(job: str, primary: bool = True) -> None:
        (jobs / f"{job}.JB").write_bytes(b"\0")
        (jobs / f"{job}.JB").chmod(0o600)
        if primary:
            (jobs / f"{job}.SC").write_text("#!/bin/sh\n")

    def purge(job: str) -> None:  # job_purge: the script, then the job file
        (jobs / f"{job}.SC").unlink(missing_ok=True)
        (jobs / f"{job}.JB").unlink()
    return home, arrive, purge


class CountingPBS(PBS):
    """The real adapter; only the server is not there (every question is counted, and says RUNNING)."""

    def job_state(self, job_id):
        self.__dict__["asks"] = self.__dict__.get("asks", 0) + 1
        return JobState.RUNNING


def test_pbs_job_file_is_a_lasting_sign_on_every_host(mom):
    home, arrive, purge = mom
    sched = PBS({"PBS_HOME": str(home)})
    assert sched.job_here("12.srv", "n1") is Presence.ABSENT   # mom_priv/jobs can be entered: it is not there
    arrive("12.srv", primary=False)                            # a sister host: the .JB alone
    assert sched.job_here("12.srv", "n2") is Presence.LASTING
    assert sched.job_here("123.srv", "n2") is Presence.ABSENT  # another job's file does not count
    arrive("7[3].srv")                                         # an array's subjob: brackets are not wildcards
    assert sched.job_here("7[3].srv", "n1") is Presence.LASTING
    assert sched.job_here("7[1].srv", "n1") is Presence.ABSENT


def test_pbs_home_from_pbs_conf_and_torque_home(mom, tmp_path):
    home, arrive, _ = mom
    conf = tmp_path / "pbs.conf"
    conf.write_text(f"PBS_EXEC=/opt/pbs\nPBS_HOME={home}\n")
    arrive("5.srv")
    assert PBS({"PBS_CONF_FILE": str(conf)}).job_here("5.srv", "n1") is Presence.LASTING
    assert Torque({"TORQUE_HOME": str(home)}).job_here("5.srv", "n1") is Presence.LASTING
    # a host without that PBS_HOME: nothing can be looked at, only the server can tell
    assert PBS({"PBS_HOME": str(tmp_path / "none")}).job_here("5.srv", "n1") is Presence.UNKNOWN


def test_pbs_follower_sees_the_purge_without_asking_the_server(mom):
    home, arrive, purge = mom
    arrive("9.srv")
    sched = CountingPBS({"PBS_HOME": str(home)})
    watch = jobwatch.JobWatch(sched, "9.srv", "n1", look_every=60, ask_every=0.0)
    for _ in range(10):
        assert not watch.over(max_age=0.0)
        watch.tick()
    purge("9.srv")  # MoM purges the job once it is over (after the epilogue and the copy of its output)
    assert watch.over(max_age=0.0)
    assert sched.__dict__.get("asks", 0) == 0


@pytest.fixture
def lsf_job(tmp_path):
    """LSF's files of job 31 for alice's agent: sbatchd's job folder in LSB_JOB_TMPDIR and the job file."""
    envdir, tmp, lsbatch = tmp_path / "conf", tmp_path / "lsftmp", tmp_path / "home" / ".lsbatch"
    for d in (envdir, tmp, lsbatch):
        d.mkdir(parents=True)
    (envdir / "lsf.conf").write_text(f'LSF_TMPDIR=/nonexistent\nLSB_JOB_TMPDIR="{tmp}"\n')
    job_file = lsbatch / "1700000000.31"
    env = {"LSF_ENVDIR": str(envdir), "LSB_JOBFILENAME": str(job_file)}
    return env, tmp, job_file


def test_lsf_job_folder_or_job_file_is_a_lasting_sign(lsf_job):
    env, tmp, job_file = lsf_job
    sched = LSF(env)
    assert sched.job_here("31", "n1") is Presence.ABSENT
    (tmp / "31.tmpdir").mkdir(mode=0o700)       # the first execution host
    assert sched.job_here("31", "n1") is Presence.LASTING
    (tmp / "31.tmpdir").rmdir()
    job_file.write_text("#! /bin/sh\n")         # another host: the job file (a shared home) tells
    assert sched.job_here("31", "n2") is Presence.LASTING
    job_file.unlink()
    assert sched.job_here("31", "n2") is Presence.ABSENT


def test_lsf_array_element_and_a_job_file_of_another_job(lsf_job):
    env, tmp, job_file = lsf_job
    (tmp / "31_4.tmpdir").mkdir()
    assert LSF(env).job_here("31[4]", "n1") is Presence.LASTING
    assert LSF(env).job_here("31[5]", "n1") is Presence.ABSENT
    other = job_file.with_name("1700000000.32")
    other.write_text("")
    # LSB_JOBFILENAME of another job (the job's environment is its user's to write) is not a sign of this one
    assert LSF({**env, "LSB_JOBFILENAME": str(other)}).job_here("31", "n2") is Presence.ABSENT


def test_lsf_signs_that_cannot_be_placed_are_not_looked_for(tmp_path):
    (tmp_path / "lsf.conf").write_text("LSB_JOB_TMPDIR=/scratch/%H/tmp\n")  # %H: the first host, unknown here
    assert LSF({"LSF_ENVDIR": str(tmp_path)}).job_here("31", "n1") is Presence.UNKNOWN


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give a folder to another user")
def test_lsf_job_folder_made_by_another_user_does_not_count(lsf_job):
    """bob makes alice's job's folder first in the shared /tmp: alice's agent does not take it for the job's."""
    import pwd

    env, tmp, _ = lsf_job
    made = tmp / "31.tmpdir"
    made.mkdir()
    os.chown(made, pwd.getpwnam("nobody").pw_uid, -1)  # another user (no lab needed: bob exists only with it)
    assert LSF(env).job_here("31", "n1") is Presence.ABSENT  # looked at as root: owned by another, not root

