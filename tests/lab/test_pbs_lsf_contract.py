"""Contract tests of the PBS, Torque and LSF hooks on the lab's nodes.

Each test runs the real hook scripts from ``pbs/`` and ``lsf/`` as their scheduler would
(docs/schedulers.md): as root (or, for LSF, as the job's user), with exactly the argv,
environment, working directory and stdio the daemon's source gives them, in the node's
network and UTS namespaces — and then does what the scheduler does next: pbs_mom SIGKILLs
the script's process group as soon as it exits, sbatchd kills the pre-exec's group on a
timeout. Stand-ins (tests/lab/fakes/) are as strict as the daemons: ``qstat`` prints PBS's
JSON and Torque's unescaped XML, ``bjobs`` refuses root (LSF_ROOT_USER=N), the ``pbs``
module can look like the Python 2.7 PBS Pro 18-19 embed, an OpenPBS classic prologue gets
only MoM's ``pbs_environment`` plus ``PBS_JOBDIR``, and a job's output is spooled where
pbs_mom and sbatchd spool it and moved to its final path only at the end. The user's
master on the login node, started with the stand-ins on its PATH, must see each agent as
``ready`` through its SSH tunnel, and ``dxflow logs -f`` must show what a running job writes.
The matching epilogue / post-exec must remove the agent.

Hostile values in every field must leave the job unharmed (exit 0, promptly) and run
nothing they contain.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from dxflow.schedulers.lsf import LSF
from tests.lab.conftest import DXFLOW, NETNS, Lines, popen_as, run, stop, wait_for
from tests.lab.fakes import spool

ROOT = Path(__file__).resolve().parents[2]
FAKES = Path(__file__).parent / "fakes"
USER = "alice"
SERVER = "dxlab"              # the PBS server: job ids are NNN.dxlab, so the agents' cluster is dxlab
RUNTIME = Path("/run/dxflow")  # the lab's site config keeps the default
HOOK_LOG = Path("/var/log/dxflow/hooks.log")
# What sbatchd (and a Torque MoM) run with: a small environment of their own.
MOM_ENV = {"PATH": "/bin:/usr/bin", "LANG": "C"}
HOOK_TIMEOUT = 15.0           # far above what a hook may take; a hook holding a pipe hits it


class Kit:
    """A throwaway install: hook scripts with the documented modes, stand-ins, their job tables."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="dxflow-contract-"))
        self.root.chmod(0o755)
        self.bin = self.root / "bin"
        self.pbs_python = self.root / "pbs_python"
        self.mom_priv = self.root / "pbs_home" / "mom_priv"
        self.torque_priv = self.root / "torque_home" / "mom_priv"
        self.lsf = self.root / "lsf"
        self.evil = self.root / "evil"
        self.marker = self.root / "evil" / "PWNED"
        self.pbs_home = self.root / "pbs_home"
        for d in (self.bin, self.pbs_python, self.mom_priv, self.torque_priv, self.lsf, self.evil,
                  self.pbs_home / "aux", self.root / "hooks"):
            d.mkdir(parents=True)
            d.chmod(0o755)
        (self.pbs_home / "spool").mkdir(mode=0o1777)
        (self.pbs_home / "spool").chmod(0o1777)  # as pbs_postinstall makes it
        for name in ("qstat", "bjobs", "sbatchd", "pbs_attach", "blaunch"):
            shutil.copy(FAKES / name, self.bin / name)
            (self.bin / name).chmod(0o755)
        shutil.copy(FAKES / "pbs.py", self.pbs_python / "pbs.py")
        for log in ("calls.log", "uids.log", "tasks.log"):
            (self.bin / log).touch(mode=0o666)
            (self.bin / log).chmod(0o666)
        # /etc/pbs.conf as an OpenPBS install writes it (PBS_EXEC/bin holds qstat). The lab does not own
        # /etc/pbs.conf, so MoM's pbs_environment names this one with PBS_CONF_FILE, which every PBS
        # command (and dxflow) reads instead; otherwise pbs_environment is the installed default.
        self.pbs_conf = self.root / "pbs.conf"
        self.pbs_conf.write_text(f"PBS_EXEC={self.root}\nPBS_HOME={self.pbs_home}\nPBS_SERVER={SERVER}\n")
        self.pbs_conf.chmod(0o644)
        (self.pbs_home / "pbs_environment").write_text(
            f"TZ=UTC\nPATH=/bin:/usr/bin\nPBS_CONF_FILE={self.pbs_conf}\n")
        self.pbs_jobs({})
        self.lsf_jobs([])
        # as the admin docs install them: root-owned, 0500 for pbs_mom; LSF's run as the job's user
        for src, dst in ((ROOT / "pbs" / "prologue", self.mom_priv / "prologue"),
                         (ROOT / "pbs" / "epilogue", self.mom_priv / "epilogue")):
            shutil.copy(src, dst)
            dst.chmod(0o500)
        for name in ("prologue", "prologue.parallel", "epilogue", "epilogue.parallel"):
            shutil.copy(ROOT / "pbs" / "torque" / name, self.torque_priv / name)
            (self.torque_priv / name).chmod(0o500)
        for name in ("host_pre_exec", "host_post_exec"):
            shutil.copy(ROOT / "lsf" / name, self.lsf / name)
            (self.lsf / name).chmod(0o755)
        shutil.copy(ROOT / "pbs" / "dxflow_hook.py", self.root / "hooks" / "dxflow_hook.py")
        # a bjobs and a sitecustomize that must never run: the job's environment points at them
        touch = f"#!/bin/sh\ntouch {shlex.quote(str(self.marker))}\n"
        (self.evil / "bjobs").write_text(touch)
        (self.evil / "bjobs").chmod(0o755)
        (self.evil / "sitecustomize.py").write_text(f"open({str(self.marker)!r}, 'w').close()\n")
        self.started: list[Path] = []   # agent records made by the tests, for the clean-up

    # -- stand-ins' job tables --------------------------------------------------
    def pbs_jobs(self, jobs: dict) -> None:
        path = self.bin / "pbs-jobs.json"
        path.write_text(json.dumps(jobs))
        path.chmod(0o644)

    def lsf_jobs(self, records: list) -> None:
        path = self.bin / "lsf-jobs.json"
        path.write_text(json.dumps(records))
        path.chmod(0o644)

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in (self.bin / "calls.log").read_text().splitlines()]

    def tasks(self) -> list[dict]:
        """What the launcher stand-ins (pbs_attach, blaunch) started as tasks of a job."""
        return [json.loads(line) for line in (self.bin / "tasks.log").read_text().splitlines()]

    def bjobs_uids(self) -> list[int]:
        return [int(line) for line in (self.bin / "uids.log").read_text().split()]

    def mom_env(self, user: str | None = USER) -> dict:
        """Exactly what OpenPBS's pbs_mom hands a classic prologue/epilogue: MoM's environment, which
        setup_env() made of the lines of $PBS_HOME/pbs_environment ('#' or ' ' starts a comment, a bare
        NAME takes MoM's inherited value, which this stand-in MoM has none of), plus PBS_JOBDIR, which
        run_pelog() sets to the user's home (src/lib/Liblog/setup_env.c, src/resmom/prolog.c). A hook
        (user=None) gets MoM's environment alone."""
        env = {}
        for line in (self.pbs_home / "pbs_environment").read_text().splitlines():
            if line and line[0] not in "# " and "=" in line:
                key, _, value = line.partition("=")
                env[key] = value
        if user:
            env["PBS_JOBDIR"] = pwd.getpwnam(user).pw_dir
        return env

    # -- running a hook as its scheduler does ------------------------------------
    def on_node(self, node: str, argv: list[str], env: dict, cwd: Path | str = "/",
                stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
        """Run argv on NODE (its network and UTS namespaces, host name NODE) as the scheduler's
        child: a session and process group of its own, stdout/stderr on pipes the caller reads to
        EOF; once it has exited, SIGKILL its process group (pbs_mom does exactly that)."""
        wrapper = ["nsenter", f"--net=/var/run/netns/{NETNS.format(node=node)}", "unshare", "--uts",
                   "/bin/sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", node, *argv]
        t0 = time.monotonic()
        proc = subprocess.Popen(wrapper, env=env, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True, text=True)
        try:
            out, err = proc.communicate(timeout=HOOK_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"{argv[0]} still ran (or held its stdout/stderr) after {HOOK_TIMEOUT:.0f} s")
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        result.pgid = proc.pid  # type: ignore[attr-defined]
        result.seconds = time.monotonic() - t0  # type: ignore[attr-defined]
        kill_group(proc.pid)
        return result

    def lsf_exec(self, node: str, script: str, job_env: dict, user: str | None) -> dict:
        """Run an LSF host pre/post-exec the way sbatchd does (fakes/sbatchd): /bin/sh -c in /tmp,
        stdio on /dev/null, the job's environment, as USER or root; then kill its process group."""
        env_file = self.root / f"env-{secrets.token_hex(4)}.json"
        env_file.write_text(json.dumps(job_env))
        site_env = ["env", "-i", "PATH=/usr/bin:/bin", f"LSF_BINDIR={self.bin}", f"LSF_ENVDIR={self.bin}"]
        argv = [*site_env, str(self.bin / "sbatchd"), str(env_file), str(self.lsf / script), *([user] if user else [])]
        result = self.on_node(node, argv, MOM_ENV)
        assert result.returncode == 0, result.stderr
        outcome = json.loads(result.stdout)
        kill_group(outcome["pid"])  # what sbatchd does to a pre-exec on timeout: nothing may depend on it
        return outcome


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def proc_stat(pid: int) -> dict | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] in (b"Z", b"X"):
        return None
    uid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:")))
    return {"ppid": int(fields[1]), "pgid": int(fields[2]), "sid": int(fields[3]), "uid": uid}


