"""``JOB:all`` is the job's nodes as the scheduler lists them (issue #15): the master's and the site's
``GET /api/jobs/JOB/nodes`` (dxflow/master/jobnodes.py, dxflow/site/jobnodes.py), asked of the real
Slurm adapter reading a ``squeue`` script (the scheduler seam), and the CLI's resolution of a target
against it (dxflow/cli/targets.py): nodes without an agent yet are waited for, then reported with why;
a node set naming no node of the job names the scheduler's nodes."""

from __future__ import annotations

import getpass
import io
import time
from contextlib import redirect_stderr
from types import SimpleNamespace

import pytest
from flask import Flask

from dxflow import API_VERSION, __version__
from dxflow.cli import targets
from dxflow.cli.fanout import NodeResult, missing_results, summary
from dxflow.cli.targets import NO_AGENT, Resolved, parse, resolve
from dxflow.errors import NotFound
from dxflow.master import jobnodes
from dxflow.master.registry import Registry
from dxflow.registration import Registration
from dxflow.schedulers import JobInfo, JobState
from dxflow.schedulers.base import QUERY_BUDGET
from dxflow.site import jobnodes as site_jobnodes
from dxflow.site.config import ClusterConfig, SiteServiceConfig
from dxflow.site.query import ClusterJobs

USER = getpass.getuser()
#: the stories' other user ("bob"), never whoever runs the tests (a developer may be bob)
OTHER_USER = "bob" if USER != "bob" else "alice"


def squeue(folder, lines: list[str]) -> None:
    """The controller: a ``squeue`` printing ``JOB|USER|STATE|NODES`` lines, and counting its runs."""
    folder.mkdir(exist_ok=True)
    script = folder / "squeue"
    script.write_text("#!/bin/sh\n" f"echo run >> {folder}/runs\n" + "".join(f"echo '{line}'\n" for line in lines))
    script.chmod(0o755)


def runs(folder) -> int:
    return len((folder / "runs").read_text().splitlines()) if (folder / "runs").exists() else 0


def registration(job: str, node: str, scheduler: str = "slurm") -> Registration:
    return Registration(cluster="dxlab", scheduler=scheduler, job=job, node=node, address=node, port=1, pid=1,
                        user=USER, started="2026-01-01T00:00:00Z", public_key="", api_version=API_VERSION,
                        version=__version__)


@pytest.fixture
def master(tmp_path, monkeypatch):
    """A master's lookup on a real registry, its scheduler a squeue script first on PATH."""
    bin_dir = tmp_path / "bin"
    squeue(bin_dir, [f"12|{USER}|RUNNING|n[1-4]", f"13|{USER}|PENDING|", f"17.pbs|{USER}|RUNNING|m1"])
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setattr("dxflow.config.SITE_CONFIG", tmp_path / "no-site.toml")
    registry = Registry(tmp_path / "fleet.db")
    registry.upsert(registration("12", "n1"))
    watched: dict = {}  # the watcher's last answer (Fleet.known_jobs)
    fleet = SimpleNamespace(registry=registry, user=USER, watched=watched, known_jobs=lambda: dict(watched))
    yield SimpleNamespace(fleet=fleet, lookup=jobnodes.MasterJobNodes(fleet), bin=bin_dir)
    registry.close()


def test_the_master_lists_a_running_jobs_nodes_from_the_scheduler_not_its_agents(master):
    answer = master.lookup("12")
    assert (answer["state"], answer["nodes"], answer["node_set"], answer["scheduler"]) == (
        "running", ["n1", "n2", "n3", "n4"], "n[1-4]", "slurm")
    assert master.lookup("13")["state"] == "pending"
    assert master.lookup("17")["job"] == "17.pbs"  # a PBS id by its number, as qstat takes it
    assert master.lookup("dxlab~12")["nodes"] == ["n1", "n2", "n3", "n4"]


def test_the_master_asks_once_for_lookups_close_together_and_not_for_what_the_watcher_knows(master):
    master.lookup("12")
    master.lookup("13")
    assert runs(master.bin) == 1  # one question answered both
    master.fleet.watched.update({"slurm": {"14": JobInfo("14", USER, JobState.RUNNING, ["n7", "n8"])}})
    assert master.lookup("14")["nodes"] == ["n7", "n8"]
    assert runs(master.bin) == 1


