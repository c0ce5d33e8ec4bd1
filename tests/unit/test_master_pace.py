"""How often the master looks at ~/.dxflow/fleet and asks the scheduler, and its idle exit (issue #11).

A real Fleet on a real folder; the seams faked (``fake_scheduler``, ``fake_nodes`` of tests/conftest.py): the
scheduler (counts its questions) and the tunnels (no node here: every check fails fast, which leaves agents
"lost", never "live")."""

from __future__ import annotations

import getpass
import os
import threading
import time
from pathlib import Path

import pytest

from dxflow import registration
from dxflow.auth import user_key
from dxflow.config import SiteConfig
from dxflow.master import fleet as fleet_mod
from dxflow.master.fleet import Fleet
from dxflow.master import pace
from dxflow.master.pace import AskPolicy, Backoff, Clients, FolderWatch
from dxflow.master.server import ClientActivity
from dxflow.registration import Registration
from dxflow.schedulers.base import QUERY_BUDGET

USER = getpass.getuser()


def age(path: Path, seconds: float = 10.0) -> None:
    """Make the folder's modification time old (a change is trusted only once it is older than RECENT)."""
    t = time.time() - seconds
    os.utime(path, (t, t))


# -- the folder ---------------------------------------------------------------------------------------

def test_folder_is_read_only_when_it_changed(tmp_path):
    watch = FolderWatch(tmp_path, rescan_every=3600)
    assert watch.changed()          # never read yet
    age(tmp_path)
    watch.read()
    assert not watch.changed()
    (tmp_path / ".a.tmp").write_text("{}")
    os.replace(tmp_path / ".a.tmp", tmp_path / "a.json")   # how an agent registers
    assert watch.changed()
    age(tmp_path)
    watch.read()
    assert not watch.changed()
    (tmp_path / "a.json").unlink()                          # how it goes
    assert watch.changed()
    age(tmp_path)
    watch.read()
    watch.force()                                           # a command wants a fresh view
    assert watch.changed()


def test_a_recent_change_is_read_again(tmp_path, monkeypatch):
    """A second change within the same tick of a coarse clock would keep the modification time."""
    monkeypatch.setattr(pace, "RECENT", 0.3)
    watch = FolderWatch(tmp_path, rescan_every=3600)
    (tmp_path / "a.json").write_text("{}")
    watch.read()
    assert watch.changed()          # modified just now: not trusted yet
    time.sleep(0.35)
    assert not watch.changed()


def test_folder_is_read_now_and_then_anyway(tmp_path):
    watch = FolderWatch(tmp_path, rescan_every=0.05)
    age(tmp_path)
    watch.read()
    assert not watch.changed()
    time.sleep(0.06)
    assert watch.changed()


