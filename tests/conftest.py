"""Shared test setup: the seams faked once, for both tiers.

Unit tests (``tests/unit``) run anywhere, as any user; tests in ``tests/lab`` need the real lab
cluster (``dxflow lab up`` as root) and say in one line why they cannot run without it
(``tests/lab/conftest.py``).

The fixtures here stand in for what a unit test cannot have, each at one seam:

- ``fake_scheduler``: the controller. Every ``get_scheduler(name)`` hands out the real adapter,
  whose questions about jobs (``jobs``, ``job``, ``job_state``) are answered from a table the test
  sets, counted, and drawn from the process's query cap as a real ``squeue`` is.
- ``fake_nodes``: SSH to the compute nodes (the master's ``TunnelPool``). Each node has a
  transport generation, a kernel table of listening sockets (what ``/proc/net/tcp`` shows) and the
  services listening there; a channel is a socket pair served in a thread.
- ``make_agent`` / ``agent``: an agent's state (its job, user, keys) and the real agent app around
  it, with a Flask test client and the user's bearer token.
- ``node_agent``: that real agent app serving on a fake node, registered for a master to find.

Lab modules import their helpers with ``from conftest import ...`` at module level: that name is
``tests/lab/conftest.py`` while a lab module is collected, so nothing here is imported by name.
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, NamedTuple
from wsgiref.simple_server import WSGIRequestHandler

import pytest
import rsa

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dxflow import auth, registration, signatures  # noqa: E402 - after the checkout is on sys.path
from dxflow.agent import create_app  # noqa: E402
from dxflow.agent.state import AgentState  # noqa: E402
from dxflow.errors import AgentUnreachable, SchedulerError  # noqa: E402
from dxflow.registration import Registration  # noqa: E402
from dxflow.schedulers import JobInfo, JobState  # noqa: E402
from dxflow.schedulers import get_scheduler as _REAL_GET_SCHEDULER  # noqa: E402
from dxflow.schedulers import base as schedulers_base  # noqa: E402

USER = getpass.getuser()


# -- the controller --------------------------------------------------------------------------------------

class FakeScheduler:
    """The controller's answers about jobs, as the test sets them; every question counted.

    ``get_scheduler(name)`` still builds the real adapter (its patterns, state maps, commands are
    real); only its questions to the controller come here. A question draws from the process's
    cap (``QUERY_BUDGET``) first, as a real ``squeue`` does, and fails when it is spent.
    """

    def __init__(self) -> None:
        self.table: dict[str, JobInfo] = {}
        self.asked = 0          # questions answered (not counting refused ones)
        self.fail = False       # the controller does not answer: SchedulerError
        self.users: list[str | None] = []

    def add(self, job: str, nodes: tuple[str, ...] = (), state: JobState = JobState.RUNNING,
            user: str = USER, **fields) -> JobInfo:
        """A job the controller knows (running unless told), on ``nodes`` (any when empty)."""
        self.table[job] = JobInfo(job=job, user=user, state=state, nodes=list(nodes), **fields)
        return self.table[job]

    def end(self, job: str) -> None:
        """The job ended: the controller forgets it."""
        self.table.pop(job, None)

    def _question(self, command: str) -> None:
        if not schedulers_base.QUERY_BUDGET.take():
            raise SchedulerError(f"{command} not run: the cap of controller queries is reached")
        if self.fail:
            raise SchedulerError(f"{command} failed", argv=[command], returncode=1, stderr="controller down")
        self.asked += 1

    # the adapter's questions
    def jobs(self, user: str | None = None) -> list[JobInfo]:
        self._question("squeue")
        self.users.append(user)
        return [info for info in self.table.values() if user is None or info.user == user]

    def job(self, job_id: str) -> JobInfo | None:
        self._question("squeue")
        return self.table.get(job_id)

    def job_state(self, job_id: str) -> JobState:
        info = self.job(job_id)
        return info.state if info else JobState.ENDED

    def adapter(self, name: str, environ=None):
        """The real adapter named ``name``, its controller questions answered here."""
        sched = _REAL_GET_SCHEDULER(name, environ)
        for question in ("jobs", "job", "job_state"):
            setattr(sched, question, getattr(self, question))
        return sched


@pytest.fixture
def fake_scheduler(monkeypatch) -> FakeScheduler:
    """Every scheduler adapter handed out during the test asks this :class:`FakeScheduler`."""
    fake = FakeScheduler()
    for name, module in list(sys.modules.items()):
        if (name == "dxflow" or name.startswith("dxflow.")) and \
                getattr(module, "get_scheduler", None) is _REAL_GET_SCHEDULER:
            monkeypatch.setattr(module, "get_scheduler", fake.adapter)
    return fake


# -- SSH to the nodes --------------------------------------------------------------------------------------

Service = Callable[[socket.socket], None]


class FakeNode:
    """A compute node as the master sees it through SSH."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.generation = 0         # how many transports it has had; the current one's number
        self.up = False             # a transport is open
        self.reachable = True       # sshd answers
        self.listeners: dict[int, int] = {}      # port -> uid of the socket on 127.0.0.1 (/proc/net/tcp)
        self.services: dict[int, Service] = {}   # port -> what answers a connection there
        self.served: dict[int, list[socket.socket]] = {}   # port -> the node's ends of channels opened there

    def listen(self, port: int, service: Service | None = None, uid: int | None = None) -> None:
        """A process of ``uid`` (the test's user by default) listens on 127.0.0.1:PORT."""
        self.listeners[port] = os.getuid() if uid is None else uid
        if service is not None:
            self.services[port] = service
        else:
            self.services.pop(port, None)

    def stop(self, port: int) -> None:
        """What listened on PORT is gone: its connections close and the port is free."""
        self.listeners.pop(port, None)
        self.services.pop(port, None)
        for s in self.served.pop(port, []):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def proc_net_tcp(self) -> str:
        lines = ["  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"]
        for i, (port, uid) in enumerate(sorted(self.listeners.items())):
            lines.append(f"   {i}: 0100007F:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 00000000 "
                         f"{uid:5d}        0 {4000 + i} 1 0000000000000000 100 0 0 10 0")
        return "\n".join(lines) + "\n"


