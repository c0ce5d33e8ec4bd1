"""Sampling a job on a node (:mod:`dxflow.metrics.sampler`, :mod:`dxflow.metrics.sources`) with real
processes, a cgroup tree laid out as Slurm's v1 and v2 plugins make it, and the agent's ``/api/metrics``
behind its owner's token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


from dxflow import auth
from dxflow.agent import node as agent_node
from dxflow.metrics import gpus as gpu_alloc
from dxflow.metrics import sources
from dxflow.metrics.sampler import Sampler

BUSY = "import time\nt = time.time()\nwhile time.time() - t < {secs}: pass\n"


def sampler_for(tmp_path, job: str, env_name: str = "DXFLOW_TEST_JOB", **kw) -> Sampler:
    home = tmp_path / "home"
    (home / ".dxflow").mkdir(parents=True, exist_ok=True)
    return Sampler(job=job, node="n1", user="alice", cluster="c", scheduler="local", home=home,
                   job_env_names=(env_name,), interval=0.5, gpu_allocation=lambda pids: [] if pids else None,
                   agent_pids=lambda: {os.getpid()}, **kw)


def spawn(job: str, script: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "DXFLOW_TEST_JOB": job})


def test_process_tree_cpu_of_a_busy_process_and_children_that_came_and_went(tmp_path):
    job = f"t{os.getpid()}"
    # a shell that runs three short busy children one after the other: each lives under a sample interval
    # or two, and is waited for by the shell, whose cutime then carries them
    child = f"{sys.executable} -c '{BUSY.format(secs=0.4)}'"
    # the shell outlives its children by two samples: what they used is in its cutime by then
    shell = subprocess.Popen(["sh", "-c", f"{child}; {child}; {child}; sleep 1.2"],
                             env={**os.environ, "DXFLOW_TEST_JOB": job})
    s = sampler_for(tmp_path, job)
    s.tick()
    while True:
        time.sleep(0.5)
        pid, _status, usage = os.wait4(shell.pid, os.WNOHANG)  # the kernel's own account, children included
        s.tick()
        if pid:
            break
    shell.returncode = 0
    truth = usage.ru_utime + usage.ru_stime
    assert s.summary.cpu_source == "processes"
    # what the shell and its children used, less what ran before the first sample (a Python start-up at
    # most): children that lived between two samples were counted through the shell that waited for them
    assert truth - 0.3 <= s.summary.cpu_seconds <= truth + 0.05, (s.summary.cpu_seconds, truth)
    assert s.summary.processes_max >= 1
    # the job's last process ended: the report part was written at once, marked final
    part = json.loads(s.report_path().read_text())
    assert part["final"] and part["job"] == job and part["node"] == "n1"
    assert s.report_path() == tmp_path / "home" / ".dxflow" / "reports" / job / "n1.json"
    assert (s.report_path().stat().st_mode & 0o777) == 0o600


def test_other_processes_of_the_user_are_not_the_job(tmp_path):
    job = f"u{os.getpid()}"
    other = subprocess.Popen([sys.executable, "-c", BUSY.format(secs=1.5)])  # no job id in its environment
    try:
        s = sampler_for(tmp_path, job)
        s.tick()
        time.sleep(1.0)
        sample = s.tick()
        assert sample["processes"] == 0.0 and s.summary.cpu_seconds == 0.0
        assert sample["node_cpu_cores"] is not None and sample["node_cpu_cores"] > 0.3  # the node sees it
    finally:
        other.kill()
        other.wait()


def make_v1_tree(root: Path, job: str, pids: list[int]) -> sources.JobCgroup:
    folders = {}
    for controller in ("memory", "cpuacct", "cpuset"):
        d = root / controller / "slurm_n1" / "uid_1001" / f"job_{job}"
        (d / "step_batch").mkdir(parents=True)
        (d / "cgroup.procs").write_text("")
        (d / "step_batch" / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
        folders[controller] = d
    (folders["memory"] / "memory.usage_in_bytes").write_text("209715200\n")
    (folders["memory"] / "memory.max_usage_in_bytes").write_text("314572800\n")
    (folders["memory"] / "memory.limit_in_bytes").write_text("1073741824\n")
    (folders["cpuacct"] / "cpuacct.usage").write_text("0\n")
    (folders["cpuset"] / "cpuset.effective_cpus").write_text("0-1,4\n")
    return sources.JobCgroup(folders)


def test_cgroup_v1_figures_agent_taken_out(tmp_path):
    job = "17"
    proc = spawn(job, "import time; time.sleep(30)")
    try:
        cg = make_v1_tree(tmp_path / "cg", job, [proc.pid, os.getpid()])  # the agent sits in the job's cgroup
        s = sampler_for(tmp_path, job)
        s.cgroup = cg
        s.tick(now=1000.0)
        (cg.folders["cpuacct"] / "cpuacct.usage").write_text(f"{3 * 10**9}\n")  # 3 s of CPU in 2 s
        sample = s.tick(now=1002.0)
        assert s.summary.cpu_source == "cgroup"
        assert 2.5 <= s.summary.cpu_seconds <= 3.0  # less the agent's own share (this test process)
        assert sample["memory_bytes"] == 209715200.0
        assert sample["processes"] == 1.0  # the agent is not the job's
        assert s.summary.cores == 3 and s.summary.cores_source == "cgroup cpuset"
        assert s.summary.memory_limit_bytes == 1073741824
        assert s.summary.memory_cgroup_peak_bytes == 314572800
    finally:
        proc.kill()
        proc.wait()


def test_cgroup_v2_figures(tmp_path):
    d = tmp_path / "job_9"
    d.mkdir()
    (d / "cgroup.procs").write_text("")
    (d / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    (d / "memory.current").write_text("1000\n")
    (d / "memory.peak").write_text("5000\n")
    (d / "memory.max").write_text("max\n")
    (d / "cpuset.cpus.effective").write_text("2-3\n")
    cg = sources.JobCgroup({"": d})
    assert cg.cpu_seconds() == 2.5 and cg.memory() == (1000, 5000)
    assert cg.memory_limit() is None and cg.cores() == 2


def test_job_cgroup_found_from_proc_cgroup_paths_and_mounts(tmp_path):
    # the node's own mount of the memory tree (as in the lab: a cgroup namespace rooted at dxlab/n1)
    (tmp_path / "n1" / "memory" / "slurm_n1" / "uid_1001" / "job_170" / "step_extern").mkdir(parents=True)
    mountinfo = (f"35 31 0:32 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
                 f"51 27 0:32 /dxlab/n1 {tmp_path}/n1/memory rw - cgroup cgroup rw,memory\n")
    mounts = sources.mounts(mountinfo)
    top = sources.job_folder("/dxlab/n1/slurm_n1/uid_1001/job_170/step_extern", "170")
    assert top == "/dxlab/n1/slurm_n1/uid_1001/job_170"
    assert sources.locate("memory", top, mounts) == tmp_path / "n1" / "memory" / "slurm_n1" / "uid_1001" / "job_170"
    # a job id inside another name is not the job: uid_1001 is not job 1001's folder, nor a hash
    assert sources.job_folder("/slurm/uid_1001/job_1001/step_0", "1001") == "/slurm/uid_1001/job_1001"
    assert sources.job_folder("/process_api/78ecef92b1/x", "78") is None
    assert sources.job_folder("/pbs_jobs.service/jobid/42.server", "42.server") == "/pbs_jobs.service/jobid/42.server"


def test_cpuset_lists():
    assert sources.count_cpus("0-3,8,10-11\n") == 7
    assert sources.count_cpus("") is None


def test_agent_api_metrics_owner_only(make_agent, keys):
    a = make_agent(config={"METRICS_INTERVAL": 0.2})
    assert a.client.get("/api/metrics", headers=a.headers).status_code == 404  # an app built by a test: off
    sampler = agent_node.start_sampling(a.state, 0.2)
    try:
        time.sleep(0.7)
        r = a.client.get("/api/metrics?since=1m", headers=a.headers)
        assert r.status_code == 200
        body = r.get_json()
        assert body["columns"][:3] == ["t", "cpu_cores", "cpu_seconds"] and len(body["rows"]) >= 2
        assert body["summary"]["job"] == a.state.job
        assert a.client.get("/api/metrics?since=soon", headers=a.headers).status_code == 400
        assert a.client.get("/api/metrics").status_code == 401
        bob = auth.new_key()  # bob signs a token with his own key: not the agent's user's
        token = auth.mint_token(bob, "bob", a.state.audience)
        assert a.client.get("/api/metrics", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    finally:
        sampler.stopped.set()


def test_the_agents_own_cgroup_is_not_the_jobs(tmp_path, monkeypatch):
    # dxflow's cgroup for the agent alone is named CLUSTER.JOB.NODE: it carries the job's id, but holds
    # only the agent (dxflow.hook.join_own_cgroup)
    (tmp_path / "unified" / "dxflow" / "dxlab.10.n1").mkdir(parents=True)
    mountinfo = f"41 31 0:38 / {tmp_path}/unified rw - cgroup2 cgroup2 rw\n"
    monkeypatch.setattr(sources.jobcgroup, "of_process", lambda pid: {"": "/dxflow/dxlab.10.n1"})
    assert sources.find_job_cgroup(os.getpid(), "10", mountinfo) is None


def test_a_child_and_its_parent_ending_together_are_counted_once(tmp_path):
    """sh → timeout → busy loop: the loop and `timeout` end between two samples; the loop's CPU reaches the
    shell through `timeout`'s figure and must not be counted a second time."""
    job = f"v{os.getpid()}"
    shell = subprocess.Popen(["sh", "-c", f"timeout 1.5 {sys.executable} -c 'while True: pass'; sleep 2.5"],
                             env={**os.environ, "DXFLOW_TEST_JOB": job})
    s = sampler_for(tmp_path, job)
    s.tick()
    peak = 0.0
    while True:
        time.sleep(0.5)
        pid, _status, usage = os.wait4(shell.pid, os.WNOHANG)
        sample = s.tick()
        peak = max(peak, sample["cpu_cores"] or 0.0)
        if pid:
            break
    shell.returncode = 0
    truth = usage.ru_utime + usage.ru_stime
    assert peak <= 1.3, peak  # one core at most, never the loop's whole time in one sample
    assert truth - 0.4 <= s.summary.cpu_seconds <= truth + 0.05, (s.summary.cpu_seconds, truth)


