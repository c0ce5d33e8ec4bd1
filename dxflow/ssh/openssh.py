"""The user's own OpenSSH client as dxflow's transport: one ControlMaster per node (per job where
``pam_slurm_adopt`` adopts logins: :mod:`dxflow.ssh.adoption`).

Everything ``ssh`` can do works unchanged: every ``ssh_config`` option, host certificates,
hostbased authentication through ``ssh-keysign``, GSSAPI/Kerberos, a smart card, and a one-time
MFA prompt in the user's terminal (the CLI starts that ControlMaster: :mod:`dxflow.ssh.control`).

A channel is a socket pair: one end is handed to the ControlMaster as the input and output of a
stdio forwarding to HOST:PORT (what ``ssh -S CTL -W HOST:PORT NODE`` does; spoken here directly,
:mod:`dxflow.ssh.mux`, with ``ssh -W`` as the fallback), the other is the channel: an ordinary
``socket.socket``, so everything written for sockets (timeouts, ``shutdown``, ``makefile``,
``select``) works on it.

The *generation* of a node's transport is the ControlMaster it goes through: a new ControlMaster
process (a new pid, watched through a pidfd) is a new generation. Where pam_slurm_adopt puts each
login in one job, ControlMasters are kept per (node, job), each on a socket of its own
(:func:`dxflow.ssh.control.control_path`), by the rules of :meth:`dxflow.ssh.adoption.Adoption.connect`.
"""

from __future__ import annotations

import itertools
import logging
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

from dxflow.errors import AgentUnreachable, ConfigError
from dxflow.layout import UserLayout
from dxflow.ssh import control, mux
from dxflow.ssh.adoption import Adoption, EndedJobs, Slot, refused_pause
from dxflow.ssh.controlmaster import COMMAND_TIMEOUT, CONNECT_TIMEOUT, ControlMaster, LoginNeeded

log = logging.getLogger(__name__)

MAX_BACKOFF = 30.0


