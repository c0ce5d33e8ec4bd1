"""The fleet watcher: registrations in, checked agents out.

It looks at ``~/.dxflow/fleet/`` (one ``stat``; the folder is read only when it changed, and
the looks back off while nothing starts) and asks the scheduler for the user's jobs on news
and otherwise rarely (:mod:`dxflow.master.pace`, issue #11). New records are confirmed
against the scheduler (is the job running, on that node?) and then reached through the
node's tunnel, where the agent must sign a fresh challenge with the key it
registered. A record whose job has ended is removed, file and row. A master with no live
agent and no client for ``master_idle_exit`` seconds exits.

An agent's port is only trusted while the master can prove it is the agent's: the
first check on a transport reads the node's table of sockets first (is the port held by
the user's process? :mod:`dxflow.master.listeners`), and from a passed check on, the
agent's heartbeat stream (:mod:`dxflow.master.heartbeat`) is the proof that it still
lives. That proof holds on one transport generation of the node's tunnel. Every request
to an agent goes through :meth:`Fleet.relay_target` and :meth:`Fleet.connection`, which
refuse (:class:`AgentLost`) an agent without it: once an agent is lost, nothing is sent
to its port again until a check proves the port is the user's again.

The class is in three modules, one job each: this one (the watch loop, lookups),
:mod:`dxflow.master.agentcheck` (the checks, what they proved) and
:mod:`dxflow.master.agentconn` (tokens, connections, requests).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from dxflow import registration
from dxflow.auth import user_key
from dxflow.config import SiteConfig
from dxflow.errors import AgentLost, AgentStarting, AgentUnreachable, ConfigError, DxflowError, NotFound, SchedulerError
from dxflow.layout import UserLayout, this_host
from dxflow.master.agentcheck import AgentChecks, Ident
from dxflow.master.agentconn import KeptConnections
from dxflow.master.heartbeat import Heartbeats
from dxflow.master.pace import AskPolicy, Backoff, Clients, FolderWatch
from dxflow.master.registry import METRICS_FRESH, Agent, Registry
from dxflow.master.tunnels import TunnelPool
from dxflow.schedulers import JobInfo, JobState, get_scheduler, has_controller
from dxflow.schedulers.base import QUERY_BUDGET

log = logging.getLogger(__name__)

#: a ready agent is checked again (identity challenge, /api/node) this rarely: its heartbeat stream already
#: says at once when it dies, and asks for a check when it goes silent; each check costs the agent an RSA
#: signature and the master two requests, per agent (issue #11: idle CPU that grows with the fleet)
HEALTH_INTERVAL = 300.0
LOST_RETRY = 2.0           # unreachable agents are retried this often
GONE_KEEP = 600.0          # rows of gone agents are kept this long for `dxflow ls --all`
VERIFY_WAIT = 5.0          # a request waits this long at most for a check of its agent already under way
METRICS_WAIT = 2.0         # `dxflow ls` waits this long at most for stale node metrics to be read again

def site_config() -> SiteConfig:
    """The site's policy; its defaults when the file is broken (the master still serves, and says why)."""
    try:
        return SiteConfig.load()
    except ConfigError as e:
        log.error("%s: using the defaults", e)
        return SiteConfig()


