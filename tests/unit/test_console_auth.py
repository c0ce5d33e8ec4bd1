"""The web console's login, session and guard: the master's (fleet) and an agent's (node), in-process."""

from __future__ import annotations

import getpass
import json
import socket
import time
from pathlib import Path

import pytest

from dxflow import auth
from dxflow.master import client as mclient
from dxflow.master import console as mconsole
from dxflow.edge.webfiles import web_root

from dxflow.edge import session as esession
from dxflow.errors import NotFound
from dxflow.layout import UserLayout


class FakeRegistry:
    def all(self):
        return []


class FakePool:
    def status(self):
        return {}


class FakeAgent:
    def __init__(self, job: str, node: str) -> None:
        self.reg = type("Reg", (), {"job": job, "node": node})()


class FakeFleet:
    """Job 1 on n1, whose user listens on port 8000 (and nothing else)."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.layout = UserLayout(base, "login1").ensure()
        self.user = getpass.getuser()
        self.registry = FakeRegistry()
        self.pool = FakePool()
        self.relayed: list[tuple[str, str | None]] = []

    def refresh(self):
        pass

    def relay_target(self, job, node=None):
        self.relayed.append((job, node))
        if job != "1":
            raise NotFound(f"no agent of job {job}")
        return FakeAgent(job, node or "n1")

    def ask(self, agent, path, timeout=15.0):
        if path == "/api/ports/8000":
            return 200, {"port": 8000, "connect": "127.0.0.1"}
        return 403, {"error": "AccessDenied", "message": "not a port of yours"}

    def token(self, agent):
        return "a-token"

    def acquire(self, agent, timeout=60.0):
        raise NotFound("the fake fleet relays nothing")


@pytest.fixture
def master(tmp_path):
    from dxflow.master.app import create_app

    app = create_app(FakeFleet(tmp_path))
    app.config.update(TESTING=True, CONSOLE_PORT=8765)
    return app


def unix_socket(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    return s


@pytest.fixture
def cli_environ(tmp_path):
    """A request on the master's CLI socket (gunicorn hands the accepted socket, named by its listener)."""
    s = unix_socket(UserLayout(tmp_path, "login1").ensure().master_sock)
    yield {"gunicorn.socket": s}
    s.close()


UNIX: dict = {}


@pytest.fixture(autouse=True)
def _unix(cli_environ):
    UNIX.clear()
    UNIX.update(cli_environ)


def tcp(app):
    """A browser on the TCP port (Host 127.0.0.1:8765, unless a request names another base_url)."""
    client = app.test_client()
    plain_open = client.open

    def open_on_the_console(*args, **kwargs):
        kwargs.setdefault("base_url", "http://127.0.0.1:8765")
        return plain_open(*args, **kwargs)
    client.open = open_on_the_console  # type: ignore[method-assign]
    return client


def unix_token(app) -> str:
    resp = app.test_client().post("/api/console/token", environ_base=UNIX)
    assert resp.status_code == 200, resp.data
    data = resp.get_json()
    assert data["url"] == f"http://127.0.0.1:8765/login?token={data['token']}"
    return data["token"]


def logged_in(app):
    client = tcp(app)
    resp = client.get(f"/login?token={unix_token(app)}")
    assert resp.status_code == 303 and resp.headers["Location"].endswith("/console/")
    csrf = client.get("/console/config.json").get_json()["csrf"]
    return client, csrf


def test_web_root_has_the_console():
    root = web_root()
    for name in ("index.html", "app.js", "style.css", "js/api.js", "vendor/xterm/xterm.mjs",
                 "vendor/xterm/addon-fit.mjs", "vendor/xterm/xterm.css", "vendor/xterm/LICENSE", "vendor/README.md"):
        assert (root / name).is_file(), name


def test_unix_socket_is_trusted(master):
    client = master.test_client()
    assert client.get("/api/agents", environ_base=UNIX).status_code == 200
    assert client.get("/api/console", environ_base=UNIX).get_json()["port"] == 8765


