"""``lab up``, ``lab down`` and ``lab status``, built from the pieces of this package."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from dxflow.errors import ConfigError, SchedulerError, UsageError
from dxflow import jobcgroup
from dxflow.lab import cgroups, daemons, install, mounts, network, packages, procs, rootfs, slurm, users
from dxflow.lab.layout import MAX_NODES, Layout, Node
from dxflow.lab.runner import run
from dxflow.lab.state import LabState, load, save

log = logging.getLogger(__name__)


def require_root() -> None:
    if os.geteuid() != 0:
        raise UsageError("`dxflow lab` must run as root: it installs packages, creates users, "
                         "network namespaces and daemons; try `sudo dxflow lab ...`")


def up(node_count: int = 2, *, install_packages: bool = True, layout: Layout | None = None) -> dict:
    """Build the lab, or bring an existing one back to what it should be. Returns ``status()``."""
    layout = layout or Layout()
    require_root()
    if not 1 <= node_count <= MAX_NODES:
        raise UsageError(f"--nodes must be between 1 and {MAX_NODES}, not {node_count}")
    if rootfs.inside_root():
        # a generation's root (dxflow.lab.generation): built with its packages, and no package index here
        missing = packages.missing_packages(rootfs.PACKAGES)
        if missing:
            raise UsageError(f"the Slurm root file system lacks {' '.join(missing)}; rebuild it")
    else:
        packages.ensure_packages(install=install_packages)
    network.check_subnet_free(layout)
    for conf in (layout.slurm_conf, layout.cgroup_conf):
        slurm.check_backup_free(conf)

    state = load(layout.state_file) or LabState()
    nodes = layout.nodes(node_count)
    old_nodes = [Node(int(name[1:]), layout.prefix) for name in state.nodes]
    layout.root.mkdir(mode=0o755, parents=True, exist_ok=True)
    state.node_count = node_count
    state.nodes = sorted({n.name for n in nodes + old_nodes}, key=lambda s: int(s[1:]))
    save(state, layout.state_file)

    def step() -> None:
        save(state, layout.state_file)

    install.install(layout, state)
    step()
    for name in layout.users:
        if users.ensure_user(name):
            state.remember("users_created", name)
        state.remember("users", name)
        step()
        users.ensure_ssh_key(name)
    daemons.prepare_dirs(layout, nodes)
    daemons.ensure_munge(layout, state)
    step()

    network.ensure_bridge(layout)
    for node in nodes:
        network.ensure_node_net(layout, node)
        network.ensure_uts(layout, node.name)
    network.ensure_names(layout, nodes)

    version = slurm.slurm_version()
    state.slurm_version = slurm.version_text(version)
    use_cgroups, why_not = cgroups.available()
    if use_cgroups:
        # the nodes' folders stay under the cgroups they were first made in, whoever runs `up` again
        state.cgroup_trees = state.cgroup_trees or cgroups.slurm_trees(Path("/proc/self/cgroup").read_text())
    else:
        log.warning("the lab runs Slurm without cgroups (proctrack/linuxproc): %s", why_not)
    state.cgroups, state.cgroups_why_not = ("per-node", "") if use_cgroups else ("", why_not)
    changed = slurm.write_config(layout.slurm_conf,
                                 slurm.render_slurm_conf(layout, nodes, slurm.node_shape(node_count), version,
                                                         cgroups=use_cgroups),
                                 state.backups)
    state.remember("files_written", str(layout.slurm_conf))
    if use_cgroups:
        for node in nodes:
            changed |= _write_node_conf(layout, node)
    cgroup_settings = slurm.cgroup_conf_for(version, use_cgroups)
    if cgroup_settings:
        changed |= slurm.write_config(layout.cgroup_conf, slurm.render_cgroup_conf(cgroup_settings),
                                      state.backups)
        state.remember("files_written", str(layout.cgroup_conf))
    step()

    surplus = [n for n in old_nodes if n.index > node_count]
    if changed or surplus:
        # new node list or settings: slurmctld and every slurmd read slurm.conf at start
        daemons.stop_slurm(layout, cancel_jobs=False)
    for node in surplus:
        _remove_node(layout, node, state.cgroup_trees)
    state.nodes = [n.name for n in nodes]
    step()

    daemons.start_slurmctld(layout, state)
    step()
    for node in nodes:
        node_cgroups = cgroups.ensure_node(layout, node, state.cgroup_trees) if use_cgroups else []
        if not rootfs.inside_root():  # a generation's lab runs the Slurm tests only: nodes share its /tmp
            mounts.ensure_node(layout, node)  # after the cgroup mounts: the namespace is a copy of the host's
        daemons.start_slurmd(layout, node, state, node_cgroups)
        daemons.start_sshd(layout, node, state, node_cgroups)
        step()
    log.info("waiting for %d node(s) to be idle and to accept SSH", node_count)
    daemons.wait_ready(layout, nodes)
    log.info("lab is up: %s; login node %s (%s)", ", ".join(n.name for n in nodes),
             layout.login_name, layout.host_addr)
    return status(layout)


def _write_node_conf(layout: Layout, node: Node) -> bool:
    """The node's config folder: a link to slurm.conf and its own cgroup.conf. True if it changed."""
    folder = layout.node_conf_dir(node)
    folder.mkdir(mode=0o755, parents=True, exist_ok=True)
    link = layout.node_slurm_conf(node)
    changed = False
    if not (link.is_symlink() and os.readlink(link) == str(layout.slurm_conf)):
        link.unlink(missing_ok=True)
        link.symlink_to(layout.slurm_conf)
        changed = True
    text = slurm.render_cgroup_conf(cgroups.render_cgroup_conf(layout, node))
    return slurm.write_config(layout.node_cgroup_conf(node), text, {}) or changed