def agent_leaders(job: str, node: str) -> list[int]:
    """Session leaders running this job's agent on NODE (workers share the command line, not the session)."""
    out = run(["pgrep", "-f", f"dxflow.agent .*--job {job} --node {node}( |$)"], check=False).stdout.split()
    return [pid for pid in map(int, out) if (st := proc_stat(pid)) and st["sid"] == pid]


def record_path(cluster: str, job: str, node: str, user: str | None = None) -> Path:
    base = RUNTIME if user is None else Path(pwd.getpwnam(user).pw_dir) / ".dxflow" / "run"
    return base / f"{cluster}.{job}.{node}.json"


def registration_path(cluster: str, job: str, node: str) -> Path:
    return Path(pwd.getpwnam(USER).pw_dir) / ".dxflow" / "fleet" / f"{cluster}.{job}.{node}.json"


def pbs_job_id() -> str:
    return f"{secrets.randbelow(900000) + 100000}.{SERVER}"


def expect_agent(kit: Kit, cluster: str, job: str, node: str, hook_pgid: int, *, user_record: bool = False) -> int:
    """The agent of JOB on NODE: started as the job's user, in a session of its own (not the hook's,
    which was just SIGKILLed), alive, and registered in the user's fleet folder. Returns its pid."""
    path = record_path(cluster, job, node, USER if user_record else None)
    kit.started.append(path)
    record = wait_for(lambda: path.exists() and json.loads(path.read_text()), 10, what=f"record {path}")
    pid = record["pid"]
    # the record names the prolog's launcher (dxflow.adopt): root until it becomes the agent, same pid
    st = wait_for(lambda: (found := proc_stat(pid)) and found["uid"] != 0 and found, 5, what=f"agent {pid} alive")
    assert st["uid"] == pwd.getpwnam(USER).pw_uid, "the agent must run as the job's user"
    assert st["sid"] == pid and st["pgid"] == pid, "the agent must lead a session of its own"
    assert st["sid"] != hook_pgid
    reg = registration_path(cluster, job, node)
    data = wait_for(lambda: reg.exists() and json.loads(reg.read_text()), 15, what=f"registration {reg}")
    assert (data["job"], data["node"], data["user"]) == (job, node, USER)
    assert proc_stat(pid), "the agent must survive the kill of the hook's process group"
    return pid


