"""Each lab node's own cgroups, so that several slurmd on one host run Slurm's cgroup plugins.

Slurm's cgroup v1 plugin keeps job J of user U at ``<mount>/<controller>/slurm/uid_U/job_J`` on
every node, ``/slurm`` being fixed unless Slurm was built for multiple slurmd (CgroupPrepend,
src/common/cgroup.c): two slurmd of one host would share — and kill — each other's job cgroups.
So each node gets, like a real node has a machine of its own:

- a folder ``dxlab/<node>`` in each v1 tree Slurm uses, under the cgroup ``lab up`` runs in
  (the lab stays inside whatever holds the machine's processes);
- a cgroup namespace rooted there, kept by a bind mount on a file (as the UTS namespaces are);
- those trees mounted again from inside that namespace at ``/run/dxflow-lab/cgroup/<node>``: a
  mount made in a cgroup namespace has the namespace's root as its root, so this is the node's
  ``CgroupMountpoint``, written into a ``cgroup.conf`` of its own beside a link to ``slurm.conf``
  (slurmd reads cgroup.conf from its slurm.conf's folder: ``slurmd -f``);
- slurmd and sshd started in that namespace and those folders.

Slurm on n1 then makes ``.../dxlab/n1/slurm/uid_U/job_J``, and ``/proc/PID/cgroup`` read on the
node says ``/slurm/uid_U/job_J``, as on a real node. A pure cgroup v2 host is not handled (not
available to verify on): the lab then keeps ``proctrack/linuxproc`` (docs/lab.md).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dxflow.lab.layout import Layout, Node
from dxflow.lab.runner import run

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: v1 controllers Slurm's plugins use: proctrack/cgroup (freezer), task/cgroup (cpuset, memory,
#: devices), jobacct_gather/cgroup (cpuacct). Those present are given to every node.
SLURM_CONTROLLERS = ("freezer", "cpuset", "memory", "devices", "cpuacct")
#: Needed for the lab's cgroup.conf (ConstrainCores, ConstrainRAMSpace) and proctrack/cgroup.
REQUIRED = ("freezer", "cpuset", "memory")
TOP = "dxlab"

#: Moves the shell into the cgroups named before ``--`` (paths of cgroup.procs files), then execs the rest.
ENTER_SCRIPT = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 1; shift; done; shift; exec "$@"'


def own_cgroups(proc_cgroup: str) -> dict[str, str]:
    """``/proc/self/cgroup`` -> v1 tree folder name (``memory``, ``cpu,cpuacct``) -> our path in it."""
    out: dict[str, str] = {}
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[1] and not parts[1].startswith("name="):
            out[parts[1]] = parts[2]
    return out


def slurm_trees(proc_cgroup: str, root: Path = CGROUP_ROOT) -> dict[str, str]:
    """The v1 trees Slurm uses that are mounted here: folder name -> where ``lab up`` runs in it."""
    trees = {}
    for name, path in own_cgroups(proc_cgroup).items():
        if set(name.split(",")) & set(SLURM_CONTROLLERS) and (root / name / "tasks").exists():
            trees[name] = path
    return trees


def available(root: Path = CGROUP_ROOT) -> tuple[bool, str]:
    """Whether the lab can give each node its cgroups here, and why not."""
    if (root / "cgroup.controllers").exists():
        return False, ("pure cgroup v2 host: per-node cgroup v2 trees for several slurmd are not handled "
                       "by the lab (see docs/lab.md)")
    trees = slurm_trees(Path("/proc/self/cgroup").read_text(), root)
    have = {c for name in trees for c in name.split(",")}
    missing = [c for c in REQUIRED if c not in have]
    if missing:
        return False, f"cgroup v1 controller(s) {', '.join(missing)} not mounted under {root}"
    return True, ""


def node_dir(root: Path, tree: str, base: str, node: Node) -> Path:
    return root / tree / base.lstrip("/") / TOP / node.name


def render_cgroup_conf(layout: Layout, node: Node) -> dict[str, str]:
    """The node's cgroup.conf settings (task/cgroup limits, its own mount point)."""
    return {
        "CgroupPlugin": "cgroup/v1",
        "CgroupMountpoint": str(layout.cgroup_mount(node)),
        "CgroupAutomount": "no",
        "ConstrainCores": "yes",
        "ConstrainRAMSpace": "yes",
    }


