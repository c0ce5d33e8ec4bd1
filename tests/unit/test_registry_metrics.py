"""Node metrics in the registry carry their age: fresh only while ready and at most 5 s old."""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict

from dxflow.master.registry import METRICS_FRESH, Registry
from dxflow.registration import Registration

REG = Registration(cluster="c", scheduler="slurm", job="7", node="n2", address="10.0.0.2", port=4242, pid=99,
                   user="alice", started="2026-01-01T00:00:00+00:00", public_key="PEM", api_version=1,
                   version="1")
INFO = {"load": [0.5, 0.4, 0.3], "cpu_percent": 12.0, "memory_total": 100, "memory_available": 40}


def test_metrics_are_fresh_only_while_ready_and_recent(tmp_path):
    reg = Registry(tmp_path / "fleet.db")
    reg.upsert(REG)
    a = reg.get(REG.name).to_dict()
    assert a["metrics_age"] is None and a["metrics_fresh"] is False  # never read
    reg.set_state(REG.name, "ready", node_info=INFO)
    a = reg.get(REG.name).to_dict()
    assert a["metrics_fresh"] is True and a["metrics_age"] <= METRICS_FRESH and a["load"] == INFO["load"]
    reg.set_metrics(REG.name, INFO, at=time.time() - 2 * METRICS_FRESH)
    a = reg.get(REG.name).to_dict()
    assert a["metrics_fresh"] is False and a["metrics_age"] >= 2 * METRICS_FRESH - 1
    reg.set_metrics(REG.name, INFO)
    reg.set_state(REG.name, "lost", "agent stopped")  # no new reading: the old one is not the node's present
    a = reg.get(REG.name).to_dict()
    assert a["state"] == "lost" and a["metrics_fresh"] is False and a["load"] == INFO["load"]


def test_a_fleet_db_of_an_older_master_gains_the_column(tmp_path):
    db = sqlite3.connect(tmp_path / "fleet.db")
    db.executescript("""CREATE TABLE agents (name TEXT PRIMARY KEY, registration TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'starting', detail TEXT NOT NULL DEFAULT '', checked REAL NOT NULL DEFAULT 0,
        changed REAL NOT NULL DEFAULT 0, node_info TEXT NOT NULL DEFAULT '{}');""")
    db.execute("INSERT INTO agents (name, registration, state, node_info) VALUES (?, ?, 'ready', ?)",
               (REG.name, json.dumps(asdict(REG)), json.dumps(INFO)))
    db.commit()
    db.close()
    a = Registry(tmp_path / "fleet.db").get(REG.name)
    assert a is not None and a.state == "ready" and a.metrics_at == 0.0
    assert a.to_dict()["metrics_fresh"] is False  # a reading of unknown age is not current
