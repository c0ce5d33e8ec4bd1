"""Who asks the site service, and what they may see and do: MUNGE login and the admin policy.

**Who.** On the user API every request carries ``Authorization: MUNGE <credential>``
(:mod:`dxflow.site.client`). :meth:`Users.authenticate` has ``munged`` decode it (a forged, expired
or replayed one is refused there) and then refuses, with 401:

* a payload that is not this request's (``{"purpose", "method", "target"}`` of
  :func:`dxflow.site.client.request_payload`): a credential made for ``GET /api/agents`` opens nothing else;
* a credential older than :data:`MAX_AGE` seconds, whatever TTL its maker chose;
* one this site has seen before (a table in the store that every replica shares: ``munged``'s own
  replay cache is per host, and replicas may run on several).

The uid is the user; a uid with no account here is refused. On the console's listener the user is the
one whose ``dxflow console`` made the session's login link (:mod:`dxflow.site.console`).

**What.** :func:`check` is the one decision, made by the fleet before anything reaches an agent:

* a user's own jobs: everything;
* members of ``admin_group``: every job's state and metrics, read-only — the requests of
  :data:`ADMIN_READS` and nothing else, unless the site sets ``admins_may_act``;
* anyone else: the job does not exist (404 "no such job"), never confirmed by a different answer;
  an admin refused an act gets 403 saying why (they see the job in ``dxflow ls`` anyway).
"""

from __future__ import annotations

import grp
import hashlib
import os
import pwd
import re
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from flask import Flask, current_app, g, request

from dxflow import audit, munge
from dxflow.errors import AccessDenied, AuthError, NotFound
from dxflow.site.client import AUTH_SCHEME, bound_target, request_payload
from dxflow.site.config import SiteServiceConfig, host_port

#: seconds a request's credential is accepted after it was made, whatever TTL its maker chose (the CLI
#: makes it just before the request; a little more for clocks a few seconds apart)
MAX_AGE = 90
#: seconds a user's groups are remembered (asked of NSS, which may be LDAP)
GROUPS_TTL = 60.0
#: environ key of the console session's user, set by the console before the app runs
SESSION_USER = "dxflow.site.session_user"
#: environ key an in-process server sets to "console" for its console listener (no socket to tell by)
LISTENER = "dxflow.site.listener"

#: Requests an admin may make on another user's job (``admin_group``, ``admins_may_act = false``): GETs
#: (the method is checked too) of numbers about the node and the job — never a file, a command line,
#: the job's output or environment, a terminal, a port.
ADMIN_READS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^/api/fleet/[^/]+/[^/]+/api/node$"),
     "the node: host name, CPUs, memory, load, uptime, GPU use (`dxflow info`): the node's figures"),
    (re.compile(r"^/api/fleet/[^/]+/[^/]+/api/metrics$"),
     "the job's samples on the node (CPU, memory, I/O, GPU figures over time): numbers only"),
    (re.compile(r"^/api/fleet/[^/]+/[^/]+/api/health$"),
     "whether the agent answers, and its version"),
    (re.compile(r"^/api/metrics/[^/]+$"),
     "the job's samples on all its nodes (`dxflow metrics`): the agents' /api/metrics together"),
    (re.compile(r"^/api/report/[^/]+$"),
     "the job's efficiency report (`dxflow report`): a summary of the same samples"),
)
# Not in the list, on purpose: logs (the job's output may hold anything), ports (command lines can
# hold secrets), top (command lines), files, exec, shell, proxy, forward (acts and contents).

#: what another user is told about a job that is not theirs: the same as for a job that does not exist
NO_SUCH_JOB = "no such job: {job} (see `dxflow ls`)"
#: what an admin is told about an act on another user's job (they see the job: its existence is no secret)
ADMIN_REFUSED = ("job {job} is {owner}'s: site admins see every job's state and metrics (`dxflow ls`, `info`, "
                 "`metrics`, `report`) but act only on their own jobs (admins_may_act = false)")


@dataclass(frozen=True)
class SiteUser:
    """The person behind a request: their account, and whether they are one of the site's admins."""

    name: str
    uid: int
    admin: bool = False


def admin_read(method: str, path: str) -> bool:
    """Whether ``method path`` (a site API path) is one of the reads admins may make on any job."""
    return method in ("GET", "HEAD") and any(p.match(path) for p, _ in ADMIN_READS)


def decide(user: SiteUser, owner: str, method: str, path: str, admins_may_act: bool = False) -> bool:
    """The policy: may ``user`` make the request ``method path`` on a job of ``owner``?"""
    if user.name == owner:
        return True
    if not user.admin:
        return False
    return admins_may_act or admin_read(method, path)


