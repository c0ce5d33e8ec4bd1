"""PBS, Torque and LSF adapters: hook arguments and environment, qstat/bjobs output, states.

The scheduler seam is faked in one place per adapter: ``run`` in its module.
"""

from __future__ import annotations

import grp
import json
import os
import pwd

import pytest

from dxflow.cli.hook import split_hook_args
from dxflow.errors import SchedulerError, UsageError
from dxflow.schedulers import get_scheduler
from dxflow.schedulers import lsf as lsf_mod
from dxflow.schedulers import pbs as pbs_mod
from dxflow.schedulers.base import JobState
from dxflow.schedulers.lsf import LSF, daemon_environ, lsf_hosts
from dxflow.schedulers.pbs import PBS, Torque, exec_hosts, parse_variable_list, read_hostfile, strip_host

ME = pwd.getpwuid(os.getuid())
MY_GROUP = grp.getgrgid(ME.pw_gid).gr_name

# `qstat -f -F json` of OpenPBS 23, trimmed to what dxflow reads (plus neighbours it must ignore).
QSTAT_JSON = {
    "timestamp": 1700000000, "pbs_version": "23.06.06", "pbs_server": "head",
    "Jobs": {
        "123.head": {
            "Job_Name": "train", "Job_Owner": "alice@login.example", "job_state": "R", "queue": "workq",
            "euser": "alice", "egroup": "alice", "exec_host": "n1/0*2+n2/0", "exec_vnode": "(n1:ncpus=2)+(n2:ncpus=1)",
            "Output_Path": "login.example:/home/alice/train.o123", "Error_Path": "login.example:/home/alice/train.e123",
            "Variable_List": {"PBS_O_HOME": "/home/alice", "PBS_O_WORKDIR": "/home/alice/run"},
        },
        "124.head": {"Job_Name": "wait", "Job_Owner": "bob@login.example", "job_state": "Q",
                     "Variable_List": {"PBS_O_WORKDIR": "/home/bob"}},
        "125[].head": {"Job_Name": "array", "Job_Owner": "alice@login.example", "job_state": "B"},
    },
}

# `qstat -f -x` of Torque 6: the same attributes as XML.
QSTAT_XML = (
    "<Data><Job><Job_Id>77.torque.example</Job_Id><Job_Name>sim</Job_Name>"
    "<Job_Owner>alice@login</Job_Owner><job_state>R</job_state><queue>batch</queue>"
    "<exec_host>n3/0-1+n4/0</exec_host><Output_Path>login:/home/alice/sim.o77</Output_Path>"
    "<Error_Path>login:/home/alice/sim.e77</Error_Path>"
    "<Resource_List><nodes>2:ppn=2</nodes><walltime>01:00:00</walltime></Resource_List>"
    "<Variable_List>PBS_O_HOME=/home/alice,PBS_O_WORKDIR=/home/alice/a\\,b</Variable_List>"
    "<euser>alice</euser></Job>"
    "<Job><Job_Id>78.torque.example</Job_Id><Job_Owner>bob@login</Job_Owner><job_state>C</job_state></Job></Data>"
)

# `bjobs -json -o "jobid jobindex user stat exec_host …"` of LSF 10.1.
BJOBS = {
    "COMMAND": "bjobs", "JOBS": 3,
    "RECORDS": [
        {"JOBID": "1234", "JOBINDEX": "0", "USER": "alice", "STAT": "RUN", "EXEC_HOST": "2*n1:n2",
         "JOB_NAME": "train", "EXEC_CWD": "/home/alice/run", "OUTPUT_FILE": "/home/alice/out.%J", "ERROR_FILE": ""},
        {"JOBID": "1240", "JOBINDEX": "3", "USER": "alice", "STAT": "PEND", "EXEC_HOST": "-",
         "JOB_NAME": "arr[3]", "EXEC_CWD": "", "OUTPUT_FILE": "o.%J.%I", "ERROR_FILE": ""},
        {"JOBID": "1300", "JOBINDEX": "0", "USER": "bob", "STAT": "DONE", "EXEC_HOST": "n9",
         "JOB_NAME": "x", "EXEC_CWD": "/home/bob", "OUTPUT_FILE": "", "ERROR_FILE": ""},
    ],
}


