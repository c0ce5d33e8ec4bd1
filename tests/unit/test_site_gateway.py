"""The agent gateway (dxflow.site.gateway) and the agent's dial-out (dxflow.agent.dialout), on loopback:
real paramiko on both sides, the real munged of this host (root's credentials: run as root), the real
site store (SQLite). Only the scheduler is a table (whether a job runs on a node)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import paramiko
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from dxflow import API_VERSION, __version__, enroll, munge
from dxflow.agent import dialout
from dxflow.config import SiteConfig
from dxflow.errors import AgentUnreachable
from dxflow.registration import Registration
from dxflow.site import enrollment as enrollment_mod
from dxflow.site.config import SiteServiceConfig
from dxflow.site.gateway import Gateway
from dxflow.site.store import Store

pytestmark = pytest.mark.skipif(os.getuid() != 0 or not Path("/run/munge/munge.socket.2").exists(),
                                reason="makes root's MUNGE credentials: needs root and a running munged (the lab's)")

USER = "alice" if subprocess.run(["id", "alice"], capture_output=True).returncode == 0 else "root"


class SchedulerSays:
    """The fleet as the gateway sees it: the scheduler's word on which job runs where, and the news it is told."""

    def __init__(self) -> None:
        self.running: set[tuple[str, str, str, str]] = set()
        self.connected: list[str] = []
        self.disconnected: list[str] = []

    def job_runs(self, cluster: str, job: str, node: str, user: str) -> bool:
        return (cluster, job, node, user) in self.running

    def agent_connected(self, name: str) -> None:
        self.connected.append(name)

    def agent_disconnected(self, name: str, why: str = "") -> None:
        self.disconnected.append(name)


class Port:
    """A TCP service on 127.0.0.1 that greets each connection with its own name."""

    def __init__(self, greeting: bytes) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.greeting = greeting
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.sendall(self.greeting)
            conn.close()


def host_key_pem() -> tuple[str, str]:
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption()).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    return private, public


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A gateway on loopback with the site's keys published in tmp_path/publish, the scheduler's table empty."""
    monkeypatch.setattr(enrollment_mod, "ENROLL_WAIT", 0.5)
    monkeypatch.setattr(enrollment_mod, "ENROLL_ASK_EVERY", 0.2)
    state, publish = tmp_path / "state", tmp_path / "publish"
    state.mkdir()
    publish.mkdir()
    private, public = host_key_pem()
    (state / "gateway_host_key").write_text(private)
    (publish / "gateway_host_key.pub").write_text(public + "\n")
    config = SiteServiceConfig(state_dir=str(state), publish_dir=str(publish), replica="r1")
    store = Store(str(state / "site.db"))
    fleet = SchedulerSays()
    gw = Gateway(config, store, fleet, listen=("127.0.0.1", 0))
    gw.start()
    yield gw, store, fleet, SiteConfig(site_gateways=[f"127.0.0.1:{gw.address[1]}"], site_keys=str(publish))
    gw.stop()
    store.close()


@pytest.fixture
def replica(site):
    """A second replica's gateway: the same keys and scheduler, a store of its own on the same database."""
    gw, store, fleet, conf = site
    other = Store(store.url)
    gw2 = Gateway(gw.config, other, fleet, listen=("127.0.0.1", 0))
    gw2.start()
    yield gw2
    gw2.stop()
    other.close()


def registration(name_parts: tuple[str, str, str], port: int, user: str = USER) -> Registration:
    cluster, job, node = name_parts
    return Registration(cluster=cluster, scheduler="slurm", job=job, node=node, address=node, port=port, pid=os.getpid(),
                        user=user, started="2026-01-01T00:00:00+00:00", public_key="-----BEGIN PUBLIC KEY-----",
                        api_version=API_VERSION, version=__version__)


