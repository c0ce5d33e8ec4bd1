"""Issue #10 item 5 on the lab: scheduler commands outside PATH (``/opt/slurm/bin`` at some sites), found
through the site's ``scheduler_bin`` by every dxflow process — here ``dxflow doctor`` and the adapter's
query as a hook, master or agent runs it — with a PATH that has no ``squeue`` at all.

The lab's Slurm commands are symlinked into a temporary folder; the processes run with
PATH=/opt/dxflow/venv/bin (python and dxflow, no Slurm). That agents and masters ask through the
site's folder although /usr/bin is on their PATH is shown in test_audit.py (wrappers that note calls).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import DXFLOW, run

PYTHON = "/opt/dxflow/venv/bin/python"
QUERY = ("import json, sys; from dxflow.schedulers import get_scheduler; "
         "print(json.dumps([j.job for j in get_scheduler('slurm').jobs(user=sys.argv[1])]))")


@pytest.fixture
def site(lab) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="dxflow-slurmbin-"))
    (folder / "bin").mkdir()
    for name in ("squeue", "sinfo", "scontrol"):
        (folder / "bin" / name).symlink_to(shutil.which(name) or f"/usr/bin/{name}")
    (folder / "dxflow.toml").write_text(f'scheduler_bin = "{folder / "bin"}"\n')
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def bare(*argv: str, config: Path | None = None, check: bool = True):
    """argv with a PATH without any Slurm command, and the given site config (or none at all)."""
    env = {"PATH": "/opt/dxflow/venv/bin", "DXFLOW_SITE_CONFIG": str(config or "/nonexistent/dxflow.toml")}
    return run(list(argv), env=env, check=check)


def test_doctor_finds_the_scheduler_commands_in_the_sites_folder(site):
    without = json.loads(bare(DXFLOW, "doctor", "--json", check=False).stdout)
    slurm = next(s for s in without["schedulers"] if s["scheduler"] == "slurm")
    assert slurm["commands"]["squeue"] is None  # the premise: not on this PATH
    found = json.loads(bare(DXFLOW, "doctor", "--json", config=site / "dxflow.toml", check=False).stdout)
    slurm = next(s for s in found["schedulers"] if s["scheduler"] == "slurm")
    assert slurm["commands"]["squeue"] == str(site / "bin" / "squeue")
    assert slurm["client_found"]


def test_the_adapter_asks_slurm_through_the_sites_folder(site, jobs):
    job = jobs.submit("alice", "sleep 120")
    failed = bare(PYTHON, "-c", QUERY, "alice", check=False)
    assert failed.returncode != 0 and "scheduler_bin" in failed.stderr  # says where to set it
    listed = json.loads(bare(PYTHON, "-c", QUERY, "alice", config=site / "dxflow.toml").stdout)
    assert job in listed


def test_doctor_reports_a_scheduler_folder_that_is_not_there(site):
    (site / "dxflow.toml").write_text(f'scheduler_bin = "{site / "missing"}"\n')
    out = bare(DXFLOW, "doctor", "--json", config=site / "dxflow.toml", check=False)
    assert out.returncode == 1 and "scheduler_bin" in out.stdout