class FakeRun:
    """Stands in for the adapters' ``run``: records argv and env, answers from a table or raises."""

    def __init__(self, out: str = "", error: SchedulerError | None = None) -> None:
        self.out, self.error, self.calls = out, error, []

    def __call__(self, argv, *, timeout=30.0, env=None):
        self.calls.append((list(argv), env))
        if self.error:
            raise self.error
        return self.out


# -- small parsers ------------------------------------------------------------
def test_exec_host_forms():
    assert exec_hosts("n1/0*2+n2/0") == ["n1", "n2"]
    assert exec_hosts("n3/0-1+n4/0") == ["n3", "n4"]
    assert exec_hosts("n1.cluster.example/0+n1.cluster.example/1") == ["n1"]
    assert exec_hosts("") == []


def test_lsf_host_forms():
    assert lsf_hosts("n1 2 n2 1") == ["n1", "n2"]           # LSB_MCPU_HOSTS
    assert lsf_hosts("n1 n1 n2") == ["n1", "n2"]            # LSB_HOSTS, one entry per slot
    assert lsf_hosts("2*n1:n2") == ["n1", "n2"]             # bjobs EXEC_HOST
    assert lsf_hosts("n1.example.org") == ["n1"]
    assert lsf_hosts("n1;rm -rf / n2") == ["n2"]            # not a host name: dropped


def test_paths_and_variables():
    assert strip_host("login:/home/a/x.o1") == "/home/a/x.o1"
    assert strip_host("/home/a/x:y") == "/home/a/x:y"
    assert parse_variable_list("A=1,B=x\\,y,C=") == {"A": "1", "B": "x,y", "C": ""}
    assert parse_variable_list({"A": 1}) == {"A": "1"}


def test_hostfile(tmp_path):
    f = tmp_path / "nodes"
    f.write_text("n1.example\nn1.example\nn2\n\n$(reboot)\n")
    assert read_hostfile(str(f)) == ["n1", "n2"]
    assert read_hostfile(str(tmp_path / "missing")) == []
    assert read_hostfile(str(tmp_path)) == []  # a folder is not a node file
    (tmp_path / "link").symlink_to(f)
    assert read_hostfile(str(tmp_path / "link")) == []  # never follows a link as root


@pytest.mark.parametrize("rest, expected", [
    (["--scheduler", "slurm"], ("slurm", [])),
    (["--scheduler", "pbs", "--", "1.h", "alice", "g"], ("pbs", ["1.h", "alice", "g"])),
    (["--scheduler=lsf"], ("lsf", [])),
    (["--scheduler", "pbs", "--", "--", "-x"], ("pbs", ["--", "-x"])),
    (["--scheduler", "torque", "--", "-h", "--scheduler", "x"], ("torque", ["-h", "--scheduler", "x"])),
])
def test_hook_cli_arguments(rest, expected):
    assert split_hook_args("slurm", rest) == expected


# -- PBS hooks ----------------------------------------------------------------
def test_pbs_classic_prologue_arguments(tmp_path):
    home = tmp_path / "pbs_home"
    (home / "aux").mkdir(parents=True)
    (home / "aux" / "42.head.example").write_text("n7.example\nn7.example\nn8.example\n")
    sched = PBS({"PBS_HOME": str(home), "PATH": "/usr/bin:/bin"})
    job = sched.hook_job(["42.head.example", ME.pw_name, MY_GROUP])
    assert (job.job, job.user, job.uid, job.gid) == ("42.head.example", ME.pw_name, ME.pw_uid, ME.pw_gid)
    assert job.cluster == "head"
    assert job.nodes == ["n7", "n8"]
    assert job.scheduler == "pbs"


