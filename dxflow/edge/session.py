"""The web console's one security policy, for the master's console and an agent's alike.

What a browser may do, and on which origin:

* **The console's origin** is a loopback IP literal (``127.0.0.1:PORT`` or ``[::1]:PORT``; on a laptop,
  the local end of an ``ssh -L``). Any other Host is refused (421): no DNS rebinding onto the port, and
  ``localhost`` is refused too because the job's services live under ``*.localhost`` (same site).
* **Sessions live on the server** (:class:`Sessions`), in memory: a random id in an HttpOnly,
  SameSite=Strict cookie, ended by logout, by ``idle`` seconds without a request (≤ 1 h) and by
  ``lifetime`` (≤ 12 h); a restarted server has a new secret and no sessions.
* **State changes** (POST, PUT, PATCH, DELETE) need the session's CSRF token in ``X-CSRF-Token``;
  those and WebSocket upgrades that name an ``Origin`` must come from the console's own origin.
* **Every answer** forbids framing; the console's pages get a strict Content-Security-Policy.
* **A job's web service** never runs on the console's origin: each opens on an origin of its own,
  ``http://LABEL.localhost:PORT/`` (browsers resolve ``*.localhost`` to loopback). The console's cookie
  is never sent there, and pages there cannot read the console's answers. The console hands the browser
  a one-time *ticket* for one service (:meth:`Sessions.new_ticket`); the service origin trades it for a
  cookie of its own (``dxflow_service``, valid for that one service while the console session lives).
  On the console's origin, the proxy paths are refused for browsers.

:class:`ConsoleGuard` applies all of this as a WSGI wrapper around a whole app. Which requests it
trusts without a session (the master's CLI socket), which paths are public (the login page), whether a
request without a session is refused (master) or left to the app's own bearer-token check (agent), and
how a service label maps to a proxy path are the caller's parameters.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable
from urllib.parse import quote, urlsplit

from markupsafe import escape
from werkzeug.wrappers import Request, Response

from dxflow.edge.http import without_own_cookies

SESSION_IDLE = 3600          # an idle session ends after this (seconds)
SESSION_LIFETIME = 12 * 3600  # every session ends after this
TICKET_LIFETIME = 60         # a service ticket must be used within this
CSRF_HEADER = "X-CSRF-Token"
SERVICE_COOKIE = "dxflow_service"
SERVICE_LOGIN = "/.dxflow/login"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
#: the console's origin: loopback IP literals only (see the module docstring for ``localhost``).
CONSOLE_HOSTS = frozenset({"127.0.0.1", "::1"})
SERVICE_HOST = re.compile(r"^(?P<label>[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)\.localhost$")
#: the console's own pages; a job's services, on their own origins, bring their own policy.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@dataclass
class _Session:
    created: float
    seen: float


@dataclass
class _Ticket:
    session: str
    label: str
    expires: float


@dataclass
class _ServiceSession:
    session: str   # the console session it came from: it ends with it
    label: str


@dataclass
class Sessions:
    """Console sessions, one-time login tokens and service tickets of one server, in memory."""

    idle: float = SESSION_IDLE
    lifetime: float = SESSION_LIFETIME
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _sessions: dict[str, _Session] = field(default_factory=dict)
    _tokens: dict[str, float] = field(default_factory=dict)        # sha256 of a login token -> expiry
    _tickets: dict[str, _Ticket] = field(default_factory=dict)     # sha256 of a ticket -> ticket
    _services: dict[str, _ServiceSession] = field(default_factory=dict)
    _used: dict[str, float] = field(default_factory=dict)          # login credentials seen -> until when
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- login tokens (handed out on a trusted channel, redeemed once in a browser) -------------
    def new_login_token(self, lifetime: float = 300) -> tuple[str, float]:
        token = secrets.token_urlsafe(32)
        expires = time.time() + lifetime
        with self._lock:
            self._expire(time.time())
            self._tokens[_digest(token)] = expires
        return token, expires

    def redeem(self, token: str) -> bool:
        """True once for a login token that was handed out and has not expired."""
        if not token or len(token) > 256:
            return False
        with self._lock:
            return self._tokens.pop(_digest(token), 0.0) > time.time()

    def first_use(self, credential_id: str, until: float) -> bool:
        """True the first time a self-contained login credential (a signed token's ``jti``) is shown."""
        now = time.time()
        with self._lock:
            self._used = {k: v for k, v in self._used.items() if v > now}
            if credential_id in self._used:
                return False
            self._used[credential_id] = until
            return True

    # -- sessions -------------------------------------------------------------------------------
    def start(self) -> str:
        """A new session; its id is the cookie's value."""
        sid = secrets.token_urlsafe(32)
        now = time.time()
        with self._lock:
            self._expire(now)
            self._sessions[sid] = _Session(created=now, seen=now)
        return sid

    def valid(self, sid: str | None, touch: bool = True) -> bool:
        """True for a live session (and, with ``touch``, it counts as used now)."""
        if not sid:
            return False
        now = time.time()
        with self._lock:
            s = self._sessions.get(sid)
            if s is None or not self._alive(s, now):
                self._sessions.pop(sid, None)
                return False
            if touch:
                s.seen = now
            return True

    def end(self, sid: str | None) -> None:
        """Log out: the session, and every service session that came from it, end now."""
        with self._lock:
            self._sessions.pop(sid or "", None)
            self._services = {k: v for k, v in self._services.items() if v.session != sid}
            self._tickets = {k: v for k, v in self._tickets.items() if v.session != sid}

    def csrf(self, sid: str) -> str:
        return hmac.new(self._key, b"csrf:" + sid.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, sid: str, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf(sid), token or "")

    # -- a job's services on their own origins ----------------------------------------------------
    def new_ticket(self, sid: str, label: str) -> str:
        """A one-time ticket that logs the browser in to the service ``label`` (for this session)."""
        ticket = secrets.token_urlsafe(32)
        with self._lock:
            self._expire(time.time())
            self._tickets[_digest(ticket)] = _Ticket(sid, label, time.time() + TICKET_LIFETIME)
        return ticket

    def redeem_ticket(self, ticket: str, label: str) -> str | None:
        """A service session id for a fresh ticket of this label, whose console session lives."""
        if not ticket or len(ticket) > 256:
            return None
        with self._lock:
            t = self._tickets.pop(_digest(ticket), None)
        if t is None or t.label != label or t.expires < time.time() or not self.valid(t.session, touch=False):
            return None
        service_sid = secrets.token_urlsafe(32)
        with self._lock:
            self._services[service_sid] = _ServiceSession(t.session, label)
        return service_sid

    def service_session(self, service_sid: str | None, label: str) -> str | None:
        """The console session behind a service cookie of this label, if both are live."""
        if not service_sid:
            return None
        with self._lock:
            s = self._services.get(service_sid)
        if s is None or s.label != label or not self.valid(s.session):
            return None
        return s.session

    # -- housekeeping -----------------------------------------------------------------------------
    def _alive(self, s: _Session, now: float) -> bool:
        return now - s.seen <= self.idle and now - s.created <= self.lifetime

    def _expire(self, now: float) -> None:
        # called with the lock held, on every new token, ticket or session: the tables stay small
        self._tokens = {k: v for k, v in self._tokens.items() if v > now}
        self._tickets = {k: v for k, v in self._tickets.items() if v.expires > now}
        self._sessions = {k: v for k, v in self._sessions.items() if self._alive(v, now)}
        self._services = {k: v for k, v in self._services.items() if v.session in self._sessions}


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# -- service labels -------------------------------------------------------------------------------
_UNSAFE_LABEL = re.compile(r"[^a-z0-9]+")


def service_label(port: int, node: str = "", job: str = "") -> str:
    """The DNS label of a service's origin, e.g. ``p8888-n2-12`` (``p8888`` for an agent's own node).

    Readable where the names allow it; a short hash keeps labels of names that had to be changed
    (``a_b`` and ``a-b``) apart.
    """
    parts = [f"p{int(port)}"] + [p for p in (node, job) if p]
    raw = "-".join(parts)
    clean = "-".join(_UNSAFE_LABEL.sub("-", p.lower()).strip("-") or "x" for p in parts)
    if clean != raw:
        clean = f"{clean[:50]}-{hashlib.sha256(raw.encode()).hexdigest()[:8]}"
    return clean[:63].strip("-")


def service_url(label: str, host_port: str, ticket: str, next_path: str = "/") -> str:
    """Where the browser goes to open a service: its own origin's login, with the ticket."""
    return f"http://{label}.localhost:{host_port}{SERVICE_LOGIN}?ticket={quote(ticket)}&next={quote(next_path)}"


# -- the guard ------------------------------------------------------------------------------------
def hostname(host: str) -> tuple[str, str]:
    """(name, port) of a Host header; IPv6 literals without brackets."""
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        return name, rest.lstrip(":")
    if host.count(":") == 1:
        name, _, port = host.partition(":")
        return name, port
    return host, ""


def security_headers(headers: list[tuple[str, str]], page: bool) -> list[tuple[str, str]]:
    """Headers every console answer carries: no framing; the console's pages get the strict CSP."""
    names = {k.lower() for k, _ in headers}
    extra = [("X-Frame-Options", "DENY"), ("Referrer-Policy", "no-referrer"), ("X-Content-Type-Options", "nosniff")]
    out = headers + [(k, v) for k, v in extra if k.lower() not in names]
    if page:
        out = [(k, v) for k, v in out if k.lower() != "content-security-policy"] + [("Content-Security-Policy", PAGE_CSP)]
    elif "content-security-policy" not in names:
        out.append(("Content-Security-Policy", "frame-ancestors 'none'"))
    return out


def json_error(status: int, error: str, message: str) -> Response:
    return Response(json.dumps({"error": error, "message": message}) + "\n", status=status,
                    mimetype="application/json", headers={"Cache-Control": "no-store"})


def html_page(title: str, heading: str, body_html: str, status: int = 200) -> Response:
    """A small page in the console's style (login, refusals); ``body_html`` is trusted markup."""
    html = ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta name=\"referrer\" content=\"no-referrer\">"
            f"<title>{escape(title)}</title><link rel=\"stylesheet\" href=\"/console/style.css\">"
            "<link rel=\"icon\" href=\"/console/favicon.svg\"></head>\n<body class=\"login-body\"><main class=\"login-card\">"
            "<div class=\"brand brand-large\"><img src=\"/console/favicon.svg\" alt=\"\"><span>dxflow</span></div>"
            f"<h1>{escape(heading)}</h1>\n{body_html}\n</main></body></html>\n")
    return Response(html, status=status, mimetype="text/html", headers={"Cache-Control": "no-store"})


