"""One paramiko transport per node, reused by every request to that node's agents.

Connections follow the user's ``~/.ssh/config`` (HostName, User, Port,
IdentityFile, ProxyJump), use the user's keys and ssh-agent, check host keys
against the system and user ``known_hosts`` (unknown hosts are refused), send
keepalives, and reconnect with backoff after a failure.

Every new transport to a node gets the next *generation* number: what was proven about an
agent on one transport (its identity, that its port is still the user's) holds for that
transport only, so a channel can be asked for "on generation G, or not at all". Files of the
node (``/proc/net/tcp``, read before talking to an unproven port) come through one SFTP session
kept per transport.
"""

from __future__ import annotations

import getpass
import http.client
import io
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

RECV_ALL = 1 << 24      # more than any SSH channel window: one recv takes all that has arrived
READ_CHUNK = 256 * 1024
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
        self.generation = 0   # how many transports this node has had; the current one's number
        self.failures = 0
        self.retry_at = 0.0
        self.error = ""
        self.sftp_lock = threading.Lock()
        self.sftp: paramiko.SFTPClient | None = None
        self.sftp_generation = 0


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
        return self._transport(address)[0]

    def connect(self, address: str) -> int:
        """Connect to the node if needed; the generation of its transport (0 for this very host)."""
        if address in self.local_names:
            return 0
        return self._transport(address)[1]

    def generation(self, address: str) -> int | None:
        """The generation of the node's live transport (0 for this host); None when none is up. Never connects."""
        if address in self.local_names:
            return 0
        with self._lock:
            node = self._nodes.get(address)
        if node is None:
            return None
        # without node.lock, which a connection attempt holds for seconds; a new transport's number is set
        # before the transport, so a read mid-update sees the old (inactive) transport: None
        gen = node.generation
        t = node.transport
        if t is not None and t.is_active() and node.generation == gen:
            return gen
        return None

    def _transport(self, address: str, generation: int | None = None) -> tuple[paramiko.Transport, int]:
        node = self._node(address)
        with node.lock:
            t = node.transport
            if t is not None and t.is_active():
                if generation is not None and node.generation != generation:
                    raise AgentUnreachable(f"{address}: the tunnel was opened again since the agent was checked")
                return t, node.generation
            if generation is not None:  # the transport the caller relies on is gone: no new one for it
                raise AgentUnreachable(f"{address}: the tunnel closed since the agent was checked")
            now = time.monotonic()
            if now < node.retry_at:
                raise AgentUnreachable(f"{address}: {node.error} (next try in {node.retry_at - now:.0f} s)")
            try:
                transport = self._connect(address)
            except Exception as e:  # noqa: BLE001 - any failure means "unreachable, retry later"
                node.failures += 1
                node.error = f"cannot connect by SSH: {e}"
                node.retry_at = now + min(MAX_BACKOFF, 0.5 * 2 ** node.failures)
                raise AgentUnreachable(f"{address}: {node.error}") from e
            node.generation += 1  # before the transport is set: see generation()
            node.transport = transport
            node.failures = 0
            node.retry_at = 0.0
            return transport, node.generation

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

    def channel(self, address: str, port: int, timeout: float = CONNECT_TIMEOUT,
                generation: int | None = None, host: str = "127.0.0.1") -> paramiko.Channel | socket.socket:
        """A byte stream to HOST:PORT as seen from the node (its loopback unless told); with ``generation``,
        only through that transport."""
        if address in self.local_names:  # on this very host: no tunnel needed
            try:
                return socket.create_connection((host, port), timeout=timeout)
            except OSError as e:
                raise AgentUnreachable(f"cannot reach {host}:{port}: {e}") from e
        t = self._transport(address, generation)[0]
        try:
            return t.open_channel("direct-tcpip", (host, port), ("127.0.0.1", 0), timeout=timeout)
        except (paramiko.SSHException, OSError) as e:
            raise AgentUnreachable(f"{address}: cannot reach {host}:{port} through the tunnel: {e}") from e

    def read_file(self, address: str, path: str, generation: int | None = None) -> bytes:
        """A file of the node (this host's own for a local name), read through the transport's SFTP session.

        FileNotFoundError if it does not exist; AgentUnreachable if the node cannot be asked.
        """
        if address in self.local_names:
            with open(path, "rb") as f:
                return f.read()
        t, gen = self._transport(address, generation)
        node = self._node(address)
        with node.sftp_lock:
            try:
                if node.sftp is None or node.sftp_generation != gen:
                    node.sftp = paramiko.SFTPClient.from_transport(t)
                    node.sftp_generation = gen
                    if node.sftp is None:
                        raise paramiko.SSHException("no SFTP session")
                    node.sftp.get_channel().settimeout(CONNECT_TIMEOUT)  # a hung node must not hold the check
                with node.sftp.open(path, "rb") as f:
                    return f.read()  # to the end: /proc files say their size is 0
            except FileNotFoundError:
                raise
            except (paramiko.SSHException, OSError, EOFError) as e:
                node.sftp = None  # a broken session is opened again next time
                raise AgentUnreachable(f"{address}: cannot read {path} by SFTP: {e}") from e

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


class ChannelReader(io.RawIOBase):
    """Raw reads from a paramiko channel: whatever has arrived, taken in one piece.

    paramiko keeps a channel's received bytes in an array and trims its front on every
    partial read, which costs a copy of all the rest (up to the SSH window) per read; so
    each ``recv`` here takes everything there is, and hands it out from a memoryview.
    """

    def __init__(self, chan) -> None:
        self._chan = chan
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        if not self._pending:
            self._pending = memoryview(self._chan.recv(RECV_ALL))
        n = min(len(buf), len(self._pending))
        buf[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


class ChannelResponse(http.client.HTTPResponse):
    """An HTTP response whose ``read1`` works on a tunnel channel too.

    http.client reads through ``sock.makefile()``; paramiko's ChannelFile has no
    ``read1`` and its ``read(n)`` waits for all n bytes, which would hold back a
    live stream (SSE, logs) and break the relay's ``read1``.
    """

    def __init__(self, sock, *args, **kwargs) -> None:
        super().__init__(sock, *args, **kwargs)
        if not hasattr(self.fp, "read1"):
            self.fp = io.BufferedReader(ChannelReader(sock), READ_CHUNK)


class TunnelHTTPConnection(http.client.HTTPConnection):
    """HTTP over a direct-tcpip channel to an agent (its answers readable piecewise: ``read1``)."""

    response_class = ChannelResponse

    def __init__(self, pool: TunnelPool, address: str, port: int, timeout: float = 60.0,
                 generation: int | None = None) -> None:
        super().__init__("127.0.0.1", port, timeout=timeout)
        self._pool = pool
        self._address = address
        self.generation = generation

    def connect(self) -> None:
        chan = self._pool.channel(self._address, self.port, generation=self.generation)
        chan.settimeout(self.timeout)
        self.sock = chan
