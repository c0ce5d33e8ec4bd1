"""Each lab node's own ``/tmp`` and ``/local``: a mount namespace per node.

On a real cluster ``/home`` is shared and ``/tmp`` (and a scratch disk, here ``/local``) is each
node's own: staging input to a node's local disk is the most common reason to copy to one node.
The lab gives every node a mount namespace, kept alive by a bind mount on
``/run/dxflow-lab/mnt/nX`` like its UTS namespace, in which two folders of the lab's
(``/var/lib/dxflow-lab/nodes/nX/tmp`` and ``.../local``, mode 1777 like ``/tmp``) are bound on
``/tmp`` and ``/local``. slurmd and sshd start inside it (:func:`dxflow.lab.network.node_argv`), so
every job step, prolog, agent and SSH session of the node sees the node's own files there and
the host's everywhere else (``/home``, ``/etc``, ``/var/tmp``, ``/run``).

The namespace is made with private propagation: a mount made on the host after it (another
node's cgroups, a generation's root) stays out of it, and the node's ``/tmp`` never shows on the
host. ``/local`` must exist as a folder on the host to be a mount point; the lab makes an empty one
when there is none and ``lab down`` removes it again if it is still empty.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from dxflow.lab.layout import Layout, Node
from dxflow.lab.runner import LabError, run

log = logging.getLogger(__name__)

#: the node-local folders every lab node has: mount point -> name of its folder under the node's data
NODE_LOCAL = {"/tmp": "tmp", "/local": "local"}
#: where, on the host, the lab made a mount point that was not there (removed by ``lab down`` if empty)
MADE_MARKER = "made-mount-points"


def ns_dir(layout: Layout) -> Path:
    return layout.runtime / "mnt"


def ns_file(layout: Layout, node: Node | str) -> Path:
    """The file that keeps ``node``'s mount namespace alive (a bind mount of its nsfs inode)."""
    return ns_dir(layout) / (node if isinstance(node, str) else node.name)


def data_dir(layout: Layout, node: Node | str) -> Path:
    """The host folder that holds ``node``'s ``/tmp`` and ``/local`` (they are disk, not memory)."""
    return layout.root / "nodes" / (node if isinstance(node, str) else node.name)


def mounted_at(path: Path) -> bool:
    """True when something is mounted exactly at ``path`` in this process's mount namespace."""
    target = str(path)
    with open("/proc/self/mountinfo") as f:
        return any(len(parts) > 4 and parts[4] == target for parts in map(str.split, f))


def has_namespace(layout: Layout, node: Node | str) -> bool:
    """``node`` has its mount namespace (an nsfs is bound on its file)."""
    path = ns_file(layout, node)
    return path.exists() and mounted_at(path)


def same_namespace(pid: int, layout: Layout, node: Node) -> bool:
    """Process ``pid`` lives in ``node``'s mount namespace."""
    try:
        return has_namespace(layout, node) and \
            os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat(ns_file(layout, node)).st_ino
    except OSError:
        return False


def _private_ns_dir(layout: Layout) -> None:
    """A mount namespace can be bound on a file only where propagation is private (unshare(1):
    a shared parent would make the new namespace hold a mount of itself); make the folder its own
    private mount, whatever the host's ``/`` is (systemd makes it shared)."""
    folder = ns_dir(layout)
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    if not mounted_at(folder):
        run(["mount", "--bind", folder, folder], what="making the lab's mount namespace folder")
    run(["mount", "--make-private", folder], what="making the lab's mount namespace folder private")


def _mount_points(layout: Layout) -> None:
    """``/local`` (and any other mount point missing on the host), noted so that down removes it."""
    marker = layout.root / "nodes" / MADE_MARKER
    for point in NODE_LOCAL:
        path = Path(point)
        if not path.is_dir():
            path.mkdir(mode=0o755)
            marker.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            with open(marker, "a") as f:
                f.write(point + "\n")


def ensure_node(layout: Layout, node: Node) -> Path:
    """``node``'s mount namespace with its own ``/tmp`` and ``/local``; the file that keeps it."""
    data = data_dir(layout, node)
    for name in NODE_LOCAL.values():
        folder = data / name
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o1777)  # like /tmp: everyone writes, only the owner deletes
    path = ns_file(layout, node)
    if has_namespace(layout, node) and _binds_ok(path, data):
        return path
    remove_node(layout, node, keep_data=True)
    _private_ns_dir(layout)
    _mount_points(layout)
    path.touch(mode=0o644)
    run(["unshare", f"--mount={path}", "--propagation", "private", "true"],
        what=f"making the mount namespace of {node.name}")
    sources = [str(data / name) for name in NODE_LOCAL.values()]
    # a mount point that holds the node's folders (a lab root under /tmp) is covered last
    for point, name in sorted(NODE_LOCAL.items(), key=lambda item: any(src.startswith(item[0] + "/")
                                                                       for src in sources)):
        run(["nsenter", f"--mount={path}", "mount", "--bind", data / name, point],
            what=f"mounting {node.name}'s own {point}")
    if not _binds_ok(path, data):
        raise LabError(f"{node.name}'s mount namespace ({path}) does not show its own "
                       f"{' and '.join(NODE_LOCAL)}; see `nsenter --mount={path} findmnt`")
    return path


def _binds_ok(path: Path, data: Path) -> bool:
    """Inside the namespace kept at ``path``, each node-local folder is the node's own."""
    for point, name in NODE_LOCAL.items():
        probe = run(["nsenter", f"--mount={path}", "stat", "-c", "%d:%i", point], check=False)
        if probe.returncode != 0:
            return False
        mine = os.stat(data / name)
        if probe.stdout.strip() != f"{mine.st_dev}:{mine.st_ino}":
            return False
    return True


def remove_node(layout: Layout, node: Node | str, *, keep_data: bool = False) -> None:
    """Unmount ``node``'s namespace file (the namespace goes with its last process) and, unless
    ``keep_data``, delete its ``/tmp`` and ``/local``."""
    path = ns_file(layout, node)
    while mounted_at(path):
        if run(["umount", path], check=False).returncode != 0:
            break
    path.unlink(missing_ok=True)
    if not keep_data:
        shutil.rmtree(data_dir(layout, node), ignore_errors=True)


def remove_all(layout: Layout) -> None:
    """What :func:`ensure_node` made for any node, the namespace folder's mount and the mount
    points it added on the host (only while empty)."""
    folder = ns_dir(layout)
    if folder.is_dir():
        for entry in sorted(folder.iterdir()):
            remove_node(layout, entry.name)
    while mounted_at(folder):
        if run(["umount", folder], check=False).returncode != 0:
            break
    marker = layout.root / "nodes" / MADE_MARKER
    if marker.exists():
        for point in dict.fromkeys(marker.read_text().split()):
            try:
                Path(point).rmdir()
            except OSError as e:
                log.warning("leaving %s in place: %s", point, e)
        marker.unlink()
    shutil.rmtree(layout.root / "nodes", ignore_errors=True)