def test_backoff_doubles_to_its_ceiling_and_resets():
    b = Backoff(0.5, 5.0)
    assert [b.next() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    b.reset()
    assert b.next() == 0.5


def test_ask_policy_news_at_most_every_gap_otherwise_every_interval():
    p = AskPolicy(interval=100.0, gap=10.0)
    assert p.due(0.0)
    p.asked(1000.0)
    assert not p.due(1005.0) and p.wait(1005.0) >= 75.0   # next in 80-120 s
    p.want()
    assert not p.due(1005.0) and p.due(1010.0)
    p.asked(1010.0)
    assert 80.0 <= p.wait(1010.0) <= 120.0


def test_clients_count_a_streaming_answer_until_it_is_closed():
    clients = Clients()

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        return iter([b"a", b"b"])

    wrapped = ClientActivity(app, clients)
    body = wrapped({}, lambda *a: None)
    time.sleep(0.05)
    assert clients.idle_for() == 0.0      # in flight
    assert b"".join(body) == b"ab"
    body.close()
    time.sleep(0.05)
    assert clients.idle_for() >= 0.04
    body.close()                          # once only
    assert clients.idle_for() >= 0.04


# -- the fleet's questions ------------------------------------------------------------------------------

@pytest.fixture
def fleet(tmp_path, monkeypatch, fake_scheduler, fake_nodes):
    """A Fleet, the scheduler seam counting its questions, and no node to reach (tests/conftest.py)."""
    base = tmp_path / "dxflow"
    (base / "fleet").mkdir(parents=True, mode=0o700)
    user_key(base)
    sched = fake_scheduler
    reads = []
    real_read_all = registration.read_all
    monkeypatch.setattr(fleet_mod.registration, "read_all",
                        lambda *a, **kw: reads.append(1) or real_read_all(*a, **kw))
    site = SiteConfig(master_check_interval=3600, master_check_gap=0.3, fleet_scan_interval=0.05,
                      fleet_scan_max=0.2, master_idle_exit=0, controller_queries_per_minute=0)
    f = Fleet(base, USER, pool=fake_nodes, site=site)
    yield f, sched, reads
    f.stop()
    QUERY_BUDGET.resize(0)


def register(f: Fleet, job: str, node: str = "n1") -> Registration:
    reg = Registration(cluster="t", scheduler="slurm", job=job, node=node, address="n1.invalid", port=1,
                       pid=os.getpid(), user=USER, started="2024-01-01T00:00:00+00:00", public_key="x",
                       api_version=1, version="test")
    registration.write(f.fleet_dir, reg)
    return reg


def settle(f: Fleet) -> None:
    age(f.fleet_dir)
    f.cycle()


def test_one_question_per_news_none_while_nothing_changes(fleet):
    f, sched, reads = fleet
    f.cycle()
    assert sched.asked == 0                  # no agent: nothing to ask about
    sched.add("7")
    register(f, "7")
    f.cycle()
    assert sched.asked == 1                  # a registration appeared
    settle(f)
    reads.clear()
    for _ in range(20):
        f.cycle()
    assert sched.asked == 1 and reads == []  # nothing changed: no question, the folder not even read
    time.sleep(0.3)
    sched.add("8")
    register(f, "8")
    f.cycle()
    assert sched.asked == 2 and len(reads) == 1


def test_a_burst_of_registrations_is_confirmed_by_few_questions(fleet):
    f, sched, _ = fleet
    sched.add("9")
    t0 = time.monotonic()
    for i in range(40):                      # a 40-node job starting over ~0.6 s
        register(f, "9", f"n{i}")
        f.cycle()
        time.sleep(0.015)
    took = time.monotonic() - t0
    assert sched.asked <= 1 + took / 0.3 + 1  # at most one per master_check_gap, not one per node
    assert all(a.state != "gone" for a in f.registry.all())


def test_an_answer_older_than_a_registration_drops_nothing(fleet):
    f, sched, _ = fleet
    sched.add("7")
    register(f, "7")
    f.cycle()
    assert sched.asked == 1
    register(f, "8")                         # its job started after that answer
    f.cycle()                                # within the gap: no new question yet
    assert sched.asked == 1 and f.registry.get("t.8.n1").state != "gone"
    time.sleep(0.31)
    f.cycle()                                # asked now: job 8 is not running (it ended) -> gone
    assert sched.asked == 2 and f.registry.get("t.8.n1").state == "gone"
    assert not (f.fleet_dir / "t.8.n1.json").exists()


def test_a_command_asks_again(fleet):
    f, sched, reads = fleet
    sched.add("7")
    register(f, "7")
    f.cycle()
    settle(f)
    time.sleep(0.31)
    asked, read = sched.asked, len(reads)
    f.refresh()                              # `dxflow ls`
    f.cycle()
    assert sched.asked == asked + 1 and len(reads) == read + 1


def test_a_command_naming_a_new_agent_finds_it_between_two_looks(fleet):
    """`dxflow logs -f JOB` a moment after the job started: the folder is read for it, not in 5 s."""
    f, _, _ = fleet
    register(f, "7")
    f.cycle()
    settle(f)
    register(f, "9", "n2")                   # no look since
    assert f.find("9").reg.node == "n2"
    register(f, "7", "n2")                   # a second node of a known job
    assert f.find("7", "n2").reg.node == "n2"


def test_the_cap_holds_the_master_too(fleet):
    f, sched, _ = fleet
    QUERY_BUDGET.resize(2)
    sched.add("7")
    register(f, "7")
    for _ in range(10):
        f.refresh()
        f.cycle()
        time.sleep(0.31)
    assert sched.asked == 2


# -- idle exit ---------------------------------------------------------------------------------------

def start_idle_watch(f: Fleet) -> threading.Event:
    idle = threading.Event()
    f.on_idle = idle.set
    threading.Thread(target=f.run, daemon=True).start()
    return idle


def test_idle_master_exits(fleet):
    f, _, _ = fleet
    object.__setattr__(f.site, "master_idle_exit", 0.3)
    assert start_idle_watch(f).wait(5)


def test_a_client_in_flight_keeps_it(fleet):
    f, _, _ = fleet
    object.__setattr__(f.site, "master_idle_exit", 0.3)
    f.clients.began()                        # `dxflow logs -f` is streaming
    idle = start_idle_watch(f)
    assert not idle.wait(1.0)
    f.clients.ended()
    assert idle.wait(5)


def test_a_live_agent_keeps_it(fleet):
    f, sched, _ = fleet
    object.__setattr__(f.site, "master_idle_exit", 0.3)
    f.registry.upsert(register(f, "7"))       # read in, as a look would (job 7 is no job of the fake scheduler)
    f.registry.set_state("t.7.n1", "ready")
    f.cycle = lambda: None                   # keep it ready (no node to check it on here)
    assert not start_idle_watch(f).wait(1.0)