class OpenSSHPool(EndedJobs):
    """ControlMasters keyed by slot: (node, None), or (node, job) where pam_slurm_adopt adopts logins
    (:mod:`dxflow.ssh.adoption`); the same interface as :class:`dxflow.master.tunnels.TunnelPool`."""

    def __init__(self, layout: UserLayout | None = None, numbers: Iterator[int] | None = None,
                 config: str | None = None, adoption: Adoption | None = None) -> None:
        self._layout = layout or UserLayout.of()
        self.config = config  # an ssh_config file used instead of the user's and the system's (ssh -F)
        self._no_mux = False  # a ControlMaster whose mux protocol is not ours: `ssh -W` per channel
        self._numbers = numbers or itertools.count(1)  # generations (shared with paramiko's: never the same)
        self.adoption = adoption or Adoption()   # shared with paramiko's pool: its notes cover both
        self._masters: dict[Slot, ControlMaster] = {}
        self._gens: dict[int, Slot] = {}         # generation -> the slot its ControlMaster is in
        self._ended: dict[Slot, float] = {}      # per-job slots whose ControlMaster ended: the job is ending, likely
        self._nodes: set[str] = set()            # every node asked for (status lists each)
        self._connecting: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _master(self, slot: Slot) -> ControlMaster:
        ctl = self.control_path(*slot)
        with self._lock:
            self._nodes.add(slot[0])
            return self._masters.setdefault(slot, ControlMaster(ctl))

    def control_path(self, address: str, job: str | None = None) -> Path:
        try:
            return control.control_path(address, self._layout, job)
        except ConfigError as e:
            raise AgentUnreachable(f"{address}: {e}") from e

    # -- one ControlMaster (dxflow.ssh.controlmaster) ---------------------------------------------
    def _known(self, m: ControlMaster) -> Callable[[int], bool]:
        """Whether a pid is another ControlMaster this process holds (one socket's master is never two slots')."""
        def known(pid: int) -> bool:
            with self._lock:
                return any(o.pid == pid and o is not m for o in self._masters.values())
        return known

    def _adopt(self, address: str, m: ControlMaster, ctl: Path) -> bool:
        return m.take(address, ctl, self.config, self._numbers, self._known(m))

    def _start(self, address: str, m: ControlMaster) -> None:
        m.start(address, self._layout, self.config, self._numbers, self._known(m), self.master_options(address))

    def master_options(self, address: str) -> tuple[str, ...]:
        """``-o`` options a new ControlMaster to the node gets before dxflow's own (none here; the agents'
        pool of a broadcast: :mod:`dxflow.agent.peers`)."""
        return ()

    def _end(self, address: str, m: ControlMaster) -> None:
        m.end(address, self.config)

    def _generation(self, slot: Slot) -> int:
        """The slot's live ControlMaster, one found on its socket (or, for a job, on the node's: the CLI's
        login with a prompt), or a new one."""
        address = slot[0]
        m = self._master(slot)
        with m.lock:
            if m.alive():
                return m.generation
            sockets = [m.ctl] if slot[1] is None else [m.ctl, self.control_path(address)]
            if any(self._adopt(address, m, ctl) for ctl in sockets):   # the CLI's, or an earlier master's
                m.failures, m.retry_at, m.login_needed = 0, 0.0, False
            else:
                now = time.monotonic()
                if now < m.retry_at:
                    cls = LoginNeeded if m.login_needed else AgentUnreachable
                    raise cls(f"{m.error} (next try in {m.retry_at - now:.0f} s)")
                m.ctl = self.control_path(*slot)
                try:
                    self._start(address, m)
                except AgentUnreachable as e:
                    m.failures += 1
                    m.error = str(e)
                    m.retry_at = now + min(MAX_BACKOFF, 0.5 * 2 ** m.failures)
                    raise
                m.failures, m.retry_at = 0, 0.0
            with self._lock:
                self._gens[m.generation] = slot
            return m.generation

    # -- which ControlMaster serves which job (pam_slurm_adopt: docs/ssh.md) ----------------------
    def connect(self, address: str, job: str | None = None) -> int:
        """Log in to the node if needed; the generation of the ControlMaster JOB's agents use there (one per
        job where pam_slurm_adopt adopts logins, else one per node)."""
        with self._connecting_lock(address):   # one login to a node at a time: where it lands decides its slot
            return self.adoption.connect(self, address, job)

    def _connecting_lock(self, address: str) -> threading.Lock:
        with self._lock:
            return self._connecting.setdefault(address, threading.Lock())

    def generation(self, address: str, job: str | None = None) -> int | None:
        """The generation of the live ControlMaster JOB's agents use on the node; None when none is up.
        Never connects."""
        return self.adoption.pick(address, job, self._live, self._any_live, self._by_generation)

    def note(self, address: str, job: str | None, generation: int) -> str:
        return self.adoption.note(address, job, generation)

    # what Adoption.connect asks of a pool (dxflow.ssh.adoption.Connections)
    open = _generation

    def learn(self, address: str, generation: int) -> str | None:
        """Which job the node's sshd put this ControlMaster's session in, once per ControlMaster."""
        return self.adoption.read(address, generation, self.read_file)

    def drop_ended(self, address: str) -> None:
        with self._lock:
            ended = [(s, m) for s, m in self._masters.items()
                     if s[0] == address and s[1] is not None and m.ended() and not m.lock.locked()]
            for slot, m in ended:
                del self._masters[slot]
                self._gens.pop(m.generation, None)
                self._ended[slot] = time.monotonic()
        for _, m in ended:
            m.forget()
            self.adoption.forget(m.generation)

    def kept(self, slot: Slot) -> None:
        with self._lock:
            m = self._masters.get(slot)
        if m is not None:
            m.refusals = 0

    def refuse(self, slot: Slot, generation: int, landed: str) -> NoReturn:
        """End a ControlMaster whose login landed in an ending job (pam_slurm_adopt takes the newest job, ending
        or not): kept, it would hold the job's cgroup until Slurm gives up and drains the node. The slot starts
        no other for a growing pause; by then the ending job's cgroup is gone, most likely."""
        m = self._master(slot)
        why = (f"the login landed in job {landed}, whose connection ended (the job is ending): "
               "closed at once, so that the job can end")
        with m.lock:
            if m.generation == generation:
                self._end(slot[0], m)
            m.refusals += 1
            m.error = f"{slot[0]}: {why}"
            m.retry_at = time.monotonic() + refused_pause(m.refusals)
        with self._lock:
            self._gens.pop(generation, None)
        self.adoption.forget(generation)
        raise AgentUnreachable(m.error)

    def file(self, slot: Slot, landed: Slot, generation: int) -> int:
        """A ControlMaster on the node's socket (a first login, the CLI's) is filed under the job it landed in,
        socket and all; one on a job's own socket must be in that job, so it is ended, and the job it landed
        in gets one on its own socket (its login lands there: that job is the newest) unless it has one."""
        address = slot[0]
        with self._lock:
            m = self._masters.pop(slot)
            there = self._masters.get(landed)
            keep = there is not None and there.alive()
            if not keep and m.ctl == self.control_path(address):
                self._masters[landed] = m
                self._gens[generation] = landed
                return generation
        self._end(address, m)
        self.adoption.forget(generation)
        with self._lock:
            self._gens.pop(generation, None)
        if keep:
            log.info("%s: a second ControlMaster into job %s ended (one per job)", address, landed[1])
            assert there is not None
            return there.generation
        gen = self._generation(landed)
        if self.learn(address, gen) != landed[1]:   # the newest job changed meanwhile: not kept anywhere
            self._end(address, self._master(landed))
            self.adoption.forget(gen)
            raise AgentUnreachable(f"{address}: logins land in another job each time (pam_slurm_adopt); "
                                   "tried again later")
        return gen

    def _live(self, slot: Slot) -> int | None:
        with self._lock:
            m = self._masters.get(slot)
        return m.generation if m is not None and m.alive() else None

    def _any_live(self, address: str) -> int | None:
        with self._lock:
            slots = [s for s in self._masters if s[0] == address]
        return max((g for g in map(self._live, slots) if g is not None), default=None)

    def _by_generation(self, address: str, generation: int) -> ControlMaster | None:
        """The node's ControlMaster of that generation, if it is still up."""
        with self._lock:
            slot = self._gens.get(generation)
            m = self._masters.get(slot) if slot is not None and slot[0] == address else None
        return m if m is not None and m.generation == generation and m.alive() else None

    def ended(self, address: str, generation: int, wait: float = 0.0) -> bool:
        """Whether the node's ControlMaster of that generation has ended, or ends within WAIT seconds: a
        channel through it that ended may have ended with it (its socket cannot say)."""
        with self._lock:
            slot = self._gens.get(generation)
            m = self._masters.get(slot) if slot is not None and slot[0] == address else None
        if m is None or m.generation != generation:
            return True
        return m.ends_within(wait)

    def _on(self, address: str, generation: int | None) -> ControlMaster:
        """The ControlMaster of that generation (the node's, for a caller that proved nothing);
        AgentUnreachable if it is gone (no other is used for it)."""
        if generation is None:
            generation = self.connect(address)
        m = self._by_generation(address, generation)
        if m is None:
            raise AgentUnreachable(f"{address}: the tunnel closed since the agent was checked")
        return m

    def login_needed(self, address: str) -> bool:
        """Whether the node's SSH server wants a person's answers, and no ControlMaster to it is up."""
        with self._lock:
            masters = [m for s, m in self._masters.items() if s[0] == address]
        return any(m.login_needed for m in masters) and not any(m.alive() for m in masters)

    def channel(self, address: str, port: int, timeout: float = CONNECT_TIMEOUT, generation: int | None = None,
                host: str = "127.0.0.1") -> socket.socket:
        """A byte stream to HOST:PORT as seen from the node; with ``generation``, only through that ControlMaster."""
        m = self._on(address, generation)
        if not self._no_mux:
            try:
                return mux.stdio_forward(m.ctl, host, port, timeout)
            except mux.MuxError as e:
                if "refused" in str(e):
                    raise AgentUnreachable(f"{address}: cannot reach {host}:{port}: {e}") from e
                log.warning("%s: %s; channels go through `ssh -W` processes from now on", address, e)
                self._no_mux = True
            except OSError as e:
                raise AgentUnreachable(f"{address}: cannot reach {host}:{port} through the ControlMaster: {e}") from e
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(control.channel_argv(address, m.ctl, host, port, self.config),
                                    stdin=theirs.fileno(), stdout=theirs.fileno(), stderr=subprocess.DEVNULL, close_fds=True)
        except OSError as e:
            ours.close()
            raise AgentUnreachable(f"{address}: cannot run ssh: {e}") from e
        finally:
            theirs.close()
        m.procs = [p for p in m.procs if p.poll() is None]   # reap the channels that ended
        m.procs.append(proc)
        ours.settimeout(timeout)
        return ours

    def read_file(self, address: str, path: str, generation: int | None = None) -> bytes:
        """A file of the node, read by ``cat`` through the ControlMaster.

        FileNotFoundError if it does not exist; AgentUnreachable if the node cannot be asked.
        """
        m = self._on(address, generation)
        argv = control.command_argv(address, m.ctl, f"cat -- {shlex.quote(path)}", self.config)
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=COMMAND_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise AgentUnreachable(f"{address}: cannot read {path}: {e}") from e
        if proc.returncode == 0:
            return proc.stdout
        err = proc.stderr.decode(errors="replace").strip()
        if proc.returncode == 1 and "No such file or directory" in err:
            raise FileNotFoundError(path)
        raise AgentUnreachable(f"{address}: cannot read {path}: {err or f'ssh exited {proc.returncode}'}")

    def status(self) -> dict[str, dict]:
        """Per node: connected, failures, error, login_needed; ``connections``: each live ControlMaster's
        generation and the job it was adopted into; ``job``: the newest one's."""
        with self._lock:
            nodes = sorted(self._nodes)
            masters = sorted(self._masters.items(), key=lambda item: item[1].generation)
        out: dict[str, dict] = {}
        for address in nodes:
            mine = [m for s, m in masters if s[0] == address]
            live = [{"generation": m.generation, "job": self.adoption.job_of(m.generation)} for m in mine if m.alive()]
            out[address] = {"connected": bool(live), "failures": max((m.failures for m in mine), default=0),
                            "error": next((m.error for m in reversed(mine) if m.error), ""), "transport": "openssh",
                            "login_needed": self.login_needed(address), "connections": live,
                            "job": live[-1]["job"] if live else None}
        return out

    def close(self) -> None:
        """Let go of every channel; the ControlMasters stay for the next master (ControlPersist ends them)."""
        with self._lock:
            masters = list(self._masters.values())
        for m in masters:
            for p in m.procs:
                if p.poll() is None:
                    p.terminate()
            m.forget()
