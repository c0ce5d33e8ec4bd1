"""The OpenSSH transport under pam_slurm_adopt: one ControlMaster per job, each on a socket of its own
(docs/ssh.md, "Jobs sharing a node under pam_slurm_adopt"; the paramiko pool's rules: test_tunnels.py).

No sshd in unit tests: a stand-in node logs in by starting a real process as the "ControlMaster" (so its
end is seen the way the pool sees a real one's, through a pidfd) and answers ``/proc/self/cgroup`` with
the job the login landed in. The real one is tested on the lab (tests/lab/test_ssh_sites.py, ``adopt``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from dxflow.errors import AgentUnreachable
from dxflow.layout import UserLayout
from dxflow.master import tunnels
from dxflow.ssh import adoption, controlmaster
from dxflow.ssh.controlmaster import ControlMaster, LoginNeeded
from dxflow.ssh.openssh import OpenSSHPool


class Login:
    """One ControlMaster of the stand-in: a process that lives until its job ends (or it is told to exit)."""

    def __init__(self, ctl: Path, job: str | None) -> None:
        self.ctl, self.job = ctl, job
        self.proc = subprocess.Popen(["sleep", "300"])

    def is_active(self) -> bool:
        return self.proc.poll() is None

    def end(self) -> None:
        self.proc.kill()
        self.proc.wait()


class AdoptingNode:
    """The node's sshd as pam_slurm_adopt makes it: each login lands in the user's newest job there."""

    def __init__(self, pool: OpenSSHPool, newest: str | None) -> None:
        self.newest = newest
        self.logins: list[Login] = []
        self.prompt = False          # the server asks for an MFA code: BatchMode logins fail
        self.pool = pool
        pool._start = self.start                # type: ignore[method-assign]
        pool._adopt = lambda address, m, ctl: False   # type: ignore[method-assign]  # nothing left by others
        pool._end = self.end                    # type: ignore[method-assign]
        pool.read_file = self.read_file         # type: ignore[method-assign]

    def start(self, address: str, m: ControlMaster) -> None:
        if self.prompt:
            m.login_needed = True
            raise LoginNeeded(f"{address}: SSH asks for more than keys")
        login = Login(m.ctl, self.newest)
        self.logins.append(login)
        m.pid, m.pidfd = login.proc.pid, os.pidfd_open(login.proc.pid)
        m.generation = next(self.pool._numbers)

    def end(self, address: str, m: ControlMaster) -> None:
        for login in self.logins:
            if login.proc.pid == m.pid:
                login.end()
        m.forget()

    def read_file(self, address: str, path: str, generation: int | None = None) -> bytes:
        assert path == "/proc/self/cgroup" and generation is not None
        pid = self.pool._on(address, generation).pid
        job = next(login.job for login in self.logins if login.proc.pid == pid)
        where = f"/slurm/uid_1003/job_{job}/step_extern" if job else "/user.slice/user-1003.slice/session-4.scope"
        return f"0::{where}\n".encode()

    def by_job(self, job: str) -> list[Login]:
        return [login for login in self.logins if login.job == job]

    def close(self) -> None:
        for login in self.logins:
            login.end()


@pytest.fixture
def pool(monkeypatch):
    """The master's pool with ``ssh_transport = "openssh"``, its sockets in a short private folder."""
    home = Path(tempfile.mkdtemp(prefix="dx", dir="/tmp"))
    p = tunnels.TunnelPool(transport="openssh")
    p.openssh._layout = UserLayout(home / ".dxflow", "login")
    yield p
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def node(pool):
    n = AdoptingNode(pool.openssh, newest="7")
    yield n
    n.close()


def sockets(pool: tunnels.TunnelPool, *jobs: str | None) -> list[Path]:
    return [pool.openssh.control_path("n1", job) for job in jobs]


def test_one_controlmaster_per_node_where_no_job_adopts_it(pool, node):
    node.newest = None
    first = pool.connect("n1", job="7")
    assert pool.connect("n1", job="8") == first == pool.generation("n1", job="8")
    assert [login.ctl for login in node.logins] == sockets(pool, None)
    assert pool.status()["n1"]["connections"] == [{"generation": first, "job": None}]


def test_each_job_gets_its_own_controlmaster_and_keeps_it_when_the_other_ends(pool, node):
    seven = pool.connect("n1", job="7")       # job 7's agent registers at its start: 7 is the newest
    node.newest = "8"
    eight = pool.connect("n1", job="8")       # job 8's: a login on job 8's own socket, into job 8
    assert seven != eight and len(node.logins) == 2
    assert node.by_job("8")[0].ctl == pool.openssh.control_path("n1", "8")
    assert [c["job"] for c in pool.status()["n1"]["connections"]] == ["7", "8"]
    assert pool.note("n1", "7", seven) == pool.note("n1", "8", eight) == ""
    node.by_job("8")[0].end()                 # job 8 is cancelled: its ControlMaster dies with it
    assert pool.generation("n1", job="7") == seven and pool.generation("n1", job="8") is None
    assert pool.connect("n1", job="7") == seven and len(node.logins) == 2   # no new login for job 7
    assert [c["job"] for c in pool.status()["n1"]["connections"]] == ["7"]


