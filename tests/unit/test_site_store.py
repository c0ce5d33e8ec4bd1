"""The site's store, on SQLite always and on PostgreSQL when ``DXFLOW_TEST_PG`` names one (a libpq URL;
the lab's: see docs/lab.md). Each PostgreSQL test works in a schema of its own, dropped afterwards, so
a live site service on the same database is never touched."""

from __future__ import annotations

import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from urllib.parse import quote

import pytest

from dxflow.errors import DxflowError, UsageError
from dxflow.registration import Registration
from dxflow.site.store import Store

PG = os.environ.get("DXFLOW_TEST_PG", "")


def _pg_url(schema: str) -> str:
    sep = "&" if "?" in PG else "?"
    return f"{PG}{sep}options={quote(f'-c search_path={schema}')}"


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request, tmp_path):
    """``open_store()``: a Store on the test's database; called again, another connection to the same
    one (as a second replica would have)."""
    made: list[Store] = []
    if request.param == "sqlite":
        url = str(tmp_path / "site.db")
    else:
        if not PG:
            pytest.skip("DXFLOW_TEST_PG is not set (a libpq URL of a PostgreSQL database the test may use)")
        import psycopg

        schema = f"dxflow_test_{secrets.token_hex(4)}"
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        url = _pg_url(schema)

    def open_() -> Store:
        made.append(Store(url))
        return made[-1]
    yield open_
    for store in made:
        store.close()
    if request.param == "postgresql":
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


def registration(cluster="c1", job="12", node="n1", user="alice", port=7001, pid=4242) -> dict:
    return asdict(Registration(cluster=cluster, scheduler="slurm", job=job, node=node, address=node, port=port,
                               pid=pid, user=user, started="2026-01-01T00:00:00+00:00", public_key="PEM",
                               api_version=1, version="test"))


def test_an_enrolled_agent_is_starting_with_who_enrolled_it(open_store):
    store = open_store()
    agent = store.enroll("c1", "12", "n1", "alice", 1001, "SHA256:key1", registration())
    assert agent.name == "c1.12.n1" and agent.state == "starting"
    assert (agent.reg.user, agent.uid, agent.gateway_key, agent.reg.port) == ("alice", 1001, "SHA256:key1", 7001)
    assert store.agent("c1.12.n1") == agent
    assert store.agent("c1.12.n2") is None


def test_enrolling_again_replaces_the_old_agent_and_its_state(open_store):
    store = open_store()
    store.enroll("c1", "12", "n1", "alice", 1001, "SHA256:old", registration(pid=1))
    store.set_state("c1.12.n1", "ready", "", node_info={"load": 1.0})
    again = store.enroll("c1", "12", "n1", "alice", 1001, "SHA256:new", registration(pid=2))
    assert (again.gateway_key, again.reg.pid, again.state, again.node_info) == ("SHA256:new", 2, "starting", {})
    assert len(store.agents()) == 1


def test_an_agent_without_its_registration_yet_has_nothing_to_reach(open_store):
    store = open_store()
    agent = store.enroll("c1", "12", "n1", "alice", 1001, "SHA256:k")
    assert agent.reg.port == 0 and agent.reg.public_key == "" and agent.reg.user == "alice"
    store.set_registration("c1.12.n1", registration(port=7009))
    assert store.agent("c1.12.n1").reg.port == 7009


@pytest.mark.parametrize("bad", [registration(user="bob"), registration(node="n2"), {"port": 1}])
def test_a_registration_naming_another_agent_or_user_is_refused_and_changes_nothing(open_store, bad):
    store = open_store()
    store.enroll("c1", "12", "n1", "alice", 1001, "SHA256:k", registration())
    with pytest.raises(UsageError):
        store.set_registration("c1.12.n1", bad)
    with pytest.raises(UsageError):
        store.enroll("c1", "12", "n1", "alice", 1001, "SHA256:k2", bad)
    assert store.agent("c1.12.n1").reg.user == "alice" and store.agent("c1.12.n1").gateway_key == "SHA256:k"


def test_agents_are_listed_by_user_cluster_and_job(open_store):
    store = open_store()
    store.enroll("c1", "12", "n1", "alice", 1001, "k1", registration())
    store.enroll("c1", "12", "n2", "alice", 1001, "k2", registration(node="n2"))
    store.enroll("c2", "12", "n1", "bob", 1002, "k3", registration(cluster="c2", user="bob"))
    store.enroll("c2", "17.pbs", "n1", "bob", 1002, "k4", registration(cluster="c2", job="17.pbs", user="bob"))
    store.enroll("c2", "170", "n1", "bob", 1002, "k5", registration(cluster="c2", job="170", user="bob"))
    names = lambda agents: [a.name for a in agents]  # noqa: E731
    assert names(store.agents(user="alice")) == ["c1.12.n1", "c1.12.n2"]
    assert names(store.agents(job="12")) == ["c1.12.n1", "c1.12.n2", "c2.12.n1"]
    assert names(store.agents(cluster="c2", job="12")) == ["c2.12.n1"]
    # a PBS id by its number, and nothing that merely starts with the same digits
    assert names(store.agents(job_number="17")) == ["c2.17.pbs.n1"]
    assert names(store.agents(job_number="1_")) == []


