"""One paramiko transport per node (per job where ``pam_slurm_adopt`` adopts logins: :mod:`dxflow.ssh.adoption`),
reused by every request to that node's agents.

Connections follow the user's SSH settings as OpenSSH resolves them (``ssh -G``,
:mod:`dxflow.ssh.options`: ``/etc/ssh/ssh_config``, ``Include``, ``Match``, every ``ProxyJump``
hop), use the user's keys and ssh-agent, check host keys against the system and user
``known_hosts`` (unknown hosts are refused; ``@revoked`` keys too), send keepalives (the login:
:mod:`dxflow.ssh.paramiko_login`), and reconnect with backoff after a failure. A node paramiko cannot reach as the user's OpenSSH would (host
certificates, hostbased, GSSAPI, MFA, a setting it cannot honour) goes through the user's OpenSSH
client instead (:mod:`dxflow.ssh.openssh`; ``ssh_transport``, :mod:`dxflow.ssh.transport`).

Every new transport to a node gets the next *generation* number: what was proven about an
agent on one transport (its identity, that its port is still the user's) holds for that
transport only, so a channel can be asked for "on generation G, or not at all". Files of the
node (``/proc/net/tcp``, read before talking to an unproven port) come through one SFTP session
kept per transport. HTTP over the channels: :mod:`dxflow.edge.channelhttp`.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from typing import NoReturn

import paramiko

from dxflow.errors import AgentUnreachable, ConfigError
from dxflow.ssh import options as ssh_options
from dxflow.ssh import paramiko_login
from dxflow.ssh.paramiko_login import CONNECT_TIMEOUT
from dxflow.ssh.adoption import Adoption, EndedJobs, Slot, refused_pause
from dxflow.ssh.openssh import OpenSSHPool
from dxflow.ssh.transport import UseOpenSSH, transport_setting

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0
MAX_HOPS = 8
#: how long an OpenSSH ControlMaster whose channels ended may take to be seen gone (its process exits just after)
END_SEEN_WITHIN = 2.0


def _setting() -> str:
    """``ssh_transport`` (user's, else site's); "auto" when a file is broken (the master still serves, and says why)."""
    try:
        return transport_setting()
    except ConfigError as e:
        log.error("%s: ssh_transport \"auto\" until it is fixed", e)
        return "auto"


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


class TunnelPool(EndedJobs):
    """Transports keyed by node address (and job, under pam_slurm_adopt); ``channel(node, port)`` opens a
    direct-tcpip channel."""

    def __init__(self, config: str | None = None, transport: str | None = None) -> None:
        #: an ssh_config file used instead of the user's and the system's (``ssh -F``); None: theirs
        self.config = config
        self.setting = transport or _setting()
        self.numbers = itertools.count(1)  # generations, never reused by either transport
        self.adoption = Adoption()  # where pam_slurm_adopt put each connection: then one per job, not per node
        self.openssh = OpenSSHPool(numbers=self.numbers, config=config, adoption=self.adoption)
        self._via_openssh: dict[str, str] = {}  # node -> why OpenSSH reaches it
        self.local_names = {"localhost", socket.gethostname(), socket.gethostname().split(".")[0]}
        self._nodes: dict[Slot, _Node] = {}     # (address, job) where adoption is seen, else (address, None)
        self._gens: dict[int, Slot] = {}        # generation -> the slot its connection is in
        self._connecting: dict[str, threading.Lock] = {}
        self._ended: dict[Slot, float] = {}      # per-job slots whose connection ended: the job is ending, likely
        self._refusals: dict[Slot, int] = {}     # logins closed at once since the slot's last success
        self._lock = threading.Lock()

    def _node(self, slot: Slot) -> _Node:
        with self._lock:
            return self._nodes.setdefault(slot, _Node())

    def transport(self, address: str) -> paramiko.Transport:
        return self._transport((address, None))[0]

    def connect(self, address: str, job: str | None = None) -> int:
        """Connect to the node if needed; the generation of the connection JOB's agents use there (0 for this
        very host). Where pam_slurm_adopt is seen, connections are per job (:mod:`dxflow.ssh.adoption`)."""
        if address in self.local_names:
            return 0
        if not self.uses_openssh(address):
            with self._connecting_lock(address):  # one login to a node at a time: where it lands decides its slot
                try:
                    return self.adoption.connect(self, address, job)
                except UseOpenSSH:
                    pass
        return self.openssh.connect(address, job)  # per job too where adoption is seen (docs/ssh.md)

    def _connecting_lock(self, address: str) -> threading.Lock:
        with self._lock:
            return self._connecting.setdefault(address, threading.Lock())

    # what Adoption.connect asks of a pool (dxflow.ssh.adoption.Connections): its rules are kept there, once
    def open(self, slot: Slot) -> int:
        return self._transport(slot)[1]

    def kept(self, slot: Slot) -> None:
        with self._lock:
            self._refusals.pop(slot, None)

    def refuse(self, slot: Slot, generation: int, landed: str) -> NoReturn:
        """Close a login that landed in an ending job (pam_slurm_adopt takes the newest job, ending or not):
        kept, its processes would hold the job's cgroup until Slurm gives up and drains the node. Tried
        again with a growing pause, it lands in a live job once the ending one's cgroup is gone."""
        with self._lock:
            node = self._nodes[slot]
            refusals = self._refusals[slot] = self._refusals.get(slot, 0) + 1
        assert node.transport is not None
        node.transport.close()
        node.transport = None  # failed, not ended: the slot keeps its pause (drop_ended passes it by)
        with self._lock:
            self._gens.pop(generation, None)
        self.adoption.forget(generation)
        node.error = (f"the login landed in job {landed}, whose connection ended (the job is ending): "
                      "closed at once, so that the job can end")
        node.retry_at = time.monotonic() + refused_pause(refusals)
        raise AgentUnreachable(f"{slot[0]}: {node.error}")

    def file(self, old: Slot, new: Slot, generation: int) -> int:
        """Put the connection of slot ``old`` in slot ``new``; one already live there wins (the newer closes)."""
        with self._lock:
            node = self._nodes.pop(old)
            there = self._nodes.get(new)
            if there is not None and there.transport is not None and there.transport.is_active():
                keep, dropped = there, node
            else:
                self._nodes[new] = keep = node
                self._gens[node.generation] = new
                dropped = None
        if dropped is not None and dropped.transport is not None:
            log.info("%s: a second connection into job %s closed (one per job)", new[0], new[1])
            dropped.transport.close()
            self.adoption.forget(dropped.generation)
        return keep.generation

    def drop_ended(self, address: str) -> None:
        """Forget the node's per-job connections that ended (with their jobs, usually)."""
        with self._lock:
            ended = [(s, n) for s, n in self._nodes.items() if s[0] == address and s[1] is not None
                     and n.transport is not None and not n.transport.is_active() and not n.lock.locked()]
            for slot, node in ended:
                del self._nodes[slot]
                self._gens.pop(node.generation, None)
                self._ended[slot] = time.monotonic()
        for _, node in ended:
            self.adoption.forget(node.generation)

    def learn(self, address: str, generation: int) -> str | None:
        """Which job the node's sshd put this connection in (pam_slurm_adopt; docs/ssh.md), once per generation:
        the connection ends with that job."""
        return self.adoption.read(address, generation, self.read_file)

    def note(self, address: str, job: str | None, generation: int) -> str:
        """What JOB's agent on the node says in ``dxflow ls`` about connection ``generation``: "" unless it is
        another job's (pam_slurm_adopt), which ends with that job."""
        return self.adoption.note(address, job, generation)

    def uses_openssh(self, address: str) -> bool:
        """Whether the node is reached through the user's OpenSSH client (forced, or chosen for it)."""
        return address not in self.local_names and (self.setting == "openssh" or address in self._via_openssh)

    def generation(self, address: str, job: str | None = None) -> int | None:
        """The generation of the live connection JOB's agents use on the node (0 for this host); None when none
        is up. Never connects. Per job where adoption is seen: the job's own, else the one it borrows."""
        if address in self.local_names:
            return 0
        if self.uses_openssh(address):
            return self.openssh.generation(address, job)
        return self.adoption.pick(address, job, self._live, self._any_live, self._by_generation)

    def ended(self, address: str, generation: int, wait: float = END_SEEN_WITHIN) -> bool:
        """Whether the node's connection of that generation has ended, or ends within WAIT seconds (an
        OpenSSH ControlMaster's end reaches its channels a moment before its process is seen gone);
        never for this very host, which is reached without one. Asked when something failed through it:
        the agent's end and the tunnel's look alike there."""
        if address in self.local_names:
            return False
        with self._lock:
            paramikos = generation in self._gens
        if paramikos:
            return self._by_generation(address, generation) is None
        return self.openssh.ended(address, generation, wait)

    def _live(self, slot: Slot) -> int | None:
        """The generation of the slot's connection if it is up."""
        with self._lock:
            node = self._nodes.get(slot)
        if node is None:
            return None
        # without node.lock, which a connection attempt holds for seconds; a new transport's number is set
        # before the transport, so a read mid-update sees the old (inactive) transport: None
        gen = node.generation
        t = node.transport
        if t is not None and t.is_active() and node.generation == gen:
            return gen
        return None

    def _any_live(self, address: str) -> int | None:
        with self._lock:
            slots = [s for s in self._nodes if s[0] == address]
        return max((g for g in map(self._live, slots) if g is not None), default=None)

    def _by_generation(self, address: str, generation: int) -> _Node | None:
        """The node's connection of that generation, if it is still up."""
        with self._lock:
            slot = self._gens.get(generation)
            node = self._nodes.get(slot) if slot is not None and slot[0] == address else None
        if node is None or node.generation != generation or node.transport is None or not node.transport.is_active():
            return None
        return node

    def _on(self, address: str, generation: int) -> _Node:
        """The connection of that generation; AgentUnreachable if it is gone (no other is used for it)."""
        node = self._by_generation(address, generation)
        if node is None:
            raise AgentUnreachable(f"{address}: the tunnel closed since the agent was checked")
        return node

    def _transport(self, slot: Slot) -> tuple[paramiko.Transport, int]:
        """The slot's live transport, or a new one."""
        address = slot[0]
        node = self._node(slot)
        with node.lock:
            t = node.transport
            if t is not None and t.is_active():
                return t, node.generation
            now = time.monotonic()
            if now < node.retry_at:
                raise AgentUnreachable(f"{address}: {node.error} (next try in {node.retry_at - now:.0f} s)")
            try:
                transport = self._connect(address)
            except UseOpenSSH as e:
                if self.setting == "auto":
                    log.info("%s: through OpenSSH: %s", address, e)
                    self._via_openssh[address] = str(e)
                    raise
                node.failures += 1
                node.error = f"ssh_transport is paramiko, which cannot reach it: {e}"
                node.retry_at = now + min(MAX_BACKOFF, 0.5 * 2 ** node.failures)
                raise AgentUnreachable(f"{address}: {node.error}") from e
            except Exception as e:  # noqa: BLE001 - any failure means "unreachable, retry later"
                node.failures += 1
                node.error = f"cannot connect by SSH: {e}"
                node.retry_at = now + min(MAX_BACKOFF, 0.5 * 2 ** node.failures)
                raise AgentUnreachable(f"{address}: {node.error}") from e
            node.generation = next(self.numbers)  # before the transport is set: see _live()
            node.transport = transport
            node.failures = 0
            node.retry_at = 0.0
            with self._lock:
                self._gens[node.generation] = slot
            return transport, node.generation

    def _connect(self, address: str) -> paramiko.Transport:
        opts = ssh_options.resolve(address, config_file=self.config)
        return self._login(address, opts, opts.jumps, ())

    def _hop(self, jumps: tuple[ssh_options.Jump, ...], chain: tuple[str, ...]) -> paramiko.Transport:
        """A transport to the last of ``jumps``, reached through the ones before it (``ssh -J a,b``)."""
        key = "jump:" + ",".join(map(str, jumps))
        if key in chain or len(chain) > MAX_HOPS:
            raise paramiko.SSHException(f"ProxyJump goes round in a loop: {' -> '.join(chain + (key,))}")
        node = self._node((key, None))
        with node.lock:
            if node.transport is not None and node.transport.is_active():
                return node.transport
            last = jumps[-1]
            opts = ssh_options.resolve(last.host, port=last.port, user=last.user, config_file=self.config)
            # the first hop is reached by its own settings (its own ProxyJump too), as OpenSSH does
            t = self._login(str(last), opts, jumps[:-1] or opts.jumps, chain + (key,))
            node.generation = next(self.numbers)
            node.transport = t
            return t

    def _login(self, name: str, opts: ssh_options.HostOptions, jumps: tuple[ssh_options.Jump, ...],
               chain: tuple[str, ...]) -> paramiko.Transport:
        """Log in to the host ``opts`` describes, through ``jumps`` (each hop's transport kept in the pool)."""
        return paramiko_login.login(name, opts, (lambda: self._hop(jumps, chain)) if jumps else None)

    def channel(self, address: str, port: int, timeout: float = CONNECT_TIMEOUT,
                generation: int | None = None, host: str = "127.0.0.1") -> paramiko.Channel | socket.socket:
        """A byte stream to HOST:PORT as seen from the node (its loopback unless told); with ``generation``,
        only through that transport."""
        if address in self.local_names:  # on this very host: no tunnel needed
            try:
                return socket.create_connection((host, port), timeout=timeout)
            except OSError as e:
                raise AgentUnreachable(f"cannot reach {host}:{port}: {e}") from e
        if generation is None:  # a caller that proved nothing: the node's connection (any live one, per job)
            generation = self.connect(address)
        if self.uses_openssh(address):
            return self.openssh.channel(address, port, timeout, generation, host)
        t = self._on(address, generation).transport
        assert t is not None
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
        gen = self.connect(address) if generation is None else generation
        if self.uses_openssh(address):
            return self.openssh.read_file(address, path, gen)
        node = self._on(address, gen)
        t = node.transport
        assert t is not None
        with node.sftp_lock:
            try:
                if node.sftp is None or node.sftp_generation != gen:
                    node.sftp = paramiko.SFTPClient.from_transport(t)
                    node.sftp_generation = gen
                    if node.sftp is None:
                        raise paramiko.SSHException("no SFTP session")
                    channel = node.sftp.get_channel()
                    if channel is not None:  # a hung node must not hold the check
                        channel.settimeout(CONNECT_TIMEOUT)
                with node.sftp.open(path, "rb") as f:
                    return f.read()  # to the end: /proc files say their size is 0
            except FileNotFoundError:
                raise
            except (paramiko.SSHException, OSError, EOFError) as e:
                node.sftp = None  # a broken session is opened again next time
                raise AgentUnreachable(f"{address}: cannot read {path} by SFTP: {e}") from e

    def status(self) -> dict[str, dict]:
        """Per node: connected, failures, error, transport; ``connections``: each live one's generation and
        the job it was adopted into (one per job where pam_slurm_adopt is seen); ``job``: the newest one's."""
        with self._lock:
            nodes = sorted(self._nodes.items(), key=lambda item: item[1].generation)
        out: dict[str, dict] = {}
        for (address, _), n in nodes:
            if self.uses_openssh(address):
                continue
            entry = out.setdefault(address, {"connected": False, "failures": 0, "error": "",
                                             "transport": "paramiko", "connections": []})
            if n.transport is not None and n.transport.is_active():
                entry["connected"] = True
                entry["connections"].append({"generation": n.generation, "job": self.adoption.job_of(n.generation)})
            entry["failures"] = max(entry["failures"], n.failures)
            entry["error"] = n.error or entry["error"]
        out.update(self.openssh.status())
        for entry in out.values():
            entry["job"] = entry["connections"][-1]["job"] if entry["connections"] else None
        return out

    def close(self) -> None:
        with self._lock:
            nodes = list(self._nodes.values())
        for n in nodes:
            if n.transport:
                n.transport.close()
        self.openssh.close()
