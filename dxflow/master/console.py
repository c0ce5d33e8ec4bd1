"""The master's web console on ``127.0.0.1``: the static pages, login by one-time token, the session.

One app answers on two listeners. The Unix socket (0600, in the user's 0700
``~/.dxflow``) is trusted as it is: only the user reaches it. The TCP port on
127.0.0.1 is reachable by every user of the login node, so every request there
goes through :class:`ConsoleGuard` first, a WSGI wrapper around the whole app
(console, API, relay, WebSocket upgrades alike):

* without a valid session cookie, only the login page and its stylesheet are
  answered; pages redirect to ``/login``, anything else is 401;
* the cookie is an ``itsdangerous`` signed session id (HttpOnly, SameSite=Strict),
  signed by ``~/.dxflow/console.key`` so a restarted master keeps its sessions;
* POST, PUT, PATCH and DELETE also need ``X-CSRF-Token`` (an HMAC of the session id,
  handed to the page in ``/console/config.json``); WebSocket upgrades and unsafe
  requests that name an ``Origin`` must come from the console's own origin;
* the Host must be a loopback name (no DNS rebinding onto the port);
* every response forbids framing.

A login token comes from ``POST /api/console/token`` on the Unix socket only
(``dxflow console`` asks for it): random, valid once, for :data:`LOGIN_TOKEN_LIFETIME` s.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlsplit

from flask import Flask, Response, abort, jsonify, redirect, request, send_from_directory
from itsdangerous import BadSignature, TimestampSigner
from markupsafe import escape
from werkzeug.wrappers import Request

from dxflow import __version__
from dxflow.webfiles import web_root

log = logging.getLogger(__name__)

COOKIE = "dxflow_console"
SESSION_LIFETIME = 12 * 3600
LOGIN_TOKEN_LIFETIME = 300
CSRF_HEADER = "X-CSRF-Token"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: what a browser without a session may fetch on the TCP port.
PUBLIC_PATHS = frozenset({"/login", "/console/style.css", "/console/favicon.svg"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: the console's own pages; the job's services relayed under /api/fleet/.../proxy/ bring their own policy.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
STATE_FILE = "console.json"
KEY_FILE = "console.key"
PORT_ENV = "DXFLOW_CONSOLE_PORT"
PORT_WAIT = 2.0  # seconds to wait for the remembered port to be free again


# -- the port -------------------------------------------------------------------
def port_is_free(port: int) -> bool:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gunicorn binds
    try:
        s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def saved_port(base: Path) -> int | None:
    try:
        return int(json.loads((base / STATE_FILE).read_text())["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def console_port(base: Path) -> int:
    """The port the master's console is to listen on: ``$DXFLOW_CONSOLE_PORT``, else the one used
    last time (so a laptop's ``ssh -L`` keeps working), else a free one. The server remembers it
    with :func:`remember_port` once it listens there."""
    wanted = os.environ.get(PORT_ENV, "").strip()
    port = None
    if wanted:
        try:
            port = int(wanted)
        except ValueError:
            log.warning("%s=%r is not a port number: choosing a free port", PORT_ENV, wanted)
    port = port or saved_port(base)
    if port and 0 < port < 65536:
        deadline = time.monotonic() + PORT_WAIT  # a master that is stopping may hold it a moment longer
        while not port_is_free(port) and time.monotonic() < deadline:
            time.sleep(0.2)
    if not port or not 0 < port < 65536 or not port_is_free(port):
        if port:
            log.warning("console port %d is taken or invalid: choosing a free port", port)
        port = free_port()
    return port


def remember_port(base: Path, port: int) -> None:
    """Write console.json: the port the running master's console listens on."""
    tmp = base / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps({"port": port}) + "\n")
    os.replace(tmp, base / STATE_FILE)


# -- tokens and sessions ----------------------------------------------------------
def console_key(base: Path) -> bytes:
    """The secret that signs session cookies, made on first use (0600)."""
    path = base / KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        pass
    key = secrets.token_bytes(32)
    tmp = base / f".{KEY_FILE}.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    os.replace(tmp, path)
    return key


