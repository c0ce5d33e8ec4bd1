"""One paramiko transport per node, reused by every request to that node's agents.

Connections follow the user's ``~/.ssh/config`` (HostName, User, Port,
IdentityFile, ProxyJump), use the user's keys and ssh-agent, check host keys
against the system and user ``known_hosts`` (unknown hosts are refused), send
keepalives, and reconnect with backoff after a failure.
"""

from __future__ import annotations

import getpass
import http.client
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paramiko

from dxflow.errors import AgentUnreachable

log = logging.getLogger(__name__)

KEEPALIVE = 15
CONNECT_TIMEOUT = 10.0
MAX_BACKOFF = 30.0


class QuickAckSocket:
    """The SSH connection's socket, acknowledging every segment at once.

    sshd does not set TCP_NODELAY on a non-interactive session: an answer the agent writes
    as headers then body leaves sshd as two segments, the second held until the first is
    acknowledged (Nagle), while this side delays its ACK (~40 ms). Both ends of that are
    fixed here: TCP_NODELAY for what we send, TCP_QUICKACK (which the kernel resets, so it is
    set again before each read) for what we receive.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def recv(self, n: int) -> bytes:
        try:
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        except OSError:
            pass
        return self._sock.recv(n)

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class GCMFirstTransport(paramiko.Transport):
    """AES-GCM first: one C call per packet, where AES-CTR adds an HMAC that paramiko checks
    in Python. Downloads through the tunnel measured ~50 % of `ssh cat` with CTR, ~100 % with GCM."""

    _preferred_ciphers = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com") + tuple(
        c for c in paramiko.Transport._preferred_ciphers if "gcm" not in c)


@dataclass
class SSHTarget:
    hostname: str
    port: int
    user: str
    key_files: list[str]
    proxy_jump: str = ""
    known_hosts: tuple[str, ...] = ()


def ssh_config(path: Path | None = None) -> paramiko.SSHConfig:
    path = path or Path.home() / ".ssh" / "config"
    try:
        return paramiko.SSHConfig.from_path(str(path))
    except FileNotFoundError:
        return paramiko.SSHConfig()


def resolve(host: str, config: paramiko.SSHConfig) -> SSHTarget:
    opts = config.lookup(host)
    keys = [os.path.expanduser(k) for k in opts.get("identityfile", [])]
    known = [os.path.expanduser(f) for name in ("globalknownhostsfile", "userknownhostsfile")
             for f in (opts.get(name) or "").split()]
    if not known:  # OpenSSH's defaults
        known = ["/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2",
                 os.path.expanduser("~/.ssh/known_hosts"), os.path.expanduser("~/.ssh/known_hosts2")]
    return SSHTarget(hostname=opts.get("hostname", host), port=int(opts.get("port", 22)),
                     user=opts.get("user", getpass.getuser()), key_files=keys,
                     proxy_jump=opts.get("proxyjump", "") if opts.get("proxyjump", "none") != "none" else "",
                     known_hosts=tuple(known))


class _Node:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transport: paramiko.Transport | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.error = ""


class TunnelPool:
    """Transports keyed by node address; ``channel(node, port)`` opens a direct-tcpip channel."""

    def __init__(self, config: paramiko.SSHConfig | None = None) -> None:
        self.config = config or ssh_config()
        self.local_names = {"localhost", socket.gethostname(), socket.gethostname().split(".")[0]}
        self._nodes: dict[str, _Node] = {}
        self._lock = threading.Lock()

    def _node(self, address: str) -> _Node:
        with self._lock:
            return self._nodes.setdefault(address, _Node())

    def transport(self, address: str) -> paramiko.Transport:
        node = self._node(address)
        with node.lock:
            t = node.transport
            if t is not None and t.is_active():
                return t
            now = time.monotonic()
            if now < node.retry_at:
                raise AgentUnreachable(f"{address}: {node.error} (next try in {node.retry_at - now:.0f} s)")
            try:
                node.transport = self._connect(address)
            except Exception as e:  # noqa: BLE001 - any failure means "unreachable, retry later"
                node.failures += 1
                node.error = f"cannot connect by SSH: {e}"
                node.retry_at = now + min(MAX_BACKOFF, 0.5 * 2 ** node.failures)
                raise AgentUnreachable(f"{address}: {node.error}") from e
            node.failures = 0
            node.retry_at = 0.0
            return node.transport

    def _connect(self, address: str, depth: int = 0) -> paramiko.Transport:
        target = resolve(address, self.config)
        if target.proxy_jump and depth < 3:
            jump = self.transport(target.proxy_jump.split(",")[0])
            sock = jump.open_channel("direct-tcpip", (target.hostname, target.port), ("127.0.0.1", 0),
                                     timeout=CONNECT_TIMEOUT)
        else:
            sock = QuickAckSocket(socket.create_connection((target.hostname, target.port), timeout=CONNECT_TIMEOUT))
        client = paramiko.SSHClient()
        for known in target.known_hosts:
            if os.path.exists(known):
                client.load_host_keys(known)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        client.connect(target.hostname, port=target.port, username=target.user, sock=sock,
                       key_filename=target.key_files or None, timeout=CONNECT_TIMEOUT,
                       banner_timeout=CONNECT_TIMEOUT, auth_timeout=CONNECT_TIMEOUT,
                       transport_factory=GCMFirstTransport)
        t = client.get_transport()
        assert t is not None
        t.set_keepalive(KEEPALIVE)
        t._dxflow_client = client  # keep the wrapper (and its socket) alive with the transport
        log.info("SSH transport to %s (%s@%s:%d) open", address, target.user, target.hostname, target.port)
        return t

    def channel(self, address: str, port: int, timeout: float = CONNECT_TIMEOUT) -> paramiko.Channel | socket.socket:
        if address in self.local_names:  # an agent on this very host: no tunnel needed
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=timeout)
            except OSError as e:
                raise AgentUnreachable(f"cannot reach 127.0.0.1:{port}: {e}") from e
        t = self.transport(address)
        try:
            return t.open_channel("direct-tcpip", ("127.0.0.1", port), ("127.0.0.1", 0), timeout=timeout)
        except (paramiko.SSHException, OSError) as e:
            raise AgentUnreachable(f"{address}: cannot reach 127.0.0.1:{port} through the tunnel: {e}") from e

    def status(self) -> dict[str, dict]:
        with self._lock:
            nodes = dict(self._nodes)
        return {a: {"connected": bool(n.transport and n.transport.is_active()), "failures": n.failures,
                    "error": n.error} for a, n in nodes.items()}

    def close(self) -> None:
        with self._lock:
            nodes = list(self._nodes.values())
        for n in nodes:
            if n.transport:
                n.transport.close()


class TunnelHTTPConnection(http.client.HTTPConnection):
    """HTTP over a direct-tcpip channel to an agent."""

    def __init__(self, pool: TunnelPool, address: str, port: int, timeout: float = 60.0) -> None:
        super().__init__("127.0.0.1", port, timeout=timeout)
        self._pool = pool
        self._address = address

    def connect(self) -> None:
        chan = self._pool.channel(self._address, self.port)
        chan.settimeout(self.timeout)
        self.sock = chan
