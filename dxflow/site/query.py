"""What each cluster's scheduler says: one user's jobs, asked in a process of its own
(``python -m dxflow.site.query SCHEDULER USER``), and whether a job runs on a node (:class:`ClusterJobs`).

The site service serves several clusters, each with its own scheduler configuration (``SLURM_CONF``,
its commands' folder: ``[clusters.NAME]`` in site.toml). The scheduler adapters take their commands'
environment from the process, so each question runs in a child with that cluster's environment
instead of changing the service's own (which every thread shares). It prints the jobs as JSON.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from dataclasses import asdict

from dxflow.errors import DxflowError, SchedulerError
from dxflow.schedulers import JobInfo, JobState, get_scheduler
from dxflow.site.config import ClusterConfig, SiteServiceConfig

log = logging.getLogger(__name__)

#: seconds a question may take (the scheduler's own commands time out at 30 s)
TIMEOUT = 60.0
#: Seconds a cluster's answer about one user's jobs is used again (enrollments of one job's nodes come together).
JOBS_FRESH = 5.0


def user_jobs(cluster: ClusterConfig, user: str) -> list[JobInfo]:
    """The jobs of ``user`` on ``cluster``, as its scheduler reports them; SchedulerError if it cannot say."""
    env = cluster.command_env()
    if cluster.scheduler_bin:  # the cluster's own commands, not the folder dxflow.toml names for this host's
        env["DXFLOW_SITE_CONFIG"] = "/dev/null"
    argv = [sys.executable, "-m", "dxflow.site.query", cluster.scheduler, user]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        raise SchedulerError(f"cluster {cluster.name}: no answer from its scheduler within {TIMEOUT:.0f} s",
                             argv=argv) from e
    if proc.returncode != 0:
        raise SchedulerError(f"cluster {cluster.name}: cannot list the jobs of {user}: "
                             f"{proc.stderr.strip()[-500:] or 'exit ' + str(proc.returncode)}", argv=argv)
    try:
        return [JobInfo(**{**item, "state": JobState(item["state"])}) for item in json.loads(proc.stdout)]
    except (ValueError, TypeError, KeyError) as e:
        raise SchedulerError(f"cluster {cluster.name}: unreadable answer about {user}'s jobs: {e}") from e


class ClusterJobs:
    """What each cluster's scheduler says about one user's jobs, asked at most once at a time per cluster
    and user and kept :data:`JOBS_FRESH` seconds: the enrollments of one job's nodes share one question."""

    def __init__(self, config: SiteServiceConfig) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._answers: dict[tuple[str, str], tuple[float, dict[str, JobInfo]]] = {}
        self._locks: dict[tuple[str, str], threading.Lock] = {}

    def cached(self, cluster: str, user: str) -> dict[str, JobInfo]:
        """The last answer, however old ({} when none): for ordering a job's nodes, never for a decision."""
        answer = self._answers.get((cluster, user))
        return answer[1] if answer else {}

    def jobs_of(self, cluster: str, user: str, fresh: float = JOBS_FRESH) -> dict[str, JobInfo]:
        """``user``'s jobs on ``cluster`` (an answer at most ``fresh`` seconds old); SchedulerError if unknown."""
        asked = time.monotonic()
        with self._lock:
            lock = self._locks.setdefault((cluster, user), threading.Lock())
        with lock:  # many nodes of one job enroll at once: one question answers them all
            cached = self._answers.get((cluster, user))
            if cached and (asked - cached[0] <= fresh or cached[0] >= asked):
                return cached[1]
            jobs = {j.job: j for j in user_jobs(self.config.cluster(cluster), user)}
            self._answers[(cluster, user)] = (time.monotonic(), jobs)
            return jobs

    def job_runs(self, cluster: str, job: str, node: str, user: str) -> bool:
        """Whether the scheduler of ``cluster`` says ``user``'s job ``job`` runs (or is starting) on ``node``:
        the gateway's question before it enrolls an agent. False when it cannot be asked."""
        try:
            info = self.jobs_of(cluster, user).get(job)
            if info is None or node not in info.nodes:  # a job just allocated: ask once more, not from the cache
                info = self.jobs_of(cluster, user, fresh=0.0).get(job)
        except DxflowError as e:
            log.warning("cannot confirm job %s of %s on %s/%s: %s", job, user, cluster, node, e)
            return False
        if info is None or info.user != user or info.state not in (JobState.RUNNING, JobState.PENDING):
            log.warning("refused: %s says job %s of %s is %s", cluster, job, user,
                        info.state.value if info else "unknown")
            return False
        if node not in info.nodes:
            log.warning("refused: %s says job %s runs on %s, not on %s", cluster, job,
                        ",".join(info.nodes) or "no node", node)
            return False
        return True


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m dxflow.site.query SCHEDULER USER", file=sys.stderr)
        return 2
    scheduler, user = argv
    try:
        jobs = get_scheduler(scheduler).jobs(user=user)
    except DxflowError as e:
        print(str(e), file=sys.stderr)
        return 1
    print(json.dumps([{**asdict(j), "state": j.state.value} for j in jobs]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
