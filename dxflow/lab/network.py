"""The lab's network and names: a bridge, one namespace pair per node, /etc/hosts, host keys.

Each node is a network namespace (``ip netns``) joined to the bridge ``dxlab0`` by a
veth pair, plus a UTS namespace kept alive by a bind mount so that everything
started "on" the node (slurmd, sshd, and through them jobs and shells) sees the
node's own host name.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
from pathlib import Path

from dxflow.errors import ConfigError
from dxflow.lab import blocks, mounts
from dxflow.lab.layout import Layout, Node
from dxflow.lab.runner import run, succeeds

log = logging.getLogger(__name__)

NODE_IFACE = "eth0"  # the node side of its veth pair, inside the node's namespace


# --- bridge and namespaces ---------------------------------------------------

def link_exists(name: str) -> bool:
    return succeeds(["ip", "link", "show", "dev", name])


def netns_names() -> list[str]:
    """Names listed by ``ip netns list`` (lines like ``dxlab-n1 (id: 0)``)."""
    out = run(["ip", "netns", "list"], what="listing network namespaces").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def lab_netns_names() -> list[str]:
    """The lab's node namespaces that exist now, whatever the state file says."""
    return [n for n in netns_names() if n.startswith("dxlab-n") and n[len("dxlab-n"):].isdigit()]


def addresses(netns: str | None = None) -> dict[str, list[str]]:
    """Interface name -> its IPv4 addresses with prefix length (``ip -j addr show``)."""
    argv = ["ip", "-j"] + (["-n", netns] if netns else []) + ["-4", "addr", "show"]
    data = json.loads(run(argv, what="listing addresses").stdout or "[]")
    return {item["ifname"]: [f"{a['local']}/{a['prefixlen']}" for a in item.get("addr_info", [])]
            for item in data}


def check_subnet_free(layout: Layout) -> None:
    """Refuse to build the lab on a machine that already uses its /24 elsewhere."""
    subnet = ipaddress.ip_network(f"{layout.prefix}.0/24")
    for iface, addrs in addresses().items():
        for addr in addrs:
            if iface != layout.bridge and ipaddress.ip_interface(addr).network.overlaps(subnet):
                raise ConfigError(f"{addr} on {iface} overlaps the lab network {subnet}; "
                                  f"the lab cannot run beside it")


def ensure_bridge(layout: Layout) -> None:
    """The bridge ``dxlab0`` with the login node's address, up."""
    if not link_exists(layout.bridge):
        log.info("creating bridge %s (%s/24)", layout.bridge, layout.host_addr)
        run(["ip", "link", "add", layout.bridge, "type", "bridge"], what="creating the lab bridge")
    want = f"{layout.host_addr}/24"
    if want not in addresses().get(layout.bridge, []):
        run(["ip", "addr", "add", want, "dev", layout.bridge], what="addressing the lab bridge")
    run(["ip", "link", "set", layout.bridge, "up"], what="bringing the lab bridge up")


def ensure_node_net(layout: Layout, node: Node) -> None:
    """Namespace ``dxlab-n{i}``, veth into the bridge, ``10.77.0.{10+i}/24`` inside, lo up."""
    if node.netns not in netns_names():
        log.info("creating namespace %s for %s (%s)", node.netns, node.name, node.addr)
        run(["ip", "netns", "add", node.netns], what=f"creating the namespace of {node.name}")
    if not link_exists(node.veth):
        run(["ip", "link", "add", node.veth, "type", "veth", "peer", "name", NODE_IFACE, "netns", node.netns],
            what=f"connecting {node.name} to the bridge")
    run(["ip", "link", "set", node.veth, "master", layout.bridge, "up"], what=f"connecting {node.name} to the bridge")
    want = f"{node.addr}/24"
    if want not in addresses(node.netns).get(NODE_IFACE, []):
        run(["ip", "-n", node.netns, "addr", "add", want, "dev", NODE_IFACE], what=f"addressing {node.name}")
    run(["ip", "-n", node.netns, "link", "set", NODE_IFACE, "up"], what=f"bringing {node.name} up")
    run(["ip", "-n", node.netns, "link", "set", "lo", "up"], what=f"bringing {node.name} up")


