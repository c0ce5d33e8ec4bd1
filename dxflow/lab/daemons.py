"""Starting and stopping the lab's daemons: munged, slurmctld, one slurmd and one sshd per node.

There is no systemd here: each daemon is started directly, puts itself in the
background and writes a pid file under the lab folder; it is stopped through that
pid file (and ``scontrol shutdown`` for Slurm).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Sequence

from dxflow.errors import SchedulerError
from dxflow.lab import cgroups, mounts, network, procs, slurm
from dxflow.lab.layout import Layout, Node
from dxflow.lab.runner import LabError, run, start_daemon
from dxflow.lab.state import LabState

log = logging.getLogger(__name__)

SSH_PORT = 22


# --- munge ----------------------------------------------------------------------

def munge_works() -> bool:
    """``munge -n | unmunge``: a credential made and read back through munged."""
    made = run(["munge", "-n"], check=False, timeout=10)
    if made.returncode != 0:
        return False
    return run(["unmunge"], check=False, input=made.stdout, timeout=10).returncode == 0


def ensure_munge(layout: Layout, state: LabState) -> None:
    """munged running as the munge user (started by the lab only when none answers)."""
    layout.munge_run.mkdir(parents=True, exist_ok=True)
    shutil.chown(layout.munge_run, "munge", "munge")
    if munge_works():
        return
    log.info("starting munged")
    start_daemon(["runuser", "-u", "munge", "--", "/usr/sbin/munged"],
                 log_file=layout.log_dir / "munged-start.log", what="munged")
    state.munged_started = True
    pid = procs.read_pidfile(layout.munged_pidfile)
    if pid:
        state.pids["munged"] = pid
    if not _wait(munge_works, 10):
        raise LabError("munged started but `munge -n | unmunge` fails; "
                       "see /var/log/munge/munged.log and the key /etc/munge/munge.key")


def stop_munge(layout: Layout, state: LabState | None) -> None:
    """Stop munged only when the lab started it."""
    if not (state and state.munged_started):
        return
    pid = procs.daemon_pid(layout.munged_pidfile, "munged") or state.pids.get("munged")
    if pid and procs.running_program(pid, "munged"):
        log.info("stopping munged")
        procs.terminate([pid], what="munged")


# --- slurm -----------------------------------------------------------------------

def prepare_dirs(layout: Layout, nodes: list[Node]) -> None:
    """Folders Slurm writes to: slurmctld runs as slurm, slurmd as root."""
    for path in (layout.root, layout.spool_dir):
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
    for path in (layout.run_dir, layout.log_dir, layout.statesave_dir):
        path.mkdir(mode=0o755, parents=True, exist_ok=True)
        shutil.chown(path, "slurm", "slurm")
    for node in nodes:
        (layout.spool_dir / node.name).mkdir(mode=0o755, exist_ok=True)


def slurmctld_pid(layout: Layout) -> int | None:
    return procs.daemon_pid(layout.slurmctld_pidfile(), "slurmctld")


def slurmd_pid(layout: Layout, node: Node) -> int | None:
    return procs.daemon_pid(layout.slurmd_pidfile(node), "slurmd")


def sshd_pid(layout: Layout, node: Node) -> int | None:
    return procs.daemon_pid(layout.sshd_pidfile(node), "sshd")


def start_slurmctld(layout: Layout, state: LabState) -> None:
    if slurmctld_pid(layout):
        return
    log.info("starting slurmctld on %s", layout.login_name)
    # its own host name, so that it recognises itself as SlurmctldHost
    uts = network.ensure_uts(layout, layout.login_name)
    start_daemon(["nsenter", f"--uts={uts}", "slurmctld"], log_file=layout.log_dir / "slurmctld-start.log",
                 what="slurmctld")
    pid = _wait(lambda: slurmctld_pid(layout), 15)
    if not pid:
        raise LabError(f"slurmctld did not stay up; see {layout.log_dir}/slurmctld.log")
    state.pids["slurmctld"] = pid


def on_node(layout: Layout, node: Node, argv: list[str], cgroup_procs: Sequence[Path]) -> list[str]:
    """``argv`` run on ``node``: its network and UTS namespaces and, when the lab gives nodes their
    own cgroups (``cgroup_procs``: the node's ``cgroup.procs`` files), its cgroups and cgroup namespace."""
    if cgroup_procs:
        argv = cgroups.enter_argv(list(cgroup_procs), argv, layout.cgns_file(node))
    return network.node_argv(layout, node, argv)


def placed(layout: Layout, node: Node, pid: int, cgroup_procs: Sequence[Path]) -> bool:
    """A running daemon of ``node`` is where it should be: in the node's cgroup namespace (if any) and
    in its mount namespace (if it has one: its own /tmp and /local)."""
    if cgroup_procs and not cgroups.same_namespace(pid, layout.cgns_file(node)):
        return False
    return not mounts.has_namespace(layout, node) or mounts.same_namespace(pid, layout, node)


def start_slurmd(layout: Layout, node: Node, state: LabState, cgroup_procs: Sequence[Path] = ()) -> None:
    """slurmd of ``node``; with the node's own cgroups it reads the node's config folder (``-f``),
    where its cgroup.conf names the node's cgroup mount."""
    pid = slurmd_pid(layout, node)
    if pid and not placed(layout, node, pid, cgroup_procs):
        log.info("restarting slurmd on %s inside the node's namespaces", node.name)
        if procs.terminate([pid], what=f"slurmd on {node.name}"):
            raise LabError(f"slurmd on {node.name} (pid {pid}) would not stop")
        pid = None
    if pid:
        return
    log.info("starting slurmd on %s", node.name)
    conf = ["-f", str(layout.node_slurm_conf(node))] if cgroup_procs else []
    start_daemon(on_node(layout, node, ["slurmd", *conf, "-N", node.name], cgroup_procs),
                 log_file=layout.log_dir / f"slurmd-{node.name}-start.log", what=f"slurmd on {node.name}")
    pid = _wait(lambda: slurmd_pid(layout, node), 15)
    if not pid:
        raise LabError(f"slurmd on {node.name} did not stay up; see {layout.log_dir}/slurmd-{node.name}.log")
    state.pids[f"slurmd-{node.name}"] = pid


def start_sshd(layout: Layout, node: Node, state: LabState, cgroup_procs: Sequence[Path] = ()) -> None:
    pid = sshd_pid(layout, node)
    if pid and not placed(layout, node, pid, cgroup_procs):
        # sessions already open keep their own sshd process: only the listener moves
        log.info("restarting sshd on %s inside the node's namespaces", node.name)
        procs.terminate([pid], what=f"sshd on {node.name}")
        pid = None
    if pid:
        return
    log.info("starting sshd on %s (%s)", node.name, node.addr)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    start_daemon(on_node(layout, node, [
        "/usr/sbin/sshd", "-o", f"ListenAddress={node.addr}", "-o", f"PidFile={layout.sshd_pidfile(node)}"],
        cgroup_procs),
        log_file=layout.log_dir / f"sshd-{node.name}.log", what=f"sshd on {node.name}")
    pid = _wait(lambda: sshd_pid(layout, node), 10)
    if not pid:
        raise LabError(f"sshd on {node.name} did not stay up; see {layout.log_dir}/sshd-{node.name}.log")
    state.pids[f"sshd-{node.name}"] = pid


def restart_node(layout: Layout, node: Node, state: LabState) -> None:
    """``node``'s slurmd and sshd restarted inside all of the node's namespaces, its mount namespace
    (own /tmp and /local) made first if it has none: how a running lab gets node-local storage
    without ``lab down``. Daemons already in place are left alone. Job steps that run keep their
    slurmstepd and the files they started with (the host's /tmp); open SSH sessions keep their
    own sshd process; what starts after sees the node's own."""
    if node.name not in state.nodes:
        raise LabError(f"{node.name} is not a node of this lab (nodes: {', '.join(state.nodes) or 'none'})")
    node_cgroups = cgroups.ensure_node(layout, node, state.cgroup_trees) if state.cgroups == "per-node" else []
    mounts.ensure_node(layout, node)
    start_slurmd(layout, node, state, node_cgroups)
    start_sshd(layout, node, state, node_cgroups)
    wait_ready(layout, [node])


def wait_ready(layout: Layout, nodes: list[Node], timeout: float = 90) -> dict[str, str]:
    """Wait until Slurm reports every node ready and every node's sshd accepts connections."""
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    ssh_ok: dict[str, bool] = {}
    while True:
        try:
            states = slurm.node_states(timeout=10)
        except SchedulerError as e:
            log.debug("sinfo not answering yet: %s", e)
        ssh_ok = {n.name: ssh_ok.get(n.name) or network.tcp_open(n.addr, SSH_PORT, 0.5) for n in nodes}
        if all(states.get(n.name) in slurm.READY_STATES and ssh_ok[n.name] for n in nodes):
            return states
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)
    waiting = [f"{n.name}: slurm {states.get(n.name, 'unknown')}, ssh {'up' if ssh_ok.get(n.name) else 'closed'}"
               for n in nodes]
    raise LabError(f"the lab nodes were not ready within {timeout:g} s ({'; '.join(waiting)}); "
                   f"see the logs in {layout.log_dir}")