def test_pbs_hook_and_classic_name_the_agent_alike():
    """The PBS Pro hook passes job.id, euser, egroup: the same record key as the classic prologue."""
    classic = PBS({}).hook_job(["7.head", ME.pw_name, MY_GROUP, "jobname", "extra"])
    hook = PBS({"PBS_O_WORKDIR": "/w", "DXFLOW_JOB_STDOUT": "login:/o"}).hook_job(["7.head", ME.pw_name, MY_GROUP])
    assert (classic.cluster, classic.job, classic.node) == (hook.cluster, hook.job, hook.node)
    assert hook.work_dir == "/w" and hook.stdout == "/o"


def test_pbs_job_and_user_never_come_from_the_environment():
    env = {"PBS_JOBID": "9.head", "USER": ME.pw_name, "PBS_O_LOGNAME": ME.pw_name}
    with pytest.raises(UsageError, match="expected the scheduler's arguments"):
        PBS(env).hook_job([])


def test_pbs_group_the_user_is_not_in_falls_back(monkeypatch):
    others = [g for g in grp.getgrall() if g.gr_gid not in os.getgrouplist(ME.pw_name, ME.pw_gid)]
    if not others:
        pytest.skip("every group on this host is one of ours")
    job = PBS({}).hook_job(["8.head", ME.pw_name, others[0].gr_name])
    assert job.gid == ME.pw_gid
    assert PBS({}).hook_job(["8.head", ME.pw_name, "no-such-group-x"]).gid == ME.pw_gid


@pytest.mark.parametrize("argv", [
    ["1.head;touch /tmp/x", "alice", "alice"],
    ["$(id)", "alice", "alice"],
    ["1.head", "alice'\"", "alice"],
    ["1.head\n2", "alice", "alice"],
    ["9" * 5000, "alice", "alice"],
    ["../../etc/passwd", "alice", "alice"],
    ["1.head", "no-such-user-dxflow", "g"],
    ["-x", "alice", "alice"],
])
def test_pbs_hostile_arguments_refused(argv):
    with pytest.raises(UsageError):
        PBS({}).hook_job(argv)


def test_torque_reads_the_prologue_environment(tmp_path):
    nodefile = tmp_path / "77.torque"
    nodefile.write_text("n3\nn3\nn4\n")
    env = {"PBS_NODEFILE": str(nodefile), "PBS_O_WORKDIR": "/home/x/run", "PBS_MSHOST": "n3"}
    job = Torque(env).hook_job(["77.torque.example", ME.pw_name, MY_GROUP, "sim", "walltime=1:00", "batch",
                                "acct", "/var/spool/torque/mom_priv/jobs/77.SC"])
    assert job.scheduler == "torque" and job.cluster == "torque"
    assert job.nodes == ["n3", "n4"] and job.work_dir == "/home/x/run"


# -- PBS queries --------------------------------------------------------------
def test_pbs_jobs_from_qstat_json(monkeypatch):
    fake = FakeRun(json.dumps(QSTAT_JSON))
    monkeypatch.setattr(pbs_mod, "run", fake)
    jobs = {j.job: j for j in PBS({"PATH": "/nonexistent"}).jobs()}
    a = jobs["123.head"]
    assert (a.user, a.state, a.nodes, a.name) == ("alice", JobState.RUNNING, ["n1", "n2"], "train")
    assert (a.work_dir, a.stdout, a.stderr) == ("/home/alice/run", "/home/alice/train.o123", "/home/alice/train.e123")
    assert jobs["124.head"].user == "bob" and jobs["124.head"].state is JobState.PENDING
    assert jobs["125[].head"].state is JobState.RUNNING
    assert fake.calls[0][0][1:] == ["-f", "-F", "json"]
    assert [j.job for j in PBS({}).jobs(user="bob")] == ["124.head"]


def test_pbs_one_job_asks_with_history(monkeypatch):
    fake = FakeRun(json.dumps({"Jobs": {"123.head": dict(QSTAT_JSON["Jobs"]["123.head"], job_state="F")}}))
    monkeypatch.setattr(pbs_mod, "run", fake)
    sched = PBS({})
    assert sched.job_state("123.head") is JobState.ENDED
    assert fake.calls[0][0][1:] == ["-f", "-F", "json", "-x", "123.head"]


