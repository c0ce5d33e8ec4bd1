"""The site service's answer to ``GET /api/jobs/JOB/nodes`` (:mod:`dxflow.master.jobnodes`): the job's
nodes as the *requesting* user's registered agents of it say (:func:`dxflow.master.jobnodes.answer`: the
rule is the master's, registrations first), else as its cluster's scheduler lists them among that user's jobs.

Only the requesting user's own agents count, an admin's request too. The question is the one the
service already asks for enrollments (:meth:`dxflow.site.query.ClusterJobs.jobs_of`: one user's jobs on
one cluster, kept a few seconds), asked as the request's user: another user's job is never in it, so it
is answered as a job that does not exist, whoever asks (an admin too: what an admin may see of another
user's job comes from its registered agents, as ``dxflow ls`` shows them).
"""

from __future__ import annotations

import logging

from dxflow.errors import DxflowError
from dxflow.master.jobnodes import Lookup, answer, found, not_listed, unknown
from dxflow.site.scope import split_job

log = logging.getLogger(__name__)


def lookup(fleet) -> Lookup:
    """``ask(job)`` for :func:`dxflow.master.jobnodes.init_app`, on the site's fleet (a SiteFleet)."""

    def ask(job: str) -> dict:
        cluster, job_id = split_job(job)
        user = fleet.current_user().name
        if cluster is not None and cluster not in fleet.config.clusters:
            return not_listed(job, [cluster])
        own = [a for a in fleet.registry.of_job(job) if a.reg.user == user]  # an admin sees others' too
        told = answer(job_id, own, lambda: from_scheduler(job, cluster, job_id, user, own), cluster or "")
        if told["source"] == "agents" and cluster is not None:
            told["job"] = f"{cluster}~{told['job']}"
        return told

    def from_scheduler(job: str, cluster: str | None, job_id: str, user: str, own: list) -> dict:
        if cluster is not None:
            clusters = [cluster]
        else:  # the clusters of the user's agents of the job, else every cluster of the site
            clusters = sorted({a.reg.cluster for a in own}) or sorted(fleet.config.clusters)
        whys = []
        for name in clusters:
            try:
                mine = found(job_id, name, fleet.jobs.jobs_of(name, user), user)
                if mine is None:  # submitted since the kept answer: asked once more
                    mine = found(job_id, name, fleet.jobs.jobs_of(name, user, fresh=1.0), user)
            except DxflowError as e:
                log.info("job %s of %s: cannot ask cluster %s for its nodes: %s", job, user, name, e)
                whys.append(f"{name}: {e}")
                continue
            if mine:
                return {**mine, "job": f"{name}~{mine['job']}" if cluster is not None else mine["job"],
                        "scheduler": getattr(fleet.config.clusters.get(name), "scheduler", ""), "cluster": name}
        return unknown(job, "; ".join(whys)) if whys else not_listed(job, clusters or ["no cluster"])

    return ask