def test_state_changes_keep_when_they_changed_and_metrics_their_time(open_store):
    store = open_store()
    store.enroll("c1", "12", "n1", "alice", 1001, "k", registration())
    before = store.agent("c1.12.n1")
    store.set_state("c1.12.n1", "ready", "", node_info={"load": 0.5})
    ready = store.agent("c1.12.n1")
    assert ready.state == "ready" and ready.node_info == {"load": 0.5} and ready.metrics_at > 0
    assert ready.changed >= before.changed and ready.checked > 0
    store.set_state("c1.12.n1", "ready", "still")
    assert store.agent("c1.12.n1").changed == ready.changed  # the same state: not a change
    store.set_metrics("c1.12.n1", {"load": 2.0}, at=123.0)
    assert store.agent("c1.12.n1").node_info == {"load": 2.0} and store.agent("c1.12.n1").metrics_at == 123.0
    with pytest.raises(ValueError):
        store.set_state("c1.12.n1", "sleeping")
    store.delete("c1.12.n1")
    assert store.agents() == []


def test_a_gone_agent_is_not_made_ready_by_a_check_that_ends_late(open_store):
    store = open_store()
    store.enroll("c1", "12", "n1", "alice", 1001, "SHA256:key1", registration())
    store.set_state("c1.12.n1", "gone", "job ended")
    assert not store.set_state("c1.12.n1", "ready", "", node_info={"load": 1.0})
    assert not store.set_state("c1.12.n1", "lost", "no answer")
    assert (store.agent("c1.12.n1").state, store.agent("c1.12.n1").detail) == ("gone", "job ended")
    store.enroll("c1", "12", "n1", "alice", 1001, "SHA256:key2", registration(pid=2))  # enrolled again
    assert store.set_state("c1.12.n1", "ready", "")
    assert store.agent("c1.12.n1").state == "ready"


def test_a_claim_is_granted_once_across_replicas_until_it_expires(open_store):
    a, b = open_store(), open_store()
    assert a.claim("credential", "abc", time.time() + 60) is True
    assert b.claim("credential", "abc", time.time() + 60) is False   # the other replica sees it used
    assert a.claim("login-token", "abc", time.time() + 60) is True   # another kind: another claim
    a.execute("UPDATE site_claims SET expires = 0 WHERE claim = ?", ("abc",))
    b._swept = 0.0  # the next claim sweeps expired ones
    assert b.claim("other", "x", time.time() + 60) is True
    assert a.query("SELECT kind FROM site_claims ORDER BY kind") == [("other",)]


def test_other_modules_make_and_use_tables_of_their_own(open_store):
    store = open_store()
    store.ddl(["CREATE TABLE IF NOT EXISTS site_test_things (id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL, "
               "n BIGINT NOT NULL DEFAULT 0)"])
    store.ddl(["CREATE TABLE IF NOT EXISTS site_test_things (id TEXT PRIMARY KEY, at DOUBLE PRECISION NOT NULL)"])
    assert store.execute("INSERT INTO site_test_things (id, at) VALUES (?, ?)", ("a%b", 1796000000.25)) == 1
    assert store.execute("INSERT INTO site_test_things (id, at) VALUES (?, ?) ON CONFLICT (id) DO NOTHING",
                         ("a%b", 2.0)) == 0
    row = store.query_one("SELECT id, at, n FROM site_test_things WHERE id LIKE ?", ("a%",))
    assert row == ("a%b", 1796000000.25, 0)
    assert store.query_one("SELECT id FROM site_test_things WHERE id = ?", ("none",)) is None
    with pytest.raises(DxflowError, match="site database"):
        store.query("SELECT nothing FROM no_such_table")


def test_what_one_store_wrote_another_reads(open_store):
    open_store().enroll("c1", "12", "n1", "alice", 1001, "k", registration())
    assert [a.name for a in open_store().agents()] == ["c1.12.n1"]


def test_a_dropped_postgresql_connection_is_opened_again(open_store):
    store = open_store()
    if store.kind != "postgresql":
        pytest.skip("PostgreSQL only: SQLite has no server to drop the connection")
    store.enroll("c1", "12", "n1", "alice", 1001, "k", registration())
    (pid,) = store.query_one("SELECT pg_backend_pid()")
    open_store().query("SELECT pg_terminate_backend(?)", (pid,))  # what a PostgreSQL restart does to it
    assert store.agent("c1.12.n1").reg.user == "alice"
    assert store.query_one("SELECT pg_backend_pid()")[0] != pid


def test_a_replica_holds_a_few_postgresql_connections_however_many_threads_ask(open_store):
    store = open_store()
    if store.kind != "postgresql":
        pytest.skip("PostgreSQL only: SQLite is one connection anyway")
    from dxflow.site.store import PG_CONNECTIONS

    with ThreadPoolExecutor(max_workers=4 * PG_CONNECTIONS) as pool:
        pids = set(pool.map(lambda _: store.query_one("SELECT pg_backend_pid(), pg_sleep(0.01)")[0], range(200)))
    assert 1 <= len(pids) <= PG_CONNECTIONS
