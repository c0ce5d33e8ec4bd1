"""slurm.conf rendering, version handling and the backup/restore of a site's own file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dxflow.errors import ConfigError, SchedulerError
from dxflow.lab import slurm
from dxflow.lab.layout import Layout


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    return Layout(root=tmp_path / "lab", slurm_dir=tmp_path / "etc-slurm", hooks_dir=tmp_path / "hooks")


def conf_dict(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and not line.startswith(("NodeName=", "PartitionName=")):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_render_has_the_lab_settings(layout: Layout) -> None:
    text = slurm.render_slurm_conf(layout, layout.nodes(2), slurm.NodeShape(cpus=2, real_memory_mb=3000))
    conf = conf_dict(text)
    assert text.splitlines()[0] == slurm.MARKER
    assert conf["ClusterName"] == "dxlab"
    assert conf["SlurmctldHost"] == "dxlab-login(10.77.0.1)"
    for key, value in {"SlurmUser": "slurm", "AuthType": "auth/munge", "ProctrackType": "proctrack/linuxproc",
                       "TaskPlugin": "task/none", "SelectType": "select/cons_tres",
                       "SelectTypeParameters": "CR_Core", "ReturnToService": "2", "PrologFlags": "Alloc",
                       "MpiDefault": "none", "SchedulerType": "sched/backfill", "MinJobAge": "300",
                       "KillWait": "5"}.items():
        assert conf[key] == value, key
    assert conf["Prolog"] == str(layout.hooks_dir / "slurm-prolog")
    assert conf["Epilog"] == str(layout.hooks_dir / "slurm-epilog")
    assert conf["SlurmdSpoolDir"] == f"{layout.root}/spool/%n"
    assert conf["SlurmdPidFile"].endswith("%n.pid") and conf["SlurmdLogFile"].endswith("%n.log")
    for key in ("StateSaveLocation", "SlurmdSpoolDir", "SlurmctldPidFile", "SlurmdPidFile",
                "SlurmctldLogFile", "SlurmdLogFile"):
        assert conf[key].startswith(str(layout.root) + "/"), key
    assert "SlurmctldPort" not in conf and "SlurmdPort" not in conf


def test_render_with_cgroups_runs_slurm_as_production_sites_do(layout: Layout) -> None:
    shape = slurm.NodeShape(cpus=2, real_memory_mb=3013)
    conf = conf_dict(slurm.render_slurm_conf(layout, layout.nodes(2), shape, cgroups=True))
    assert conf["ProctrackType"] == "proctrack/cgroup"
    assert conf["TaskPlugin"].split(",")[0] == "task/cgroup"
    assert conf["PrologFlags"] == "Alloc,Contain"          # the extern step: the cgroup agents join
    assert conf["SelectTypeParameters"] == "CR_Core_Memory"  # else --mem sets no limit
    assert conf["DefMemPerCPU"] == "1506"                  # a job without --mem: a CPU's share, not the node
    without = conf_dict(slurm.render_slurm_conf(layout, layout.nodes(2), shape))
    assert "DefMemPerCPU" not in without and without["ProctrackType"] == "proctrack/linuxproc"


def test_render_node_and_partition_lines(layout: Layout) -> None:
    text = slurm.render_slurm_conf(layout, layout.nodes(3), slurm.NodeShape(cpus=4, real_memory_mb=1234))
    nodes = [line for line in text.splitlines() if line.startswith("NodeName=")]
    assert nodes == [f"NodeName=n{i} NodeAddr=10.77.0.{10 + i} CPUs=4 RealMemory=1234 State=UNKNOWN"
                     for i in (1, 2, 3)]
    assert text.rstrip().splitlines()[-1] == "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"


def test_render_is_deterministic(layout: Layout) -> None:
    shape = slurm.NodeShape(cpus=2, real_memory_mb=100)
    assert slurm.render_slurm_conf(layout, layout.nodes(2), shape) == slurm.render_slurm_conf(
        layout, layout.nodes(2), shape)


def test_version_rows_apply_from_their_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "VERSION_SETTINGS", [((24, 11), {"KillWait": "7", "Extra": "x"})])
    assert slurm.settings_for((22, 5, 8))["KillWait"] == "5"
    assert "Extra" not in slurm.settings_for((22, 5, 8))
    assert slurm.settings_for((24, 11, 5))["KillWait"] == "7"
    assert slurm.settings_for((25, 5, 0))["Extra"] == "x"


@pytest.mark.parametrize("text,expected", [
    ("slurm-wlm 22.05.8\n", (22, 5, 8)),
    ("slurm 24.11.5", (24, 11, 5)),
    ("slurm 23.02", (23, 2, 0)),
])
def test_parse_version(text: str, expected: tuple[int, int, int]) -> None:
    assert slurm.parse_version(text) == expected
    assert slurm.version_text(expected).count(".") == 2


def test_parse_version_rejects_garbage() -> None:
    with pytest.raises(SchedulerError):
        slurm.parse_version("no version here")


def test_version_text() -> None:
    assert slurm.version_text((22, 5, 8)) == "22.05.8"
    assert slurm.version_text((24, 11, 5)) == "24.11.5"


def test_parse_sinfo_nodes() -> None:
    out = "n1 idle\nn2 down*\n\nn3 MIXED\n"
    assert slurm.parse_sinfo_nodes(out) == {"n1": "idle", "n2": "down*", "n3": "mixed"}


def test_cgroup_conf_only_on_v2_without_systemd(tmp_path: Path) -> None:
    cg, sd = tmp_path / "cgroup", tmp_path / "systemd"
    cg.mkdir()
    assert not slurm.cgroup_conf_needed(cg, sd)           # v1 / hybrid
    (cg / "cgroup.controllers").write_text("cpu memory\n")
    assert slurm.cgroup_conf_needed(cg, sd)               # v2, no systemd
    sd.mkdir()
    assert not slurm.cgroup_conf_needed(cg, sd)           # v2 with systemd
    assert "IgnoreSystemd=yes" in slurm.render_cgroup_conf(slurm.CGROUP_V2_CONF)


def test_write_config_backs_up_and_restores_a_site_file(tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=site\n")
    backups: dict[str, str] = {}
    lab_text = slurm.MARKER + "\nClusterName=dxlab\n"
    assert slurm.write_config(conf, lab_text, backups) is True
    assert conf.read_text() == lab_text
    backup = tmp_path / "slurm.conf.dxflow-lab-backup"
    assert backups == {str(conf): str(backup)} and backup.read_text() == "ClusterName=site\n"
    # again: the lab's own file is neither backed up nor rewritten
    assert slurm.write_config(conf, lab_text, backups) is False
    slurm.remove_config(conf, backups)
    assert conf.read_text() == "ClusterName=site\n" and not backup.exists()
    slurm.remove_config(conf, backups)  # twice is fine
    assert conf.read_text() == "ClusterName=site\n"


def test_write_config_without_a_site_file(tmp_path: Path) -> None:
    conf = tmp_path / "etc" / "slurm.conf"
    backups: dict[str, str] = {}
    slurm.write_config(conf, slurm.MARKER + "\n", backups)
    assert backups == {} and slurm.is_lab_file(conf)
    slurm.remove_config(conf, backups)
    assert not conf.exists()


def test_write_config_refuses_to_overwrite_an_old_backup(tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("site\n")
    (tmp_path / "slurm.conf.dxflow-lab-backup").write_text("older site\n")
    with pytest.raises(ConfigError):
        slurm.write_config(conf, slurm.MARKER + "\n", {})
    assert conf.read_text() == "site\n"


def test_remove_config_leaves_a_site_file_alone(tmp_path: Path) -> None:
    conf = tmp_path / "slurm.conf"
    conf.write_text("site\n")
    slurm.remove_config(conf, {})
    assert conf.read_text() == "site\n"
