"""``dxflow shell`` on the lab: a real terminal through the master, the SSH tunnel and the agent's PTY."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

import pytest

from conftest import DXFLOW, as_user, job_state, wait_agents, wait_for

pexpect = pytest.importorskip("pexpect")


def shell(user: str, target: str, *, rows: int = 24, cols: int = 80, same_session: bool = False):
    """``dxflow shell`` as ``user`` in a terminal. ``runuser -c`` runs it in a new session, where the terminal is
    not its controlling one (no SIGWINCH); ``same_session`` keeps it there, as in a login shell."""
    option = "--session-command" if same_session else "-c"
    return pexpect.spawn("runuser", ["-l", user, option, shlex.join([DXFLOW, "shell", target])], timeout=30,
                         dimensions=(rows, cols))


def two_node_job(jobs) -> str:
    job = jobs.submit("alice", "sleep 600", nodes=2)
    jobs.wait_running(job, timeout=180)  # other tests may hold the nodes for a while
    wait_agents("alice", job, 2)
    return job


def test_shell_on_a_node_of_the_job(jobs):
    job = two_node_job(jobs)
    child = shell("alice", f"{job}:n2")
    child.sendline("hostname; echo user=$(id -un)x job=${SLURM_JOB_ID}x dx=${DXFLOW_NODE}x")
    child.expect(r"[\r\n]n2\r\n")
    child.expect("user=alicex")
    child.expect(f"job={job}x")
    child.expect("dx=n2x")
    child.sendline("stty size")
    child.expect("24 80")
    child.setwinsize(40, 120)  # the CLI gets SIGWINCH and tells the agent
    time.sleep(0.5)
    child.sendline("stty size")
    child.expect("40 120")
    child.sendline("sleep 30; echo not-interrupted")
    time.sleep(0.5)
    child.sendcontrol("c")  # raw mode: Ctrl-C reaches the remote foreground job through the PTY
    child.sendline("echo rc=$?x")
    child.expect("rc=130x", timeout=10)
    child.sendline("exit 3")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 3, child.before


def test_shell_runs_a_command_with_a_terminal_like_ssh_t(jobs):
    """`dxflow shell JOB:NODE -- CMD ARGS` runs CMD (its words joined, as ssh does) with a terminal on that
    node, and exits with CMD's code; a query the agent refuses (an empty command) changes nothing."""
    job = two_node_job(jobs)
    argv = [DXFLOW, "shell", f"{job}:n2", "--", "test -t 0 && echo tty=yes;", "hostname;", "exit 7"]
    child = pexpect.spawn("runuser", ["-l", "alice", "-c", shlex.join(argv)], timeout=30)
    child.expect("tty=yes")
    child.expect(r"[\r\n]n2\r\n")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 7, child.before
    out = as_user("alice", [DXFLOW, "shell", job, "--", " "], timeout=60, check=False)
    assert out.returncode == 2 and "command after -- is empty" in out.stderr, out


def test_shell_first_node_and_piped_input(jobs):
    job = two_node_job(jobs)
    out = as_user("alice", [DXFLOW, "shell", job], input="hostname\nexit 0\n", timeout=60)
    assert re.search(r"^n1\r?$", out.stdout, re.M), out.stdout


def test_no_shell_left_after_the_job_is_cancelled(jobs):
    job = two_node_job(jobs)
    child = shell("alice", f"{job}:n2", rows=30, cols=90, same_session=True)
    child.sendline("stty size")
    child.expect("30 90")
    child.setwinsize(35, 110)  # SIGWINCH to the CLI
    time.sleep(0.3)
    child.sendline("stty size")
    child.expect("35 110")
    child.sendline("sleep 777 & echo bg=$!x; echo sh=$$x")
    child.expect(r"bg=(\d+)x")
    bg = int(child.match.group(1))
    child.expect(r"sh=(\d+)x")
    sh = int(child.match.group(1))
    assert Path(f"/proc/{sh}").exists() and Path(f"/proc/{bg}").exists()
    as_user("alice", ["scancel", job])
    wait_for(lambda: job_state(job) == "GONE", 60, what=f"job {job} gone")
    wait_for(lambda: not Path(f"/proc/{sh}").exists() and not Path(f"/proc/{bg}").exists(), 15,
             what=f"shell {sh} and its job {bg} gone")
    child.expect(pexpect.EOF, timeout=15)  # the CLI notices and ends
    child.close()
    assert child.exitstatus != 0
