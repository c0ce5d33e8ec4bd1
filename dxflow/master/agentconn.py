"""The master's requests to agents, once the fleet says an agent may be reached: the tokens they carry,
the relay's connection, which tells an agent that stopped from a slow one, and the kept-alive connections
waiting for the next request.

Kept apart from :mod:`dxflow.master.agentcheck`, which decides *whether* an agent may be reached (its
checks, what they proved); this module is about *how* a request reaches it. :class:`AgentRequests` is a
part of :class:`dxflow.master.fleet.Fleet`, kept here with the connections it hands out.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import TYPE_CHECKING

from dxflow.auth import fingerprint, mint_token
from dxflow.edge.channelhttp import TunnelHTTPConnection
from dxflow.errors import AgentLost, AgentUnreachable, DxflowError
from dxflow.master.registry import Agent

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

    from dxflow.master.tunnels import TunnelPool

IDLE_KEEP = 20.0           # idle kept-alive connections to agents are dropped after this (agents keep 30 s)
IDLE_PER_AGENT = 8         # at most this many idle kept-alive connections per agent


class AgentConnection(TunnelHTTPConnection):
    """A relay's connection to an agent, on the transport its check passed on; a port that refuses
    or a connection closed before its first answer marks the agent lost."""

    def __init__(self, fleet: AgentRequests, agent: Agent, generation: int, timeout: float) -> None:
        super().__init__(fleet.pool, agent.reg.address, agent.reg.port, timeout=timeout, generation=generation)
        self._fleet = fleet
        self._agent = agent
        self.answered = False

    def connect(self) -> None:
        try:
            super().connect()
        except AgentUnreachable as e:
            self._fleet.failed(self._agent, self.generation, f"agent stopped: its port refused the connection ({e})")
            raise

    def send(self, data) -> None:
        try:
            super().send(data)
        except EOFError as e:  # paramiko's word for a transport that closed under a request body
            raise ConnectionResetError(f"the tunnel to {self._agent.reg.node} closed") from e

    def getresponse(self):
        try:
            resp = super().getresponse()
        except TimeoutError:  # slow is not lost: the heartbeat says whether it lives
            raise
        except (OSError, http.client.HTTPException) as e:
            if not self.answered:
                self._fleet.failed(self._agent, self.generation,
                                   f"agent stopped: it closed a connection without answering ({e})")
            raise
        self.answered = True
        return resp


class KeptConnections:
    """Idle kept-alive connections per agent: reusing a channel saves a channel open per request
    (the relay's added latency)."""

    def __init__(self) -> None:
        self._idle: dict[str, list[tuple[TunnelHTTPConnection, float]]] = {}
        self._lock = threading.Lock()

    def take(self, name: str, timeout: float) -> TunnelHTTPConnection | None:
        """An idle connection to agent ``name`` kept less than IDLE_KEEP seconds, set to ``timeout``; None if none."""
        now = time.monotonic()
        with self._lock:
            idle = self._idle.get(name, [])
            while idle:
                conn, since = idle.pop()
                if now - since < IDLE_KEEP and conn.sock is not None:
                    conn.timeout = timeout
                    conn.sock.settimeout(timeout)
                    return conn
                conn.close()
        return None

    def keep(self, name: str, conn: TunnelHTTPConnection, reusable: bool) -> None:
        """Keep the connection for the next request when its response was read to the end."""
        if not reusable or conn.sock is None:
            conn.close()
            return
        with self._lock:
            idle = self._idle.setdefault(name, [])
            if len(idle) < IDLE_PER_AGENT:
                idle.append((conn, time.monotonic()))
                return
        conn.close()

    def drop(self, name: str) -> None:
        """Close every idle connection to agent ``name`` (what was proven about it no longer holds)."""
        with self._lock:
            idle = self._idle.pop(name, [])
        for conn, _ in idle:
            conn.close()


class AgentRequests:
    """The fleet's requests to its agents (a part of :class:`dxflow.master.fleet.Fleet`): tokens minted and
    kept, connections handed out only to agents the fleet has proven (:meth:`verified`), kept-alive ones reused."""

    # the fleet's, set in Fleet.__init__
    pool: TunnelPool
    key: RSAPrivateKey
    user: str
    _tokens: dict[str, tuple[float, str]]
    _kept: KeptConnections

    # what the checks decide (dxflow.master.agentcheck.AgentChecks)
    def verified(self, agent: Agent) -> int | None:
        """The transport generation the agent is proven on; None: nothing may be sent to it."""
        raise NotImplementedError

    def forget(self, agent: Agent) -> None:
        """Drop what was proven about the agent."""
        raise NotImplementedError

    def lose(self, agent: Agent, why: str) -> None:
        """The agent is lost: nothing goes to its port until it is proven again."""
        raise NotImplementedError

    def failed(self, agent: Agent, generation: int | None, why: str) -> None:
        """A request on ``generation`` failed as it does when the agent has ended: lost, or forgotten if the
        tunnel itself ended."""
        raise NotImplementedError

    def token(self, agent: Agent) -> str:
        aud = fingerprint(agent.reg.public_key)
        now = time.time()
        cached = self._tokens.get(aud)
        if cached and cached[0] > now + 30:
            return cached[1]
        tok = mint_token(self.key, self.user, aud, lifetime=120)
        self._tokens[aud] = (now + 120, tok)
        return tok

    def connection(self, agent: Agent, timeout: float = 60.0, generation: int | None = None) -> TunnelHTTPConnection:
        """A connection to a verified agent (AgentLost if it is not); a check passes the ``generation`` it proves."""
        if generation is None:
            generation = self.verified(agent)
            if generation is None:
                raise AgentLost(f"agent lost: {agent.name} is not checked on the tunnel in use")
            return AgentConnection(self, agent, generation, timeout)
        return TunnelHTTPConnection(self.pool, agent.reg.address, agent.reg.port, timeout=timeout,
                                    generation=generation)

    def acquire(self, agent: Agent, timeout: float = 60.0) -> tuple[TunnelHTTPConnection, bool]:
        """A kept-alive connection to the agent if one is idle (True), else a new one (False).

        Reusing the channel saves a channel open per request: the relay's added latency.
        AgentLost if the agent is not verified (then no connection of it is handed out).
        """
        if self.verified(agent) is None:
            raise AgentLost(f"agent lost: {agent.name} is not checked on the tunnel in use")
        conn = self._kept.take(agent.name, timeout)
        if conn is not None:
            return conn, True
        return self.connection(agent, timeout), False

    def release(self, agent: Agent, conn: TunnelHTTPConnection, reusable: bool) -> None:
        """Keep the connection for the next request when its response was read to the end."""
        self._kept.keep(agent.name, conn, reusable)

    def ask(self, agent: Agent, path: str, timeout: float = 15.0, generation: int | None = None) -> tuple[int, dict]:
        """GET ``path`` from the agent: (HTTP status, its JSON answer); AgentUnreachable if it cannot be asked."""
        conn = self.connection(agent, timeout, generation)
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

    def get_json(self, agent: Agent, path: str, timeout: float = 15.0, generation: int | None = None) -> dict:
        status, data = self.ask(agent, path, timeout, generation)
        if status != 200:
            raise DxflowError(f"agent {agent.name} answered {status}: {data.get('message', data)}")
        return data
