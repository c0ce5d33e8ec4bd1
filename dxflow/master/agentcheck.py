"""Whether an agent may be reached: the checks that prove a registration's port is its agent's, and what
they proved (a part of :class:`dxflow.master.fleet.Fleet`, kept in its own module).

A check, on a transport where the agent is not proven yet, reads the node's table of sockets first (is the
port held by the user's process? :mod:`dxflow.master.listeners`), then has the agent sign a fresh challenge
with the key it registered, then opens its heartbeat stream (:mod:`dxflow.master.heartbeat`), whose end
says at once that the proof no longer holds. What a check proved holds on one transport generation of the
node's tunnel (:mod:`dxflow.master.tunnels`): :meth:`AgentChecks.verified` is the one answer to "may
anything be sent to this agent now?"; :mod:`dxflow.master.agentconn` asks it before every request.
"""

from __future__ import annotations

import logging
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from dxflow.auth import check_challenge
from dxflow.errors import AgentLost, DxflowError
from dxflow.master import heartbeat, listeners
from dxflow.master.agentconn import AgentRequests
from dxflow.master.heartbeat import Heartbeats, Key
from dxflow.master.registry import Agent, Registry

if TYPE_CHECKING:
    from dxflow.master.pace import AskPolicy, Backoff

log = logging.getLogger(__name__)

#: what a passed check proved: this registration (pid, key) at this listener, on this transport generation.
Ident = tuple[str, int, int, str]


def ident(agent: Agent) -> Ident:
    return agent.reg.address, agent.reg.port, agent.reg.pid, agent.reg.public_key