def expect_gone(cluster: str, job: str, node: str, pid: int, *, user_record: bool = False) -> None:
    wait_for(lambda: proc_stat(pid) is None, 5, what=f"agent {pid} stopped")
    assert not agent_leaders(job, node)
    assert not registration_path(cluster, job, node).exists()
    assert not record_path(cluster, job, node, USER if user_record else None).exists()


# -- fixtures -----------------------------------------------------------------
@pytest.fixture(scope="module")
def kit(lab) -> Iterator[Kit]:
    k = Kit()
    yield k
    from dxflow.procs import stop_tree  # the installed dxflow's: what the epilog uses

    for path in k.started:  # whatever a failed test left running
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        stop_tree(int(record["pid"]), int(record["uid"]), leader_alive=proc_stat(int(record["pid"])) is not None)
        registration_path(record["cluster"], record["job"], record["node"]).unlink(missing_ok=True)
        path.unlink(missing_ok=True)
    shutil.rmtree(k.root, ignore_errors=True)


class Master:
    """USER's master on the login node, run with the stand-ins first on its PATH."""

    def __init__(self, kit: Kit) -> None:
        self.kit = kit
        self.path = f"{kit.bin}:/usr/local/bin:/usr/bin:/bin"

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        line = f"PATH={shlex.quote(self.path)} exec {DXFLOW} {shlex.join(args)}"
        return run(["runuser", "-l", USER, "-c", line], check=check, timeout=60)

    def restart(self) -> None:
        # Other lab tests may restart USER's master (without the stand-ins) at any moment, and a
        # start that loses a race leaves no socket behind: stop what the pid file names, retry.
        for _ in range(3):
            self("master", "stop", check=False)
            if self("master", "start", check=False).returncode == 0:
                return
        pytest.fail(f"{USER}'s master does not start: see ~{USER}/.dxflow/logs/master.log")

    def wait_ready(self, job: str, nodes: set[str], asked: list[str], timeout: float = 25) -> list[dict]:
        """Until the master lists JOB's agents on NODES as ready, having listed USER's jobs through the
        scheduler stand-in (a call ``asked`` + anything that does not name a job)."""
        seen = len(self.kit.calls())
        deadline = time.monotonic() + timeout
        restart_at = time.monotonic() + timeout / 3
        while time.monotonic() < deadline:
            listed = self("ls", "--json", check=False)  # a master being restarted by others: try again
            agents = [a for a in json.loads(listed.stdout or "[]") if a["job"] == job] if listed.returncode == 0 else []
            queried = any(c[:len(asked)] == asked and job.split(".")[0] not in " ".join(c)
                          for c in self.kit.calls()[seen:])
            if queried and {a["node"] for a in agents} == nodes and all(a["state"] == "ready" for a in agents):
                return agents
            if not queried and time.monotonic() > restart_at:  # a master without the stand-ins
                self.restart()
                restart_at = deadline
            time.sleep(0.5)
        raise AssertionError(f"agents of {job} not ready on {sorted(nodes)} via the master "
                             f"(stand-in asked: {queried}); last: {agents!r}")


@pytest.fixture(scope="module")
def master(kit) -> Iterator[Master]:
    m = Master(kit)
    m.restart()
    yield m
    run(["runuser", "-l", USER, "-c", f"{DXFLOW} master stop"], check=False)  # next use: a normal PATH


def pbs_attrs(nodes: list[str], state: str = "R", job: str = "1") -> dict:
    """A running job as ``qstat -f -F json`` shows it."""
    seq = job.split(".")[0]
    return {"Job_Name": "contract", "Job_Owner": f"{USER}@dxlab-login", "job_state": state, "queue": "workq",
            "euser": USER, "egroup": USER, "exec_host": "+".join(f"{n}/0" for n in nodes),
            "Output_Path": f"dxlab-login:/home/{USER}/contract.o{seq}",
            "Error_Path": f"dxlab-login:/home/{USER}/contract.e{seq}", "Join_Path": "n", "Keep_Files": "n",
            "Variable_List": {"PBS_O_WORKDIR": f"/home/{USER}/contract-wd", "PBS_O_HOST": "dxlab-login"}}


