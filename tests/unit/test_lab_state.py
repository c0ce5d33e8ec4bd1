"""The lab state file: round trip, damaged files, forward compatibility."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from dxflow.errors import ConfigError
from dxflow.lab.state import LabState, load, save


def test_missing_is_none(tmp_path: Path) -> None:
    assert load(tmp_path / "state.json") is None


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "lab" / "state.json"
    state = LabState(node_count=2, nodes=["n1", "n2"], users=["alice"], users_created=["alice"],
                     munged_started=True, pids={"slurmctld": 42}, backups={"/etc/slurm/slurm.conf": "/b"})
    save(state, path)
    again = load(path)
    assert again == state
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert not path.with_name("state.json.tmp").exists()


def test_unknown_keys_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"node_count": 3, "from_a_newer_dxflow": true}')
    assert load(path).node_count == 3


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"node_count": 1, "nodes": 5}xx'])
def test_damaged_file_is_a_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match="lab down"):
        load(path)


def test_remember_adds_once() -> None:
    state = LabState()
    state.remember("users_created", "alice")
    state.remember("users_created", "alice")
    assert state.users_created == ["alice"]


def test_defaults_are_not_shared() -> None:
    a, b = LabState(), LabState()
    a.pids["x"] = 1
    assert b.pids == {}