def test_a_job_not_the_users_is_answered_as_not_listed(master):
    squeue(master.bin, [f"77|{OTHER_USER}|RUNNING|n3"])  # `squeue --user` lists only the user's own; bob's is not
    answer = master.lookup("77")
    assert (answer["state"], answer["nodes"]) == ("ended", [])
    assert "lists no such job of yours" in answer["why"]


def test_a_spent_query_cap_makes_the_answer_unknown_with_why(master):
    QUERY_BUDGET.resize(1)
    try:
        assert QUERY_BUDGET.take()
        answer = master.lookup("12")
    finally:
        QUERY_BUDGET.resize(0)
    assert answer["state"] == "unknown" and "controller_queries_per_minute" in answer["why"]
    assert runs(master.bin) == 0


def test_with_the_cap_spent_the_last_answer_stands(master, monkeypatch):
    assert master.lookup("12")["nodes"] == ["n1", "n2", "n3", "n4"]
    monkeypatch.setattr(jobnodes, "JOBS_FRESH", 0.0)  # that answer is old now
    QUERY_BUDGET.resize(1)
    try:
        assert QUERY_BUDGET.take()
        assert master.lookup("12")["nodes"] == ["n1", "n2", "n3", "n4"]
    finally:
        QUERY_BUDGET.resize(0)
    assert runs(master.bin) == 1


def test_a_job_whose_agents_register_while_every_answer_says_pending_nudges_the_watcher(master):
    """Agents register only once the job has its nodes: an answer without them is older than that; it
    stands (the CLI asks again while it waits) and the watcher is nudged to ask."""
    squeue(master.bin, [f"12|{USER}|PENDING|"])
    nudged = []
    master.fleet.refresh = lambda metrics=True: nudged.append(metrics)
    master.fleet.watched.update({"slurm": {"12": JobInfo("12", USER, JobState.PENDING, [])}})  # n1's agent is registered
    assert master.lookup("12")["state"] == "pending"
    assert nudged == [False] and runs(master.bin) == 1
    squeue(master.bin, [f"12|{USER}|CONFIGURING|n[1-4]"])  # Slurm's state while the job's prologs run
    master.lookup.user_jobs("slurm", fresh=0.0)
    answer = master.lookup("12")
    assert (answer["state"], answer["nodes"]) == ("pending", ["n1", "n2", "n3", "n4"])
    master.fleet.watched.update({"slurm": {"12": JobInfo("12", USER, JobState.RUNNING, ["n1", "n2"])}})  # it asked
    assert master.lookup("12")["nodes"] == ["n1", "n2"]
    assert runs(master.bin) == 2  # the watcher's running answer: nothing more asked


def test_the_route_answers_json_and_refuses_a_bad_job_id(master):
    app = Flask("test")
    jobnodes.init_app(app, master.fleet)
    from dxflow.edge import httperrors
    httperrors.install(app, default_status=502)
    client = app.test_client()
    assert client.get("/api/jobs/12/nodes").get_json()["node_set"] == "n[1-4]"
    assert client.get("/api/jobs/12;rm/nodes").status_code == 400


def test_the_site_answers_from_the_requesting_users_jobs_on_each_cluster(tmp_path):
    c1 = tmp_path / "c1bin"
    squeue(c1, [f"42|{USER}|RUNNING|n[1-2]", f"77|{OTHER_USER}|RUNNING|n3"])
    config = SiteServiceConfig(state_dir=str(tmp_path), replica="r1", clusters={
        "c1": ClusterConfig(name="c1", scheduler="slurm", scheduler_bin=str(c1))})
    fleet = SimpleNamespace(config=config, jobs=ClusterJobs(config), current_user=lambda: SimpleNamespace(name=USER),
                            registry=SimpleNamespace(of_job=lambda job: []))
    ask = site_jobnodes.lookup(fleet)
    assert ask("42")["nodes"] == ["n1", "n2"]
    assert ask("c1~42")["job"] == "c1~42"
    # the site asks `squeue --user` as the requesting user: bob's job is not in the answer
    fleet.current_user = lambda: SimpleNamespace(name=OTHER_USER)
    assert ask("42")["state"] == "ended"
    assert ask("c9~42")["state"] == "ended"  # a cluster the site does not serve


# -- the CLI's resolution against the scheduler's word ---------------------------------------------------------


