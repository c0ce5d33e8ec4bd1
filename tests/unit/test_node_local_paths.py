"""Node-local roots (/tmp, /local, the job's TMPDIR) in :class:`dxflow.agent.paths.Roots`: shared by every
user of a node, so only the job's user's own names are served below them.

The test runs as root: files it makes belong to root, "another user" here; the job's user is uid
``ME``, and what is theirs is chowned to it. The lab test (tests/lab/test_node_local.py) has bob
attack alice for real.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dxflow.agent.paths import NODE_LOCAL, Roots, expand
from dxflow.errors import AccessDenied

ME = 4242

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@pytest.fixture
def tree(tmp_path):
    """``shared`` (a /tmp: mode 1777, root's), ``home`` (mine); in shared: my file, my folder, root's
    file, root's folder, root's symlink to my home file, my symlink to it."""
    shared, home = tmp_path / "shared", tmp_path / "home"
    shared.mkdir(mode=0o1777)
    home.mkdir()
    (home / "precious").write_text("mine")
    (shared / "mine").write_text("mine")
    (shared / "mydir").mkdir()
    (shared / "theirs").write_text("theirs")
    (shared / "theirdir").mkdir()
    (shared / "theirdir" / "inner").write_text("theirs")
    (shared / "planted").symlink_to(home / "precious")
    (shared / "mylink").symlink_to(home / "precious")
    for p in (home, home / "precious", shared / "mine", shared / "mydir", shared / "mylink"):
        os.lchown(p, ME, ME)
    return shared, home


def roots_of(shared: Path, home: Path, **kw) -> Roots:
    return Roots("", home, [], [str(shared)], uid=ME, **kw)


def test_my_own_names_below_a_node_local_root_are_served(tree):
    shared, home = tree
    r = roots_of(shared, home)
    assert r.resolve(str(shared / "mine")) == shared / "mine"
    assert r.resolve(str(shared / "mydir" / "new.dat")) == shared / "mydir" / "new.dat"  # to be made
    assert r.resolve(str(shared / "new.dat")) == shared / "new.dat"
    assert r.resolve(str(shared / "mylink")) == home / "precious"  # my own symlink is followed
    assert [x.name for x in r.all()] == ["home", NODE_LOCAL]


@pytest.mark.parametrize("name", ["theirs", "theirdir", "theirdir/inner", "theirdir/new.dat", "planted",
                                  "planted/x"])
def test_another_users_name_below_a_node_local_root_is_refused(tree, name):
    shared, home = tree
    with pytest.raises(AccessDenied, match="belongs to another user"):
        roots_of(shared, home).resolve(str(shared / name))


def test_another_users_symlink_is_refused_even_when_not_followed(tree):
    shared, home = tree
    with pytest.raises(AccessDenied, match="belongs to another user"):
        roots_of(shared, home).resolve(str(shared / "planted"), follow=False)


def test_my_symlink_into_the_shared_root_reaches_only_my_own(tree):
    shared, home = tree
    (home / "to-theirs").symlink_to(shared / "theirs")
    os.lchown(home / "to-theirs", ME, ME)
    with pytest.raises(AccessDenied, match="belongs to another user"):
        roots_of(shared, home).resolve("to-theirs")


def test_a_listing_of_a_node_local_folder_shows_only_my_entries(tree):
    shared, home = tree
    r = roots_of(shared, home)
    shown = sorted(e.name for e in os.scandir(shared) if r.visible(shared, e.stat(follow_symlinks=False)))
    assert shown == ["mine", "mydir", "mylink"]
    assert all(r.visible(home, e.stat(follow_symlinks=False)) for e in os.scandir(home))


def test_a_home_that_lies_below_tmp_is_served_as_any_home(tmp_path):
    shared = tmp_path / "shared"
    home = shared / "root-made" / "home"  # its parents are root's, as pytest's tmp folders are
    home.mkdir(parents=True)
    (home / "f").write_text("x")
    os.chown(home, ME, ME)
    (shared / "root-made" / "other").write_text("theirs")  # beside the home, not on the way to it
    r = roots_of(shared, home)
    assert r.resolve("f") == home / "f"
    with pytest.raises(AccessDenied, match="belongs to another user"):
        r.resolve(str(shared / "root-made" / "other"))


def test_tmpdir_is_the_jobs_and_a_root_naming_it_is_skipped_while_unknown(tmp_path):
    job_tmp = tmp_path / "job-tmp"
    job_tmp.mkdir()
    seen = {"tmpdir": ""}
    r = Roots("", tmp_path, [], ["$TMPDIR", "${TMPDIR}/x"], uid=ME, job_tmpdir=lambda: seen["tmpdir"])
    assert [x.name for x in r.all()] == ["home"]
    seen["tmpdir"] = str(job_tmp)
    assert [(x.name, x.path) for x in r.all()] == [("home", str(tmp_path)), (NODE_LOCAL, str(job_tmp))]
    assert expand("/scratch/$USER/$TMPDIR", "alice", "7") == ""
    assert expand("/scratch/$USER/${JOB}", "alice", "7") == "/scratch/alice/7"


def test_a_work_dir_that_is_the_shared_root_itself_gets_no_pass(tree):
    """A job run with ``--chdir=/tmp``: its work dir is /tmp, still shared by every user."""
    shared, home = tree
    r = Roots(str(shared), home, [], [str(shared)], uid=ME)
    assert r.resolve("mine") == shared / "mine"
    with pytest.raises(AccessDenied, match="belongs to another user"):
        r.resolve("theirs")
    with pytest.raises(AccessDenied, match="belongs to another user"):
        r.resolve("planted")
    assert not r.visible(shared, os.lstat(shared / "theirs"))
