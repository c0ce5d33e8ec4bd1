"""The site's fleet: whose agents a request sees, how one is proven and reached, what the scheduler says.

The agents are the real agent app on fake nodes (``node_agent``, tests/conftest.py); the gateway is
stood in for by :class:`Gateway` below (channels to an agent's port on its fake node: what an agent's
dial-out carries); each cluster's scheduler is a ``squeue`` script in the cluster's ``scheduler_bin``
(the real Slurm adapter reads it, in the child process the site asks each cluster from).
"""

from __future__ import annotations

import getpass
import os
import time
from dataclasses import asdict
from types import SimpleNamespace

import pytest
from flask import Flask, g

from dxflow import auth
from dxflow.errors import AgentLost, AgentUnreachable, AuthError, NotFound, UsageError
from dxflow.site.config import ClusterConfig, SiteServiceConfig
from dxflow.site.fleet import SiteFleet
from dxflow.site.scope import split_job
from dxflow.site.store import Store

USER = getpass.getuser()
#: the stories' other user ("bob"), never whoever runs the tests (a developer may be bob)
OTHER_USER = "bob" if USER != "bob" else "alice"


class Gateway:
    """Q's gateway as the fleet uses it: which agents are connected, and a channel to one's own port."""

    def __init__(self, store: Store, nodes) -> None:
        self.store, self.nodes = store, nodes
        self.up: set[str] = set()

    def connected(self, name: str) -> bool:
        return name in self.up

    def channel(self, name: str, timeout: float = 10.0):
        if name not in self.up:
            raise AgentUnreachable(f"agent {name} is not connected to this replica")
        agent = self.store.agent(name)
        return self.nodes.channel(agent.reg.address, agent.reg.port)

    def status(self) -> dict:
        return {"agents": len(self.up)}


def squeue(folder, lines: list[str]) -> None:
    """The cluster's controller: ``squeue`` printing ``JOB|USER|STATE|NODES`` lines (what dxflow asks for)."""
    folder.mkdir(exist_ok=True)
    script = folder / "squeue"
    script.write_text("#!/bin/sh\n" + "".join(f"echo '{line}'\n" for line in lines))
    script.chmod(0o755)


@pytest.fixture
def site(tmp_path, user_base, fake_nodes):
    c1, c2 = tmp_path / "c1bin", tmp_path / "c2bin"
    squeue(c1, [f"42|{USER}|RUNNING|n[1-2]", f"77|{OTHER_USER}|RUNNING|n3"])
    squeue(c2, [f"42|{USER}|RUNNING|m1"])
    config = SiteServiceConfig(state_dir=str(tmp_path), replica="r1", clusters={
        "c1": ClusterConfig(name="c1", scheduler="slurm", scheduler_bin=str(c1)),
        "c2": ClusterConfig(name="c2", scheduler="slurm", scheduler_bin=str(c2))})
    store = Store(str(tmp_path / "site.db"))
    fleet = SiteFleet(config, store, auth.user_key(user_base))  # the site's token key: the one agents trust here
    fleet.gateway = Gateway(store, fake_nodes)
    app = Flask("test")
    with app.test_request_context("/api/fleet/42/-/api/node"):
        g.site_user = SimpleNamespace(name=USER, admin=False)
        yield SimpleNamespace(fleet=fleet, store=store, gateway=fleet.gateway, config=config, squeue=squeue,
                              bins={"c1": c1, "c2": c2})
    fleet.stop()
    store.close()


@pytest.fixture
def enroll(site, node_agent, user_base):
    """``enroll(job, node, cluster="c1", connected=True)``: a real agent on a fake node, enrolled in the store."""

    def enroll_(job: str = "42", node: str = "n1", cluster: str = "c1", connected: bool = True, port: int = 7000,
                user: str = USER):
        started = node_agent(user_base, job, node, port=port, write=False, cluster=cluster, user=user)
        agent = site.store.enroll(cluster, job, node, user, os.getuid(), "SHA256:gw", asdict(started.reg))
        if connected:
            site.gateway.up.add(agent.name)
        return agent
    return enroll_


def test_split_job_reads_the_cluster_before_the_tilde():
    assert split_job("c1~42") == ("c1", "42") and split_job("42") == (None, "42")
    assert split_job("c2~17.pbs") == ("c2", "17.pbs") and split_job("~42") == (None, "~42")


def test_a_connected_agent_is_proven_and_reached_with_a_token_naming_its_user(site, enroll):
    agent = enroll()
    target = site.fleet.relay_target("42")
    assert target.name == agent.name and site.fleet.verified(target) is not None
    assert site.store.agent(agent.name).state == "ready" and site.store.agent(agent.name).node_info
    status, info = site.fleet.ask(target, "/api/node")
    assert status == 200 and info["node"] == "n1"
    claims = auth.verify_token(site.fleet.token(target), auth.public_pem(site.fleet._token_key), USER,
                               auth.fingerprint(target.reg.public_key))
    assert claims["sub"] == USER
    assert site.fleet.shown(target)["state"] == "ready"