class Fleet(AgentChecks):
    """The user's agents: registrations read, confirmed against the scheduler, checked (:class:`AgentChecks`)
    and asked (:class:`AgentRequests`); this module keeps the watch loop and the lookups."""

    def __init__(self, base: Path, user: str, pool: TunnelPool | None = None, site: SiteConfig | None = None,
                 host: str | None = None) -> None:
        self.base = base
        self.layout = UserLayout(base, host or this_host()).ensure()  # the registry is this login node's
        self.fleet_dir = self.layout.fleet_dir
        self.user = user
        self.registry = Registry(self.layout.fleet_db)
        self.pool = pool or TunnelPool()
        self.key = user_key(base)
        self._tokens: dict[str, tuple[float, str]] = {}
        self._jobs: dict[str, dict[str, JobInfo]] = {}   # scheduler -> job id -> info
        self.site = site or site_config()
        self._asks: dict[str, AskPolicy] = {}              # scheduler -> when to ask it next
        self._folder = FolderWatch(self.fleet_dir)
        self._folder_lock = threading.Lock()
        self._scan = Backoff(self.site.fleet_scan_interval, self.site.fleet_scan_max)
        self._seen_at: dict[str, float] = {}               # agent name -> when its registration appeared
        self.clients = Clients()
        #: called once when the master has been idle for master_idle_exit seconds (the server stops)
        self.on_idle: Callable[[], None] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._checks = ThreadPoolExecutor(max_workers=16, thread_name_prefix="agent-check")
        self._checking: set[str] = set()
        self._lock = threading.Lock()
        self._kept = KeptConnections()
        self._read_cache: dict = {}
        self.uid = os.getuid()
        self._verified: dict[str, tuple[Ident, int]] = {}   # agent name -> what its check proved, generation
        self._agent_locks: dict[str, threading.Lock] = {}
        self.heartbeats = Heartbeats(self._heartbeat_ended)

    # -- lookup ---------------------------------------------------------------
    def known_jobs(self) -> dict[str, dict[str, JobInfo]]:
        """The scheduler's last answer on the user's jobs (scheduler -> job id -> info), as the watcher asked it."""
        return dict(self._jobs)

    def find(self, job: str, node: str | None = None) -> Agent:
        """The agent of JOB on NODE, or of the job's first node when NODE is not given."""
        agents = [a for a in self.registry.of_job(job) if a.state != "gone"]
        if not agents or (node and all(a.reg.node != node for a in agents)):
            self._read_folder(time.time())  # a command names an agent not seen yet (the looks back off): look now
            agents = [a for a in self.registry.of_job(job) if a.state != "gone"]
        if not agents:
            raise NotFound(f"no agent of job {job}: see `dxflow ls` for your jobs' agents")
        if node:
            for a in agents:
                if a.reg.node == node:
                    return a
            raise NotFound(f"job {job} has no agent on node {node}; its nodes: "
                           f"{', '.join(sorted(a.reg.node for a in agents))}")
        info = self._jobs.get(agents[0].reg.scheduler, {}).get(job)
        order = info.nodes if info else []
        agents.sort(key=lambda a: (order.index(a.reg.node) if a.reg.node in order else len(order), a.reg.node))
        return agents[0]

    def relay_target(self, job: str, node: str | None = None) -> Agent:
        """The agent of JOB on NODE that requests may be relayed to (the relay routes' one way to an agent).

        An agent not verified on the node's current transport is checked first (or the check under way
        is waited for, up to VERIFY_WAIT); AgentLost if it does not pass.
        """
        agent = self.find(job, node)
        if agent.state == "ready" and self.verified(agent) is not None:
            return agent
        if agent.state == "starting":
            self.refresh(metrics=False)
        lock = self._agent_lock(agent.name)
        if not lock.acquire(timeout=VERIFY_WAIT):
            raise AgentStarting(f"agent {agent.name} is still being checked; try again in a moment")
        try:
            current = self.registry.get(agent.name)
            if current is None or current.state == "gone":
                raise AgentLost(f"agent lost: {agent.name} has stopped")
            if not (current.state == "ready" and self.verified(current) is not None):
                self._check_locked(current)
                current = self.registry.get(agent.name) or current
            if current.state == "ready" and self.verified(current) is not None:
                return current
            if current.state == "incompatible":
                raise AgentUnreachable(f"agent {current.name} is incompatible: {current.detail}")
            raise AgentLost(f"agent lost: {current.name}: {current.detail or current.state}")
        finally:
            lock.release()

    # -- the loop -------------------------------------------------------------
    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="fleet", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._checks.shutdown(wait=False, cancel_futures=True)
        self.heartbeats.stop()
        self.pool.close()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.cycle()
                if self._idle_over():
                    return
                wait = self._next_wait()
            except Exception:  # noqa: BLE001 - the watcher must keep going; the log says why
                log.exception("fleet cycle failed")
                wait = self._scan.high
            self._wake.wait(wait)
            self._wake.clear()

    def cycle(self) -> None:
        now = time.time()
        if self._folder.changed():
            self._read_folder(now)
        agents = [a for a in self.registry.all() if a.state != "gone"]
        if not agents:
            return
        jobs = self._scheduler_jobs({a.reg.scheduler for a in agents})
        for agent in agents:
            info = jobs.get(agent.reg.scheduler, {}).get(agent.reg.job)
            # an answer older than the registration tells nothing about it: it waits for the next one
            known = (agent.reg.scheduler in jobs and
                     self._ask(agent.reg.scheduler).asked_at_wall >= self._seen_at.get(agent.name, 0.0))
            if known and has_controller(agent.reg.scheduler) and (info is None or info.state in (JobState.ENDED,
                                                                                                 JobState.ENDING)):
                self._gone(agent, "job ended" if info is None else f"job {info.state.value}")
                continue
            if known and info is not None and info.nodes and agent.reg.node not in info.nodes:
                self._gone(agent, f"job {agent.reg.job} does not run on {agent.reg.node}")
                continue
            if now - agent.checked >= self._check_wait(agent):
                self._check_later(agent)

    def _read_folder(self, now: float) -> None:
        """Read the registrations: new ones are added, removed ones are gone; either is news."""
        with self._folder_lock:  # the watcher and a request (find) may both read it
            self._read_folder_locked(now)

    def _read_folder_locked(self, now: float) -> None:
        self._folder.read()
        on_disk = {r.name: r for r in registration.read_all(self.fleet_dir, self._read_cache) if r.user == self.user}
        news = False
        for name, reg in on_disk.items():
            if self.registry.upsert(reg):
                self._seen_at[name] = now
                news = True
        for agent in self.registry.all():
            if agent.name not in on_disk and agent.state != "gone":
                self.forget(agent)
                self.registry.set_state(agent.name, "gone", "registration removed (agent stopped)")
                news = True
            elif agent.state == "gone" and agent.name not in on_disk and now - agent.changed > GONE_KEEP:
                self.registry.delete(agent.name)
                self._seen_at.pop(agent.name, None)
                with self._lock:
                    self._agent_locks.pop(agent.name, None)
        if news:
            for policy in self._asks.values():
                policy.want()
            self._scan.reset()

    def _check_wait(self, agent: Agent) -> float:
        """Seconds between two checks of the agent in its state."""
        if agent.state == "ready" and self.verified(agent) is None:
            return 0.0  # a restarted master, a new tunnel, a heartbeat gone silent: prove it again now
        return {"starting": 0.0, "lost": LOST_RETRY}.get(agent.state, HEALTH_INTERVAL)

    def _next_wait(self) -> float:
        """Seconds until the next look: the backoff, or sooner when a check or a question is due."""
        wait = self._scan.next()
        now = time.time()
        agents = [a for a in self.registry.all() if a.state != "gone"]
        with self._lock:
            checking = set(self._checking)
        for agent in agents:
            if agent.state == "starting":
                wait = min(wait, self._scan.low)
            elif agent.name not in checking:
                wait = min(wait, max(self._scan.low, agent.checked + self._check_wait(agent) - now))
        for name in {a.reg.scheduler for a in agents if has_controller(a.reg.scheduler)}:
            wait = min(wait, max(self._scan.low, self._ask(name).wait()))
        if self.site.master_idle_exit > 0 and not self._live(agents):
            wait = min(wait, max(self._scan.low, self.site.master_idle_exit - self.clients.idle_for()))
        return wait

    @staticmethod
    def _live(agents: list[Agent]) -> bool:
        return any(a.state in ("starting", "ready") for a in agents)

    def _idle_over(self) -> bool:
        """True (and the server told) when there was no live agent and no client for master_idle_exit seconds."""
        limit = self.site.master_idle_exit
        if limit <= 0 or self.on_idle is None or self.clients.idle_for() < limit:
            return False
        if self._live(self.registry.all()):
            return False
        log.info("no live agent and no client for %.0f s: the master exits (the next command starts it)", limit)
        self.on_idle()
        return True

    def _gone(self, agent: Agent, why: str) -> None:
        self.forget(agent)
        self.registry.set_state(agent.name, "gone", why)
        registration.remove(self.fleet_dir, agent.name, pid=agent.reg.pid)

    def _ask(self, name: str) -> AskPolicy:
        policy = self._asks.get(name)
        if policy is None:
            policy = self._asks[name] = AskPolicy(self.site.master_check_interval, self.site.master_check_gap)
        return policy

    def _scheduler_jobs(self, names: set[str]) -> dict[str, dict[str, JobInfo]]:
        """Each scheduler's jobs of this user: asked (one filtered query) when its policy says so, and
        within the process's cap; otherwise the last answer."""
        for name in filter(has_controller, names):
            policy = self._ask(name)
            if not policy.due() or not QUERY_BUDGET.available():
                continue
            policy.asked()
            try:
                jobs = get_scheduler(name).jobs(user=self.user)
                self._jobs[name] = {j.job: j for j in jobs}
            except (SchedulerError, DxflowError) as e:
                log.warning("cannot list %s jobs: %s", name, e)
                self._jobs.pop(name, None)  # unknown: agents are neither confirmed nor dropped
        return {k: v for k, v in self._jobs.items() if k in names}

    def refresh(self, metrics: bool = True) -> None:
        """The user runs a command that wants a fresh view (`dxflow ls`): read the folder and ask the
        scheduler now (the question at most every master_check_gap seconds); with ``metrics``, the node
        metrics of ready agents older than METRICS_FRESH are read again first (up to METRICS_WAIT)."""
        for policy in self._asks.values():
            policy.want()
        self._folder.force()
        self._scan.reset()
        self._wake.set()
        if metrics:
            self.refresh_metrics()

    def refresh_metrics(self, wait: float = METRICS_WAIT) -> None:
        """Read ``/api/node`` again of every ready, proven agent whose metrics are older than METRICS_FRESH,
        all at once; what is not answered within ``wait`` keeps its old reading (and its age says so)."""
        now = time.time()

        def old(agent: Agent) -> bool:
            age = agent.metrics_age(now)
            return age is None or age > METRICS_FRESH
        stale = [a for a in self.registry.all() if a.state == "ready" and old(a) and self.verified(a) is not None]
        if not stale:
            return
        done = [self._checks.submit(self._read_metrics, a, wait) for a in stale]
        futures.wait(done, timeout=wait)

    def _read_metrics(self, agent: Agent, timeout: float) -> None:
        try:
            info = self.get_json(agent, "/api/node", timeout=timeout)
        except DxflowError as e:  # unreachable now: the heartbeat decides whether it is lost
            log.info("metrics of %s not refreshed: %s", agent.name, e)
            return
        current = self.registry.get(agent.name)
        if current is not None and current.state == "ready" and current.reg.pid == agent.reg.pid:
            self.registry.set_metrics(agent.name, info)
