"""Who asks the site service and what they may do (dxflow.site.users), and the site console's sessions
in the store (dxflow.site.sessions, dxflow.site.console): the site's real app (dxflow.site.app) on a
real SQLite store, credentials from this host's real munged. Two apps on one store stand for two
replicas. The bob-attacks-alice matrix on the lab is tests/lab/test_site_security.py."""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import pwd
import shutil
import time
from pathlib import Path

import pytest

from dxflow import munge
from dxflow.errors import AuthError
from dxflow.site import users
from dxflow.site.app import create_app
from dxflow.site.client import request_credential
from dxflow.site.config import SiteServiceConfig
from dxflow.site.fleet import SiteFleet
from dxflow.site.sessions import SiteSessions
from dxflow.site.store import Store

pytestmark = pytest.mark.skipif(not Path("/run/munge/munge.socket.2").exists() or not shutil.which("unmunge"),
                                reason="needs a running munged (the lab's)")

CONSOLE = {"dxflow.site.listener": "console"}
#: who runs the tests (root under the README's test command, a developer's own account otherwise): the
#: user every credential made here names, and that user's own primary group, of which it is a member
ME = pwd.getpwuid(os.getuid()).pw_name
MY_GROUP = grp.getgrgid(os.getgid()).gr_name
CONSOLE_HOST = "http://127.0.0.1:8472"


def make_config(tmp_path: Path, **kw) -> SiteServiceConfig:
    return SiteServiceConfig(state_dir=str(tmp_path), publish_dir=str(tmp_path / "pub"), **kw)


@pytest.fixture
def replicas(tmp_path):
    """Two site apps (replicas) on one store; this test's user (ME) is no admin there."""
    config = make_config(tmp_path, admin_group="dxflow-test-no-such-group")
    apps = []
    for _ in range(2):
        store = Store(str(tmp_path / "site.db"))
        apps.append(create_app(SiteFleet(config, store)))
    return apps


def signed(method: str, target: str) -> dict:
    return {"Authorization": f"MUNGE {request_credential(method, target)}"}


# -- MUNGE login ------------------------------------------------------------------------------------

def test_a_fresh_credential_for_this_request_names_its_user(replicas):
    app = replicas[0]
    resp = app.test_client().get("/api/master", headers=signed("GET", "/api/master"))
    assert resp.status_code == 200, resp.get_json()
    assert resp.get_json()["user"] == ME and resp.get_json()["admin"] is False


@pytest.mark.parametrize("why, headers", [
    ("none", {}),
    ("another scheme", {"Authorization": "Bearer abc"}),
    ("garbage", {"Authorization": "MUNGE not-a-credential"}),
    ("another path", None),
    ("another method", None),
    ("an enrollment-like payload", None),
])
def test_a_request_without_its_own_credential_is_refused(replicas, why, headers):
    client = replicas[0].test_client()
    if why == "another path":
        headers = signed("GET", "/api/agents")
    elif why == "another method":
        headers = signed("POST", "/api/master")
    elif why == "an enrollment-like payload":
        headers = {"Authorization": "MUNGE " + munge.encode(json.dumps({"cluster": "c", "job": "1"}).encode(), ttl=60)}
    resp = client.get("/api/master", headers=headers)
    assert resp.status_code == 401, (why, resp.get_json())
    assert resp.get_json()["error"] in ("AuthError", "MungeError")


def test_a_credential_works_once_on_any_replica(replicas):
    headers = signed("GET", "/api/master")
    assert replicas[0].test_client().get("/api/master", headers=headers).status_code == 200
    again = replicas[1].test_client().get("/api/master", headers=headers)
    assert again.status_code == 401 and "replayed" in again.get_json()["message"]


def test_the_store_remembers_credentials_for_every_replica(tmp_path):
    """munged's own replay cache is per host: replicas on two hosts still refuse a second use (here the
    decode is left out: the claim is what replicas share)."""
    config = make_config(tmp_path)
    one, two = (users.Users(config, Store(str(tmp_path / "site.db"))) for _ in range(2))
    one.first_use("cred-x", time.time() + 60)
    with pytest.raises(AuthError, match="replayed"):
        two.first_use("cred-x", time.time() + 60)


