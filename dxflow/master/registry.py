"""The fleet kept in SQLite (``~/.dxflow/hosts/HOST/fleet.db``: each login node's master its own),
so a restarted master loses nothing.

An agent's node metrics (load, CPU, memory) carry the time they were read (``metrics_at``):
its answer says how old they are, and calls them fresh only while its agent is ready and they
are at most :data:`METRICS_FRESH` seconds old, so no one shows a dead node's last numbers as current.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dxflow.registration import Registration

STATES = ("starting", "ready", "lost", "incompatible", "gone")
METRICS_FRESH = 5.0  # seconds node metrics count as current (issue #9: `dxflow ls` shows nothing older as such)

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    name TEXT PRIMARY KEY,
    registration TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'starting',
    detail TEXT NOT NULL DEFAULT '',
    checked REAL NOT NULL DEFAULT 0,
    changed REAL NOT NULL DEFAULT 0,
    node_info TEXT NOT NULL DEFAULT '{}',
    metrics_at REAL NOT NULL DEFAULT 0
);
"""
COLUMNS = "name, registration, state, detail, checked, changed, node_info, metrics_at"
#: columns added since the first release, for a fleet.db an older master made
ADDED = {"metrics_at": "REAL NOT NULL DEFAULT 0"}


@dataclass
class Agent:
    reg: Registration
    state: str = "starting"
    detail: str = ""
    checked: float = 0.0
    changed: float = 0.0
    node_info: dict = field(default_factory=dict)
    metrics_at: float = 0.0

    @property
    def name(self) -> str:
        return self.reg.name

    def metrics_age(self, now: float | None = None) -> float | None:
        """Seconds since the node metrics were read; None when there are none."""
        if not self.metrics_at:
            return None
        return max(0.0, (time.time() if now is None else now) - self.metrics_at)

    def to_dict(self) -> dict:
        r = self.reg
        age = self.metrics_age()
        return {"job": r.job, "node": r.node, "cluster": r.cluster, "scheduler": r.scheduler,
                "user": r.user, "state": self.state, "detail": self.detail, "port": r.port,
                "pid": r.pid, "address": r.address, "started": r.started, "version": r.version,
                "api_version": r.api_version, "checked": self.checked, "load": self.node_info.get("load"),
                "cpu_percent": self.node_info.get("cpu_percent"),
                "memory_total": self.node_info.get("memory_total"),
                "memory_available": self.node_info.get("memory_available"),
                "metrics_at": self.metrics_at or None,
                "metrics_age": None if age is None else round(age, 1),
                "metrics_fresh": self.state == "ready" and age is not None and age <= METRICS_FRESH}


class Registry:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(agents)")}
        for column, kind in ADDED.items():
            if column not in have:
                self._db.execute(f"ALTER TABLE agents ADD COLUMN {column} {kind}")

    def _row(self, row: tuple) -> Agent:
        name, reg, state, detail, checked, changed, info, metrics_at = row
        return Agent(Registration.from_dict(json.loads(reg)), state, detail, checked, changed, json.loads(info),
                     metrics_at)

    def all(self) -> list[Agent]:
        with self._lock:
            rows = self._db.execute(f"SELECT {COLUMNS} FROM agents ORDER BY name").fetchall()
        return [self._row(r) for r in rows]

    def of_job(self, job: str) -> list[Agent]:
        """One job's agents, without reading the whole fleet (the relay asks on every request)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {COLUMNS} FROM agents WHERE json_extract(registration, '$.job') = ? "
                                    "ORDER BY name", (job,)).fetchall()
        return [self._row(r) for r in rows]

    def get(self, name: str) -> Agent | None:
        with self._lock:
            row = self._db.execute(f"SELECT {COLUMNS} FROM agents WHERE name = ?", (name,)).fetchone()
        return self._row(row) if row else None

    def upsert(self, reg: Registration) -> bool:
        """Add or replace a registration; True when it is new (or a different agent than before)."""
        old = self.get(reg.name)
        if old and old.reg.pid == reg.pid and old.reg.public_key == reg.public_key:
            return False
        now = time.time()
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO agents (name, registration, state, detail, checked, changed, node_info) "
                "VALUES (?, ?, 'starting', '', 0, ?, '{}')", (reg.name, json.dumps(asdict(reg)), now))
        return True

    def set_state(self, name: str, state: str, detail: str = "", node_info: dict | None = None) -> bool:
        """Set the agent's state; True when set. A gone agent stays gone (checked and set at once: a check
        that ends after its agent was found gone must not make it ready again): only a new registration
        (:meth:`upsert`) brings the name back."""
        assert state in STATES, state
        now = time.time()
        with self._lock:
            cur = self._db.execute("SELECT state FROM agents WHERE name = ?", (name,)).fetchone()
            if not cur or (cur[0] == "gone" and state != "gone"):
                return False
            changed = now if cur[0] != state else None
            self._db.execute(
                "UPDATE agents SET state = ?, detail = ?, checked = ?, changed = COALESCE(?, changed), "
                "node_info = COALESCE(?, node_info), metrics_at = COALESCE(?, metrics_at) WHERE name = ?",
                (state, detail, now, changed, json.dumps(node_info) if node_info is not None else None,
                 now if node_info is not None else None, name))
        return True

    def set_metrics(self, name: str, node_info: dict, at: float | None = None) -> None:
        """New node metrics of an agent (read at ``at``, default now), its state unchanged."""
        with self._lock:
            self._db.execute("UPDATE agents SET node_info = ?, metrics_at = ? WHERE name = ?",
                             (json.dumps(node_info), time.time() if at is None else at, name))

    def delete(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM agents WHERE name = ?", (name,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
