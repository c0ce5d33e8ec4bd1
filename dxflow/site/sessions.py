"""The site console's sessions, one-time login tokens, service tickets and service labels, kept in the
site's store so that every replica knows them: a browser logged in through one replica goes on through
another, and a replica that restarts ends no session (docs/site.md).

:class:`SiteSessions` is :class:`dxflow.edge.session.Sessions` (the console policy's interface, which
:class:`~dxflow.edge.session.ConsoleGuard` calls) over tables instead of dicts, with one addition: each
login token and session belongs to a user (the one whose ``dxflow console`` asked for the token), since
one site console serves everyone. Secrets are stored as their SHA-256 only: reading the database gives no
cookie, token or ticket that works. The CSRF key is one random key in the store, made by the first
replica, so every replica computes the same CSRF token for a session.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from typing import Any

from dxflow.edge.session import SESSION_IDLE, SESSION_LIFETIME, TICKET_LIFETIME, Sessions, service_label

#: a session's last use is written at most this often (seconds): a console request reads, rarely writes
TOUCH_EVERY = 30.0

TABLES = [
    "CREATE TABLE IF NOT EXISTS site_console_keys (name TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS site_console_sessions (digest TEXT PRIMARY KEY, username TEXT NOT NULL, "
    "created DOUBLE PRECISION NOT NULL, seen DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS site_console_tokens (digest TEXT PRIMARY KEY, username TEXT NOT NULL, "
    "expires DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS site_console_tickets (digest TEXT PRIMARY KEY, session TEXT NOT NULL, "
    "label TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS site_console_services (digest TEXT PRIMARY KEY, session TEXT NOT NULL, "
    "label TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS site_console_labels (label TEXT PRIMARY KEY, username TEXT NOT NULL, "
    "path TEXT NOT NULL)",
]


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class SiteSessions(Sessions):
    """Console sessions of the site, in the store (see the module docstring)."""

    def __init__(self, store: Any, idle: float = SESSION_IDLE, lifetime: float = SESSION_LIFETIME) -> None:
        store.ddl(TABLES)
        store.execute("INSERT INTO site_console_keys (name, value) VALUES ('csrf', ?) ON CONFLICT (name) DO NOTHING",
                      (secrets.token_hex(32),))
        key = bytes.fromhex(store.query("SELECT value FROM site_console_keys WHERE name = 'csrf'")[0][0])
        super().__init__(idle=idle, lifetime=lifetime, _key=key)  # csrf() and csrf_ok() are the parent's
        self.store = store

    # -- login tokens ---------------------------------------------------------------------------------
    def new_login_token(self, lifetime: float = 300, user: str = "") -> tuple[str, float]:
        """A one-time login token for ``user`` (who asked for it, proven by MUNGE on the user API)."""
        if not user:
            raise ValueError("a site login token belongs to a user")
        token = secrets.token_urlsafe(32)
        expires = time.time() + lifetime
        self._expire(time.time())
        self.store.execute("INSERT INTO site_console_tokens (digest, username, expires) VALUES (?, ?, ?)",
                           (_digest(token), user, expires))
        return token, expires

    def redeem(self, token: str) -> bool:
        return self.redeem_user(token) is not None

    def redeem_user(self, token: str) -> str | None:
        """The user of a login token that was handed out and has not expired, once (the first replica
        to delete its row wins: two browsers racing with one token get one session)."""
        if not token or len(token) > 256:
            return None
        digest = _digest(token)
        rows = self.store.query("SELECT username, expires FROM site_console_tokens WHERE digest = ?", (digest,))
        if not rows or not self.store.execute("DELETE FROM site_console_tokens WHERE digest = ?", (digest,)):
            return None
        user, expires = rows[0]
        return str(user) if float(expires) > time.time() else None

    def first_use(self, credential_id: str, until: float) -> bool:
        return bool(self.store.claim("console-login", credential_id, until))

    # -- sessions ---------------------------------------------------------------------------------------
    def start(self, user: str = "") -> str:
        """A new session of ``user``; its id is the cookie's value."""
        if not user:
            raise ValueError("a site console session belongs to a user")
        sid = secrets.token_urlsafe(32)
        now = time.time()
        self._expire(now)
        self.store.execute("INSERT INTO site_console_sessions (digest, username, created, seen) VALUES (?, ?, ?, ?)",
                           (_digest(sid), user, now, now))
        return sid

    def user_of(self, sid: str | None, touch: bool = True) -> str | None:
        """The user of a live session (and, with ``touch``, it counts as used now), else None."""
        if not sid or len(sid) > 256:
            return None
        digest = _digest(sid)
        rows = self.store.query("SELECT username, created, seen FROM site_console_sessions WHERE digest = ?",
                                (digest,))
        if not rows:
            return None
        user, created, seen = rows[0]
        now = time.time()
        if now - float(seen) > self.idle or now - float(created) > self.lifetime:
            self.end(sid)
            return None
        if touch and now - float(seen) > TOUCH_EVERY:
            self.store.execute("UPDATE site_console_sessions SET seen = ? WHERE digest = ?", (now, digest))
        return str(user)

    def valid(self, sid: str | None, touch: bool = True) -> bool:
        return self.user_of(sid, touch) is not None

    def end(self, sid: str | None) -> None:
        """Log out: the session, its tickets and its service sessions end now, on every replica."""
        digest = _digest(sid or "")
        for table, column in (("site_console_services", "session"), ("site_console_tickets", "session"),
                              ("site_console_sessions", "digest")):
            self.store.execute(f"DELETE FROM {table} WHERE {column} = ?", (digest,))

    # -- a job's services on their own origins -------------------------------------------------------------
    def new_ticket(self, sid: str, label: str) -> str:
        ticket = secrets.token_urlsafe(32)
        self._expire(time.time())
        self.store.execute("INSERT INTO site_console_tickets (digest, session, label, expires) VALUES (?, ?, ?, ?)",
                           (_digest(ticket), _digest(sid), label, time.time() + TICKET_LIFETIME))
        return ticket

    def redeem_ticket(self, ticket: str, label: str) -> str | None:
        if not ticket or len(ticket) > 256:
            return None
        digest = _digest(ticket)
        rows = self.store.query("SELECT session, label, expires FROM site_console_tickets WHERE digest = ?",
                                (digest,))
        if not rows or not self.store.execute("DELETE FROM site_console_tickets WHERE digest = ?", (digest,)):
            return None
        session, ticket_label, expires = rows[0]
        if ticket_label != label or float(expires) < time.time() or not self._live_digest(str(session)):
            return None
        service_sid = secrets.token_urlsafe(32)
        self.store.execute("INSERT INTO site_console_services (digest, session, label) VALUES (?, ?, ?)",
                           (_digest(service_sid), session, label))
        return service_sid

    def service_session(self, service_sid: str | None, label: str) -> str | None:
        """The console session behind a service cookie of this label, if both are live. What comes back
        stands for the session in the environ (``dxflow.console.session``): its digest, since only that
        is stored; :meth:`user_of_digest` reads its user."""
        if not service_sid or len(service_sid) > 256:
            return None
        rows = self.store.query("SELECT session, label FROM site_console_services WHERE digest = ?",
                                (_digest(service_sid),))
        if not rows or rows[0][1] != label or not self._live_digest(str(rows[0][0])):
            return None
        return str(rows[0][0])

    def user_of_digest(self, digest: str) -> str | None:
        rows = self.store.query("SELECT username FROM site_console_sessions WHERE digest = ?", (digest,))
        return str(rows[0][0]) if rows and self._live_digest(digest) else None

    # -- service labels: which job's port a label stands for, and whose it is -----------------------------
    def add_service(self, user: str, cluster: str, job: str, node: str, port: int, path: str) -> str:
        """The label of a job's service opened by ``user`` (cluster, job, node and port in it; the hash
        of ``service_label`` keeps labels of changed names apart), remembered with its relay path."""
        label = service_label(port, node, f"{cluster}-{job}" if cluster else job)
        # the last opener owns it (a job id the scheduler gives again, later, to someone else): a service
        # cookie of the label's earlier owner then names nobody (console.SessionUser checks the owner)
        self.store.execute("INSERT INTO site_console_labels (label, username, path) VALUES (?, ?, ?) "
                           "ON CONFLICT (label) DO UPDATE SET username = excluded.username, path = excluded.path",
                           (label, user, path))
        return label

    def service_prefix(self, label: str) -> str | None:
        """The relay path a label stands for (ConsolePolicy.service_prefix)."""
        rows = self.store.query("SELECT path FROM site_console_labels WHERE label = ?", (label,))
        return str(rows[0][0]) if rows else None

    def label_user(self, label: str) -> str | None:
        rows = self.store.query("SELECT username FROM site_console_labels WHERE label = ?", (label,))
        return str(rows[0][0]) if rows else None

    # -- housekeeping ----------------------------------------------------------------------------------------
    def _live_digest(self, digest: str) -> bool:
        rows = self.store.query("SELECT created, seen FROM site_console_sessions WHERE digest = ?", (digest,))
        if not rows:
            return False
        now = time.time()
        return now - float(rows[0][1]) <= self.idle and now - float(rows[0][0]) <= self.lifetime

    def _expire(self, now: float) -> None:
        # on every new token, ticket or session, as the in-memory Sessions does: the tables stay small
        self.store.execute("DELETE FROM site_console_tokens WHERE expires < ?", (now,))
        self.store.execute("DELETE FROM site_console_tickets WHERE expires < ?", (now,))
        self.store.execute("DELETE FROM site_console_sessions WHERE seen < ? OR created < ?",
                           (now - self.idle, now - self.lifetime))
        self.store.execute("DELETE FROM site_console_services WHERE session NOT IN "
                           "(SELECT digest FROM site_console_sessions)")
