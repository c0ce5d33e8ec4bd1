"""The site service's state: SQLite for one replica, PostgreSQL (psycopg 3) for several.

Everything replicas share lives here: the agents (who enrolled them, their gateway key, their
registration and state), and the tables other site modules make with :meth:`Store.ddl` (console
sessions, login tokens, used credentials: :mod:`dxflow.site.users`, :mod:`dxflow.site.sessions`).
SQL is written once, with ``?`` placeholders and the types both engines read alike (``TEXT``,
``BIGINT``, ``DOUBLE PRECISION``); the PostgreSQL side turns ``?`` into ``%s``. Upserts use
``INSERT ... ON CONFLICT``, which both understand.

Connections: SQLite, one connection behind a lock (WAL, so a second process can read); PostgreSQL,
a pool of at most :data:`PG_CONNECTIONS` (every statement stands alone, in autocommit, so any
thread may take any idle one), each opened on first use and opened again once when the server
dropped it (a PostgreSQL restart, a failover behind the same address).
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from dxflow.config import agent_name
from dxflow.errors import ConfigError, DxflowError, UsageError
from dxflow.master.registry import STATES, Agent
from dxflow.registration import Registration
from dxflow.site.config import SiteServiceConfig

log = logging.getLogger(__name__)

AGENTS = """
CREATE TABLE IF NOT EXISTS site_agents (
    name TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    job TEXT NOT NULL,
    node TEXT NOT NULL,
    owner TEXT NOT NULL,
    uid BIGINT NOT NULL,
    gateway_key TEXT NOT NULL,
    registration TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL DEFAULT 'starting',
    detail TEXT NOT NULL DEFAULT '',
    node_info TEXT NOT NULL DEFAULT '{}',
    metrics_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    enrolled DOUBLE PRECISION NOT NULL,
    checked DOUBLE PRECISION NOT NULL DEFAULT 0,
    changed DOUBLE PRECISION NOT NULL DEFAULT 0
)"""
AGENTS_BY_OWNER = "CREATE INDEX IF NOT EXISTS site_agents_owner ON site_agents (owner)"
AGENTS_BY_JOB = "CREATE INDEX IF NOT EXISTS site_agents_job ON site_agents (job)"
CLAIMS = """
CREATE TABLE IF NOT EXISTS site_claims (
    kind TEXT NOT NULL,
    claim TEXT NOT NULL,
    expires DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, claim)
)"""
COLUMNS = ("name, cluster, job, node, owner, uid, gateway_key, registration, state, detail, node_info, metrics_at, "
           "enrolled, checked, changed")
#: claims are swept this often at most (each claim carries its own expiry)
SWEEP_EVERY = 60.0
#: PostgreSQL connections one replica opens at most: every thread (requests, the gateway's connections,
#: checks) shares them, one statement at a time; PostgreSQL's own limit (max_connections, default 100)
#: is shared by every replica and everything else on the server
PG_CONNECTIONS = 8
#: seconds a statement waits for a free connection
PG_WAIT = 30.0


@dataclass
class SiteAgent(Agent):
    """An agent the site knows: the master's :class:`Agent` (so the relay takes it as is), with who
    enrolled it and the fingerprint of the key its dial-out logs in with."""

    uid: int = -1
    gateway_key: str = ""
    enrolled: float = 0.0

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["enrolled"] = self.enrolled
        return out


def _placeholder(cluster: str, job: str, node: str, user: str) -> Registration:
    """The registration of an agent that enrolled without one yet: nothing in it can be reached."""
    return Registration(cluster=cluster, scheduler="", job=job, node=node, address="", port=0, pid=0, user=user,
                        started="", public_key="", api_version=0, version="")


class Store:
    """One database, SQLite (a file path) or PostgreSQL (a ``postgresql://`` URL)."""

    def __init__(self, database: str) -> None:
        self.url = database
        self.kind = "postgresql" if database.startswith(("postgresql://", "postgres://")) else "sqlite"
        self._lock = threading.Lock()
        self._idle: list[Any] = []                     # PostgreSQL connections not in use
        self._slots = threading.BoundedSemaphore(PG_CONNECTIONS)
        self._swept = 0.0
        self._sqlite: sqlite3.Connection | None = None
        if self.kind == "sqlite":
            try:
                self._sqlite = sqlite3.connect(database, check_same_thread=False, isolation_level=None, timeout=10)
                self._sqlite.execute("PRAGMA journal_mode=WAL")
            except sqlite3.Error as e:
                raise ConfigError(f"cannot open the site database {database}: {e}") from e
        self.ddl([AGENTS, AGENTS_BY_OWNER, AGENTS_BY_JOB, CLAIMS])

    # -- the generic API (other site modules' tables) ---------------------------------
    def ddl(self, statements: Iterable[str]) -> None:
        """Run schema statements (``CREATE TABLE IF NOT EXISTS ...``): at open, by each module that owns tables."""
        for sql in statements:
            self.execute(sql)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        """Run one statement; the number of rows it changed."""
        return self._run(sql, args, fetch=False)[0]

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """Rows of a ``SELECT`` (or of ``... RETURNING``)."""
        return self._run(sql, args, fetch=True)[1]

    def query_one(self, sql: str, args: Sequence[Any] = ()) -> tuple | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    def claim(self, kind: str, key: str, expires: float) -> bool:
        """True the first time ``(kind, key)`` is claimed by any replica (until ``expires``, epoch seconds):
        a credential or one-time token used once only, wherever it is presented."""
        now = time.time()
        if now - self._swept > SWEEP_EVERY:
            self._swept = now
            self.execute("DELETE FROM site_claims WHERE expires < ?", (now,))
        return self.execute("INSERT INTO site_claims (kind, claim, expires) VALUES (?, ?, ?) "
                            "ON CONFLICT (kind, claim) DO NOTHING", (kind, key, expires)) == 1

    def close(self) -> None:
        with self._lock:
            if self._sqlite is not None:
                self._sqlite.close()
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def _run(self, sql: str, args: Sequence[Any], fetch: bool) -> tuple[int, list[tuple]]:
        if self._sqlite is not None:
            try:
                with self._lock:
                    cur = self._sqlite.execute(sql, tuple(args))
                    rows = cur.fetchall() if fetch else []
                    return cur.rowcount, rows
            except sqlite3.Error as e:
                raise DxflowError(f"site database {self.url}: {e} (in: {sql.split()[0]} ...)") from e
        return self._run_pg(_pg_sql(sql), args, fetch)

    def _run_pg(self, sql: str, args: Sequence[Any], fetch: bool) -> tuple[int, list[tuple]]:
        import psycopg  # the extra `site`: only a service on PostgreSQL needs it

        for attempt in (1, 2):
            conn = self._take()
            try:
                with conn.cursor() as cur:
                    cur.execute(sql, tuple(args))
                    rows = [tuple(r) for r in cur.fetchall()] if fetch else []
                    return cur.rowcount, rows
            except psycopg.OperationalError as e:
                if attempt == 2 or not conn.closed:
                    raise DxflowError(f"site database: {e}") from e
                log.warning("site database connection dropped (%s): connecting again", e)
            except psycopg.Error as e:
                raise DxflowError(f"site database: {e} (in: {sql.split()[0]} ...)") from e
            finally:
                self._give(conn)
        raise AssertionError("unreachable")

    def _take(self):
        """An idle connection of the pool, or a new one while fewer than :data:`PG_CONNECTIONS` are out."""
        import psycopg

        if not self._slots.acquire(timeout=PG_WAIT):
            raise DxflowError(f"site database: all {PG_CONNECTIONS} connections of this replica busy for "
                              f"{PG_WAIT:.0f} s")
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is not None and not conn.closed:
            return conn
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=10)
        except psycopg.Error as e:
            self._slots.release()
            raise DxflowError(f"cannot connect to the site database: {e}") from e

    def _give(self, conn) -> None:
        """Back to the pool (a closed one is dropped: the next take opens a new one)."""
        if not conn.closed:
            with self._lock:
                self._idle.append(conn)
        self._slots.release()

    # -- agents -----------------------------------------------------------------
    def enroll(self, cluster: str, job: str, node: str, user: str, uid: int, key: str,
               registration: dict | None = None) -> SiteAgent:
        """Record an agent the gateway has let in (its credential checked, the scheduler asked): a new
        row, or a new agent in place of an older one of the same name, in state ``starting``."""
        name = agent_name(cluster, job, node)
        reg = json.dumps(self._checked_registration(name, user, registration) if registration else {})
        now = time.time()
        self.execute(
            f"INSERT INTO site_agents ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'starting', '', '{{}}', 0, ?, 0, ?) "
            "ON CONFLICT (name) DO UPDATE SET cluster = excluded.cluster, job = excluded.job, node = excluded.node, "
            "owner = excluded.owner, uid = excluded.uid, gateway_key = excluded.gateway_key, "
            "registration = excluded.registration, state = 'starting', detail = '', node_info = '{}', "
            "metrics_at = 0, enrolled = excluded.enrolled, checked = 0, changed = excluded.changed",
            (name, cluster, job, node, user, uid, key, reg, now, now))
        agent = self.agent(name)
        assert agent is not None
        return agent

    def set_registration(self, name: str, registration: dict) -> None:
        """The agent's registration (port, pid, its public key ...), when it arrives after enrollment."""
        agent = self.agent(name)
        if agent is None:
            raise UsageError(f"no enrolled agent {name}")
        reg = self._checked_registration(name, agent.reg.user, registration)
        self.execute("UPDATE site_agents SET registration = ?, changed = ? WHERE name = ?",
                     (json.dumps(reg), time.time(), name))

    @staticmethod
    def _checked_registration(name: str, user: str, registration: dict) -> dict:
        """The registration as stored; UsageError if it names another agent or user than the one enrolled."""
        try:
            reg = Registration.from_dict(registration)
        except (ValueError, TypeError) as e:
            raise UsageError(f"agent {name}: bad registration: {e}") from e
        if reg.name != name or reg.user != user:
            raise UsageError(f"agent {name} of {user}: its registration names {reg.name} of {reg.user}")
        return asdict(reg)

    def agent(self, name: str) -> SiteAgent | None:
        row = self.query_one(f"SELECT {COLUMNS} FROM site_agents WHERE name = ?", (name,))
        return _agent(row) if row else None

    def agents(self, user: str | None = None, cluster: str | None = None, job: str | None = None,
               job_number: str | None = None) -> list[SiteAgent]:
        """Agents, optionally only one user's, one cluster's, one job's; ``job_number`` matches a job id
        and a PBS id of that number (``17`` is ``17`` and ``17.server``: qstat takes either)."""
        where, args = [], []
        for column, value in (("owner", user), ("cluster", cluster), ("job", job)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if job_number is not None:
            where.append("(job = ? OR job LIKE ?)")
            args += [job_number, job_number + ".%"]
        sql = f"SELECT {COLUMNS} FROM site_agents" + (" WHERE " + " AND ".join(where) if where else "") + \
            " ORDER BY name"
        found = [_agent(row) for row in self.query(sql, args)]
        if job_number is not None:  # LIKE's _ matches any character: keep exact matches only
            found = [a for a in found if a.reg.job == job_number or a.reg.job.split(".")[0] == job_number]
        return found

    def set_state(self, name: str, state: str, detail: str = "", node_info: dict | None = None) -> bool:
        """Set the agent's state; True when set. A gone agent stays gone (in the same statement: a check that
        ends after its agent was found gone must not make it ready again): only enrolling again brings the
        name back."""
        if state not in STATES:
            raise ValueError(f"unknown agent state {state!r}")
        now = time.time()
        info = json.dumps(node_info) if node_info is not None else None
        return self.execute(
            "UPDATE site_agents SET changed = CASE WHEN state = ? THEN changed ELSE ? END, state = ?, detail = ?, "
            "checked = ?, node_info = COALESCE(?, node_info), metrics_at = COALESCE(?, metrics_at) "
            "WHERE name = ? AND (state <> 'gone' OR ? = 'gone')",
            (state, now, state, detail, now, info, now if info is not None else None, name, state)) > 0

    def set_metrics(self, name: str, node_info: dict, at: float | None = None) -> None:
        self.execute("UPDATE site_agents SET node_info = ?, metrics_at = ? WHERE name = ?",
                     (json.dumps(node_info), time.time() if at is None else at, name))

    def delete(self, name: str) -> None:
        self.execute("DELETE FROM site_agents WHERE name = ?", (name,))


def _agent(row: tuple) -> SiteAgent:
    (name, cluster, job, node, owner, uid, gateway_key, reg, state, detail, info, metrics_at, enrolled, checked,
     changed) = row
    data = json.loads(reg)
    registration = Registration.from_dict(data) if data else _placeholder(cluster, job, node, owner)
    return SiteAgent(reg=registration, state=state, detail=detail, checked=checked, changed=changed,
                     node_info=json.loads(info), metrics_at=metrics_at, uid=int(uid), gateway_key=gateway_key,
                     enrolled=enrolled)


def _pg_sql(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (and a literal ``%`` doubled); none of our SQL has ``?`` in a string."""
    return re.sub(r"\?", "%s", sql.replace("%", "%%"))


def open_store(config: SiteServiceConfig) -> Store:
    """The store ``config`` names: its PostgreSQL database, or SQLite in its state_dir."""
    if config.database:
        return Store(config.database)
    path = Path(config.database_url)
    if not path.parent.is_dir():
        raise ConfigError(f"{path.parent} does not exist: run `dxflow site init` (as root) first")
    return Store(str(path))
