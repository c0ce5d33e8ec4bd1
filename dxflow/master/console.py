"""The master's web console: the static pages, login by one-time token, the job's services on origins
of their own — under the console policy of :mod:`dxflow.edge.session`.

The master's app answers on three listeners. The CLI's Unix socket (``master.sock``, 0600 in the
user's 0700 ``~/.dxflow/hosts/HOST``, :mod:`dxflow.layout`) is trusted as it is. The console's TCP port
on 127.0.0.1 and its Unix socket (``console.sock``, for ``ssh -L PORT:~/.dxflow/hosts/HOST/console.sock``
from a laptop) are for browsers: the
server refuses connections of any other user at accept (:mod:`dxflow.edge.worker`), and every request
there goes through :class:`~dxflow.edge.session.ConsoleGuard` (a live session, CSRF, Host and Origin
checks, security headers). Sessions live in the master's memory: logout, an idle hour, 12 hours, or a
restart of the master end them.

A login token comes from ``POST /api/console/token`` on the CLI's socket only (``dxflow console``):
random, valid once, for :data:`LOGIN_TOKEN_LIFETIME` s. The Services tab opens a service through
``/console/open``, which checks with the node's agent that one of the user's processes listens on
the port, then sends the browser to the service's own origin with a one-time ticket.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, Callable

import werkzeug.wrappers
from flask import Flask, Response, abort, jsonify, redirect, request, send_from_directory

from dxflow import __version__
from dxflow.edge.session import (CSRF_HEADER, ConsoleGuard, ConsolePolicy, Sessions, alert, hostname, html_page,
                                 service_label, service_url, set_session_cookie)
from dxflow.errors import DxflowError
from dxflow.layout import UserLayout
from dxflow.master.client import PORT_ENV, port_is_free
from dxflow.edge.webfiles import web_root

log = logging.getLogger(__name__)

COOKIE = "dxflow_console"
LOGIN_TOKEN_LIFETIME = 300
#: what a browser without a session may fetch.
PUBLIC_PATHS = frozenset({"/login", "/console/style.css", "/console/favicon.svg"})
#: the relay to a job's services: never on the console's origin for a browser (their own origins instead).
PROXY_PATHS = re.compile(r"^/api/fleet/[^/]+/[^/]+/proxy(/|$)")
PORT_WAIT = 2.0  # seconds to wait for the remembered port to be free again


# -- the port -------------------------------------------------------------------
def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
    finally:
        s.close()


def saved_port(layout: UserLayout) -> int | None:
    try:
        return int(json.loads(layout.console_state.read_text())["port"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def console_port(layout: UserLayout) -> int:
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
    port = port or saved_port(layout)
    if port and 0 < port < 65536:
        deadline = time.monotonic() + PORT_WAIT  # a master that is stopping may hold it a moment longer
        while not port_is_free(port) and time.monotonic() < deadline:
            time.sleep(0.2)
    if not port or not 0 < port < 65536 or not port_is_free(port):
        if port:
            log.warning("console port %d is taken or invalid: choosing a free port", port)
        port = free_port()
    return port


def remember_port(layout: UserLayout, port: int) -> None:
    """Write console.json: the port the running master's console listens on."""
    state = layout.console_state
    tmp = state.with_name(f".{state.name}.{os.getpid()}")
    tmp.write_text(json.dumps({"port": port}) + "\n")
    os.replace(tmp, state)


# -- the policy's parameters ----------------------------------------------------------------------
def cli_socket_request(cli_socket: Path):
    """A predicate: the request came in on the CLI's own Unix socket (trusted: only the user reaches it)."""
    path = str(cli_socket)

    def trusted(environ: dict) -> bool:
        sock = environ.get("gunicorn.socket")
        if sock is None or getattr(sock, "family", None) != socket.AF_UNIX:
            return False
        try:
            return sock.getsockname() == path  # the listener's path: master.sock or console.sock
        except OSError:
            return False
    return trusted


class ServiceTable:
    """Service labels the console has opened, and the relay path each stands for."""

    def __init__(self) -> None:
        self._paths: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, job: str, node: str, port: int) -> str:
        label = service_label(port, node, job)
        with self._lock:
            self._paths[label] = f"/api/fleet/{job}/{node}/proxy/{port}"
        return label

    def prefix(self, label: str) -> str | None:
        with self._lock:
            return self._paths.get(label)


# -- the pages ----------------------------------------------------------------------
def login_page(error: str = "", status: int = 200) -> werkzeug.wrappers.Response:
    body = (f"<p>Run <code>dxflow console</code> on the login node and open the link it prints, or paste its "
            f"token here. A token works once, within {LOGIN_TOKEN_LIFETIME // 60} minutes.</p>\n{alert(error)}\n"
            '<form method="post" action="/login" autocomplete="off"><label for="token">Token</label>'
            '<input id="token" name="token" type="password" required autofocus spellcheck="false">'
            '<button class="btn btn-primary" type="submit">Log in</button></form>')
    return html_page("dxflow console — log in", "Log in to your console", body, status)


def static_file(root: Path, name: str) -> Response:
    resp = send_from_directory(root, name, max_age=0)
    resp.headers["Cache-Control"] = "no-cache"  # revalidate: a reinstall must show at once
    return resp


