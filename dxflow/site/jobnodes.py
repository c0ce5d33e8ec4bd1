"""The site service's answer to ``GET /api/jobs/JOB/nodes`` (:mod:`dxflow.master.jobnodes`): the job's
nodes as its cluster's scheduler lists them among the *requesting* user's jobs.

The question is the one the service already asks for enrollments (:meth:`dxflow.site.query.ClusterJobs.jobs_of`:
one user's jobs on one cluster, kept a few seconds), asked as the request's user: another user's job is
never in it, so it is answered as a job that does not exist, whoever asks (an admin too: what an admin
may see of another user's job comes from its registered agents, as ``dxflow ls`` shows them).
"""

from __future__ import annotations

import logging

from dxflow.errors import DxflowError
from dxflow.master.jobnodes import Lookup, found, not_listed, unknown
from dxflow.site.scope import split_job

log = logging.getLogger(__name__)


def lookup(fleet) -> Lookup:
    """``ask(job)`` for :func:`dxflow.master.jobnodes.init_app`, on the site's fleet (a SiteFleet)."""

    def ask(job: str) -> dict:
        cluster, job_id = split_job(job)
        user = fleet.current_user().name
        if cluster is not None:
            clusters = [cluster]
        else:  # the clusters of the job's agents the user sees, else every cluster of the site
            clusters = sorted({a.reg.cluster for a in fleet.registry.of_job(job)}) or sorted(fleet.config.clusters)
        if cluster is not None and cluster not in fleet.config.clusters:
            return not_listed(job, [cluster])
        whys = []
        for name in clusters:
            try:
                answer = found(job_id, name, fleet.jobs.jobs_of(name, user), user)
                if answer is None:  # submitted since the kept answer: asked once more
                    answer = found(job_id, name, fleet.jobs.jobs_of(name, user, fresh=1.0), user)
            except DxflowError as e:
                log.info("job %s of %s: cannot ask cluster %s for its nodes: %s", job, user, name, e)
                whys.append(f"{name}: {e}")
                continue
            if answer:
                return {**answer, "job": f"{name}~{answer['job']}" if cluster is not None else answer["job"],
                        "scheduler": getattr(fleet.config.clusters.get(name), "scheduler", ""), "cluster": name}
        return unknown(job, "; ".join(whys)) if whys else not_listed(job, clusters or ["no cluster"])

    return ask