def test_pbs_unknown_job_is_ended(monkeypatch):
    err = SchedulerError("qstat failed", argv=["qstat"], returncode=153, stderr="qstat: Unknown Job Id 9.head\n")
    monkeypatch.setattr(pbs_mod, "run", FakeRun(error=err))
    assert PBS({}).job("9.head") is None
    assert PBS({}).job_state("9.head") is JobState.ENDED


def test_pbs_other_failures_are_raised(monkeypatch):
    err = SchedulerError("qstat failed", argv=["qstat"], returncode=1, stderr="cannot connect to server head")
    monkeypatch.setattr(pbs_mod, "run", FakeRun(error=err))
    with pytest.raises(SchedulerError):
        PBS({}).job("9.head")
    monkeypatch.setattr(pbs_mod, "run", FakeRun("{not json"))
    with pytest.raises(SchedulerError, match="invalid JSON"):
        PBS({}).jobs()
    monkeypatch.setattr(pbs_mod, "run", FakeRun(json.dumps({"timestamp": 1})))  # no jobs at all
    assert PBS({}).jobs() == []


def test_pbs_finds_qstat_in_pbs_exec(tmp_path):
    bindir = tmp_path / "pbs" / "bin"
    bindir.mkdir(parents=True)
    (bindir / "qstat").write_text("#!/bin/sh\n")
    (bindir / "qstat").chmod(0o755)
    conf = tmp_path / "pbs.conf"
    conf.write_text(f"PBS_EXEC={tmp_path / 'pbs'}\nPBS_HOME=/var/spool/pbs\n")
    sched = PBS({"PATH": "/nonexistent", "PBS_CONF_FILE": str(conf)})
    assert sched.command("qstat") == str(bindir / "qstat")
    assert PBS({"PATH": "/nonexistent", "PBS_CONF_FILE": str(tmp_path / "none")}).command("qstat") == "qstat"


def test_torque_jobs_from_qstat_xml(monkeypatch):
    fake = FakeRun(QSTAT_XML)
    monkeypatch.setattr(pbs_mod, "run", fake)
    jobs = {j.job: j for j in Torque({}).jobs()}
    a = jobs["77.torque.example"]
    assert (a.user, a.state, a.nodes) == ("alice", JobState.RUNNING, ["n3", "n4"])
    assert a.work_dir == "/home/alice/a,b" and a.stdout == "/home/alice/sim.o77"
    assert jobs["78.torque.example"].state is JobState.ENDED
    assert fake.calls[0][0][1:] == ["-f", "-x"]
    monkeypatch.setattr(pbs_mod, "run", FakeRun("<Data><Job>"))
    with pytest.raises(SchedulerError, match="invalid XML"):
        Torque({}).jobs()


# -- LSF hooks ----------------------------------------------------------------
def as_uid(monkeypatch, uid: int) -> None:
    monkeypatch.setattr(lsf_mod.os, "getuid", lambda: uid)


def test_lsf_hook_as_the_jobs_user_takes_its_own_name(monkeypatch):
    if os.getuid() == 0:
        others = [p for p in pwd.getpwall() if p.pw_uid >= 1000 and os.path.isdir(p.pw_dir)]
        if not others:
            pytest.skip("no unprivileged user with a home on this host")
        me = others[0]
    else:
        me = ME
    as_uid(monkeypatch, me.pw_uid)
    env = {"LSB_JOBID": "1234", "LSB_JOBINDEX": "0", "LSB_MCPU_HOSTS": "n1 2 n2 1", "USER": "root",
           "LS_EXECCWD": "/home/x", "LSB_OUTPUTFILE": "/home/x/o"}
    job = LSF(env).hook_job([])
    assert (job.job, job.user, job.uid) == ("1234", me.pw_name, me.pw_uid)  # USER=root is ignored
    assert job.nodes == ["n1", "n2"] and job.work_dir == "/home/x" and job.stdout == "/home/x/o"