def test_the_jobs_gpus_from_its_processes_environment_through_nvidia_smi(tmp_path, monkeypatch):
    """A job whose process says CUDA_VISIBLE_DEVICES=1: GPU 1's columns and summary, read through the
    nvidia-smi stand-in (tests/fakes/gpu); the node's other GPU is never shown."""
    fakes = Path(__file__).resolve().parents[1] / "fakes" / "gpu"
    spec = tmp_path / "gpus.json"
    spec.write_text(json.dumps([
        {"index": 0, "uuid": "GPU-a", "name": "A100", "utilization": 99, "memory_used_mib": 100,
         "memory_total_mib": 40960, "power_w": 300.0, "temperature": 70},
        {"index": 1, "uuid": "GPU-b", "name": "A100", "utilization": 40, "memory_used_mib": 2048,
         "memory_total_mib": 40960, "power_w": 150.0, "temperature": 50}]))
    monkeypatch.setenv("DXFLOW_FAKE_GPUS", str(spec))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no NVML here: the nvidia-smi fallback
    for name in gpu_alloc.ALLOCATION_ENV:  # the agent's own environment names none: the job's process does
        monkeypatch.delenv(name, raising=False)
    job = f"g{os.getpid()}"
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"],
                            env={**os.environ, "DXFLOW_TEST_JOB": job, "CUDA_VISIBLE_DEVICES": "1"})
    try:
        _wait_for_exec(proc.pid, job)  # until then the child shows the test's own environment (a busy machine)
        home = tmp_path / "home"
        (home / ".dxflow").mkdir(parents=True)
        s = Sampler(job=job, node="n1", user="alice", cluster="c", scheduler="local", home=home,
                    job_env_names=("DXFLOW_TEST_JOB",), interval=0.5, gpu_allocation=agent_node.job_gpus,
                    agent_pids=lambda: {os.getpid()}, gpu_path=str(fakes))
        s.tick(now=1000.0)
        sample = s.tick(now=1002.0)
        assert s.gpu_reader.how == "nvidia-smi"
        assert sample["gpu0_utilization_percent"] == 40.0 and sample["gpu0_memory_bytes"] == 2048 * 2**20
        assert sample["gpu0_power_watts"] == 150.0 and "gpu1_utilization_percent" not in sample
        (g,) = s.summary.gpus
        assert g.index == 1 and g.uuid == "GPU-b" and g.busy_seconds == 2.0 and g.power_sum == 300.0
    finally:
        proc.kill()
        proc.wait()


