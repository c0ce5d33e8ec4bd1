"""Issue 2 end to end on the lab: sbatch starts agents, `dxflow ls/info` reach them, the epilog cleans up."""

from __future__ import annotations

import datetime as dt
import json
import pwd
import subprocess
from pathlib import Path

from dxflow.procs import read_proc

from conftest import (agent_pids, agents_of, as_user, dxflow, dxflow_json, on_node, run,
                      wait_agents, wait_for)

SLEEP = "sleep 300"
#: seconds a job may wait in the queue: other tests share the lab's four nodes
QUEUED = 300


def proc_uids(pid: int) -> tuple[int, ...]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return tuple(int(x) for x in line.split()[1:])
    raise AssertionError(f"no Uid line for {pid}")


def test_two_node_job_agents_ready_and_reachable(jobs):
    job = jobs.submit("alice", SLEEP, "--nodelist=n1,n2", nodes=2)  # the nodes it names below
    jobs.wait_running(job, timeout=QUEUED)
    agents = wait_agents("alice", job, 2)
    assert sorted(a["node"] for a in agents) == ["n1", "n2"]
    for a in agents:
        assert a["user"] == "alice" and a["state"] == "ready" and a["port"] > 0
        dt.datetime.fromisoformat(a["started"])  # ISO 8601
    for node in ("n1", "n2"):
        info = dxflow_json("alice", "info", f"{job}:{node}")
        assert info["hostname"] == node and info["node"] == node and info["job"] == job
        assert info["user"] == "alice" and info["memory_total"] > 0 and len(info["load"]) == 3
    # JOB alone means the job's first node
    assert dxflow_json("alice", "info", job)["node"] == "n1"
    human = dxflow("alice", "ls").stdout
    rows = [line.split() for line in human.splitlines()]
    assert {tuple(r[:3]) for r in rows if r and r[0] == job} == {(job, "n1", "ready"), (job, "n2", "ready")}, human
    # agents never run as root: every process of the agent has alice's real and effective uid
    alice = pwd.getpwnam("alice").pw_uid
    pids = agent_pids(job)
    assert len(pids) >= 4  # arbiter + worker per node
    for pid in pids:
        assert set(proc_uids(pid)) == {alice}


def test_agents_gone_after_job_ends(jobs):
    job = jobs.submit("alice", "sleep 4", nodes=2)
    wait_agents("alice", job, 2)
    wait_for(lambda: not agent_pids(job), 30, what="agent processes gone after the job ended")
    wait_for(lambda: not agents_of("alice", job), 15, what="ls no longer listing the job")
    assert not list(Path("~alice/.dxflow/fleet").expanduser().glob(f"*.{job}.*.json"))


def test_scancel_stops_agents_and_what_they_started(jobs):
    job = jobs.submit("alice", SLEEP, nodes=2)
    node = wait_agents("alice", job, 2)[0]["node"]  # whichever nodes the shared lab had free
    # something the user left running through the agent: daemonized, in its own session
    dxflow("alice", "exec", f"{job}:{node}", "--", "sh", "-c",
           "setsid sleep 4242 </dev/null >/dev/null 2>&1 & echo started")
    daemon = [int(p) for p in run(["pgrep", "-u", "alice", "-f", "^sleep 4242$"]).stdout.split()]
    assert len(daemon) == 1
    before = set(agent_pids(job)) | set(daemon)
    run(["scancel", job])
    wait_for(lambda: not agent_pids(job), 30, what="agent processes gone after scancel")
    # all gone, the daemon too (a zombie waiting for init counts as gone): the agents may go a moment before
    # the step's kill reaches what they started
    wait_for(lambda: all(read_proc(p) is None for p in before), 30,
             what=f"{sorted(p for p in before if read_proc(p) is not None)} gone after scancel")
    wait_for(lambda: not agents_of("alice", job), 15, what="ls no longer listing the cancelled job")
    # the epilog runs after Slurm has ended the job's steps, the agent (in the extern step) among them
    wait_for(lambda: not list(Path("/run/dxflow").glob(f"*.{job}.*.json")), 15, what="the epilog's records gone")


def test_ending_one_job_leaves_the_other_jobs_agent(jobs):
    first = jobs.submit("alice", SLEEP, "--nodelist=n1")
    second = jobs.submit("alice", SLEEP, "--nodelist=n1")
    wait_agents("alice", first, 1)
    wait_agents("alice", second, 1)
    run(["scancel", first])
    wait_for(lambda: not agent_pids(first), 30, what="first job's agent gone")
    assert agent_pids(second), "the other job's agent was killed"
    assert dxflow_json("alice", "info", f"{second}:n1")["job"] == second