def test_lsf_array_element_is_its_own_job(monkeypatch):
    as_uid(monkeypatch, ME.pw_uid if ME.pw_uid else 0)
    if ME.pw_uid == 0:
        monkeypatch.setattr(lsf_mod, "daemon_environ", lambda: {})
        monkeypatch.setattr(lsf_mod, "run", FakeRun(json.dumps(
            {"RECORDS": [dict(BJOBS["RECORDS"][1], USER="root", JOBINDEX="3")]})))
    job = LSF({"LSB_JOBID": "1240", "LSB_JOBINDEX": "3"}).hook_job([])
    assert job.job == "1240[3]"


def test_lsf_hook_as_root_asks_lsf_with_the_daemons_settings(monkeypatch, tmp_path):
    """As root the job's environment names nobody and decides nothing: bjobs, found through
    sbatchd's LSF_BINDIR, says whose job it is."""
    as_uid(monkeypatch, 0)
    trusted = tmp_path / "lsf" / "bin"
    trusted.mkdir(parents=True)
    (trusted / "bjobs").write_text("#!/bin/sh\n")
    (trusted / "bjobs").chmod(0o755)
    monkeypatch.setattr(lsf_mod, "daemon_environ",
                        lambda: {"LSF_BINDIR": str(trusted), "LSF_ENVDIR": "/etc/lsf", "OTHER": "x"})
    fake = FakeRun(json.dumps({"RECORDS": [dict(BJOBS["RECORDS"][0], USER=ME.pw_name)]}))
    monkeypatch.setattr(lsf_mod, "run", fake)
    hostile = {"LSB_JOBID": "1234", "LSF_BINDIR": "/home/evil/bin", "LSF_ENVDIR": "/home/evil/conf",
               "PATH": "/home/evil/bin", "USER": "somebody-else"}
    sched = LSF(hostile)
    job = sched.hook_job([])
    assert job.user == ME.pw_name
    argv, env = fake.calls[0]
    assert argv[0] == str(trusted / "bjobs") and argv[-1] == "1234"
    assert env["LSF_BINDIR"] == str(trusted) and env["LSF_ENVDIR"] == "/etc/lsf"
    assert "/home/evil" not in json.dumps(env)
    assert sched.environ["LSF_BINDIR"] == str(trusted)  # what the agent inherits


def test_lsf_hook_as_root_without_an_answer_starts_nothing(monkeypatch):
    as_uid(monkeypatch, 0)
    monkeypatch.setattr(lsf_mod, "daemon_environ", lambda: {})
    monkeypatch.setattr(lsf_mod, "run", FakeRun(json.dumps(
        {"RECORDS": [{"JOBID": "55", "ERROR": "Job <55> is not found"}]})))
    with pytest.raises(UsageError, match="no job id or user"):
        LSF({"LSB_JOBID": "55", "USER": ME.pw_name}).hook_job([])


@pytest.mark.parametrize("env", [
    {"LSB_JOBID": "1;touch /tmp/x"},
    {"LSB_JOBID": "$(id)"},
    {"LSB_JOBID": "1\n2"},
    {"LSB_JOBID": "1" * 300},
    {"LSB_JOBID": "-h"},
    {},
])
def test_lsf_hostile_job_ids_refused(env, monkeypatch):
    as_uid(monkeypatch, ME.pw_uid)
    with pytest.raises(UsageError):
        LSF(env).hook_job([])


def test_daemon_environ_reads_a_root_ancestor():
    if os.getuid() != 0:
        pytest.skip("reading another process's environment needs root")
    with open("/proc/self/stat", "rb") as f:
        stat = f.read()
    comm = stat[stat.index(b"(") + 1:stat.rindex(b")")].decode()
    assert daemon_environ((comm,), pid=os.getpid()).get("PATH") == os.environ.get("PATH")
    assert daemon_environ(("no-such-daemon",), pid=os.getpid()) == {}


