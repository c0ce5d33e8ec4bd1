"""The master's connections to agents, once the fleet says an agent may be reached: the relay's
connection, which tells an agent that stopped from a slow one, and the kept-alive connections waiting
for the next request.

Kept apart from :mod:`dxflow.master.fleet`, which decides *whether* an agent may be reached (its
checks, what they proved); this module is about *how* a request reaches it, and is used by the fleet alone.
"""

from __future__ import annotations

import http.client
import threading
import time
from typing import TYPE_CHECKING

from dxflow.edge.channelhttp import TunnelHTTPConnection
from dxflow.errors import AgentUnreachable
from dxflow.master.registry import Agent

if TYPE_CHECKING:  # for the annotation only: the fleet imports this module
    from dxflow.master.fleet import Fleet

IDLE_KEEP = 20.0           # idle kept-alive connections to agents are dropped after this (agents keep 30 s)
IDLE_PER_AGENT = 8         # at most this many idle kept-alive connections per agent


class AgentConnection(TunnelHTTPConnection):
    """A relay's connection to an agent, on the transport its check passed on; a port that refuses
    or a connection closed before its first answer marks the agent lost."""

    def __init__(self, fleet: Fleet, agent: Agent, generation: int, timeout: float) -> None:
        super().__init__(fleet.pool, agent.reg.address, agent.reg.port, timeout=timeout, generation=generation)
        self._fleet = fleet
        self._agent = agent
        self.answered = False

    def connect(self) -> None:
        try:
            super().connect()
        except AgentUnreachable as e:
            if self._fleet.pool.generation(self._agent.reg.address, job=self._agent.reg.job) == self.generation:
                # the tunnel is fine
                self._fleet.lose(self._agent, f"agent stopped: its port refused the connection ({e})")
            else:
                self._fleet.forget(self._agent)
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
                self._fleet.lose(self._agent, f"agent stopped: it closed a connection without answering ({e})")
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