def test_an_old_credential_is_refused_whatever_ttl_its_maker_chose(tmp_path):
    def aged(cred: str) -> munge.Credential:  # munged's answer, as if made MAX_AGE+1 s ago with a long TTL
        real = munge.decode(cred)
        return dataclasses.replace(real, encode_time=real.encode_time - users.MAX_AGE - 1, ttl=3600)

    u = users.Users(make_config(tmp_path), Store(str(tmp_path / "site.db")), decode=aged)
    with pytest.raises(AuthError, match="s ago"):
        u.authenticate(f"MUNGE {request_credential('GET', '/api/master')}", "GET", "/api/master")
    fresh = users.Users(make_config(tmp_path), Store(str(tmp_path / "site.db")))
    assert fresh.authenticate(f"MUNGE {request_credential('GET', '/x?a=1')}", "GET", "/x?a=1").name == ME


# -- the policy ---------------------------------------------------------------------------------------

ALICE, BOB = users.SiteUser("alice", 1001), users.SiteUser("bob", 1002)
DANA = users.SiteUser("dana", 1003, admin=True)


@pytest.mark.parametrize("who, method, path, allowed", [
    (ALICE, "POST", "/api/fleet/1/-/api/exec", True),          # her own job: everything
    (ALICE, "GET", "/api/fleet/1/-/api/shell", True),
    (BOB, "GET", "/api/fleet/1/-/api/node", False),            # another user: nothing, not even a look
    (BOB, "GET", "/api/metrics/1", False),
    (DANA, "GET", "/api/fleet/1/-/api/node", True),            # an admin: state and metrics, read-only
    (DANA, "GET", "/api/fleet/1/n1/api/metrics", True),
    (DANA, "GET", "/api/metrics/1", True),
    (DANA, "GET", "/api/report/1", True),
    (DANA, "POST", "/api/fleet/1/-/api/node", False),
    (DANA, "POST", "/api/fleet/1/-/api/exec", False),
    (DANA, "GET", "/api/fleet/1/-/api/files/content", False),
    (DANA, "PUT", "/api/fleet/1/-/api/files/content", False),
    (DANA, "GET", "/api/fleet/1/-/api/shell", False),
    (DANA, "GET", "/api/fleet/1/-/api/logs", False),
    (DANA, "GET", "/api/fleet/1/-/api/ports", False),
    (DANA, "GET", "/api/fleet/1/-/api/top", False),
    (DANA, "GET", "/api/fleet/1/-/proxy/8888/", False),
    (DANA, "GET", "/api/forward/1/-/8888", False),
    (DANA, "GET", "/api/fleet/1/-/api/node/../exec", False),
])
def test_the_policy(who, method, path, allowed):
    assert users.decide(who, "alice", method, path) is allowed


def test_admins_may_act_only_where_the_site_says_so():
    assert users.decide(DANA, "alice", "POST", "/api/fleet/1/-/api/exec", admins_may_act=True)
    assert not users.decide(BOB, "alice", "POST", "/api/fleet/1/-/api/exec", admins_may_act=True)


def test_admins_are_the_members_of_admin_group(tmp_path):
    store = Store(str(tmp_path / "site.db"))
    assert users.Users(make_config(tmp_path, admin_group=MY_GROUP), store).is_admin(ME)
    assert not users.Users(make_config(tmp_path, admin_group=MY_GROUP), store).is_admin("nobody")
    assert not users.Users(make_config(tmp_path, admin_group="dxflow-test-no-such-group"), store).is_admin(ME)