# -- LSF queries --------------------------------------------------------------
def test_lsf_jobs_from_bjobs_json(monkeypatch):
    fake = FakeRun(json.dumps(BJOBS))
    monkeypatch.setattr(lsf_mod, "run", fake)
    jobs = {j.job: j for j in LSF({"PATH": "/nonexistent"}).jobs()}
    a = jobs["1234"]
    assert (a.user, a.state, a.nodes, a.work_dir, a.stdout) == (
        "alice", JobState.RUNNING, ["n1", "n2"], "/home/alice/run", "/home/alice/out.1234")
    assert jobs["1240[3]"].state is JobState.PENDING and jobs["1240[3]"].nodes == []
    assert jobs["1240[3]"].stdout == "o.1240.3"
    assert jobs["1300"].state is JobState.ENDED
    argv, _ = fake.calls[0]
    assert argv[1:3] == ["-json", "-o"] and argv[-2:] == ["-u", "all"]
    LSF({}).jobs(user="alice")
    assert fake.calls[-1][0][-2:] == ["-u", "alice"]


def test_lsf_unknown_or_no_jobs(monkeypatch):
    monkeypatch.setattr(lsf_mod, "run", FakeRun(json.dumps(
        {"COMMAND": "bjobs", "JOBS": 1, "RECORDS": [{"JOBID": "9", "ERROR": "Job <9> is not found"}]})))
    assert LSF({}).job("9") is None
    err = SchedulerError("bjobs failed", argv=["bjobs"], returncode=255, stderr="No unfinished job found\n")
    monkeypatch.setattr(lsf_mod, "run", FakeRun(error=err))
    assert LSF({}).jobs(user="alice") == []
    assert LSF({}).job_state("9") is JobState.ENDED


def test_lsf_finds_bjobs_in_lsf_bindir(tmp_path):
    (tmp_path / "bjobs").write_text("#!/bin/sh\n")
    (tmp_path / "bjobs").chmod(0o755)
    assert LSF({"PATH": "/nonexistent", "LSF_BINDIR": str(tmp_path)}).command("bjobs") == str(tmp_path / "bjobs")


# -- state maps and lookup ------------------------------------------------------
@pytest.mark.parametrize("name, native, state", [
    ("pbs", "R", JobState.RUNNING), ("pbs", "Q", JobState.PENDING), ("pbs", "E", JobState.ENDING),
    ("pbs", "F", JobState.ENDED), ("pbs", "??", JobState.UNKNOWN), ("torque", "C", JobState.ENDED),
    ("lsf", "RUN", JobState.RUNNING), ("lsf", "PEND", JobState.PENDING), ("lsf", "EXIT", JobState.ENDED),
    ("lsf", "USUSP", JobState.RUNNING), ("lsf", "UNKWN", JobState.UNKNOWN),
])
def test_state_maps(name, native, state):
    assert get_scheduler(name, {}).map_state(native) is state


def test_adapters_name_their_backend_and_commands():
    for name, command in (("pbs", "qstat"), ("torque", "qstat"), ("lsf", "bjobs")):
        sched = get_scheduler(name, {})
        assert command in sched.commands and sched.backend().startswith(command) and sched.backend_why()


def test_doctor_reports_every_scheduler(monkeypatch, tmp_path):
    from dxflow.cli import doctor

    (tmp_path / "qstat").write_text("#!/bin/sh\n")
    (tmp_path / "qstat").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    data = doctor.report()
    by_name = {s["scheduler"]: s for s in data["schedulers"]}
    assert set(by_name) >= {"slurm", "pbs", "torque", "lsf", "local"}
    assert by_name["pbs"]["commands"] == {"qstat": str(tmp_path / "qstat")} and by_name["pbs"]["client_found"]
    assert by_name["lsf"]["commands"] == {"bjobs": None}
    assert by_name["slurm"]["backend"] in ("pyslurm", "squeue --json") and by_name["slurm"]["why"]
    assert {"site_config", "runtime_dir", "hook_log"} <= set(data)
