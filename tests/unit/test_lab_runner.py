"""The lab's one command runner, its errors, and the small process helpers."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dxflow.errors import DxflowError, SchedulerError
from dxflow.lab import procs
from dxflow.lab.runner import LabError, run, succeeds


def test_failure_carries_argv_code_and_stderr() -> None:
    with pytest.raises(LabError) as info:
        run([sys.executable, "-c", "import sys; sys.stderr.write('boom\\n'); sys.exit(3)"], what="testing")
    e = info.value
    assert isinstance(e, DxflowError)
    assert e.returncode == 3 and e.stderr == "boom\n" and e.argv[0] == sys.executable
    assert "testing failed" in str(e) and "boom" in str(e) and "exit code 3" in str(e)


def test_scheduler_error_for_slurm_commands() -> None:
    with pytest.raises(SchedulerError) as info:
        run([sys.executable, "-c", "raise SystemExit(1)"], error=SchedulerError)
    assert info.value.returncode == 1


def test_missing_program() -> None:
    with pytest.raises(LabError, match="not installed"):
        run(["/nonexistent/dxflow-lab-tool"])
    assert succeeds(["/nonexistent/dxflow-lab-tool"]) is False


def test_hostile_argument_is_one_argv_item() -> None:
    hostile = "a'; echo foo\nb $(id)"
    out = run([sys.executable, "-c", "import sys; print(repr(sys.argv[1]))", hostile]).stdout
    assert out.strip() == repr(hostile)


def test_timeout_is_an_error() -> None:
    with pytest.raises(LabError, match="did not finish"):
        run([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.3)


def test_pidfile_and_liveness(tmp_path: Path) -> None:
    pidfile = tmp_path / "x.pid"
    assert procs.read_pidfile(pidfile) is None
    pidfile.write_text("garbage\n")
    assert procs.read_pidfile(pidfile) is None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # until the child has exec'd, its command line is this process's, and empty during the exec itself
        # (seen on a loaded CI machine): what a pid file's reader sees of a daemon still starting
        deadline = time.monotonic() + 10
        while "time.sleep(30)" not in " ".join(procs.cmdline(child.pid)) and time.monotonic() < deadline:
            time.sleep(0.01)
        pidfile.write_text(f"{child.pid}\n")
        assert procs.read_pidfile(pidfile) == child.pid
        assert procs.alive(child.pid)
        assert procs.daemon_pid(pidfile, os.path.basename(sys.executable)[:6]) == child.pid
        assert procs.daemon_pid(pidfile, "slurmctld") is None  # a reused pid is not the daemon
        assert procs.terminate([child.pid], timeout=5) == []
    finally:
        child.kill()
        child.wait()
    assert not procs.alive(child.pid)
