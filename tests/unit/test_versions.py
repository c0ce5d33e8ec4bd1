"""What counts as an older master and an incompatible agent (issue #10: upgrades while jobs run)."""

from __future__ import annotations

import pytest

from dxflow import API_VERSION, __version__
from dxflow.master.client import older, release
from dxflow.registration import Registration


@pytest.mark.parametrize("theirs, ours, expected", [
    ("0.1.0", "0.2.0", True), ("0.9.1", "0.10.0", True), ("0.2.0", "0.2.0", False), ("0.10.0", "0.9.1", False),
    ("0.2.0rc1", "0.2.0", False),   # pre-release tags are not compared: no restart loop between the two
    ("", "0.1.0", True),            # a master that does not say its version is older than any
    ("1.0", "1.0.0", True),         # (1, 0) < (1, 0, 0): harmless, one restart
])
def test_a_master_is_older_by_its_release_numbers(theirs, ours, expected):
    assert older(theirs, ours) is expected


def test_release_numbers_of_this_version():
    assert release(__version__) and all(isinstance(n, int) for n in release(__version__))


def _reg(api: int) -> Registration:
    return Registration(cluster="c", scheduler="slurm", job="1", node="n1", address="n1", port=1, pid=2, user="u",
                        started="2026-01-01T00:00:00+00:00", public_key="", api_version=api, version="0.0.1")


def test_an_agent_of_this_api_is_compatible_and_one_of_another_says_why_not():
    assert _reg(API_VERSION).incompatibility() == ""
    why = _reg(API_VERSION + 1).incompatibility()
    assert f"agent API {API_VERSION + 1}" in why and "0.0.1" in why and __version__ in why