def remove_node_net(netns: str) -> None:
    """Delete a node's namespace and its veth pair; already gone is fine."""
    veth = "dxlab-v" + netns[len("dxlab-n"):]
    if link_exists(veth):
        run(["ip", "link", "del", veth], check=False)
    if netns in netns_names():
        run(["ip", "netns", "del", netns], what=f"deleting namespace {netns}")


def remove_bridge(layout: Layout) -> None:
    if link_exists(layout.bridge):
        run(["ip", "link", "del", layout.bridge], what="deleting the lab bridge")


# --- host names (UTS namespaces) ---------------------------------------------

def ensure_uts(layout: Layout, host: str) -> Path:
    """A UTS namespace whose host name is ``host``, kept alive by a bind mount on a file."""
    path = layout.uts_file(host)
    if path.exists() and run(["nsenter", f"--uts={path}", "hostname"], check=False).stdout.strip() == host:
        return path
    remove_uts(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o644)
    run(["unshare", f"--uts={path}", "hostname", host], what=f"giving {host} its host name")
    return path


def remove_uts(path: Path) -> None:
    """Unmount and delete a UTS namespace file; already gone is fine."""
    if not path.exists():
        return
    while run(["umount", path], check=False).returncode == 0:
        pass  # a file may carry more than one mount after an interrupted run
    path.unlink(missing_ok=True)


def node_argv(layout: Layout, node: Node, argv: list[str]) -> list[str]:
    """``argv`` run on ``node``: in its network namespace and with its host name.

    ``nsenter --net``, not ``ip netns exec``: the latter remounts /sys, the cgroup
    mounts vanish and slurmd stops with "No filesystem mounted on /sys/fs/cgroup".
    With its mount namespace, once it has one (its own /tmp and /local, dxflow.lab.mounts).
    """
    own = [f"--mount={mounts.ns_file(layout, node)}"] if mounts.has_namespace(layout, node) else []
    return ["nsenter", f"--net={node.netns_path}", f"--uts={layout.uts_file(node.name)}", *own, *argv]


# --- names and host keys -------------------------------------------------------

def hosts_lines(layout: Layout, nodes: list[Node]) -> list[str]:
    """The /etc/hosts block: what a cluster's DNS would answer."""
    return [f"{layout.host_addr} {layout.login_name}"] + [f"{n.addr} {n.name}" for n in nodes]


def host_keys(ssh_dir: Path) -> list[str]:
    """``TYPE KEY`` of every ``ssh_host_*_key.pub`` (comments dropped), sorted by file name."""
    keys = []
    for pub in sorted(ssh_dir.glob("ssh_host_*_key.pub")):
        parts = pub.read_text().split()
        if len(parts) >= 2:
            keys.append(f"{parts[0]} {parts[1]}")
    return keys


def known_hosts_lines(layout: Layout, nodes: list[Node], keys: list[str]) -> list[str]:
    """Every node shares /etc/ssh, so every node presents the same host keys."""
    return [f"{n.name},{n.addr} {key}" for n in nodes for key in keys]


def ensure_names(layout: Layout, nodes: list[Node]) -> None:
    """Host keys, the /etc/hosts block and the ssh_known_hosts block."""
    run(["ssh-keygen", "-A"], what="making the SSH host keys")
    keys = host_keys(layout.ssh_dir)
    if not keys:
        raise ConfigError(f"no SSH host keys in {layout.ssh_dir} after `ssh-keygen -A`")
    blocks.set_block(layout.hosts_file, hosts_lines(layout, nodes))
    blocks.set_block(layout.known_hosts, known_hosts_lines(layout, nodes, keys))
    os.chmod(layout.known_hosts, 0o644)


def remove_names(layout: Layout) -> None:
    blocks.drop_block(layout.hosts_file)
    blocks.drop_block(layout.known_hosts)
    # an empty ssh_known_hosts is one the lab created (never /etc/hosts: other tools own it)
    if layout.known_hosts.exists() and layout.known_hosts.stat().st_size == 0:
        layout.known_hosts.unlink()


def tcp_open(addr: str, port: int, timeout: float = 1.0) -> bool:
    """True when something accepts a TCP connection at ``addr:port``."""
    try:
        with socket.create_connection((addr, port), timeout=timeout):
            return True
    except OSError:
        return False