def test_another_users_job_is_not_found_in_the_same_words_as_no_job(site, enroll):
    enroll()
    g.site_user = SimpleNamespace(name=OTHER_USER, admin=False)
    with pytest.raises(NotFound) as theirs:
        site.fleet.relay_target("42")
    with pytest.raises(NotFound) as none:
        site.fleet.relay_target("4242")
    assert str(theirs.value) == str(none.value).replace("4242", "42")
    assert site.fleet.registry.all() == [] and site.fleet.registry.of_job("42") == []


def test_an_admin_sees_every_job_but_the_check_decides_what_reaches_it(site, enroll):
    enroll()
    g.site_user = SimpleNamespace(name="dana", admin=True)
    assert [a.name for a in site.fleet.registry.all()] == ["c1.42.n1"]
    with pytest.raises(NotFound):  # the default check: owners only (dxflow.site.users sets the admin policy)
        site.fleet.relay_target("42")


def test_no_user_no_agents(site, enroll):
    enroll()
    g.site_user = None
    with pytest.raises(AuthError):
        site.fleet.registry.all()


def test_a_job_id_two_clusters_have_must_be_named_with_its_cluster(site, enroll):
    enroll("42", "n1", "c1")
    enroll("42", "m1", "c2", port=7001)
    with pytest.raises(UsageError) as e:
        site.fleet.find("42")
    assert "c1, c2" in str(e.value) and e.value.exit_code == 2
    assert site.fleet.find("c2~42").reg.node == "m1"
    assert site.fleet.relay_target("c1~42").reg.node == "n1"


def test_a_node_the_job_does_not_have_names_the_ones_it_has(site, enroll):
    enroll("42", "n1")
    enroll("42", "n2", port=7001)
    with pytest.raises(NotFound, match="its nodes: n1, n2"):
        site.fleet.find("42", "n9")
    assert site.fleet.find("42", "n2").reg.node == "n2"


def test_an_agent_not_connected_to_this_replica_is_lost_here_and_says_so(site, enroll):
    agent = enroll(connected=False)
    with pytest.raises(AgentLost, match="not connected to site replica r1"):
        site.fleet.relay_target("42")
    site.store.set_state(agent.name, "ready")  # another replica reached it
    shown = site.fleet.shown(site.store.agent(agent.name))
    assert shown["state"] == "starting" and shown["detail"] == "not connected to site replica r1 yet"
    site.store.execute("UPDATE site_agents SET enrolled = ?", (time.time() - 60,))  # long enough to have dialled here
    shown = site.fleet.shown(site.store.agent(agent.name))
    assert shown["state"] == "lost" and shown["detail"] == "not connected to site replica r1"


def test_a_dropped_connection_unproves_the_agent_until_it_is_checked_again(site, enroll):
    agent = enroll()
    target = site.fleet.relay_target("42")
    site.gateway.up.discard(agent.name)
    site.fleet.agent_disconnected(agent.name, "test")
    assert site.fleet.verified(target) is None
    with pytest.raises(AgentLost):
        site.fleet.acquire(target)
    site.gateway.up.add(agent.name)
    site.fleet.agent_connected(agent.name)
    assert site.fleet.relay_target("42").name == agent.name


def test_an_agent_that_fails_its_identity_check_is_not_reached(site, enroll, keys):
    agent = enroll()
    reg = dict(asdict(agent.reg), public_key=auth.public_pem(keys[1]))  # the registration names another key
    site.store.set_registration(agent.name, reg)
    with pytest.raises(AgentLost, match="agent lost: c1.42.n1"):  # its token or its signature is refused
        site.fleet.relay_target("42")
    assert site.store.agent(agent.name).state == "lost" and site.fleet.verified(site.store.agent(agent.name)) is None


def test_the_gateway_reaches_the_agents_own_port_only(site, enroll):
    agent = enroll()
    target = site.fleet.relay_target("42")
    gen = site.fleet.proven_generation(target)
    site.fleet.pool.channel(target.reg.address, target.reg.port, generation=gen).close()
    with pytest.raises(AgentUnreachable, match="not available through the site"):
        site.fleet.pool.channel(target.reg.address, 22, generation=gen)
    with pytest.raises(AgentLost):
        site.fleet.pool.channel(target.reg.address, target.reg.port, generation=gen + 1000)
    assert agent.name in site.gateway.up


@pytest.mark.parametrize("cluster, job, node, user, runs", [
    ("c1", "42", "n2", USER, True),
    ("c1", "42", "n3", USER, False),     # the job runs elsewhere
    ("c1", "77", "n3", USER, False),     # bob's job, named as the user's
    ("c1", "77", "n3", OTHER_USER, True),
    ("c1", "99", "n1", USER, False),     # no such job
    ("c2", "42", "n1", USER, False),     # the other cluster's job 42 runs on m1
    ("c2", "42", "m1", USER, True),
])
def test_job_runs_asks_that_clusters_scheduler(site, cluster, job, node, user, runs):
    assert site.fleet.job_runs(cluster, job, node, user) is runs