class ConsoleAuth:
    """One-time login tokens (in memory) and signed session cookies with their CSRF tokens."""

    def __init__(self, key: bytes, session_lifetime: int = SESSION_LIFETIME,
                 token_lifetime: int = LOGIN_TOKEN_LIFETIME) -> None:
        self._key = key
        self._signer = TimestampSigner(key, salt="dxflow-console-session")
        self.session_lifetime = session_lifetime
        self.token_lifetime = token_lifetime
        self._tokens: dict[str, float] = {}   # sha256 of token -> expiry
        self._lock = threading.Lock()

    def new_login_token(self) -> tuple[str, float]:
        token = secrets.token_urlsafe(32)
        expires = time.time() + self.token_lifetime
        with self._lock:
            now = time.time()
            self._tokens = {k: v for k, v in self._tokens.items() if v > now}
            self._tokens[_digest(token)] = expires
        return token, expires

    def redeem(self, token: str) -> bool:
        """True once for a token that was handed out and has not expired."""
        if not token or len(token) > 256:
            return False
        with self._lock:
            expires = self._tokens.pop(_digest(token), 0.0)
        return expires > time.time()

    def new_session(self) -> str:
        """A cookie value: a random session id, signed and timestamped."""
        return self._signer.sign(secrets.token_urlsafe(24)).decode()

    def session(self, cookie: str | None) -> str | None:
        """The session id in a cookie value that is ours and fresh; None otherwise."""
        if not cookie:
            return None
        try:
            return self._signer.unsign(cookie, max_age=self.session_lifetime).decode()
        except BadSignature:  # also SignatureExpired
            return None

    def csrf(self, session_id: str) -> str:
        return hmac.new(self._key, b"csrf:" + session_id.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session_id: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(session_id), token)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# -- the guard ----------------------------------------------------------------------
def on_unix_socket(environ: dict) -> bool:
    """True for a request that came in on the master's Unix socket (gunicorn tells the socket)."""
    sock = environ.get("gunicorn.socket")
    return getattr(sock, "family", None) == socket.AF_UNIX


