"""slurm.conf for the lab (rendered from data) and the few Slurm commands the lab runs."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dxflow.errors import ConfigError, SchedulerError
from dxflow.lab.layout import Layout, Node
from dxflow.lab.runner import run

log = logging.getLogger(__name__)

MARKER = "# Written by `dxflow lab up`; `dxflow lab down` removes it (and restores the site's own)."

# Settings every supported version takes (verified on 22.05; 24.11 reads the same keys).
BASE_SETTINGS: dict[str, str] = {
    "SlurmUser": "slurm",
    "AuthType": "auth/munge",
    "MpiDefault": "none",
    "ProctrackType": "proctrack/linuxproc",   # no cgroups needed
    "TaskPlugin": "task/none",
    "SelectType": "select/cons_tres",
    "SelectTypeParameters": "CR_Core",
    "SchedulerType": "sched/backfill",
    "ReturnToService": "2",                   # a node that registers again comes back by itself
    "PrologFlags": "Alloc",                   # prolog on every node at allocation time
    "MinJobAge": "300",
    "MailProg": "/bin/true",                  # no mail on a lab machine (slurmctld logs an error otherwise)
    "KillWait": "5",
    "JobCompType": "jobcomp/none",
    "JobAcctGatherType": "jobacct_gather/none",
    "AccountingStorageType": "accounting_storage/none",
}

# Where each node has cgroups of its own (dxflow.lab.cgroups): Slurm as production sites run it —
# processes tracked, limited and killed by cgroup, and the job's extern step made at allocation on
# every node (PrologFlags=Contain), the cgroup pam_slurm_adopt (and dxflow's agent) join.
# Memory becomes a consumable resource: task/cgroup limits a job to what it was allocated (with
# CR_Core a job's --mem is not allocated and its cgroup gets the whole machine's memory: seen on 22.05,
# "_memcg_initialize: job: alloc=0MB mem.limit=24105MB"). DefMemPerCPU (render_slurm_conf) keeps a job
# that asks for no memory from taking the whole node.
CGROUP_SETTINGS: dict[str, str] = {
    "ProctrackType": "proctrack/cgroup",
    "TaskPlugin": "task/cgroup,task/affinity",
    "PrologFlags": "Alloc,Contain",
    "SelectTypeParameters": "CR_Core_Memory",
}

# Differences between Slurm versions, as data: (first version, settings added or
# replaced). None were needed between 22.05 and 24.11 so far; add rows here rather
# than branching in code.
VERSION_SETTINGS: list[tuple[tuple[int, int], dict[str, str]]] = []

# cgroup.conf is written only where slurmd needs one: on a unified (v2) cgroup
# hierarchy without systemd, slurmd's cgroup/v2 plugin would otherwise ask systemd
# (over D-Bus) for a scope and fail. On v1 or hybrid hosts (Debian 12 here) slurmd
# runs without the file.
CGROUP_V2_CONF: dict[str, str] = {
    "CgroupPlugin": "cgroup/v2",
    "IgnoreSystemd": "yes",
}

# Where the nodes have no cgroups of their own: Slurm 23.02 and later load a cgroup plugin even with
# proctrack/linuxproc and task/none, and slurmd stops on "No filesystem mounted on /sys/fs/cgroup"
# (seen on 24.11 and 26.05 in their roots, docs/lab.md); "disabled" is 23.02's. 22.05 has no such value.
NO_CGROUPS_CONF: list[tuple[tuple[int, int], dict[str, str]]] = [
    ((23, 2), {"CgroupPlugin": "disabled"}),
]


def cgroup_conf_for(version: tuple[int, ...], use_cgroups: bool, cgroup_root: Path = Path("/sys/fs/cgroup"),
                    systemd_dir: Path = Path("/run/systemd/system")) -> dict[str, str]:
    """The lab's /etc/slurm/cgroup.conf settings ({} for none): per-node cgroups write their own."""
    if use_cgroups:
        return {}
    if cgroup_conf_needed(cgroup_root, systemd_dir):
        return dict(CGROUP_V2_CONF)
    settings: dict[str, str] = {}
    for since, extra in NO_CGROUPS_CONF:
        if tuple(version[:2]) >= since:
            settings.update(extra)
    return settings


# "planned": up, and held by the backfill scheduler for a pending job (22.05+: sinfo says so when a
# job waits for a node that others still use).
READY_STATES = frozenset({"idle", "mixed", "allocated", "completing", "planned"})


@dataclass(frozen=True)
class NodeShape:
    """What each lab node claims to have."""

    cpus: int
    real_memory_mb: int


def parse_version(text: str) -> tuple[int, int, int]:
    """``slurmd -V`` output (``slurm-wlm 22.05.8``, ``slurm 24.11.5``) -> (22, 5, 8)."""
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise SchedulerError(f"cannot read the Slurm version from {text.strip()!r}")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


def slurm_version() -> tuple[int, int, int]:
    return parse_version(run(["slurmd", "-V"], error=SchedulerError, what="asking slurmd its version").stdout)


