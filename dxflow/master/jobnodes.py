"""``GET /api/jobs/JOB/nodes``: the job's nodes as its scheduler knows them, not as its agents have
registered so far (``dxflow exec JOB:all`` right after ``sbatch`` means every node of the job, as
``srun``, ``pdsh -w`` and ``clush`` take it).

The rule, in one place (:func:`answer`, for the master and the site service alike): registrations
first, the controller second. Each agent's registration carries every node of its job as the
scheduler told its prolog (:attr:`dxflow.registration.Registration.job_nodes`): the union of what the
job's live agents say is the answer, with nothing asked of the controller, so a node whose agent never
registers is still one of the job's nodes even when the controller query cap is spent. Only when no
registered agent of the job carries the set (an agent of an older release, a job with no agent yet)
is the scheduler asked.

The scheduler's answer comes from the user's own job list, the one filtered question the master already asks
(``squeue --user``, ``qstat``, ``bjobs -u``: :meth:`dxflow.schedulers.base.Scheduler.jobs`): first the
fleet watcher's last answer, which has every running job of the user with its nodes (it asks on
every new registration, so a job just started is usually there, and a lookup of a job whose agents
are registering nudges it rather than asking itself); only for a job not in it, with no agent yet, is
the scheduler asked here, once per scheduler for all the jobs asked about within :data:`JOBS_FRESH`
seconds, and only within the controller query cap (:data:`dxflow.schedulers.base.QUERY_BUDGET`: when
it is spent, the last answer stands).
Only the user's own jobs are listed: another user's job is answered as ``ended`` (not the user's),
as a job that never was.

The answer::

    {"job": "12", "state": "running", "nodes": ["n1", "n2"], "node_set": "n[1-2]",
     "scheduler": "slurm", "why": "", "source": "agents"}

``source`` says who told: ``agents`` (their registrations) or ``scheduler``. ``state`` is a
:class:`~dxflow.schedulers.base.JobState` value: ``unknown`` (with ``why``) when neither source knows (no
agent carries the set, and no scheduler could be asked: none known, no controller, the cap spent, an
error); the caller then goes by the registered agents alone. The site service answers the same route from its clusters' answers
(:mod:`dxflow.site.jobnodes`).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

from flask import Flask, jsonify

from dxflow.errors import DxflowError, UsageError
from dxflow.master.metrics import JOB_ID
from dxflow.schedulers import ADAPTERS, JobInfo, JobState, adapter_class, get_scheduler, has_controller
from dxflow.schedulers.base import QUERY_BUDGET
from dxflow.schedulers.hostlist import fold, node_set, sort_hosts

if TYPE_CHECKING:
    from dxflow.master.registry import Agent

log = logging.getLogger(__name__)

#: Seconds an answer of the scheduler about the user's jobs is used again: the commands a user types
#: one after the other (exec, then logs, then cp) share one question, and a command waiting for a
#: pending job asks no more often than the default cap refills (6 a minute)
JOBS_FRESH = 10.0

#: ``lookup(job)`` -> the answer's fields: how a master and the site service find a job's nodes
Lookup = Callable[[str], dict]


def same_job(listed: str, job: str) -> bool:
    """Whether a listed job id is ``job``: itself, or a PBS id's number (``12`` for ``12.server``)."""
    return listed == job or ("." not in job and listed.split(".", 1)[0] == job)


def found(job: str, scheduler: str, jobs: dict[str, JobInfo], user: str) -> dict | None:
    """The answer for ``job`` from one scheduler's list of ``user``'s jobs; None when it is not in it. A
    listed job of another user is not (the list is asked filtered; this holds whatever the filter did)."""
    jobs = {j: info for j, info in jobs.items() if info.user == user}
    ids = sorted(j for j in jobs if same_job(j, job))
    if not ids:
        return None
    info = jobs[job] if job in jobs else jobs[ids[0]]
    return {"job": info.job, "state": info.state.value, "nodes": list(info.nodes),
            "node_set": fold(info.nodes) if info.nodes else "", "scheduler": scheduler, "why": "",
            "source": "scheduler"}


def from_agents(job: str, agents: Iterable[Agent], cluster: str = "") -> dict | None:
    """The answer from the job's registered agents (of ``cluster``, when named): the union of the job's
    nodes their registrations carry, and of their own nodes; None when no live agent of the job carries
    them (then the scheduler is asked). The agents are the caller's user's own: a master's, or those the
    site service picked by the requesting user."""
    mine = [a for a in agents if a.state != "gone" and same_job(a.reg.job, job)
            and (not cluster or a.reg.cluster == cluster)]
    nodes: set[str] = set()
    told = []
    for a in mine:
        if not a.reg.job_nodes:
            continue
        try:
            nodes.update(node_set(a.reg.job_nodes))
        except UsageError as e:  # the user's own file, edited by hand: that agent says nothing
            log.warning("agent %s: its registration's job_nodes is not a node set: %s", a.name, e)
            continue
        told.append(a)
    if not told:
        return None
    nodes.update(a.reg.node for a in mine)
    listed = sort_hosts(nodes)
    first = told[0]
    return {"job": first.reg.job, "state": JobState.RUNNING.value, "nodes": listed, "node_set": fold(listed),
            "scheduler": first.reg.scheduler, "why": "", "source": "agents", "cluster": first.reg.cluster}


