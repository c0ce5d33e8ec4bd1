"""A lab of another Slurm generation (dxflow/lab/generation.py): what runs where, and what is refused.

The lab itself is exercised by scripts/test_generations.sh (the lab tests run inside each generation's lab);
these check the pieces that decide, without building one."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dxflow.cli import build_parser
from dxflow.errors import UsageError
from dxflow.lab import generation, slurm


@pytest.fixture
def state_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(generation, "STATE_DIR", tmp_path)
    return tmp_path


def test_exec_on_the_host_generation_is_a_login_shell_of_the_user_on_the_host():
    assert generation.exec_argv(None, "alice", ["dxflow", "ls", "--json"]) == [
        "runuser", "-l", "alice", "-c", "dxflow ls --json"]


def test_exec_quotes_each_argument_for_the_login_shell():
    argv = generation.exec_argv(None, "bob", ["sh", "-c", "echo $HOME; touch 'a b'"])
    assert argv[-1] == "sh -c 'echo $HOME; touch '\"'\"'a b'\"'\"''"


def test_exec_in_a_generation_lab_enters_all_its_namespaces_and_its_root(state_dir):
    folder = state_dir / "24.11"
    folder.mkdir()
    pid = os.getpid()  # a process that runs, with its real start time: taken for the lab's PID 1
    (folder / "keeper.json").write_text(json.dumps({"pid": pid, "started": generation._start_time(pid)}))
    argv = generation.exec_argv("24.11", "alice", ["id"])
    assert argv == ["nsenter", f"--target={pid}", "--mount", "--uts", "--ipc", "--net", "--pid", "--root", "--wd",
                    "--", "runuser", "-l", "alice", "-c", "id"]


def test_a_recorded_pid_now_used_by_another_process_is_no_lab(state_dir):
    folder = state_dir / "24.11"
    folder.mkdir()
    (folder / "keeper.json").write_text(json.dumps({"pid": os.getpid(), "started": "1"}))
    assert generation.keeper_pid("24.11") is None
    with pytest.raises(UsageError, match=r"no Slurm 24\.11 lab runs here.*lab up --slurm 24\.11"):
        generation.exec_argv("24.11", "alice", ["id"])
    assert "24.11" not in generation.running()


def test_a_damaged_keeper_record_is_no_lab(state_dir):
    (state_dir / "26.05").mkdir()
    (state_dir / "26.05" / "keeper.json").write_text("{half")
    assert generation.keeper_pid("26.05") is None


def test_exec_without_a_command_and_an_unknown_generation_are_refused():
    with pytest.raises(UsageError, match="needs a command"):
        generation.exec_argv(None, "alice", [])
    with pytest.raises(UsageError, match=r"unknown Slurm generation '23\.02'"):
        generation.exec_argv("23.02", "alice", ["id"])


def test_the_cli_takes_slurm_user_and_the_command_after_the_double_dash():
    args = build_parser().parse_args(["lab", "exec", "--slurm", "24.11", "--user", "alice", "--",
                                      "dxflow", "ls", "--json"])
    assert (args.slurm, args.user, args.command) == ("24.11", "alice", ["--", "dxflow", "ls", "--json"])
    assert build_parser().parse_args(["lab", "down", "--slurm", "26.05"]).slurm == "26.05"
    assert build_parser().parse_args(["lab", "status"]).slurm is None


@pytest.mark.parametrize("version, conf", [
    ((22, 5, 8), {}),                             # 22.05 has no "disabled", and needs no cgroup.conf
    ((23, 2, 0), {"CgroupPlugin": "disabled"}),
    ((24, 11, 5), {"CgroupPlugin": "disabled"}),  # else: "No filesystem mounted on /sys/fs/cgroup"
    ((26, 5, 5), {"CgroupPlugin": "disabled"}),
])
def test_cgroup_conf_without_node_cgroups_per_generation(tmp_path, version, conf):
    assert slurm.cgroup_conf_for(version, False, tmp_path, tmp_path / "no-systemd") == conf


def test_cgroup_conf_with_node_cgroups_is_the_nodes_own_and_v2_without_systemd_keeps_its_settings(tmp_path):
    assert slurm.cgroup_conf_for((24, 11, 5), True, tmp_path, tmp_path / "none") == {}
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    assert slurm.cgroup_conf_for((24, 11, 5), False, tmp_path, tmp_path / "none") == slurm.CGROUP_V2_CONF


@pytest.mark.skipif(os.geteuid() != 0, reason="making a PID namespace needs root")
def test_the_host_labs_down_leaves_processes_of_another_pid_namespace_alone():
    """A generation lab's processes show in the host's /proc: `lab down` of the host lab must not take
    them for its own leftovers."""
    import subprocess
    import time

    from dxflow.lab import cluster

    outer = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "30"])
    try:
        children = Path(f"/proc/{outer.pid}/task/{outer.pid}/children")
        deadline = time.monotonic() + 10
        while not children.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.05)
        inner = int(children.read_text().split()[0])
        assert not cluster._same_pid_namespace(inner)
        assert cluster._same_pid_namespace(outer.pid) and cluster._same_pid_namespace(os.getpid())
    finally:
        outer.kill()
        outer.wait()