@pytest.mark.parametrize("path", ["/api/agents", "/api/master", "/api/fleet/1/n1/api/node", "/console/config.json"])
def test_tcp_without_session_is_refused(master, path):
    resp = tcp(master).get(path)
    if path.startswith("/api/"):
        assert resp.status_code == 401
        assert resp.get_json()["error"] == "unauthorized"
    else:
        assert resp.status_code == 302 and resp.headers["Location"] == "/login"
    assert resp.headers["X-Frame-Options"] == "DENY"


def test_tcp_without_session_gets_the_login_page_only(master):
    client = tcp(master)
    for path in ("/", "/console/", "/console/app.js", "/console/js/fleet.js"):
        resp = client.get(path, base_url="http://127.0.0.1:8765", follow_redirects=True)
        assert resp.status_code == 200 and b"Log in to your console" in resp.data, path
        assert master.config["FLEET"].user.encode() not in resp.data
    assert client.get("/console/style.css").status_code == 200
    resp = client.post("/api/shutdown")
    assert resp.status_code == 401
    resp = client.post("/api/console/token")
    assert resp.status_code == 401


def test_login_sets_a_strict_httponly_cookie_once(master):
    token = unix_token(master)
    client = tcp(master)
    resp = client.get(f"/login?token={token}")
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith(f"{mconsole.COOKIE}=")
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/" in cookie
    assert client.get("/api/agents").status_code == 200
    # the token works once
    again = tcp(master).get(f"/login?token={token}")
    assert again.status_code == 403 and b"not valid" in again.data
    # the login form posts the token too
    form = tcp(master).post("/login", data={"token": unix_token(master)})
    assert form.status_code == 303


def test_login_token_only_on_the_unix_socket(master):
    client, csrf = logged_in(master)
    resp = client.post("/api/console/token", headers={"X-CSRF-Token": csrf})
    assert resp.status_code == 403


def test_console_socket_is_not_trusted(master, tmp_path):
    s = unix_socket(UserLayout(tmp_path, "login1").ensure().console_sock)
    try:
        client = tcp(master)
        assert client.get("/api/agents", environ_base={"gunicorn.socket": s}).status_code == 401
        assert client.post("/api/console/token", environ_base={"gunicorn.socket": s}).status_code == 401
    finally:
        s.close()


def test_expired_token_refused(master):
    sessions = master.config["CONSOLE_SESSIONS"]
    token, _ = sessions.new_login_token()
    sessions._tokens[esession._digest(token)] = time.time() - 1
    assert tcp(master).get(f"/login?token={token}").status_code == 403
    assert tcp(master).get("/login?token=made-up").status_code == 403


