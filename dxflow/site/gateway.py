"""The agent gateway: where agents dial in (SSH, paramiko's server side), and the site reaches them back.

Agents open the connections (:mod:`dxflow.agent.dialout`); nothing on a node listens for the site.
On each connection the gateway, in order:

1. shows the site's host key (``state_dir``/gateway_host_key; agents pin its published half);
2. lets in an agent (SSH user name = the agent's name, ``CLUSTER.JOB.NODE``) either by the gateway key
   it enrolled with before (``publickey``, the key the store holds for that name), or by
   **enrollment** (``password``): a MUNGE credential of uid 0 — root's, the prolog's — whose payload
   names exactly this agent, its user and a key whose holder signed this very SSH session, and only
   if the scheduler says the job runs on that node (:mod:`dxflow.site.enrollment`: the cheap checks
   first, ``munged`` asked once for all replicas). Then the store records the agent with its key.
   A store that cannot say whether it knows the offered key refuses the connection (logged): the
   agent dials again later, its credential not spent on an enrollment that could not be recorded;
3. takes the agent's registration (the SSH global request :data:`dxflow.enroll.REGISTER`),
   which must name the same agent and user (``store.set_registration``);
4. grants one remote port forward, to the registered port on 127.0.0.1, and from then on opens
   ``forwarded-tcpip`` channels on it (:meth:`Gateway.channel`): the agent connects them to its own
   port, nothing else. Sessions, commands, ``direct-tcpip`` and any other forward are refused.

Every connection gets :data:`LOGIN_TIMEOUT` seconds to get that far and :data:`MAX_AUTH_FAILURES`
failed logins, and at most :data:`MAX_LOGINS` connections log in at once; a dropped connection
is told to the fleet (``agent_disconnected``), a new one (``agent_connected``).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import paramiko
from paramiko.common import AUTH_FAILED, AUTH_SUCCESSFUL, OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

from dxflow import enroll
from dxflow.errors import AgentUnreachable, AuthError, DxflowError
from dxflow.site.config import SiteServiceConfig, host_port
from dxflow.site.enrollment import Enroller

log = logging.getLogger(__name__)

#: Seconds a connection has to log in, register and ask for its forward; then it is closed.
LOGIN_TIMEOUT = 30.0
#: Failed logins a connection is allowed (an agent needs at most one: its key unknown here yet).
MAX_AUTH_FAILURES = 3
#: Connections logging in at once; more wait in the listen backlog.
MAX_LOGINS = 64
#: Seconds between keepalives to an agent (a dead connection is found within two or three).
KEEPALIVE = 10
#: Seconds between looks for connections that dropped.
REAP_EVERY = 1.0


@dataclass
class Connection:
    """An agent's dial-out connection to this replica, once its forward is granted."""

    name: str
    transport: paramiko.Transport
    port: int
    peer: str
    since: float


class AgentLogin(paramiko.ServerInterface):
    """The gateway's side of one connection: who may log in, and the one thing it may then ask for."""

    def __init__(self, gateway: "Gateway", transport: paramiko.Transport, peer: str) -> None:
        self.gateway = gateway
        self.transport = transport
        self.peer = peer
        self.failures = 0
        self.registration: dict | None = None
        self.forwarded = False
        self.settled = threading.Event()  # forward granted, or too many failures: the handler may go

    # -- logging in ---------------------------------------------------------------------------
    def get_allowed_auths(self, username: str) -> str:
        return "publickey,password"

    def check_auth_none(self, username: str) -> int:
        return AUTH_FAILED

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        """A key the store holds for this agent (paramiko checks the signature before it lets anyone in)."""
        if self._spent():
            return AUTH_FAILED
        try:
            agent = self.gateway.store.agent(username)
        except DxflowError as e:  # not "unknown key": no enrollment on this connection, the agent dials again
            return self._give_up(username, f"cannot look up its key in the store ({e}): connection closed, no "
                                           "enrollment tried; the agent dials again")
        if agent is not None and agent.gateway_key and agent.gateway_key == enroll.fingerprint(key.asbytes()):
            return AUTH_SUCCESSFUL
        return self._failed(username, "publickey", "key not enrolled for this agent")

    def check_auth_password(self, username: str, password: str) -> int:
        """Enrollment: the prolog's root credential and this session signed by the key it names."""
        if self._spent():
            return AUTH_FAILED
        try:
            self.gateway.enroller.admit(username, password, self.transport.session_id or b"", self.peer)
        except AuthError as e:
            return self._failed(username, "enrollment", str(e))
        except DxflowError as e:  # the store or the scheduler failed us: say so, let nobody in
            return self._failed(username, "enrollment", f"{type(e).__name__}: {e}")
        return AUTH_SUCCESSFUL

    def _spent(self) -> bool:
        return self.failures >= MAX_AUTH_FAILURES

    def _give_up(self, username: str, why: str) -> int:
        """Refuse this login and every other on the connection (the handler closes it)."""
        self.failures = MAX_AUTH_FAILURES - 1
        return self._failed(username, "publickey", why)

    def _failed(self, username: str, how: str, why: str) -> int:
        self.failures += 1
        log.warning("gateway: %s from %s refused (%s): %s", username[:200], self.peer, how, why)
        if self._spent():
            self.settled.set()  # the handler closes the connection
        return AUTH_FAILED

    # -- once in: the registration, then the one forward ---------------------------------------
    def check_global_request(self, kind: str, msg: paramiko.Message) -> bool:
        name = self.transport.get_username()
        if kind != enroll.REGISTER or not self.transport.is_authenticated() or not name or self.forwarded:
            return False
        try:
            reg = json.loads(msg.get_text())
            self.gateway.store.set_registration(name, reg)
        except (ValueError, TypeError, DxflowError) as e:
            log.warning("gateway: %s from %s: registration refused: %s", name, self.peer, e)
            return False
        self.registration = reg
        return True

    def check_port_forward_request(self, address: str, port: int) -> int | bool:
        name = self.transport.get_username()
        reg = self.registration
        if (not self.transport.is_authenticated() or not name or reg is None or self.forwarded
                or address != "127.0.0.1" or port != reg.get("port") or not 0 < port < 65536):
            log.warning("gateway: %s from %s: forward of %s:%s refused", name, self.peer, address, port)
            return False
        self.forwarded = True
        self.gateway.connected_now(Connection(name, self.transport, port, self.peer, time.time()))
        self.settled.set()
        return port

    def cancel_port_forward_request(self, address: str, port: int) -> None:
        self.transport.close()  # an agent that gives up its forward is of no use: it dials again

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED  # no session, no exec, no shell

    def check_channel_direct_tcpip_request(self, chanid: int, origin: tuple, destination: tuple) -> int:
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED


