"""PBS, Torque and LSF adapters: hook arguments and environment, qstat/bjobs output, states,
where a running job's output is spooled, and the PBS hook's Python 2 compatibility.

The scheduler seam is faked in one place per adapter: ``run`` in its module — or, where the
real shape of the output matters (Torque's XML, PBS's JSON), the lab's ``qstat`` stand-in
(tests/lab/fakes/qstat) is run for real from a temporary folder.
"""

from __future__ import annotations

import ast
import grp
import json
import os
import pwd
import shutil
from pathlib import Path

import pytest

from dxflow.cli.hook import split_hook_args
from dxflow.errors import SchedulerError, UsageError
from dxflow.schedulers import get_scheduler
from dxflow.schedulers import lsf as lsf_mod
from dxflow.schedulers import pbs as pbs_mod
from dxflow.schedulers.base import JobState
from dxflow.schedulers.lsf import LSF, lsf_hosts
from dxflow.schedulers.pbs import PBS, Torque, exec_hosts, parse_variable_list, read_hostfile, strip_host

ROOT = Path(__file__).resolve().parents[2]
FAKES = ROOT / "tests" / "lab" / "fakes"

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

    def __call__(self, argv, *, timeout=30.0, env=None, errors="strict"):
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
    with pytest.raises(SchedulerError, match="not Torque's XML"):
        Torque({}).jobs()