def test_csrf_needed_for_state_changes(master):
    client, csrf = logged_in(master)
    assert csrf
    resp = client.post("/logout")
    assert resp.status_code == 403 and resp.get_json()["error"] == "csrf"
    assert client.post("/logout", headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    assert client.delete("/api/fleet/1/n1/api/files?path=x").status_code == 403
    resp = client.post("/logout", headers={"X-CSRF-Token": csrf})
    assert resp.status_code == 200
    assert f"{mconsole.COOKIE}=;" in resp.headers["Set-Cookie"]


def test_other_origin_and_host_refused(master):
    client, csrf = logged_in(master)
    resp = client.post("/logout", headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
    assert resp.status_code == 403
    ws = client.get("/api/fleet/1/n1/api/shell", headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                         "Origin": "http://evil.example"})
    assert ws.status_code == 403
    rebound = client.get("/api/agents", base_url="http://evil.example:8765")
    assert rebound.status_code == 421


def test_sessions_live_on_the_server(master):
    client = tcp(master)
    client.set_cookie(mconsole.COOKIE, "forged.value.here")
    assert client.get("/api/agents").status_code == 401
    client, csrf = logged_in(master)
    cookie = client.get_cookie(mconsole.COOKIE, domain="127.0.0.1").value
    assert client.post("/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
    replay = tcp(master)  # the cookie captured before logout is dead on the server
    replay.set_cookie(mconsole.COOKIE, cookie, domain="127.0.0.1")
    assert replay.get("/api/agents").status_code == 401


def test_sessions_end_when_idle_or_old():
    idle = esession.Sessions(idle=-1)
    assert not idle.valid(idle.start())
    old = esession.Sessions(lifetime=-1)
    assert not old.valid(old.start())
    live = esession.Sessions()
    sid = live.start()
    assert live.valid(sid) and live.valid(sid)
    assert esession.SESSION_IDLE <= 3600 and esession.SESSION_LIFETIME <= 12 * 3600


def test_a_restarted_master_knows_no_session(master, tmp_path):
    from dxflow.master.app import create_app

    client, _ = logged_in(master)
    cookie = client.get_cookie(mconsole.COOKIE, domain="127.0.0.1").value
    restarted = create_app(FakeFleet(tmp_path))
    restarted.config.update(TESTING=True, CONSOLE_PORT=8765)
    again = tcp(restarted)
    again.set_cookie(mconsole.COOKIE, cookie, domain="127.0.0.1")
    assert again.get("/api/agents").status_code == 401


def test_console_refuses_localhost_and_proxy_paths(master):
    client, _ = logged_in(master)
    localhost = master.test_client()
    localhost.set_cookie(mconsole.COOKIE, client.get_cookie(mconsole.COOKIE, domain="127.0.0.1").value, domain="localhost")
    assert localhost.get("/api/agents", base_url="http://localhost:8765").status_code == 421
    resp = client.get("/api/fleet/1/n1/proxy/8000/")
    assert resp.status_code == 403 and resp.get_json()["error"] == "own_origin"
    # the CLI's socket may still relay to a service (`dxflow forward --http`)
    assert master.test_client().get("/api/fleet/1/n1/proxy/8000/", environ_base=UNIX).status_code != 403


def open_service(client, port: int = 8000) -> str:
    resp = client.get(f"/console/open?job=1&node=n1&port={port}")
    assert resp.status_code == 303, resp.data
    return resp.headers["Location"]


def test_service_opens_on_its_own_origin(master):
    client, _ = logged_in(master)
    location = open_service(client)
    assert location.startswith("http://p8000-n1-1.localhost:8765/.dxflow/login?ticket=")
    service = master.test_client()
    base = "http://p8000-n1-1.localhost:8765"
    # without the service's own cookie: a page that says how to open it, and no relay
    resp = service.get("/", base_url=base)
    assert resp.status_code == 401 and master.config["FLEET"].relayed == [("1", "n1")]
    path = location.split("8765", 1)[1]
    login = service.get(path, base_url=base)
    assert login.status_code == 303 and login.headers["Location"] == "/"
    cookie = login.headers["Set-Cookie"]
    assert cookie.startswith(f"{esession.SERVICE_COOKIE}=") and "HttpOnly" in cookie
    # the ticket works once
    assert master.test_client().get(path, base_url=base).status_code == 403
    # with the cookie, the request goes to that service's relay, and only there
    service.set_cookie(mconsole.COOKIE, client.get_cookie(mconsole.COOKIE, domain="127.0.0.1").value, domain="p8000-n1-1.localhost")
    resp = service.get("/static/app.js", base_url=base)
    assert master.config["FLEET"].relayed[-1] == ("1", "n1")
    assert resp.status_code == 404 and "relays nothing" in resp.get_json()["message"]
    # the service's cookie opens no other service and not the console
    assert service.get("/", base_url="http://p8001-n1-1.localhost:8765").status_code == 404
    assert service.get("/api/agents", base_url="http://127.0.0.1:8765").status_code == 401


def test_service_tickets_need_the_users_port_and_a_session(master):
    client, _ = logged_in(master)
    resp = client.get("/console/open?job=1&node=n1&port=22")
    assert resp.status_code == 403 and b"not a port of yours" in resp.data
    assert client.get("/console/open?job=1&node=n1&port=99999").status_code == 400
    assert client.get("/console/open?job=2&node=n1&port=8000").status_code == 404
    assert tcp(master).get("/console/open?job=1&node=n1&port=8000").status_code in (302, 401)
    # logging out of the console ends the service sessions it opened
    location = open_service(client)
    service = master.test_client()
    base = "http://p8000-n1-1.localhost:8765"
    service.get(location.split("8765", 1)[1], base_url=base)
    csrf = client.get("/console/config.json").get_json()["csrf"]
    client.post("/logout", headers={"X-CSRF-Token": csrf})
    assert service.get("/", base_url=base).status_code == 401


def test_service_labels_are_dns_labels():
    assert esession.service_label(8888, "n2", "12") == "p8888-n2-12"
    assert esession.service_label(8888) == "p8888"
    odd = esession.service_label(80, "gpu_01.cluster", "123[4]")
    assert esession.SERVICE_HOST.match(odd + ".localhost") and len(odd) <= 63
    assert odd != esession.service_label(80, "gpu-01-cluster", "123-4")


def test_pages_forbid_framing(master):
    client, _ = logged_in(master)
    for path in ("/console/", "/console/config.json", "/api/agents", "/login"):
        resp = client.get(path)
        assert resp.headers["X-Frame-Options"] == "DENY", path
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"], path
    page = client.get("/console/")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert b'src="app.js"' in page.data


def test_config_names_fleet_mode(master):
    client, _ = logged_in(master)
    cfg = client.get("/console/config.json").get_json()
    assert cfg["mode"] == "fleet" and cfg["user"] == getpass.getuser() and cfg["csrf_header"] == "X-CSRF-Token"


def test_console_port_remembered(tmp_path, monkeypatch):
    monkeypatch.delenv(mclient.PORT_ENV, raising=False)
    layout = UserLayout(tmp_path, "login1").ensure()
    port = mconsole.console_port(layout)
    assert not layout.console_state.exists()  # only a master that listens remembers its port
    mconsole.remember_port(layout, port)
    assert json.loads(layout.console_state.read_text())["port"] == port
    assert mconsole.console_port(layout) == port
    assert mconsole.saved_port(UserLayout(tmp_path, "login2")) is None  # each login node remembers its own
    wanted = mconsole.free_port()
    monkeypatch.setenv(mclient.PORT_ENV, str(wanted))
    assert mconsole.console_port(layout) == wanted
    # a taken port is not used
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    monkeypatch.setattr(mconsole, "PORT_WAIT", 0.3)
    try:
        monkeypatch.setenv(mclient.PORT_ENV, str(s.getsockname()[1]))
        assert mconsole.console_port(layout) != s.getsockname()[1]
    finally:
        s.close()


# -- the agent's console (node mode) -------------------------------------------------------------------
@pytest.fixture
def agent(make_agent, keys, tmp_path):
    """The agent's app of job 7 (tests/conftest.py), its state and its user's key."""
    client, state, _ = make_agent({"FILE_SCRATCH_ROOTS": []}, job="7", home=tmp_path, work_dir=str(tmp_path))
    return client.application, state, keys[0]


def test_agent_console_login_with_user_token(agent):
    from dxflow.agent import console as aconsole

    app, state, key = agent
    client = tcp(app)
    page = client.get("/console/")
    assert page.status_code == 401 and b"Log in to this node" in page.data
    assert client.get("/api/node").status_code == 401
    assert client.get("/console/config.json").status_code == 401
    assert client.get("/console/app.js").status_code == 200   # the page's own files are public
    token = auth.mint_login_token(key, state.user, state.audience)
    resp = client.get(f"/console/login?token={token}")
    assert resp.status_code == 303
    cookie = resp.headers["Set-Cookie"]
    assert cookie.startswith(f"{aconsole.COOKIE}=") and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert client.get("/api/node").status_code == 200
    cfg = client.get("/console/config.json").get_json()
    assert cfg["mode"] == "node" and cfg["node"] == "n1" and cfg["job"] == "7" and cfg["csrf"]
    assert client.get("/console/").status_code == 200
    # a token logs in once
    assert tcp(app).get(f"/console/login?token={token}").status_code == 403


def test_agent_console_refuses_bad_tokens(agent):
    app, state, key = agent
    client = tcp(app)
    for token in ("garbage", auth.mint_login_token(auth.new_key(), state.user, state.audience),
                  auth.mint_login_token(key, state.user, "SHA256:another-agent")):
        assert client.get(f"/console/login?token={token}").status_code == 403
    client.set_cookie("dxflow_agent", "made-up-session")
    assert client.get("/api/node").status_code == 401


def test_agent_console_csrf(agent, tmp_path):
    app, state, key = agent
    client = tcp(app)
    client.get(f"/console/login?token={auth.mint_login_token(key, state.user, state.audience)}")
    csrf = client.get("/console/config.json").get_json()["csrf"]
    body = {"path": str(tmp_path / "made"), "parents": False}
    assert client.post("/api/files/mkdir", json=body).status_code == 403
    assert client.post("/api/files/mkdir", json=body, headers={"X-CSRF-Token": "bad"}).status_code == 403
    assert not (tmp_path / "made").exists()
    resp = client.post("/api/files/mkdir", json=body, headers={"X-CSRF-Token": csrf})
    assert resp.status_code in (200, 201), resp.data
    assert (tmp_path / "made").is_dir()
    # the bearer token still works without any cookie or CSRF header
    other = tcp(app)
    tok = auth.mint_token(key, state.user, state.audience)
    assert other.get("/api/node", headers={"Authorization": f"Bearer {tok}"}).status_code == 200


def test_agent_console_headers(agent):
    app, _, _ = agent
    resp = tcp(app).get("/console/")
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]


# -- the CLI ---------------------------------------------------------------------------------------------
def test_cli_registers_console():
    from dxflow.cli import build_parser

    args = build_parser().parse_args(["console", "--json", "--port", "9000"])
    assert args.port == 9000 and args.json and args.func.__name__ == "cmd_console"


def test_cli_agent_link(tmp_path, monkeypatch):
    from dxflow import registration
    from dxflow.cli.console import agent_link

    monkeypatch.setenv("HOME", str(tmp_path))
    base = tmp_path / ".dxflow"
    (base / "fleet").mkdir(parents=True)
    key = auth.user_key(base)
    agent_key = auth.new_key()
    reg = registration.Registration(cluster="local", scheduler="local", job="local", node="ws", address="ws",
                                    port=4321, pid=1, user=getpass.getuser(), started="2026-01-01T00:00:00+00:00",
                                    public_key=auth.public_pem(agent_key), api_version=1, version="0")
    registration.write(base / "fleet", reg)
    link = agent_link("local")
    assert link["url"].startswith("http://127.0.0.1:4321/console/login?token=")
    token = link["url"].split("token=", 1)[1]
    claims = auth.verify_token(token, auth.public_pem(key), getpass.getuser(), auth.fingerprint(reg.public_key),
                               use=auth.CONSOLE_LOGIN)
    assert claims["sub"] == getpass.getuser()


def test_agent_console_opens_services_on_their_own_origin(agent):
    app, state, key = agent
    client = tcp(app)
    client.get(f"/console/login?token={auth.mint_login_token(key, state.user, state.audience)}")
    # the proxy is not served to a browser on the console's origin
    resp = client.get("/proxy/8000/")
    assert resp.status_code == 403 and resp.get_json()["error"] == "own_origin"
    resp = client.get("/console/open?port=8000")
    assert resp.status_code == 303
    location = resp.headers["Location"]
    assert location.startswith("http://p8000.localhost:8765/.dxflow/login?ticket=")
    service = app.test_client()
    base = "http://p8000.localhost:8765"
    assert service.get("/", base_url=base).status_code == 401
    assert service.get(location.split("8765", 1)[1], base_url=base).status_code == 303
    # with its cookie, the service origin reaches the proxy of that port only (nothing listens here: 404/403)
    resp = service.get("/anything", base_url=base)
    assert resp.status_code in (403, 404) and resp.get_json()["error"] in ("NotFound", "AccessDenied")
    assert service.get("/api/node", base_url="http://127.0.0.1:8765").status_code == 401
    assert tcp(app).get("/console/open?port=8000").status_code == 401
