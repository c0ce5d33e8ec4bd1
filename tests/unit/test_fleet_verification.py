"""The master's one gate to agents: only an agent proven on the tunnel in use is sent anything.

A real agent (the agent's app under gunicorn, in its own process group) on this machine's
127.0.0.1 — the master reaches such an agent with a plain TCP connection instead of an SSH
channel — and a real :class:`Fleet`. The only stand-in is the node's transport generation
(``GenerationPool``), to show that a new tunnel asks for a new check. The "other user" is uid
65534 (nobody), which needs root; those tests are skipped otherwise. Run as a script, this file
is the agent's entry point.
"""

from __future__ import annotations

import getpass
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import pytest
from gunicorn_proc import running, serve

from dxflow.auth import fingerprint, new_key, public_pem, user_key, user_public_key
from dxflow.edge import tcptable
from dxflow.errors import AgentLost, AgentUnreachable
from dxflow.master import heartbeat, listeners
from dxflow.master.agentconn import AgentConnection
from dxflow.master.fleet import Fleet
from dxflow.master.heartbeat import Heartbeats
from dxflow.master.tunnels import TunnelPool
from dxflow.registration import Registration

JOB, NODE = "41", "n1"
NOBODY = 65534


# -- the agent (run in a subprocess) ------------------------------------------------------------------
def serve_agent(tmp: Path) -> None:
    from dxflow.agent import create_app
    from dxflow.agent.state import AgentState
    from dxflow.auth import private_pem
    from dxflow.signatures import load_private_key  # an agent signs with python-rsa

    key = new_key()
    pub = public_pem(key)
    state = AgentState(scheduler="local", cluster="test", job=JOB, node=NODE, user=getpass.getuser(),
                       home=tmp, key=load_private_key(private_pem(key)), public_key=pub, audience=fingerprint(pub),
                       user_public_key=user_public_key(tmp / "base"), work_dir=str(tmp), started=time.time())
    app = create_app(state)

    def ready(worker):
        (tmp / "agent.pub").write_text(pub)
        (tmp / "agent.pid").write_text(str(os.getpid()))

    serve(app, tmp / "agent.ready", ready, bind=["127.0.0.1:0"], worker_class="gthread", threads=8,
          errorlog=str(tmp / "agent.log"), graceful_timeout=1, keepalive=30)


# -- stand-ins and fixtures -----------------------------------------------------------------------------
class GenerationPool(TunnelPool):
    """The pool, with the node's transport generation under the test's control (the agent itself is local)."""

    def __init__(self) -> None:
        super().__init__(config=None)
        self.gen = 1
        self.reads: list[str] = []
        self.ended_gens: set[int] = set()   # the generations whose connection ended (a ControlMaster's end)
        self.asked_ended: list[int] = []

    def ended(self, address: str, generation: int, wait: float = 0.0) -> bool:
        self.asked_ended.append(generation)
        return generation in self.ended_gens

    def generation(self, address: str, job: str | None = None) -> int | None:
        return self.gen

    def connect(self, address: str, job: str | None = None) -> int:
        return self.gen

    def channel(self, address, port, timeout=10.0, generation=None):
        if generation is not None and generation != self.gen:
            raise AgentUnreachable(f"{address}: the tunnel was opened again since the agent was checked")
        return super().channel(address, port, timeout)

    def read_file(self, address, path, generation=None):
        self.reads.append(path)
        return super().read_file(address, path, generation)


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def agent(tmp_path):
    """A running agent: its registration (address localhost) and process group id."""
    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    user_key(base)
    # stopped with SIGKILL, as tests kill it: an agent that dies, not one that shuts down
    with running([sys.executable, __file__, str(tmp_path)], tmp_path / "agent.ready", tmp_path / "agent.log",
                 stderr=tmp_path / "agent.err", stop_signal=signal.SIGKILL) as server:
        reg = Registration(cluster="test", scheduler="local", job=JOB, node=NODE, address="localhost",
                           port=server.port, pid=server.proc.pid,
                           user=getpass.getuser(), started="2024-01-01T00:00:00+00:00",
                           public_key=(tmp_path / "agent.pub").read_text(), api_version=1, version="test")
        yield {"reg": reg, "pgid": server.proc.pid, "base": base}