class Gateway:
    """Agents' dial-out connections to this replica: the listener, the logins, the channels to agents."""

    def __init__(self, config: SiteServiceConfig, store: Any, fleet: Any,
                 listen: tuple[str, int] | None = None) -> None:
        self.config = config
        self.store = store
        self.fleet = fleet
        self.enroller = Enroller(store, fleet)
        self.listen = listen or host_port(config.gateway_listen, "gateway_listen")
        self.host_key = paramiko.Ed25519Key.from_private_key_file(str(config.gateway_host_key))
        self._conns: dict[str, Connection] = {}
        self._lock = threading.Lock()
        self._logins = threading.BoundedSemaphore(MAX_LOGINS)
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self.address: tuple[str, int] = self.listen

    # -- life ----------------------------------------------------------------------------------
    def start(self) -> None:
        host, port = self.listen
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
        self._sock = sock
        self.address = sock.getsockname()[:2]
        threading.Thread(target=self._accept, name="dxflow-gateway", daemon=True).start()
        threading.Thread(target=self._reap, name="dxflow-gateway-reaper", daemon=True).start()
        log.info("gateway listening on %s:%d, host key %s", self.address[0], self.address[1],
                 enroll.fingerprint(self.host_key.asbytes()))

    def stop(self) -> None:
        self._stop.set()
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for c in conns:
            c.transport.close()

    # -- what the fleet asks -------------------------------------------------------------------
    def connected(self, name: str) -> bool:
        with self._lock:
            c = self._conns.get(name)
        return bool(c and c.transport.is_active())

    def channel(self, name: str, timeout: float = 30.0) -> paramiko.Channel:
        """A new channel to the agent's own port, through its connection to this replica."""
        with self._lock:
            c = self._conns.get(name)
        if c is None or not c.transport.is_active():
            raise AgentUnreachable(f"agent {name} is not connected to replica {self.config.replica_name} "
                                   "(its job ended, or it is dialling again)")
        try:
            return c.transport.open_channel("forwarded-tcpip", dest_addr=("127.0.0.1", c.port),
                                            src_addr=("127.0.0.1", 0), timeout=timeout)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise AgentUnreachable(f"agent {name}: no channel through its connection: {e}") from e

    def status(self) -> dict:
        with self._lock:
            conns = list(self._conns.values())
        return {"listen": f"{self.address[0]}:{self.address[1]}", "host_key": enroll.fingerprint(self.host_key.asbytes()),
                "connected": len(conns), "agents": sorted(c.name for c in conns)}

    # -- connections -----------------------------------------------------------------------------
    def connected_now(self, conn: Connection) -> None:
        """The agent's forward is granted: it replaces an older connection of the same agent here."""
        with self._lock:
            old = self._conns.get(conn.name)
            self._conns[conn.name] = conn
        if old is not None and old.transport is not conn.transport:
            old.transport.close()
        log.info("gateway: %s connected from %s, its port %d", conn.name, conn.peer, conn.port)
        self.fleet.agent_connected(conn.name)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                sock, addr = self._sock.accept()
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(0.1)  # out of descriptors for a moment: the backlog holds the rest
                continue
            self._logins.acquire()
            threading.Thread(target=self._login, args=(sock, f"{addr[0]}:{addr[1]}"), name="dxflow-gateway-login",
                             daemon=True).start()

    def _login(self, sock: socket.socket, peer: str) -> None:
        t: paramiko.Transport | None = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = paramiko.Transport(sock)
            t.banner_timeout = t.handshake_timeout = t.auth_timeout = LOGIN_TIMEOUT
            t.add_server_key(self.host_key)
            server = AgentLogin(self, t, peer)
            t.start_server(server=server)
            if not server.settled.wait(LOGIN_TIMEOUT) or not server.forwarded:
                log.info("gateway: connection from %s closed: no agent logged in and asked for its forward "
                         "within %.0f s (or too many failed logins)", peer, LOGIN_TIMEOUT)
                t.close()
                return
            t.set_keepalive(KEEPALIVE)
        except (paramiko.SSHException, OSError, EOFError) as e:
            log.info("gateway: connection from %s failed: %s", peer, e)
            if t is not None:
                t.close()
            else:
                sock.close()
        finally:
            self._logins.release()

    def _reap(self) -> None:
        while not self._stop.wait(REAP_EVERY):
            with self._lock:
                dead = [c for c in self._conns.values() if not c.transport.is_active()]
                for c in dead:
                    if self._conns.get(c.name) is c:
                        del self._conns[c.name]
            for c in dead:
                try:
                    self.fleet.agent_disconnected(c.name, f"connection from {c.peer} closed")
                except Exception as e:  # noqa: BLE001 - one bad report must not stop the reaper
                    log.error("gateway: telling the fleet %s left: %s", c.name, e)

