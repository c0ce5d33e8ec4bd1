"""``/console/``: this node's web console (node mode of ``web/``), under the console policy of
:mod:`dxflow.edge.session` (the same as the master's: server-side sessions, CSRF, Host and Origin
checks, security headers, each service of the job on an origin of its own).

A browser cannot send the bearer token every agent request needs, so the console logs in once:
``/console/login?token=<JWT>`` takes a *login* token of the agent's user (``dxflow console --agent``
mints one; a bearer token is refused here, and a login token is refused everywhere else), used once,
and sets an HttpOnly, SameSite=Strict session cookie. The agent's token check
(:mod:`dxflow.agent.auth`) lets a request through when :class:`~dxflow.edge.session.ConsoleGuard`
found a live session for it (``g.console_session``) or its endpoint is public (the login page and the
console's static files). Requests the master relays carry a bearer token and pass the guard untouched.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import werkzeug.wrappers
from flask import Blueprint, Flask, Response, current_app, g, jsonify, redirect, request, send_from_directory

from dxflow import __version__
from dxflow.signatures import CONSOLE_LOGIN, verify_token
from dxflow.edge.session import (CSRF_HEADER, ConsoleGuard, ConsolePolicy, Sessions, alert, hostname,
                                 html_page, service_label, service_url, set_session_cookie)
from dxflow.errors import AuthError
from dxflow.edge.webfiles import web_root

bp = Blueprint("console", __name__)

COOKIE = "dxflow_agent"
#: endpoints a browser without a session may reach: the login and the page's static files.
CONSOLE_PUBLIC = frozenset({"console.login", "console.index", "console.static_file", "console.to_index"})
_SERVICE = re.compile(r"^p(\d{1,5})$")


def service_prefix(label: str) -> str | None:
    """A service of this node is named ``pPORT``: its requests go to the proxy of that port."""
    m = _SERVICE.match(label)
    return f"/proxy/{int(m.group(1))}" if m and 0 < int(m.group(1)) < 65536 else None


def take_session():
    """Runs first: a browser request the guard found a live session for acts as the agent's user."""
    sid = request.environ.get("dxflow.console.session")
    if sid and not request.headers.get("Authorization"):
        g.console_session = sid
        g.claims = {"sub": current_app.config["AGENT"].user, "console": True}


def init_app(app: Flask) -> None:
    sessions = Sessions()
    app.config["CONSOLE_SESSIONS"] = sessions
    app.config["PUBLIC_ENDPOINTS"] = tuple(app.config.get("PUBLIC_ENDPOINTS", ())) + tuple(CONSOLE_PUBLIC)
    policy = ConsolePolicy(cookie=COOKIE, public_paths=frozenset(), proxy_prefix=re.compile(r"^/proxy(/|$)"),
                           service_prefix=service_prefix, refuse_without_session=False,
                           login_path="/console/login")
    app.wsgi_app = ConsoleGuard(app.wsgi_app, sessions, policy)  # type: ignore[method-assign]
    # first in line, before the token check that auth.init_app registered
    app.before_request_funcs.setdefault(None, []).insert(0, take_session)


def login_page(error: str = "", status: int = 401) -> werkzeug.wrappers.Response:
    state = current_app.config["AGENT"]
    body = (f"{alert(error)}<p>Open the link printed by <code>dxflow console --agent JOB[:NODE]</code>, run where "
            "this agent runs. A link works once, within a few minutes.</p>")
    return html_page(f"dxflow console — {state.node}", "Log in to this node's console", body, status)


def _static(name: str) -> Response:
    resp = send_from_directory(Path(web_root()), name, max_age=0)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.get("/console/login")
def login() -> werkzeug.wrappers.Response:
    state = current_app.config["AGENT"]
    sessions: Sessions = current_app.config["CONSOLE_SESSIONS"]
    token = request.args.get("token", "")
    if not token:
        return login_page()
    try:
        claims = verify_token(token, state.user_public_key, state.user, state.audience, use=CONSOLE_LOGIN)
    except AuthError as e:
        return login_page(f"{e}. Ask for a new link.", 403)
    jti = str(claims.get("jti") or f"{claims.get('iat')}:{claims.get('exp')}")
    if not sessions.first_use(jti, float(claims.get("exp", time.time() + 300)) + 10):
        return login_page("This link was used already. Ask for a new link.", 403)
    return set_session_cookie(redirect("/console/", code=303), COOKIE, sessions.start(), sessions)


@bp.post("/console/logout")
def logout():
    current_app.config["CONSOLE_SESSIONS"].end(request.cookies.get(COOKIE))
    resp = jsonify(status="logged out")
    resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
    return resp


@bp.get("/console/open")
def open_service():
    """The Services tab's Open button: a one-time ticket to the service's own origin."""
    sid = g.get("console_session")
    if not sid:
        return login_page("Log in to open the job's web services.", 401)
    port = request.args.get("port", "")
    if not port.isdigit() or not 0 < int(port) < 65536:
        return html_page("dxflow — bad port", "Not a port", alert(f"{port!r} is not a port number (1-65535)."), 400)
    label = service_label(int(port))
    ticket = current_app.config["CONSOLE_SESSIONS"].new_ticket(sid, label)
    resp = redirect(service_url(label, hostname(request.host)[1] or "80", ticket), code=303)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/console")
def to_index():
    return redirect("/console/", code=302)


@bp.get("/console/")
def index():
    if not g.get("console_session"):
        return login_page()
    return _static("index.html")


@bp.get("/console/config.json")
def config() -> werkzeug.wrappers.Response:
    state = current_app.config["AGENT"]
    sid = g.get("console_session")
    sessions: Sessions = current_app.config["CONSOLE_SESSIONS"]
    resp = jsonify(mode="node", user=state.user, job=state.job, node=state.node, cluster=state.cluster,
                   version=__version__, csrf=sessions.csrf(sid) if sid else None, csrf_header=CSRF_HEADER)
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/console/<path:name>")
def static_file(name: str):
    return _static(name)
