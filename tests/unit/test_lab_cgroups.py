"""The lab's per-node cgroups: what is read from /proc/self/cgroup, the paths, the argv that enters them."""

from __future__ import annotations

import subprocess
from pathlib import Path

from dxflow.lab import cgroups, slurm
from dxflow.lab.install import editable_install_of
from dxflow.lab.layout import Layout, Node

HYBRID = """9:name=systemd:/
8:pids:/
6:freezer:/
4:memory:/process_api/abc
3:cpuset:/
2:cpu,cpuacct:/
0::/
"""


def test_own_cgroups_reads_the_v1_trees_and_skips_named_and_v2_ones() -> None:
    assert cgroups.own_cgroups(HYBRID) == {"pids": "/", "freezer": "/", "memory": "/process_api/abc",
                                           "cpuset": "/", "cpu,cpuacct": "/"}


def test_slurm_trees_are_the_mounted_trees_slurm_uses(tmp_path: Path) -> None:
    for name in ("freezer", "memory", "cpuset", "cpu,cpuacct", "pids"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "tasks").write_text("")
    trees = cgroups.slurm_trees(HYBRID, tmp_path)
    assert trees == {"freezer": "/", "memory": "/process_api/abc", "cpuset": "/", "cpu,cpuacct": "/"}
    node = Node(1)
    # under the cgroup `lab up` stands in: the lab stays inside whatever holds the machine's processes
    assert cgroups.node_dir(tmp_path, "memory", trees["memory"], node) == tmp_path / "memory/process_api/abc/dxlab/n1"
    assert cgroups.node_dir(tmp_path, "freezer", "/", node) == tmp_path / "freezer/dxlab/n1"


def test_ensure_dirs_gives_new_cpusets_their_parents_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpuset").mkdir()
    (tmp_path / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (tmp_path / "cpuset" / "cpuset.mems").write_text("0\n")
    for folder in ("dxlab", "dxlab/n2"):  # as the kernel makes a v1 cpuset: its files there, empty
        (tmp_path / "cpuset" / folder).mkdir()
        for name in ("cpuset.cpus", "cpuset.mems"):
            (tmp_path / "cpuset" / folder / name).write_text("")
    procs = cgroups.ensure_dirs(tmp_path, {"cpuset": "/"}, Node(2))
    assert procs == [tmp_path / "cpuset/dxlab/n2/cgroup.procs"]
    assert (tmp_path / "cpuset/dxlab/n2/cpuset.cpus").read_text() == "0-1\n"
    assert (tmp_path / "cpuset/dxlab/cpuset.mems").read_text() == "0\n"


def test_enter_argv_writes_the_shells_pid_into_each_file_then_execs(tmp_path: Path) -> None:
    files = [tmp_path / "a" / "cgroup.procs", tmp_path / "b c" / "cgroup.procs"]  # a space stays one argument
    for f in files:
        f.parent.mkdir()
    argv = cgroups.enter_argv(files, ["sh", "-c", 'echo "$$ $1"', "sh", "x; touch pwned"])
    assert argv[:2] == ["sh", "-c"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=tmp_path).stdout.split(" ", 1)
    pid = out[0]
    assert [f.read_text().strip() for f in files] == [pid, pid]  # exec: the same process all along
    assert out[1].strip() == "x; touch pwned" and not (tmp_path / "pwned").exists()
    assert cgroups.enter_argv(files, ["true"], Path("/run/ns"))[:2] == ["nsenter", "--cgroup=/run/ns"]


def test_node_cgroup_conf_names_the_nodes_own_mount(tmp_path: Path) -> None:
    layout = Layout(root=tmp_path / "lab", runtime=tmp_path / "run")
    node = Node(3)
    settings = cgroups.render_cgroup_conf(layout, node)
    assert settings["CgroupMountpoint"] == str(tmp_path / "run/cgroup/n3")
    assert settings["CgroupPlugin"] == "cgroup/v1" and settings["CgroupAutomount"] == "no"
    assert settings["ConstrainCores"] == settings["ConstrainRAMSpace"] == "yes"
    assert layout.node_slurm_conf(node) == tmp_path / "lab/etc/n3/slurm.conf"
    assert layout.node_cgroup_conf(node).parent == layout.node_slurm_conf(node).parent  # slurmd reads it there
    assert slurm.render_cgroup_conf(settings).startswith(slurm.MARKER + "\n")


def test_available_refuses_a_pure_v2_host(tmp_path: Path) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    ok, why = cgroups.available(tmp_path)
    assert not ok and "v2" in why


def test_an_editable_install_is_not_replaced_by_a_copy(tmp_path: Path) -> None:
    layout = Layout(venv=tmp_path / "venv")
    info = tmp_path / "venv/lib/python3.11/site-packages/dxflow-0.1.0.dist-info"
    info.mkdir(parents=True)
    source = tmp_path / "src"
    source.mkdir()
    assert not editable_install_of(layout, source)
    (info / "direct_url.json").write_text('{"dir_info": {}, "url": "%s"}' % source.as_uri())
    assert not editable_install_of(layout, source)  # a copy made from the checkout: reinstalled
    (info / "direct_url.json").write_text('{"dir_info": {"editable": true}, "url": "%s"}' % source.as_uri())
    assert editable_install_of(layout, source)
    assert not editable_install_of(layout, tmp_path / "other")


def test_remove_node_removes_the_folders_links_and_namespace_file(tmp_path: Path) -> None:
    layout = Layout(root=tmp_path / "lab", runtime=tmp_path / "run")
    node = Node(1)
    root = tmp_path / "sys"
    leftover = cgroups.node_dir(root, "freezer", "/base", node) / "slurm_n1" / "uid_1001" / "job_5"
    leftover.mkdir(parents=True)                           # what Slurm left: empty folders
    (layout.cgroup_mount(node) / "cpu,cpuacct").mkdir(parents=True)
    (layout.cgroup_mount(node) / "cpuacct").symlink_to("cpu,cpuacct")
    layout.cgns_file(node).parent.mkdir(parents=True)
    layout.cgns_file(node).touch()
    cgroups.remove_node(layout, node, {"freezer": "/base"}, root)
    assert not layout.cgroup_mount(node).exists() and not layout.cgns_file(node).exists()
    assert not (root / "freezer/base/dxlab").exists() and (root / "freezer/base").is_dir()