def _remove_node(layout: Layout, node: Node, trees: dict[str, str]) -> None:
    for pidfile, program in ((layout.slurmd_pidfile(node), "slurmd"), (layout.sshd_pidfile(node), "sshd")):
        pid = procs.daemon_pid(pidfile, program)
        if pid:
            procs.terminate([pid])
        pidfile.unlink(missing_ok=True)
    if node.netns in network.netns_names():
        daemons.stop_node_processes(node.netns)
    network.remove_node_net(node.netns)
    network.remove_uts(layout.uts_file(node.name))
    mounts.remove_node(layout, node)
    cgroups.remove_node(layout, node, trees)


def down(layout: Layout | None = None) -> None:
    """Undo what ``up`` made. Safe to run twice, and after a half-failed ``up``.

    Without a readable state file it still removes everything it can find by name
    (namespaces, bridge, marked blocks, pid files); it then keeps users, since it
    cannot know that the lab created them.
    """
    layout = layout or Layout()
    require_root()
    try:
        state = load(layout.state_file)
    except ConfigError as e:
        log.warning("%s", e)
        state = None

    from dxflow.lab import site  # the site service (`lab site up`), added to this lab: out first

    site.down(layout)
    daemons.stop_slurm(layout)
    daemons.stop_sshd(layout)
    for netns in network.lab_netns_names():
        daemons.stop_node_processes(netns)
    lab_users = state.users if state else list(layout.users)
    for name in lab_users:
        # a generation lab's processes show here too, from its own PID namespace: not this lab's
        leftovers = [pid for pid in users.processes_of(name, containing="dxflow") if _same_pid_namespace(pid)]
        if leftovers:
            log.info("stopping %d dxflow process(es) of %s", len(leftovers), name)
            procs.terminate(leftovers, what=f"dxflow process of {name}")
    daemons.stop_munge(layout, state)

    trees = state.cgroup_trees if state else {}
    if not trees and cgroups.available()[0]:
        trees = cgroups.slurm_trees(Path("/proc/self/cgroup").read_text())
    cgroup_nodes = {p.name for d in (layout.runtime / "cgroup", layout.runtime / "cgns") if d.is_dir()
                    for p in d.iterdir()} | set(state.nodes if state else [])
    for name in sorted(cgroup_nodes):
        if name[1:].isdigit():
            cgroups.remove_node(layout, Node(int(name[1:]), layout.prefix), trees)
    _remove_agent_cgroups(layout)
    mounts.remove_all(layout)

    log.info("removing the lab network")
    for netns in network.lab_netns_names():
        network.remove_node_net(netns)
    for veth in _lab_veths():
        run(["ip", "link", "del", veth], check=False)
    network.remove_bridge(layout)
    if layout.uts_dir.exists():
        for path in layout.uts_dir.iterdir():
            network.remove_uts(path)
    network.remove_names(layout)

    backups = state.backups if state else {
        str(p): str(Layout.backup_of(p)) for p in (layout.slurm_conf, layout.cgroup_conf)}
    for conf in (layout.slurm_conf, layout.cgroup_conf):
        slurm.remove_config(conf, backups)

    if state:
        for name in state.users_created:
            users.remove_user(name)
        install.remove_hooks(state)
    _remove_agent_records(layout)
    shutil.rmtree(layout.root, ignore_errors=True)
    shutil.rmtree(layout.runtime, ignore_errors=True)
    log.info("lab is down")


