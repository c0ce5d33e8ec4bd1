"""The fleet watcher: registrations in, checked agents out.

Every half second it scans ``~/.dxflow/fleet/``; new records are confirmed against
the scheduler (is the job running, on that node?) and then reached through the
node's tunnel, where the agent must sign a fresh challenge with the key it
registered. A record whose job has ended is removed, file and row.
"""

from __future__ import annotations

import http.client
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from dxflow import registration
from dxflow.auth import check_challenge, fingerprint, mint_token, user_key
from dxflow.errors import AgentUnreachable, DxflowError, NotFound, SchedulerError
from dxflow.master.registry import Agent, Registry
from dxflow.master.tunnels import TunnelHTTPConnection, TunnelPool
from dxflow.schedulers import JobInfo, JobState, get_scheduler

log = logging.getLogger(__name__)

SCAN_INTERVAL = 0.5
SCHEDULER_INTERVAL = 5.0   # at most one scheduler query per scheduler per this many seconds
HEALTH_INTERVAL = 30.0     # ready agents are pinged this often
LOST_RETRY = 2.0           # unreachable agents are retried this often
GONE_KEEP = 600.0
IDLE_KEEP = 20.0           # idle kept-alive connections to agents are dropped after this (agents keep 30 s)
IDLE_PER_AGENT = 8          # rows of gone agents are kept this long for `dxflow ls --all`


