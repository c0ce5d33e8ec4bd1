"""Guards of `lab up` / `lab down` that run before anything is touched, and the status table."""

from __future__ import annotations

import pytest

from dxflow.errors import UsageError
from dxflow.lab import cluster


def test_not_root_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 1000)
    with pytest.raises(UsageError, match="root"):
        cluster.up(2)
    with pytest.raises(UsageError, match="root"):
        cluster.down()


@pytest.mark.parametrize("count", [0, -1, 65])
def test_node_count_bounds(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    monkeypatch.setattr(cluster.os, "geteuid", lambda: 0)
    monkeypatch.setattr(cluster.packages, "ensure_packages", lambda **_: pytest.fail("must check first"))
    with pytest.raises(UsageError, match="--nodes"):
        cluster.up(count)


def test_status_table() -> None:
    info = {
        "state": "up", "cluster": "dxlab", "login": {"name": "dxlab-login", "addr": "10.77.0.1"},
        "slurm_version": "22.05.8", "daemons": {"munged": True, "slurmctld": True},
        "nodes": [{"name": "n1", "addr": "10.77.0.11", "slurmd": True, "sshd": False, "slurm_state": "idle"}],
        "users": [{"name": "alice", "exists": True, "created_by_lab": True}],
    }
    text = cluster.status_table(info)
    assert text.splitlines()[0].startswith("lab: up")
    assert "n1     10.77.0.11   running  stopped  idle" in text
    assert "users: alice" in text