class Master:
    """The two answers resolution asks for: the agents (which register one by one as ``arrivals`` says:
    node -> the look at which it appears) and the scheduler's word on the job's nodes."""

    def __init__(self, present, sched, arrivals=None):
        self.present, self.sched, self.arrivals = list(present), sched, dict(arrivals or {})
        self.looks = 0
        self.asked_nodes = 0
        self.started = ""  # the agents' start time as the master lists it ("": not listed)

    def json(self, method, path, body=None, timeout=None):
        assert path.startswith("/api/agents?all=1")
        self.looks += 1
        for node, at in list(self.arrivals.items()):
            if self.looks >= at:
                self.present.append(node)
                del self.arrivals[node]
        extra = {"started": self.started} if self.started else {}
        return [{"job": "12", "node": n, "state": "ready", "detail": "", **extra} for n in self.present]

    def job_nodes(self, job):
        self.asked_nodes += 1
        return self.sched


RUNNING = {"job": "12", "state": "running", "nodes": ["n1", "n2", "n3", "n4"], "node_set": "n[1-4]", "why": ""}


@pytest.fixture
def quick(monkeypatch):
    monkeypatch.setattr(targets, "WAIT_STEP", 0.01)
    monkeypatch.setattr(targets, "LOOK_AGAIN", 0.0)
    monkeypatch.setattr(time, "sleep", lambda s: None)  # the looks still count; no test waits


def test_all_waits_for_the_agents_of_nodes_the_scheduler_lists_and_says_so_once(quick):
    client = Master(["n1", "n2"], RUNNING, {"n3": 3, "n4": 5})
    err = io.StringIO()
    with redirect_stderr(err):
        found = resolve(client, parse("12:all"), wait=30)
    assert found == Resolved("12", ["n1", "n2", "n3", "n4"])
    assert err.getvalue() == "dxflow: waiting for agents on n[3-4] (job 12 is starting; up to 30 s)...\n"
    assert client.asked_nodes == 1


def test_nodes_whose_agent_never_comes_are_missing_with_why_and_the_others_go_on(monkeypatch):
    monkeypatch.setattr(targets, "WAIT_STEP", 0.01)
    client = Master(["n1", "n2", "n4"], RUNNING)
    with redirect_stderr(io.StringIO()):
        found = resolve(client, parse("12:*"), wait=0.2)
    assert found == Resolved("12", ["n1", "n2", "n4"], (("n3", f"{NO_AGENT} within 0.2 s"),))
    results = missing_results(found)
    assert summary(results + [NodeResult("n1", 0, "ok")]) == "n3: error: no agent registered within 0.2 s"
    assert results[0].code == 255
    with pytest.raises(NotFound, match=r"job 12 on n3: no agent registered within 0.2 s"):  # one node, named
        with redirect_stderr(io.StringIO()):
            resolve(client, parse("12:n3"), wait=0.2)


def test_a_node_of_a_job_running_for_minutes_whose_agent_is_missing_is_not_waited_for(quick):
    """Its agent failed: every command would wait for nothing; the node is reported at once."""
    client = Master(["n1", "n2", "n3"], RUNNING, {"n4": 2})
    long_ago = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() - 10 * 60))
    client.started = long_ago
    err = io.StringIO()
    with redirect_stderr(err):
        found = resolve(client, parse("12:all"), wait=30)
    assert found == Resolved("12", ["n1", "n2", "n3"], (("n4", NO_AGENT),))
    assert err.getvalue() == "" and client.looks == 1


def test_wait_0_does_not_wait_nor_say_anything(quick):
    client = Master(["n1"], RUNNING, {"n2": 2})
    err = io.StringIO()
    with redirect_stderr(err):
        found = resolve(client, parse("12:n[1-2]"), wait=0)
    assert found.nodes == ["n1"] and found.missing == (("n2", NO_AGENT),)
    assert err.getvalue() == ""


def test_a_set_naming_no_node_of_the_job_names_the_schedulers_nodes(quick):
    client = Master(["n1"], RUNNING)
    with pytest.raises(NotFound, match=r"job 12 runs on n\[1-4\]: n\[8-9\] is not one of its nodes"):
        resolve(client, parse("12:n[8-9]"))


