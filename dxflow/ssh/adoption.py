"""Which SSH connection serves which job's agents, where ``pam_slurm_adopt`` puts each login in one job.

Where compute nodes run ``pam_slurm_adopt``, an SSH session is adopted into one job of the user on
the node and dies with it (Slurm kills the job's cgroup, the session's sshd with it). From a login
node the module cannot tell which job a login is for, so it takes the *newest* of the user's jobs
there (``action_unknown=newest``). An agent registers at its job's start, when its job is normally
the newest: a connection opened for it right then lands in its own job.

So the pool keeps its connections in *slots*: ``(address, None)`` on a node where no adoption was
seen (one connection per node, as everywhere else), ``(address, job)`` on a node where one was (one
connection per job). A connection is put in the slot of the job it landed in, whatever it was opened
for. A job whose agents have no connection of their own yet *borrow* another job's (``lend``), which
serves them until it ends with its job or one of their own exists; :meth:`Adoption.note` says so.

No SSH here: the pools open the connections and read ``/proc/self/cgroup`` through each
(:func:`dxflow.ssh.transport.adopted_job`); :meth:`Adoption.connect` and :meth:`Adoption.pick` are the
rules, over what a pool offers (:class:`Connections`), for both pools: :class:`dxflow.ssh.openssh.OpenSSHPool`
(the user's OpenSSH) and :class:`dxflow.master.tunnels.TunnelPool` (paramiko).
docs/ssh.md, "Jobs sharing a node under pam_slurm_adopt", explains it to admins.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, NoReturn, Protocol

from dxflow.errors import AgentUnreachable
from dxflow.ssh.transport import adopted_job

log = logging.getLogger(__name__)

#: a connection's slot: (node address, the job it was adopted into; None where no adoption happens)
Slot = tuple[str, str | None]

#: seconds a job borrowing another job's connection waits before a login is tried again for it: while
#: the other job is newer, every login lands there (and is closed again as a duplicate)
BORROW_RETRY = 60.0

#: the longest pause before a login is tried again after logins landed in an ending job: that job ends within
#: Slurm's KillWait (30 s by default) plus its epilog, and a copy waiting on the node resumes at most this long
#: after; each try costs the node one login
REFUSED_RETRY_MAX = 4.0


def refused_pause(refusals: int) -> float:
    """Seconds before the next login after ``refusals`` logins in a row landed in an ending job: 1, 2, 4, 4…"""
    return min(REFUSED_RETRY_MAX, 0.5 * 2 ** refusals)


class EndedJobs:
    """The part of :class:`Connections` both pools share: the per-job slots whose connection ended,
    remembered as ending jobs (``_ended``, filled by the pool's ``drop_ended`` under ``_lock``)."""

    _lock: threading.Lock
    _ended: dict[Slot, float]

    def _live(self, slot: Slot) -> int | None:
        raise NotImplementedError

    def ending(self, address: str, job: str) -> bool:
        """Whether JOB's connection ended and none of it is up: the job is ending, most likely."""
        with self._lock:
            ended = (address, job) in self._ended
        return ended and self._live((address, job)) is None

    def lives(self, address: str, job: str) -> None:
        """A login for JOB landed in JOB: the job is not ending."""
        with self._lock:
            self._ended.pop((address, job), None)


class Connections(Protocol):
    """What a pool offers the rules of :meth:`Adoption.connect`."""

    def generation(self, address: str, job: str | None = None) -> int | None:
        """The live connection JOB's agents use on the node (:meth:`Adoption.pick`); never connects."""

    def open(self, slot: Slot) -> int:
        """The slot's live connection, or a new one (AgentUnreachable if none can be had)."""

    def learn(self, address: str, generation: int) -> str | None:
        """The job the connection was adopted into (None: none), read once per connection."""

    def drop_ended(self, address: str) -> None:
        """Forget the node's per-job connections that ended, and remember their jobs as ending."""

    def ending(self, address: str, job: str) -> bool:
        """Whether JOB's connection ended and none of it is up: the job is ending, most likely."""

    def lives(self, address: str, job: str) -> None:
        """A login for JOB landed in JOB: the job is not ending."""

    def kept(self, slot: Slot) -> None:
        """A login for the slot was kept: its next refusal pauses from the start again."""

    def refuse(self, slot: Slot, generation: int, landed: str) -> NoReturn:
        """Close a login that landed in an ending job at once, pause the slot, raise AgentUnreachable."""

    def file(self, slot: Slot, landed: Slot, generation: int) -> int:
        """File the connection opened for ``slot`` under the slot it landed in; the generation serving it
        (one already live there wins, the new one is closed)."""


class Adoption:
    """Where each connection (by generation) landed, which nodes adopt, and who borrows whose connection."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._adoptive: set[str] = set()                     # nodes where a connection was adopted into a job
        self._landed: dict[int, Slot] = {}                   # generation -> (address, job it was adopted into)
        self._lent: dict[tuple[str, str], tuple[int, float]] = {}   # (address, job) -> (generation, since when)

    def adoptive(self, address: str) -> bool:
        """Whether a connection to this node was adopted into a job (then connections are kept per job)."""
        with self._lock:
            return address in self._adoptive

    def slot(self, address: str, job: str | None) -> Slot:
        """The slot of the connection JOB's agents on the node should use: per job where adoption was seen."""
        with self._lock:
            return (address, job) if job is not None and address in self._adoptive else (address, None)

    def known(self, generation: int) -> bool:
        """Whether it is known where this connection landed."""
        with self._lock:
            return generation in self._landed

    def read(self, address: str, generation: int, read_file: Callable[[str, str, int], bytes]) -> str | None:
        """Which job the node's sshd put connection ``generation`` in, asked once per connection: its
        session's ``/proc/self/cgroup``, read through it with ``read_file(address, path, generation)``."""
        if self.known(generation):
            return self.job_of(generation)
        try:
            job = adopted_job(read_file(address, "/proc/self/cgroup", generation).decode(errors="replace"))
        except (FileNotFoundError, AgentUnreachable) as e:
            log.info("%s: cannot tell whether the SSH connection was adopted into a job: %s", address, e)
            job = None
        self.learn(address, generation, job)
        if job:
            log.info("%s: the SSH connection was adopted into job %s (it ends with that job)", address, job)
        return job

    def learn(self, address: str, generation: int, job: str | None) -> Slot:
        """The connection ``generation`` to ``address`` is in ``job`` (None: not adopted); its slot."""
        with self._lock:
            self._landed[generation] = (address, job)
            if job is not None:
                self._adoptive.add(address)
            return (address, job)

    def job_of(self, generation: int) -> str | None:
        """The job the connection was adopted into (None: not adopted, or not known)."""
        with self._lock:
            return self._landed.get(generation, ("", None))[1]

    def lend(self, address: str, job: str, generation: int) -> None:
        """JOB's agents use connection ``generation`` (another job's) until one of their own exists."""
        with self._lock:
            self._lent[(address, job)] = (generation, time.monotonic())

    def unlend(self, address: str, job: str | None) -> None:
        if job is not None:
            with self._lock:
                self._lent.pop((address, job), None)

    def borrowed(self, address: str, job: str | None) -> int | None:
        """The generation of the connection JOB borrows on the node; None if it borrows none."""
        if job is None:
            return None
        with self._lock:
            entry = self._lent.get((address, job))
        return entry[0] if entry else None

    def retry_due(self, address: str, job: str) -> bool:
        """Whether a login for JOB should be tried again, although it borrows a live connection."""
        with self._lock:
            entry = self._lent.get((address, job))
        return entry is None or time.monotonic() - entry[1] >= BORROW_RETRY

    def forget(self, generation: int) -> None:
        """The connection is gone for good: nothing is lent from it any more."""
        with self._lock:
            self._landed.pop(generation, None)
            for key in [k for k, (g, _) in self._lent.items() if g == generation]:
                del self._lent[key]

    def note(self, address: str, job: str | None, generation: int) -> str:
        """What the agents of JOB should say in ``dxflow ls`` about the connection ``generation`` they use."""
        other = self.job_of(generation)
        if job is None or other is None or other == job:
            return ""
        return (f"through job {other}'s SSH connection (pam_slurm_adopt put the login in that job): "
                f"it ends with job {other}, and then one of job {job}'s own is opened")

    def pick(self, address: str, job: str | None, live: Callable[[Slot], int | None],
             any_live: Callable[[str], int | None], up: Callable[[str, int], object]) -> int | None:
        """The generation JOB's agents use on the node, of those up (``live``: a slot's; ``any_live``: the
        node's newest; ``up``: whether that generation is): their job's own, else the one it borrows."""
        slot = self.slot(address, job)
        gen = live(slot)
        if gen is not None:
            return gen
        if slot[1] is None:  # a caller that proved nothing, on a node of per-job connections: any live one
            return any_live(address) if self.adoptive(address) else None
        borrowed = self.borrowed(address, job)
        if borrowed is not None and up(address, borrowed) is not None:
            return borrowed
        return live((address, None))

    def connect(self, pool: Connections, address: str, job: str | None) -> int:
        """The connection JOB's agents on the node use: their own, one they borrow, or a new login filed
        under the job it landed in (the rules: this module's docstring; docs/ssh.md). The caller holds
        the node's connecting lock: where a login lands decides its slot."""
        pool.drop_ended(address)
        slot = self.slot(address, job)
        gen = pool.generation(address, job)
        borrowed = self.borrowed(address, job)
        if gen is not None and (gen != borrowed or not self.retry_due(address, str(job))):
            return gen
        try:
            new = pool.open(slot)
        except AgentUnreachable:
            if gen is None:
                raise
            self.lend(address, str(job), gen)   # a failed try (an MFA prompt, say) keeps the borrowed one
            return gen
        landed = pool.learn(address, new)
        if landed == job and job is not None:
            pool.lives(address, job)
        elif landed is not None and job is not None and pool.ending(address, landed):
            pool.refuse(slot, new, landed)
        if landed != slot[1]:  # it is the connection of the job it landed in, whatever it was opened for
            new = pool.file(slot, (address, landed), new)
        if job is not None and landed is not None and landed != job:
            self.lend(address, job, new)
            log.info("%s: job %s's agents use job %s's SSH connection until one of their own exists",
                     address, job, landed)
        else:
            self.unlend(address, job)
        pool.kept(slot)
        return new