class FakeNodes:
    """The master's :class:`~dxflow.master.tunnels.TunnelPool`, with nodes that exist only in this process.

    Same interface: ``connect``, ``generation``, ``ended``, ``note``, ``channel``, ``read_file``, ``status``,
    ``close`` (one connection per node here, whatever the job: no pam_slurm_adopt on these nodes);
    ``log`` records, in order, every file read (``"n1 read /proc/net/tcp"``) and channel opened
    (``"n1 open 7000"``) on a node.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, FakeNode] = {}
        self.log: list[str] = []

    def node(self, address: str) -> FakeNode:
        """The node at ``address`` (added on first use)."""
        return self.nodes.setdefault(address, FakeNode(address))

    def replace_transport(self, address: str) -> None:
        """The node's transport closed and a new one opened (what is proven on the old one is not on it)."""
        node = self.node(address)
        node.up = True
        node.generation += 1

    # -- the pool's interface
    def connect(self, address: str, job: str | None = None) -> int:
        node = self.nodes.get(address)
        if node is None or not node.reachable:
            raise AgentUnreachable(f"{address}: cannot connect by SSH: no such node in this test")
        if not node.up:
            node.up = True
            node.generation += 1
        return node.generation

    def generation(self, address: str, job: str | None = None) -> int | None:
        node = self.nodes.get(address)
        return node.generation if node is not None and node.up else None

    def note(self, address: str, job: str | None, generation: int) -> str:
        return ""  # the connection is never another job's (no pam_slurm_adopt here)

    def ended(self, address: str, generation: int, wait: float = 0.0) -> bool:
        return self.generation(address) != generation

    def _on(self, address: str, generation: int | None) -> FakeNode:
        if generation is None:
            self.connect(address)
        elif self.generation(address) != generation:
            raise AgentUnreachable(f"{address}: the tunnel was opened again since the agent was checked")
        return self.nodes[address]

    def channel(self, address: str, port: int, timeout: float = 10.0, generation: int | None = None,
                host: str = "127.0.0.1") -> socket.socket:
        node = self._on(address, generation)
        service = node.services.get(port)
        if service is None:
            raise AgentUnreachable(f"{address}: cannot reach {host}:{port} through the tunnel: Connection refused")
        self.log.append(f"{address} open {port}")
        ours, theirs = socket.socketpair()
        node.served.setdefault(port, []).append(theirs)
        threading.Thread(target=service, args=(theirs,), daemon=True, name=f"{address}:{port}").start()
        return ours

    def read_file(self, address: str, path: str, generation: int | None = None) -> bytes:
        node = self._on(address, generation)
        self.log.append(f"{address} read {path}")
        if path == "/proc/net/tcp":
            return node.proc_net_tcp().encode()
        raise FileNotFoundError(path)  # no IPv6 (/proc/net/tcp6) nor anything else on these nodes

    def status(self) -> dict[str, dict]:
        return {a: {"connected": n.up, "failures": 0, "error": ""} for a, n in self.nodes.items()}

    def close(self) -> None:
        for node in self.nodes.values():
            for port in list(node.services):
                node.stop(port)