def test_without_the_schedulers_word_the_agents_are_the_jobs_nodes(quick):
    for sched in (None, {"state": "unknown", "nodes": [], "why": "cap spent"}, {"state": "ended", "nodes": []}):
        client = Master(["n1", "n2"], sched)
        err = io.StringIO()
        with redirect_stderr(err):
            assert resolve(client, parse("12:all"), wait=30) == Resolved("12", ["n1", "n2"])
        if sched and sched["state"] == "unknown":  # said, never silently fewer nodes
            assert err.getvalue() == ("dxflow: job 12: the scheduler could not say which nodes it has (cap spent): "
                                      "going by the nodes whose agent registered, n[1-2]\n")
        with pytest.raises(NotFound, match=r"job 12 runs on n\[1-2\]: n3 is not one of its nodes"):
            resolve(client, parse("12:n3"))


def test_the_job_alone_asks_nothing_of_the_scheduler_while_it_has_agents(quick):
    client = Master(["n1"], RUNNING)
    assert resolve(client, parse("12")) == Resolved("12", [None])
    assert client.asked_nodes == 0


def test_a_job_with_no_agent_yet_is_waited_for_and_a_pending_one_named(quick):
    client = Master([], RUNNING, {"n1": 3})
    with redirect_stderr(io.StringIO()):
        assert resolve(client, parse("12"), wait=30) == Resolved("12", [None])
    pending = {"job": "12", "state": "pending", "nodes": [], "why": ""}
    with redirect_stderr(io.StringIO()), pytest.raises(NotFound, match="job 12 has not started yet"):
        resolve(Master([], pending), parse("12:all"), wait=0.05)


def test_a_gone_agent_on_a_node_of_a_running_job_is_missing_with_its_reason(quick):
    client = Master(["n1", "n2", "n3"], RUNNING)
    real = client.json

    def with_gone(*a, **k):
        return real(*a, **k) + [{"job": "12", "node": "n4", "state": "gone", "detail": "registration removed"}]
    client.json = with_gone  # type: ignore[method-assign]
    found = resolve(client, parse("12:all"), wait=30)  # a gone agent is not waited for
    assert found.missing == (("n4", "its agent is gone (registration removed)"),)


def test_a_pending_answer_older_than_the_first_agent_is_asked_again_not_taken_for_the_nodes(quick, monkeypatch):
    """The scheduler's answer said pending when an agent had already registered: the job runs, its node
    list is asked again (not the one agent taken for every node of the job)."""
    pending = {"job": "12", "state": "pending", "nodes": [], "why": ""}
    client = Master(["n4"], pending, {"n1": 2, "n2": 2, "n3": 2})
    answers = iter([pending, RUNNING])
    client.job_nodes = lambda job: next(answers, RUNNING)  # type: ignore[method-assign]
    clock = iter(range(0, 10_000, 3))  # each look 3 s after the last: past ASK_PENDING every time
    monkeypatch.setattr(targets.time, "monotonic", lambda: float(next(clock)))
    with redirect_stderr(io.StringIO()):
        found = resolve(client, parse("12:all"), wait=60)
    assert found == Resolved("12", ["n1", "n2", "n3", "n4"])


def test_a_job_still_pending_by_the_schedulers_word_but_with_agents_goes_by_its_agents(monkeypatch):
    monkeypatch.setattr(targets, "WAIT_STEP", 0.01)
    client = Master(["n1", "n2"], {"job": "12", "state": "pending", "nodes": [], "why": ""})
    with redirect_stderr(io.StringIO()):
        assert resolve(client, parse("12:all"), wait=0.1) == Resolved("12", ["n1", "n2"])


def test_an_unknown_answer_for_a_job_without_agents_is_asked_again_while_waiting(quick, monkeypatch):
    """The master could not ask (its query cap spent by the user's other commands): the job is looked
    for again, and once the scheduler can say, its nodes are waited for as usual."""
    client = Master([], None, {"n1": 4, "n2": 4})
    answers = iter([{"state": "unknown", "nodes": [], "why": "cap spent"},
                    {**RUNNING, "nodes": ["n1", "n2"], "node_set": "n[1-2]"}])
    client.job_nodes = lambda job: next(answers)  # type: ignore[method-assign]
    clock = iter(range(0, 10_000, 2))
    monkeypatch.setattr(targets.time, "monotonic", lambda: float(next(clock)))
    with redirect_stderr(io.StringIO()):
        assert resolve(client, parse("12:all"), wait=60) == Resolved("12", ["n1", "n2"])