def test_another_users_job_is_no_such_job_and_an_admin_only_reads(tmp_path):
    """Through the real app: alice's agent in the store; ME asks, first as a plain user (404 for
    anything, as for a job that never was), then as an admin (a read goes on to the agent: 502 here,
    where no gateway connects it; an act is refused, 403, saying what admins may do)."""
    for group, read_status, act_status in (("dxflow-test-no-such-group", 404, 404), (MY_GROUP, 502, 403)):
        store = Store(str(tmp_path / f"{group}.db"))
        store.enroll("dxlab", "41", "n1", "alice", 1001, "SHA256:x")
        client = create_app(SiteFleet(make_config(tmp_path, admin_group=group), store)).test_client()
        read = "/api/fleet/41/-/api/node"
        assert client.get(read, headers=signed("GET", read)).status_code == read_status
        never = "/api/fleet/99/-/api/node"
        assert client.get(never, headers=signed("GET", never)).status_code == 404
        for method, path in (("POST", "/api/fleet/41/-/api/exec"), ("GET", "/api/fleet/41/-/api/files/content"),
                             ("GET", "/api/fleet/41/-/api/logs")):
            resp = client.open(path, method=method, headers=signed(method, path), json={} if method == "POST" else None)
            assert resp.status_code == act_status, (group, path, resp.get_json())
            assert any(words in resp.get_json()["message"] for words in
                       (("no such job", "no agent of job") if act_status == 404 else ("act only on their own",)))
        listing = client.get("/api/agents", headers=signed("GET", "/api/agents")).get_json()
        assert [(a["job"], a.get("user")) for a in listing] == ([] if read_status == 404 else [("41", "alice")])


# -- the console: sessions in the store, shared by replicas -------------------------------------------

def log_in(app, token: str):
    client = app.test_client()
    resp = client.get(f"/login?token={token}", base_url=CONSOLE_HOST, environ_base=CONSOLE)
    return client, resp


def test_a_console_login_link_is_the_asking_users_once_and_valid_on_every_replica(replicas):
    a, b = replicas
    resp = a.test_client().post("/api/console/token", headers=signed("POST", "/api/console/token"))
    assert resp.status_code == 200, resp.get_json()
    token = resp.get_json()["token"]
    assert resp.get_json()["url"] == f"http://127.0.0.1:8472/login?token={token}"

    browser, login = log_in(b, token)  # redeemed at the other replica
    assert login.status_code == 303 and login.headers["Location"] == "/console/"
    cookie = browser.get_cookie("dxflow_site_console", domain="127.0.0.1")
    assert cookie is not None and cookie.http_only and cookie.same_site == "Strict"
    _, again = log_in(a, token)
    assert again.status_code == 403  # single use, whichever replica is asked

    for app in (a, b):  # the session is the user's on both replicas
        other = app.test_client()
        other.set_cookie("dxflow_site_console", cookie.value, domain="127.0.0.1")
        conf = other.get("/console/config.json", base_url=CONSOLE_HOST, environ_base=CONSOLE)
        assert conf.status_code == 200 and conf.get_json()["user"] == ME

    csrf = browser.get("/console/config.json", base_url=CONSOLE_HOST, environ_base=CONSOLE).get_json()["csrf"]
    out = browser.post("/logout", base_url=CONSOLE_HOST, environ_base=CONSOLE,
                       headers={"X-CSRF-Token": csrf, "Origin": CONSOLE_HOST})
    assert out.status_code == 200
    other = a.test_client()
    other.set_cookie("dxflow_site_console", cookie.value, domain="127.0.0.1")
    assert other.get("/api/agents", base_url=CONSOLE_HOST, environ_base=CONSOLE).status_code == 401  # logged out everywhere


def test_the_console_listener_hands_out_no_login_token_and_wants_a_session(replicas):
    client = replicas[0].test_client()
    for path in ("/api/console/token", "/api/agents"):
        resp = client.open(path, method="POST" if "token" in path else "GET", base_url=CONSOLE_HOST,
                           environ_base=CONSOLE, headers=signed("POST", path))  # a MUNGE header counts for nothing here
        assert resp.status_code == 401, path
    assert client.get("/api/agents", base_url="http://evil.example:8472", environ_base=CONSOLE).status_code == 421