@pytest.fixture
def fake_nodes() -> Iterator[FakeNodes]:
    """Compute nodes reached through a faked SSH seam (:class:`FakeNodes`)."""
    nodes = FakeNodes()
    yield nodes
    nodes.close()


# -- a real master's Fleet on the faked seam ------------------------------------------------------------
@pytest.fixture
def user_base(tmp_path) -> Path:
    """The user's ``~/.dxflow`` on the login node: an empty ``fleet/`` and the user's key."""
    b = tmp_path / "dxflow"
    (b / "fleet").mkdir(parents=True, mode=0o700)
    auth.user_key(b)
    return b


@pytest.fixture
def fake_fleet(user_base, fake_nodes, fake_scheduler):
    """A real :class:`dxflow.master.fleet.Fleet` of this user on ``fake_nodes`` and ``fake_scheduler``:
    it asks the scheduler on every news, looks at the folder often and never exits for idleness."""
    from dxflow.config import SiteConfig
    from dxflow.master.fleet import Fleet

    site = SiteConfig(master_check_interval=3600, master_check_gap=0, fleet_scan_interval=0.05,
                      fleet_scan_max=0.2, master_idle_exit=0, controller_queries_per_minute=0)
    f = Fleet(user_base, getpass.getuser(), pool=fake_nodes, site=site)
    yield f
    f.stop()
    schedulers_base.QUERY_BUDGET.resize(0)


