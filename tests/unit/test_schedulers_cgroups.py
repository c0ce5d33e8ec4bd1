"""The PBS, Torque and LSF adapters' data for the job's own cgroups on a node (issue #9), on fake
cgroup trees under tmp_path laid out as each scheduler lays out its own (sources in the adapters)."""

from __future__ import annotations

import json
from pathlib import Path

from dxflow.jobcgroup import JobCgroups
from dxflow.schedulers.base import HookJob
from dxflow.schedulers.lsf import LSF
from dxflow.schedulers.pbs import PBS, Torque

ALICE = dict(user="alice", uid=1001, gid=1001)


def _job(scheduler: str, job: str) -> HookJob:
    return HookJob(scheduler, "head", job, "n1", ALICE["user"], ALICE["uid"], ALICE["gid"])


def _v1_tree(root: Path, controllers: tuple[str, ...]) -> Path:
    """A cgroup v1 host: one tree per controller, no cgroup.controllers at the top."""
    for c in controllers:
        (root / c).mkdir(parents=True)
        (root / c / "tasks").write_text("")
    return root


def _make(root: Path, rel: str, pids: str = "") -> Path:
    """A cgroup folder as the scheduler makes it; ``pids``: what its cgroup.procs lists."""
    d = root / rel
    d.mkdir(parents=True)
    (d / "cgroup.procs").write_text(pids)
    return d


def _pbs_home(tmp_path: Path, hk: str | None, cf: dict | None = None) -> dict[str, str]:
    """$PBS_HOME with MoM's copy of the cgroup hook (mom_priv/hooks/pbs_cgroups.HK/.CF)."""
    hooks = tmp_path / "pbs_home" / "mom_priv" / "hooks"
    hooks.mkdir(parents=True)
    if hk is not None:
        (hooks / "pbs_cgroups.HK").write_text(hk)
    if cf is not None:
        (hooks / "pbs_cgroups.CF").write_text(json.dumps(cf))
    return {"PBS_HOME": str(tmp_path / "pbs_home")}


def _pbs(tmp_path: Path, root: Path, hk: str | None = "type=pbs\nevent=execjob_begin\n",
         cf: dict | None = None) -> PBS:
    sched = PBS(_pbs_home(tmp_path, hk, cf))
    sched.cgroup_root = root
    return sched


def test_pbs_v1_finds_the_jobs_cgroups_once_made_and_never_another_jobs(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path / "cg", ("memory", "cpuset", "cpu,cpuacct", "freezer", "systemd"))
    (root / "cpuacct").symlink_to("cpu,cpuacct")
    sched = _pbs(tmp_path, root)
    plan = sched.job_cgroups(_job("pbs", "7.head"))
    assert isinstance(plan, JobCgroups) and not plan.v2 and plan.wait == PBS.cgroup_wait
    assert plan.ready() is None                                   # execjob_begin has not run yet
    other = _make(root, "memory/pbs_jobs.service/jobid/8.head", "4242\n")  # another job's shell
    assert plan.ready() is None
    base = "pbs_jobs.service/jobid/7.head"
    made = [_make(root, f"{c}/{base}") for c in ("memory", "cpuset", "cpuacct", "systemd")]
    ready = plan.ready()  # made, limits set, no process yet (a sister host may never get one): ready
    assert ready == made                                          # memory first; no devices/hugetlb made
    assert other not in ready and all("7.head" in str(p) for p in ready)
    assert JobCgroups.from_dict(plan.to_dict()) == plan           # as the launcher gets it
    other_plan = sched.job_cgroups(_job("pbs", "9.head"))
    assert other_plan is not None and other_plan.ready() is None  # no cgroup of job 9 here


