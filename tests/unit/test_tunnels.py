"""The paramiko transport pool: its ciphers, its backoff, one connection per job under pam_slurm_adopt
(settings: tests/unit/test_ssh_config.py)."""

from __future__ import annotations

import time

import paramiko
import pytest

from dxflow.errors import AgentUnreachable
from dxflow.master import tunnels
from dxflow.ssh import paramiko_login


def config(tmp_path, text: str) -> str:
    """An ssh_config file (given to ``ssh -F``: the user's and the system's are not read)."""
    path = tmp_path / "ssh_config"
    path.write_text(text)
    return str(path)


def test_gcm_preferred_and_every_default_cipher_kept():
    prefs = paramiko_login.GCMFirstTransport._preferred_ciphers
    assert prefs[0] == "aes128-gcm@openssh.com"
    assert set(prefs) == set(paramiko.Transport._preferred_ciphers)


def test_unreachable_node_backs_off(monkeypatch, tmp_path):
    pool = tunnels.TunnelPool(config(tmp_path, "Host nowhere\n  HostName 127.0.0.1\n  Port 1\n"), transport="auto")
    calls = []

    def refuse(*a, **kw):
        calls.append(1)
        raise ConnectionRefusedError("refused")
    monkeypatch.setattr(tunnels.socket, "create_connection", refuse)
    with pytest.raises(AgentUnreachable, match="cannot connect by SSH"):
        pool.transport("nowhere")
    with pytest.raises(AgentUnreachable, match="next try in"):
        pool.transport("nowhere")  # within the backoff: not tried again
    assert len(calls) == 1
    assert pool.status()["nowhere"]["failures"] == 1


# -- one connection per job where pam_slurm_adopt adopts logins (docs/ssh.md) ----------------------------
class Login:
    """A stand-in for a paramiko transport: up until ``end()`` (its job ended, and the session with it)."""

    def __init__(self, job: str | None) -> None:
        self.job = job
        self.up = True

    def is_active(self) -> bool:
        return self.up

    def close(self) -> None:
        self.up = False


class AdoptingNode:
    """The node's sshd as pam_slurm_adopt makes it: each login lands in the user's newest job there
    (``action_unknown=newest``), or in none where the module is not configured (``newest = None``).
    The real one is tested on the lab (tests/lab/test_ssh_sites.py, profile ``adopt``)."""

    def __init__(self, pool: tunnels.TunnelPool, newest: str | None) -> None:
        self.newest = newest
        self.logins: list[Login] = []
        self.pool = pool
        pool._connect = self.login  # type: ignore[method-assign,assignment]  # the login: no sshd in unit tests
        pool.read_file = self.read_file  # type: ignore[method-assign]

    def login(self, address: str) -> Login:
        self.logins.append(Login(self.newest))
        return self.logins[-1]

    def read_file(self, address: str, path: str, generation: int | None = None) -> bytes:
        assert path == "/proc/self/cgroup" and generation is not None
        job = self.pool._on(address, generation).transport.job  # type: ignore[union-attr]
        where = f"/slurm/uid_1003/job_{job}/step_extern" if job else "/user.slice/user-1003.slice/session-4.scope"
        return f"0::{where}\n".encode()


@pytest.fixture
def pool(tmp_path) -> tunnels.TunnelPool:
    return tunnels.TunnelPool(config(tmp_path, "Host n1\n  HostName 127.0.0.1\n"), transport="paramiko")


def test_connections_stay_one_per_node_where_no_job_adopts_them(pool):
    node = AdoptingNode(pool, newest=None)
    first = pool.connect("n1", job="7")
    assert pool.connect("n1", job="8") == first and pool.generation("n1", job="8") == first
    assert len(node.logins) == 1
    assert pool.status()["n1"]["connections"] == [{"generation": first, "job": None}]


def test_each_job_gets_its_own_connection_and_keeps_it_when_the_other_ends(pool):
    node = AdoptingNode(pool, newest="7")
    seven = pool.connect("n1", job="7")      # job 7's agent registers at its start: 7 is the newest
    node.newest = "8"
    eight = pool.connect("n1", job="8")      # then job 8's
    assert seven != eight and len(node.logins) == 2
    assert [c["job"] for c in pool.status()["n1"]["connections"]] == ["7", "8"]
    assert pool.note("n1", "7", seven) == pool.note("n1", "8", eight) == ""
    node.logins[1].close()                   # job 8 is cancelled: its session dies with it
    assert pool.generation("n1", job="7") == seven
    assert pool.generation("n1", job="8") is None
    assert pool.connect("n1", job="7") == seven and len(node.logins) == 2   # no new login for job 7


