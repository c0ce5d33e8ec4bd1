"""The site's web console: the master's console (:mod:`dxflow.master.console`, the policy of
:mod:`dxflow.edge.session`) for every user of the site at once, on the ``console_listen`` listener.

* **Login.** ``dxflow console`` asks ``POST /api/console/token`` on the user API, where MUNGE proved who
  asks (:mod:`dxflow.site.users`); the token belongs to that user, works once, within
  :data:`~dxflow.master.console.LOGIN_TOKEN_LIFETIME` s, and starts a session of that user. Tokens, sessions
  and tickets are in the store (:class:`~dxflow.site.sessions.SiteSessions`): any replica takes them.
* **Every request** on the console's listener goes through :class:`~dxflow.edge.session.ConsoleGuard`
  (loopback Host, session cookie, CSRF, Origin, security headers) exactly as on a master; then
  :class:`SessionUser` names the session's user to the app, and the fleet's policy
  (:func:`dxflow.site.users.check`) decides per job as for the CLI: the same user, the same answers.
* **A job's services** open on origins of their own, ``LABEL.localhost:PORT``, the label naming the
  cluster, job, node and port and bound to the user who opened it: a ticket, a service cookie or a
  label of another user opens nothing.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from flask import Flask, abort, jsonify, request

from dxflow.edge.session import ConsoleGuard, ConsolePolicy
from dxflow.errors import AccessDenied
from dxflow.master.console import LOGIN_TOKEN_LIFETIME, PROXY_PATHS, PUBLIC_PATHS, add_fleet_routes, add_pages
from dxflow.site import users
from dxflow.site.client import CLUSTER_SEP
from dxflow.site.config import SiteServiceConfig, host_port
from dxflow.site.sessions import SiteSessions

log = logging.getLogger(__name__)

#: the site console's session cookie (not the master's: a browser may hold both, for two consoles)
COOKIE = "dxflow_site_console"


class SessionUser:
    """WSGI layer inside the console guard: puts the user of the request's console session (or service
    session) into the environ as ``users.SESSION_USER``, for :meth:`dxflow.site.users.Users.install`.
    A service session whose label another user opened names nobody."""

    def __init__(self, wsgi_app: Callable, sessions: SiteSessions) -> None:
        self.wsgi_app = wsgi_app
        self.sessions = sessions

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        environ.pop(users.SESSION_USER, None)
        sid = environ.get("dxflow.console.session")
        if sid and not environ.get("dxflow.console.trusted"):
            label = environ.get("dxflow.service")
            if label:  # a service's own origin: the guard gave the console session's digest
                user = self.sessions.user_of_digest(sid)
                if user is not None and self.sessions.label_user(label) != user:
                    user = None
            else:
                user = self.sessions.user_of(sid, touch=False)  # the guard has just touched it
            if user:
                environ[users.SESSION_USER] = user
        return self.wsgi_app(environ, start_response)


def job_id(reg: Any) -> str:
    """The job as the site's API names it: ``CLUSTER~JOB``."""
    cluster = getattr(reg, "cluster", "")
    return f"{cluster}{CLUSTER_SEP}{reg.job}" if cluster else str(reg.job)


def init_app(app: Flask, fleet: Any) -> SiteSessions:
    """Add the console to the site's app (after :func:`dxflow.site.users.init_app`): its routes, and the
    guard on every request that did not come in on the user API (MUNGE-authenticated instead)."""
    config: SiteServiceConfig = fleet.config
    api_request: Callable[[dict], bool] = app.config.get("SITE_API_REQUEST") or users.api_listener(config)
    sessions = SiteSessions(fleet.store)
    app.config["CONSOLE_SESSIONS"] = sessions
    policy = ConsolePolicy(cookie=COOKIE, public_paths=PUBLIC_PATHS, proxy_prefix=PROXY_PATHS,
                           service_prefix=sessions.service_prefix, trusted=api_request)
    app.wsgi_app = ConsoleGuard(SessionUser(app.wsgi_app, sessions), sessions,  # type: ignore[method-assign]
                                policy)
    _, console_port = host_port(config.console_listen, "console_listen")

    def log_in(token: str) -> str | None:
        user = sessions.redeem_user(token)
        return sessions.start(user) if user else None

    add_pages(app, sessions, COOKIE, log_in, "This token is not valid: it expired or was already used. "
                                             "Run `dxflow console` for a new link.")

    def who() -> dict[str, Any]:
        user = users.current()
        return {"user": user.name, "admin": user.admin}

    def target(job: str, node: str | None) -> Any:
        agent = fleet.relay_target(job, node)  # the policy: the user's own job only
        user = users.current()
        if agent.reg.user != user.name:  # an admin's read access opens no service
            raise AccessDenied(users.ADMIN_REFUSED.format(job=job, owner=agent.reg.user))
        return agent

    def label_for(agent: Any, port: int) -> str:
        return sessions.add_service(users.current().name, getattr(agent.reg, "cluster", ""), agent.reg.job,
                                    agent.reg.node, port, f"/api/fleet/{job_id(agent.reg)}/{agent.reg.node}/proxy/{port}")

    add_fleet_routes(app, sessions, who, target, fleet.ask, label_for)

    @app.post("/api/console/token")
    def console_token():
        """A one-time login link for the user MUNGE proved (the user API only: `dxflow console`)."""
        if not api_request(request.environ):
            abort(403, "login tokens are handed out on the site's user API only (`dxflow console`)")
        user = users.current()
        token, expires = sessions.new_login_token(LOGIN_TOKEN_LIFETIME, user=user.name)
        return jsonify(token=token, expires=expires, port=console_port, host=config.replica_name,
                       listen=config.console_listen, socket=None,
                       url=f"http://127.0.0.1:{console_port}/login?token={token}")  # the guard wants a loopback Host: `ssh -L`

    @app.get("/api/console")
    def console_status():
        return jsonify(port=console_port, host=config.replica_name, listen=config.console_listen, socket=None,
                       url=f"http://127.0.0.1:{console_port}/console/")
    return sessions
