"""The roots check on its own: what resolves, what is refused and why."""

from __future__ import annotations

import os

import pytest

from dxflow.agent.paths import Roots, check_text, expand
from dxflow.errors import AccessDenied, UsageError


@pytest.fixture
def tree(tmp_path):
    home = tmp_path / "home" / "alice"
    work = home / "job"
    scratch = tmp_path / "scratch" / "alice"
    outside = tmp_path / "outside"
    for d in (work, scratch, outside, tmp_path / "home" / "bob"):
        d.mkdir(parents=True)
    (outside / "sentinel").write_text("keep")
    (home / "etc").symlink_to(outside)
    (home / "inside-link").symlink_to(scratch)
    (home / ".dxflow").mkdir()
    return tmp_path, Roots(work, home, [str(scratch)])


def test_relative_is_from_work_dir(tree):
    tmp, roots = tree
    assert roots.resolve("a/b.txt") == (tmp / "home/alice/job/a/b.txt").resolve()
    assert roots.resolve("") == (tmp / "home/alice/job").resolve()
    assert roots.resolve(None) == (tmp / "home/alice/job").resolve()


def test_dotdot_inside_a_root_is_fine(tree):
    tmp, roots = tree
    assert roots.resolve("../x") == (tmp / "home/alice/x").resolve()


@pytest.mark.parametrize("path", ["../..", "../../bob/x", "../../../outside/sentinel", "a/../../../../outside"])
def test_dotdot_out_is_refused(tree, path):
    _, roots = tree
    with pytest.raises(AccessDenied, match="outside the folders"):
        roots.resolve(path)


def test_absolute(tree):
    tmp, roots = tree
    assert roots.resolve(str(tmp / "scratch/alice/f")) == (tmp / "scratch/alice/f").resolve()
    for p in ("/etc/passwd", "/", str(tmp / "outside"), str(tmp / "home/bob")):
        with pytest.raises(AccessDenied):
            roots.resolve(p)


def test_symlinks(tree):
    tmp, roots = tree
    assert roots.resolve("../inside-link/f") == (tmp / "scratch/alice/f").resolve()
    for p in ("../etc", "../etc/sentinel", "../etc/new"):
        with pytest.raises(AccessDenied, match="resolves to"):
            roots.resolve(p)
    # the link itself (delete, move) lies in the home: allowed without following it
    assert roots.resolve("../etc", follow=False) == (tmp / "home/alice").resolve() / "etc"
    with pytest.raises(AccessDenied):  # but not through it
        roots.resolve("../etc/sentinel", follow=False)


def test_private_folder(tree):
    _, roots = tree
    for p in ("../.dxflow", "../.dxflow/id_rsa"):
        with pytest.raises(AccessDenied, match="dxflow's own folder"):
            roots.resolve(p)


def test_bad_text():
    with pytest.raises(UsageError, match="NUL"):
        check_text("a\x00b")
    with pytest.raises(UsageError, match="300 bytes"):
        check_text("x" * 300)
    with pytest.raises(UsageError, match="limit is 4096"):
        check_text("/".join(["y" * 200] * 30))
    check_text("a/" + "é" * 127)  # 254 bytes: fine


def test_roots_listing_and_expansion(tmp_path):
    home = tmp_path / "h"
    home.mkdir()
    (tmp_path / "s" / "alice" / "42").mkdir(parents=True)
    roots = Roots("", home, [expand(str(tmp_path / "s/$USER/${JOB}"), "alice", "42"), str(tmp_path / "missing")])
    assert [(r.name, r.path) for r in roots.all()] == [
        ("home", os.path.realpath(home)), ("scratch", os.path.realpath(tmp_path / "s/alice/42"))]
    assert roots.resolve("f") == home.resolve() / "f"  # no work dir: relative to the home