def stop_slurm(layout: Layout, *, cancel_jobs: bool = True, timeout: float = 20) -> None:
    """Cancel every job, ``scontrol shutdown``, then stop what is left through the pid files."""
    pidfiles = [layout.slurmctld_pidfile(), *sorted(layout.run_dir.glob("slurmd-*.pid"))]
    pids = [pid for f in pidfiles if (pid := procs.daemon_pid(f, "slurm"))]
    if not pids:
        return
    if slurmctld_pid(layout):
        if cancel_jobs:
            try:
                slurm.cancel_all_jobs()
                _wait(lambda: not slurm.job_ids(), 15)
            except SchedulerError as e:
                log.warning("could not cancel the lab's jobs: %s", e)
        log.info("stopping Slurm (scontrol shutdown)")
        slurm.shutdown()
    left = procs.wait_gone(pids, timeout)
    if left:
        procs.terminate(left, what="slurm daemon")


def stop_sshd(layout: Layout) -> None:
    pids = [pid for f in sorted(layout.run_dir.glob("sshd-*.pid")) if (pid := procs.daemon_pid(f, "sshd"))]
    if pids:
        log.info("stopping %d sshd", len(pids))
        procs.terminate(pids, what="sshd")


def stop_node_processes(netns: str) -> None:
    """Whatever still runs inside a node's namespace (job steps, ssh sessions) belongs to the lab."""
    out = run(["ip", "netns", "pids", netns], check=False).stdout
    pids = [int(p) for p in out.split() if p.isdigit()]
    if pids:
        log.info("stopping %d leftover process(es) on %s", len(pids), netns)
        procs.terminate(pids, what=f"process in {netns}")


def _wait(check, timeout: float, interval: float = 0.1):
    """Call ``check`` until it returns something true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
