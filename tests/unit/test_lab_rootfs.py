"""The cached root file system per Slurm generation (dxflow/lab/rootfs.py): reuse, and rebuild of a half one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from dxflow.errors import UsageError
from dxflow.lab import rootfs
from dxflow.lab.runner import LabError


def test_generations_name_their_debian_suite():
    assert {g: rootfs.GENERATIONS[g].suite for g in rootfs.GENERATIONS} == {
        "22.05": "bookworm", "24.11": "trixie", "26.05": "sid"}
    assert all(g.version.startswith(g.name + ".") and g.source for g in rootfs.GENERATIONS.values())


def test_an_unknown_generation_is_refused_with_the_known_ones():
    with pytest.raises(UsageError, match=r"unknown Slurm generation '23\.02'.*22\.05, 24\.11, 26\.05"):
        rootfs.generation("23.02")


def marked(root: Path, packages: object) -> None:
    root.mkdir(parents=True)
    (root / rootfs.MARKER).write_text(json.dumps({"generation": "24.11", "suite": "trixie", "packages": packages}))


def test_a_root_with_its_marker_is_reused_without_building(tmp_path):
    marked(tmp_path / "24.11", {p: "1" for p in rootfs.PACKAGES} | {"slurmd": "24.11.5-4"})
    # a mirror nobody answers on: reaching mmdebstrap would fail
    assert rootfs.ensure("24.11", cache=tmp_path, mirror="http://127.0.0.1:9/debian") == tmp_path / "24.11"


def test_a_marker_without_package_versions_is_no_marker(tmp_path):
    marked(tmp_path / "24.11", "yes")
    assert not rootfs.is_complete(tmp_path / "24.11")
    (tmp_path / "24.11" / rootfs.MARKER).write_text("{half")
    assert not rootfs.is_complete(tmp_path / "24.11")


def test_a_root_built_from_an_older_package_list_is_not_complete(tmp_path):
    """A root cached before curl joined PACKAGES is built again: the lab tests in it call curl."""
    marked(tmp_path / "24.11", {p: "1" for p in rootfs.PACKAGES if p != "curl"})
    assert not rootfs.is_complete(tmp_path / "24.11")
    assert rootfs.is_complete(tmp_path / "24.11", tuple(p for p in rootfs.PACKAGES if p != "curl"))


def test_inside_root_is_told_by_the_marker_at_the_top(tmp_path):
    assert not rootfs.inside_root(tmp_path)
    marked(tmp_path / "r", {})
    assert rootfs.inside_root(tmp_path / "r")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mmdebstrap") is None, reason="needs root and mmdebstrap")
def test_a_half_built_root_is_removed_and_built_again(tmp_path):
    half = tmp_path / "26.05"
    (half / "etc").mkdir(parents=True)
    (half / "etc" / "left-by-an-interrupted-build").write_text("")
    with pytest.raises(LabError, match="building the Slurm 26.05 root file system"):
        rootfs.ensure("26.05", cache=tmp_path, mirror="http://127.0.0.1:9/debian", timeout=120)
    assert not (half / "etc" / "left-by-an-interrupted-build").exists()  # removed before building again
    assert not rootfs.is_complete(half)


def test_installed_versions_read_a_real_dpkg_database():
    """This host's own dpkg database (the lab's host is Debian): python3 is installed, a made-up name is not."""
    versions = rootfs.installed_versions(Path("/"), ("python3", "no-such-package-dxflow"))
    assert set(versions) == {"python3"} and versions["python3"][0].isdigit()


@pytest.mark.parametrize("name", sorted(rootfs.GENERATIONS))
def test_a_cached_root_holds_its_generations_slurm(name):
    """Where the cache was built on this machine: the marker's slurmd is that generation's."""
    root = rootfs.CACHE / name
    if not rootfs.is_complete(root):
        pytest.skip(f"{root} not built here (python -m dxflow.lab.capture builds it)")
    marker = rootfs.read_marker(root)
    assert marker is not None and marker["packages"]["slurmd"].startswith(name + ".")
    assert marker["packages"] == rootfs.installed_versions(root, tuple(marker["packages"]))