# -- the lab's qstat stand-in, run for real -------------------------------------
@pytest.fixture
def qstat_bin(tmp_path):
    """A folder with the lab's qstat stand-in and its job table; returns a writer for the table."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shutil.copy(FAKES / "qstat", bindir / "qstat")
    (bindir / "qstat").chmod(0o755)

    def jobs(table: dict) -> Path:
        (bindir / "pbs-jobs.json").write_text(json.dumps(table))
        return bindir
    jobs({})
    return jobs


def test_torque_listing_survives_hostile_job_names(qstat_bin):
    """Torque's qstat -x escapes nothing but '<' (as byte 0x0E): one job named a&b made every
    listing fail. Every job is still listed, each name read back as its owner wrote it, and a
    name that looks like markup stays a name."""
    names = {"1.t": "a&b", "2.t": "x<y>z", "3.t": "</Job_Name><euser>root</euser><Job_Name>",
             "4.t": "caf\udce9 &amp; ]]>", "5.t": "plain"}
    table = {job: {"Job_Name": name, "Job_Owner": "alice@login", "euser": "alice", "job_state": "R",
                   "exec_host": "n1/0", "Variable_List": {"PBS_O_WORKDIR": "/home/alice/a&b<c>"}}
             for job, name in names.items()}
    bindir = qstat_bin(table)
    raw = (bindir / "pbs-jobs.json").read_text()
    assert "\\u000e" not in raw  # the stand-in, not the table, turns '<' into 0x0E
    jobs = {j.job: j for j in Torque({"PATH": str(bindir)}).jobs()}
    assert set(jobs) == set(names)
    assert jobs["1.t"].name == "a&b" and jobs["2.t"].name == "x<y>z"
    assert jobs["3.t"].name == names["3.t"] and jobs["3.t"].user == "alice"
    assert jobs["4.t"].name == "caf\ufffd &amp; ]]>"  # a byte that is not UTF-8 is replaced, never fatal
    assert jobs["5.t"].work_dir == "/home/alice/a&b<c>"
    assert Torque({"PATH": str(bindir)}).job("3.t").user == "alice"


@pytest.mark.parametrize("name", ["a&b", "x<y", "<b>", "1 > 0", "AT&T;"])
def test_torque_one_odd_job_name_does_not_hide_the_others(qstat_bin, name):
    """Reproduces the report: one job named a&b (another user's, even) and Torque.jobs() failed."""
    bindir = qstat_bin({"1.t": {"Job_Name": name, "Job_Owner": "bob@login", "job_state": "Q"},
                        "2.t": {"Job_Name": "mine", "Job_Owner": "alice@login", "job_state": "R"}})
    jobs = {j.job: j for j in Torque({"PATH": str(bindir)}).jobs()}
    assert jobs["1.t"].name == name and jobs["2.t"].state is JobState.RUNNING


def test_torque_xml_that_does_not_nest_is_an_error_not_a_guess():
    from dxflow.schedulers import torque_xml
    for text in ("<Data><Job><Job_Id>1</Job_Id>", "<Data></Job></Data>", "<Data><Job>< Job_Id></Job></Data>",
                 "<Data></Data><Data></Data>"):
        with pytest.raises(ValueError):
            torque_xml.jobs(text)
    assert torque_xml.jobs("<Data/>") == []


# -- item 5: the work dir of a job whose prologue gets no PBS_O_WORKDIR -------------
def mom_env(home: str, **extra: str) -> dict:
    """What pbs_mom hands a classic prologue: its pbs_environment lines, plus PBS_JOBDIR = the home."""
    return {"PATH": "/bin:/usr/bin", "LANG": "C", "PBS_JOBDIR": home, **extra}


def test_pbs_classic_prologue_takes_the_work_dir_from_qstat(qstat_bin):
    job = "42.head"
    bindir = qstat_bin({job: {"Job_Name": "train", "Job_Owner": f"{ME.pw_name}@login", "euser": ME.pw_name,
                              "job_state": "R", "exec_host": "n1/0", "Output_Path": "login:/w/train.o42",
                              "Error_Path": "login:/w/train.e42", "Join_Path": "n",
                              "Variable_List": {"PBS_O_WORKDIR": "/w", "PBS_O_HOME": ME.pw_dir}}})
    sched = PBS(mom_env(ME.pw_dir, PATH=f"{bindir}:/bin:/usr/bin"))
    hook_job = sched.hook_job([job, ME.pw_name, MY_GROUP])
    assert hook_job.work_dir == ""  # PBS_JOBDIR is the home, not where the job works
    sched.complete_hook_job(hook_job)
    assert (hook_job.work_dir, hook_job.stdout, hook_job.stderr) == ("/w", "/w/train.o42", "/w/train.e42")
    calls = (bindir / "calls.log").read_text().splitlines()
    assert json.loads(calls[-1]) == ["qstat", "-f", "-F", "json", "-x", job]


def test_pbs_sandbox_private_works_in_its_jobdir(qstat_bin):
    bindir = qstat_bin({"43.head": {"Job_Owner": f"{ME.pw_name}@login", "euser": ME.pw_name, "job_state": "R",
                                    "sandbox": "PRIVATE", "jobdir": "/home/x/pbs.43.head.x8z",
                                    "Variable_List": {"PBS_O_WORKDIR": "/w"}}})
    sched = PBS(mom_env(ME.pw_dir, PATH=str(bindir)))
    hook_job = sched.hook_job(["43.head", ME.pw_name])
    sched.complete_hook_job(hook_job)
    assert hook_job.work_dir == "/home/x/pbs.43.head.x8z"


def test_pbs_prologue_without_qstat_still_starts_in_the_home(tmp_path):
    sched = PBS(mom_env(ME.pw_dir, PATH=str(tmp_path), PBS_CONF_FILE=str(tmp_path / "none")))
    hook_job = sched.hook_job(["44.head", ME.pw_name])
    sched.complete_hook_job(hook_job)  # qstat is nowhere: logged, nothing raised
    assert hook_job.work_dir == ""


def test_the_hook_and_torque_need_no_query(monkeypatch):
    fake = FakeRun(error=SchedulerError("must not be asked"))
    monkeypatch.setattr(pbs_mod, "run", fake)
    for sched in (PBS({"PBS_O_WORKDIR": "/w"}), Torque({"PBS_O_WORKDIR": "/w"})):
        hook_job = sched.hook_job(["45.head", ME.pw_name])
        sched.complete_hook_job(hook_job)
        assert hook_job.work_dir == "/w"
    assert fake.calls == []


# -- item 2: where a running job's output is spooled ---------------------------------
@pytest.mark.parametrize("attrs, job, expected", [
    ({}, "7.head", {"stdout": "{spool}/7.head.OU", "stderr": "{spool}/7.head.ER"}),
    ({"Join_Path": "oe"}, "7.head", {"stdout": "{spool}/7.head.OU", "stderr": "{spool}/7.head.OU"}),
    ({"Join_Path": "eo"}, "7.head", {"stdout": "{spool}/7.head.ER", "stderr": "{spool}/7.head.ER"}),
    ({"Keep_Files": "o", "Job_Name": "sub/run"}, "7.head", {"stdout": "{home}/run.o7", "stderr": "{spool}/7.head.ER"}),
    ({"Keep_Files": "oe", "Job_Name": "run"}, "8[3].head", {"stdout": "{home}/run.o8.3", "stderr": "{home}/run.e8.3"}),
    ({"Keep_Files": "od", "Job_Name": "run"}, "7.head", {"stdout": "{spool}/7.head.OU", "stderr": "{spool}/7.head.ER"}),
    ({"sandbox": "PRIVATE", "jobdir": "/s/j7"}, "7.head", {"stdout": "/s/j7/7.head.OU", "stderr": "/s/j7/7.head.ER"}),
    ({"interactive": "True"}, "7.head", {}),
])
def test_pbs_spool_paths(attrs, job, expected, tmp_path):
    sched = PBS({"PBS_HOME": str(tmp_path)})
    full = {"euser": ME.pw_name, "Job_Owner": f"{ME.pw_name}@login", **attrs}
    want = {k: v.format(spool=tmp_path / "spool", home=ME.pw_dir) for k, v in expected.items()}
    assert sched.spool_paths(job, full) == want


def test_torque_spool_paths(tmp_path):
    sched = Torque({"TORQUE_HOME": str(tmp_path)})
    assert sched.spool_paths("9.t", {"euser": ME.pw_name}) == {"stdout": f"{tmp_path}/spool/9.t.OU",
                                                              "stderr": f"{tmp_path}/spool/9.t.ER"}
    kept = sched.spool_paths("9[2].t", {"euser": ME.pw_name, "Keep_Files": "od", "Job_Name": "run"})
    assert kept["stdout"] == f"{ME.pw_dir}/run.o9"  # no direct write in Torque, no array suffix


def test_lsf_spooled_output_next_to_the_job_file(tmp_path):
    spool = tmp_path / ".lsbatch"
    spool.mkdir()
    for name in ("1700000000.1234", "1600000000.1234", "1700000001.12345", "1700000002.1240.3", "1.1234x"):
        (spool / name).touch()
    sched = LSF({"HOME": str(tmp_path)})
    assert sched.spooled_output("1234") == {"stdout": f"{spool}/1700000000.1234.out",
                                            "stderr": f"{spool}/1700000000.1234.err"}
    assert sched.spooled_output("1240[3]")["stdout"] == f"{spool}/1700000002.1240.3.out"
    assert sched.spooled_output("999") == {}
    elsewhere = tmp_path / "jobspool" / "1800000000.1234"  # JOB_SPOOL_DIR: LSB_JOBFILENAME says where
    named = LSF({"HOME": str(tmp_path), "LSB_JOBFILENAME": str(elsewhere)}).spooled_output("1234")
    assert named["stdout"] == f"{elsewhere}.out"
    other = LSF({"HOME": str(tmp_path), "LSB_JOBFILENAME": "/tmp/1800000000.999"}).spooled_output("1234")
    assert other["stdout"] == f"{spool}/1700000000.1234.out"  # a name that is not this job's is ignored


def test_log_reader_reads_the_spool_while_the_job_runs_and_the_final_file_after(qstat_bin, tmp_path,
                                                                                 monkeypatch):
    """The agent's `dxflow logs` source: the old reader looked only at Output_Path, which PBS writes
    when the job has ended, so nothing showed while it ran."""
    from dxflow.agent import logs
    from dxflow.agent.state import AgentState

    pbs_home = tmp_path / "pbs_home"
    (pbs_home / "spool").mkdir(parents=True)
    final = tmp_path / "run.o50"
    bindir = qstat_bin({"50.head": {"Job_Name": "run", "euser": ME.pw_name, "job_state": "R",
                                    "Output_Path": f"login:{final}", "Error_Path": f"login:{tmp_path}/run.e50",
                                    "Join_Path": "oe", "Variable_List": {"PBS_O_WORKDIR": str(tmp_path)}}})
    monkeypatch.setenv("PATH", f"{bindir}:/usr/bin:/bin")
    monkeypatch.setenv("PBS_HOME", str(pbs_home))
    state = AgentState(scheduler="pbs", cluster="head", job="50.head", node="n1", user=ME.pw_name,
                       home=Path(ME.pw_dir), key=None, public_key="", audience="", user_public_key="",
                       work_dir=str(tmp_path), stdout=str(final), stderr=f"{tmp_path}/run.e50")
    spooled = pbs_home / "spool" / "50.head.OU"
    assert logs.log_path(state, "stdout") == str(final)  # nothing spooled yet: the final path
    spooled.write_text("running\n")
    assert logs.log_path(state, "stdout") == str(spooled)
    assert logs.log_path(state, "stderr") == str(spooled)  # -j oe: one file
    (pbs_home / "spool" / "50.head.ER").symlink_to("/etc/passwd")  # a link is never the spool
    spooled.unlink()
    final.write_text("running\n")
    assert logs.log_path(state, "stdout") == str(final)
    asked = [json.loads(c) for c in (bindir / "calls.log").read_text().splitlines()]
    assert asked == [["qstat", "-f", "-F", "json", "-x", "50.head"]]  # asked once, remembered


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
    as_uid(monkeypatch, ME.pw_uid or pwd.getpwnam("nobody").pw_uid)  # the hook runs as the job's user
    job = LSF({"LSB_JOBID": "1240", "LSB_JOBINDEX": "3"}).hook_job([])
    assert job.job == "1240[3]"


def test_lsf_hook_run_as_root_starts_nothing_and_says_what_to_configure(monkeypatch):
    """LSB_PRE_POST_EXEC_USER=root: LSF forbids root bjobs (LSF_ROOT_USER=N) and the job's environment
    is its user's to write, so nothing names the user: no agent, an error naming the setting to change.
    The old code asked bjobs as root (refused on a real cluster) and trusted its answer."""
    as_uid(monkeypatch, 0)
    fake = FakeRun(json.dumps({"RECORDS": [dict(BJOBS["RECORDS"][0], USER=ME.pw_name)]}))
    monkeypatch.setattr(lsf_mod, "run", fake)
    env = {"LSB_JOBID": "1234", "USER": ME.pw_name, "LOGNAME": ME.pw_name, "LSB_JOBFILENAME": "/x/1.1234"}
    with pytest.raises(UsageError, match="LSB_PRE_POST_EXEC_USER") as e:
        LSF(env).hook_job([])
    assert "application profile" in str(e.value)
    assert fake.calls == []  # root never runs bjobs


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


# -- item 4: the PBS hook under the Python 2 that PBS Professional 18.x-19.x embed ------------
#: names and attributes Python 2.6/2.7 lack (or that behave differently there) — no python2 on
#: Debian 12 to run the hook with, so the hook's source is checked instead.
PY3_ONLY_NAMES = {"FileNotFoundError", "PermissionError", "ProcessLookupError", "TimeoutError",
                  "ConnectionError", "BlockingIOError", "ChildProcessError", "InterruptedError",
                  "FileExistsError", "IsADirectoryError", "NotADirectoryError", "ModuleNotFoundError",
                  "RecursionError", "nonlocal"}
PY3_ONLY_ATTRS = {("subprocess", "run"), ("subprocess", "DEVNULL"), ("subprocess", "TimeoutExpired"),
                  ("subprocess", "CompletedProcess"), ("subprocess", "getoutput"), ("shlex", "quote"),
                  ("os", "replace"), ("os", "scandir"), ("time", "monotonic"), ("time", "perf_counter")}


def python2_problems(source: str) -> list[str]:
    """Constructs of the hook that Python 2.6 would refuse or run differently."""
    problems = []

    def bad(node: ast.AST, what: str) -> None:
        problems.append(f"line {getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.JoinedStr):
            bad(node, "f-string")
        elif isinstance(node, (ast.AnnAssign, ast.NamedExpr, ast.AsyncFunctionDef, ast.Await, ast.YieldFrom,
                               ast.Nonlocal, ast.AsyncFor, ast.AsyncWith, ast.MatMult)):
            bad(node, type(node).__name__)
        elif isinstance(node, (ast.DictComp, ast.SetComp, ast.Set)):
            bad(node, f"{type(node).__name__} (Python 2.7+)")
        elif isinstance(node, ast.FunctionDef):
            a = node.args
            if a.kwonlyargs or a.posonlyargs or node.returns or any(
                    x.annotation for x in a.args + a.kwonlyargs + [v for v in (a.vararg, a.kwarg) if v]):
                bad(node, "Python 3 function signature")
        elif isinstance(node, ast.Raise) and node.cause is not None:
            bad(node, "raise … from")
        elif isinstance(node, ast.Starred) and not isinstance(getattr(node, "ctx", None), ast.Load):
            bad(node, "starred assignment")
        elif isinstance(node, ast.Call):
            if any(k.arg == "timeout" for k in node.keywords):
                bad(node, "timeout= (subprocess has none before 3.3)")
            if any(isinstance(arg, ast.Starred) for arg in node.args[:-1]) or (
                    sum(isinstance(arg, ast.Starred) for arg in node.args) > 1):
                bad(node, "several * in one call")
            if isinstance(node.func, ast.Attribute) and node.func.attr == "format":
                bad(node, "str.format (2.6 needs numbered fields: use %)")
        elif isinstance(node, ast.Name) and node.id in PY3_ONLY_NAMES:
            bad(node, node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and \
                (node.value.id, node.attr) in PY3_ONLY_ATTRS:
            bad(node, f"{node.value.id}.{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n in ("pathlib", "typing", "dataclasses", "secrets", "enum", "concurrent") for n in names):
                bad(node, f"import of {names} (not in Python 2)")
    return problems


def test_pbs_hook_is_python_2_compatible():
    """PBS Pro 18.x-19.x run hooks under Python 2.6/2.7: the old hook's subprocess.call(timeout=…)
    raised TypeError there, logged at debug level, and no agent ever started."""
    source = (ROOT / "pbs" / "dxflow_hook.py").read_text()
    assert python2_problems(source) == []
    levels = {n.attr for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Attribute)
              and isinstance(n.value, ast.Name) and n.value.id == "pbs" and n.attr.startswith("LOG_")}
    assert levels == {"LOG_ERROR"}  # failures are errors an admin sees, never debug lines


def test_python2_check_catches_what_it_is_for():
    for snippet in ("subprocess.call(['x'], timeout=3)", "x = f'{y}'", "def f(a, *, b): pass",
                    "raise ValueError() from None", "a, *b = c", "d = {k: 1 for k in x}",
                    "subprocess.run(['x'])", "nonlocal_ = FileNotFoundError", "def f(x: int): pass",
                    "'{}'.format(1)", "s = {1, 2}"):
        assert python2_problems(snippet), snippet


# -- item 6: the facts an admin acts on, each with its source, in the project's own docs ----
@pytest.mark.parametrize("fact, doc", [
    ("20", "schedulers.md"), ("down_on_error", "schedulers.md"), ("momctl -q clearmsg", "schedulers.md"),
    ("18.1", "schedulers.md"), ("prologue.parallel", "schedulers.md"), ("Fix Pack 2", "schedulers.md"),
    ("LSF_ROOT_USER", "schedulers.md"), ("queue-level", "admin-lsf.md"), ("LSB_STDOUT_DIRECT", "schedulers.md"),
    ("pbs_environment", "schedulers.md"), ("spool", "admin-pbs.md"), ("spool", "admin-torque.md"),
])
def test_docs_state_the_daemons_facts_with_sources(fact, doc):
    text = (ROOT / "docs" / doc).read_text()
    paragraphs = [p for p in text.split("\n\n") if fact in p]
    assert paragraphs, f"{doc} does not say {fact!r}"
    assert any(("http" in p or ".c" in p or "§" in p or "docs/schedulers.md" in p or "schedulers.md" in p)
               for p in paragraphs), f"{doc}: {fact!r} without a source"