def agent_argv(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


# -- OpenPBS / PBS Pro ----------------------------------------------------------
def test_pbs_classic_prologue_and_epilogue(kit, master):
    """With only what pbs_mom passes (no PBS_O_WORKDIR, PBS_JOBDIR = the home), the agent still works in
    the job's directory: the prologue asks qstat, as root, with MoM's own PBS configuration."""
    job = pbs_job_id()
    kit.pbs_jobs({job: pbs_attrs(["n1"], job=job)})
    (kit.pbs_home / "aux" / job).write_text("n1\n")
    env = kit.mom_env()
    assert "PBS_O_WORKDIR" not in env and "PBS_HOME" not in env
    pro = kit.on_node("n1", [str(kit.mom_priv / "prologue"), job, USER, USER], env, cwd=kit.mom_priv)
    assert pro.returncode == 0 and pro.stdout == "" and pro.seconds < 5
    pid = expect_agent(kit, SERVER, job, "n1", pro.pgid)
    argv = agent_argv(pid)
    assert f"--work-dir=/home/{USER}/contract-wd" in argv, argv  # not the home PBS_JOBDIR names
    assert f"--stdout=/home/{USER}/contract.o{job.split('.')[0]}" in argv
    assert ["qstat", "-f", "-F", "json", "-x", job] in kit.calls()
    # the master asked PBS (the stand-in) whether the job runs there before calling the agent ready
    master.wait_ready(job, {"n1"}, asked=["qstat", "-f", "-F", "json"])
    epi = kit.on_node("n1", [str(kit.mom_priv / "epilogue"), job, USER, USER, "contract", "4242",
                             "ncpus=1,walltime=00:10:00", "cput=00:00:01", "workq", "null", "0"], env, cwd=kit.mom_priv)
    assert epi.returncode == 0
    expect_gone(SERVER, job, "n1", pid)


def test_pbs_logs_follow_shows_the_spooled_output_of_a_running_job(kit, master):
    """pbs_mom writes a running job's stdout to $PBS_HOME/spool/<job>.OU and copies it to Output_Path
    only at the end: `dxflow logs -f` shows the lines while the job writes them, and the final file
    after. The old agent read only Output_Path, which does not exist while the job runs. The follower
    ends when MoM purges the job (its mom_priv/jobs/JOB.JB goes), seen on the node: the agent never asks
    qstat whether the job still runs (issue #11; the old agent asked every 10 s while followed)."""
    job = pbs_job_id()
    seq = job.split(".")[0]
    kit.pbs_jobs({job: pbs_attrs(["n1"], job=job)})
    (kit.pbs_home / "aux" / job).write_text("n1\n")
    spool.pbs_job_arrive(kit.pbs_home, job)  # MoM takes the job before it runs the prologue
    env = kit.mom_env()
    pro = kit.on_node("n1", [str(kit.mom_priv / "prologue"), job, USER, USER], env, cwd=kit.mom_priv)
    pid = expect_agent(kit, SERVER, job, "n1", pro.pgid)
    master.wait_ready(job, {"n1"}, asked=["qstat", "-f", "-F", "json"])
    final = Path(pwd.getpwnam(USER).pw_dir) / f"contract.o{seq}"
    follower = popen_as(USER, ["env", f"PATH={master.path}", DXFLOW, "logs", "-f", f"{job}:n1"])
    try:
        lines = Lines(follower)
        spooled = spool.pbs_spool_open(kit.pbs_home, job, USER)  # the job starts: MoM opens its spool
        with open(spooled, "a") as f:
            f.write("spooled-line-1\n")
            f.flush()
            lines.wait_for("spooled-line-1", 20)
            f.write("spooled-line-2\n")
        lines.wait_for("spooled-line-2", 10)
        assert not final.exists()
        asked = len(kit.calls())
        spool.pbs_stage_out(spooled, final, USER)  # the job ends: copied to Output_Path, spool removed
        kit.pbs_jobs({job: pbs_attrs(["n1"], state="F", job=job)})
        spool.pbs_job_purge(kit.pbs_home, job)     # … and purged from MoM
        follower.wait(30)
        assert follower.returncode == 0, follower.stderr.read()
        assert [c for c in kit.calls()[asked:] if job in c] == [], "the agent asked qstat about its job"
    finally:
        stop(follower)
    shown = master("logs", f"{job}:n1", check=False)
    if shown.returncode == 0:  # the agent may already have seen the job end and gone: then nothing to ask
        assert shown.stdout == "spooled-line-1\nspooled-line-2\n"
    final.unlink(missing_ok=True)
    kit.on_node("n1", [str(kit.mom_priv / "epilogue"), job, USER, USER, "contract", "1", "", "", "workq",
                       "null", "0"], env, cwd=kit.mom_priv)
    expect_gone(SERVER, job, "n1", pid)


def pbs_hook(kit: Kit, node: str, event: str, job: str, python: str = "3", **attrs) -> subprocess.CompletedProcess:
    """The PBS Pro hook as pbs_mom runs it: pbs_python, root, MoM's environment, forked and setsid;
    group killed after. python="2.7": the interpreter PBS Professional 18.x-19.x embed."""
    job_attrs = {"id": job, "euser": USER, "egroup": USER, "Output_Path": f"dxlab-login:/home/{USER}/o",
                 "Error_Path": f"dxlab-login:/home/{USER}/e", "Variable_List": {"PBS_O_WORKDIR": f"/home/{USER}"}}
    job_attrs.update(attrs)
    env = {**kit.mom_env(None), "PYTHONPATH": str(kit.pbs_python), "FAKE_PBS_EVENT": event,
           "FAKE_PBS_JOB": json.dumps(job_attrs), "FAKE_PBS_PYTHON": python}
    result = kit.on_node(node, ["/usr/bin/python3", str(kit.root / "hooks" / "dxflow_hook.py")], env,
                         cwd=kit.mom_priv)
    assert result.returncode == 0 and "rejected" not in result.stderr, result.stderr
    return result


def test_pbs_hook_every_host_and_never_twice(kit, master):
    job = pbs_job_id()
    kit.pbs_jobs({job: pbs_attrs(["n1", "n2"], job=job)})
    first = pbs_hook(kit, "n1", "execjob_begin", job)
    sister = pbs_hook(kit, "n2", "execjob_begin", job)
    pid1 = expect_agent(kit, SERVER, job, "n1", first.pgid)
    pid2 = expect_agent(kit, SERVER, job, "n2", sister.pgid)
    # execjob_prologue and a classic prologue on the same host: same record key, the agent is alive
    pbs_hook(kit, "n1", "execjob_prologue", job)
    kit.on_node("n1", [str(kit.mom_priv / "prologue"), job, USER, USER], kit.mom_env(), cwd=kit.mom_priv)
    assert json.loads(record_path(SERVER, job, "n1").read_text())["pid"] == pid1
    assert agent_leaders(job, "n1") == [pid1] and agent_leaders(job, "n2") == [pid2]
    master.wait_ready(job, {"n1", "n2"}, asked=["qstat", "-f", "-F", "json"])
    pbs_hook(kit, "n1", "execjob_epilogue", job)
    pbs_hook(kit, "n2", "execjob_end", job)
    pbs_hook(kit, "n1", "execjob_end", job)  # the second stop finds nothing: fine
    expect_gone(SERVER, job, "n1", pid1)
    expect_gone(SERVER, job, "n2", pid2)


def test_pbs_hook_under_python_2_starts_and_stops_the_agent(kit):
    """PBS Professional 18.x-19.x run hooks under Python 2.7, whose subprocess takes no timeout: the
    old hook raised TypeError there, logged it at debug level, and never started an agent."""
    job = pbs_job_id()
    kit.pbs_jobs({job: pbs_attrs(["n1"], job=job)})
    begin = pbs_hook(kit, "n1", "execjob_begin", job, python="2.7")
    assert "pbs.logmsg" not in begin.stderr, begin.stderr
    pid = expect_agent(kit, SERVER, job, "n1", begin.pgid)
    end = pbs_hook(kit, "n1", "execjob_end", job, python="2.7")
    assert "pbs.logmsg" not in end.stderr, end.stderr
    wait_for(lambda: proc_stat(pid) is None, 5, what=f"agent {pid} stopped")
    assert not record_path(SERVER, job, "n1").exists()


# -- Torque ---------------------------------------------------------------------
def test_torque_prologue_on_mother_superior_and_sisters(kit, master):
    job = pbs_job_id()
    kit.pbs_jobs({job: {**pbs_attrs(["n1", "n2"]), "exec_host": "n1/0-1+n2/0"}})
    nodefile = kit.root / "torque_home" / "aux"
    nodefile.mkdir(exist_ok=True)
    (nodefile / job).write_text("n1\nn1\nn2\n")
    # the prologue environment Torque's source sets (prolog.c), argv 1-8 (1-11 for the epilogue)
    env = {**MOM_ENV, "PBS_NODEFILE": str(nodefile / job), "PBS_MSHOST": "n1", "PBS_NODENUM": "0",
           "PBS_O_WORKDIR": f"/home/{USER}", "PBS_NUM_NODES": "2", "PBS_NUM_PPN": "1", "PBS_NP": "3",
           "TMPDIR": f"/tmp/{job}"}
    pro_args = [job, USER, USER, "contract", "nodes=2:ppn=1,walltime=00:10:00", "batch", "acct",
                f"/var/spool/torque/mom_priv/jobs/{job}.SC"]
    ms = kit.on_node("n1", [str(kit.torque_priv / "prologue"), *pro_args], env, cwd=kit.torque_priv)
    sister = kit.on_node("n2", [str(kit.torque_priv / "prologue.parallel"), *pro_args],
                         {**env, "PBS_NODENUM": "1"}, cwd=kit.torque_priv)
    assert ms.returncode == 0 and sister.returncode == 0
    pid1 = expect_agent(kit, SERVER, job, "n1", ms.pgid)
    pid2 = expect_agent(kit, SERVER, job, "n2", sister.pgid)
    assert json.loads(registration_path(SERVER, job, "n1").read_text())["scheduler"] == "torque"
    master.wait_ready(job, {"n1", "n2"}, asked=["qstat", "-f", "-x"])  # Torque's way: XML, not JSON
    epi_args = [job, USER, USER, "contract", "4242", "nodes=2:ppn=1", "cput=00:00:01", "batch", "acct", "0",
                f"/var/spool/torque/mom_priv/jobs/{job}.SC"]
    kit.on_node("n1", [str(kit.torque_priv / "epilogue"), *epi_args], env, cwd=kit.torque_priv)
    kit.on_node("n2", [str(kit.torque_priv / "epilogue.parallel"), *epi_args], env, cwd=kit.torque_priv)
    expect_gone(SERVER, job, "n1", pid1)
    expect_gone(SERVER, job, "n2", pid2)


# -- LSF ------------------------------------------------------------------------
def lsf_job_env(kit: Kit, job: str, nodes: list[str], **extra: str) -> dict:
    """What a pre-exec sees (LSF 10.1 env page): the job's own environment plus LSF's LSB_* variables."""
    home = pwd.getpwnam(USER).pw_dir
    env = {"HOME": home, "USER": USER, "LOGNAME": USER, "SHELL": "/bin/bash", "LANG": "C.UTF-8",
           "LSB_JOBID": job, "LSB_JOBINDEX": "0", "LSB_QUEUE": "normal", "LSB_JOBNAME": "contract",
           "LSB_HOSTS": " ".join(nodes), "LSB_MCPU_HOSTS": " ".join(f"{n} 1" for n in nodes),
           "LS_SUBCWD": home, "LS_EXECCWD": home, "LSB_OUTPUTFILE": f"{home}/contract.%J.out",
           "LSF_BINDIR": str(kit.bin), "LSF_ENVDIR": str(kit.bin)}
    env.update(extra)
    return env


def lsf_record(job: str, nodes: list[str], user: str = USER) -> dict:
    return {"JOBID": job, "JOBINDEX": "0", "USER": user, "STAT": "RUN", "EXEC_HOST": ":".join(nodes),
            "JOB_NAME": "contract", "EXEC_CWD": f"/home/{USER}", "OUTPUT_FILE": f"/home/{USER}/contract.%J.out",
            "ERROR_FILE": ""}


def test_lsf_host_pre_exec_as_the_jobs_user(kit, master):
    job = str(secrets.randbelow(900000) + 100000)
    nodes = ["n1", "n2"]
    kit.lsf_jobs([lsf_record(job, nodes)])
    env = lsf_job_env(kit, job, nodes)
    pre = {n: kit.lsf_exec(n, "host_pre_exec", env, USER) for n in nodes}
    assert all(o["returncode"] == 0 for o in pre.values())
    pids = {n: expect_agent(kit, "default", job, n, pre[n]["pid"], user_record=True) for n in nodes}
    master.wait_ready(job, set(nodes), asked=["bjobs", "-json", "-o", " ".join(LSF.fields), "-u", USER])
    for n in nodes:
        assert kit.lsf_exec(n, "host_post_exec", env, USER)["returncode"] == 0
    for n in nodes:
        expect_gone("default", job, n, pids[n], user_record=True)


def test_lsf_host_pre_exec_as_root_starts_nothing_and_says_why(kit):
    """LSB_PRE_POST_EXEC_USER=root: with LSF's default LSF_ROOT_USER=N root may not run bjobs (the
    stand-in refuses it too), and the job's environment — its user's to write — names a user (bob
    here, for alice's job) and points bjobs and Python at code that must never run as root. No agent
    starts, nothing of the job's environment runs, and the hook log tells the admin what to change."""
    job = str(secrets.randbelow(900000) + 100000)
    kit.lsf_jobs([lsf_record(job, ["n1"])])
    env = lsf_job_env(kit, job, ["n1"], LSF_BINDIR=str(kit.evil), LSF_ENVDIR=str(kit.evil),
                      PYTHONPATH=str(kit.evil), USER="bob", LOGNAME="bob")
    t0 = time.time()
    seen = len(kit.bjobs_uids())
    log_size = HOOK_LOG.stat().st_size if HOOK_LOG.exists() else 0
    pre = kit.lsf_exec("n1", "host_pre_exec", env, None)
    assert pre["returncode"] == 0  # the job runs all the same
    assert agent_records_since(t0) == [] and not agent_leaders(job, "n1")
    assert 0 not in kit.bjobs_uids()[seen:], "root ran bjobs"
    assert not kit.marker.exists(), "the job's environment ran code as root"
    with open(HOOK_LOG, "rb") as f:
        f.seek(log_size)
        logged = f.read().decode(errors="replace")
    assert "ERROR" in logged and "LSB_PRE_POST_EXEC_USER" in logged, logged
    assert kit.lsf_exec("n1", "host_post_exec", env, None)["returncode"] == 0
    assert not kit.marker.exists()


def test_lsf_logs_follow_shows_the_spooled_output_of_a_running_job(kit, master):
    """sbatchd writes a running job's output to <job file>.out in ~/.lsbatch and copies it to bsub -o's
    file only when the job finishes (LSB_STDOUT_DIRECT unset): `dxflow logs -f` shows the lines while
    the job writes them. The old agent read only the final file. The follower ends when sbatchd removes
    the job's /tmp/JOB.tmpdir and job file, seen on the node: the agent never asks bjobs whether the job
    still runs (issue #11; the old agent asked every 10 s while followed)."""
    job = str(secrets.randbelow(900000) + 100000)
    home = Path(pwd.getpwnam(USER).pw_dir)
    final = home / f"contract.{job}.out"
    kit.lsf_jobs([lsf_record(job, ["n1"])])
    job_file, out = spool.lsf_spool_open(USER, job)  # sbatchd sets the job up, then runs the pre-exec
    env = lsf_job_env(kit, job, ["n1"], LSB_JOBFILENAME=str(job_file))
    pre = kit.lsf_exec("n1", "host_pre_exec", env, USER)
    pid = expect_agent(kit, "default", job, "n1", pre["pid"], user_record=True)
    master.wait_ready(job, {"n1"}, asked=["bjobs", "-json", "-o", " ".join(LSF.fields), "-u", USER])
    follower = popen_as(USER, ["env", f"PATH={master.path}", DXFLOW, "logs", "-f", f"{job}:n1"])
    try:
        lines = Lines(follower)
        with open(out, "a") as f:
            f.write("lsf-line-1\n")
            f.flush()
            lines.wait_for("lsf-line-1", 20)
            f.write("lsf-line-2\n")
        lines.wait_for("lsf-line-2", 10)
        assert not final.exists()
        asked = len(kit.calls())
        spool.lsf_copy_out(job_file, final, USER)  # the job finishes: copied to -o's file, spool removed
        kit.lsf_jobs([dict(lsf_record(job, ["n1"]), STAT="DONE")])
        follower.wait(30)
        assert follower.returncode == 0, follower.stderr.read()
        assert [c for c in kit.calls()[asked:] if job in c] == [], "the agent asked bjobs about its job"
    finally:
        stop(follower)
    final.unlink(missing_ok=True)
    assert kit.lsf_exec("n1", "host_post_exec", env, USER)["returncode"] == 0
    expect_gone("default", job, "n1", pid, user_record=True)


def test_lsf_agent_sees_its_job_end_on_the_node_whatever_bob_leaves_in_tmp(kit):
    """When sbatchd removes alice's job's /tmp/JOB.tmpdir and job file, bob makes a /tmp/JOB.tmpdir of his
    own at once, to keep her agent believing the job runs. The agent counts only a folder of the job's
    user: it sees the end on its node, stops by itself (no post-exec needed) and never asks bjobs."""
    job = str(secrets.randbelow(900000) + 100000)
    kit.lsf_jobs([lsf_record(job, ["n1"])])
    job_file, _ = spool.lsf_spool_open(USER, job)
    env = lsf_job_env(kit, job, ["n1"], LSB_JOBFILENAME=str(job_file))
    pre = kit.lsf_exec("n1", "host_pre_exec", env, USER)
    pid = expect_agent(kit, "default", job, "n1", pre["pid"], user_record=True)
    time.sleep(1)  # the agent's first look, at its start, has seen the job's folder
    final = Path(pwd.getpwnam(USER).pw_dir) / f"contract.{job}.out"
    asked = len(kit.calls())
    spool.lsf_copy_out(job_file, final, USER)  # the job is done: sbatchd removes its folder and job file
    trap = spool.lsf_tmpdir(job)
    run(["runuser", "-u", "bob", "--", "mkdir", "-m", "0777", str(trap)])
    try:
        kit.lsf_jobs([dict(lsf_record(job, ["n1"]), STAT="DONE")])
        wait_for(lambda: proc_stat(pid) is None, 40, what=f"agent {pid} stopped by itself")
        assert [c for c in kit.calls()[asked:] if job in c] == [], "the agent asked bjobs about its job"
    finally:
        trap.rmdir()
        final.unlink(missing_ok=True)
    assert kit.lsf_exec("n1", "host_post_exec", env, USER)["returncode"] == 0
    expect_gone("default", job, "n1", pid, user_record=True)


# -- dxflow exec and shell run as tasks of the job (issue #9, item 2) -----------------------------
def tasks_of(kit: Kit, pid: int) -> list[dict]:
    return [t for t in kit.tasks() if t["pid"] == pid]


def test_pbs_exec_and_shell_run_through_pbs_attach_as_tasks_of_the_job(kit, master):
    """The agent starts `dxflow exec` and `dxflow shell` commands through ``pbs_attach -j JOB``: MoM takes
    them as tasks of the job (accounted, in its cgroups, killed with it). The stand-in refuses a job
    not running on the host or of another user, as MoM does, and execs the command in place: the
    command's pid is the one it logged. Before, they ran beside the job."""
    job = pbs_job_id()
    kit.pbs_jobs({job: pbs_attrs(["n1"], job=job)})
    (kit.pbs_home / "aux" / job).write_text("n1\n")
    env = kit.mom_env()
    pro = kit.on_node("n1", [str(kit.mom_priv / "prologue"), job, USER, USER], env, cwd=kit.mom_priv)
    pid = expect_agent(kit, SERVER, job, "n1", pro.pgid)
    master.wait_ready(job, {"n1"}, asked=["qstat", "-f", "-F", "json"])
    out = master("exec", f"{job}:n1", "--", "sh", "-c", 'echo "$$"; echo "a  b" "$1"', "sh", "-x; y")
    task_pid, words = out.stdout.splitlines()
    assert words == "a  b -x; y"  # each argument stays one: no shell between the agent and the command
    task = tasks_of(kit, int(task_pid))
    assert len(task) == 1 and task[0]["launcher"] == "pbs_attach", kit.tasks()
    assert (task[0]["job"], task[0]["host"], task[0]["uid"]) == (job, "n1", pwd.getpwnam(USER).pw_uid)
    missing = master("exec", f"{job}:n1", "--", "no-such-command-dxflow", check=False)
    assert missing.returncode == 127 and "command not found" in missing.stderr, missing
    line = f"PATH={shlex.quote(master.path)} exec {DXFLOW} shell {job}:n1"
    shell = run(["runuser", "-l", USER, "-c", line], input='echo "shell-pid=$$"; exit 0\n', timeout=60)
    shell_pid = int(re.search(r"shell-pid=(\d+)", shell.stdout).group(1))
    task = tasks_of(kit, shell_pid)
    assert len(task) == 1 and task[0]["job"] == job, kit.tasks()
    assert task[0]["session"] == shell_pid  # the shell's own session is the task, with its terminal
    kit.on_node("n1", [str(kit.mom_priv / "epilogue"), job, USER, USER, "contract", "1", "", "", "workq",
                       "null", "0"], env, cwd=kit.mom_priv)
    expect_gone(SERVER, job, "n1", pid)


def test_pbs_agent_on_a_sister_host_joins_the_jobs_cgroups_without_waiting_for_a_task(kit):
    """pbs_cgroups makes the job's cgroups (limits written) on every host at execjob_begin, but a sister
    host gets a process there only with a task. The agent joins them as soon as they exist; before,
    its launcher waited 20 s for a process that never came, then started the agent outside them."""
    job = pbs_job_id()
    kit.pbs_jobs({job: pbs_attrs(["n1", "n2"], job=job)})
    prefix = f"dxtest{secrets.token_hex(3)}"
    hooks = kit.mom_priv / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "pbs_cgroups.HK").write_text("type=site\nenabled=true\n")  # as the server copies it to MoM
    (hooks / "pbs_cgroups.CF").write_text(json.dumps({"cgroup_prefix": prefix}))
    made = [Path(f"/sys/fs/cgroup/{c}/{prefix}.service/jobid/{job}") for c in ("memory", "cpuacct")]
    try:
        for cg in made:  # what pbs_cgroups does at execjob_begin: the folders, then the limits
            cg.mkdir(parents=True)
        (made[0] / "memory.limit_in_bytes").write_text(str(1 << 30))
        begin = pbs_hook(kit, "n2", "execjob_begin", job)
        pid = expect_agent(kit, SERVER, job, "n2", begin.pgid)
        groups = Path(f"/proc/{pid}/cgroup").read_text()
        for controller in ("memory", "cpuacct"):
            assert re.search(rf":[a-z,]*{controller}[a-z,]*:/{prefix}\.service/jobid/{re.escape(job)}$", groups,
                             re.M), groups
        assert json.loads(record_path(SERVER, job, "n2").read_text())["job_cgroups"] == [str(p) for p in made]
        pbs_hook(kit, "n2", "execjob_end", job)
        expect_gone(SERVER, job, "n2", pid)
    finally:
        for name in ("pbs_cgroups.HK", "pbs_cgroups.CF"):  # the other tests run without the cgroup hook
            (hooks / name).unlink(missing_ok=True)
        for cg in made:
            for folder in (cg, cg.parent, cg.parent.parent):
                try:
                    folder.rmdir()
                except OSError:
                    pass