def test_a_job_borrows_the_newer_jobs_connection_until_that_job_ends(pool):
    node = AdoptingNode(pool, newest="8")    # a master started after both jobs: every login lands in 8
    eight = pool.connect("n1", job="8")
    borrowed = pool.connect("n1", job="7")
    assert borrowed == eight and len(node.logins) == 2
    assert not node.logins[1].is_active()    # the second login, into 8 again, was closed: one per job
    assert [c["job"] for c in pool.status()["n1"]["connections"]] == ["8"]
    assert "through job 8's SSH connection" in pool.note("n1", "7", borrowed)
    assert pool.connect("n1", job="7") == eight and len(node.logins) == 2   # no login again at once
    node.logins[0].close()                   # job 8 ends: job 7's agents lose their borrowed connection
    node.newest = "7"
    assert pool.generation("n1", job="7") is None
    own = pool.connect("n1", job="7")
    assert own not in (eight, None) and pool.note("n1", "7", own) == ""
    assert [c["job"] for c in pool.status()["n1"]["connections"]] == ["7"]


def test_a_channel_on_a_generation_that_ended_is_refused_not_rerouted(pool):
    node = AdoptingNode(pool, newest="7")
    seven = pool.connect("n1", job="7")
    node.newest = "8"
    pool.connect("n1", job="8")
    node.logins[0].close()
    with pytest.raises(AgentUnreachable, match="closed since the agent was checked"):
        pool.channel("n1", 7000, generation=seven)


def test_a_login_landing_in_an_ending_job_is_closed_at_once_and_tried_again_later(pool):
    """After job 8 is cancelled its cgroup lives on a while, and logins still land in it: kept, they would hold
    the job up until Slurm gives up and drains the node ("Kill task failed"). So such a login is closed."""
    node = AdoptingNode(pool, newest="8")
    pool.connect("n1", job="8")
    pool.connect("n1", job="7")               # borrows job 8's
    node.logins[0].close()                   # job 8 cancelled: its connection dies; its cgroup is still there
    with pytest.raises(AgentUnreachable, match="landed in job 8, whose connection ended"):
        pool.connect("n1", job="7")
    assert not node.logins[-1].is_active() and pool.generation("n1", job="7") is None
    with pytest.raises(AgentUnreachable, match="next try in"):
        pool.connect("n1", job="7")           # paused: no login at all
    logins = len(node.logins)
    node.newest = "7"                        # job 8's cgroup is gone
    time.sleep(1.1)                          # the first pause (0.5 * 2 s)
    own = pool.connect("n1", job="7")
    assert len(node.logins) == logins + 1 and node.logins[-1].is_active()
    assert pool.generation("n1", job="7") == own and pool.note("n1", "7", own) == ""


def test_logins_landing_in_an_ending_job_again_and_again_pause_1_2_then_4_s_at_most(pool):
    """A job may take Slurm's KillWait (30 s) and its epilog to end: the pause stops growing at 4 s, so that a
    copy waiting for the node resumes soon after, at the cost of a login every 4 s meanwhile."""
    node = AdoptingNode(pool, newest="8")
    pool.connect("n1", job="8")
    pool.connect("n1", job="7")
    node.logins[0].close()                   # job 8 is ending, for a long while
    pauses = []
    for _ in range(6):
        for n in pool._nodes.values():       # the pause is over (not waited for here)
            n.retry_at = 0.0
        with pytest.raises(AgentUnreachable, match="landed in job 8, whose connection ended"):
            pool.connect("n1", job="7")
        pauses.append(round(max(n.retry_at for n in pool._nodes.values()) - time.monotonic()))
    assert pauses == [1, 2, 4, 4, 4, 4]


def test_a_job_whose_connection_broke_may_log_in_to_itself_again(pool):
    """A connection that ended without its job (a network failure) is opened again into the same job."""
    node = AdoptingNode(pool, newest="7")
    first = pool.connect("n1", job="7")
    node.logins[0].close()
    again = pool.connect("n1", job="7")
    assert again != first and node.logins[-1].is_active()


def test_a_borrower_whose_own_login_fails_keeps_the_borrowed_connection(pool, monkeypatch):
    """Both pools follow the same rules (dxflow.ssh.adoption.Adoption.connect): a login tried again for a
    job that borrows another job's connection, and failing, leaves it the borrowed one."""
    from dxflow.ssh import adoption

    node = AdoptingNode(pool, newest="8")
    eight = pool.connect("n1", job="8")
    assert pool.connect("n1", job="7") == eight      # borrowed
    monkeypatch.setattr(adoption, "BORROW_RETRY", 0.0)   # its own login is due again

    def refused(address: str) -> Login:
        raise ConnectionRefusedError("refused")
    pool._connect = refused  # type: ignore[method-assign,assignment]
    assert pool.connect("n1", job="7") == eight
    assert "through job 8's SSH connection" in pool.note("n1", "7", eight)
    node.logins[0].close()                           # job 8 ends: nothing left to borrow, the failure shows
    with pytest.raises(AgentUnreachable, match="next try in|cannot connect by SSH"):
        pool.connect("n1", job="7")
