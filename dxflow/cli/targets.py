"""Where a command goes: ``JOB[:NODES]`` read once for every command (exec, logs, cp, info, ports,
shell, forward, metrics, console), in two steps.

1. :func:`parse` reads the text alone and contacts nothing: a malformed target, a job id that is not
   one (``abc:n1``), a bad node set (``12:n[1-``) or a port out of range is a :class:`UsageError`
   (exit 2) before the master is asked anything.
2. :func:`resolve` asks the master which nodes that means: ``all`` (or ``*``) is every node of the
   job *as the scheduler allocated it* (the master's ``/api/jobs/JOB/nodes``, :mod:`dxflow.master.jobnodes`:
   the node set the prolog gave each agent's registration, else the scheduler's list), not only those
   whose agent has registered so far, as ``srun``, ``pdsh`` and ``clush`` take it; a node set must name
   nodes of the job. Nodes of the job whose agent is not registered yet (a job
   just started) are waited for, up to ``wait`` seconds (:data:`WAIT`), with one line on stderr;
   those still without an agent then come back in :attr:`Resolved.missing`, with why, for the
   command to report as failed while it runs on the others. Where neither a registration nor the
   scheduler can say (agents of an older release and no controller, its query cap spent, an older
   master), the registered agents are the job's nodes, and stderr says so.
   A job whose agents are gone is named as ended, one with no agent at all as not running; a bare
   node name (``dxflow shell n2``) is the one job of the user that runs there.

Node sets are ClusterShell's (:mod:`dxflow.schedulers.hostlist`): ``n[1-4,7]``, ``n1,n3``, and
clush's ``n[1-8]!n3``. Several nodes are always printed folded (:func:`fold`).
"""

from __future__ import annotations

import datetime as dt
import re
import sys
import time
from typing import Any, NamedTuple

from dxflow.cli.util import AGENT_WAIT
from dxflow.errors import NotFound, UsageError
from dxflow.schedulers.hostlist import HOST, fold, node_set, sort_hosts

#: a job id as the batch schedulers write it. Slurm (squeue(1) %i): ``1234``, an array task
#: ``1234_5``, a heterogeneous component ``1234+1``. PBS Pro / Torque (qstat(1B)):
#: ``sequence[.server]``, an array ``1234[]`` and its subjob ``1234[5]``. LSF (bjobs(1)): ``1234``,
#: an array element ``1234[5]``. All start with the number the scheduler gave.
JOB_ID = re.compile(r"^\d+(?:_\d+|\+\d+|\[\d*\])?(?:\.[A-Za-z0-9][A-Za-z0-9.-]*)?$")
#: how the user names every node of the job
ALL = ("all", "*")
#: seconds a target the master has not seen yet is looked for again (an agent that just registered)
LOOK_AGAIN = 3.0
#: seconds a command waits for the agents of a starting job's nodes (``--wait``)
WAIT = AGENT_WAIT
#: seconds between two looks at the master's list of agents while waiting, and between two questions
#: about a job the scheduler still lists as pending (the master keeps its answer 5 s)
WAIT_STEP = 0.5
ASK_PENDING = 3.0
#: seconds a job with no agent at all is looked for while the scheduler cannot say (its query cap spent)
UNSURE = 12.0
#: why a node of the job is missing when its agent never registered
NO_AGENT = "no agent registered"
#: seconds after its first agent started that a job counts as starting: later, a node still without an
#: agent is reported at once, not waited for (its agent failed; waiting would only hold up every command)
STARTING = 120.0
FORMS = "JOB, JOB:NODE, JOB:NODESET (n[1-4,7]) or JOB:all"
#: a cluster's name in ``CLUSTER/JOB`` (as the scheduler hooks report it: Slurm's ClusterName)
CLUSTER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: ``CLUSTER/JOB`` on the command line; ``CLUSTER~JOB`` too (where a "/" would be read as a path: `dxflow
#: cp`), which is also how the site service's API names it
CLUSTER_SEPS = ("/", "~")
API_SEP = "~"