def security_headers(path: str, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    names = {k.lower() for k, _ in headers}
    extra = [("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer")]
    if path.startswith("/console") or path.startswith("/login"):
        extra += [("Content-Security-Policy", PAGE_CSP), ("X-Content-Type-Options", "nosniff")]
    else:  # API answers and relayed pages: no framing, whatever policy they bring
        extra.append(("Content-Security-Policy", "frame-ancestors 'none'"))
    return headers + [(k, v) for k, v in extra if k.lower() not in names or k == "Content-Security-Policy"]


class ConsoleGuard:
    """WSGI wrapper: the TCP listener answers only requests of a logged-in console session."""

    def __init__(self, wsgi_app: Callable, auth: ConsoleAuth) -> None:
        self.wsgi_app = wsgi_app
        self.auth = auth

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")

        def start(status: str, headers: list, exc_info=None):
            return start_response(status, security_headers(path, headers), exc_info)

        trusted = on_unix_socket(environ)
        environ["dxflow.console.trusted"] = trusted
        if not trusted:
            refusal = self.check(Request(environ))
            if refusal is not None:
                return refusal(environ, start)
        return self.wsgi_app(environ, start)

    def check(self, req: Request) -> Response | None:
        """None when the request may go on; the refusal otherwise. Sets the session in the environ."""
        host = _hostname(req.host)
        if host not in LOOPBACK_HOSTS:
            return _json_error(421, "wrong_host", f"the console answers on 127.0.0.1 or localhost, not {host!r}")
        upgrade = req.headers.get("Upgrade", "").lower() == "websocket"
        origin = req.headers.get("Origin")
        if (upgrade or req.method in UNSAFE_METHODS) and origin and urlsplit(origin).netloc != req.host:
            return _json_error(403, "forbidden", "request from another origin refused")
        if req.path in PUBLIC_PATHS:
            return None
        session = self.auth.session(req.cookies.get(COOKIE))
        if session is None:
            if req.method in ("GET", "HEAD") and not req.path.startswith("/api/") and not upgrade:
                return Response("", status=302, headers={"Location": "/login"})
            return _json_error(401, "unauthorized", "log in first: run `dxflow console` on the login node "
                                                    "and open the link it prints")
        if req.method in UNSAFE_METHODS and not self.auth.csrf_ok(session, req.headers.get(CSRF_HEADER)):
            return _json_error(403, "csrf", f"missing or wrong {CSRF_HEADER} header: reload the console")
        req.environ["dxflow.console.session"] = session
        return None


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _json_error(status: int, error: str, message: str) -> Response:
    # plain werkzeug: the guard runs outside Flask's app context
    return Response(json.dumps({"error": error, "message": message}) + "\n", status=status,
                    mimetype="application/json")


# -- the pages ----------------------------------------------------------------------
LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>dxflow console — log in</title><link rel="stylesheet" href="/console/style.css">
<link rel="icon" href="/console/favicon.svg"></head>
<body class="login-body"><main class="login-card">
<div class="brand brand-large"><img src="/console/favicon.svg" alt=""><span>dxflow</span></div>
<h1>Log in to your console</h1>
<p>Run <code>dxflow console</code> on the login node and open the link it prints,
or paste its token here. A token works once, within {minutes} minutes.</p>
{error}
<form method="post" action="/login" autocomplete="off">
<label for="token">Token</label>
<input id="token" name="token" type="password" required autofocus spellcheck="false">
<button class="btn btn-primary" type="submit">Log in</button>
</form></main></body></html>
"""


def login_page(error: str = "", status: int = 200) -> Response:
    block = f'<p class="alert alert-error" role="alert">{escape(error)}</p>' if error else ""
    html = LOGIN_PAGE.format(minutes=LOGIN_TOKEN_LIFETIME // 60, error=block)
    return Response(html, status=status, mimetype="text/html",
                    headers={"Cache-Control": "no-store"})


def static_file(root: Path, name: str) -> Response:
    resp = send_from_directory(root, name, max_age=0)
    resp.headers["Cache-Control"] = "no-cache"  # revalidate: a reinstall must show at once
    return resp


def init_app(app: Flask, fleet) -> None:
    auth = ConsoleAuth(console_key(fleet.base))
    app.config["CONSOLE_AUTH"] = auth
    app.wsgi_app = ConsoleGuard(app.wsgi_app, auth)

    def trusted() -> bool:
        return bool(request.environ.get("dxflow.console.trusted"))

    def log_in(token: str) -> Response:
        if not auth.redeem(token):
            return login_page("This token is not valid: it expired, was already used, or belongs to a "
                              "master that has restarted. Run `dxflow console` for a new link.", 403)
        resp = redirect("/console/", code=303)
        resp.set_cookie(COOKIE, auth.new_session(), max_age=auth.session_lifetime, path="/",
                        httponly=True, samesite="Strict")
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/login")
    def login_form():
        token = request.args.get("token", "")
        return log_in(token) if token else login_page()

    @app.post("/login")
    def login_post():
        return log_in(request.form.get("token", "").strip())

    @app.post("/logout")
    def logout():
        resp = jsonify(status="logged out")
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict")
        return resp

    @app.get("/")
    @app.get("/console")
    def to_console():
        return redirect("/console/", code=302)

    @app.get("/console/")
    def console_index():
        return static_file(web_root(), "index.html")

    @app.get("/console/config.json")
    def console_config():
        session = request.environ.get("dxflow.console.session")
        resp = jsonify(mode="fleet", user=fleet.user, version=__version__,
                       csrf=auth.csrf(session) if session else None, csrf_header=CSRF_HEADER)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/console/<path:name>")
    def console_static(name: str):
        return static_file(web_root(), name)

    @app.post("/api/console/token")
    def console_token():
        if not trusted():
            abort(403, "login tokens are handed out on the master's Unix socket only (`dxflow console`)")
        port = app.config.get("CONSOLE_PORT")
        if not port:
            abort(503, "this master does not listen on TCP: restart it (`dxflow master stop`)")
        token, expires = auth.new_login_token()
        return jsonify(token=token, expires=expires, port=port,
                       url=f"http://127.0.0.1:{port}/login?token={token}")

    @app.get("/api/console")
    def console_status():
        port = app.config.get("CONSOLE_PORT")
        return jsonify(port=port, url=f"http://127.0.0.1:{port}/console/" if port else None)