def test_pbs_v1_with_memory_disabled_is_ready_by_cpuset(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path / "cg", ("cpuset", "cpuacct"))
    plan = _pbs(tmp_path, root).job_cgroups(_job("pbs", "7.head"))
    assert plan is not None
    cpuset = _make(root, "cpuset/pbs_jobs.service/jobid/7.head", "55\n")
    cpuacct = _make(root, "cpuacct/pbs_jobs.service/jobid/7.head")
    assert plan.ready() == [cpuset, cpuacct]


def test_pbs_uses_the_hooks_cgroup_prefix(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path / "cg", ("memory",))
    plan = _pbs(tmp_path, root, cf={"cgroup_prefix": "site_jobs"}).job_cgroups(_job("pbs", "7.head"))
    assert plan is not None
    default = _make(root, "memory/pbs_jobs.service/jobid/7.head", "1\n")
    assert plan.ready() is None                                   # not where this site's hook puts it
    site = _make(root, "memory/site_jobs.service/jobid/7.head", "1\n")
    assert plan.ready() == [site] and default not in plan.ready()
    # a prefix that could leave the tree is not used
    assert _pbs(tmp_path / "x", root, cf={"cgroup_prefix": "../etc"}).cgroup_prefix() == "pbs_jobs"


def test_pbs_v2_finds_the_jobs_cgroup_by_its_exact_id(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu memory\n")
    plan = _pbs(tmp_path, root).job_cgroups(_job("pbs", "7.head"))
    assert plan is not None and plan.v2
    _make(root, "pbs_jobs.service/jobs/8.head", "9\n")
    _make(root, "pbs_jobs.service/jobs/7.1", "9\n")             # a name that is not the job id: never guessed
    assert plan.ready() is None
    mine = _make(root, "pbs_jobs.service/jobs/7.head")
    assert plan.ready() == [mine]                                 # v2: joined once it exists


def test_pbs_waits_only_when_mom_has_the_cgroup_hook_enabled(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path / "cg", ("memory",))
    job = _job("pbs", "7.head")
    missing = _pbs(tmp_path / "a", root, hk=None)                # no cgroup hook on this MoM
    assert missing.cgroup_setup() == (root, 0.0) and missing.job_cgroups(job) is None
    off = _pbs(tmp_path / "b", root, hk="type=pbs\nenabled=false\n")
    assert off.cgroup_setup() == (root, 0.0) and off.job_cgroups(job) is None
    assert _pbs(tmp_path / "c", root, hk="enabled=true\n").cgroup_setup() == (root, PBS.cgroup_wait)


def test_torque_v1_finds_the_jobs_cgroups_and_never_another_jobs(tmp_path: Path) -> None:
    root = _v1_tree(tmp_path / "cg", ("memory", "cpuset", "cpuacct", "devices"))
    sched = Torque({})
    sched.cgroup_root = root
    job = _job("torque", "12.head.example")
    assert sched.cgroup_setup() == (root, 0.0) and sched.job_cgroups(job) is None  # Torque without cgroups
    for c in ("memory", "cpuset", "cpuacct", "devices"):
        (root / c / "torque").mkdir()                             # pbs_mom's init_torque_cgroups
    plan = sched.job_cgroups(job)
    assert plan is not None and not plan.v2 and plan.wait == Torque.cgroup_wait
    other = _make(root, "memory/torque/13.head.example", "77\n")
    assert plan.ready() is None
    made = [_make(root, f"{c}/torque/12.head.example") for c in ("memory", "cpuset", "cpuacct", "devices")]
    assert plan.ready() == made and other not in plan.ready()   # made: a sister host's hold no process
    (root / "cgroup.controllers").write_text("")                 # Torque has no v2 layout: nothing to wait for
    assert sched.job_cgroups(job) is None


def test_lsf_declares_no_cgroup_to_join_its_hook_runs_as_the_user(tmp_path: Path) -> None:
    sched = LSF({})
    assert sched.job_cgroup_v1 == () and sched.job_cgroup_v2 == ()
    assert sched.job_cgroups(_job("lsf", "5")) is None
