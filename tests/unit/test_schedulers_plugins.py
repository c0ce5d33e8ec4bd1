"""A site's own scheduler adapter, found through the ``dxflow.schedulers`` entry-point group.

The tests install a tiny distribution into a temporary folder on sys.path — a package and a real
``.dist-info`` with ``entry_points.txt``, what pip writes — and see dxflow choose its adapter.
"""

from __future__ import annotations

import configparser
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dxflow import schedulers
from dxflow.errors import ConfigError, UsageError
from dxflow.schedulers.local import Local
from dxflow.schedulers.slurm import Slurm

ROOT = Path(__file__).resolve().parents[2]

ADAPTER = '''
from dxflow.schedulers.base import JobInfo, JobState, Scheduler


class MySched(Scheduler):
    name = "mysched"
    commands = ("myq",)
    output_patterns = {"%J": ("job",)}

    def jobs(self, user=None):
        return [JobInfo(job="1", user="alice", state=JobState.RUNNING, nodes=["n1"])]

    def backend(self):
        return "myq --json"

    def backend_why(self):
        return "the site's own queue"


class NotOne:
    name = "notone"
'''

ENTRY_POINTS = '''[dxflow.schedulers]
mysched = mysite_dxflow.sched:MySched
slurm = mysite_dxflow.sched:MySched
notone = mysite_dxflow.sched:NotOne
missing = mysite_dxflow.nowhere:X
bad/name = mysite_dxflow.sched:MySched
'''


def install(folder: Path) -> Path:
    """What ``pip install`` leaves in site-packages for a distribution ``mysite-dxflow`` 1.0."""
    package = folder / "mysite_dxflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sched.py").write_text(ADAPTER)
    info = folder / "mysite_dxflow-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mysite-dxflow\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    (info / "RECORD").write_text("")
    return folder


@pytest.fixture
def site(tmp_path, monkeypatch):
    folder = install(tmp_path / "site-packages")
    monkeypatch.syspath_prepend(str(folder))
    schedulers.site_adapters.cache_clear()
    yield folder
    schedulers.site_adapters.cache_clear()
    for name in [m for m in sys.modules if m.startswith("mysite_dxflow")]:
        del sys.modules[name]


def test_a_sites_adapter_is_chosen_by_its_name(site):
    sched = schedulers.get_scheduler("mysched", {"PATH": "/bin"})
    assert type(sched).__name__ == "MySched" and type(sched).__module__ == "mysite_dxflow.sched"
    assert sched.environ == {"PATH": "/bin"}
    assert [j.job for j in sched.jobs(user="alice")] == ["1"]
    assert sched.expand_output("o.%J", {"job": "7"}) == "o.7"
    assert schedulers.has_controller("mysched")
    assert list(schedulers.adapters())[:len(schedulers.ADAPTERS)] == list(schedulers.ADAPTERS)
    assert schedulers.adapters()["mysched"] == "mysite_dxflow.sched:MySched"


def test_dxflows_own_adapters_cannot_be_replaced(site):
    assert schedulers.adapter_class("slurm") is Slurm
    assert "bad/name" not in schedulers.adapters()


def test_a_broken_adapter_is_a_clear_error(site):
    with pytest.raises(ConfigError, match="not a subclass"):
        schedulers.get_scheduler("notone")
    with pytest.raises(ConfigError, match="cannot load"):
        schedulers.get_scheduler("missing")
    with pytest.raises(UsageError, match="known: slurm, pbs, torque, lsf, local, mysched"):
        schedulers.get_scheduler("nope")
    assert not schedulers.has_controller("nope") and not schedulers.has_controller("notone")


def test_without_the_distribution_the_name_is_unknown():
    schedulers.site_adapters.cache_clear()
    with pytest.raises(UsageError, match="unknown scheduler 'mysched'"):
        schedulers.get_scheduler("mysched")


def test_local_has_no_controller_and_is_started_by_hand():
    assert not schedulers.has_controller("local") and Local.started_by_hand
    assert all(schedulers.has_controller(n) for n in ("slurm", "pbs", "torque", "lsf"))
    assert not any(schedulers.adapter_class(n).started_by_hand for n in ("slurm", "pbs", "torque", "lsf"))


def test_doctor_reports_the_sites_adapter(site):
    """`dxflow doctor` in a process of its own, with the distribution on its path: the adapter, its
    backend and why, and the broken entries as problems."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    out = subprocess.run([sys.executable, "-c", "import sys; from dxflow.cli import main; sys.exit(main())",
                          "doctor", "--json"], capture_output=True, text=True, env=env, timeout=60)
    report = json.loads(out.stdout)
    mine = next(s for s in report["schedulers"] if s["scheduler"] == "mysched")
    assert (mine["adapter"], mine["backend"], mine["why"]) == ("mysite_dxflow.sched:MySched", "myq --json",
                                                               "the site's own queue")
    assert any("notone" in p and "not a subclass" in p for p in report["problems"])
    assert out.returncode == 1


def test_the_entry_point_group_declares_dxflows_own_adapters():
    """setup.cfg declares the built-in table in the group, so what pip records matches dxflow's own."""
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = dict(line.split(" = ") for line in cfg["options.entry_points"]["dxflow.schedulers"].strip().splitlines())
    assert declared == schedulers.ADAPTERS