def test_lsf_exec_runs_through_blaunch_as_a_task_of_the_job(kit, master):
    """LSF's pre-exec runs as the job's user, who cannot put the agent into the job's cgroup: `dxflow exec`
    commands go through ``blaunch -no-shell HOST``, which has sbatchd and RES start them as tasks of the
    job. The stand-in checks what blaunch needs: LSB_JOBID (and index) of a running job of the caller,
    and the host in the job's allocation (LSB_MCPU_HOSTS, handed on by the pre-exec)."""
    job = str(secrets.randbelow(900000) + 100000)
    nodes = ["n1", "n2"]
    kit.lsf_jobs([lsf_record(job, nodes)])
    env = lsf_job_env(kit, job, nodes)
    pre = kit.lsf_exec("n2", "host_pre_exec", env, USER)
    pid = expect_agent(kit, "default", job, "n2", pre["pid"], user_record=True)
    master.wait_ready(job, {"n2"}, asked=["bjobs", "-json", "-o", " ".join(LSF.fields), "-u", USER])
    out = master("exec", f"{job}:n2", "--", "sh", "-c", 'echo "$$"; echo "$LSB_JOBID" "$1"', "sh", "$(id)")
    task_pid, words = out.stdout.splitlines()
    assert words == f"{job} $(id)"
    task = tasks_of(kit, int(task_pid))
    assert len(task) == 1 and task[0]["launcher"] == "blaunch", kit.tasks()
    assert (task[0]["job"], task[0]["index"], task[0]["host"]) == (job, "0", "n2")
    assert task[0]["shell"] is False  # -no-shell: blaunch puts no shell between it and the command
    assert kit.lsf_exec("n2", "host_post_exec", env, USER)["returncode"] == 0
    expect_gone("default", job, "n2", pid, user_record=True)