def alert(message: str) -> str:
    return f'<p class="alert alert-error" role="alert">{escape(message)}</p>' if message else ""


@dataclass
class ConsolePolicy:
    """What differs between the master's console and an agent's (everything else is this module's)."""

    cookie: str                                   # the console session's cookie name
    public_paths: frozenset[str]                  # what a browser without a session may fetch
    proxy_prefix: re.Pattern                      # paths of the proxy on the console's origin: refused there
    service_prefix: Callable[[str], str | None]   # service label -> the app's proxy path for it
    refuse_without_session: bool = True           # False: the app's own bearer check answers (agent)
    trusted: Callable[[dict], bool] = lambda environ: False   # e.g. the master's CLI socket
    login_path: str = "/login"


class ConsoleGuard:
    """WSGI wrapper applying :class:`ConsolePolicy` and :class:`Sessions` to every request of an app.

    It sets ``environ["dxflow.console.trusted"]`` (bool), ``environ["dxflow.console.session"]``
    (the session id of a logged-in browser) and ``environ["dxflow.service"]`` (a service label,
    for requests on a service's own origin, whose path it rewrites to the app's proxy path).
    """

    def __init__(self, wsgi_app: Callable, sessions: Sessions, policy: ConsolePolicy) -> None:
        self.wsgi_app = wsgi_app
        self.sessions = sessions
        self.policy = policy

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        trusted = self.policy.trusted(environ)
        environ["dxflow.console.trusted"] = trusted
        if trusted:
            return self.wsgi_app(environ, start_response)
        req = Request(environ)
        name, _ = hostname(req.host)
        service = SERVICE_HOST.match(name.lower())
        if service:
            return self.service(req, service.group("label"), start_response)
        page = req.path.startswith("/console") or req.path == self.policy.login_path

        def start(status: str, headers: list, exc_info=None):
            return start_response(status, security_headers(headers, page), exc_info)

        refusal = self.check(req, name)
        if refusal is not None:
            return refusal(environ, start)
        return self.wsgi_app(environ, start)

    # -- the console's origin -----------------------------------------------------------------------
    def check(self, req: Request, name: str) -> Response | None:
        """None when the request may go on; the refusal otherwise."""
        sid = req.cookies.get(self.policy.cookie)
        live = self.sessions.valid(sid)
        if not live and not self.policy.refuse_without_session:
            return None  # no browser session: the app's own bearer check answers
        if "Authorization" in req.headers and not self.policy.refuse_without_session:
            return None  # a bearer request (the master's relay to an agent): the app checks its token
        if name not in CONSOLE_HOSTS:
            return json_error(421, "wrong_host", f"the console answers on 127.0.0.1 (or [::1]) only, not {name!r}: "
                                                 "open the link `dxflow console` prints")
        upgrade = req.headers.get("Upgrade", "").lower() == "websocket"
        origin = req.headers.get("Origin")
        if (upgrade or req.method in UNSAFE_METHODS) and origin and urlsplit(origin).netloc != req.host:
            return json_error(403, "forbidden", "request from another origin refused")
        if req.path in self.policy.public_paths:
            return None
        if not live:
            if req.method in ("GET", "HEAD") and not req.path.startswith("/api/") and not upgrade:
                return Response("", status=302, headers={"Location": self.policy.login_path})
            return json_error(401, "unauthorized", "log in first: run `dxflow console` on the login node "
                                                   "and open the link it prints")
        assert sid is not None
        if req.method in UNSAFE_METHODS and not self.sessions.csrf_ok(sid, req.headers.get(CSRF_HEADER)):
            return json_error(403, "csrf", f"missing or wrong {CSRF_HEADER} header: reload the console")
        if self.policy.proxy_prefix.match(req.path):
            return json_error(403, "own_origin", "a job's web service opens on its own origin, never the "
                                                 "console's: use the Open button of the console's Services tab")
        req.environ["dxflow.console.session"] = sid
        return None

    # -- a service's own origin ---------------------------------------------------------------------
    def service(self, req: Request, label: str, start_response: Callable) -> Iterable[bytes]:
        environ = req.environ
        prefix = self.policy.service_prefix(label)
        if prefix is None:
            resp = html_page("dxflow — unknown service", "No such service",
                             "<p>This address names no web service of your jobs. Open services from the "
                             "<b>Services</b> tab of your dxflow console.</p>", 404)
            return resp(environ, start_response)
        if req.path == SERVICE_LOGIN:
            return self.service_login(req, label)(environ, start_response)
        console_sid = self.sessions.service_session(req.cookies.get(SERVICE_COOKIE), label)
        if console_sid is None:
            resp = html_page("dxflow — log in", "Open this service from your console",
                             "<p>This web service of your job opens through your dxflow console: go to the "
                             "node's <b>Services</b> tab and press <b>Open</b>. (Your session here has "
                             "ended, or this browser never logged in.)</p>", 401)
            return resp(environ, start_response)
        environ["dxflow.service"] = label
        environ["dxflow.console.session"] = console_sid
        environ["PATH_INFO"] = prefix + (environ.get("PATH_INFO") or "/")
        for key in ("RAW_URI", "REQUEST_URI"):
            if environ.get(key):
                environ[key] = prefix + environ[key]
        cookie = without_own_cookies(environ.get("HTTP_COOKIE", ""))
        if cookie:
            environ["HTTP_COOKIE"] = cookie
        else:
            environ.pop("HTTP_COOKIE", None)
        return self.wsgi_app(environ, start_response)

    def service_login(self, req: Request, label: str) -> Response:
        service_sid = self.sessions.redeem_ticket(req.args.get("ticket", ""), label)
        if service_sid is None:
            return html_page("dxflow — link expired", "This link has expired",
                             "<p>A service link works once, within a minute. Press <b>Open</b> in your "
                             "console's Services tab again.</p>", 403)
        target = req.args.get("next", "/")
        if not target.startswith("/") or target.startswith("//") or "\\" in target:
            target = "/"
        resp = Response("", status=303, headers={"Location": target, "Cache-Control": "no-store"})
        # Lax: sent when the console opens the service in a new tab; host-only, so no other service gets it
        resp.set_cookie(SERVICE_COOKIE, service_sid, path="/", httponly=True, samesite="Lax")
        return resp


def set_session_cookie(resp: Response, name: str, sid: str, sessions: Sessions) -> Response:
    resp.set_cookie(name, sid, max_age=int(sessions.lifetime), path="/", httponly=True, samesite="Strict")
    resp.headers["Cache-Control"] = "no-store"
    return resp