def test_a_job_whose_agents_are_all_gone_has_ended_whatever_an_older_answer_says(quick):
    """The scheduler's answer (kept a few seconds) still lists the job as running, but every agent of it
    is gone: it has ended, named at once (not waited for)."""
    client = Master([], RUNNING)
    real = client.json
    client.json = lambda *a, **k: real(*a, **k) + [  # type: ignore[method-assign]
        {"job": "12", "node": "n1", "state": "gone", "detail": "job ended"}]
    with pytest.raises(NotFound, match=r"job 12 has ended: its agents on n1 are gone \(job ended\)"):
        resolve(client, parse("12:all"), wait=30)


# -- the job's nodes from its agents' registrations: registrations first, the controller second ---------------


def test_a_registration_round_trips_the_jobs_nodes_and_an_older_record_without_them_loads(tmp_path):
    from dataclasses import asdict, replace

    from dxflow import registration as records

    records.write(tmp_path, replace(registration("12", "n1"), job_nodes="n[1-4]"))
    assert [r.job_nodes for r in records.read_all(tmp_path)] == ["n[1-4]"]
    registry = Registry(tmp_path / "fleet.db")  # and through the master's registry (fleet.db)
    registry.upsert(records.read_all(tmp_path)[0])
    assert registry.all()[0].reg.job_nodes == "n[1-4]"
    registry.close()
    older = asdict(registration("12", "n2"))
    del older["job_nodes"]  # a record of an older agent
    assert Registration.from_dict(older).job_nodes == ""
    assert Registration.from_dict({**older, "newer_field": 1}).node == "n2"  # a newer release's record loads too
    for bad in (["n1", "n2"], "n" * (records.JOB_NODES_MAX + 1)):
        with pytest.raises(ValueError, match="job_nodes"):
            Registration.from_dict({**older, "job_nodes": bad})


def test_the_prolog_hands_the_agent_the_jobs_nodes_folded_from_each_schedulers_own_source(tmp_path, monkeypatch):
    from dxflow import hook, registration as records
    from dxflow.schedulers import get_scheduler

    monkeypatch.setattr("dxflow.config.SITE_CONFIG", tmp_path / "no-site.toml")
    # Slurm 22.05 gives the prolog SLURM_NODELIST; 23.02.6 and later SLURM_JOB_NODELIST (taken first)
    for env in ({"SLURM_NODELIST": "n[1-3],n7"}, {"SLURM_JOB_NODELIST": "n[1-3,7]", "SLURM_NODELIST": "x1"}):
        sched = get_scheduler("slurm", {"SLURM_JOB_ID": "12", "SLURM_JOB_USER": USER, "SLURMD_NODENAME": "n1", **env})
        assert hook.agent_passthrough(sched, sched.hook_job())[records.JOB_NODES_ENV] == "n[1-3,7]"
    nodefile = tmp_path / "nodefile"  # PBS: one line per slot
    nodefile.write_text("m2.cluster\nm1.cluster\nm1.cluster\n")
    pbs = get_scheduler("pbs", {"PBS_NODEFILE": str(nodefile), "PBS_HOME": str(tmp_path)})
    assert hook.agent_passthrough(pbs, pbs.hook_job(["17.server", USER]))[records.JOB_NODES_ENV] == "m[1-2]"
    bare = get_scheduler("slurm", {"SLURM_JOB_ID": "12", "SLURM_JOB_USER": USER, "SLURMD_NODENAME": "n1"})
    assert records.JOB_NODES_ENV not in hook.agent_passthrough(bare, bare.hook_job())  # not known: not passed
    assert records.job_nodes_of({records.JOB_NODES_ENV: "n[1-4]"}) == "n[1-4]"
    assert records.job_nodes_of({}) == ""


@pytest.fixture
def four_node_job(fake_fleet, fake_scheduler, node_agent, user_base, settle):
    """Job 12 of four nodes: agents on n1-n3 registered on a real master's Fleet, each carrying the job's
    nodes from its prolog; n4's agent never registers. The controller lists the job without its nodes."""
    from dataclasses import replace

    from dxflow import registration as records

    fake_scheduler.add("12", ())
    for i, node in enumerate(("n1", "n2", "n3")):
        agent = node_agent(user_base, "12", node, port=7000 + i, write=False, cluster="dxlab")
        records.write(user_base / "fleet", replace(agent.reg, job_nodes="n[1-4]"))
    settle(fake_fleet, [f"dxlab.12.{n}" for n in ("n1", "n2", "n3")])
    return fake_fleet