def wait_for(check, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def read_all(chan) -> bytes:
    chan.settimeout(10)
    out = b""
    while chunk := chan.recv(1024):
        out += chunk
    chan.close()
    return out


def dial(site_config: SiteConfig, e: enroll.Enrollment, reg: Registration) -> dialout.DialOut:
    d = dialout.start(site_config, e, reg)
    assert d is not None
    return d


def login(gw: Gateway) -> paramiko.Transport:
    t = paramiko.Transport(socket.create_connection(gw.address, timeout=10))
    t.start_client(timeout=10)
    return t


def test_an_enrolled_agent_is_reached_at_its_own_port_only(site):
    gw, store, fleet, conf = site
    agent, decoy = Port(b"the agent"), Port(b"the decoy")
    job = ("c1", "101", "n1")
    fleet.running.add((*job, USER))
    d = dial(conf, enroll.make(*job, USER), registration(job, agent.port))
    try:
        assert wait_for(lambda: gw.connected("c1.101.n1")), "the agent never connected"
        assert fleet.connected == ["c1.101.n1"]
        stored = store.agent("c1.101.n1")
        assert stored is not None and stored.reg.user == USER and stored.reg.port == agent.port
        assert read_all(gw.channel("c1.101.n1", 10)) == b"the agent"
        # a channel that names another port on the node still lands on the agent's own
        t = gw._conns["c1.101.n1"].transport
        chan = t.open_channel("forwarded-tcpip", dest_addr=("127.0.0.1", decoy.port), src_addr=("127.0.0.1", 0),
                              timeout=10)
        assert read_all(chan) == b"the agent"
        assert gw.status()["agents"] == ["c1.101.n1"]
    finally:
        d.stop()
    assert wait_for(lambda: "c1.101.n1" in fleet.disconnected), "the fleet was not told the agent left"
    with pytest.raises(AgentUnreachable):
        gw.channel("c1.101.n1", 2)


def test_an_enrolled_agent_dials_again_with_its_key_alone(site):
    gw, store, fleet, conf = site
    agent = Port(b"again")
    job = ("c1", "102", "n2")
    fleet.running.add((*job, USER))
    e = enroll.make(*job, USER)
    d = dial(conf, e, registration(job, agent.port))
    assert wait_for(lambda: gw.connected("c1.102.n2"))
    d.stop()
    assert wait_for(lambda: not gw.connected("c1.102.n2"))
    key_only = enroll.Enrollment(e.name, e.private_key, e.public_key, "")  # no credential: the key must do
    d = dial(conf, key_only, registration(job, agent.port))
    try:
        assert wait_for(lambda: gw.connected("c1.102.n2")), "the enrolled key was not let in again"
        assert read_all(gw.channel("c1.102.n2", 10)) == b"again"
    finally:
        d.stop()


def test_an_agent_refuses_a_gateway_whose_host_key_is_not_the_sites(site, tmp_path):
    gw, store, fleet, conf = site
    job = ("c1", "103", "n1")
    fleet.running.add((*job, USER))
    other = tmp_path / "other"
    other.mkdir()
    (other / "gateway_host_key.pub").write_text(host_key_pem()[1])
    forged = SiteConfig(site_gateways=conf.site_gateways, site_keys=str(other))
    d = dial(forged, enroll.make(*job, USER), registration(job, Port(b"x").port))
    try:
        time.sleep(2)
        assert not gw.connected("c1.103.n1") and store.agent("c1.103.n1") is None
        assert not any(x.connected.is_set() for x in d.dialers)
    finally:
        d.stop()


def enroll_by_hand(gw: Gateway, username: str, e: enroll.Enrollment, credential: str | None = None) -> bool:
    """Log in as ``username`` with ``e``'s key and signature, and ``credential`` (e's own by default)."""
    t = login(gw)
    try:
        forged = enroll.Enrollment(e.name, e.private_key, e.public_key, credential if credential is not None else e.credential)
        t.auth_password(username, enroll.password(forged, t.session_id))
        return t.is_authenticated()
    except paramiko.AuthenticationException:
        return False
    finally:
        t.close()


def test_a_credential_enrolls_only_the_agent_it_names(site):
    gw, store, fleet, conf = site
    fleet.running |= {("c1", "201", "n1", USER), ("c1", "202", "n1", USER)}
    mine = enroll.make("c1", "201", "n1", USER)
    assert not enroll_by_hand(gw, "c1.202.n1", mine)  # forged user name: another job's agent
    assert store.agent("c1.202.n1") is None


def enroll_forged(gw: Gateway, username: str, e: enroll.Enrollment, thief_private: str) -> bool:
    """Log in with ``e``'s credential and public key, the session signed by another key."""
    t = login(gw)
    try:
        thief = enroll.Enrollment(e.name, thief_private, e.public_key, e.credential)
        credential, signature, _ = enroll.password(thief, t.session_id).split(" ")
        t.auth_password(username, f"{credential} {signature} {e.public_key.split()[1]}")
        return t.is_authenticated()
    except paramiko.AuthenticationException:
        return False
    finally:
        t.close()


def short_lived(job: tuple[str, str, str], ttl: int) -> enroll.Enrollment:
    """An enrollment as the prolog makes it, but with a credential of ``ttl`` seconds."""
    private, public = host_key_pem()
    return enroll.Enrollment(".".join(job), private, public,
                             munge.encode(enroll.payload(*job, USER, public), ttl=ttl))


def test_a_replayed_credential_without_its_keys_signature_is_refused(site):
    gw, store, fleet, conf = site
    fleet.running.add(("c1", "203", "n1", USER))
    e = enroll.make("c1", "203", "n1", USER)
    assert enroll_by_hand(gw, "c1.203.n1", e)
    store.delete("c1.203.n1")
    thief = enroll.Enrollment(e.name, host_key_pem()[0], e.public_key, e.credential)
    assert not enroll_by_hand(gw, "c1.203.n1", thief)  # replayed, the session signed by the thief's own key
    assert not enroll_forged(gw, "c1.203.n1", e, host_key_pem()[0])  # ... offering the agent's key, signed by his
    assert store.agent("c1.203.n1") is None
    fleet.running.clear()  # the job ended: its own key holder is refused too
    assert not enroll_by_hand(gw, "c1.203.n1", e)
    assert store.agent("c1.203.n1") is None


def test_a_credential_is_refused_once_its_time_to_live_is_over_even_where_its_decode_is_kept(site):
    gw, store, fleet, conf = site
    job = ("c1", "209", "n1")
    e = short_lived(job, 1)
    assert not enroll_by_hand(gw, e.name, e)  # decoded (and kept), refused: the scheduler does not list the job
    fleet.running.add((*job, USER))
    time.sleep(2.5)
    assert not enroll_by_hand(gw, e.name, e)
    assert store.agent(e.name) is None


def test_a_password_whose_signature_fails_is_refused_before_munged_is_asked(site):
    gw, store, fleet, conf = site
    fleet.running.add(("c1", "210", "n1", USER))
    e = enroll.make("c1", "210", "n1", USER)
    assert not enroll_forged(gw, e.name, e, host_key_pem()[0])
    assert munge.decode(e.credential).uid == 0  # munged decodes it now: the gateway never did


def test_two_gateways_sharing_one_store_both_admit_an_agent_with_one_credential(site, replica):
    gw, store, fleet, conf = site
    agent = Port(b"both")
    job = ("c1", "211", "n1")
    fleet.running.add((*job, USER))
    both = SiteConfig(site_gateways=[*conf.site_gateways, f"127.0.0.1:{replica.address[1]}"],
                      site_keys=conf.site_keys)
    d = dial(both, enroll.make(*job, USER), registration(job, agent.port))
    try:
        assert wait_for(lambda: gw.connected("c1.211.n1") and replica.connected("c1.211.n1")), \
            "the agent did not get into both replicas"
        assert read_all(gw.channel("c1.211.n1", 10)) == b"both"
        assert read_all(replica.channel("c1.211.n1", 10)) == b"both"
    finally:
        d.stop()
    # by hand, the enrollment password itself on each replica, one after the other: both let it in
    e = enroll.make("c1", "212", "n1", USER)
    fleet.running.add(("c1", "212", "n1", USER))
    assert enroll_by_hand(gw, e.name, e) and enroll_by_hand(replica, e.name, e)
    # and where the first replica decoded the credential but could not enroll the agent, the second
    # enrolls it from the decode the first kept (this host's munged calls the credential replayed)
    e = enroll.make("c1", "213", "n1", USER)
    assert not enroll_by_hand(gw, e.name, e)
    fleet.running.add(("c1", "213", "n1", USER))
    assert enroll_by_hand(replica, e.name, e)
    assert store.agent(e.name) is not None and store.agent(e.name).gateway_key == enroll.fingerprint(e.public_key)


def test_an_enrollment_refused_after_its_decode_is_tried_again_with_the_same_credential(site):
    gw, store, fleet, conf = site
    job = ("c1", "214", "n1")
    e = enroll.make(*job, USER)
    assert not enroll_by_hand(gw, e.name, e)  # the scheduler does not list the job yet
    fleet.running.add((*job, USER))
    assert enroll_by_hand(gw, e.name, e)
    # the agent's own dialer keeps trying, with backoff, until the scheduler says yes
    job = ("c1", "215", "n1")
    agent = Port(b"later")
    d = dial(conf, enroll.make(*job, USER), registration(job, agent.port))
    try:
        time.sleep(1.5)
        assert not gw.connected("c1.215.n1")
        fleet.running.add((*job, USER))
        assert wait_for(lambda: gw.connected("c1.215.n1"), 40), "the agent did not enroll on a later try"
    finally:
        d.stop()


def test_a_store_error_on_the_key_lookup_tries_no_enrollment(site, caplog):
    gw, store, fleet, conf = site
    job = ("c1", "216", "n1")
    fleet.running.add((*job, USER))
    e = enroll.make(*job, USER)
    store.execute("DROP TABLE site_agents")  # every look-up of an agent now fails in the store
    t = login(gw)
    try:
        with pytest.raises((paramiko.AuthenticationException, paramiko.SSHException, EOFError, OSError)):
            t.auth_publickey(e.name, paramiko.Ed25519Key.from_private_key(__import__("io").StringIO(e.private_key)))
        if t.is_active():  # the gateway closes the connection; if it is not closed yet, enrollment is refused
            with pytest.raises((paramiko.AuthenticationException, paramiko.SSHException, EOFError, OSError)):
                t.auth_password(e.name, enroll.password(e, t.session_id))
        assert not t.is_authenticated()
    finally:
        t.close()
    assert wait_for(lambda: "cannot look up its key in the store" in caplog.text, 5)
    assert munge.decode(e.credential).uid == 0  # munged decodes it now: the gateway never asked it


def test_a_credential_not_made_by_root_is_refused(site):
    gw, store, fleet, conf = site
    if USER == "root":
        pytest.skip("needs a user other than root (the lab's alice)")
    fleet.running.add(("c1", "204", "n1", USER))
    e = enroll.make("c1", "204", "n1", USER)
    users_own = subprocess.run(["runuser", "-u", USER, "--", "munge", "-s",
                                enroll.payload("c1", "204", "n1", USER, e.public_key).decode()],
                               capture_output=True, text=True, check=True).stdout.strip()
    assert not enroll_by_hand(gw, "c1.204.n1", e, users_own)
    assert store.agent("c1.204.n1") is None


def test_a_credential_is_refused_where_the_scheduler_says_the_job_is_not(site):
    gw, store, fleet, conf = site
    fleet.running.add(("c1", "205", "n1", USER))  # the job runs on n1, the credential says n2
    assert not enroll_by_hand(gw, "c1.205.n2", enroll.make("c1", "205", "n2", USER))
    assert store.agent("c1.205.n2") is None


def test_a_stolen_credential_without_the_key_it_names_is_refused(site):
    gw, store, fleet, conf = site
    fleet.running.add(("c1", "206", "n1", USER))
    e = enroll.make("c1", "206", "n1", USER)
    thief = enroll.Enrollment(e.name, host_key_pem()[0], e.public_key, e.credential)  # another private key
    assert not enroll_by_hand(gw, "c1.206.n1", thief)
    assert store.agent("c1.206.n1") is None


def test_an_agent_gets_no_session_command_or_other_forward(site):
    gw, store, fleet, conf = site
    fleet.running.add(("c1", "207", "n1", USER))
    e = enroll.make("c1", "207", "n1", USER)
    assert enroll_by_hand(gw, "c1.207.n1", e)
    t = login(gw)
    try:
        t.auth_publickey("c1.207.n1", paramiko.Ed25519Key.from_private_key(__import__("io").StringIO(e.private_key)))
        with pytest.raises(paramiko.ChannelException):
            t.open_session(timeout=5)
        with pytest.raises(paramiko.ChannelException):
            t.open_channel("direct-tcpip", dest_addr=("127.0.0.1", 22), src_addr=("127.0.0.1", 0), timeout=5)
        with pytest.raises(paramiko.SSHException):  # no forward before the registration
            t.request_port_forward("127.0.0.1", 8080)
        reg = registration(("c1", "207", "n1"), 8080)
        assert t.global_request(enroll.REGISTER, (reg.to_json(),), wait=True) is not None
        with pytest.raises(paramiko.SSHException):  # another port than the registered one
            t.request_port_forward("0.0.0.0", 22)
        assert t.request_port_forward("127.0.0.1", 8080) == 8080
        with pytest.raises(paramiko.SSHException):  # one forward only
            t.request_port_forward("127.0.0.1", 8080)
    finally:
        t.close()


def test_a_registration_naming_another_user_is_refused(site):
    gw, store, fleet, conf = site
    fleet.running.add(("c1", "208", "n1", USER))
    e = enroll.make("c1", "208", "n1", USER)
    assert enroll_by_hand(gw, "c1.208.n1", e)
    t = login(gw)
    try:
        t.auth_publickey("c1.208.n1", paramiko.Ed25519Key.from_private_key(__import__("io").StringIO(e.private_key)))
        reg = registration(("c1", "208", "n1"), 8080, user="mallory")
        assert t.global_request(enroll.REGISTER, (reg.to_json(),), wait=True) is None
    finally:
        t.close()


def test_the_enrollment_file_is_the_users_alone_and_read_once(tmp_path):
    e = enroll.Enrollment("c.1.n", "priv", "ssh-ed25519 AAAA", "MUNGE:x:")
    path = enroll.write(tmp_path / "run", e)
    assert path.stat().st_mode & 0o777 == 0o600 and (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    assert enroll.take(path) == e and not path.exists()
    open_one = enroll.write(tmp_path / "run", e)
    open_one.chmod(0o644)
    with pytest.raises(ValueError, match="alone"):
        enroll.take(open_one)


def test_the_agent_takes_its_enrollment_once_and_its_children_do_not_inherit_it(tmp_path, monkeypatch):
    e = enroll.Enrollment("c.1.n", "priv", "ssh-ed25519 AAAA", "MUNGE:x:")
    path = enroll.write(tmp_path / "run", e)
    monkeypatch.setenv(enroll.ENV, str(path))
    assert dialout.take_enrollment() == e
    assert enroll.ENV not in os.environ and not path.exists()
    assert dialout.take_enrollment() is None


def test_the_launcher_enrolls_as_root_and_hands_over_as_the_user(tmp_path, monkeypatch):
    """dxflow.adopt: root's credential names the job, node, user and the key; the file it hands over is
    the agent's alone, named in the variable the agent reads."""
    from dxflow import adopt, munge

    monkeypatch.delenv(enroll.ENV, raising=False)
    assert adopt.enroll_agent(None) is None
    e = adopt.enroll_agent({"cluster": "c1", "job": "301", "node": "n3", "user": USER})
    assert e is not None and e.name == "c1.301.n3"
    cred = munge.decode(e.credential)
    assert cred.uid == 0 and cred.payload == enroll.payload("c1", "301", "n3", USER, e.public_key)
    adopt.hand_over(e, str(tmp_path / "run"))
    path = Path(os.environ[enroll.ENV])
    assert path.parent == tmp_path / "run" and path.stat().st_mode & 0o777 == 0o600
    assert enroll.take(path) == e
    monkeypatch.delenv(enroll.ENV)