class Users:
    """MUNGE login on the user API, the replay table in the store, and who is an admin."""

    def __init__(self, config: SiteServiceConfig, store: Any,
                 decode: Callable[[str], munge.Credential] = munge.decode) -> None:
        self.config = config
        self.store = store
        self.decode = decode
        self._groups: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    # -- who -------------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None, method: str, target: str) -> SiteUser:
        """The user a request's ``Authorization`` header proves, for this ``method`` and ``target``
        (path, ``?query`` if any); AuthError (401) saying why otherwise."""
        scheme, _, credential = (authorization or "").strip().partition(" ")
        if scheme != AUTH_SCHEME or not credential.strip():
            raise AuthError(f"this site service wants `Authorization: {AUTH_SCHEME} <credential>` on every "
                            "request: use the dxflow command (munged must run on this host)")
        credential = credential.strip()
        if len(credential) > 4096:
            raise AuthError("not a MUNGE credential (too long)")
        cred = self.decode(credential)  # MungeError (401): invalid, expired, replayed at this host's munged
        if cred.payload != request_payload(method, target):
            raise AuthError(f"the credential was made for another request than {method} {bound_target(target)}")
        now = time.time()
        if now - cred.encode_time > MAX_AGE:
            raise AuthError(f"the credential was made {now - cred.encode_time:.0f} s ago (at most {MAX_AGE} s "
                            "are accepted): check the hosts' clocks")
        self.first_use(credential, cred.encode_time + MAX_AGE + 60)
        try:
            name = pwd.getpwuid(cred.uid).pw_name
        except KeyError:
            raise AuthError(f"uid {cred.uid} has no account on the site service's host") from None
        return SiteUser(name=name, uid=cred.uid, admin=self.is_admin(name))

    def first_use(self, credential: str, until: float) -> None:
        """Remember a credential until it can no longer be accepted; AuthError if it was seen before,
        on this replica or any other (the store's claims, shared by all)."""
        if not self.store.claim("munge-credential", hashlib.sha256(credential.encode()).hexdigest(), until):
            raise AuthError("the credential was already used (replayed): every request needs a new one")

    def user(self, name: str) -> SiteUser:
        """A user known by name (the console session's): their uid and admin flag as of now."""
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            raise AuthError(f"user {name!r} has no account on the site service's host") from None
        return SiteUser(name=name, uid=pw.pw_uid, admin=self.is_admin(name))

    def is_admin(self, name: str) -> bool:
        """Whether ``name`` is a member of ``admin_group`` (any of their groups; asked again after GROUPS_TTL)."""
        group = self.config.admin_group
        if not group:
            return False
        with self._lock:
            seen = self._groups.get(name)
        if seen is not None and time.monotonic() - seen[0] < GROUPS_TTL:
            return seen[1]
        try:
            gid = grp.getgrnam(group).gr_gid
            admin = gid in os.getgrouplist(name, pwd.getpwnam(name).pw_gid)
        except KeyError:
            admin = False
        with self._lock:
            self._groups[name] = (time.monotonic(), admin)
        return admin

    # -- the Flask side ------------------------------------------------------------------------------
    def install(self, app: Flask, api_request: Callable[[dict], bool]) -> None:
        """Authenticate every request of ``app``: on the user API (``api_request(environ)``) by its
        MUNGE header; elsewhere (the console) by the session's user the console put in the environ.
        Sets ``flask.g.site_user`` (a :class:`SiteUser`, or None for the console's public pages: the
        console guard refused everything else without a session)."""
        app.config["SITE_USERS"] = self

        @app.before_request
        def who_asks() -> None:
            g.site_user = None
            if api_request(request.environ):
                query = request.query_string.decode("latin-1")
                g.site_user = self.authenticate(request.headers.get("Authorization"), request.method,
                                                request.path + (f"?{query}" if query else ""))
            elif request.environ.get(SESSION_USER):
                g.site_user = self.user(request.environ[SESSION_USER])
            if g.site_user is not None:  # the relay's audit records name who asked
                request.environ[audit.ASKED_BY] = g.site_user.name


def api_listener(config: SiteServiceConfig) -> Callable[[dict], bool]:
    """A predicate: the request came in on the user API, not on the console's listener (told by the
    local port of the connection's socket, which no request can choose). Without a socket (an app
    driven in-process) the server's own environ key ``dxflow.site.listener`` says, default the API."""
    console_port = host_port(config.console_listen, "console_listen")[1]

    def on_api(environ: dict) -> bool:
        sock = environ.get("gunicorn.socket")
        if sock is None:
            return environ.get(LISTENER, "api") != "console"
        try:
            return sock.getsockname()[1] != console_port
        except (OSError, IndexError, TypeError):
            return False  # a Unix socket or a closed one: not the API; the console guard answers
    return on_api


def init_app(app: Flask, fleet: Any) -> Users:
    """MUNGE login and the policy on the site's app (``fleet``: :class:`dxflow.site.fleet.SiteFleet`,
    whose ``config`` and ``store`` are the site's): every request gets its user, every job its check."""
    site_users = Users(fleet.config, fleet.store)
    site_users.install(app, api_listener(fleet.config))
    app.config["SITE_API_REQUEST"] = api_listener(fleet.config)
    fleet.current_user = current
    fleet.visible = visible
    fleet.check = check
    return site_users


def current() -> SiteUser:
    """The user of the request being answered; AuthError (401) when nobody logged in."""
    user = getattr(g, "site_user", None)
    if user is None:
        raise AuthError("log in first: run `dxflow console` for a login link")
    return user


def visible(owner: str) -> bool:
    """Whether the request's user may see a job of ``owner`` at all (in `dxflow ls`): theirs, or an admin."""
    user = current()
    return user.name == owner or user.admin


def check(owner: str, job: str, method: str | None = None, path: str | None = None) -> None:
    """Let the request go on to a job of ``owner`` (:func:`decide`; ``method`` and ``path`` default to
    the request's), or refuse it: NotFound as if the job did not exist, for a user who may not see it;
    AccessDenied for an admin, who sees it in `dxflow ls` anyway, saying what admins may do."""
    user = current()
    config: SiteServiceConfig = current_app.config["SITE_USERS"].config
    if decide(user, owner, method or request.method, path or request.path, config.admins_may_act):
        return
    if user.admin:
        raise AccessDenied(ADMIN_REFUSED.format(job=job, owner=owner))
    raise NotFound(NO_SUCH_JOB.format(job=job))


def listing_item(item: dict, owner: str) -> dict:
    """An ``/api/agents`` item as the request's user sees it: admins also see whose job it is."""
    return {**item, "user": owner} if current().admin else item