def _copy_cpuset(path: Path) -> None:
    """A new v1 cpuset starts with no CPU and no memory node: give it its parent's."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        f = path / name
        if f.exists() and not f.read_text().strip():
            f.write_text((path.parent / name).read_text())


def ensure_dirs(root: Path, trees: dict[str, str], node: Node) -> list[Path]:
    """The node's folder in every tree (cpusets filled in); the ``cgroup.procs`` files to join."""
    procs = []
    for tree, base in trees.items():
        top = node_dir(root, tree, base, node)
        for path in (top.parent, top):
            path.mkdir(mode=0o755, exist_ok=True)
            if "cpuset" in tree.split(","):
                _copy_cpuset(path)
        procs.append(top / "cgroup.procs")
    return procs


def enter_argv(procs: list[Path], argv: list[str], cgns: Path | None = None) -> list[str]:
    """``argv`` run inside the cgroups whose ``cgroup.procs`` are given (and the namespace ``cgns``)."""
    inner = ["sh", "-c", ENTER_SCRIPT, "sh", *map(str, procs), "--", *argv]
    return (["nsenter", f"--cgroup={cgns}"] if cgns else []) + inner


def mounted_at(path: Path) -> bool:
    """True when something is mounted exactly at ``path`` (field 5 of /proc/self/mountinfo)."""
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f if len(line.split()) > 4)


def same_namespace(pid: int, cgns: Path) -> bool:
    """True when process ``pid`` lives in the cgroup namespace kept at ``cgns``."""
    try:
        return os.stat(f"/proc/{pid}/ns/cgroup").st_ino == os.stat(cgns).st_ino and mounted_at(cgns)
    except OSError:
        return False


def ensure_node(layout: Layout, node: Node, trees: dict[str, str], root: Path = CGROUP_ROOT) -> list[Path]:
    """Folders, namespace and mounts of one node; returns the ``cgroup.procs`` files its daemons join."""
    procs = ensure_dirs(root, trees, node)
    cgns = layout.cgns_file(node)
    if not mounted_at(cgns):
        cgns.parent.mkdir(parents=True, exist_ok=True)
        cgns.touch(mode=0o644)
        # the namespace's root is where the process making it stands: inside the node's folders
        run(enter_argv(procs, ["unshare", f"--cgroup={cgns}", "true"]),
            what=f"making the cgroup namespace of {node.name}")
    mount_dir = layout.cgroup_mount(node)
    for tree in trees:
        target = mount_dir / tree
        target.mkdir(parents=True, exist_ok=True)
        if not mounted_at(target):
            run(["nsenter", f"--cgroup={cgns}", "mount", "-t", "cgroup", "-o", tree, "cgroup", target],
                what=f"mounting the {tree} cgroups of {node.name}")
        for name in tree.split(","):  # Slurm looks for <mount>/<controller>
            link = mount_dir / name
            if name != tree and not link.exists():
                link.symlink_to(tree)
    return procs


def remove_node(layout: Layout, node: Node, trees: dict[str, str], root: Path = CGROUP_ROOT) -> None:
    """Unmount and remove what :func:`ensure_node` made; what Slurm left below goes too (it must be empty)."""
    mount_dir = layout.cgroup_mount(node)
    if mount_dir.is_dir():
        for entry in sorted(mount_dir.iterdir()):
            if entry.is_symlink():
                entry.unlink()
            elif mounted_at(entry):
                run(["umount", entry], check=False, what=f"unmounting {entry}")
        for entry in mount_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink() and not mounted_at(entry):
                entry.rmdir()
        mount_dir.rmdir()
    cgns = layout.cgns_file(node)
    while mounted_at(cgns):
        if run(["umount", cgns], check=False).returncode != 0:
            break
    cgns.unlink(missing_ok=True)
    for tree, base in trees.items():
        remove_tree(node_dir(root, tree, base, node))


def remove_tree(top: Path) -> None:
    """rmdir ``top`` and every cgroup below it, deepest first; a cgroup that still holds processes stays."""
    if not top.is_dir():
        return
    for here, _dirs, _files in os.walk(top, topdown=False):
        try:
            Path(here).rmdir()
        except OSError as e:
            log.warning("cannot remove cgroup %s: %s", here, e)
    try:
        top.parent.rmdir()  # dxlab/, once no node is left in it
    except OSError:
        pass
