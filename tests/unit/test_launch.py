"""The way into the job per scheduler (issue #9, item 2): launcher data and how the agent applies it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dxflow.agent.injob import check_runnable, in_job
from dxflow.agent.state import AgentState
from dxflow.schedulers.launch import launcher_of
from dxflow.schedulers.lsf import LSF
from dxflow.schedulers.pbs import PBS, Torque
from dxflow.schedulers.slurm import Slurm


def test_pbs_runs_a_command_through_pbs_attach_with_the_job_and_moms_settings() -> None:
    argv, env = PBS.launcher.wrap("/opt/pbs/bin/pbs_attach", "12.srv", "n1", ["sh", "-c", "echo $1", "-j"],
                                  {"PATH": "/bin", "PBS_CONF_FILE": "/home/u/evil.conf"},
                                  agent_env={"PBS_CONF_FILE": "/etc/pbs.conf", "HOME": "/root"})
    # "--": whatever the command's own arguments are, pbs_attach reads no option of theirs
    assert argv == ["/opt/pbs/bin/pbs_attach", "-j", "12.srv", "--", "sh", "-c", "echo $1", "-j"]
    assert env == {"PATH": "/bin", "PBS_CONF_FILE": "/etc/pbs.conf"}  # MoM's, from the hook: not the job's
    assert PBS.launcher.keeps_terminal and PBS.launcher.source


def test_lsf_runs_a_command_through_blaunch_on_this_host_naming_the_job_and_index() -> None:
    argv, env = LSF.launcher.wrap("/lsf/bin/blaunch", "77[3]", "n2", ["a b", "$(x)"],
                                  {"LSB_JOBID": "77[3]", "PATH": "/bin"},
                                  agent_env={"LSB_MCPU_HOSTS": "n1 2 n2 2", "LSF_ENVDIR": "/lsf/conf"})
    assert argv == ["/lsf/bin/blaunch", "-no-shell", "n2", "a b", "$(x)"]  # no shell: each argument stays one
    assert env["LSB_JOBID"] == "77" and env["LSB_JOBINDEX"] == "3"           # an array element, as LSF names it
    assert env["LSB_MCPU_HOSTS"] == "n1 2 n2 2" and env["LSF_ENVDIR"] == "/lsf/conf"
    _argv, plain = LSF.launcher.wrap("/b", "78", "n1", ["true"], {}, agent_env={})
    assert (plain["LSB_JOBID"], plain["LSB_JOBINDEX"]) == ("78", "0")
    assert not LSF.launcher.keeps_terminal  # blaunch's task has no terminal: no shell through it
    # the agent must never carry LSB_JOBID itself: it would pass for the job's own process (jobenv)
    assert "LSB_JOBID" not in LSF.passthrough_env


def test_slurm_and_torque_have_no_launcher() -> None:
    assert launcher_of(Slurm({})) is None      # the agent joins the extern step's cgroups instead
    assert launcher_of(Torque({})) is None     # pbs_track prints on the command's stdout
    assert launcher_of(PBS({})) is PBS.launcher


def test_a_missing_or_unrunnable_command_fails_as_if_started_directly(tmp_path: Path) -> None:
    script = tmp_path / "run.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o644)
    env = {"PATH": str(tmp_path)}
    with pytest.raises(FileNotFoundError):
        check_runnable("no-such-command-dxflow", str(tmp_path), env)
    with pytest.raises(FileNotFoundError):
        check_runnable("./missing.sh", str(tmp_path), env)
    with pytest.raises(PermissionError):
        check_runnable("./run.sh", str(tmp_path), env)  # relative to the command's cwd, not the agent's
    script.chmod(0o755)
    check_runnable("./run.sh", str(tmp_path), env)
    check_runnable("run.sh", "/", env)


def _state(scheduler: str, job: str) -> AgentState:
    return AgentState(scheduler=scheduler, cluster="c", job=job, node="n1", user="u", home=Path("/tmp"),
                      key=None, public_key="", audience="", user_public_key="")  # type: ignore[arg-type]


def test_the_agent_wraps_exec_and_shell_only_where_the_launcher_allows(tmp_path: Path, monkeypatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("pbs_attach", "blaunch"):
        (bin_dir / name).write_text("#!/bin/sh\nexec \"$@\"\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    env = {"PATH": "/usr/bin:/bin"}
    argv, _ = in_job(_state("pbs", "5.srv"), ["true"], "/", env)
    assert argv == [str(bin_dir / "pbs_attach"), "-j", "5.srv", "--", "true"]
    argv, _ = in_job(_state("pbs", "5.srv"), ["/bin/sh", "-l"], "/", env, terminal=True)
    assert argv[0] == str(bin_dir / "pbs_attach")
    assert in_job(_state("lsf", "9"), ["/bin/sh", "-l"], "/", env, terminal=True) == (["/bin/sh", "-l"], env)
    assert in_job(_state("lsf", "9"), ["true"], "/", env)[0][:3] == [str(bin_dir / "blaunch"), "-no-shell", "n1"]
    assert in_job(_state("slurm", "9"), ["true"], "/", env) == (["true"], env)
    with pytest.raises(FileNotFoundError):
        in_job(_state("pbs", "5.srv"), ["no-such-command-dxflow"], "/", env)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # not installed: the command runs as before
    monkeypatch.delenv("PBS_EXEC", raising=False)
    monkeypatch.setenv("PBS_CONF_FILE", str(tmp_path / "none.conf"))
    if not any(os.access(os.path.join(d, "pbs_attach"), os.X_OK) for d in ("/opt/pbs/bin", "/usr/bin", "/bin")):
        assert in_job(_state("pbs", "5.srv"), ["true"], "/", env) == (["true"], env)