class Target(NamedTuple):
    """A target as written, checked but not yet looked up."""

    text: str
    #: the job id; with ``bare``, a word that is no job id: a by-hand job's name or a node name
    job: str
    #: None: the job's first node; "all"; or the node set, folded
    nodes: str | None = None
    bare: bool = False
    #: the cluster named as ``CLUSTER/JOB`` (a site service serving several clusters); None: any
    cluster: str | None = None

    @property
    def several(self) -> bool:
        """Whether it may name more than one node (``all``, or a set of two or more)."""
        return self.nodes == "all" or (self.nodes is not None and len(node_set(self.nodes)) > 1)


class Resolved(NamedTuple):
    """The job and the nodes a target names, once the master was asked."""

    job: str
    #: node names in NodeSet order whose agent is registered; [None] for the job's first node (the master
    #: picks it)
    nodes: list[Any]
    #: nodes of the job the target names that have no agent (after the wait): (node, why), in node order
    missing: tuple[tuple[str, str], ...] = ()

    @property
    def where(self) -> str:
        """``job 12 node n[1-2]`` as the user reads it."""
        named = [n for n in self.nodes if n]
        return f"job {self.job}" + (f" node {fold(named)}" if named else "")


def parse(text: str, *, several: bool = True, command: str = "") -> Target:
    """``JOB[:NODES]`` -> :class:`Target`; UsageError (exit 2) when it is not one. With
    ``several=False`` (a command that goes to one node: shell, forward, an upload) a set of
    several nodes or ``all`` is refused too."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError(f"no target given: expected {FORMS}")
    if any(c.isspace() for c in text):
        raise UsageError(f"{text!r}: a target has no spaces; expected {FORMS}")
    job, sep, nodes = text.partition(":")
    if sep and not nodes:
        raise UsageError(f"{text!r}: nothing after ':'; expected {FORMS}")
    if ":" in nodes:
        raise UsageError(f"{text!r}: too many ':'; expected {FORMS}")
    return parse_parts(text, job, nodes or None, several=several, command=command)


def parse_parts(text: str, job: str, nodes: str | None, *, several: bool = True, command: str = "") -> Target:
    """A target from its job and node parts, already split (``dxflow cp`` splits ``JOB:NODES:PATH``)."""
    if not job:
        raise UsageError(f"{text!r}: the job is missing before ':'; expected {FORMS}")
    cluster = None
    for sep in CLUSTER_SEPS:
        if sep in job:
            cluster, _, job = job.partition(sep)
            if not CLUSTER.match(cluster) or not JOB_ID.match(job):
                raise UsageError(f"{text!r}: expected CLUSTER/JOB with a cluster name (letters, digits, . _ -) "
                                 "and a job id (such as 1234)")
            break
    bare = not JOB_ID.match(job)
    if bare:
        if not HOST.match(job):
            raise UsageError(f"{text!r}: {job!r} is not a job id (a number such as 1234, 1234_5, 1234[5], "
                             "1234.server) nor a node name")
        if nodes is not None and job not in by_hand_jobs():
            raise UsageError(f"{text!r}: {job!r} is not a job id: job ids are numbers such as 1234 "
                             "(1234_5 for an array task, 1234.server on PBS)")
    folded: str | None = None
    if nodes is not None:
        folded = "all" if nodes in ALL else fold(node_set(nodes))
    target = Target(text, job, folded, bare, cluster)
    if not several and target.several:
        what = f"`dxflow {command}`" if command else "this command"
        raise UsageError(f"{text!r}: {what} goes to one node; name one ({job}:NODE)")
    return target


def by_hand_jobs() -> set[str]:
    """Names of the user's jobs started by hand (``dxflow agent`` without a scheduler), whose names
    are the user's own words rather than ids: read from the user's registrations, not asked of anyone."""
    from dxflow import registration
    from dxflow.layout import UserLayout

    try:
        regs = registration.read_all(UserLayout.of().fleet_dir)
    except OSError:
        return set()
    return {r.job for r in regs if not JOB_ID.match(r.job)}


def check_port(text: str, what: str = "port") -> int:
    """A TCP port number 1-65535 from the text; UsageError (exit 2) otherwise."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise UsageError(f"{what} {text!r}: expected a number from 1 to 65535")
    return int(text)


