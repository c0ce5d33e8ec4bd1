"""``MasterClient.stop`` decides by this host's master lock, never by a pid file alone, never by
another login node's files; and it stops a master of the old layout (files directly in ~/.dxflow)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from dxflow.layout import UserLayout
from dxflow.master.client import MasterClient, lock_holders

HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(60)
"""


def sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def holding(lock: Path) -> subprocess.Popen:
    """A process that holds ``lock`` as a master does (flock, for its lifetime)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def end(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.kill()
        p.wait()


def test_stop_without_a_master_leaves_the_pid_files_process_alone(tmp_path):
    decoy = sleeper()
    try:
        client = MasterClient(tmp_path, host="login1")
        client.layout.master_pid.write_text(f"{decoy.pid}\n")  # stale: a reused pid
        client.layout.master_lock.touch()
        assert client.stop() is False
        time.sleep(0.2)
        assert decoy.poll() is None
        assert not client.layout.master_pid.exists()  # the stale pid file is removed
    finally:
        end(decoy)


def test_stop_signals_the_lock_holder_not_the_pid_file(tmp_path):
    decoy = sleeper()
    client = MasterClient(tmp_path, host="login1")
    holder = holding(client.layout.master_lock)
    try:
        client.layout.master_pid.write_text(f"{decoy.pid}\n")
        assert client.lock_held() and lock_holders(client.layout.master_lock) == [holder.pid]
        assert client.stop(timeout=5) is True
        assert holder.wait(5) is not None and not client.lock_held()
        assert decoy.poll() is None
    finally:
        end(decoy, holder)


def test_each_login_node_has_its_own_master_files(tmp_path):
    one, two = MasterClient(tmp_path, host="login1"), MasterClient(tmp_path, host="login2")
    assert one.sock != two.sock and one.layout.master_lock != two.layout.master_lock
    assert one.layout.fleet_db != two.layout.fleet_db and one.layout.console_state != two.layout.console_state
    assert one.layout.fleet_dir == two.layout.fleet_dir  # agents register once, for every login node
    assert (tmp_path / "hosts" / "login1").stat().st_mode & 0o777 == 0o700


def test_stop_leaves_another_login_nodes_master_alone(tmp_path):
    """The lock of login2's master is not login1's: `master stop` on login1 signals nobody."""
    other = holding(UserLayout(tmp_path, "login2").ensure().master_lock)
    try:
        assert MasterClient(tmp_path, host="login1").stop(timeout=2) is False
        time.sleep(0.2)
        assert other.poll() is None
    finally:
        end(other)


def test_stop_ends_a_master_of_the_old_layout_and_keeps_its_port(tmp_path):
    """A master of an older dxflow holds ~/.dxflow/master.lock: stopped, its console port moved to
    this host's folder, its sockets and pid file removed."""
    (tmp_path / "console.json").write_text(json.dumps({"port": 41751}))
    for name in ("master.sock", "console.sock", "master.pid"):
        (tmp_path / name).touch()
    old = holding(tmp_path / "master.lock")
    try:
        client = MasterClient(tmp_path, host="login1")
        assert client.stop(timeout=5) is True
        assert old.wait(5) is not None
        assert json.loads(client.layout.console_state.read_text())["port"] == 41751
        assert not [p.name for p in tmp_path.iterdir() if p.name not in ("hosts", "fleet", "logs")]
    finally:
        end(old)
