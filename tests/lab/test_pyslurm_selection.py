"""Which Slurm backend dxflow picks, on the lab's real Slurm (issue #12 item 5): run on the host lab
(22.05) by scripts/test.sh and inside each generation lab (24.11, 26.05) by scripts/test_generations.sh.

PyPI has pyslurm only for Slurm 17.11, 18.08 and 25.11, and no Debian release ships 25.11: so on every
generation the lab runs, pyslurm is either absent, or installed for another Slurm — and then refused,
with the reason, before anything of it is imported. The "installed" case is a pyslurm distribution
made for the test (its metadata says 25.11.0; importing its module would fail loudly), put on the path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import as_user

pytestmark = pytest.mark.lab

PYTHON = "/opt/dxflow/venv/bin/python"


def doctor_slurm(env: dict[str, str] | None = None) -> dict:
    """`dxflow doctor --json`'s Slurm entry, as alice sees it on the login node."""
    argv = ["env", *(f"{k}={v}" for k, v in (env or {}).items()), PYTHON, "-m", "dxflow", "doctor", "--json"]
    out = as_user("alice", argv, check=False, timeout=120)
    assert out.stdout, out.stderr
    [slurm] = [s for s in json.loads(out.stdout)["schedulers"] if s["scheduler"] == "slurm"]
    return slurm


def sinfo_version() -> str:
    out = subprocess.run(["sinfo", "--version"], capture_output=True, text=True, timeout=30)
    return re.search(r"(\d+\.\d+)\.\d+", out.stdout).group(1)


def test_without_pyslurm_squeue_json_is_used_and_doctor_says_why():
    slurm = doctor_slurm()
    assert slurm["backend"].startswith("squeue"), slurm
    assert "pyslurm is not installed" in slurm["why"], slurm
    assert f"Slurm {sinfo_version()}" in slurm["why"], slurm  # the generation this lab runs


def test_pyslurm_for_another_slurm_is_refused_with_the_reason_and_never_imported():
    tmp = Path(tempfile.mkdtemp(prefix="dxflow-pyslurm-"))  # pytest's own tmp is root's alone (0700)
    site = tmp / "site"
    (site / "pyslurm").mkdir(parents=True)
    (site / "pyslurm" / "__init__.py").write_text("raise SystemExit('pyslurm was imported')\n")
    dist = site / "pyslurm-25.11.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pyslurm\nVersion: 25.11.0\n")
    (dist / "RECORD").write_text("")
    for path in [tmp, *tmp.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    try:
        slurm = doctor_slurm({"PYTHONPATH": str(site)})
    finally:
        shutil.rmtree(tmp)
    assert slurm["backend"].startswith("squeue"), slurm
    assert re.search(rf"pyslurm 25\.11\.0 does not match Slurm {re.escape(sinfo_version())}\.\d+", slurm["why"]), slurm
    assert "was imported" not in json.dumps(slurm)