def test_api_node_shows_only_the_jobs_gpus(make_agent, tmp_path, monkeypatch):
    """/api/node lists the GPUs its sampler reads (the job's), never the node's others."""
    a = make_agent()
    assert a.client.get("/api/node", headers=a.headers).get_json()["gpus"] == []  # no sampler, no GPU shown
    fakes = Path(__file__).resolve().parents[1] / "fakes" / "gpu"
    spec = tmp_path / "gpus.json"
    spec.write_text(json.dumps([
        {"index": i, "uuid": f"GPU-{i}", "name": "A100", "utilization": 10 * i, "memory_used_mib": 1,
         "memory_total_mib": 40960, "power_w": None, "temperature": 40} for i in range(4)]))
    monkeypatch.setenv("DXFLOW_FAKE_GPUS", str(spec))
    monkeypatch.setitem(sys.modules, "pynvml", None)
    s = agent_node.make_sampler(a.state, 0.5)
    s.gpu_allocation = lambda pids: ["2"]
    s.gpu_path = str(fakes)
    a.state.extra[agent_node.SAMPLER] = s
    s.tick()
    (g,) = a.client.get("/api/node", headers=a.headers).get_json()["gpus"]
    assert (g["index"], g["uuid"], g["utilization"], g["memory_total"]) == (2, "GPU-2", 20.0, 40960 * 2**20)


def _wait_for_exec(pid: int, marker: str, timeout: float = 30.0) -> None:
    """Wait until process ``pid`` runs with the environment it was given (``marker`` in it)."""
    deadline = time.monotonic() + timeout
    while marker.encode() not in Path(f"/proc/{pid}/environ").read_bytes():
        assert time.monotonic() < deadline, f"process {pid} never exec'd"
        time.sleep(0.01)