def test_job_runs_is_false_when_the_scheduler_cannot_say(site):
    (site.bins["c1"] / "squeue").write_text("#!/bin/sh\necho 'slurmctld down' >&2\nexit 1\n")
    assert site.fleet.job_runs("c1", "42", "n1", USER) is False


def test_an_agent_whose_job_ended_is_gone(site, enroll):
    agent = enroll("42", "n1")
    ended = enroll("43", "n1", port=7001)
    site.store.execute("UPDATE site_agents SET enrolled = ?", (time.time() - 60,))
    site.fleet.cycle()
    assert site.store.agent(ended.name).state == "gone" and "ended" in site.store.agent(ended.name).detail
    assert site.store.agent(agent.name).state != "gone"
    with pytest.raises(NotFound):
        site.fleet.relay_target("43")


def test_ls_reads_stale_metrics_of_the_users_ready_agents_again(site, enroll):
    agent = enroll()
    site.fleet.relay_target("42")
    site.store.set_metrics(agent.name, {"load": 99.0}, at=time.time() - 60)
    site.fleet.refresh()
    fresh = site.store.agent(agent.name)
    assert fresh.node_info.get("load") != 99.0 and fresh.metrics_age() < 10
    assert site.fleet.shown(fresh)["metrics_fresh"] is True


def test_replicas_share_the_agents_and_each_proves_its_own(site, enroll, tmp_path):
    """Two fleets on one store stand for two replicas: the agent dialled only the first so far."""
    other = SiteFleet(SiteServiceConfig(state_dir=str(tmp_path), replica="r2", clusters=site.config.clusters),
                      Store(str(tmp_path / "site.db")), site.fleet._token_key)
    other.gateway = Gateway(other.store, site.gateway.nodes)  # no connection of any agent to r2
    try:
        agent = enroll()
        assert site.fleet.relay_target("42").name == agent.name
        assert other.store.agent(agent.name).state == "ready"  # what r1 found is in the shared store
        with pytest.raises(AgentLost, match="not connected to site replica r2"):
            other.relay_target("42")  # ... but r2 proves for itself, on its own connection
        other.gateway.up.add(agent.name)
        other.agent_connected(agent.name)
        assert other.relay_target("42").name == agent.name
        site.fleet._gone(site.store.agent(agent.name), "job ended")  # one replica sees the job end
        with pytest.raises(NotFound):
            other.relay_target("42")
    finally:
        other.stop()
        other.store.close()


def test_the_loop_proves_a_newly_connected_agent_without_a_request(site, enroll):
    agent = enroll()
    site.fleet.agent_connected(agent.name)
    site.fleet.cycle()
    deadline = time.monotonic() + 30
    while site.store.agent(agent.name).state != "ready" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert site.store.agent(agent.name).state == "ready" and site.fleet.verified(site.store.agent(agent.name))


def test_a_job_id_is_itself_before_it_is_a_pbs_ids_number(site, enroll):
    enroll("42", "n1", "c1")
    enroll("42.pbs", "m1", "c2", port=7001)  # PBS's id: its number is another cluster's Slurm id
    assert site.fleet.find("42").reg.cluster == "c1"       # what the CLI sends for c1/42: the exact id
    assert site.fleet.find("c2~42").reg.job == "42.pbs"   # qstat's way: the number, in its cluster
    enroll("43.pbs", "m1", "c2", port=7002)
    assert site.fleet.find("43").reg.job == "43.pbs"


def test_replicas_take_turns_at_the_periodic_question_to_the_scheduler(site, enroll, tmp_path, monkeypatch):
    monkeypatch.setattr("dxflow.site.fleet.SCHEDULER_INTERVAL", 1e9)  # one turn for the whole test
    ended = enroll("43", "n1")
    site.store.execute("UPDATE site_agents SET enrolled = ?", (time.time() - 60,))
    other = SiteFleet(site.config, Store(str(tmp_path / "site.db")), site.fleet._token_key)
    try:
        other._ask_schedulers(other.store.agents(), shared=True)  # r2's turn this interval: it finds the end
        assert site.store.agent(ended.name).state == "gone"
        site.store.execute("UPDATE site_agents SET state = 'starting' WHERE name = ?", (ended.name,))  # back
        site.fleet._ask_schedulers(site.store.agents(), shared=True)  # r1 leaves this interval's question to r2
        assert site.store.agent(ended.name).state == "starting"
        site.fleet._ask_schedulers(site.store.agents(), shared=False)  # news (a drop) is asked about at once
        assert site.store.agent(ended.name).state == "gone"
    finally:
        other.stop()
        other.store.close()