def _same_pid_namespace(pid: int) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink("/proc/self/ns/pid")
    except OSError:
        return False


def _remove_agent_records(layout: Layout) -> None:
    """The hooks' records of the lab's agents (job ids start again at 1 in the next lab)."""
    from dxflow.config import SiteConfig

    try:
        rundir = Path(SiteConfig.load().runtime_dir)
    except ConfigError:
        rundir = Path(SiteConfig().runtime_dir)
    for record in rundir.glob(f"{layout.cluster_name}.*.json"):
        record.unlink(missing_ok=True)


def _remove_agent_cgroups(layout: Layout) -> None:
    """Cgroups the hooks made for the lab's agents and no epilog removed (their processes are gone)."""
    base = jobcgroup.own_cgroup(jobcgroup.hierarchies(), "x")
    if base is None or not base.parent.is_dir():
        return
    for cg in base.parent.glob(f"{layout.cluster_name}.*"):
        jobcgroup.kill(cg, timeout=2)
        jobcgroup.remove(cg)


def _lab_veths() -> list[str]:
    """Host-side veth ends of the lab whose namespace is already gone."""
    return [name for name in os.listdir("/sys/class/net")
            if name.startswith("dxlab-v") and name[len("dxlab-v"):].isdigit()]


def status(layout: Layout | None = None) -> dict:
    """What runs now: ``{"state": "up"|"degraded"|"down", daemons, nodes, users, ...}``."""
    layout = layout or Layout()
    state = load(layout.state_file)
    nodes = layout.nodes(state.node_count) if state else []
    daemon_up = {
        "munged": daemons.munge_works() if shutil.which("munge") else False,
        "slurmctld": daemons.slurmctld_pid(layout) is not None,
    }
    slurm_states: dict[str, str] = {}
    if daemon_up["slurmctld"]:
        try:
            slurm_states = slurm.node_states(timeout=5)
        except SchedulerError as e:
            log.debug("sinfo failed: %s", e)
    node_rows = []
    for node in nodes:
        node_rows.append({
            "name": node.name,
            "addr": node.addr,
            "netns": node.netns,
            "slurmd": daemons.slurmd_pid(layout, node) is not None,
            "sshd": daemons.sshd_pid(layout, node) is not None,
            "slurm_state": slurm_states.get(node.name, "unknown"),
        })
    running = list(daemon_up.values()) + [r["slurmd"] and r["sshd"] for r in node_rows]
    if state and running and all(running) and all(r["slurm_state"] in slurm.READY_STATES for r in node_rows):
        overall = "up"
    elif state or any(running) or network.lab_netns_names():
        overall = "degraded"
    else:
        overall = "down"
    return {
        "state": overall,
        "cluster": layout.cluster_name,
        "login": {"name": layout.login_name, "addr": layout.host_addr},
        "daemons": daemon_up,
        "nodes": node_rows,
        "users": [{"name": name, "exists": users.exists(name), "created_by_lab": name in state.users_created}
                  for name in state.users] if state else [],
        "slurm_version": state.slurm_version if state else "",
        # "22.05", "24.11": which Slurm generation this lab runs (dxflow lab up --slurm)
        "generation": ".".join(state.slurm_version.split(".")[:2]) if state else "",
        # "per-node": Slurm runs proctrack/cgroup and task/cgroup, each node in cgroups of its own
        "cgroups": (state.cgroups or "off") if state else "off",
        "cgroups_why_not": state.cgroups_why_not if state else "",
        "state_file": str(layout.state_file) if state else None,
    }


def status_table(info: dict) -> str:
    """``status()`` for people."""
    yes = {True: "running", False: "stopped"}
    lines = [f"lab: {info['state']}  (cluster {info['cluster']}, login {info['login']['name']} "
             f"{info['login']['addr']}{', slurm ' + info['slurm_version'] if info['slurm_version'] else ''}"
             f", cgroups {info.get('cgroups', 'off')})"]
    lines += [f"  {name:<10} {yes[up]}" for name, up in info["daemons"].items()]
    if info["nodes"]:
        lines.append(f"  {'NODE':<6} {'ADDRESS':<12} {'SLURMD':<8} {'SSHD':<8} SLURM STATE")
        lines += [f"  {r['name']:<6} {r['addr']:<12} {yes[r['slurmd']]:<8} {yes[r['sshd']]:<8} {r['slurm_state']}"
                  for r in info["nodes"]]
    if info["users"]:
        lines.append("  users: " + ", ".join(
            u["name"] + ("" if u["exists"] else " (missing)") for u in info["users"]))
    return "\n".join(lines)