def test_a_job_borrows_the_newer_jobs_controlmaster_until_that_job_ends(pool, node):
    node.newest = "8"                         # a master started after both jobs: every login lands in 8
    eight = pool.connect("n1", job="8")
    borrowed = pool.connect("n1", job="7")    # tried on job 7's socket, landed in 8: ended, 8's is used
    assert borrowed == eight and len(node.logins) == 2 and not node.logins[1].is_active()
    assert node.logins[1].ctl == pool.openssh.control_path("n1", "7")
    assert [c["job"] for c in pool.status()["n1"]["connections"]] == ["8"]
    assert "through job 8's SSH connection" in pool.note("n1", "7", borrowed)
    assert pool.connect("n1", job="7") == eight and len(node.logins) == 2   # no login again at once
    node.logins[0].end()                      # job 8 ends, and job 7's borrowed ControlMaster with it
    node.newest = "7"
    assert pool.generation("n1", job="7") is None
    own = pool.connect("n1", job="7")
    assert own not in (eight, None) and pool.note("n1", "7", own) == ""
    assert node.logins[-1].ctl == pool.openssh.control_path("n1", "7")
    assert [c["job"] for c in pool.status()["n1"]["connections"]] == ["7"]


def test_a_login_on_a_jobs_socket_that_lands_elsewhere_moves_to_that_jobs_socket(pool, node):
    """A socket named after job J holds a ControlMaster in job J, or none: a restarted master finds each by
    its job, and nothing at J's socket is ever another job's."""
    pool.connect("n1", job="7")               # the node's first: its socket, into 7 (adoption now seen)
    node.newest = "8"                         # job 9's agent is checked while job 8 is the newest
    nine = pool.connect("n1", job="9")
    assert [login.ctl for login in node.logins] == sockets(pool, None, "9", "8")
    assert not node.logins[1].is_active() and node.logins[2].is_active()
    assert pool.generation("n1", job="8") == nine and "through job 8's" in pool.note("n1", "9", nine)


def test_a_login_landing_in_an_ending_job_is_ended_at_once_and_tried_again_later(pool, node):
    node.newest = "8"
    pool.connect("n1", job="8")
    pool.connect("n1", job="7")               # borrows job 8's
    node.logins[0].end()                      # job 8 cancelled: its ControlMaster dies; its cgroup lives on
    with pytest.raises(AgentUnreachable, match="landed in job 8, whose connection ended"):
        pool.connect("n1", job="7")
    assert not node.logins[-1].is_active() and pool.generation("n1", job="7") is None
    with pytest.raises(AgentUnreachable, match="next try in"):
        pool.connect("n1", job="7")           # paused: no login at all
    logins = len(node.logins)
    node.newest = "7"                         # job 8's cgroup is gone
    time.sleep(1.1)                           # the first pause (0.5 * 2 s)
    own = pool.connect("n1", job="7")
    assert len(node.logins) == logins + 1 and node.logins[-1].is_active()
    assert pool.generation("n1", job="7") == own and pool.note("n1", "7", own) == ""


def test_a_borrower_whose_own_login_fails_keeps_the_borrowed_controlmaster(pool, node, monkeypatch):
    """An MFA node: the master cannot log in for the borrowing job on its own, and need not yet."""
    node.newest = "8"
    eight = pool.connect("n1", job="8")
    pool.connect("n1", job="7")
    monkeypatch.setattr(adoption, "BORROW_RETRY", 0.0)   # its own login is due again
    node.prompt = True
    assert pool.connect("n1", job="7") == eight
    assert not pool.status()["n1"]["login_needed"]       # a command works: nobody is asked for a code
    node.logins[0].end()
    with pytest.raises(LoginNeeded):
        pool.connect("n1", job="7")
    assert pool.status()["n1"]["login_needed"]


def test_a_channel_on_a_controlmaster_that_ended_is_refused_not_rerouted(pool, node):
    seven = pool.connect("n1", job="7")
    node.newest = "8"
    pool.connect("n1", job="8")
    node.logins[0].end()
    with pytest.raises(AgentUnreachable, match="closed since the agent was checked"):
        pool.channel("n1", 7000, generation=seven)


def test_the_pool_says_which_controlmaster_ended_and_waits_a_moment_for_one_ending(pool, node):
    """A heartbeat socket through a ControlMaster ends a moment before its process is seen gone: the pool
    waits up to ``wait`` for that end, and says no for one that lives on."""
    seven = pool.connect("n1", job="7")
    node.newest = "8"
    eight = pool.connect("n1", job="8")
    assert not pool.ended("n1", seven) and not pool.ended("n1", eight, wait=0.2)
    login = node.by_job("8")[0]
    login.proc.terminate()                    # not waited for: its end is seen through the pidfd alone
    assert pool.ended("n1", eight, wait=10)
    assert not pool.ended("n1", seven, wait=0.1)
    assert pool.ended("n1", 999)              # a generation the pool never had, or has forgotten
    login.proc.wait()


def test_a_controlmaster_forgotten_by_two_threads_at_once_closes_its_pidfd_once(monkeypatch):
    """The pool's reaper and a check may forget one ControlMaster together: a second close of the same
    number would close whatever file took the number meanwhile (another thread's pipe or socket)."""
    proc = subprocess.Popen(["sleep", "30"])
    closed: list[int] = []
    real_close = os.close

    def slow_close(fd: int) -> None:   # widens the window between "is it open?" and the close
        closed.append(fd)
        time.sleep(0.1)
        real_close(fd)

    try:
        m = ControlMaster(Path("/nonexistent/ctl"))
        m.pid, m.pidfd = proc.pid, os.pidfd_open(proc.pid)
        fd = m.pidfd
        monkeypatch.setattr(controlmaster.os, "close", slow_close)
        threads = [threading.Thread(target=m.forget) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert closed == [fd] and m.pidfd == -1 and not m.alive() and not m.ended()
    finally:
        proc.kill()
        proc.wait()
