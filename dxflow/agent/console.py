"""``/console/``: this node's web console (node mode of ``web/``), and the session that lets it call the API.

A browser cannot send the bearer token every agent request needs, so the console
logs in once: ``/console/login?token=<JWT>`` takes a valid user token (the same
kind the API takes, used once here) and sets an HttpOnly, SameSite=Strict session
cookie. The agent's token check (``dxflow.agent.auth``) lets a request through
when its endpoint is in ``app.config["PUBLIC_ENDPOINTS"]`` (this module adds its
login pages) or when ``g.console_session`` is set by this module's own check of the
cookie, which runs first and also wants ``X-CSRF-Token`` on state-changing requests and a same-origin
``Origin`` on those and on WebSocket upgrades.

``dxflow console --agent JOB[:NODE]`` prints a login link for an agent on the
same host (a workstation or container running ``dxflow agent``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, current_app, g, jsonify, redirect, request, send_from_directory
from markupsafe import escape

from dxflow import __version__
from dxflow.auth import verify_token
from dxflow.errors import AuthError
from dxflow.webfiles import web_root

bp = Blueprint("console", __name__)

COOKIE = "dxflow_agent"
SESSION_LIFETIME = 12 * 3600
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: endpoints a browser without a session may reach: the login and the page's static files.
CONSOLE_PUBLIC = frozenset({"console.login", "console.index", "console.static_file", "console.to_index"})
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class Sessions:
    """Console sessions of this agent (in memory: they end with the agent, i.e. with the job)."""

    def __init__(self, lifetime: int = SESSION_LIFETIME) -> None:
        self.lifetime = lifetime
        self._key = secrets.token_bytes(32)
        self._sessions: dict[str, float] = {}
        self._used_jti: dict[str, float] = {}
        self._lock = threading.Lock()

    def login(self, claims: dict) -> str | None:
        """A new session id for a token's claims, or None if this token already logged in once."""
        now = time.time()
        jti = str(claims.get("jti") or f"{claims.get('iat')}:{claims.get('exp')}")
        with self._lock:
            self._used_jti = {k: v for k, v in self._used_jti.items() if v > now}
            self._sessions = {k: v for k, v in self._sessions.items() if v > now}
            if jti in self._used_jti:
                return None
            self._used_jti[jti] = float(claims.get("exp", now + 300)) + 10
            sid = secrets.token_urlsafe(32)
            self._sessions[sid] = now + self.lifetime
            return sid

    def valid(self, sid: str | None) -> bool:
        if not sid:
            return False
        with self._lock:
            return self._sessions.get(sid, 0.0) > time.time()

    def end(self, sid: str | None) -> None:
        with self._lock:
            self._sessions.pop(sid or "", None)

    def csrf(self, sid: str) -> str:
        return hmac.new(self._key, sid.encode(), hashlib.sha256).hexdigest()


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _error(status: int, error: str, message: str):
    return jsonify(error=error, message=message), status


def check_session():
    """Runs before the token check: a request with the console's cookie (and no bearer token)."""
    sid = request.cookies.get(COOKIE)
    if not sid or request.headers.get("Authorization"):
        return None
    sessions: Sessions = current_app.config["CONSOLE_SESSIONS"]
    if not sessions.valid(sid):
        return None  # the token check answers 401
    if _hostname(request.host) not in LOOPBACK_HOSTS:
        return _error(421, "wrong_host", "the console answers on 127.0.0.1 or localhost only")
    upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
    origin = request.headers.get("Origin")
    if (upgrade or request.method in UNSAFE_METHODS) and origin and urlsplit(origin).netloc != request.host:
        return _error(403, "forbidden", "request from another origin refused")
    if request.method in UNSAFE_METHODS:
        token = request.headers.get(CSRF_HEADER, "")
        if not token or not hmac.compare_digest(sessions.csrf(sid), token):
            return _error(403, "csrf", f"missing or wrong {CSRF_HEADER} header: reload the console")
    state = current_app.config["AGENT"]
    g.console_session = sid
    g.claims = {"sub": state.user, "console": True}
    return None


def security_headers(resp: Response) -> Response:
    resp.headers.setdefault("X-Frame-Options", "DENY")
    if request.path.startswith("/console"):
        resp.headers["Content-Security-Policy"] = PAGE_CSP
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
    elif "Content-Security-Policy" not in resp.headers:
        resp.headers["Content-Security-Policy"] = "frame-ancestors 'none'"
    return resp


def init_app(app: Flask) -> None:
    app.config["CONSOLE_SESSIONS"] = Sessions()
    app.config["PUBLIC_ENDPOINTS"] = tuple(app.config.get("PUBLIC_ENDPOINTS", ())) + tuple(CONSOLE_PUBLIC)
    # first in line, before the token check that auth.init_app registered
    app.before_request_funcs.setdefault(None, []).insert(0, check_session)
    app.after_request(security_headers)


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>dxflow console — {node}</title><link rel="stylesheet" href="/console/style.css">
<link rel="icon" href="/console/favicon.svg"></head>
<body class="login-body"><main class="login-card">
<div class="brand brand-large"><img src="/console/favicon.svg" alt=""><span>dxflow</span></div>
<h1>Log in to this node's console</h1>
{error}
<p>Open the link printed by <code>dxflow console --agent JOB[:NODE]</code>, run where this agent
runs. A link works once, within a few minutes.</p>
</main></body></html>
"""


def login_page(error: str = "", status: int = 401) -> Response:
    state = current_app.config["AGENT"]
    block = f'<p class="alert alert-error" role="alert">{escape(error)}</p>' if error else ""
    html = LOGIN_PAGE.format(node=escape(state.node), error=block)
    return Response(html, status=status, mimetype="text/html", headers={"Cache-Control": "no-store"})


def _static(name: str) -> Response:
    resp = send_from_directory(Path(web_root()), name, max_age=0)
    resp.headers["Cache-Control"] = "no-cache"
    return resp


@bp.get("/console/login")
def login():
    state = current_app.config["AGENT"]
    sessions: Sessions = current_app.config["CONSOLE_SESSIONS"]
    token = request.args.get("token", "")
    if not token:
        return login_page()
    try:
        claims = verify_token(token, state.user_public_key, state.user, state.audience)
    except AuthError as e:
        return login_page(f"{e}. Ask for a new link.", 403)
    sid = sessions.login(claims)
    if sid is None:
        return login_page("This link was used already. Ask for a new link.", 403)
    resp = redirect("/console/", code=303)
    resp.set_cookie(COOKIE, sid, max_age=sessions.lifetime, path="/", httponly=True, samesite="Strict")
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.post("/console/logout")
def logout():
    current_app.config["CONSOLE_SESSIONS"].end(request.cookies.get(COOKIE))
    resp = jsonify(status="logged out")
    resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
    return resp


@bp.get("/console")
def to_index():
    return redirect("/console/", code=302)


@bp.get("/console/")
def index():
    sessions: Sessions = current_app.config["CONSOLE_SESSIONS"]
    if not sessions.valid(request.cookies.get(COOKIE)):
        return login_page()
    return _static("index.html")


@bp.get("/console/config.json")
def config():
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