def add_pages(app: Flask, sessions: Sessions, cookie: str, log_in: Callable[[str], str | None],
              refused: str) -> None:
    """The pages every console has (the master's, the site's): login by one-time token, logout, and the
    console's static files. ``log_in(token)`` is the new session's id, or None for a token not valid
    (``refused`` says so on the login page)."""

    def logged_in(token: str) -> werkzeug.wrappers.Response:
        sid = log_in(token)
        if sid is None:
            return login_page(refused, 403)
        return set_session_cookie(redirect("/console/", code=303), cookie, sid, sessions)

    @app.get("/login")
    def login_form():
        token = request.args.get("token", "")
        return logged_in(token) if token else login_page()

    @app.post("/login")
    def login_post():
        return logged_in(request.form.get("token", "").strip())

    @app.post("/logout")
    def logout():
        sessions.end(request.cookies.get(cookie))
        resp = jsonify(status="logged out")
        resp.delete_cookie(cookie, path="/", httponly=True, samesite="Strict")
        return resp

    @app.get("/")
    @app.get("/console")
    def to_console():
        return redirect("/console/", code=302)

    @app.get("/console/")
    def console_index():
        return static_file(web_root(), "index.html")

    @app.get("/console/<path:name>")
    def console_static(name: str):
        return static_file(web_root(), name)


def add_fleet_routes(app: Flask, sessions: Any, who: Callable[[], dict[str, Any]],
                     target: Callable[[str, str | None], Any], ask: Callable[[Any, str], tuple[int, Any]],
                     label_for: Callable[[Any, int], str]) -> None:
    """The routes a fleet console (the master's, the site's) has beyond :func:`add_pages`: its
    ``config.json`` (``who()``: the user's fields) and the Services tab's Open button.

    ``target(job, node)`` is the agent the console may reach for that job and node (a DxflowError when
    it may not), ``ask(agent, path)`` asks that agent, and ``label_for(agent, port)`` registers the
    service's own origin for this session's user: the service opens there, never on the console's."""

    @app.get("/console/config.json")
    def console_config():
        session = request.environ.get("dxflow.console.session")
        resp = jsonify(mode="fleet", **who(), version=__version__,
                       csrf=sessions.csrf(session) if session else None, csrf_header=CSRF_HEADER)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.get("/console/open")
    def open_service():
        """The Services tab's Open button: the service's own origin, with a one-time ticket."""
        sid = request.environ.get("dxflow.console.session")
        if not sid:
            abort(401, "open services from a logged-in console")
        job, node, port = (request.args.get(k, "") for k in ("job", "node", "port"))
        if not port.isdigit() or not 0 < int(port) < 65536:
            return html_page("dxflow — bad port", "Not a port", alert(f"{port!r} is not a port number (1-65535)."),
                             400)
        try:
            agent = target(job, node or None)
            status, info = ask(agent, f"/api/ports/{int(port)}")
        except DxflowError as e:
            return html_page("dxflow — cannot open", "Cannot open this service", alert(str(e)),
                             getattr(e, "http_status", 502))
        if status != 200:
            return html_page("dxflow — cannot open", "Cannot open this service",
                             alert(str(info.get("message") or info)), status)
        label = label_for(agent, int(port))
        ticket = sessions.new_ticket(sid, label)
        resp = redirect(service_url(label, hostname(request.host)[1] or "80", ticket), code=303)
        resp.headers["Cache-Control"] = "no-store"
        return resp


def init_app(app: Flask, fleet) -> None:
    sessions = Sessions()  # in memory: a restarted master has no sessions
    services = ServiceTable()
    app.config["CONSOLE_SESSIONS"] = sessions
    policy = ConsolePolicy(cookie=COOKIE, public_paths=PUBLIC_PATHS, proxy_prefix=PROXY_PATHS,
                           service_prefix=services.prefix, trusted=cli_socket_request(fleet.layout.master_sock))
    app.wsgi_app = ConsoleGuard(app.wsgi_app, sessions, policy)  # type: ignore[method-assign]

    def trusted() -> bool:
        return bool(request.environ.get("dxflow.console.trusted"))

    add_pages(app, sessions, COOKIE, lambda token: sessions.start() if sessions.redeem(token) else None,
              "This token is not valid: it expired, was already used, or belongs to a master that has "
              "restarted. Run `dxflow console` for a new link.")

    add_fleet_routes(app, sessions, lambda: {"user": fleet.user}, fleet.relay_target, fleet.ask,
                     lambda agent, port: services.add(agent.reg.job, agent.reg.node, port))

    @app.post("/api/console/token")
    def console_token():
        if not trusted():
            abort(403, "login tokens are handed out on the master's Unix socket only (`dxflow console`)")
        port = app.config.get("CONSOLE_PORT")
        if not port:
            abort(503, "this master does not listen on TCP: restart it (`dxflow master stop`)")
        token, expires = sessions.new_login_token(LOGIN_TOKEN_LIFETIME)
        return jsonify(token=token, expires=expires, port=port, socket=str(fleet.layout.console_sock),
                       host=fleet.layout.host,
                       url=f"http://127.0.0.1:{port}/login?token={token}")

    @app.get("/api/console")
    def console_status():
        port = app.config.get("CONSOLE_PORT")
        return jsonify(port=port, socket=str(fleet.layout.console_sock), host=fleet.layout.host,
                       url=f"http://127.0.0.1:{port}/console/" if port else None)
