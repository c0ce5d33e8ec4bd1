"""``MasterClient.stop`` decides by the master's lock, never by its pid file alone."""

from __future__ import annotations

import subprocess
import sys
import time

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


def test_stop_without_a_master_leaves_the_pid_files_process_alone(tmp_path):
    decoy = sleeper()
    try:
        (tmp_path / "master.pid").write_text(f"{decoy.pid}\n")  # stale: a reused pid
        (tmp_path / "master.lock").touch()
        assert MasterClient(tmp_path).stop() is False
        time.sleep(0.2)
        assert decoy.poll() is None
        assert not (tmp_path / "master.pid").exists()  # the stale pid file is removed
    finally:
        decoy.kill()
        decoy.wait()


def test_stop_signals_the_lock_holder_not_the_pid_file(tmp_path):
    decoy = sleeper()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "master.lock")], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        (tmp_path / "master.pid").write_text(f"{decoy.pid}\n")
        client = MasterClient(tmp_path)
        assert client.lock_held() and lock_holders(tmp_path / "master.lock") == [holder.pid]
        assert client.stop(timeout=5) is True
        assert holder.wait(5) is not None and not client.lock_held()
        assert decoy.poll() is None
    finally:
        for p in (decoy, holder):
            p.kill()
            p.wait()
