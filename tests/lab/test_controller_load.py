"""Load on slurmctld and on the shared home, counted on the lab (issue #11).

Every scheduler command a dxflow process runs is counted with strace (:mod:`dxflow.lab.trace`):
attached to the agents the prolog started, or starting the process under test. Nothing of the
cluster is changed. Each test fails against the behaviour before issue #11: agents that asked for
the whole queue (``squeue --json``) every minute and every 3 s while a log was followed, masters
that asked every 5 s, read ``~/.dxflow/fleet`` twice a second and never exited.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import NETNS, Jobs, agent_pids, as_user, popen_as, run, stop, wait_for

from dxflow.lab.trace import Trace, scheduler_commands, under
from dxflow.lab.private_master import PrivateMaster

PYTHON = "/opt/dxflow/venv/bin/python"
ALICE = pwd.getpwnam("alice")
FLEET = Path(ALICE.pw_dir) / ".dxflow" / "fleet"
#: how the agent asks slurmctld about its one job (dxflow.schedulers.slurm.Slurm.squeue_one)
ONE_JOB = ["squeue", "--noheader", "--format=%A|%u|%T|%N", "--jobs"]


def named(argv: list[str]) -> list[str]:
    """``argv`` with the command by name: dxflow runs scheduler commands by path (``scheduler_bin``)."""
    return [os.path.basename(argv[0]), *argv[1:]]


@pytest.fixture
def agent_log():
    """Names the hand-started agents' logs in ~alice/.dxflow/logs, removed after the test."""
    logs: list[Path] = []

    def name(cluster: str, job: str, node: str) -> None:
        logs.append(Path(ALICE.pw_dir) / ".dxflow" / "logs" / f"{cluster}.{job}.{node}.log")
    yield name
    for log in logs:
        log.unlink(missing_ok=True)