def port_pair(text: str) -> tuple[int | None, int]:
    """``PORT`` or ``LPORT:PORT`` as in ``ssh -L`` -> (LPORT or None, PORT)."""
    local, sep, remote = text.rpartition(":")
    if sep and (":" in local or not local):
        raise UsageError(f"{text!r}: expected PORT or LPORT:PORT")
    return (check_port(local, "local port") if sep else None), check_port(remote)


# -- the master's word ---------------------------------------------------------------------------------

def agents(client, refresh: bool = False) -> list[dict]:
    """The master's list of the user's agents, the gone ones too."""
    return client.json("GET", "/api/agents?all=1" + ("&refresh=1" if refresh else ""), timeout=30)


def job_nodes(client, job: str) -> dict | None:
    """The master's word on the job's nodes (:meth:`dxflow.master.client.JsonRequests.job_nodes`: what its
    registered agents say, else the scheduler); None when the master cannot say (an older master without
    the route, the question failed)."""
    from dxflow.errors import DxflowError

    try:
        answer = client.job_nodes(job)
    except DxflowError:
        return None
    return answer if isinstance(answer, dict) else None


def resolve(client, target: Target, wait: float = WAIT) -> Resolved:
    """The job and nodes ``target`` names, from the master's list of agents and, for named nodes (a
    set, ``all``) or a job without an agent yet, the scheduler's list of the job's nodes. Looked for
    again for up to LOOK_AGAIN seconds when the job or a node is not in the list yet (an agent that
    has just registered); nodes of a running (or pending) job without an agent are waited for up to
    ``wait`` seconds. NotFound (exit 5) names a job that ended, one that does not run, nodes that are
    not the job's, and the one node a one-node target names when its agent never came."""
    started = time.monotonic()
    listing = agents(client)
    sched: dict | None = None
    asked_at = float("-inf")
    said = False
    looks = 0
    while True:
        now = time.monotonic()
        if _wants_scheduler(listing, target) and (sched is None or sched.get("state") in ("pending", "unknown")
                                                  and now - asked_at >= ASK_PENDING):
            answer, asked_at = job_nodes(client, _api_job(listing, target)) or {}, now
            # a pending job whose next answer is "unknown" (the query cap spent) is still starting
            if not (sched and sched.get("state") == "pending" and answer.get("state") == "unknown"):
                sched = answer
        try:
            found = _resolve(listing, target, sched)
        except NotFound:
            # no agent of the job at all, and the scheduler could not say (its query cap spent, shared by the
            # user's commands): asked again a little longer (the cap refills one question in 10 s by default)
            unsure = ((sched or {}).get("state") == "unknown" and now - started < min(wait, UNSURE)
                      and not any(same_job(a, target.job) for a in listing))
            if now - started >= LOOK_AGAIN and not unsure:
                raise
        else:
            waiting = _waiting(found, sched)
            if waiting is None or now - started >= wait or not _starting(listing, target.job):
                said_nothing = sched or {}
                if target.several and said_nothing.get("state") == "unknown":  # never silently fewer nodes
                    print(f"dxflow: job {found.job}: the scheduler could not say which nodes it has "
                          f"({said_nothing.get('why') or 'no answer'}): going by the nodes whose agent registered, "
                          f"{fold(n for n in found.nodes if n)}", file=sys.stderr, flush=True)
                return _final(target, found, wait if said else 0.0)
            if not said:
                print(f"dxflow: waiting for agents on {waiting} (job {found.job} is starting; up to {wait:g} s)...",
                      file=sys.stderr, flush=True)
                said = True
        time.sleep(WAIT_STEP if said else 0.3)
        looks += 1
        # every few looks the master is asked to read its folder again now (an agent that just registered)
        listing = agents(client, refresh=not said or looks % 4 == 0)


