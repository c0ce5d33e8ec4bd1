"""The fleet watcher (:mod:`dxflow.master.fleet`): registrations in, checked agents out.

A real :class:`Fleet` on a real ``~/.dxflow`` folder, real agent apps answering its checks; the
scheduler's controller and SSH to the nodes are the faked seams of ``tests/conftest.py``
(``fake_scheduler``, ``fake_nodes``, ``node_agent``).
"""

from __future__ import annotations

import getpass
import socket
import threading
import time

import pytest

from dxflow import registration
from dxflow.errors import AgentLost, AgentStarting, NotFound
from dxflow.master import fleet as fleet_mod
from dxflow.master.fleet import Fleet
from dxflow.schedulers import JobState

USER = getpass.getuser()
#: the stories' other user ("bob"), never whoever runs the tests (a developer may be bob)
OTHER_USER = "bob" if USER != "bob" else "alice"
OTHER_UID = 65534  # nobody: "another user" in the node's table of sockets
TABLE = "read /proc/net/tcp"



@pytest.fixture
def base(user_base):
    return user_base


@pytest.fixture
def fleet(fake_fleet):
    return fake_fleet


def wait_for(predicate, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def state(fleet: Fleet, name: str) -> tuple[str, str]:
    agent = fleet.registry.get(name)
    assert agent is not None, f"no row for {name}"
    return agent.state, agent.detail


def settle(fleet: Fleet, name: str, want: str) -> tuple[str, str]:
    """Look (cycle) until the agent ``name`` is in state ``want``: the watcher's checks run in threads."""
    def reached():
        fleet.cycle()
        return state(fleet, name)[0] == want
    wait_for(reached, f"{name} {want}")
    return state(fleet, name)


def thief(node, port: int) -> list[bytes]:
    """Another user's process takes PORT on NODE; it records every byte it is sent."""
    got: list[bytes] = []

    def serve(sock: socket.socket) -> None:
        while data := sock.recv(65536):
            got.append(data)
    node.listen(port, serve, uid=OTHER_UID)
    return got


# -- registrations appear and disappear ------------------------------------------------------------------

def test_a_new_registration_of_a_running_job_becomes_a_ready_agent(fleet, base, fake_scheduler, node_agent):
    fake_scheduler.add("7", nodes=("n1",))
    a = node_agent(base, "7")
    fleet.cycle()
    assert state(fleet, a.reg.name)[0] == "starting"    # seen, not checked yet
    settle(fleet, a.reg.name, "ready")
    assert fleet.registry.get(a.reg.name).node_info["hostname"]  # its /api/node answer is kept
    assert fake_scheduler.users == [USER]                # one filtered question: the user's jobs


def test_a_removed_registration_makes_its_agent_gone(fleet, base, fake_scheduler, node_agent):
    fake_scheduler.add("7", nodes=("n1",))
    a = node_agent(base, "7")
    settle(fleet, a.reg.name, "ready")
    registration.remove(base / "fleet", a.reg.name)      # the epilog ran
    fleet.cycle()
    assert state(fleet, a.reg.name) == ("gone", "registration removed (agent stopped)")
    with pytest.raises(NotFound, match="no agent of job 7"):
        fleet.relay_target("7")


def test_a_gone_row_is_forgotten_after_a_while(fleet, base, fake_scheduler, node_agent, monkeypatch):
    fake_scheduler.add("7")
    a = node_agent(base, "7")
    fleet.cycle()
    registration.remove(base / "fleet", a.reg.name)
    fleet.cycle()
    assert state(fleet, a.reg.name)[0] == "gone"         # kept for `dxflow ls --all`
    monkeypatch.setattr(fleet_mod, "GONE_KEEP", 0.0)
    fleet.refresh(metrics=False)
    fleet.cycle()
    assert fleet.registry.get(a.reg.name) is None


def test_a_check_that_ends_after_its_agent_went_leaves_it_gone_and_unproven(fleet, base, fake_scheduler,
                                                                          node_agent):
    """A check runs in a thread: its agent's registration may go while it asks (seen as a flaky
    test_a_gone_row_is_forgotten_after_a_while on a busy CI machine). Its success must not make the gone
    agent ready again, nor leave its proof behind."""
    fake_scheduler.add("7")
    a = node_agent(base, "7")
    fleet.cycle()
    handed = fleet.registry.get(a.reg.name)  # what a check started now was handed
    registration.remove(base / "fleet", a.reg.name)
    fleet.cycle()
    assert state(fleet, a.reg.name)[0] == "gone"
    with fleet._agent_lock(a.reg.name):
        fleet._check_locked(handed)  # the late check, run to its end: the agent itself still answers
    assert state(fleet, a.reg.name)[0] == "gone"
    assert fleet.verified(handed) is None


def test_an_ended_job_makes_its_agents_gone_and_removes_their_files(fleet, base, fake_scheduler, node_agent):
    fake_scheduler.add("7", nodes=("n1", "n2"))
    a1, a2 = node_agent(base, "7", "n1"), node_agent(base, "7", "n2")
    settle(fleet, a1.reg.name, "ready")
    fake_scheduler.end("7")
    fleet.refresh(metrics=False)
    fleet.cycle()
    for a in (a1, a2):
        assert state(fleet, a.reg.name) == ("gone", "job ended")
        assert not (base / "fleet" / f"{a.reg.name}.json").exists()


def test_an_ending_job_is_gone_too(fleet, base, fake_scheduler, node_agent):
    fake_scheduler.add("7", nodes=("n1",))
    a = node_agent(base, "7")
    fleet.cycle()
    fake_scheduler.add("7", nodes=("n1",), state=JobState.ENDING)
    fleet.refresh(metrics=False)
    fleet.cycle()
    assert state(fleet, a.reg.name) == ("gone", "job ending")


def test_a_registration_on_a_node_the_job_does_not_run_on_is_gone(fleet, base, fake_scheduler, node_agent):
    fake_scheduler.add("7", nodes=("n2",))
    a = node_agent(base, "7", "n1")
    fleet.cycle()
    assert state(fleet, a.reg.name) == ("gone", "job 7 does not run on n1")
    assert fleet.pool.log == []                          # nothing was sent to the node


def test_a_scheduler_that_does_not_answer_drops_nothing(fleet, base, fake_scheduler, node_agent):
    a = node_agent(base, "7")
    fake_scheduler.fail = True
    fleet.cycle()
    fleet.refresh(metrics=False)
    fleet.cycle()
    assert state(fleet, a.reg.name)[0] in ("starting", "ready")  # unknown: neither confirmed nor dropped
    assert (base / "fleet" / f"{a.reg.name}.json").exists()


def test_another_users_registration_is_not_this_masters(fleet, base, fake_scheduler, node_agent):
    fake_scheduler.add("7")
    a = node_agent(base, "7", user=OTHER_USER)
    fleet.cycle()
    assert fleet.registry.get(a.reg.name) is None


# -- the verification gate ---------------------------------------------------------------------------------

def test_the_ports_owner_is_read_before_the_first_byte_goes_to_a_new_agent(fleet, base, fake_scheduler,
                                                                           fake_nodes, node_agent):
    fake_scheduler.add("7", nodes=("n1",))
    node_agent(base, "7")
    agent = fleet.relay_target("7")
    assert agent.state == "ready" and fleet.verified(agent) == 1
    assert fake_nodes.log[0] == f"n1 {TABLE}"            # the table first, then the agent
    assert "n1 open 7000" in fake_nodes.log
    before = list(fake_nodes.log)
    assert fleet.relay_target("7").name == agent.name    # proven: not read nor checked again
    assert fake_nodes.log == before


def test_another_users_process_on_the_port_gets_not_one_byte(fleet, base, fake_scheduler, fake_nodes,
                                                              node_agent):
    fake_scheduler.add("7", nodes=("n1",))
    a = node_agent(base, "7")
    a.node.stop(7000)
    got = thief(a.node, 7000)
    for _ in range(3):
        with pytest.raises(AgentLost, match=r"held by another user's process \(uid 65534\)"):
            fleet.relay_target("7")
        with pytest.raises(AgentLost):
            fleet.connection(fleet.find("7"))
        with pytest.raises(AgentLost):
            fleet.acquire(fleet.find("7"))
    assert state(fleet, a.reg.name)[0] == "lost"
    assert got == [] and "n1 open 7000" not in fake_nodes.log


def test_an_agent_that_cannot_sign_with_the_registered_key_is_lost(fleet, base, fake_scheduler, node_agent):
    fake_scheduler.add("7", nodes=("n1",))
    a = node_agent(base, "7")
    a.node.stop(7000)
    # the user's own process on the same port, claiming the registered key but without its private half
    node_agent(base, "7", write=False, public_key=a.state.public_key, audience=a.state.audience)
    with pytest.raises(AgentLost, match="identity check failed"):
        fleet.relay_target("7")
    assert state(fleet, a.reg.name) == ("lost", "identity check failed: not the registered agent")


def test_a_new_transport_to_the_node_asks_for_a_new_check(fleet, base, fake_scheduler, fake_nodes, node_agent):
    fake_scheduler.add("7", nodes=("n1",))
    node_agent(base, "7")
    agent = fleet.relay_target("7")
    fake_nodes.replace_transport("n1")
    assert fleet.verified(agent) is None
    with pytest.raises(AgentLost, match="not checked on the tunnel in use"):
        fleet.connection(agent)
    reads = fake_nodes.log.count(f"n1 {TABLE}")
    assert fleet.verified(fleet.relay_target("7")) == 2
    assert fake_nodes.log.count(f"n1 {TABLE}") == reads + 1


# -- lost ---------------------------------------------------------------------------------------------------

def test_a_stopped_agent_is_lost_at_once_and_stays_lost(fleet, base, fake_scheduler, node_agent):
    fake_scheduler.add("7", nodes=("n1",))
    a = node_agent(base, "7")
    fleet.relay_target("7")
    a.node.stop(7000)                                     # its process died: the heartbeat stream ends
    wait_for(lambda: state(fleet, a.reg.name)[0] == "lost", "the agent lost")
    assert "agent stopped: its connection closed" in state(fleet, a.reg.name)[1]
    with pytest.raises(AgentLost, match="nothing listens on port 7000 on n1"):
        fleet.relay_target("7")
    assert fleet._check_wait(fleet.registry.get(a.reg.name)) == fleet_mod.LOST_RETRY  # retried, not forgotten


def test_a_lost_agent_that_answers_again_is_ready_again(fleet, base, fake_scheduler, node_agent):
    fake_scheduler.add("7", nodes=("n1",))
    a = node_agent(base, "7")
    a.node.stop(7000)
    with pytest.raises(AgentLost):
        fleet.relay_target("7")
    node_agent(base, "7", key=a.state.key, write=False)  # the same agent listens again (a node back from a hang)
    assert fleet.relay_target("7").state == "ready"


def test_an_unreachable_node_makes_its_agent_lost_not_gone(fleet, base, fake_scheduler, fake_nodes, node_agent):
    fake_scheduler.add("7", nodes=("n1",))
    a = node_agent(base, "7")
    fake_nodes.node("n1").reachable = False
    with pytest.raises(AgentLost, match="cannot connect by SSH"):
        fleet.relay_target("7")
    assert state(fleet, a.reg.name)[0] == "lost"


# -- which agent a request goes to -------------------------------------------------------------------------

def test_a_job_without_a_node_goes_to_its_first_node_in_the_schedulers_order(fleet, base, fake_scheduler,
                                                                             node_agent):
    fake_scheduler.add("7", nodes=("n2", "n1"))
    node_agent(base, "7", "n1")
    node_agent(base, "7", "n2")
    fleet.refresh(metrics=False)
    fleet.cycle()
    assert fleet.relay_target("7").reg.node == "n2"
    assert fleet.relay_target("7", "n1").reg.node == "n1"
    with pytest.raises(NotFound, match="job 7 has no agent on node n3; its nodes: n1, n2"):
        fleet.relay_target("7", "n3")
    with pytest.raises(NotFound, match="no agent of job 8"):
        fleet.relay_target("8")


def test_a_job_the_scheduler_was_not_asked_about_goes_to_its_first_node_by_name(fleet, base, node_agent):
    node_agent(base, "7", "n2")
    node_agent(base, "7", "n1")
    assert fleet.find("7").reg.node == "n1"


def test_a_request_for_an_agent_under_check_waits_then_says_starting(fleet, base, fake_scheduler, node_agent,
                                                                      monkeypatch):
    fake_scheduler.add("7", nodes=("n1",))
    a = node_agent(base, "7")
    monkeypatch.setattr(fleet_mod, "VERIFY_WAIT", 0.2)
    lock = fleet._agent_lock(a.reg.name)                  # a check of it is under way
    with lock:
        with pytest.raises(AgentStarting, match="still being checked"):
            fleet.relay_target("7")
    assert fleet.relay_target("7").state == "ready"


def test_one_check_serves_requests_that_arrive_together(fleet, base, fake_scheduler, fake_nodes, node_agent):
    fake_scheduler.add("7", nodes=("n1",))
    node_agent(base, "7")
    fleet.cycle()
    results: list[object] = []

    def request() -> None:
        try:
            results.append(fleet.relay_target("7").state)
        except Exception as e:  # noqa: BLE001 - collected for the assertion
            results.append(e)
    threads = [threading.Thread(target=request) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == ["ready"] * 5
    assert fake_nodes.log.count(f"n1 {TABLE}") == 1      # checked once, not once per request
