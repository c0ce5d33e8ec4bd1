"""Package checks and the `dxflow lab` command line."""

from __future__ import annotations

import pytest

from dxflow.cli import build_parser
from dxflow.errors import UsageError
from dxflow.lab import packages


def test_parse_dpkg_status() -> None:
    out = "munge ii \nslurm-wlm rc \nlibfoo:amd64 ii \niproute2 un \n"
    assert packages.parse_dpkg_status(out) == {"munge", "libfoo"}


def test_no_install_names_exactly_the_missing_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packages, "missing_packages", lambda pkgs=packages.REQUIRED_PACKAGES: ["munge", "util-linux"])
    with pytest.raises(UsageError) as info:
        packages.ensure_packages(install=False)
    assert "missing packages: munge util-linux;" in str(info.value)


def test_nothing_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packages, "missing_packages", lambda pkgs=packages.REQUIRED_PACKAGES: [])
    assert packages.ensure_packages(install=False) == []


def test_required_packages() -> None:
    assert set(packages.REQUIRED_PACKAGES) == {"slurm-wlm", "munge", "openssh-server", "iproute2",
                                               "python3-venv", "util-linux"}


@pytest.mark.parametrize("argv,expected", [
    (["lab", "up"], {"action": "up", "nodes": 2, "json": False, "no_install": False}),
    (["lab", "up", "--nodes", "3", "--json", "--no-install"], {"action": "up", "nodes": 3, "json": True,
                                                               "no_install": True}),
    (["lab", "down"], {"action": "down"}),
    (["lab", "status", "--json"], {"action": "status", "json": True}),
])
def test_lab_parser(argv: list[str], expected: dict) -> None:
    args = build_parser().parse_args(argv)
    for key, value in expected.items():
        assert getattr(args, key) == value
    assert callable(args.func)


def test_lab_needs_an_action() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["lab"])