# -- hostile values ---------------------------------------------------------------
def hostile_values(marker: Path) -> list[str]:
    m = shlex.quote(str(marker))
    return [f"1.{SERVER};touch {m}", f"$(touch {m})", f"`touch {m}`", f"'; touch {m}; '", f'"; touch {m}; "',
            f"x\ntouch {m}\n", "1" * 20000 + f".{SERVER}", f"../../../tmp/x.{SERVER}", "-h", "--scheduler=lsf"]


def agent_records_since(t0: float) -> list[str]:
    """Records of PBS/Torque/LSF agents made after t0 (Slurm tests may run alongside)."""
    out = []
    user_run = Path(pwd.getpwnam(USER).pw_dir) / ".dxflow" / "run"
    for path in [*RUNTIME.glob("*.json"), *user_run.glob("*.json")]:
        try:
            if path.stat().st_mtime >= t0 and json.loads(path.read_text()).get("scheduler") in ("pbs", "torque", "lsf"):
                out.append(path.name)
        except (OSError, ValueError):
            pass
    return out


def test_hostile_pbs_and_torque_arguments_start_nothing(kit):
    t0 = time.time()
    env = kit.mom_env()
    good = pbs_job_id()
    cases = [[v, USER, USER] for v in hostile_values(kit.marker)]
    cases += [[good, v, USER] for v in hostile_values(kit.marker)]
    cases += [[good, "no-such-user-dxflow", USER], [good, "root", "root"], [good], []]
    for argv in cases:
        for script in (kit.mom_priv / "prologue", kit.torque_priv / "prologue.parallel"):
            result = kit.on_node("n1", [str(script), *argv], env, cwd=kit.mom_priv)
            assert result.returncode == 0 and result.seconds < 5, (argv, result)
    assert not kit.marker.exists(), "a hostile argument ran as a command"
    assert agent_records_since(t0) == []