@pytest.fixture
def site_file():
    """Write a site policy file the lab user can read (pytest's own tmp folder is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="dxload-", dir="/tmp"))
    os.chmod(folder, 0o755)

    def write(text: str) -> Path:
        path = folder / "dxflow.toml"
        path.write_text(text)
        os.chmod(path, 0o644)
        return path
    yield write
    shutil.rmtree(folder, ignore_errors=True)


def registered(job: str, nodes: int, cluster: str = "dxlab") -> bool:
    return len(list(FLEET.glob(f"{cluster}.{job}.*.json"))) >= nodes


def hand_agent(out: Path, job: str, node: str, cluster: str, env: dict[str, str]) -> Trace:
    """An agent started by hand (not by the prolog, so no epilog stops it) as alice on ``node``, its
    every call traced from its start. Its log is removed at the end of the test (:func:`agent_log`)."""
    argv = ["nsenter", f"--net=/var/run/netns/{NETNS.format(node=node)}", "runuser", "-u", "alice", "--",
            "env", *(f"{k}={v}" for k, v in env.items()), PYTHON, "-m", "dxflow.agent", "--scheduler", "slurm",
            "--cluster", cluster, "--job", job, "--node", node]
    return Trace(out, argv=argv, syscalls="execve")


#: how long a job's agents are left alone: past every agent's first minute (the old code had asked twice by then)
ALONE = 65


@pytest.fixture(scope="module", autouse=True)
def left_alone(lab, tmp_path_factory):
    """A 2-node job's agents, as the prolog started them, traced from this module's start; the module's last
    test reads what they asked while the other tests ran (the minute it takes is then not spent waiting).
    Yields (job, trace, when the trace started)."""
    jobs = Jobs()
    try:
        job = jobs.submit("alice", "sleep 600", nodes=2)
        wait_for(lambda: registered(job, 2), 60, what=f"the 2 agents of job {job}")
        trace = Trace(tmp_path_factory.mktemp("alone") / "agents.strace", pids=agent_pids(job), syscalls="execve")
        try:
            yield job, trace, time.monotonic()
        finally:
            trace.stop()
    finally:
        jobs.cancel_all()


def test_an_agent_sees_its_job_end_on_its_node_without_asking(jobs, tmp_path, agent_log):
    """The look at the node every second (the lab tests' interval) finds the job's step there, then
    gone: the agent stops and has asked slurmctld nothing. Before: `squeue --json` every second."""
    job = jobs.submit("alice", "sleep 10", "--nodelist=n1")
    jobs.wait_running(job)
    cluster = f"dxload{os.getpid()}"
    agent_log(cluster, job, "n1")
    trace = hand_agent(tmp_path / "agent.strace", job, "n1", cluster, {"DXFLOW_JOB_CHECK_INTERVAL": "1"})
    try:
        wait_for(lambda: registered(job, 1, cluster), 30, what="the hand-started agent")
        assert trace.proc.wait(timeout=60) == 0   # it stopped by itself after the job ended
    finally:
        trace.stop()
    assert not registered(job, 1, cluster)
    assert [c.argv for c in scheduler_commands(trace.calls())] == []


def test_where_no_look_can_tell_the_agent_asks_for_its_job_alone_within_the_sites_cap(jobs, tmp_path, site_file,
                                                                                      agent_log):
    """An agent on a node where its job has no step (Slurm without PrologFlags=Contain, beside the batch
    host) asks slurmctld: about its one job, never the whole queue, and never more than the site's cap
    (here 4 a minute, whatever the interval: 1 s). It stops once slurmctld no longer lists the job."""
    site = site_file("controller_queries_per_minute = 4\n")
    job = jobs.submit("alice", "sleep 300", "--nodelist=n1")
    jobs.wait_running(job)
    cluster = f"dxload{os.getpid()}"
    env = {"DXFLOW_JOB_CHECK_INTERVAL": "1", "DXFLOW_SITE_CONFIG": str(site)}
    agent_log(cluster, job, "n2")
    trace = hand_agent(tmp_path / "agent.strace", job, "n2", cluster, env)
    t0 = time.monotonic()
    try:
        wait_for(lambda: registered(job, 1, cluster), 30, what="the hand-started agent")
        time.sleep(15)  # uncapped, a 1 s interval asks ~15 times; the cap allows 4 + 2
        run(["scancel", job])
        assert trace.proc.wait(timeout=60) == 0
    finally:
        trace.stop()
    minutes = (time.monotonic() - t0) / 60
    asked = [named(c.argv) for c in scheduler_commands(trace.calls())]
    assert asked and all(argv == [*ONE_JOB, job] for argv in asked), asked
    assert len(asked) <= 4 + 4 * minutes + 1, (len(asked), minutes)   # a 1 s interval uncapped: ~100


def test_logs_follow_learns_the_end_from_the_agent_not_from_slurmctld(jobs, tmp_path):
    """`dxflow logs -f` on the batch host's agent until the job ends. Before: the agent asked
    `squeue --json` every 3 s for its followers."""
    out = Path(ALICE.pw_dir) / f"dxload-{os.getpid()}.out"
    # the last line a few seconds before the end: with PrologFlags=Contain Slurm kills the agent with the
    # job's extern step at once, and a line written in the job's last milliseconds may never be sent
    job = jobs.submit("alice", "echo first; sleep 10; echo last; sleep 3", "--nodelist=n1", f"--output={out}")
    try:
        wait_for(lambda: registered(job, 1), 60, what=f"the agent of job {job}")
        trace = Trace(tmp_path / "agent.strace", pids=agent_pids(job), syscalls="execve")
        follower = popen_as("alice", ["/usr/local/bin/dxflow", "logs", "-f", job])
        try:
            stdout, stderr = follower.communicate(timeout=90)
        finally:
            stop(follower)
            trace.stop()
        assert follower.returncode == 0, stderr
        assert "last" in stdout and f"job {job} ended" in stderr
        assert [c.argv for c in scheduler_commands(trace.calls())] == []
    finally:
        out.unlink(missing_ok=True)


#: the quiet seconds the master is watched for (old: 4 questions and 40 reads of its folder in them)
QUIET = 20
ASK = ("import sys, json; from pathlib import Path; from dxflow.master.client import MasterClient; "
       "print(json.dumps(MasterClient(Path(sys.argv[1])).json('GET', sys.argv[2])))")


def test_master_asks_on_news_reads_the_folder_when_it_changed_and_exits_when_idle(jobs, tmp_path, site_file):
    """A private master of alice (its own folder) with one real agent: one question when the agent's
    registration appears, none during 20 quiet seconds, one for `dxflow ls`; its fleet folder read
    at most once while it does not change; gone 10 s (the site's setting here) after its last agent
    and its last client. Before: a question every 5 s, two reads of the folder a second, no exit."""
    site = site_file("master_check_interval = 600.0\nmaster_check_gap = 2.0\nfleet_scan_max = 2.0\n"
                     "master_idle_exit = 10.0\n")
    master = PrivateMaster("alice", f".dxflow-loadtest-{os.getpid()}", {"DXFLOW_SITE_CONFIG": str(site)}).prepare()
    base, private = master.base, master.files

    def ask(path: str):
        return json.loads(as_user("alice", ["env", f"DXFLOW_SITE_CONFIG={site}", PYTHON, "-c", ASK, str(base),
                                            path]).stdout)

    trace = Trace(tmp_path / "master.strace", argv=master.argv())
    try:
        wait_for(lambda: private.master_sock.exists(), 30, what="the private master")
        job = jobs.submit("alice", "sleep 400", "--nodelist=n1")
        wait_for(lambda: registered(job, 1), 60, what=f"the agent of job {job}")
        [copy] = master.adopt(FLEET.glob(f"dxlab.{job}.*.json"))
        wait_for(lambda: [a["state"] for a in ask("/api/agents")] == ["ready"], 60, what="the agent ready")
        time.sleep(3)  # the folder's change is old enough to be trusted
        news = len(scheduler_commands(trace.calls()))
        quiet_from = time.time()
        time.sleep(QUIET)
        calls = trace.calls()
        quiet = [c for c in calls if c.at >= quiet_from]
        assert news >= 1 and len(scheduler_commands(calls)) == news, [c.argv for c in scheduler_commands(calls)]
        reads = [c for c in under(quiet, private.fleet_dir) if c.name == "openat"]
        looks = under(quiet, private.fleet_dir)
        assert len(reads) <= 1 and len(looks) <= QUIET / 2 + 5, [(c.name, c.path) for c in looks]
        ask("/api/agents?refresh=1")                         # `dxflow ls`
        wait_for(lambda: len(scheduler_commands(trace.calls())) == news + 1, 10, what="the question for ls")
        assert all(c.argv[-2:] == ["--user", "alice"] for c in scheduler_commands(trace.calls()))
        copy.unlink()                                        # its agent goes (as the epilog removes it)
        assert trace.proc.wait(timeout=60) == 0              # the master exits by itself
        assert not private.master_sock.exists()
    finally:
        if trace.proc.poll() is None:
            master.stop()
            trace.stop()
        master.remove()


# the module's last test: its job's agents were left alone while the tests above ran
def test_agents_of_a_job_ask_slurmctld_at_most_once_in_a_minute_and_more(left_alone):
    """A 2-node job's agents, as the prolog started them, left alone for 65 s (other jobs come and go on
    their nodes meanwhile). Before: two or more `squeue --json` (the whole queue), one per agent per minute.
    Now a look at the node answers (slurmstepd's sockets); a node where none can only asks about its one
    job, every 10 minutes."""
    job, trace, since = left_alone
    time.sleep(max(0.0, ALONE - (time.monotonic() - since)))
    trace.stop()
    asked = [named(c.argv) for c in scheduler_commands(trace.calls())]
    assert all(argv[:-1] == ONE_JOB and argv[-1] == job for argv in asked), asked
    assert len(asked) <= 1, asked
