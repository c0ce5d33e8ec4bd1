"""The site's fleet: every user's agents on every cluster, from the store, reached through the gateway.

:class:`SiteFleet` answers the master's relay and its extensions (:mod:`dxflow.master.app`,
``websocket``, ``forward``, ``metrics``) as the per-user :class:`dxflow.master.fleet.Fleet` does,
so one relay serves both. What differs:

* whose agents: the request's user (set by :mod:`dxflow.site.users`); another user's job is "no such
  job", never confirmed (:attr:`SiteFleet.check`, :attr:`SiteFleet.visible`);
* how an agent is reached: through its own dial-out connection to this replica's gateway
  (:mod:`dxflow.site.gateway`), which carries channels to the agent's port only; the
  ``generation`` a check proved names the agent whose connection it was (:class:`SiteChannels`);
* tokens: signed with the site's token key, naming the job's owner (agents accept the site's key
  for their own user only);
* what is proven: an agent is *ready* on this replica once its connection is up and it signed a
  fresh challenge with the key of its registration; the store's state is shared by replicas, the
  proof is each replica's own;
* the scheduler: each cluster's, asked in a child process with that cluster's environment
  (:mod:`dxflow.site.query`), filtered to one user, the answer kept a few seconds.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import threading
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from cryptography.hazmat.primitives import serialization

from dxflow.auth import check_challenge, fingerprint, mint_token
from dxflow.edge.channelhttp import TunnelHTTPConnection
from dxflow.errors import AgentLost, AgentStarting, AgentUnreachable, AuthError, DxflowError, NotFound, UsageError
from dxflow.master.agentconn import AgentRequests, KeptConnections
from dxflow.master.registry import METRICS_FRESH, Agent
from dxflow.schedulers import JobState
from dxflow.site.config import SiteServiceConfig
from dxflow.site.query import ClusterJobs
from dxflow.site.scope import VisibleAgents, default_check, default_visible, request_user, split_job
from dxflow.site.store import SiteAgent, Store

log = logging.getLogger(__name__)

#: Seconds between the loop's questions to the schedulers about users with live agents, when nothing happens.
SCHEDULER_INTERVAL = 60.0
#: Seconds between two turns of the loop (checks of new connections wait at most this long).
LOOP_INTERVAL = 2.0
#: A ready agent is checked again (challenge, node metrics) this rarely; its connection dropping says more.
HEALTH_INTERVAL = 300.0
#: An agent connected here but not proven is checked again after this long (a new connection: at once).
CHECK_RETRY = 5.0
GONE_KEEP = 600.0
#: Seconds after its enrollment an agent not connected to this replica is shown starting, not lost.
CONNECT_GRACE = 20.0
VERIFY_WAIT = 5.0
METRICS_WAIT = 2.0  # `dxflow ls` waits this long at most for stale node metrics to be read again


class SiteChannels:
    """The gateway, as the relay's ``fleet.pool``: a channel to a proven agent's own port, nothing else."""

    def __init__(self, fleet: "SiteFleet") -> None:
        self._fleet = fleet

    def channel(self, address: str, port: int, timeout: float = 60.0, generation: int | None = None,
                host: str = "127.0.0.1") -> Any:
        agent = self._fleet.proven(generation)
        if port != agent.reg.port or host not in ("127.0.0.1", "localhost"):
            # an agent's dial-out carries channels to its own port only (docs/site.md): a raw forward to
            # another port of the node cannot ride it
            raise AgentUnreachable(f"agent {agent.name}: the site reaches only the agent's own API; a raw TCP "
                                   f"forward to port {port} is not available through the site service "
                                   "(the job's web services are: `dxflow console`, proxy)")
        return self._fleet.gateway_channel(agent.name, timeout)

    def status(self) -> dict:
        gateway = self._fleet.gateway
        return gateway.status() if gateway is not None else {}

    def close(self) -> None:
        pass


class SiteFleet(AgentRequests):
    """Every user's agents, as the relay sees them for the request's user; requests to them as the
    master's (:class:`~dxflow.master.agentconn.AgentRequests`: ``ask``, ``acquire``, ``release``), on
    connections through the gateway and with the site's tokens."""

    def __init__(self, config: SiteServiceConfig, store: Store, token_key: Any = None) -> None:
        self.config = config
        self.store = store
        self.replica = config.replica_name
        self.gateway: Any = None   # dxflow.site.gateway.Gateway, attached before start()
        # what the relay and the master's extensions use of a pool: channel() and status()
        self.pool = SiteChannels(self)  # type: ignore[assignment]
        self._token_key = token_key
        #: no one user: tokens name each agent's owner (:meth:`token`), the request's user is current_user()
        self.user = ""
        #: the request's user (an object with ``name`` and ``admin``); :mod:`dxflow.site.users` sets these three
        self.current_user: Callable[[], Any] = request_user
        self.visible: Callable[[str], bool] = default_visible
        self.check: Callable[[str, str], None] = default_check
        self._lock = threading.Lock()
        self._gens = itertools.count(1)
        self._connected: dict[str, int] = {}            # agent name -> generation of its connection here
        self._names: dict[int, str] = {}                # generation -> agent name
        self._verified: dict[str, tuple[tuple, int]] = {}  # agent name -> (what was proven, generation)
        self._checked_at: dict[str, float] = {}
        self._agent_locks: dict[str, threading.Lock] = {}
        self._checking: set[str] = set()
        self.jobs = ClusterJobs(config)
        self._asked_at = 0.0
        self._want_ask = threading.Event()
        self._kept = KeptConnections()
        self._tokens: dict[str, tuple[float, str]] = {}
        self._checks = ThreadPoolExecutor(max_workers=16, thread_name_prefix="site-check")
        self._wake = threading.Event()
        self._stop = threading.Event()

    # -- the request's user ---------------------------------------------------------------------
    @property
    def registry(self) -> VisibleAgents:
        return VisibleAgents(self.store, lambda owner: self.visible(owner))

    # -- the gateway's news ---------------------------------------------------------------
    def agent_connected(self, name: str) -> None:
        """The agent's dial-out connection to this replica is up (again): it is checked on it."""
        with self._lock:
            self._new_generation(name)
        self._checked_at.pop(name, None)
        self._forget(name)
        self._wake.set()

    def agent_disconnected(self, name: str, why: str = "") -> None:
        """The agent's connection to this replica dropped: nothing goes to it until it is back and checked."""
        with self._lock:
            gen = self._connected.pop(name, None)
            self._names.pop(gen or 0, None)
        self._forget(name)
        log.info("agent %s disconnected from replica %s: %s", name, self.replica, why or "connection closed")
        self._want_ask.set()  # often the job's end (the epilog stopped the agent): ask the scheduler soon
        self._wake.set()

    def _generation(self, name: str) -> int | None:
        """The generation of the agent's connection to this replica; None when it has none."""
        if self.gateway is None or not self.gateway.connected(name):
            return None
        with self._lock:
            gen = self._connected.get(name)
            if gen is None:  # a gateway that does not announce connections: one generation per sighting
                gen = self._new_generation(name)
            return gen

    def _new_generation(self, name: str) -> int:
        """A new generation for the agent's connection (the lock held)."""
        self._names.pop(self._connected.get(name, 0), None)
        gen = self._connected[name] = next(self._gens)
        self._names[gen] = name
        return gen

    def gateway_channel(self, name: str, timeout: float) -> Any:
        if self.gateway is None:
            raise AgentUnreachable("the site's gateway is not running")
        return self.gateway.channel(name, timeout)

    # -- lookup -------------------------------------------------------------------------------------
    def find(self, job: str, node: str | None = None) -> SiteAgent:
        """The agent of JOB (``CLUSTER~JOB`` or a job id) on NODE, or on the job's first node; only the
        request's user's (or what an admin may see). Another user's job is not found, as a job that never was."""
        agents = [a for a in self.registry.of_job(job) if a.state != "gone"]
        cluster, job_id = split_job(job)
        exact = [a for a in agents if a.reg.job == job_id]
        agents = exact or agents  # an id is itself first; a PBS id's number (17 for 17.server) only otherwise
        if not agents:
            raise NotFound(f"no agent of job {job}: see `dxflow ls` for your jobs' agents")
        clusters = sorted({a.reg.cluster for a in agents})
        if len(clusters) > 1:
            raise UsageError(f"job {job_id} is on several clusters ({', '.join(clusters)}): "
                             f"name one as CLUSTER/JOB ({clusters[0]}/{job_id})")
        if node:
            for a in agents:
                if a.reg.node == node:
                    return a
            raise NotFound(f"job {job} has no agent on node {node}; its nodes: "
                           f"{', '.join(sorted(a.reg.node for a in agents))}")
        jobs = {a.reg.job for a in agents}
        if len(jobs) > 1:
            raise UsageError(f"job {job} names several jobs ({', '.join(sorted(jobs))}): name one in full")
        known = self.jobs.cached(clusters[0], agents[0].reg.user).get(agents[0].reg.job)
        order = known.nodes if known else []
        agents.sort(key=lambda a: (order.index(a.reg.node) if a.reg.node in order else len(order), a.reg.node))
        return agents[0]

    def relay_target(self, job: str, node: str | None = None) -> SiteAgent:
        """The agent requests may be relayed to: the user's (or allowed by the admin policy), proven here."""
        agent = self.find(job, node)
        self.check(agent.reg.user, job)
        if self.verified(agent) is not None:
            return agent
        lock = self._agent_lock(agent.name)
        if not lock.acquire(timeout=VERIFY_WAIT):
            raise AgentStarting(f"agent {agent.name} is still being checked; try again in a moment")
        try:
            current = self.store.agent(agent.name) or agent
            if self.verified(current) is None:
                self._check_locked(current)
                current = self.store.agent(agent.name) or current
            if self.verified(current) is not None:
                return current
            if current.state == "incompatible":
                raise AgentUnreachable(f"agent {current.name} is incompatible: {current.detail}")
            raise AgentLost(f"agent lost: {current.name}: {self._local_detail(current)}")
        finally:
            lock.release()

    # -- what is proven on this replica -----------------------------------------------------------------
    def verified(self, agent: Agent) -> int | None:
        with self._lock:
            entry = self._verified.get(agent.name)
        if entry is None or entry[0] != _ident(agent) or self._generation(agent.name) != entry[1]:
            return None
        return entry[1]

    def proven_generation(self, agent: Agent) -> int:
        gen = self.verified(agent)
        if gen is None:
            raise AgentLost(f"agent {agent.name} lost: it is not connected to site replica {self.replica}")
        return gen

    def proven(self, generation: int | None) -> SiteAgent:
        """The agent whose connection to this replica ``generation`` is (AgentLost when it is no longer up).
        Generations come from :meth:`proven_generation` (a proven agent) or a check under way."""
        with self._lock:
            name = self._names.get(generation or 0)
        agent = self.store.agent(name) if name else None
        if agent is None or self._generation(agent.name) != generation:
            raise AgentLost("agent lost: its connection to the site changed; try again")
        return agent

    def forget(self, agent: Agent) -> None:
        self._forget(agent.name)

    def lose(self, agent: Agent, why: str) -> None:
        self._forget(agent.name)
        self.store.set_state(agent.name, "lost", f"replica {self.replica}: {why}")

    def _forget(self, name: str) -> None:
        with self._lock:
            self._verified.pop(name, None)
        self._kept.drop(name)

    def _agent_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._agent_locks.setdefault(name, threading.Lock())

    def _local_detail(self, agent: SiteAgent) -> str:
        if agent.state == "gone":
            return agent.detail or "its job ended"
        if self.gateway is None or not self.gateway.connected(agent.name):
            return f"not connected to site replica {self.replica}"
        return agent.detail or agent.state

    def shown(self, agent: SiteAgent) -> dict:
        """The agent as ``/api/agents`` shows it: its state as this replica can reach it."""
        out = agent.to_dict()
        if agent.state in ("gone", "incompatible"):
            return out
        if self.verified(agent) is not None:
            out["state"], out["detail"] = "ready", ""
        elif self.gateway is None or not self.gateway.connected(agent.name):
            # an agent dials every replica in turn: one just enrolled elsewhere is on its way here
            young = time.time() - agent.enrolled < CONNECT_GRACE
            out["state"] = "starting" if young else "lost"
            out["detail"] = self._local_detail(agent) + (" yet" if young else "")
        elif agent.state == "ready":
            out["state"], out["detail"] = "starting", f"being checked by site replica {self.replica}"
        out["metrics_fresh"] = out["state"] == "ready" and out["metrics_fresh"]
        return out

    # -- tokens and requests (as the master's Fleet) ---------------------------------------------------
    def token(self, agent: Agent) -> str:
        """A bearer token for the agent, signed by the site, naming the job's owner (whoever asks)."""
        if self._token_key is None:
            raise AgentUnreachable("the site has no token key: run `dxflow site init`")
        aud = fingerprint(agent.reg.public_key)
        key = f"{aud} {agent.reg.user}"
        now = time.time()
        cached = self._tokens.get(key)
        if cached and cached[0] > now + 30:
            return cached[1]
        tok = mint_token(self._token_key, agent.reg.user, aud, lifetime=120)
        self._tokens[key] = (now + 120, tok)
        return tok

    def connection(self, agent: Agent, timeout: float = 60.0, generation: int | None = None
                   ) -> TunnelHTTPConnection:
        """A connection to the agent's port through its dial-out: proven here, or being checked (``generation``)."""
        gen = self.proven_generation(agent) if generation is None else generation
        return TunnelHTTPConnection(self.pool, agent.reg.address, agent.reg.port, timeout=timeout, generation=gen)

    # -- checks ------------------------------------------------------------------------------------
    def _check_locked(self, agent: SiteAgent) -> None:
        """Prove the agent on its connection to this replica: its registration, a fresh challenge signed
        with its registered key, its node's metrics. The store says ``ready``; on failure nothing is proven."""
        why = agent.reg.incompatibility() if agent.reg.port else ""
        if why:
            self._forget(agent.name)
            self.store.set_state(agent.name, "incompatible", why)
            return
        gen = self._generation(agent.name)
        if gen is None or not agent.reg.port or not agent.reg.public_key:
            return  # not connected here, or its registration has not arrived: nothing to prove yet
        self._checked_at[agent.name] = time.time()
        try:
            challenge = secrets.token_urlsafe(24)
            health = self.get_json(agent, f"/api/health?challenge={challenge}", generation=gen)
            if not check_challenge(agent.reg.public_key, challenge, health.get("signature", "")):
                raise AuthError("identity check failed: not the registered agent")
            info = self.get_json(agent, "/api/node", generation=gen)
        except DxflowError as e:
            self._forget(agent.name)
            log.info("agent %s not proven on replica %s: %s", agent.name, self.replica, e)
            self.store.set_state(agent.name, "lost", f"replica {self.replica}: {e}")
            return
        with self._lock:
            self._verified[agent.name] = (_ident(agent), gen)
        if not self.store.set_state(agent.name, "ready", "", node_info=info):
            self._forget(agent.name)  # found gone while it was checked: nothing proven stays

    def _check(self, agent: SiteAgent) -> None:
        try:
            with self._agent_lock(agent.name):
                current = self.store.agent(agent.name)
                if current is not None and current.state != "gone" and self.verified(current) is None:
                    self._check_locked(current)
        except Exception:  # noqa: BLE001 - a failed check must not stop the others; the log says why
            log.exception("checking %s", agent.name)
        finally:
            with self._lock:
                self._checking.discard(agent.name)

    # -- the scheduler -------------------------------------------------------------------------------
    def job_runs(self, cluster: str, job: str, node: str, user: str) -> bool:
        """Whether that cluster's scheduler says ``user``'s ``job`` runs on ``node`` (the gateway asks before
        it enrolls an agent): :meth:`dxflow.site.query.ClusterJobs.job_runs`."""
        return self.jobs.job_runs(cluster, job, node, user)

    def _ask_schedulers(self, agents: list[SiteAgent], shared: bool = False) -> None:
        """Agents whose job the scheduler says ended (or runs elsewhere) are gone. ``shared``: the periodic
        question, which one replica asks for all in each interval (the store's claim says which)."""
        turn = int(time.time() // SCHEDULER_INTERVAL)
        for cluster, user in sorted({(a.reg.cluster, a.reg.user) for a in agents}):
            if shared and not self.store.claim("scheduler-question", f"{cluster} {user} {turn}",
                                               time.time() + 2 * SCHEDULER_INTERVAL):
                continue  # another replica asks this time: what it finds is in the store
            try:
                jobs = self.jobs.jobs_of(cluster, user, fresh=0.0)
            except DxflowError as e:  # unknown: agents are neither confirmed nor dropped
                log.warning("cannot list %s's jobs on %s: %s", user, cluster, e)
                continue
            for agent in agents:
                if (agent.reg.cluster, agent.reg.user) != (cluster, user) or agent.enrolled > time.time() - 1:
                    continue
                info = jobs.get(agent.reg.job)
                if info is None or info.state in (JobState.ENDED, JobState.ENDING):
                    self._gone(agent, "job ended" if info is None else f"job {info.state.value}")
                elif info.nodes and agent.reg.node not in info.nodes:
                    self._gone(agent, f"job {agent.reg.job} does not run on {agent.reg.node}")

    def _gone(self, agent: SiteAgent, why: str) -> None:
        self._forget(agent.name)
        self.store.set_state(agent.name, "gone", why)

    # -- the loop ----------------------------------------------------------------------------------
    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="site-fleet", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._checks.shutdown(wait=False, cancel_futures=True)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.cycle()
            except Exception:  # noqa: BLE001 - the loop must keep going; the log says why
                log.exception("site fleet cycle failed")
            self._wake.wait(LOOP_INTERVAL)
            self._wake.clear()

    def cycle(self) -> None:
        now = time.time()
        agents = self.store.agents()
        live = [a for a in agents if a.state != "gone"]
        if live and (self._want_ask.is_set() or now - self._asked_at >= SCHEDULER_INTERVAL):
            news = self._want_ask.is_set()  # a connection dropped here: this replica asks itself, at once
            self._want_ask.clear()
            self._asked_at = now
            self._ask_schedulers(live, shared=not news)
            live = [a for a in self.store.agents() if a.state != "gone"]
        for agent in live:
            since = now - self._checked_at.get(agent.name, 0.0)
            due = since > HEALTH_INTERVAL if self.verified(agent) is not None else since > CHECK_RETRY
            if due and agent.reg.port and self._generation(agent.name) is not None:
                if self.verified(agent) is not None:
                    self._forget(agent.name)  # the health check proves it again
                with self._lock:
                    if agent.name in self._checking:
                        continue
                    self._checking.add(agent.name)
                self._checks.submit(self._check, agent)
        for agent in agents:
            if agent.state == "gone" and now - agent.changed > GONE_KEEP:
                self.store.delete(agent.name)
                with self._lock:
                    self._agent_locks.pop(agent.name, None)
                    self._checked_at.pop(agent.name, None)

    def refresh(self, metrics: bool = True) -> None:
        """A command wants a fresh view (`dxflow ls`): the loop turns now; with ``metrics``, the node metrics
        of the request's user's ready agents older than METRICS_FRESH are read again first (up to METRICS_WAIT)."""
        self._wake.set()
        if not metrics:
            return
        now = time.time()
        stale = [a for a in self.registry.all() if a.state != "gone" and self.verified(a) is not None
                 and (a.metrics_age(now) is None or (a.metrics_age(now) or 0.0) > METRICS_FRESH)]
        if stale:
            futures.wait([self._checks.submit(self._read_metrics, a) for a in stale], timeout=METRICS_WAIT)

    def _read_metrics(self, agent: Agent) -> None:
        try:
            self.store.set_metrics(agent.name, self.get_json(agent, "/api/node", timeout=METRICS_WAIT))
        except DxflowError as e:  # its connection says whether it is lost; the old reading keeps its age
            log.info("metrics of %s not refreshed: %s", agent.name, e)


def _ident(agent: Agent) -> tuple:
    return agent.reg.port, agent.reg.pid, agent.reg.public_key, getattr(agent, "gateway_key", "")


def load_token_key(config: SiteServiceConfig) -> Any:
    """The site's private token key (state_dir/token_key.pem), or None when `site init` has not made it."""
    try:
        return serialization.load_pem_private_key(config.token_key.read_bytes(), password=None)
    except FileNotFoundError:
        return None
