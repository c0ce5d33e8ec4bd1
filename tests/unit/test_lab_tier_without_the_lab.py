"""The lab tier without a lab: one line says why, as a skip in a developer's run and as a failure in the
README's test command (``DXFLOW_REQUIRE_LAB=1``, set by scripts/test.sh).

A tiny lab test, next to a copy of the real ``tests/lab/conftest.py``, run by pytest in a subprocess;
the lab is "down" because its state file is looked for where there is none (``DXFLOW_LAB_STATE``), so
the real lab is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = '''
def test_one():
    pass


def test_two():
    pass
'''
WHY = "the lab is not up (no /nonexistent/state.json): run `dxflow lab up` as root"


@pytest.fixture
def run_tiny_lab(tmp_path):
    lab = tmp_path / "tests" / "lab"
    lab.mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "lab" / "conftest.py", lab / "conftest.py")
    (lab / "test_tiny.py").write_text(TINY)

    def run(**env: str) -> subprocess.CompletedProcess:
        environ = {k: v for k, v in os.environ.items() if k not in ("DXFLOW_REQUIRE_LAB", "PYTEST_ADDOPTS")}
        environ.update(PYTHONPATH=str(ROOT), DXFLOW_LAB_STATE="/nonexistent/state.json", **env)
        return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-ra", str(lab)],
                              cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)
    return run


def lines_saying_why(out: str) -> list[str]:
    return [line for line in out.splitlines() if WHY in line]


def test_a_developers_run_skips_the_lab_tier_with_one_line_saying_why(run_tiny_lab):
    proc = run_tiny_lab()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert len(lines_saying_why(proc.stdout)) == 1, proc.stdout
    assert lines_saying_why(proc.stdout)[0].startswith("SKIPPED [2] ")
    assert "2 skipped" in proc.stdout


def test_the_test_command_fails_the_lab_tier_and_says_why(run_tiny_lab):
    proc = run_tiny_lab(DXFLOW_REQUIRE_LAB="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert lines_saying_why(proc.stdout), proc.stdout
    assert "2 errors" in proc.stdout and "passed" not in proc.stdout


def test_the_test_command_requires_the_lab():
    text = (ROOT / "scripts" / "test.sh").read_text()
    assert "DXFLOW_REQUIRE_LAB=1" in text