def test_tickets_work_once_for_their_label_and_secrets_are_stored_hashed(tmp_path):
    store = Store(str(tmp_path / "site.db"))
    one, two = SiteSessions(store), SiteSessions(Store(str(tmp_path / "site.db")))
    token, _ = one.new_login_token(60, user="alice")
    assert two.redeem_user(token) == "alice" and one.redeem_user(token) is None
    sid = two.start("alice")
    assert one.csrf(sid) == two.csrf(sid) and one.csrf_ok(sid, two.csrf(sid))
    label = one.add_service("alice", "dxlab", "41", "n1", 8888, "/api/fleet/dxlab~41/n1/proxy/8888")
    assert label.startswith("p8888-n1-dxlab-41") and two.service_prefix(label) == "/api/fleet/dxlab~41/n1/proxy/8888"
    ticket = one.new_ticket(sid, label)
    assert two.redeem_ticket(ticket, "p1-other") is None  # another label: and the ticket is spent
    ticket = one.new_ticket(sid, label)
    service_sid = two.redeem_ticket(ticket, label)
    assert service_sid and one.redeem_ticket(ticket, label) is None
    assert one.user_of_digest(one.service_session(service_sid, label) or "") == "alice"
    dump = "\n".join(line for line in store._sqlite.iterdump())  # type: ignore[union-attr]
    assert token not in dump and sid not in dump and ticket not in dump and service_sid not in dump
    one.end(sid)
    assert two.service_session(service_sid, label) is None and not two.valid(sid)


def test_audit_records_name_the_user_the_site_proved(tmp_path, monkeypatch, replicas):
    """The site runs as its own account: its records say who asked (``asked_by``), as MUNGE proved it."""
    import socket

    from flask import request

    from dxflow import audit, config

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "log"))
    sock.settimeout(5)
    site_toml = tmp_path / "dxflow.toml"
    site_toml.write_text(f'audit_socket = "{tmp_path / "log"}"\n')
    monkeypatch.setattr(config, "SITE_CONFIG", site_toml)
    app = replicas[0]

    @app.post("/test-act")
    def act():
        audit.record("relay", "POST /api/exec", dataclasses.make_dataclass("W", ["job", "node"])("41", "n1"),
                     request.environ)
        return "ok"

    assert app.test_client().post("/test-act", headers=signed("POST", "/test-act")).status_code == 200
    line = sock.recv(4096).decode()
    assert "action=relay" in line and f"asked_by={ME}" in line.rstrip("\x00\n ").split(), line
    sock.close()


def test_a_service_label_opened_again_by_another_user_is_no_longer_the_first_users(tmp_path):
    """A job id given again (to bob, after alice's job): alice's service cookie for that label names
    nobody any more, whatever her console session."""
    from dxflow.site.console import SessionUser

    sessions = SiteSessions(Store(str(tmp_path / "site.db")))
    alice_sid = sessions.start("alice")
    label = sessions.add_service("alice", "dxlab", "41", "n1", 8888, "/api/fleet/41/n1/proxy/8888")
    service_sid = sessions.redeem_ticket(sessions.new_ticket(alice_sid, label), label)
    seen: dict = {}
    layer = SessionUser(lambda environ, start: seen.update(environ) or [], sessions)
    environ = {"dxflow.console.session": sessions.service_session(service_sid, label), "dxflow.service": label}
    layer(dict(environ), None)
    assert seen.get(users.SESSION_USER) == "alice"
    assert sessions.add_service("bob", "dxlab", "41", "n1", 8888, "/api/fleet/41/n1/proxy/8888") == label
    seen.clear()
    layer(dict(environ), None)
    assert users.SESSION_USER not in seen


def test_the_listener_is_told_by_the_connections_local_port(tmp_path):
    """A request is the console's when its connection came in on console_listen's port, else the user
    API's (MUNGE): told by the socket, which no header can change. Either way nothing is let through
    unproven: the API wants MUNGE, the console a session."""
    import socket

    listeners = {}
    for name in ("api", "console"):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        listeners[name] = s
    console_port = listeners["console"].getsockname()[1]
    on_api = users.api_listener(make_config(tmp_path, console_listen=f"127.0.0.1:{console_port}"))
    for name, expected in (("api", True), ("console", False)):
        client = socket.create_connection(listeners[name].getsockname())
        conn, _ = listeners[name].accept()
        assert on_api({"gunicorn.socket": conn, "HTTP_HOST": "127.0.0.1:1", "SERVER_PORT": "1"}) is expected
        conn.close()
        client.close()
        listeners[name].close()
    assert on_api({}) is True and on_api({"dxflow.site.listener": "console"}) is False
