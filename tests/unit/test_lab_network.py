"""Names and addresses of the lab: pure pieces of the network module."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from dxflow.lab import network
from dxflow.lab.layout import Layout, Node


def test_node_names_and_addresses_stay_in_the_lab_subnet() -> None:
    subnet = ipaddress.ip_network("10.77.0.0/24")
    layout = Layout()
    for node in layout.nodes(64):
        assert ipaddress.ip_address(node.addr) in subnet
        assert len(node.veth) <= 15  # Linux interface names
    assert ipaddress.ip_address(layout.host_addr) in subnet
    n = Node(3)
    assert (n.name, n.addr, n.netns, n.veth) == ("n3", "10.77.0.13", "dxlab-n3", "dxlab-v3")
    assert str(n.netns_path) == "/var/run/netns/dxlab-n3"


def test_hosts_lines() -> None:
    layout = Layout()
    assert network.hosts_lines(layout, layout.nodes(2)) == [
        "10.77.0.1 dxlab-login", "10.77.0.11 n1", "10.77.0.12 n2"]


def test_host_keys_and_known_hosts(tmp_path: Path) -> None:
    (tmp_path / "ssh_host_ed25519_key.pub").write_text("ssh-ed25519 AAAAED root@vm\n")
    (tmp_path / "ssh_host_rsa_key.pub").write_text("ssh-rsa AAAARSA root@vm\n")
    (tmp_path / "ssh_host_ed25519_key").write_text("PRIVATE")
    (tmp_path / "ssh_host_broken_key.pub").write_text("\n")
    keys = network.host_keys(tmp_path)
    assert keys == ["ssh-ed25519 AAAAED", "ssh-rsa AAAARSA"]
    layout = Layout()
    assert network.known_hosts_lines(layout, layout.nodes(2), keys) == [
        "n1,10.77.0.11 ssh-ed25519 AAAAED", "n1,10.77.0.11 ssh-rsa AAAARSA",
        "n2,10.77.0.12 ssh-ed25519 AAAAED", "n2,10.77.0.12 ssh-rsa AAAARSA"]


def test_node_argv_uses_nsenter_not_ip_netns_exec(tmp_path: Path) -> None:
    layout = Layout(runtime=tmp_path)
    argv = network.node_argv(layout, Node(1), ["slurmd", "-N", "n1"])
    assert argv == ["nsenter", "--net=/var/run/netns/dxlab-n1", f"--uts={tmp_path}/uts/n1", "slurmd", "-N", "n1"]


def test_tcp_open_on_a_closed_port() -> None:
    assert network.tcp_open("127.0.0.1", 1, timeout=0.2) is False