def test_the_master_answers_a_jobs_nodes_from_its_agents_registrations_without_asking_the_controller(
        four_node_job, fake_scheduler):
    lookup = jobnodes.MasterJobNodes(four_node_job)
    asked = fake_scheduler.asked
    QUERY_BUDGET.resize(1)
    assert QUERY_BUDGET.take()  # the cap is spent: the controller could not be asked now
    answer = lookup("12")
    assert (answer["state"], answer["nodes"], answer["node_set"], answer["source"]) == (
        "running", ["n1", "n2", "n3", "n4"], "n[1-4]", "agents")
    assert lookup("dxlab~12")["nodes"] == ["n1", "n2", "n3", "n4"]
    assert lookup("other~12")["source"] != "agents"  # another cluster's job 12: not these agents'
    assert fake_scheduler.asked == asked


def test_agents_that_carry_no_node_set_leave_the_answer_to_the_controller(fake_fleet, fake_scheduler, node_agent,
                                                                         user_base, settle):
    """Agents of an older release: the scheduler's list, as before; asked within the cap."""
    fake_scheduler.add("12", ("n1", "n2"))
    node_agent(user_base, "12", "n1", cluster="dxlab")
    settle(fake_fleet, ["dxlab.12.n1"])
    answer = jobnodes.MasterJobNodes(fake_fleet)("12")
    assert (answer["nodes"], answer["source"]) == (["n1", "n2"], "scheduler")


def test_a_node_set_a_registration_garbles_is_not_taken(fake_fleet, fake_scheduler, node_agent, user_base, settle):
    from dataclasses import replace

    from dxflow import registration as records

    fake_scheduler.add("12", ("n1", "n2"))
    agent = node_agent(user_base, "12", "n1", write=False, cluster="dxlab")
    records.write(user_base / "fleet", replace(agent.reg, job_nodes="n[1-"))
    settle(fake_fleet, ["dxlab.12.n1"])
    assert jobnodes.MasterJobNodes(fake_fleet)("12")["source"] == "scheduler"


class FleetClient:
    """The CLI's two questions, answered by a real master's Fleet and lookup (what its routes return)."""

    def __init__(self, fleet):
        self.fleet, self.lookup = fleet, jobnodes.MasterJobNodes(fleet)

    def json(self, method, path, body=None, timeout=None):
        assert path.startswith("/api/agents?all=1")
        return [a.to_dict() for a in self.fleet.registry.all()]

    def job_nodes(self, job):
        return self.lookup(job)


def test_all_names_the_node_whose_agent_never_registered_as_failed_with_the_query_cap_spent(four_node_job, quick):
    QUERY_BUDGET.resize(1)
    assert QUERY_BUDGET.take()
    err = io.StringIO()
    with redirect_stderr(err):
        found = resolve(FleetClient(four_node_job), parse("12:all"), wait=0)
    assert found == Resolved("12", ["n1", "n2", "n3"], (("n4", NO_AGENT),))
    assert "could not say" not in err.getvalue()  # the scheduler was not needed


def test_the_site_answers_from_the_requesting_users_own_registrations_first(tmp_path):
    from dataclasses import replace

    from dxflow.master.registry import Agent

    config = SiteServiceConfig(state_dir=str(tmp_path), replica="r1", clusters={
        "c1": ClusterConfig(name="c1", scheduler="slurm", scheduler_bin=str(tmp_path / "no-bin"))})
    mine = Agent(replace(registration("42", "n1"), cluster="c1", job_nodes="n[1-3]"), "ready")
    bobs = Agent(replace(registration("42", "n9"), cluster="c1", user=OTHER_USER, job_nodes="n[9-12]"), "ready")
    fleet = SimpleNamespace(config=config, jobs=ClusterJobs(config), current_user=lambda: SimpleNamespace(name=USER),
                            registry=SimpleNamespace(of_job=lambda job: [mine, bobs]))  # an admin sees bob's too
    ask = site_jobnodes.lookup(fleet)
    answer = ask("c1~42")
    assert (answer["job"], answer["nodes"], answer["source"]) == ("c1~42", ["n1", "n2", "n3"], "agents")
    fleet.current_user = lambda: SimpleNamespace(name="carol")  # neither agent is carol's: the scheduler is asked
    assert ask("42")["source"] != "agents"