@pytest.fixture
def settle() -> Callable[..., None]:
    """``settle(fleet, names, want="ready")``: look (``Fleet.cycle``) until every agent named is in state
    ``want`` (the watcher's checks run in threads); AssertionError, with the states seen, after ``timeout``."""
    def settle(fleet, names: list[str], want: str = "ready", timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            fleet.cycle()
            states = {n: (a.state, a.detail) if (a := fleet.registry.get(n)) else None for n in names}
            if all(s is not None and s[0] == want for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"agents not {want} within {timeout:.0f} s: {states}")
            time.sleep(0.02)
    return settle


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


class _WSGIServer:
    """What wsgiref's handler needs of a server: the app and the base environment."""

    def __init__(self, app, port: int) -> None:
        self.app = app
        self.base_environ = {"SERVER_NAME": "127.0.0.1", "SERVER_PORT": str(port), "GATEWAY_INTERFACE": "CGI/1.1",
                             "SCRIPT_NAME": "", "CONTENT_LENGTH": ""}

    def get_app(self):
        return self.app


def wsgi_service(app, port: int) -> Service:
    """Serve one HTTP/1.0 request per connection with ``app`` (a streamed answer is written as it comes)."""
    server = _WSGIServer(app, port)

    def serve(sock: socket.socket) -> None:
        try:
            _QuietHandler(sock, ("127.0.0.1", 40000), server)
        except OSError:  # the other side went away (a stopped agent, a closed stream)
            pass
        finally:
            sock.close()
    return serve


# -- the agent -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def keys():
    """(the user's key, an agent's key): RSA keys take a while to make, so the session shares two."""
    return auth.new_key(), auth.new_key()


def agent_key_of(key) -> tuple[rsa.PrivateKey, str]:
    """(``key`` as an agent holds it, python-rsa's (dxflow.signatures), PEM of its public half) of a key
    made by :func:`dxflow.auth.new_key` (cryptography) or of an agent's key already."""
    if isinstance(key, rsa.PrivateKey):
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        return key, auth.public_pem(load_pem_public_key(rsa.PublicKey(key.n, key.e).save_pkcs1()))
    return signatures.load_private_key(auth.private_pem(key)), auth.public_pem(key)


class AgentUnderTest(NamedTuple):
    client: object                   # flask.testing.FlaskClient
    state: AgentState
    headers: dict[str, str]          # the user's bearer token for this agent


@pytest.fixture
def make_agent_state(tmp_path, keys) -> Callable[..., AgentState]:
    """``make(**fields)``: an :class:`AgentState` of job 42 on n1 for the test's user, its home in
    ``tmp_path/home`` (with ``.dxflow/logs``), its work dir ``tmp_path/work`` (both made unless given);
    any field may be given."""
    user_key, agent_key = keys

    def make(**fields) -> AgentState:
        if "home" not in fields:
            (tmp_path / "home" / ".dxflow" / "logs").mkdir(parents=True, exist_ok=True)
        if "work_dir" not in fields:
            (tmp_path / "work").mkdir(exist_ok=True)
        home = Path(fields.pop("home", tmp_path / "home"))
        work = fields.pop("work_dir", str(tmp_path / "work"))
        key, pub = agent_key_of(fields.pop("key", agent_key))
        values = dict(scheduler="local", cluster="t", job="42", node="n1", user=USER, home=home, key=key,
                      public_key=pub, audience=auth.fingerprint(pub), user_public_key=auth.public_pem(user_key),
                      work_dir=str(work), started=time.time())
        values.update(fields)
        return AgentState(**values)
    return make


@pytest.fixture
def make_agent(make_agent_state, keys) -> Callable[..., AgentUnderTest]:
    """``make(config=None, **fields)``: the real agent app of :func:`make_agent_state`'s state, with a
    test client and the user's token for it."""
    user_key, _ = keys

    def make(config: dict | None = None, **fields) -> AgentUnderTest:
        state = make_agent_state(**fields)
        # no node-local roots unless a test asks: /tmp holds pytest's own folders
        client = create_app(state, {"TESTING": True, "FILE_NODE_LOCAL_ROOTS": [], **(config or {})}).test_client()
        token = auth.mint_token(user_key, state.user, state.audience)
        return AgentUnderTest(client, state, {"Authorization": f"Bearer {token}"})
    return make


@pytest.fixture
def agent(make_agent, tmp_path) -> AgentUnderTest:
    """An agent of job 42 on n1; its job writes ``work/out.txt`` and ``work/err.txt``."""
    work = tmp_path / "work"
    return make_agent(stdout=str(work / "out.txt"), stderr=str(work / "err.txt"))


def registration_of(state: AgentState, address: str, port: int, pid: int | None = None) -> Registration:
    """The registration record an agent of ``state`` writes when it listens on ``port`` of ``address``."""
    return Registration(cluster=state.cluster, scheduler=state.scheduler, job=state.job, node=state.node,
                        address=address, port=port, pid=os.getpid() if pid is None else pid, user=state.user,
                        started="2026-01-01T00:00:00+00:00", public_key=state.public_key, api_version=1,
                        version="test")


class NodeAgent(NamedTuple):
    reg: Registration
    state: AgentState
    node: FakeNode


@pytest.fixture
def node_agent(fake_nodes, make_agent_state) -> Callable[..., NodeAgent]:
    """``start(base, job, node, port=..., **fields)``: the real agent app serving on a fake node, for the
    user whose master keeps ``base`` (its ``~/.dxflow``); its registration is written to ``base/fleet``."""

    def start(base: Path, job: str, node: str = "n1", port: int = 7000, scheduler: str = "slurm",
              write: bool = True, **fields) -> NodeAgent:
        key = auth.new_key() if "key" not in fields else fields.pop("key")
        state = make_agent_state(job=job, node=node, scheduler=scheduler, key=key,
                                 user_public_key=auth.user_public_key(base), **fields)
        app = create_app(state)
        fake = fake_nodes.node(node)
        fake.listen(port, wsgi_service(app, port))
        reg = registration_of(state, node, port)
        if write:
            (base / "fleet").mkdir(mode=0o700, parents=True, exist_ok=True)
            registration.write(base / "fleet", reg)
        return NodeAgent(reg, state, fake)
    return start