def _wants_scheduler(listing: list[dict], target: Target) -> bool:
    """Whether the scheduler's list of the job's nodes is needed: for named nodes (a set, ``all``, one
    node), or when no agent of the job is registered yet; not for a bare node name or ``JOB`` alone
    with agents (those ask nothing of the scheduler)."""
    if target.bare and not any(same_job(a, target.job) for a in listing):
        return False
    live = any(same_job(a, target.job) and a["state"] != "gone" for a in listing)
    return target.nodes is not None or not live


def _api_job(listing: list[dict], target: Target) -> str:
    """The job's id as the master's API takes it (``CLUSTER~JOB`` where it must be)."""
    try:
        _, job = _of_cluster(listing, target)
    except UsageError:
        job = target.job
    if target.cluster and API_SEP not in job:
        return f"{target.cluster}{API_SEP}{job}"
    return job


def _starting(listing: list[dict], job: str) -> bool:
    """Whether the job is still starting: no live agent of it yet, or its first one started less than
    STARTING seconds ago (an agent listed without its start time counts as just started)."""
    starts = []
    for a in listing:
        if same_job(a, job) and a["state"] != "gone":
            try:
                starts.append(dt.datetime.fromisoformat(str(a["started"]).replace("Z", "+00:00")).timestamp())
            except (KeyError, ValueError):
                return True
    return not starts or time.time() - min(starts) < STARTING


def _waiting(found: Resolved, sched: dict | None) -> str | None:
    """The nodes still to wait for, folded ("the job's first node" when it has no agent at all and the
    scheduler names no node yet); None when there is nothing to wait for."""
    waiting = [n for n, why in found.missing if why == NO_AGENT]
    if waiting:
        return fold(waiting) if all(waiting) else "the job's nodes"
    return None


def _final(target: Target, found: Resolved, waited: float) -> Resolved:
    """What the wait ended with: the reasons of missing nodes say how long was waited; a target that
    names one node (or the job's first) and has no agent there is NotFound."""
    after = f" within {waited:g} s" if waited else ""
    if any(not n for n, _ in found.missing) and found.nodes:  # still no node list: the agents' nodes it is
        found = found._replace(missing=tuple((n, why) for n, why in found.missing if n))
    if any(not n for n, _ in found.missing):
        raise NotFound(f"job {found.job} has not started yet: the scheduler lists it as pending{after}; "
                       "try again once it runs (see `squeue`/`qstat`/`bjobs`)")
    missing = tuple((n, why + after if why == NO_AGENT else why) for n, why in found.missing)
    if missing and not found.nodes and (target.nodes is None or not target.several):
        node, why = missing[0]
        hint = (" (the job runs there, but dxflow's agent has not registered: see `dxflow ls -a`)"
                if why.startswith(NO_AGENT) else "")
        raise NotFound(f"job {found.job} on {node}: {why}{hint}")
    return found._replace(missing=missing)


def same_job(item: dict, job: str) -> bool:
    """Whether a listed agent is of ``job``: its id, or its PBS id's number (``12`` for ``12.server``, as
    qstat takes it)."""
    return item["job"] == job or ("." not in job and item["job"].split(".", 1)[0] == job)


def _of_cluster(listing: list[dict], target: Target) -> tuple[list[dict], str]:
    """The listed agents of the target's job, and the job's id as the API takes it: ``CLUSTER~JOB``
    where the bare id would be ambiguous (two clusters of a site service have it), else the id.
    UsageError (exit 2) for a bare id that jobs of two clusters have (running ones first: an ended job's
    agents, still listed, do not make a running one ambiguous)."""
    mine = [a for a in listing if same_job(a, target.job)
            and (target.cluster is None or a.get("cluster") == target.cluster)]
    running = sorted({a.get("cluster") or "" for a in mine if a["state"] != "gone"})
    clusters = running or sorted({a.get("cluster") or "" for a in mine})
    if len(clusters) > 1:
        raise UsageError(f"job {target.job} is on several clusters ({', '.join(clusters)}): name one as "
                         f"CLUSTER/JOB ({clusters[0]}/{target.job})")
    mine = [a for a in mine if (a.get("cluster") or "") in clusters]
    ids = sorted({a["job"] for a in mine if a["state"] != "gone"} or {a["job"] for a in mine})
    if not ids:
        return [], target.job
    mine = [a for a in mine if a["job"] == ids[0]]
    if len({a.get("cluster") for a in listing if a["job"] == ids[0]}) > 1:
        return mine, f"{clusters[0]}{API_SEP}{ids[0]}"  # the bare id is another cluster's job's too
    return mine, ids[0]


