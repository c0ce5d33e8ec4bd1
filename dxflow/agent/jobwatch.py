"""Whether the agent's job still runs on this node: looked at on the node, asked of the controller rarely.

The agent stops by itself when its job is gone, in case no epilog stops it, and ``logs -f`` ends
its stream when the job ends. Both learn it here (issue #11: slurmctld serves every user of the
cluster, and a tool that asks it from every node of a job, in a loop, gets banned). Two ways to
know, the cheap one first:

- a look at the node's own files (:meth:`Scheduler.job_here`, the adapter's ``local_signs``: Slurm,
  slurmstepd's sockets in slurmd's spool folder; PBS and Torque, pbs_mom's job file in
  ``mom_priv/jobs``; LSF, sbatchd's job folder in /tmp, else the job file) every
  ``job_check_interval`` seconds, and when a log follower wants to know (at most every ``max_age``
  it gives). No controller call; on the shared file system at most LSF's job file, one stat.
  Once a sign that lasts the job's whole life on the node was seen, its absence means the job
  ended here;
- only where no look can tell (no lasting sign on this node, or none known for the scheduler), a
  question about this one job to the controller, every ``controller_check_interval`` seconds: the
  first at a random point of the first interval, since a large job's agents start together and
  must not ask together, the later ones ±10 %; never past the process's cap
  (:data:`dxflow.schedulers.base.QUERY_BUDGET`).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from typing import Callable

from dxflow.agent.state import AgentState
from dxflow.config import SiteConfig
from dxflow.errors import DxflowError
from dxflow.schedulers import JobState, Scheduler, get_scheduler
from dxflow.schedulers.base import QUERY_BUDGET, Presence

log = logging.getLogger(__name__)

#: Seconds between the job's end being known and the agent stopping: followers send their last lines
#: and their ``end`` event first (they look at least once a second).
END_GRACE = 2.0
#: Seconds between controller questions while someone follows a log and no look can tell (an adapter
#: without signs, or a node where none was seen): a follower must see the end of the job, and only the
#: followed node's agent asks, within the cap.
FOLLOW_ASK = 10.0
#: Environment variable that sets both intervals at once (the lab tests use 1 s).
INTERVAL_ENV = "DXFLOW_JOB_CHECK_INTERVAL"
#: Where the agent's watch is kept in :attr:`AgentState.extra`.
KEY = "job_watch"


class JobWatch:
    """Watches one job on one node; :meth:`run` in a thread, :meth:`over` from request threads."""

    def __init__(self, sched: Scheduler, job: str, node: str, look_every: float, ask_every: float,
                 stop: Callable[[], None] | None = None, rng: random.Random | None = None) -> None:
        self.sched = sched
        self.job = job
        self.node = node
        self.look_every = look_every
        self.ask_every = ask_every
        self.stop = stop
        self.rng = rng or random.Random()
        self.ended = threading.Event()
        self.why = ""
        self.asked = 0            # controller questions asked (for tests and the agent's log)
        self._lock = threading.Lock()
        self._seen_lasting = False
        self._looked_at = float("-inf")
        self._next_ask = time.monotonic() + self.rng.uniform(0.0, ask_every)
        self._next_follow_ask = float("-inf")

    def next_ask_in(self) -> float:
        """Seconds until the controller may be asked next (if a look cannot tell by then)."""
        return max(0.0, self._next_ask - time.monotonic())

    def _end(self, why: str) -> None:
        if not self.ended.is_set():
            self.why = why
            log.info("job %s has ended on %s: %s", self.job, self.node, why)
            self.ended.set()

    def look(self) -> Presence:
        """Look at the node now (no controller call); the job has ended when a lasting sign seen before is gone."""
        try:
            presence = self.sched.job_here(self.job, self.node)
        except (DxflowError, OSError, ValueError) as e:
            log.warning("cannot look for job %s on this node: %s", self.job, e)
            presence = Presence.UNKNOWN
        with self._lock:
            self._looked_at = time.monotonic()
            if presence is Presence.LASTING:
                self._seen_lasting = True
            elif presence is Presence.ABSENT and self._seen_lasting:
                self._end(f"what {self.sched.name} keeps on this node for the job is gone")
        return presence

    def over(self, max_age: float) -> bool:
        """Whether the job has ended, by a look no older than ``max_age`` seconds (made now when the last
        one is older). Where a look cannot tell, a follower's question goes to the controller at most
        every :data:`FOLLOW_ASK` seconds (within the process's cap)."""
        if not self.ended.is_set() and time.monotonic() - self._looked_at >= max_age:
            presence = self.look()
            now = time.monotonic()
            if (not self.ended.is_set() and presence not in (Presence.LASTING, Presence.PASSING)
                    and now >= self._next_follow_ask and QUERY_BUDGET.available()):
                self._next_follow_ask = now + min(FOLLOW_ASK, self.ask_every)
                self._ask()
        return self.ended.is_set()

    def tick(self) -> None:
        """One round: a look, then, only when it cannot tell and it is time, the controller."""
        presence = self.look()
        if self.ended.is_set() or presence in (Presence.LASTING, Presence.PASSING):
            return
        now = time.monotonic()
        if now < self._next_ask or not QUERY_BUDGET.available():
            return  # not yet; or over the process's cap: the next round tries again
        self._next_ask = now + self.ask_every * self.rng.uniform(0.9, 1.1)
        self._ask()

    def _ask(self) -> None:
        """One question about this job to the controller."""
        self.asked += 1
        try:
            state = self.sched.job_state(self.job)
        except (DxflowError, OSError, ValueError) as e:
            log.warning("cannot ask %s about job %s (will retry): %s", self.sched.name, self.job, e)
            return
        if state in (JobState.ENDED, JobState.ENDING):
            self._end(f"{self.sched.name} says job {self.job} is {state.value}")

    def run(self) -> None:
        while not self.ended.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the watch must keep going; the log says why
                log.exception("watching job %s", self.job)
            self.ended.wait(self.look_every)
        if self.stop is not None:
            time.sleep(END_GRACE)
            log.info("agent stops: %s", self.why)
            self.stop()


def intervals(site: SiteConfig) -> tuple[float, float]:
    """(seconds between looks, seconds between controller questions) for this site."""
    look, ask = max(site.job_check_interval, 1.0), max(site.controller_check_interval, 1.0)
    if os.environ.get(INTERVAL_ENV):
        look = ask = max(float(os.environ[INTERVAL_ENV]), 0.1)
    return look, ask


def start(state: AgentState, site: SiteConfig, stop: Callable[[], None]) -> JobWatch:
    """Watch the agent's job in a thread; ``stop`` is called once it has ended."""
    look, ask = intervals(site)
    watch = JobWatch(get_scheduler(state.scheduler), state.job, state.node, look, ask, stop=stop)
    state.extra[KEY] = watch
    threading.Thread(target=watch.run, daemon=True, name="job-watch").start()
    return watch


def of(state: AgentState) -> JobWatch | None:
    """The agent's watch (None in an app that runs without one: tests)."""
    return state.extra.get(KEY)
