"""What the epilog does without a scheduler: bounded registration cleanup, stopping by pid *and* start
time, the fallback for a fork-hopper where no cgroup exists, and the launcher's bounded wait."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from dxflow import adopt, asuser, hook
from dxflow.jobcgroup import JobCgroups
from dxflow.procs import read_proc, stop_tree

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")


def _nobody() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this machine")


@pytest.fixture
def home():
    """A folder another user can reach (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="dxflow-unit-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _record(home: Path, pw: pwd.struct_passwd, pid: int = 4242) -> dict:
    return {"cluster": "c", "job": "1", "node": "n1", "home": str(home), "uid": pw.pw_uid, "gid": pw.pw_gid,
            "pid": pid}


def _fleet(home: Path, pw: pwd.struct_passwd) -> Path:
    fleet = home / ".dxflow" / "fleet"
    fleet.mkdir(parents=True)
    for folder in (home, home / ".dxflow", fleet):
        os.chown(folder, pw.pw_uid, pw.pw_gid)
    return fleet


@root_only
def test_registration_is_removed_as_the_user_only_when_it_names_the_stopped_agent(home: Path) -> None:
    pw = _nobody()
    fleet = _fleet(home, pw)
    (fleet / "c.1.n1.json").write_text(json.dumps({"pid": 999}))  # a newer agent's: kept
    assert hook.clean_home(_record(home, pw), timeout=10)
    assert (fleet / "c.1.n1.json").exists()
    (fleet / "c.1.n1.json").write_text(json.dumps({"pid": 4242}))
    assert hook.clean_home(_record(home, pw), timeout=10)
    assert not (fleet / "c.1.n1.json").exists()


@root_only
def test_the_agents_log_is_removed_with_its_registration_unless_the_site_keeps_logs(home: Path) -> None:
    pw = _nobody()
    fleet = _fleet(home, pw)
    logs = home / ".dxflow" / "logs"
    logs.mkdir()
    os.chown(logs, pw.pw_uid, pw.pw_gid)
    for keep in (True, False):
        (fleet / "c.1.n1.json").write_text(json.dumps({"pid": 4242}))
        (logs / "c.1.n1.log").write_text("agent log\n")
        assert hook.clean_home(_record(home, pw), keep_log=keep, timeout=10)
        assert not (fleet / "c.1.n1.json").exists()
        assert (logs / "c.1.n1.log").exists() is keep


@root_only
def test_the_epilog_removes_a_link_as_the_user_never_what_it_points_to(home: Path) -> None:
    """A user who makes their agent's log a link to a root file gets the link removed, the file kept."""
    pw = _nobody()
    _fleet(home, pw)
    logs = home / ".dxflow" / "logs"
    logs.mkdir()
    os.chown(logs, pw.pw_uid, pw.pw_gid)
    target = home / "roots-file"
    target.write_text("root's\n")
    (logs / "c.1.n1.log").symlink_to(target)
    assert hook.clean_home(_record(home, pw), timeout=10)
    assert not (logs / "c.1.n1.log").is_symlink() and target.read_text() == "root's\n"


@root_only
def test_a_home_closed_to_others_is_looked_at_as_its_user(home: Path) -> None:
    """as_user drops root first: the child sees what the user sees (a 0700 home of theirs, not root's)."""
    pw = _nobody()
    mine = home / "mine"
    mine.mkdir(mode=0o700)
    os.chown(mine, pw.pw_uid, pw.pw_gid)
    theirs = home / "roots"
    theirs.mkdir(mode=0o700)
    groups = asuser.user_groups(pw.pw_name, pw.pw_gid)
    assert asuser.as_user(pw.pw_uid, pw.pw_gid, groups, lambda: asuser.home_reachable(str(mine)), 10) is True
    assert asuser.as_user(pw.pw_uid, pw.pw_gid, groups, lambda: asuser.home_reachable(str(theirs)), 10) is False
    assert asuser.as_user(pw.pw_uid, pw.pw_gid, groups, lambda: os.getuid() == pw.pw_uid, 10) is True


@root_only
def test_a_hanging_registration_cleanup_is_killed_at_its_deadline(home: Path) -> None:
    pw = _nobody()
    fleet = _fleet(home, pw)
    os.mkfifo(fleet / "c.1.n1.json")  # opening it waits for a writer that never comes
    t0 = time.monotonic()
    assert hook.clean_home(_record(home, pw), timeout=1) is False
    assert time.monotonic() - t0 < 5
    assert asuser.as_user(pw.pw_uid, pw.pw_gid, [pw.pw_gid], lambda: time.sleep(30) or True, 0.5) is None


@root_only
def test_a_session_leader_with_a_reused_pid_is_left_alone() -> None:
    pw = _nobody()
    stray = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 301; wait"], user=pw.pw_uid, group=pw.pw_gid,
                             start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        p = read_proc(stray.pid)
        assert p is not None and p.sid == stray.pid
        assert stop_tree(stray.pid, pw.pw_uid, timeout=1, start=p.start + 1) == set()  # another start time
        assert stray.poll() is None and read_proc(stray.pid) is not None
        assert stop_tree(stray.pid, pw.pw_uid, timeout=2, start=p.start) == set()      # the recorded one
        assert stray.wait(5) != 0
    finally:
        if stray.poll() is None:
            stray.kill()


@root_only
def test_the_fallback_without_cgroups_stops_a_fork_hopper_that_keeps_its_session() -> None:
    """No cgroup: the leader (the recorded agent) is gone, its session lives on in a fork-hopper."""
    pw = _nobody()
    beat = Path(tempfile.mkdtemp(prefix="dxflow-unit-")) / "beat"
    beat.parent.chmod(0o755)
    beat.touch()
    os.chown(beat, pw.pw_uid, pw.pw_gid)
    code = ("import os, sys\nn = 0\nwhile True:\n    n += 1\n    if n % 200 == 0:\n        os.utime(sys.argv[1])\n"
            "    if os.fork():\n        os._exit(0)\n")
    leader = subprocess.Popen(["/usr/bin/python3", "-c", code, str(beat)], user=pw.pw_uid, group=pw.pw_gid,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = read_proc(leader.pid).start if read_proc(leader.pid) else None
    leader.wait(5)  # the first generation exits at once: what is left carries its pid as session id

    def beating(within: float) -> bool:
        before = beat.stat().st_mtime_ns
        time.sleep(within)
        return beat.stat().st_mtime_ns != before

    try:
        assert beating(1.0)
        stop_tree(leader.pid, pw.pw_uid, timeout=5, start=start)
        assert not beating(1.5)
    finally:
        shutil.rmtree(beat.parent, ignore_errors=True)


def test_the_launcher_joins_the_jobs_cgroups_once_they_are_set_up(tmp_path: Path) -> None:
    group = (str(tmp_path / "freezer/job_1/step_extern"), str(tmp_path / "memory/job_1/step_extern"))
    plan = JobCgroups(groups=(group,), v2=False, wait=5)
    for d in group:
        Path(d).mkdir(parents=True)
    (Path(group[0]) / "cgroup.procs").write_text("")

    def extern_step_starts() -> None:
        time.sleep(0.3)
        (Path(group[0]) / "cgroup.procs").write_text("123\n")

    import threading
    threading.Thread(target=extern_step_starts).start()
    joined = adopt.join_job(plan.to_dict())
    assert joined == list(group)
    assert (Path(group[1]) / "cgroup.procs").read_text().strip() == str(os.getpid())


def test_the_launcher_gives_up_on_cgroups_that_never_appear(tmp_path: Path) -> None:
    plan = JobCgroups(groups=((str(tmp_path / "freezer/job_2/step_extern"),),), v2=False, wait=0.3)
    t0 = time.monotonic()
    assert adopt.join_job(plan.to_dict()) == []
    assert time.monotonic() - t0 < 3


@root_only
def test_a_broken_site_config_does_not_keep_the_epilog_from_stopping_the_agent(tmp_path, monkeypatch) -> None:
    pw = _nobody()
    cfg = tmp_path / "dxflow.toml"
    cfg.write_text("not [toml")
    monkeypatch.setattr("dxflow.config.SITE_CONFIG", cfg)
    agent = subprocess.Popen(["sleep", "300"], user=pw.pw_uid, group=pw.pw_gid, start_new_session=True)
    job = f"unit{os.getpid()}"
    record = Path(hook.SiteConfig().runtime_dir) / f"unit-test.{job}.n1.json"
    record.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        p = read_proc(agent.pid)
        assert p is not None
        record.write_text(json.dumps({"pid": agent.pid, "start": p.start, "uid": pw.pw_uid, "gid": pw.pw_gid,
                                      "user": pw.pw_name, "job": job, "node": "n1", "cluster": "unit-test",
                                      "scheduler": "local", "home": "/nonexistent", "own_cgroup": None}))
        for k, v in {"DXFLOW_JOB": job, "DXFLOW_USER": pw.pw_name, "DXFLOW_NODE": "n1",
                     "DXFLOW_CLUSTER": "unit-test"}.items():
            monkeypatch.setenv(k, v)
        assert hook.epilog("local") == 0
        assert agent.wait(5) == -9 and not record.exists()
    finally:
        if agent.poll() is None:
            agent.kill()
        record.unlink(missing_ok=True)
        for h in [h for h in hook.log.handlers if getattr(h, "dxflow_site", False)]:
            hook.log.removeHandler(h)
            h.close()
