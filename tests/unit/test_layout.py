"""``~/.dxflow`` as :mod:`dxflow.layout` defines it: shared files once, per-host files per login node,
folders only the user enters, and a ``~/.dxflow`` that is not the user's own refused."""

from __future__ import annotations

import os
import socket

import pytest

from dxflow import layout
from dxflow.errors import ConfigError
from dxflow.layout import UserLayout, this_host


def test_shared_files_are_one_per_home_host_files_one_per_host(tmp_path):
    one, two = UserLayout.of(tmp_path, "login1"), UserLayout.of(tmp_path, "login2")
    assert one.base == tmp_path / ".dxflow"
    for name in ("key", "public_key", "fleet_dir", "logs_dir", "run_dir", "forward_dir", "user_config",
                 "reports_dir", "hook_log"):
        assert getattr(one, name) == getattr(two, name), name
    for name in ("master_sock", "console_sock", "master_lock", "master_pid", "master_log", "fleet_db",
                 "console_state", "ssh_dir"):
        a, b = getattr(one, name), getattr(two, name)
        assert a != b and a.is_relative_to(one.host_dir) and b.is_relative_to(two.host_dir), name
    assert one.host_dir == tmp_path / ".dxflow" / "hosts" / "login1"


def test_ensure_makes_private_folders_and_an_agent_makes_no_host_folder(tmp_path):
    lay = UserLayout.of(tmp_path, "n1")
    lay.ensure_shared()
    assert not (lay.base / "hosts").exists()  # a compute node's agent: nothing per host
    lay.ensure()
    for folder in (lay.base, lay.fleet_dir, lay.logs_dir, lay.host_dir):
        assert folder.stat().st_mode & 0o777 == layout.FOLDER_MODE, folder


def test_a_dxflow_folder_open_to_others_is_closed(tmp_path):
    base = tmp_path / ".dxflow"
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)
    UserLayout(base, "login1").ensure()
    assert base.stat().st_mode & 0o777 == 0o700


def test_a_symlinked_dxflow_folder_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / ".dxflow").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not a folder owned by you"):
        UserLayout.of(tmp_path, "login1").ensure()


def test_host_names_become_one_safe_folder_name(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "login2.cluster.example")
    assert this_host() == "login2.cluster.example"
    for hostile in ("../../etc", "a/b", ".."):
        monkeypatch.setattr(socket, "gethostname", lambda h=hostile: h)
        name = this_host()
        assert "/" not in name and name not in ("", ".", "..") and not name.startswith("."), name