class AgentChecks(AgentRequests):
    """The fleet's checks of its agents, and what they proved; they ask the agents as any request does."""

    # the fleet's, set in Fleet.__init__
    registry: Registry
    heartbeats: Heartbeats
    uid: int
    _lock: threading.Lock
    _verified: dict[str, tuple[Ident, int]]   # agent name -> what its check proved, generation
    _agent_locks: dict[str, threading.Lock]
    _checking: set[str]
    _checks: ThreadPoolExecutor
    _scan: Backoff
    _asks: dict[str, AskPolicy]
    _wake: threading.Event

    def verified(self, agent: Agent) -> int | None:
        """The transport generation on which this agent is proven to be itself, if that still holds."""
        with self._lock:
            entry = self._verified.get(agent.name)
        if entry is None or entry[0] != ident(agent):
            return None
        gen = entry[1]
        # the connection the agent's job uses on its node (one per job under pam_slurm_adopt: docs/ssh.md)
        if (self.pool.generation(agent.reg.address, job=agent.reg.job) != gen
                or self.heartbeats.generation(entry[0][:2]) != gen):
            return None
        return gen

    def proven_generation(self, agent: Agent) -> int:
        """The transport generation the agent is proven on, for a channel that must go through it alone."""
        gen = self.verified(agent)
        if gen is None:
            raise AgentLost(f"agent {agent.name} lost: it is no longer proven on its node's tunnel; "
                            "see `dxflow ls`")
        return gen

    def forget(self, agent: Agent) -> None:
        """Drop what was proven about the agent: it must be checked again before anything is sent to it."""
        with self._lock:
            self._verified.pop(agent.name, None)
            key = (agent.reg.address, agent.reg.port)
            shared = any(v[0][:2] == key for v in self._verified.values())
        self._kept.drop(agent.name)
        if not shared:
            self.heartbeats.drop(key)

    def lose(self, agent: Agent, why: str) -> None:
        """The agent is lost: nothing goes to its port until a check proves the port is the user's again."""
        self.forget(agent)
        current = self.registry.get(agent.name)
        if current is not None and current.state != "gone" and current.reg.pid == agent.reg.pid:
            self.registry.set_state(agent.name, "lost", why)

    def failed(self, agent: Agent, generation: int | None, why: str) -> None:
        """Something sent to the agent on ``generation`` failed as it does when the agent has ended (a refused
        port, a connection closed unanswered): the agent is lost, unless that tunnel ended (through an OpenSSH
        ControlMaster that is ending, e.g. with the job whose connection it borrowed, a channel fails the same
        way): then it is only forgotten, and checked again before anything is sent to it."""
        if generation is not None and self.pool.ended(agent.reg.address, generation):
            log.info("agent %s must be checked again: the tunnel to its node closed (%s)", agent.name, why)
            self.forget(agent)
        else:
            self.lose(agent, why)

    def _heartbeat_ended(self, key: Key, generation: int, why: str, dead: bool | None) -> None:
        """What ends with a heartbeat stream: the proofs it backed (those on its generation; a newer check's
        stand). A socket's end (``dead`` None) is judged by its tunnel, off this thread (:meth:`judge_end`)."""
        with self._lock:
            names = [name for name, (proven, gen) in self._verified.items() if proven[:2] == key and gen == generation]
        for name in names:
            agent = self.registry.get(name)
            if agent is None:
                continue
            if dead:
                self.lose(agent, why)
            else:
                log.info("agent %s must be checked again: %s", name, why)
                self.forget(agent)   # at once: nothing is sent to it until a check proves it again
                if dead is None:
                    try:
                        self._checks.submit(self.judge_end, agent, generation, why)
                    except RuntimeError:  # the fleet is stopping
                        pass
        if names:  # news: an agent's end is often its job's, whose epilog removes the registration now
            self._scan.reset()
            for policy in self._asks.values():
                policy.want()
        self._wake.set()

    def judge_end(self, agent: Agent, generation: int, why: str) -> None:
        """A heartbeat socket on ``generation`` ended: the agent is lost unless the tunnel ended with it (an
        OpenSSH ControlMaster's end, e.g. that of the job whose connection the agent borrowed, ends every
        channel through it), or a check has proven the agent again meanwhile."""
        if self.pool.ended(agent.reg.address, generation):
            log.info("agent %s: its heartbeat ended with the tunnel to its node (generation %d)", agent.name,
                     generation)
            return
        with self._agent_lock(agent.name):
            if self.verified(agent) is None:
                self.lose(agent, why)

    def _agent_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._agent_locks.setdefault(name, threading.Lock())

    def _check_later(self, agent: Agent) -> None:
        with self._lock:
            if agent.name in self._checking:
                return
            self._checking.add(agent.name)
        self._checks.submit(self._check, agent)

    def _check(self, agent: Agent) -> None:
        try:
            with self._agent_lock(agent.name):
                current = self.registry.get(agent.name)
                if current is not None and current.state != "gone" and current.reg.pid == agent.reg.pid:
                    self._check_locked(current)
        finally:
            with self._lock:
                self._checking.discard(agent.name)

    def _check_locked(self, agent: Agent) -> None:
        """Check the agent (its lock held): on a transport where it is not proven yet, the port's owner
        first, then its signature of a fresh challenge, then its heartbeat stream; lost if any fails."""
        why = agent.reg.incompatibility()
        if why:  # another agent API (dxflow upgraded while the job ran): shown as such, never contacted
            self.forget(agent)
            self.registry.set_state(agent.name, "incompatible", why)
            return
        gen: int | None = None
        try:
            proven = gen = self.verified(agent)
            if gen is None:
                self.forget(agent)
                gen = self.pool.connect(agent.reg.address, job=agent.reg.job)
                why = listeners.refusal_on(self.pool, agent.reg.address, agent.reg.port, self.uid,
                                           agent.reg.node, gen)
                if why:
                    self.lose(agent, why)
                    return
            challenge = secrets.token_urlsafe(24)
            health = self.get_json(agent, f"/api/health?challenge={challenge}", generation=gen)
            if not check_challenge(agent.reg.public_key, challenge, health.get("signature", "")):
                self.lose(agent, "identity check failed: not the registered agent")
                return
            info = self.get_json(agent, "/api/node", generation=gen)
            key = (agent.reg.address, agent.reg.port)
            if self.heartbeats.generation(key) != gen:
                if proven is not None:  # it ended during this check: the port's owner is read again first
                    self.forget(agent)
                    return
                stream = heartbeat.open_stream(self.pool, agent.reg.address, agent.reg.port, self.token(agent), gen)
                self.heartbeats.add(key, stream, gen)
            with self._lock:
                self._verified[agent.name] = (ident(agent), gen)
            # "" but where the agent borrows another job's connection, which ends with that job
            if not self.registry.set_state(agent.name, "ready", self.pool.note(agent.reg.address, agent.reg.job, gen),
                                           node_info=info):
                self.forget(agent)  # its registration went while it was checked: nothing proven stays
        except DxflowError as e:
            self.failed(agent, gen, str(e))   # a tunnel that ended under the check proves nothing of the agent
        except Exception as e:  # noqa: BLE001
            log.exception("checking %s", agent.name)
            self.lose(agent, f"{type(e).__name__}: {e}")