def _resolve(listing: list[dict], target: Target, sched: dict | None = None) -> Resolved:
    """The target's job and nodes from the master's list of agents and (``sched``, when not None) the
    scheduler's answer about the job's nodes: a running job's nodes are the scheduler's; those without a
    registered agent are :attr:`Resolved.missing` (``NO_AGENT``, or their agent is gone)."""
    if target.bare and not any(same_job(a, target.job) for a in listing):
        return _on_node(listing, target.job, target)
    ours, job = _of_cluster(listing, target)
    live = [a for a in ours if a["state"] != "gone"]
    gone = [a for a in ours if a["state"] == "gone"]
    state = (sched or {}).get("state")
    # a running job's nodes, or a starting one's (Slurm's CONFIGURING, while its prologs start the agents)
    listed = sort_hosts(str(n) for n in (sched or {}).get("nodes") or ()) if state in ("running", "pending") else []
    if not live and not gone and (listed or state == "pending"):  # starting: no agent has registered yet
        if target.nodes is None:
            return Resolved(job, [], ((listed[0] if listed else "", NO_AGENT),))
        if not listed:  # pending: no node to name yet
            return Resolved(job, [], (("", NO_AGENT),))
    elif not live:
        if gone:
            why = sorted({a.get("detail") or "stopped" for a in gone})
            raise NotFound(f"job {job} has ended: its agents on {fold(a['node'] for a in gone)} are gone "
                           f"({'; '.join(why)})")
        raise NotFound(f"job {job} is not running: no agent of it is registered (it ended a while ago, never "
                       "existed, is not yours, or runs without dxflow); see `dxflow ls -a`")
    have = sort_hosts(a["node"] for a in live)
    if target.nodes is None:
        return Resolved(job, [None])
    if state == "pending" and not listed:  # an answer older than the agents: the job is starting, nodes unknown
        wanted = have if target.nodes == "all" else [n for n in node_set(target.nodes) if n in have]
        return Resolved(job, wanted, (("", NO_AGENT),))
    nodes = listed or have  # the scheduler's list; the agents' where it cannot say
    wanted = nodes if target.nodes == "all" else node_set(target.nodes)
    foreign = [n for n in wanted if n not in nodes]
    if foreign:
        ended = [n for n in foreign if any(a["node"] == n for a in gone)]
        note = f" (its agent on {fold(ended)} is gone)" if ended else ""
        raise NotFound(f"job {job} runs on {fold(nodes)}: {fold(foreign)} is not one of its nodes{note}")
    ended_why = {a["node"]: f"its agent is gone ({a.get('detail') or 'stopped'})" for a in gone}
    return Resolved(job, [n for n in wanted if n in have],
                    tuple((n, ended_why.get(n, NO_AGENT)) for n in wanted if n not in have))


def _on_node(listing: list[dict], node: str, target: Target) -> Resolved:
    """A bare node name: the one job of the user that runs on it."""
    jobs = sorted({a["job"] for a in listing if a["node"] == node and a["state"] != "gone"})
    if not jobs:
        raise NotFound(f"{node!r}: none of your jobs runs on a node of that name (nor is it a job id); "
                       "see `dxflow ls`")
    if len(jobs) > 1:
        raise UsageError(f"{node!r}: several of your jobs run on {node}: {', '.join(jobs)}; name one "
                         f"({jobs[0]}:{node})")
    return Resolved(jobs[0], [node])


def one(client, text: str, command: str = "") -> tuple[str, str | None]:
    """Parse and resolve a target that goes to one node: (job, node or None for the job's first)."""
    r = resolve(client, parse(text, several=False, command=command))
    return r.job, r.nodes[0]
