"""Another node's agent of the same job, reached from this agent the way the master reaches it: a broadcast's relay.

A broadcast (:mod:`dxflow.agent.broadcast`) is passed on from node to node instead of being sent N
times by the login node. This agent runs as the user, on a node of the user's job, so it reaches the
next node as the user does: the user's own OpenSSH client, one ControlMaster per node
(:class:`dxflow.ssh.openssh.OpenSSHPool`: every ssh_config setting, host keys checked against
known_hosts, ``BatchMode``), and a stdio forwarding through it to the peer agent's port on that node's
127.0.0.1 (what ``ssh -W`` does). No port is opened anywhere for it. OpenSSH rather than paramiko
because the bytes of a broadcast cross every hop: ``ssh`` encrypts them in a process of its own, in C,
while this agent's Python only moves them between sockets (measured: bench/multinode.py, README).

Before any token goes to a peer it is proven as the master proves an agent (:mod:`dxflow.master.fleet`):

1. its port is held by the user alone (the node's ``/proc/net/tcp`` and ``tcp6``, read by ``cat``
   through the same ControlMaster): an agent that stopped may have left its port to another user;
2. it signs a fresh challenge with the key the master handed down for it (the key it registered).

The token comes from the master too, minted for that one agent (its audience) and short-lived: this
agent never holds the user's key. A peer that cannot be reached this way (no key without passphrase,
nodes that do not see each other, a node reached only through a proxy) is :class:`PeerUnreachable`:
the login node then sends to that node itself.

The ControlMasters' cipher: the user's and the site's ``Ciphers`` setting is left as it is. Where neither
sets one and the CPU has AES instructions, AES-GCM is put first in OpenSSH's own default list (which
starts with chacha20-poly1305, the better choice only without them): :func:`preferred_ciphers`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import secrets
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from dxflow.edge.channelhttp import TunnelHTTPConnection
from dxflow.edge.tcptable import REACHES_LOOPBACK4, parse_listeners
from dxflow.errors import AccessDenied, AgentUnreachable, ConfigError
from dxflow.signatures import check_challenge
from dxflow.ssh import control
from dxflow.ssh import options as ssh_options
from dxflow.ssh.controlmaster import COMMAND_TIMEOUT
from dxflow.ssh.openssh import OpenSSHPool

log = logging.getLogger(__name__)

#: seconds a write to a peer may stay stuck (its window full) before it counts as lost: a node cut off
#: mid-broadcast holds its parent (and so the tree above) this long at most
TIMEOUT = 30.0
#: seconds a ControlMaster to another node stays up after its last channel (``ControlPersist``): the next
#: file of a ``cp -r`` reuses it; an idle agent holds none for long
KEEP = 60
#: seconds what ``ssh -G`` says about a node is reused (``cp -r``: one request per file, each proving its peers)
SETTINGS_FRESH = 60.0
#: OpenSSH's AEAD ciphers on AES instructions: faster than chacha20-poly1305 there, for ``ssh`` and ``sshd``
AES_GCM = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
#: both tables of listening sockets in one command (no IPv6 on the node: the first alone)
SOCKET_TABLES = "cat /proc/net/tcp; cat /proc/net/tcp6 2>/dev/null; true"


class PeerUnreachable(AgentUnreachable):
    """This node cannot reach the peer's node as the user (no SSH between them): the login node sends instead."""


