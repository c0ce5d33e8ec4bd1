"""dxflow.jobcgroup on this machine's real cgroup trees, dxflow.locks, and the Slurm adapter's cgroup data."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dxflow import jobcgroup
from dxflow.locks import locked
from dxflow.schedulers.base import HookJob
from dxflow.schedulers.pbs import PBS, Torque
from dxflow.schedulers.slurm import Slurm, read_conf

FORK_HOPPER = "import os\nwhile True:\n    if os.fork():\n        os._exit(0)\n"


def _writable_tree() -> Path | None:
    h = jobcgroup.hierarchies()
    base = h.v2 or h.v1.get("freezer")
    return base if base and os.geteuid() == 0 and os.access(base, os.W_OK) else None


needs_cgroups = pytest.mark.skipif(_writable_tree() is None, reason="needs root and a writable cgroup tree")


@pytest.fixture
def cg():
    base = _writable_tree()
    assert base is not None
    path = base / jobcgroup.OWN_DIR / f"unit-test.{os.getpid()}"
    jobcgroup.create(path)
    yield path
    jobcgroup.kill(path, timeout=5)
    jobcgroup.remove(path)


def _start_in(cg: Path, code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code], preexec_fn=lambda: jobcgroup.join(cg),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def test_hierarchies_of_a_pure_v2_and_a_hybrid_host(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cgroup.controllers").write_text("cpu memory\n")
    assert jobcgroup.hierarchies(v2) == jobcgroup.Hierarchies(v2=v2)
    assert jobcgroup.own_cgroup(jobcgroup.hierarchies(v2), "c.1.n1") == v2 / "dxflow" / "c.1.n1"
    hybrid = tmp_path / "hybrid"
    for name in ("unified", "freezer", "cpu,cpuacct", "systemd"):
        (hybrid / name).mkdir(parents=True)
    (hybrid / "unified" / "cgroup.controllers").write_text("")
    for name in ("freezer", "cpu,cpuacct", "systemd"):
        (hybrid / name / "tasks").write_text("")
    (hybrid / "cpu").symlink_to("cpu,cpuacct")
    h = jobcgroup.hierarchies(hybrid)
    assert h.v2 == hybrid / "unified" and not h.pure_v2
    assert h.v1["cpu"] == h.v1["cpuacct"] == hybrid / "cpu,cpuacct" and h.v1["freezer"] == hybrid / "freezer"
    # the v2 tree is preferred for dxflow's own cgroup: it is killed without any controller
    assert jobcgroup.own_cgroup(h, "c.1.n1") == hybrid / "unified" / "dxflow" / "c.1.n1"
    assert jobcgroup.own_cgroup(jobcgroup.Hierarchies(v1={"freezer": hybrid / "freezer"}), "a") == \
        hybrid / "freezer" / "dxflow" / "a"
    assert jobcgroup.own_cgroup(jobcgroup.Hierarchies(), "a") is None


def test_job_cgroups_fill_the_slurm_templates(tmp_path: Path) -> None:
    v1 = jobcgroup.job_cgroups(tmp_path, Slurm.job_cgroup_v1, Slurm.job_cgroup_v2, 10, job="7", uid="1001",
                               user="alice", node="n1")
    assert v1 is not None and not v1.v2
    plain, per_node = v1.groups  # CgroupPrepend /slurm, or /slurm_%n in a build for several slurmd (Debian's)
    assert plain[0] == str(tmp_path / "freezer/slurm/uid_1001/job_7/step_extern")
    assert per_node[0] == str(tmp_path / "freezer/slurm_n1/uid_1001/job_7/step_extern")
    assert str(tmp_path / "memory/slurm_n1/uid_1001/job_7/step_extern") in per_node
    assert v1.ready() is None                          # not made yet
    for d in per_node[:3]:
        Path(d).mkdir(parents=True)
    assert v1.ready() is None                          # made, but the extern step has no process yet
    (Path(per_node[0]) / "cgroup.procs").write_text("123\n")
    assert v1.ready() == [Path(d) for d in per_node[:3]]
    assert jobcgroup.JobCgroups.from_dict(v1.to_dict()) == v1
    assert jobcgroup.job_cgroups(tmp_path, Slurm.job_cgroup_v1, (), 0, job="7", uid="1", user="a", node="n") is None
    (tmp_path / "cgroup.controllers").write_text("")
    v2 = jobcgroup.job_cgroups(tmp_path, Slurm.job_cgroup_v1, Slurm.job_cgroup_v2, 10, job="7", uid="1", user="a",
                               node="n1")
    assert v2 is not None and v2.v2
    dirs = [g[0] for g in v2.groups]
    assert str(tmp_path / "system.slice/slurmstepd.scope/job_7/step_extern/user") in dirs
    assert str(tmp_path / "system.slice/n1_slurmstepd.scope/job_7/step_extern/user") in dirs
    Path(dirs[1]).mkdir(parents=True)
    assert v2.ready() == [Path(dirs[1])]


def test_pbs_and_torque_cgroups_are_ready_once_made_even_without_a_process(tmp_path: Path) -> None:
    """A sister host of a PBS or Torque job gets a process in the job's cgroups only with a task, maybe
    never: the launcher joins them once they exist (their limits are written as they are made) instead
    of waiting its whole timeout for a process, then starting outside them."""
    job = HookJob("pbs", "c", "12.srv", "n2", "alice", 1001, 1001)
    hooks = tmp_path / "home" / "mom_priv" / "hooks"
    hooks.mkdir(parents=True)
    (hooks / "pbs_cgroups.HK").write_text("type=site\n")
    pbs = PBS({"PBS_HOME": str(tmp_path / "home")})
    pbs.cgroup_root = tmp_path
    plan = jobcgroup.JobCgroups.from_dict(pbs.job_cgroups(job).to_dict())  # as the launcher gets it
    assert not plan.populated and not plan.v2 and plan.wait == PBS.cgroup_wait
    assert plan.ready() is None                                    # not made yet
    memory, cpuset = (tmp_path / c / "pbs_jobs.service/jobid/12.srv" for c in ("memory", "cpuset"))
    memory.mkdir(parents=True)
    cpuset.mkdir(parents=True)
    (cpuset / "cpuset.cpus").write_text("\n")                     # a v1 cpuset takes no process before its cpus
    (cpuset / "cpuset.mems").write_text("0\n")
    assert plan.ready() is None
    (cpuset / "cpuset.cpus").write_text("0-1\n")
    assert plan.ready() == [memory, cpuset]                        # no process in them: ready all the same
    torque = jobcgroup.job_cgroups(tmp_path, Torque.job_cgroup_v1, (), 10, populated=False, job="7.srv",
                                   uid="1001", user="alice", node="n2")
    (tmp_path / "memory/torque/7.srv").mkdir(parents=True)
    assert torque is not None and torque.ready() == [tmp_path / "memory/torque/7.srv"]
    slurm = jobcgroup.job_cgroups(tmp_path, ((str(memory.relative_to(tmp_path)),),), (), 10, job="x")
    assert slurm is not None and slurm.populated and slurm.ready() is None  # Slurm's: only with a process


def test_slurm_waits_for_the_extern_step_only_with_contain_and_cgroup_proctrack(tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    job = HookJob("slurm", "c", "9", "n1", "alice", 1001, 1001)
    conf.write_text("ProctrackType=proctrack/linuxproc\nPrologFlags=Alloc\n")
    assert Slurm({"SLURM_CONF": str(conf)}).cgroup_setup() == (Path("/sys/fs/cgroup"), 0.0)
    assert Slurm({"SLURM_CONF": str(conf)}).job_cgroups(job) is None
    conf.write_text("# site\nproctracktype=proctrack/cgroup   # tracked\nPrologFlags=Alloc,Contain,X11\n"
                    "NodeName=n1 PrologFlags=ignored\n")
    (tmp_path / "cgroup.conf").write_text("CgroupMountpoint=/run/x/cgroup/\nConstrainCores=yes\n")
    mount, wait = Slurm({"SLURM_CONF": str(conf)}).cgroup_setup()
    assert mount == Path("/run/x/cgroup") and wait == Slurm.extern_step_wait
    assert read_conf(tmp_path / "missing.conf") == {}


def test_lock_is_exclusive_and_never_waited_for_past_its_timeout(tmp_path: Path) -> None:
    lock = tmp_path / "x.lock"
    with locked(lock, 1) as held:
        assert held
        out: list[bool] = []
        t = threading.Thread(target=lambda: out.append(_try(lock)))
        t.start()
        t.join(10)
        assert out == [False]
    with locked(lock, 1) as held:  # released with the block
        assert held


def _try(lock: Path) -> bool:
    with locked(lock, 0.2) as held:
        return held


@needs_cgroups
def test_kill_stops_a_fork_hopper_a_process_scan_cannot_catch(cg: Path) -> None:
    proc = _start_in(cg, FORK_HOPPER)
    proc.wait(5)  # the first one exits at once: its children carry on, each living a moment
    time.sleep(0.2)
    assert jobcgroup.all_members(cg), "the fork-hopper should be running in the cgroup"
    assert jobcgroup.kill(cg, timeout=5) == set()
    time.sleep(0.2)
    assert jobcgroup.all_members(cg) == set()
    assert jobcgroup.remove(cg) and not cg.exists()


@needs_cgroups
def test_kill_reaches_sub_cgroups_and_a_missing_cgroup_is_fine(cg: Path) -> None:
    sub = cg / "inner"
    jobcgroup.create(sub)
    proc = _start_in(sub, "import time; time.sleep(300)")
    try:
        assert jobcgroup.all_members(cg) == {proc.pid}
        assert jobcgroup.kill(cg, timeout=5) == set()
        assert proc.wait(5) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
    assert jobcgroup.kill(cg / "nothing-here", timeout=1) == set()