def node_shape(node_count: int) -> NodeShape:
    """All CPUs this process may use, and about a quarter of the RAM split over the nodes."""
    cpus = len(os.sched_getaffinity(0))
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return NodeShape(cpus=cpus, real_memory_mb=max(1, mem_kb // 1024 // 4 // max(1, node_count)))


def version_text(version: tuple[int, ...]) -> str:
    """(22, 5, 8) -> ``22.05.8``, the way Slurm writes it."""
    return f"{version[0]}.{version[1]:02d}.{version[2] if len(version) > 2 else 0}"


def settings_for(version: tuple[int, ...], cgroups: bool = False) -> dict[str, str]:
    settings = dict(BASE_SETTINGS)
    if cgroups:
        settings.update(CGROUP_SETTINGS)
    for since, extra in VERSION_SETTINGS:
        if tuple(version[:2]) >= since:
            settings.update(extra)
    return settings


def render_slurm_conf(layout: Layout, nodes: list[Node], shape: NodeShape,
                      version: tuple[int, ...] = (22, 5, 0), cgroups: bool = False) -> str:
    """The lab's whole slurm.conf (pure: same input, same text)."""
    lines = [
        MARKER,
        f"ClusterName={layout.cluster_name}",
        f"SlurmctldHost={layout.login_name}({layout.host_addr})",
    ]
    lines += [f"{key}={value}" for key, value in settings_for(version, cgroups).items()]
    if cgroups:  # a job without --mem gets a CPU's share of its node: as many jobs fit as before
        lines.append(f"DefMemPerCPU={max(1, shape.real_memory_mb // max(1, shape.cpus))}")
    lines += [
        f"Prolog={layout.prolog}",
        f"Epilog={layout.epilog}",
        f"StateSaveLocation={layout.statesave_dir}",
        f"SlurmdSpoolDir={layout.spool_dir}/%n",
        f"SlurmctldPidFile={layout.slurmctld_pidfile()}",
        f"SlurmdPidFile={layout.run_dir}/slurmd-%n.pid",
        f"SlurmctldLogFile={layout.log_dir}/slurmctld.log",
        f"SlurmdLogFile={layout.log_dir}/slurmd-%n.log",
        "",
    ]
    lines += [f"NodeName={n.name} NodeAddr={n.addr} CPUs={shape.cpus} RealMemory={shape.real_memory_mb} State=UNKNOWN"
              for n in nodes]
    lines.append(f"PartitionName={layout.partition} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def render_cgroup_conf(settings: dict[str, str]) -> str:
    return MARKER + "\n" + "".join(f"{k}={v}\n" for k, v in settings.items())


def cgroup_conf_needed(cgroup_root: Path = Path("/sys/fs/cgroup"), systemd_dir: Path = Path("/run/systemd/system")) -> bool:
    """True on a pure cgroup v2 host that does not run systemd (see ``CGROUP_V2_CONF``)."""
    return (cgroup_root / "cgroup.controllers").exists() and not systemd_dir.is_dir()


def is_lab_file(path: Path) -> bool:
    try:
        with open(path) as f:
            return f.readline().rstrip("\n") == MARKER
    except OSError:
        return False


def check_backup_free(path: Path) -> None:
    """Fail before anything is built when ``write_config`` could not save the site's file."""
    if path.exists() and not is_lab_file(path) and Layout.backup_of(path).exists():
        raise ConfigError(f"{path} is not the lab's and {Layout.backup_of(path)} already exists; "
                          f"move one of them away, then run `dxflow lab up` again")


def write_config(path: Path, text: str, backups: dict[str, str]) -> bool:
    """Write ``path`` (0644); first move a site's own file to ``*.dxflow-lab-backup``.

    ``backups`` (from the state file) records original -> backup. True if the text changed.
    """
    if path.exists() and not is_lab_file(path):
        check_backup_free(path)
        backup = Layout.backup_of(path)
        log.info("saving the site's %s as %s", path, backup)
        os.replace(path, backup)
        backups[str(path)] = str(backup)
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return True


def remove_config(path: Path, backups: dict[str, str]) -> None:
    """Remove the lab's file and put the site's own back when one was saved."""
    if is_lab_file(path):
        path.unlink()
    backup = backups.get(str(path))
    if backup and Path(backup).exists():
        if path.exists():
            log.warning("%s was replaced meanwhile; leaving the site's copy at %s", path, backup)
        else:
            log.info("restoring %s", path)
            os.replace(backup, path)


# --- commands -------------------------------------------------------------------

def parse_sinfo_nodes(output: str) -> dict[str, str]:
    """``sinfo -h -N -o '%N %T'`` -> node -> state. Sample lines: ``n1 idle``, ``n2 down*``."""
    states: dict[str, str] = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1].lower()
    return states


def node_states(timeout: float = 10) -> dict[str, str]:
    out = run(["sinfo", "-h", "-N", "-o", "%N %T"], error=SchedulerError, timeout=timeout,
              what="asking Slurm for its nodes").stdout
    return parse_sinfo_nodes(out)


def job_ids() -> list[str]:
    """Ids of every job slurmctld still knows (``squeue -h -o %i``)."""
    out = run(["squeue", "-h", "-o", "%i"], error=SchedulerError, what="listing jobs").stdout
    return [line.strip() for line in out.splitlines() if line.strip()]


def cancel_all_jobs() -> None:
    ids = job_ids()
    if ids:
        log.info("cancelling %d job(s)", len(ids))
        run(["scancel", *ids], check=False, error=SchedulerError)


def shutdown() -> bool:
    """``scontrol shutdown`` (slurmctld and every slurmd). False when nothing answered."""
    return run(["scontrol", "shutdown"], check=False, error=SchedulerError, timeout=30).returncode == 0
