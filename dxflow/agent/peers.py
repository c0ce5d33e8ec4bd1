"""Another node's agent of the same job, reached from this agent the way the master reaches it: a broadcast's relay.

A broadcast (:mod:`dxflow.agent.broadcast`) is passed on from node to node instead of being sent N
times by the login node. This agent runs as the user, on a node of the user's job, so it reaches the
next node as the user does: an SSH login with the user's keys, host keys checked against known_hosts
(:mod:`dxflow.ssh.paramiko_login`), then a ``direct-tcpip`` channel to the peer agent's port on that
node's 127.0.0.1. No port is opened anywhere for it. Before any token goes there the peer is proven
as the master proves an agent (:mod:`dxflow.master.fleet`):

1. its port is held by the user alone (the node's ``/proc/net/tcp``, read through SFTP on that login):
   an agent that stopped may have left its port to another user;
2. it signs a fresh challenge with the key the master handed down for it (the key it registered).

The token comes from the master too, minted for that one agent (its audience) and short-lived: this
agent never holds the user's key. A peer that cannot be reached this way (no key without passphrase,
a setting only OpenSSH honours, nodes that do not see each other) is :class:`PeerUnreachable`: the
login node then sends to that node itself.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import secrets
import threading
import time
from typing import Any, Iterator

import paramiko

from dxflow.auth import check_challenge
from dxflow.edge.channelhttp import TunnelHTTPConnection
from dxflow.edge.tcptable import PROC_TABLES, REACHES_LOOPBACK4, parse_listeners
from dxflow.errors import AccessDenied, AgentUnreachable, ConfigError
from dxflow.ssh import options as ssh_options
from dxflow.ssh import paramiko_login
from dxflow.ssh.transport import UseOpenSSH

log = logging.getLogger(__name__)

#: seconds a write to a peer may stay stuck (its window full) before it counts as lost: a node cut off
#: mid-broadcast holds its parent (and so the tree above) this long at most
TIMEOUT = 30.0


class PeerUnreachable(AgentUnreachable):
    """This node cannot reach the peer's node as the user (no SSH between them): the login node sends instead."""


#: seconds an SSH login to another node is kept for the next broadcast (``cp -r``: one request per file)
KEEP = 60.0


class Logins:
    """This agent's SSH logins to the other nodes, kept a while for the next request: a login costs a key
    exchange, a file of ``cp -r`` only its bytes. What a login proves about a peer (its port, its identity)
    is checked again on every request all the same."""

    def __init__(self) -> None:
        self._kept: dict[str, tuple[paramiko.Transport, float]] = {}
        self._timers: dict[str, threading.Timer] = {}
        self._lock = threading.Lock()

    def take(self, address: str) -> paramiko.Transport:
        now = time.monotonic()
        with self._lock:
            for name, (t, since) in list(self._kept.items()):
                if now - since > KEEP or not t.is_active():
                    del self._kept[name]
                    t.close()
            kept = self._kept.pop(address, None)
        if kept is not None:
            return kept[0]
        try:
            opts = ssh_options.resolve(address)
        except ConfigError as e:
            raise PeerUnreachable(f"{address}: {e}") from e
        if opts.jumps:  # nodes of one job that see each other only through a jump host: the login node sends
            raise PeerUnreachable(f"{address}: reached through ProxyJump, not straight from another node")
        try:
            return paramiko_login.login(address, opts)
        except (UseOpenSSH, paramiko.SSHException, OSError, EOFError) as e:
            raise PeerUnreachable(f"{address}: no SSH login to it from this node ({e})") from e

    def give_back(self, address: str, transport: paramiko.Transport) -> None:
        """Keep the login for KEEP seconds; then it is closed if no request took it meanwhile (an idle
        agent holds no login, nor its reading thread)."""
        if not transport.is_active():
            return
        with self._lock:
            old = self._kept.pop(address, None)
            self._kept[address] = (transport, time.monotonic())
        if old is not None and old[0] is not transport:
            old[0].close()
        self._expire_in(address, KEEP)

    def _expire_in(self, address: str, delay: float) -> None:
        """One timer per node at a time (a ``cp -r`` gives a login back once per file)."""
        with self._lock:
            if address in self._timers:
                return
            timer = self._timers[address] = threading.Timer(delay, self._expire, args=(address,))
        timer.daemon = True
        timer.start()

    def _expire(self, address: str) -> None:
        closing: paramiko.Transport | None = None
        with self._lock:
            del self._timers[address]
            kept = self._kept.get(address)
            if kept is None:
                return  # taken: it comes back with give_back
            left = KEEP - (time.monotonic() - kept[1])
            if left <= 0.5:
                closing = self._kept.pop(address)[0]
        if closing is not None:
            closing.close()
        else:
            self._expire_in(address, left)  # given back again meanwhile: kept KEEP seconds from then


LOGINS = Logins()


