"""Names, addresses and paths of every piece of the lab — data only, nothing runs here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

# The lab never uses an address outside this /24.
SUBNET_PREFIX = "10.77.0"
MAX_NODES = 64


@dataclass(frozen=True)
class Node:
    """One compute node of the lab: ``n{index}`` at ``10.77.0.{10 + index}``."""

    index: int
    prefix: str = SUBNET_PREFIX

    @property
    def name(self) -> str:
        return f"n{self.index}"

    @property
    def addr(self) -> str:
        return f"{self.prefix}.{10 + self.index}"

    @property
    def netns(self) -> str:
        """Network namespace name (``ip netns``)."""
        return f"dxlab-n{self.index}"

    @property
    def netns_path(self) -> Path:
        return Path("/var/run/netns") / self.netns

    @property
    def veth(self) -> str:
        """Host side of the node's veth pair (the node side is ``eth0``)."""
        return f"dxlab-v{self.index}"


@dataclass(frozen=True)
class Layout:
    """Where the lab puts things. Tests build one under a temporary directory."""

    root: Path = Path("/var/lib/dxflow-lab")
    runtime: Path = Path("/run/dxflow-lab")
    venv: Path = Path("/opt/dxflow/venv")
    base_python: Path = Path("/usr/bin/python3")
    bin_link: Path = Path("/usr/local/bin/dxflow")
    hooks_dir: Path = Path("/etc/dxflow/hooks")
    slurm_dir: Path = Path("/etc/slurm")
    hosts_file: Path = Path("/etc/hosts")
    known_hosts: Path = Path("/etc/ssh/ssh_known_hosts")
    ssh_dir: Path = Path("/etc/ssh")
    munge_run: Path = Path("/run/munge")
    bridge: str = "dxlab0"
    prefix: str = SUBNET_PREFIX
    cluster_name: str = "dxlab"
    login_name: str = "dxlab-login"
    partition: str = "debug"
    users: tuple[str, ...] = field(default=("alice", "bob"))

    # --- addresses -------------------------------------------------------------
    @property
    def host_addr(self) -> str:
        """The bridge address: the login node as the compute nodes see it."""
        return f"{self.prefix}.1"

    def nodes(self, count: int) -> list[Node]:
        return [Node(i, self.prefix) for i in range(1, count + 1)]

    # --- files -----------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def run_dir(self) -> Path:
        """Pid files (owned by slurm: slurmctld writes its own)."""
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def spool_dir(self) -> Path:
        """Parent of every ``SlurmdSpoolDir`` (``spool/%n``)."""
        return self.root / "spool"

    @property
    def statesave_dir(self) -> Path:
        return self.root / "slurmctld"

    @property
    def uts_dir(self) -> Path:
        """Bind mounts that keep each node's UTS namespace (its host name) alive."""
        return self.runtime / "uts"

    def uts_file(self, host: str) -> Path:
        return self.uts_dir / host

    @property
    def node_etc(self) -> Path:
        """One config folder per node: a link to slurm.conf and the node's own cgroup.conf."""
        return self.root / "etc"

    def node_conf_dir(self, node: Node) -> Path:
        return self.node_etc / node.name

    def node_slurm_conf(self, node: Node) -> Path:
        """What the node's slurmd is started with (``slurmd -f``): it reads cgroup.conf beside it."""
        return self.node_conf_dir(node) / "slurm.conf"

    def node_cgroup_conf(self, node: Node) -> Path:
        return self.node_conf_dir(node) / "cgroup.conf"

    def cgroup_mount(self, node: Node) -> Path:
        """The node's cgroup trees, mounted from inside its cgroup namespace (its CgroupMountpoint)."""
        return self.runtime / "cgroup" / node.name

    def cgns_file(self, node: Node) -> Path:
        """Bind mount that keeps the node's cgroup namespace alive."""
        return self.runtime / "cgns" / node.name

    @property
    def slurm_conf(self) -> Path:
        return self.slurm_dir / "slurm.conf"

    @property
    def cgroup_conf(self) -> Path:
        return self.slurm_dir / "cgroup.conf"

    @staticmethod
    def backup_of(path: Path) -> Path:
        return path.with_name(path.name + ".dxflow-lab-backup")

    def slurmctld_pidfile(self) -> Path:
        return self.run_dir / "slurmctld.pid"

    def slurmd_pidfile(self, node: Node) -> Path:
        return self.run_dir / f"slurmd-{node.name}.pid"

    def sshd_pidfile(self, node: Node) -> Path:
        return self.run_dir / f"sshd-{node.name}.pid"

    @property
    def munged_pidfile(self) -> Path:
        return self.munge_run / "munged.pid"

    @property
    def prolog(self) -> Path:
        return self.hooks_dir / "slurm-prolog"

    @property
    def epilog(self) -> Path:
        return self.hooks_dir / "slurm-epilog"