def make_fleet(agent, pool: TunnelPool | None = None) -> Fleet:
    fleet = Fleet(agent["base"], getpass.getuser(), pool=pool or GenerationPool())
    fleet.registry.upsert(agent["reg"])
    return fleet


@pytest.fixture
def fleet(agent) -> Iterator[Fleet]:
    """A fleet of the test's user holding the running agent, on a :class:`GenerationPool`; stopped after."""
    f = make_fleet(agent)
    yield f
    f.stop()


def state_of(fleet: Fleet, reg: Registration) -> tuple[str, str]:
    a = fleet.registry.get(reg.name)
    assert a is not None
    return a.state, a.detail


class Listener:
    """A process of another user (nobody) listening on a port; it reports every byte it receives
    (and, given ``reply``, answers each connection with it)."""

    CODE = ("import socket,sys,threading\n"
            "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            "s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(16); print('listening', flush=True)\n"
            "def serve(c):\n"
            "    while True:\n"
            "        d=c.recv(65536)\n"
            "        if not d: return\n"
            "        print(len(d), flush=True)\n"
            "        if len(sys.argv) > 2: c.sendall(sys.argv[2].encode()); c.close(); return\n"
            "while True:\n"
            "    c,_=s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()\n")

    def __init__(self, port: int, uid: int = NOBODY, reply: str | None = None) -> None:
        argv = [sys.executable, "-c", self.CODE, str(port)] + ([reply] if reply is not None else [])
        self.proc = subprocess.Popen(argv, user=uid,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "listening"

    def bytes_received(self) -> int:
        self.proc.kill()
        out, _ = self.proc.communicate()
        return sum(int(x) for x in out.split())


@pytest.fixture
def listener():
    """Start a :class:`Listener`; each is stopped at the end of the test."""
    started: list[Listener] = []

    def start(port: int, **kw) -> Listener:
        started.append(Listener(port, **kw))
        return started[-1]
    yield start
    for one in started:
        one.proc.kill()
        one.proc.wait()


def kill(agent) -> None:
    os.killpg(agent["pgid"], signal.SIGKILL)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a listener of another uid needs root (setuid)")


# -- who owns a port: /proc/net/tcp -----------------------------------------------------------------------
HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"


def line(addr: str, state: str = "0A", uid: int = 1001) -> str:
    return (f"   0: {addr} 00000000:0000 {state} 00000000:00000000 00:00000000 00000000 {uid:5d}        0 4312 1 "
            "0000000000000000 100 0 0 10 0\n")


def seen(table: str) -> list[tuple[str, int, int]]:
    return [(lst.address, lst.port, lst.uid) for lst in tcptable.parse_listeners(table)]


def test_proc_net_tcp_lines_name_address_port_and_uid():
    table = HEADER + line("0100007F:1F90") + line("00000000:0016", uid=0) + line("0100007F:1F91", state="01")
    assert seen(table) == [("127.0.0.1", 8080, 1001), ("0.0.0.0", 22, 0)]
    v6 = HEADER + line("00000000000000000000000000000000:1F90", uid=1002) + \
        line("0000000000000000FFFF00000100007F:1F92", uid=1002) + line("00000000000000000000000001000000:1F93")
    assert seen(v6) == [("::", 8080, 1002), ("::ffff:127.0.0.1", 8082, 1002), ("::1", 8083, 1001)]


def test_only_the_users_own_listener_lets_bytes_through():
    mine = HEADER + line("0100007F:1F90", uid=1001)
    assert listeners.refusal([mine], 8080, 1001, "n1") == ""
    assert "nothing listens on port 8081 on n1" in listeners.refusal([mine], 8081, 1001, "n1")
    assert "held by another user's process (uid 1002)" in listeners.refusal(
        [HEADER + line("0100007F:1F90", uid=1002)], 8080, 1001, "n1")
    # a wildcard or IPv6 listener of another user answers 127.0.0.1 too
    for other in (line("00000000:1F90", uid=1002), line("00000000000000000000000000000000:1F90", uid=1002),
                  line("0000000000000000FFFF00000100007F:1F90", uid=0)):
        assert "another user's" in listeners.refusal([mine, HEADER + other], 8080, 1001, "n1"), other
    # what cannot answer 127.0.0.1:8080 does not count: another loopback address, ::1, a connection
    ignored = HEADER + line("0200007F:1F90", uid=1002) + line("00000000000000000000000001000000:1F90", uid=1002) + \
        line("0100007F:1F90", state="01", uid=1002)
    assert listeners.refusal([mine, ignored], 8080, 1001, "n1") == ""


def test_this_hosts_table_shows_a_real_listener_with_its_uid():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        tables = [TunnelPool().read_file("localhost", p).decode() for p in tcptable.PROC_TABLES]
        assert listeners.owners(tables, port) == {os.getuid()}
    tables = [TunnelPool().read_file("localhost", p).decode() for p in tcptable.PROC_TABLES]
    assert listeners.owners(tables, port) == set()


# -- the gate -----------------------------------------------------------------------------------------------
def test_a_starting_agent_is_checked_before_its_first_request(agent):
    fleet = make_fleet(agent)
    try:
        assert fleet.relay_target(JOB, NODE).state == "ready"
        assert fleet.pool.reads == list(tcptable.PROC_TABLES)  # the port's owner was read before anything was sent
        assert fleet.verified(fleet.find(JOB, NODE)) == 1
        status, body = fleet.ask(fleet.find(JOB, NODE), "/api/health")
        assert status == 200 and body["job"] == JOB
        fleet.relay_target(JOB, NODE)
        assert fleet.pool.reads == list(tcptable.PROC_TABLES)  # proven: not read again
    finally:
        fleet.stop()


def test_a_new_tunnel_asks_for_a_new_check_before_the_next_request(agent):
    fleet = make_fleet(agent)
    try:
        a = fleet.relay_target(JOB, NODE)
        conn = fleet.connection(a)
        fleet.pool.gen = 2  # the node's transport was replaced
        assert fleet.verified(a) is None
        with pytest.raises(AgentUnreachable, match="opened again"):
            conn.request("GET", "/api/health")  # a connection made for the old transport is not opened on the new
        with pytest.raises(AgentLost):
            fleet.connection(a)
        reads = len(fleet.pool.reads)
        assert fleet.relay_target(JOB, NODE).state == "ready"
        assert len(fleet.pool.reads) == reads + len(tcptable.PROC_TABLES)
        assert fleet.verified(a) == 2 and fleet.heartbeats.generation(("localhost", a.reg.port)) == 2
    finally:
        fleet.stop()


def test_a_killed_agent_is_lost_at_once_and_stays_lost(agent):
    fleet = make_fleet(agent)
    try:
        fleet.relay_target(JOB, NODE)
        kill(agent)
        # no check runs here (the watcher is not started): only the heartbeat's end can say it
        _wait(lambda: state_of(fleet, agent["reg"])[0] == "lost", 10, "the agent lost")
        assert "agent stopped: its connection closed" in state_of(fleet, agent["reg"])[1]
        with pytest.raises(AgentLost, match="agent lost: .*nothing listens on port"):
            fleet.relay_target(JOB, NODE)
        with pytest.raises(AgentLost):
            fleet.connection(fleet.find(JOB, NODE))
    finally:
        fleet.stop()


@needs_root
def test_another_users_process_on_a_lost_agents_port_gets_not_one_byte(agent, listener):
    fleet = make_fleet(agent)
    try:
        fleet.relay_target(JOB, NODE)
        kill(agent)
        _wait(lambda: state_of(fleet, agent["reg"])[0] == "lost", 10, "the agent lost")
        thief = listener(agent["reg"].port)
        for _ in range(3):
            with pytest.raises(AgentLost, match="held by another user's process"):
                fleet.relay_target(JOB, NODE)
            fleet._check(fleet.find(JOB, NODE))  # the watcher's retry
            assert "held by another user's process" in state_of(fleet, agent["reg"])[1]
            with pytest.raises(AgentLost):
                fleet.acquire(fleet.find(JOB, NODE))
        assert thief.bytes_received() == 0
    finally:
        fleet.stop()


def test_a_process_of_the_user_that_is_not_the_agent_fails_the_identity_check(agent, listener):
    fleet = make_fleet(agent)
    try:
        fleet.relay_target(JOB, NODE)
        kill(agent)
        _wait(lambda: state_of(fleet, agent["reg"])[0] == "lost", 10, "the agent lost")
        impostor = listener(agent["reg"].port, uid=os.getuid(), reply=(
            'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n{"signature":"x"}'))
        with pytest.raises(AgentLost, match="identity check failed"):
            fleet.relay_target(JOB, NODE)
        assert state_of(fleet, agent["reg"])[0] == "lost"
        assert impostor.bytes_received() > 0  # the user's own process: the challenge went there, nothing more
    finally:
        fleet.stop()


def end_heartbeat_stream(fleet: Fleet, key) -> None:
    """The master's end of the agent's heartbeat socket reads EOF, as when the ControlMaster it went through
    exits (or the agent closed it): the socket cannot say which."""
    with fleet.heartbeats._lock:
        w = fleet.heartbeats._watched[key]
    w.stream.shutdown(socket.SHUT_RD)


def test_a_heartbeat_socket_that_ends_with_its_tunnel_asks_for_a_check_and_the_agent_stays_ready(fleet):
    a = fleet.relay_target(JOB, NODE)
    key = ("localhost", a.reg.port)
    fleet.pool.ended_gens.add(1)
    fleet.pool.gen = 2   # the job whose connection the agent borrowed ended; the next is its own
    end_heartbeat_stream(fleet, key)
    _wait(lambda: fleet.pool.asked_ended == [1], 10, "the tunnel asked whether it ended")
    time.sleep(0.2)
    assert state_of(fleet, a.reg) == ("ready", "")
    assert fleet.verified(a) is None     # nothing goes to it before it is proven again
    assert fleet.relay_target(JOB, NODE).state == "ready"
    assert fleet.verified(a) == 2 and fleet.heartbeats.generation(key) == 2


def test_a_heartbeat_socket_that_ends_while_its_tunnel_lives_loses_the_agent(fleet):
    a = fleet.relay_target(JOB, NODE)
    end_heartbeat_stream(fleet, ("localhost", a.reg.port))
    _wait(lambda: state_of(fleet, a.reg)[0] == "lost", 10, "the agent lost")
    assert fleet.pool.asked_ended == [1]
    assert state_of(fleet, a.reg)[1] == "agent stopped: its connection closed"
    assert fleet.verified(a) is None


def test_the_late_end_of_an_older_heartbeat_leaves_the_agents_newer_proof(fleet):
    """A stream's end reported after a check proved the agent again on a newer tunnel (the heartbeat thread
    and the check ran at once) takes back what that stream proved, not the newer check's."""
    a = fleet.relay_target(JOB, NODE)
    key = ("localhost", a.reg.port)
    fleet.pool.gen = 2
    assert fleet.relay_target(JOB, NODE).state == "ready" and fleet.verified(a) == 2
    for dead in (True, False, None):
        fleet.heartbeats._on_end(key, 1, "agent stopped: its connection closed", dead)
    time.sleep(0.2)
    assert state_of(fleet, a.reg) == ("ready", "")
    assert fleet.verified(a) == 2 and fleet.heartbeats.generation(key) == 2
    assert fleet.pool.asked_ended == []


def test_a_relay_that_cannot_connect_marks_the_agent_lost(agent):
    fleet = make_fleet(agent)
    try:
        a = fleet.relay_target(JOB, NODE)
        fleet.heartbeats._on_end = lambda *args: None  # only the relay may notice here
        kill(agent)
        _wait(lambda: socket.socket().connect_ex(("127.0.0.1", a.reg.port)) != 0, 10, "the port closed")
        conn = AgentConnection(fleet, a, 1, timeout=5)
        with pytest.raises(AgentUnreachable):
            conn.request("GET", "/api/health")
        assert state_of(fleet, agent["reg"])[0] == "lost"
        assert "refused the connection" in state_of(fleet, agent["reg"])[1]
    finally:
        fleet.stop()


def test_a_relay_refused_on_a_tunnel_that_ended_has_the_agent_checked_again_not_lost(fleet):
    """Through an OpenSSH ControlMaster that is ending, a channel is refused as by a port nobody holds: what
    was proven is dropped (nothing more goes to the agent before a check), but the agent is not called lost."""
    a = fleet.relay_target(JOB, NODE)
    with socket.socket() as closed:   # a port nobody listens on, for the refusal
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    fleet.pool.ended_gens.add(1)
    with pytest.raises(AgentUnreachable):
        AgentConnection(fleet, replace(a, reg=replace(a.reg, port=port)), 1, timeout=5).request("GET", "/api/health")
    assert fleet.pool.asked_ended == [1]
    assert state_of(fleet, a.reg) == ("ready", "") and fleet.verified(a) is None


# -- the heartbeat thread -------------------------------------------------------------------------------
def test_one_thread_watches_hundreds_of_heartbeats_and_names_the_one_that_ended():
    heartbeat._raise_fd_limit()
    ended: list[tuple] = []
    done = threading.Event()

    def on_end(key, generation, why, dead):
        ended.append((key, generation, why, dead))
        done.set()

    beats = Heartbeats(on_end)
    pairs = [socket.socketpair() for _ in range(500)]
    threads_before = threading.active_count()
    try:
        for i, (ours, _theirs) in enumerate(pairs):
            beats.add(("n1", 10000 + i), ours, 1)
        assert threading.active_count() == threads_before + 1
        for _ours, theirs in pairs:
            theirs.sendall(b": beat\n\n")
        pairs[123][1].close()  # that agent's end of the stream
        assert done.wait(10)
        # a socket: the agent's end or its ControlMaster's, which the fleet asks the tunnel about
        assert ended == [(("n1", 10123), 1, "agent stopped: its connection closed", None)]
        assert beats.generation(("n1", 10123)) is None and beats.generation(("n1", 10124)) == 1
        assert len(beats) == 499
    finally:
        beats.stop()
        for _ours, theirs in pairs:
            theirs.close()


def test_a_stopped_heartbeat_thread_leaves_no_descriptor_behind_to_write_to():
    """Its wake pipe closed with the thread; a later stop or drop (a fleet stopped twice, a check ending after
    the stop) writes nowhere: not to a closed descriptor, nor to whatever file took its number since."""
    beats = Heartbeats(lambda *args: None)
    ours, theirs = socket.socketpair()
    beats.add(("n1", 1), ours, 1)
    beats.stop()
    assert beats._thread is not None
    beats._thread.join(10)
    r, w = os.pipe()   # likely the numbers the thread closed
    try:
        beats.stop()
        beats.drop(("n1", 1))
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 1)
    finally:
        for fd in (r, w):
            os.close(fd)
        theirs.close()


def test_a_silent_heartbeat_asks_for_a_check_without_calling_the_agent_dead(monkeypatch):
    monkeypatch.setattr(heartbeat, "SILENT", 0.2)
    monkeypatch.setattr(heartbeat, "SCAN_EVERY", 0.1)
    ended: list[tuple] = []
    beats = Heartbeats(lambda key, generation, why, dead: ended.append((key, dead)))
    ours, theirs = socket.socketpair()
    try:
        beats.add(("n1", 1), ours, 1)
        _wait(lambda: ended, 10, "the silent heartbeat noticed")
        assert ended == [(("n1", 1), False)]
    finally:
        beats.stop()
        theirs.close()


if __name__ == "__main__":
    serve_agent(Path(sys.argv[1]))
