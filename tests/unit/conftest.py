"""Fixtures of the files API's tests: a file tree with traps, and alice's agent serving it.

The seams every tier shares (scheduler, SSH, the agent's state) are faked in ``tests/conftest.py``."""

from __future__ import annotations

import pytest


@pytest.fixture
def tree(tmp_path):
    home = tmp_path / "home" / "alice"
    work = home / "job"
    for d in (work, tmp_path / "scratch" / "alice", tmp_path / "outside", tmp_path / "home" / "bob"):
        d.mkdir(parents=True)
    (tmp_path / "outside" / "sentinel").write_text("keep")
    (tmp_path / "home" / "bob" / "secret").write_text("bob's")
    (home / "etc").symlink_to(tmp_path / "outside")
    (home / "passwd").symlink_to(tmp_path / "outside" / "sentinel")
    (home / ".dxflow").mkdir()
    (home / ".dxflow" / "id_rsa").write_text("key")
    return tmp_path


@pytest.fixture
def client(tree, make_agent):
    """alice's agent (tests/conftest.py) serving :func:`tree`, every request with her token."""
    home = tree / "home" / "alice"
    c, _, headers = make_agent({"FILE_SCRATCH_ROOTS": [str(tree / "scratch" / "$USER")]}, cluster="c",
                               user="alice", home=home, work_dir=str(home / "job"))
    c.environ_base["HTTP_AUTHORIZATION"] = headers["Authorization"]
    return c