def not_listed(job: str, schedulers: list[str]) -> dict:
    """The answer for a job none of the schedulers lists among the user's jobs."""
    return {"job": job, "state": JobState.ENDED.value, "nodes": [], "node_set": "",
            "scheduler": ",".join(schedulers), "why": f"{' and '.join(schedulers)} lists no such job of yours",
            "source": "scheduler"}


def unknown(job: str, why: str) -> dict:
    return {"job": job, "state": JobState.UNKNOWN.value, "nodes": [], "node_set": "", "scheduler": "", "why": why,
            "source": ""}


def answer(job: str, agents: Iterable[Agent], ask: Callable[[], dict], cluster: str = "") -> dict:
    """The rule "registrations first, the controller second": what the job's registered agents say its
    nodes are (:func:`from_agents`), else ``ask()`` (the scheduler's answer)."""
    return from_agents(job, agents, cluster) or ask()


class MasterJobNodes:
    """A user's master's lookup: its agents' registrations (:func:`answer`), else the fleet watcher's last
    answer, else one question per scheduler."""

    def __init__(self, fleet) -> None:
        self.fleet = fleet
        self._lock = threading.Lock()
        self._answers: dict[str, tuple[float, dict[str, JobInfo]]] = {}  # scheduler -> (when, job -> info)

    def schedulers(self, job: str, cluster: str = "") -> list[str]:
        """Whom to ask: the schedulers of the job's agents, else of any of the user's agents, else those
        whose commands are installed here (a job whose first agent has not registered yet)."""
        agents = [a for a in self.fleet.registry.all() if not cluster or a.reg.cluster == cluster]
        names = sorted({a.reg.scheduler for a in agents if same_job(a.reg.job, job)}
                       or {a.reg.scheduler for a in agents})
        names = [n for n in names if has_controller(n)]
        if names:
            return names
        return [n for n in ADAPTERS if has_controller(n) and any(shutil.which(c) for c in adapter_class(n).commands)]

    def user_jobs(self, scheduler: str, fresh: float = JOBS_FRESH) -> dict[str, JobInfo]:
        """The user's jobs as ``scheduler`` lists them, at most ``fresh`` seconds old (one question for
        every lookup within that time), or the last answer however old while the query cap is spent;
        DxflowError when there is none and it cannot be asked now."""
        with self._lock:  # one question at a time: lookups that come together share it
            kept = self._answers.get(scheduler)
            if kept and time.monotonic() - kept[0] <= fresh:
                return kept[1]
            if not QUERY_BUDGET.available():
                if kept:
                    return kept[1]
                raise DxflowError(f"the cap of {QUERY_BUDGET.per_minute:g} scheduler queries a minute is spent "
                                  "(controller_queries_per_minute)")
            jobs = {j.job: j for j in get_scheduler(scheduler).jobs(user=self.fleet.user)}
            self._answers[scheduler] = (time.monotonic(), jobs)
            return jobs

    def __call__(self, job: str) -> dict:
        cluster, _, job = job.rpartition("~")  # CLUSTER~JOB, as the CLI names a job of one cluster
        return answer(job, self.fleet.registry.all(), lambda: self.ask_scheduler(job, cluster), cluster)

    def ask_scheduler(self, job: str, cluster: str = "") -> dict:
        """The scheduler's answer: the watcher's, else one question per scheduler within the query cap."""
        names = self.schedulers(job, cluster)
        if not names:
            return unknown(job, "no scheduler with a controller is known here")
        watched = self.fleet.known_jobs()  # the watcher's last answer
        answers = [a for a in (found(job, name, watched.get(name, {}), self.fleet.user) for name in names) if a]
        if any(running(a) for a in answers):
            return next(a for a in answers if running(a))
        registered = any(same_job(a.reg.job, job) and a.state != "gone" for a in self.fleet.registry.all())
        whys = []
        for name in names:
            try:
                mine = found(job, name, self.user_jobs(name), self.fleet.user)
                if mine is None or registered and not mine["nodes"]:
                    # submitted, or given its nodes, since that answer (its agents are registering): asked
                    # once more, at most every 3 s
                    mine = found(job, name, self.user_jobs(name, fresh=3.0), self.fleet.user)
            except DxflowError as e:
                log.info("job %s: cannot ask %s for its nodes: %s", job, name, e)
                whys.append(f"{name}: {e}")
                continue
            if mine and mine["nodes"]:  # running, or starting (Slurm's CONFIGURING: its prologs run)
                return mine
            if mine:
                answers.insert(0, mine)
        if registered:
            # its agents run, yet no answer names its nodes: the answers predate its start (within the last
            # 3 s, or the query cap is spent); the watcher, which confirms agents with the same question, is
            # nudged to ask. "pending" stands meanwhile: the CLI asks again while it waits for the agents
            refresh = getattr(self.fleet, "refresh", None)
            if refresh is not None:
                refresh(metrics=False)
        if answers:
            return answers[0]
        return unknown(job, "; ".join(whys)) if whys else not_listed(job, names)


def running(answer: dict) -> bool:
    return answer["state"] == JobState.RUNNING.value and bool(answer["nodes"])


def init_app(app: Flask, fleet, lookup: Lookup | None = None) -> None:
    """The route, answered by ``lookup`` (default: the user's master's, :class:`MasterJobNodes`)."""
    ask = lookup or MasterJobNodes(fleet)

    @app.get("/api/jobs/<job>/nodes")
    def job_nodes(job: str):
        if not JOB_ID.fullmatch(job.replace("~", "_", 1)):
            raise UsageError(f"not a job id: {job!r}")
        return jsonify(ask(job))
