"""How the master turns a node name into an SSH target: the user's ~/.ssh/config, OpenSSH's defaults."""

from __future__ import annotations

import io
import os

import paramiko
import pytest

from dxflow.errors import AgentUnreachable
from dxflow.master import tunnels


def config(text: str) -> paramiko.SSHConfig:
    return paramiko.SSHConfig.from_file(io.StringIO(text))


def test_ssh_config_is_followed():
    cfg = config("Host n*\n  HostName %h.cluster.example\n  User svc\n  Port 2222\n"
                 "  IdentityFile ~/.ssh/special\n  ProxyJump gateway\n"
                 "  UserKnownHostsFile ~/.ssh/cluster_hosts\n")
    t = tunnels.resolve("n7", cfg)
    assert (t.hostname, t.user, t.port) == ("n7.cluster.example", "svc", 2222)
    assert t.key_files == [os.path.expanduser("~/.ssh/special")]
    assert t.proxy_jump == "gateway"
    assert t.known_hosts == (os.path.expanduser("~/.ssh/cluster_hosts"),)


def test_defaults_without_config():
    t = tunnels.resolve("n1", config(""))
    assert t.hostname == "n1" and t.port == 22 and t.proxy_jump == "" and t.key_files == []
    assert "/etc/ssh/ssh_known_hosts" in t.known_hosts
    assert os.path.expanduser("~/.ssh/known_hosts") in t.known_hosts


def test_gcm_preferred_and_every_default_cipher_kept():
    prefs = tunnels.GCMFirstTransport._preferred_ciphers
    assert prefs[0] == "aes128-gcm@openssh.com"
    assert set(prefs) == set(paramiko.Transport._preferred_ciphers)


def test_unreachable_node_backs_off(monkeypatch):
    pool = tunnels.TunnelPool(config("Host nowhere\n  HostName 127.0.0.1\n  Port 1\n"))
    calls = []

    def refuse(*a, **kw):
        calls.append(1)
        raise ConnectionRefusedError("refused")
    monkeypatch.setattr(tunnels.socket, "create_connection", refuse)
    with pytest.raises(AgentUnreachable, match="cannot connect by SSH"):
        pool.transport("nowhere")
    with pytest.raises(AgentUnreachable, match="next try in"):
        pool.transport("nowhere")  # within the backoff: not tried again
    assert len(calls) == 1
    assert pool.status()["nowhere"]["failures"] == 1