def _token(user: str, audience_of: dict, lifetime: int = 60, iat_offset: int = 0) -> str:
    code = ("import json,sys,time,jwt\n"
            "from dxflow.auth import user_key, fingerprint\n"
            "from dxflow.layout import UserLayout\n"
            "reg=json.loads(sys.argv[1]); now=int(time.time())+int(sys.argv[3])\n"
            "claims={'sub':sys.argv[2],'aud':fingerprint(reg['public_key']),'iat':now,'exp':now+int(sys.argv[4])}\n"
            "print(jwt.encode(claims,user_key(UserLayout.of().ensure_shared().base),algorithm='RS256'))\n")
    return as_user(user, ["/opt/dxflow/venv/bin/python", "-c", code, json.dumps(audience_of), "alice",
                          str(iat_offset), str(lifetime)]).stdout.strip()


def _call(node: str, user: str, port: int, token: str | None) -> int:
    code = ("import sys,urllib.request,urllib.error\n"
            "req=urllib.request.Request('http://127.0.0.1:%s/api/node' % sys.argv[1])\n"
            "tok=sys.argv[2]\n"
            "tok and req.add_header('Authorization','Bearer '+tok)\n"
            "try:\n  print(urllib.request.urlopen(req,timeout=10).status)\n"
            "except urllib.error.HTTPError as e:\n  print(e.code)\n"
            "except (ConnectionError, urllib.error.URLError, OSError):\n  print(0)\n")
    return int(on_node(node, user, ["/usr/bin/python3", "-c", code, str(port), token or ""]).stdout)


CLOSED = 0  # the connection was closed before any answer: the agent serves its own user only


def test_only_the_owner_with_a_fresh_token_for_this_agent_gets_in(jobs):
    job = jobs.submit("alice", SLEEP, "--nodelist=n1,n2", nodes=2)  # the nodes it names below
    jobs.wait_running(job, timeout=QUEUED)
    wait_agents("alice", job, 2)
    regs = {}
    for node in ("n1", "n2"):
        path = Path(f"~alice/.dxflow/fleet/dxlab.{job}.{node}.json").expanduser()
        regs[node] = json.loads(path.read_text())
    port = regs["n1"]["port"]
    assert _call("n1", "alice", port, _token("alice", regs["n1"])) == 200  # the control: this works
    assert _call("n1", "bob", port, None) == CLOSED                              # bob: not even an answer
    assert _call("n1", "bob", port, _token("bob", regs["n1"])) == CLOSED         # bob's own key
    assert _call("n1", "alice", port, _token("bob", regs["n1"])) == 401          # bob's key, alice's connection
    assert _call("n1", "alice", port, _token("alice", regs["n2"])) == 401        # addressed to another agent
    assert _call("n1", "alice", port, _token("alice", regs["n1"], 60, -400)) == 401  # past its lifetime
    assert _call("n1", "alice", port, _token("alice", regs["n1"], 3600)) == 401  # lifetime over 5 min


def test_broken_dxflow_never_fails_the_job(jobs, tmp_path):
    site = Path("/etc/dxflow/dxflow.toml")
    saved = site.read_bytes() if site.exists() else None
    site.parent.mkdir(parents=True, exist_ok=True)
    site.write_text("this is [not toml\n")
    try:
        job = jobs.submit("alice", "echo ran-$SLURM_JOB_ID", "--nodelist=n2", "--output=/var/tmp/dxflow-broken-%j.out")
        wait_for(lambda: run(["squeue", "-h", "-j", job], check=False).stdout.strip() == "", 60,
                 what="job finished")
        assert Path(f"/var/tmp/dxflow-broken-{job}.out").read_text().strip() == f"ran-{job}"
        assert not agent_pids(job)
        state = run(["sinfo", "-h", "-n", "n2", "-o", "%T"]).stdout.strip()
        assert "drain" not in state and "down" not in state, state
        log = Path("/var/log/dxflow/hooks.log").read_text()
        assert "cannot read site config" in log
    finally:
        if saved is None:
            site.unlink(missing_ok=True)
        else:
            site.write_bytes(saved)
        Path(f"/var/tmp/dxflow-broken-{job}.out").unlink(missing_ok=True)


def test_agent_stops_by_itself_when_its_job_is_gone(lab):
    """No epilog ran (e.g. a node rebooted slurmd): the agent asks the scheduler and leaves."""
    env = {"DXFLOW_JOB_CHECK_INTERVAL": "1"}
    argv = ["env", *(f"{k}={v}" for k, v in env.items()), "/opt/dxflow/venv/bin/python", "-m", "dxflow.agent",
            "--scheduler", "slurm", "--cluster", "dxlab", "--job", "999999", "--node", "n1"]
    proc = subprocess.Popen(["nsenter", "--net=/var/run/netns/dxlab-n1", "runuser", "-u", "alice", "--", *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not Path("~alice/.dxflow/fleet/dxlab.999999.n1.json").expanduser().exists()