def cpu_has_aes(cpuinfo: str) -> bool:
    """Whether ``/proc/cpuinfo`` lists AES instructions (x86 ``flags``, Arm ``Features``: the word ``aes``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features") and "aes" in value.split():
            return True
    return False


def preferred_ciphers(resolved: str, default: str, aes: bool) -> str:
    """The ``Ciphers`` value a ControlMaster gets ("" for none: ssh's own choice stands).

    ``resolved``: the node's ``ciphers`` as ``ssh -G`` resolves it with the user's and the site's config;
    ``default``: the same without any config (``ssh -F /dev/null -G``), OpenSSH's built-in list. When they
    differ, someone chose: that choice stands. Else, on a CPU with AES instructions, the same list with
    AES-GCM first (written out, not ``^``: any OpenSSH version takes it).
    """
    if not aes or not resolved or resolved != default:
        return ""
    names = resolved.split(",")
    first = [c for c in AES_GCM if c in names]
    if not first or names[:len(first)] == first:
        return ""
    return ",".join([*first, *(c for c in names if c not in first)])


class PeerPool(OpenSSHPool):
    """This agent's ControlMasters to the other nodes of its job.

    Each on a socket of this job's own (:func:`dxflow.ssh.control.control_path` with the job): never one
    another job's agent on this node started, which lives in that job's cgroup and ends with it."""

    def __init__(self, job: str | None) -> None:
        super().__init__()
        self.job = job
        self._settings: dict[str, tuple[ssh_options.HostOptions, float]] = {}
        self._settings_lock = threading.Lock()
        self._aes: bool | None = None
        self._default_ciphers: str | None = None
        sweep(control.control_dir(self._layout))

    def settings(self, address: str) -> ssh_options.HostOptions:
        """``ssh -G ADDRESS``, kept SETTINGS_FRESH seconds; PeerUnreachable if ssh cannot say."""
        now = time.monotonic()
        with self._settings_lock:
            kept = self._settings.get(address)
        if kept is not None and now - kept[1] < SETTINGS_FRESH:
            return kept[0]
        try:
            opts = ssh_options.resolve(address)
        except ConfigError as e:
            raise PeerUnreachable(f"{address}: {e}") from e
        with self._settings_lock:
            self._settings[address] = (opts, now)
        return opts

    def control_path(self, address: str, job: str | None = None) -> Path:
        return super().control_path(address, job or self.job)

    def master_options(self, address: str) -> tuple[str, ...]:
        extra = ["-o", f"ControlPersist={KEEP}"]
        try:
            resolved = self.settings(address).get("ciphers")
            if self._default_ciphers is None:  # OpenSSH's built-in list: the same for every node
                self._default_ciphers = ssh_options.resolve(address, config_file=os.devnull).get("ciphers")
            default = self._default_ciphers
        except (ConfigError, AgentUnreachable) as e:
            log.info("%s: OpenSSH's ciphers left as they are (%s)", address, e)
            return tuple(extra)
        if self._aes is None:
            try:
                with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                    self._aes = cpu_has_aes(f.read())
            except OSError:
                self._aes = False
        ciphers = preferred_ciphers(resolved, default, self._aes)
        if ciphers:
            extra += ["-o", f"Ciphers={ciphers}"]
        return tuple(extra)

    def socket_tables(self, address: str, generation: int) -> list[str]:
        """The node's ``/proc/net/tcp`` and ``tcp6``, by one ``cat`` through that ControlMaster."""
        m = self._on(address, generation)
        argv = control.command_argv(address, m.ctl, SOCKET_TABLES, self.config)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=COMMAND_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise PeerUnreachable(f"{address}: its table of sockets cannot be read ({e})") from e
        if proc.returncode != 0 or not proc.stdout:
            err = proc.stderr.decode(errors="replace").strip() or f"ssh exited {proc.returncode}"
            raise PeerUnreachable(f"{address}: its table of sockets cannot be read ({err})")
        return [proc.stdout.decode("ascii", "replace")]


#: how dxflow names a ControlMaster socket (:func:`dxflow.ssh.control.control_path`); ssh's own temporary
#: names while it makes one hold a dot, and are never touched
SOCKET_NAME = re.compile(r"[0-9a-f]{16}")


def sweep(folder: Path) -> int:
    """Remove the sockets in ``folder`` that nothing listens on any more; how many.

    A job's ControlMasters end with the job (Slurm kills its cgroup, often too hard for ssh to remove its
    socket), and each job's have names of their own: without this, a node's folder would keep one dead
    socket per job and next node for good. Only this node's dxflow uses the folder (one per host)."""
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return 0
    for entry in entries:
        try:
            if not SOCKET_NAME.fullmatch(entry.name) or not stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                continue
        except OSError:  # gone meanwhile
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(entry.path)
        except ConnectionRefusedError:  # its ssh is gone: the file alone is left
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
        except OSError:
            pass  # busy, or not ours to judge: left alone
        finally:
            probe.close()
    if removed:
        log.info("removed %d dead ControlMaster socket(s) from %s", removed, folder)
    return removed


_POOL: PeerPool | None = None
_POOL_LOCK = threading.Lock()


def pool(job: str | None) -> PeerPool:
    """The agent's one pool (made on the first broadcast that passes the file on; an agent serves one job)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = PeerPool(job)
        return _POOL


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

    def __init__(self, spec: dict[str, Any], job: str | None = None) -> None:
        self.node: str = spec["node"]
        self.address: str = spec["address"]
        self.port: int = spec["port"]
        self.public_key: str = spec["public_key"]
        self.token: str = spec["token"]
        self.job = job
        self.generation: int | None = None
        self.conn: TunnelHTTPConnection | None = None

    # -- reaching it -----------------------------------------------------------------------------
    def open(self) -> None:
        """Log in to the peer's node (or reuse the ControlMaster there) and prove its agent; PeerUnreachable
        or AccessDenied if not."""
        peers = pool(self.job)
        opts = peers.settings(self.address)
        if opts.jumps or opts.get("proxycommand", "none").lower() != "none":
            # nodes that see each other only through another host (the login node, mostly): it sends instead
            raise PeerUnreachable(f"{self.address}: reached through a proxy (ProxyJump or ProxyCommand), "
                                  "not straight from another node")
        try:
            self.generation = peers.connect(self.address, self.job)
        except AgentUnreachable as e:
            raise PeerUnreachable(f"{self.address}: no SSH login to it from this node ({e})") from e
        why = port_refusal(peers.socket_tables(self.address, self.generation), self.port, os.getuid(), self.node)
        if why:
            raise AccessDenied(why)
        self._check_identity()

    def _check_identity(self) -> None:
        challenge = secrets.token_urlsafe(24)
        conn = self.connection(30.0)
        try:
            conn.request("GET", f"/api/health?challenge={challenge}", headers=self._auth())
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException, AgentUnreachable) as e:
            conn.close()
            raise PeerUnreachable(f"{self.node}: its agent did not answer ({e})") from e
        try:
            signature = json.loads(raw).get("signature", "") if resp.status == 200 else ""
        except (ValueError, AttributeError):
            signature = ""
        if not check_challenge(self.public_key, challenge, signature):
            conn.close()
            raise AccessDenied(f"{self.node}: port {self.port} did not prove to be the job's agent "
                               f"(HTTP {resp.status}): nothing was sent to it")
        # kept open: the broadcast goes over the very channel that proved the agent (one `ssh -W` less per hop)
        conn.timeout = TIMEOUT
        if conn.sock is not None:
            conn.sock.settimeout(TIMEOUT)
        self.conn = conn

    def connection(self, timeout: float = TIMEOUT) -> TunnelHTTPConnection:
        """HTTP to the peer's agent through the ControlMaster :meth:`open` proved (never another one)."""
        return TunnelHTTPConnection(pool(self.job), self.address, self.port, timeout=timeout, generation=self.generation)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    # -- one broadcast request -----------------------------------------------------------------------
    def start(self, head: bytes, size: int) -> None:
        """Begin the PUT of a broadcast: its plan line ``head``, then ``size`` bytes by :meth:`send`."""
        self.conn = conn = self.conn or self.connection()
        conn.putrequest("PUT", "/api/broadcast", skip_accept_encoding=True)
        for k, v in {**self._auth(), "Content-Type": "application/octet-stream",
                     "Content-Length": str(len(head) + size)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        conn.send(head)

    def send(self, chunk: bytes | memoryview) -> None:
        """The next bytes of the body, whole (``sendall`` on the channel's socket: the GIL is free meanwhile)."""
        assert self.conn is not None and self.conn.sock is not None
        self.conn.sock.sendall(chunk)

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

    def close(self) -> None:
        """Close the request's channel; the ControlMaster stays for the next request (``ControlPersist``),
        which proves the peer again."""
        if self.conn is not None:
            self.conn.close()