def test_hostile_group_and_environment_leave_the_job_unharmed(kit):
    """Valid job and user, hostile everything else: the agent starts as the user, runs nothing
    it was handed, and is stopped again."""
    job = pbs_job_id()
    m = shlex.quote(str(kit.marker))
    env = {**MOM_ENV, "PBS_NODEFILE": "/etc/shadow", "PBS_O_WORKDIR": f"$(touch {m})",
           "PBS_JOBDIR": f"/tmp;touch {m}", "DXFLOW_JOB_STDOUT": f"--bind=0.0.0.0:1`touch {m}`"}
    pro = kit.on_node("n1", [str(kit.torque_priv / "prologue"), job, USER, f"root;touch {m}"], env,
                      cwd=kit.torque_priv)
    assert pro.returncode == 0
    path = record_path(SERVER, job, "n1")
    kit.started.append(path)
    record = wait_for(lambda: path.exists() and json.loads(path.read_text()), 10, what="record")
    assert record["gid"] == pwd.getpwnam(USER).pw_gid  # not root's group, whatever argv 3 said
    kit.on_node("n1", [str(kit.torque_priv / "epilogue"), job, USER, USER], env, cwd=kit.torque_priv)
    wait_for(lambda: proc_stat(record["pid"]) is None, 5, what="agent stopped")
    assert not kit.marker.exists()
    # the PBS Pro hook with hostile job attributes: an unknown user, quotes, newlines
    for attrs in ({"euser": "no-such-user-dxflow"}, {"id": f"1;touch {m}"}, {"egroup": f"x\n$(touch {m})"},
                  {"Output_Path": f"h:/tmp/'$(touch {m})'"}, {"Variable_List": {"PBS_O_WORKDIR": f"`touch {m}`"}}):
        hjob = pbs_job_id()
        pbs_hook(kit, "n1", "execjob_begin", hjob, **attrs)
        kit.started.append(record_path(SERVER, hjob, "n1"))
        pbs_hook(kit, "n1", "execjob_end", hjob, **attrs)
    assert not kit.marker.exists()