class Fleet:
    def __init__(self, base: Path, user: str, pool: TunnelPool | None = None) -> None:
        self.base = base
        self.fleet_dir = base / "fleet"
        self.user = user
        self.registry = Registry(base / "fleet.db")
        self.pool = pool or TunnelPool()
        self.key = user_key(base)
        self._tokens: dict[str, tuple[float, str]] = {}
        self._jobs: dict[str, dict[str, JobInfo]] = {}   # scheduler -> job id -> info
        self._jobs_at: dict[str, float] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._checks = ThreadPoolExecutor(max_workers=16, thread_name_prefix="agent-check")
        self._checking: set[str] = set()
        self._lock = threading.Lock()
        self._idle: dict[str, list[tuple[TunnelHTTPConnection, float]]] = {}
        self._read_cache: dict = {}

    # -- tokens and requests ------------------------------------------------
    def token(self, agent: Agent) -> str:
        aud = fingerprint(agent.reg.public_key)
        now = time.time()
        cached = self._tokens.get(aud)
        if cached and cached[0] > now + 30:
            return cached[1]
        tok = mint_token(self.key, self.user, aud, lifetime=120)
        self._tokens[aud] = (now + 120, tok)
        return tok

    def connection(self, agent: Agent, timeout: float = 60.0) -> TunnelHTTPConnection:
        return TunnelHTTPConnection(self.pool, agent.reg.address, agent.reg.port, timeout=timeout)

    def acquire(self, agent: Agent, timeout: float = 60.0) -> tuple[TunnelHTTPConnection, bool]:
        """A kept-alive connection to the agent if one is idle (True), else a new one (False).

        Reusing the channel saves a channel open per request: the relay's added latency.
        """
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(agent.name, [])
            while idle:
                conn, since = idle.pop()
                if now - since < IDLE_KEEP and conn.sock is not None:
                    conn.timeout = timeout
                    conn.sock.settimeout(timeout)
                    return conn, True
                conn.close()
        return self.connection(agent, timeout), False

    def release(self, agent: Agent, conn: TunnelHTTPConnection, reusable: bool) -> None:
        """Keep the connection for the next request when its response was read to the end."""
        if not reusable or conn.sock is None:
            conn.close()
            return
        with self._lock:
            idle = self._idle.setdefault(agent.name, [])
            if len(idle) < IDLE_PER_AGENT:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def ask(self, agent: Agent, path: str, timeout: float = 15.0) -> tuple[int, dict]:
        """GET ``path`` from the agent: (HTTP status, its JSON answer); AgentUnreachable if it cannot be asked."""
        conn = self.connection(agent, timeout)
        try:
            conn.request("GET", path, headers={"Authorization": f"Bearer {self.token(agent)}"})
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise AgentUnreachable(f"agent {agent.name}: {e}") from e
        finally:
            conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, {"error": "bad_gateway", "message": raw.decode(errors="replace")[:300]}

    def get_json(self, agent: Agent, path: str, timeout: float = 15.0) -> dict:
        status, data = self.ask(agent, path, timeout)
        if status != 200:
            raise DxflowError(f"agent {agent.name} answered {status}: {data.get('message', data)}")
        return data

    # -- lookup ---------------------------------------------------------------
    def find(self, job: str, node: str | None = None) -> Agent:
        """The agent of JOB on NODE, or of the job's first node when NODE is not given."""
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

    # -- the loop -------------------------------------------------------------
    def start(self) -> threading.Thread:
        t = threading.Thread(target=self.run, name="fleet", daemon=True)
        t.start()
        return t

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._checks.shutdown(wait=False, cancel_futures=True)
        self.pool.close()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.cycle()
            except Exception:  # noqa: BLE001 - the watcher must keep going; the log says why
                log.exception("fleet cycle failed")
            self._wake.wait(SCAN_INTERVAL)
            self._wake.clear()

    def cycle(self) -> None:
        now = time.time()
        on_disk = {r.name: r for r in registration.read_all(self.fleet_dir, self._read_cache) if r.user == self.user}
        new = [name for name, reg in on_disk.items() if self.registry.upsert(reg)]
        for agent in self.registry.all():
            if agent.name not in on_disk and agent.state != "gone":
                self.registry.set_state(agent.name, "gone", "registration removed (agent stopped)")
            elif agent.state == "gone" and agent.name not in on_disk and now - agent.changed > GONE_KEEP:
                self.registry.delete(agent.name)
        agents = [a for a in self.registry.all() if a.state != "gone"]
        if not agents:
            return
        jobs = self._scheduler_jobs({a.reg.scheduler for a in agents}, force=bool(new))
        for agent in agents:
            info = jobs.get(agent.reg.scheduler, {}).get(agent.reg.job)
            known = agent.reg.scheduler in jobs
            if known and agent.reg.scheduler != "local" and (info is None or info.state in (JobState.ENDED,
                                                                                          JobState.ENDING)):
                self._gone(agent, "job ended" if info is None else f"job {info.state.value}")
                continue
            if known and info is not None and info.nodes and agent.reg.node not in info.nodes:
                self._gone(agent, f"job {agent.reg.job} does not run on {agent.reg.node}")
                continue
            wait = {"starting": 0.0, "lost": LOST_RETRY}.get(agent.state, HEALTH_INTERVAL)
            due = now - agent.checked >= wait
            if due:
                self._check_later(agent)

    def _gone(self, agent: Agent, why: str) -> None:
        self.registry.set_state(agent.name, "gone", why)
        registration.remove(self.fleet_dir, agent.name, pid=agent.reg.pid)

    def _scheduler_jobs(self, names: set[str], force: bool) -> dict[str, dict[str, JobInfo]]:
        """Each scheduler's jobs of this user, asked at most every SCHEDULER_INTERVAL (or now, on news)."""
        now = time.monotonic()
        for name in names:
            if name == "local":
                continue
            if not force and now - self._jobs_at.get(name, -1e9) < SCHEDULER_INTERVAL:
                continue
            try:
                jobs = get_scheduler(name).jobs(user=self.user)
                self._jobs[name] = {j.job: j for j in jobs}
                self._jobs_at[name] = now
            except (SchedulerError, DxflowError) as e:
                log.warning("cannot list %s jobs: %s", name, e)
                self._jobs.pop(name, None)  # unknown: agents are neither confirmed nor dropped
                self._jobs_at[name] = now
        return {k: v for k, v in self._jobs.items() if k in names}

    def _check_later(self, agent: Agent) -> None:
        with self._lock:
            if agent.name in self._checking:
                return
            self._checking.add(agent.name)
        self._checks.submit(self._check, agent)

    def _check(self, agent: Agent) -> None:
        try:
            challenge = secrets.token_urlsafe(24)
            health = self.get_json(agent, f"/api/health?challenge={challenge}")
            if not check_challenge(agent.reg.public_key, challenge, health.get("signature", "")):
                self.registry.set_state(agent.name, "lost", "identity check failed: not the registered agent")
                return
            info = self.get_json(agent, "/api/node")
            self.registry.set_state(agent.name, "ready", "", node_info=info)
        except DxflowError as e:
            self.registry.set_state(agent.name, "lost", str(e))
        except Exception as e:  # noqa: BLE001
            log.exception("checking %s", agent.name)
            self.registry.set_state(agent.name, "lost", f"{type(e).__name__}: {e}")
        finally:
            with self._lock:
                self._checking.discard(agent.name)

    def refresh(self) -> None:
        """Re-check now (the CLI asks before listing)."""
        self._jobs_at.clear()
        self._wake.set()
