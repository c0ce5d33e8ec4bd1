"""A lab of another Slurm generation beside the host lab (issue #12): ``lab exec``, ``lab status``, and
``lab down --slurm G`` removing exactly it. Run from the host by scripts/test_generations.sh while the lab
of ``DXFLOW_LAB_SLURM`` (24.11, 26.05) is up; skipped without that variable, failed when it names a
generation whose lab is not up. The last test takes that lab down."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import DXFLOW, run

GENERATION = os.environ.get("DXFLOW_LAB_SLURM", "")
pytestmark = pytest.mark.skipif(not GENERATION, reason="DXFLOW_LAB_SLURM names no generation lab "
                                "(scripts/test_generations.sh sets it)")


def lab_exec(*argv: str, user: str = "alice", slurm: str | None = GENERATION, **kw):
    return run([DXFLOW, "lab", "exec", *(["--slurm", slurm] if slurm else []), "--user", user, "--", *argv], **kw)


def status(*slurm: str) -> dict:
    return json.loads(run([DXFLOW, "lab", "status", "--json", *slurm], check=False).stdout)


def test_the_generation_lab_is_up_and_the_host_lab_lists_it_beside_itself():
    info = status("--slurm", GENERATION)
    assert info["state"] == "up" and info["generation"] == GENERATION, info
    assert info["slurm_version"].startswith(GENERATION + "."), info
    host = status()
    assert host["state"] == "up" and host["generation"] != GENERATION, host
    assert GENERATION in host["generation_labs"], host


def test_exec_runs_that_generations_clients_and_nodes_and_the_host_its_own():
    assert lab_exec("sinfo", "--version").stdout.split()[-1].startswith(GENERATION + ".")
    # the node n1 of the generation lab, reached as the host lab's n1 is: its own slurmd, by SSH
    on_n1 = lab_exec("ssh", "-o", "BatchMode=yes", "n1", "/usr/sbin/slurmd -V", timeout=60)
    assert on_n1.stdout.split()[-1].startswith(GENERATION + "."), on_n1.stdout
    host = lab_exec("sinfo", "--version", slurm=None).stdout.split()[-1]
    assert not host.startswith(GENERATION + "."), host


def test_exec_is_a_login_shell_of_that_user_with_the_labs_dxflow_and_keeps_the_exit_code():
    out = lab_exec("sh", "-c", 'echo "$(id -un) $HOME $(command -v dxflow)"; exit 7', check=False)
    assert out.returncode == 7, out
    assert out.stdout.split() == ["alice", "/home/alice", "/usr/local/bin/dxflow"]


def test_bob_in_the_generation_lab_reaches_no_master_of_alice_neither_its_own_nor_the_host_labs():
    """The generation lab has a home of its own: the host lab's /home/alice (and alice's master socket
    there) is not in it, and bob cannot read alice's own there."""
    lab_exec("dxflow", "ls")  # alice's master of the generation lab answers (the control)
    probe = lab_exec("sh", "-c", "ls /home/alice/.dxflow 2>&1; curl -s --max-time 5 --unix-socket "
                     "/home/alice/.dxflow/master.sock http://m/api/fleet; echo rc=$?", user="bob", check=False)
    assert "Permission denied" in probe.stdout and "rc=7" in probe.stdout, probe.stdout
    # and the generation lab's alice is not the host lab's: her host files are not in her home there
    marker = Path("/home/alice/.dxflow-generation-probe")
    marker.write_text("host")
    try:
        assert lab_exec("sh", "-c", f"test -e {marker}; echo $?").stdout.strip() == "1"
    finally:
        marker.unlink()


def test_bad_generations_are_refused_clearly_and_change_nothing():
    for argv in (["lab", "exec", "--slurm", "23.02", "--", "id"], ["lab", "up", "--slurm", "23.02"],
                 ["lab", "down", "--slurm", "23.02"]):
        out = run([DXFLOW, *argv], check=False)
        assert out.returncode == 2 and "unknown Slurm generation '23.02'" in out.stderr, out
    other = next(g for g in ("24.11", "26.05") if g != GENERATION)
    if other not in status()["generation_labs"]:
        out = lab_exec("id", slurm=other, check=False)
        assert out.returncode == 2 and f"no Slurm {other} lab runs here" in out.stderr, out
    assert status("--slurm", GENERATION)["state"] == "up"


def test_zz_down_removes_exactly_the_generation_lab():
    keeper = status("--slurm", GENERATION)["keeper_pid"]
    run([DXFLOW, "lab", "down", "--slurm", GENERATION], timeout=120)
    assert not Path(f"/proc/{keeper}").exists()
    assert not Path(f"/var/lib/dxflow-lab-gen/{GENERATION}").exists()
    after = status("--slurm", GENERATION)
    assert after["state"] == "down", after
    host = status()
    assert host["state"] == "up" and GENERATION not in host["generation_labs"], host