def test_hostile_lsf_environment_starts_nothing(kit):
    t0 = time.time()
    m = shlex.quote(str(kit.marker))
    good = str(secrets.randbelow(900000) + 100000)
    kit.lsf_jobs([lsf_record(good, ["n1"], user="no-such-user-dxflow"),
                  lsf_record("424242", ["n1"], user=f"alice;touch {m}")])
    cases = [{"LSB_JOBID": v} for v in hostile_values(kit.marker)]
    cases += [{"LSB_JOBID": good},                   # as root: refused whatever the job says
              {"LSB_JOBID": "424242", "USER": f"alice;touch {m}"},
              {"LSB_JOBID": good, "LSB_JOBINDEX": f"1];touch {m}"},
              {"LSB_JOBID": "", "LSB_HOSTS": f"n1 $(touch {m})"},
              {"LSB_JOBID": good, "LSB_JOBFILENAME": f"/tmp/$(touch {m})"}]
    for extra in cases:  # run as root (LSB_PRE_POST_EXEC_USER=root): never an agent
        env = lsf_job_env(kit, good, ["n1"], PYTHONPATH=str(kit.evil), LSF_BINDIR=str(kit.evil), **extra)
        outcome = kit.lsf_exec("n1", "host_pre_exec", env, None)
        assert outcome["returncode"] == 0, extra
    # as the job's user, hostile ids and hosts start nothing either
    for extra in cases[:4]:
        outcome = kit.lsf_exec("n1", "host_pre_exec", lsf_job_env(kit, good, ["n1"], **extra), USER)
        assert outcome["returncode"] == 0, extra
    assert not kit.marker.exists(), "a hostile value or environment ran code"
    assert agent_records_since(t0) == []