def port_refusal(tables: list[str], port: int, uid: int, node: str) -> str:
    """Why nothing may be sent to 127.0.0.1:PORT on NODE ("" when only UID's sockets listen there)."""
    found = {lst.uid for text in tables for lst in parse_listeners(text)
             if lst.port == port and lst.address in REACHES_LOOPBACK4}
    if not found:
        return f"nothing listens on port {port} on {node} (its agent stopped)"
    others = found - {uid}
    if others:
        return (f"port {port} on {node} is held by another user's process (uid "
                f"{', '.join(str(u) for u in sorted(others))}): its agent stopped and someone took the port")
    return ""


class Peer:
    """The agent of one node of the job, as the plan names it: node, address, port, public key, token."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.node: str = spec["node"]
        self.address: str = spec["address"]
        self.port: int = spec["port"]
        self.public_key: str = spec["public_key"]
        self.token: str = spec["token"]
        self.transport: paramiko.Transport | None = None
        self.conn: TunnelHTTPConnection | None = None

    # -- reaching it -----------------------------------------------------------------------------
    def open(self) -> None:
        """Log in to the peer's node and prove its agent; PeerUnreachable or AccessDenied if not."""
        self.transport = LOGINS.take(self.address)
        why = self._port_refusal()
        if why:
            raise AccessDenied(why)
        self._check_identity()

    def _port_refusal(self) -> str:
        assert self.transport is not None
        tables = []
        try:
            sftp = self.transport.open_sftp_client()
            if sftp is None:
                raise paramiko.SSHException("no SFTP subsystem")
            with sftp:
                for path in PROC_TABLES:
                    try:
                        with sftp.open(path, "r") as f:
                            tables.append(f.read().decode("ascii", "replace"))
                    except FileNotFoundError:  # no IPv6 on that node
                        continue
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise PeerUnreachable(f"{self.node}: its table of sockets cannot be read ({e})") from e
        return port_refusal(tables, self.port, os.getuid(), self.node)

    def _check_identity(self) -> None:
        challenge = secrets.token_urlsafe(24)
        conn = self.connection(30.0)
        try:
            conn.request("GET", f"/api/health?challenge={challenge}", headers=self._auth())
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException, paramiko.SSHException, EOFError) as e:
            raise PeerUnreachable(f"{self.node}: its agent did not answer ({e})") from e
        finally:
            conn.close()
        try:
            signature = json.loads(raw).get("signature", "") if resp.status == 200 else ""
        except (ValueError, AttributeError):
            signature = ""
        if not check_challenge(self.public_key, challenge, signature):
            raise AccessDenied(f"{self.node}: port {self.port} did not prove to be the job's agent "
                               f"(HTTP {resp.status}): nothing was sent to it")

    # ChannelSource, for TunnelHTTPConnection
    def channel(self, address: str, port: int, timeout: float = TIMEOUT, generation: int | None = None,
                host: str = "127.0.0.1") -> paramiko.Channel:
        assert self.transport is not None
        try:
            return self.transport.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise PeerUnreachable(f"{self.node}: {e}") from e

    def connection(self, timeout: float = TIMEOUT) -> TunnelHTTPConnection:
        return TunnelHTTPConnection(self, self.address, self.port, timeout=timeout)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    # -- one broadcast request -----------------------------------------------------------------------
    def start(self, head: bytes, size: int) -> None:
        """Begin the PUT of a broadcast: its plan line ``head``, then ``size`` bytes by :meth:`send`."""
        self.conn = conn = self.connection()
        conn.putrequest("PUT", "/api/broadcast", skip_accept_encoding=True)
        for k, v in {**self._auth(), "Content-Type": "application/octet-stream",
                     "Content-Length": str(len(head) + size)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(head)

    def send(self, chunk: bytes | memoryview) -> None:
        assert self.conn is not None
        try:
            self.conn.send(chunk)
        except EOFError as e:  # paramiko's word for a channel that closed
            raise ConnectionResetError(f"the channel to {self.node} closed") from e

    def answers(self, depth: int = 0) -> Iterator[dict]:
        """The NDJSON lines of the peer's answer (its own result, then its subtree's), as they come; a
        subtree ``depth`` deep may be silent while the nodes below it time out, one TIMEOUT each."""
        assert self.conn is not None
        if self.conn.sock is not None:
            self.conn.sock.settimeout(TIMEOUT * (depth + 2))
        resp = self.conn.getresponse()
        if resp.status >= 400:
            raw = resp.read()
            try:
                message = json.loads(raw).get("message") or raw.decode(errors="replace")
            except (ValueError, AttributeError):
                message = raw.decode(errors="replace")[:300]
            raise AgentUnreachable(f"{self.node} refused the broadcast (HTTP {resp.status}): {message}")
        while True:
            line = resp.readline()
            if not line:
                return
            if line.strip():
                yield json.loads(line)

    def close(self, keep: bool = False) -> None:
        """Close the request; the login is kept for the next one with ``keep`` (the request went well)."""
        if self.conn is not None:
            self.conn.close()
        if self.transport is not None:
            if keep:
                LOGINS.give_back(self.address, self.transport)
            else:
                self.transport.close()
            self.transport = None
