"""The agent's view of its node's ports (:mod:`dxflow.agent.ports`, :mod:`dxflow.edge.tcptable`):
who listens where, and ``/api/ports``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from dxflow.agent import ports
from dxflow.edge import tcptable
from dxflow.errors import AccessDenied, NotFound, UsageError


# -- /proc/net/tcp ----------------------------------------------------------------------------------------

PROC_NET_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:223D 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 43121 1 0 100 0 0 10 0
   1: 00000000:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1001        0 43122 1 0 100 0 0 10 0
   2: 0100007F:C350 0100007F:223D 01 00000000:00000000 00:00000000 00000000  1000        0 43123 1 0 20 4 30 10 -1
   3: 024D0A0A:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 43124 1 0 100 0 0 10 0
"""
PROC_NET_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:2242 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5001 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:2243 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5002 1 0 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:2244 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 5003 1 0 100 0 0 10 0
"""


def test_parse_proc_net_tcp_listeners_only():
    found = tcptable.parse_listeners(PROC_NET_TCP)
    assert [(s.address, s.port, s.uid, s.inode) for s in found] == [
        ("127.0.0.1", 8765, 1000, 43121), ("0.0.0.0", 8080, 1001, 43122), ("10.10.77.2", 80, 1000, 43124)]
    six = tcptable.parse_listeners(PROC_NET_TCP6)
    assert [(s.address, s.port) for s in six] == [("::", 8770), ("::1", 8771), ("::ffff:127.0.0.1", 8772)]


def test_parse_proc_net_tcp_skips_garbage():
    assert tcptable.parse_listeners("header\n 0: zz:1 00:00 0A 0 0 0 1000 0 1\n\nshort line\n") == []


def L(address, port, uid, inode):
    return tcptable.Listener(address, port, uid, inode)


def test_check_port_mine_other_missing_own(monkeypatch):
    uid = os.getuid()
    found = [L("0.0.0.0", 8000, uid, 1), L("127.0.0.1", 8001, uid + 1, 2), L("::1", 8002, uid, 3),
             L("10.77.0.2", 8003, uid, 4), L("::", 8004, uid, 5), L("127.0.0.1", 8004, uid + 1, 6),
             L("127.0.0.1", 8005, uid, 7), L("10.77.0.2", 8006, uid + 1, 8)]
    owners = {1: 100, 3: 101, 4: 102, 5: 103, 7: os.getpid()}
    assert ports.check_port(8000, found, owners)["connect"] == "127.0.0.1"
    assert ports.check_port(8002, found, owners)["connect"] == "::1"
    assert ports.check_port(8003, found, owners)["connect"] == "10.77.0.2"
    with pytest.raises(AccessDenied, match="another user"):
        ports.check_port(8001, found, owners)
    with pytest.raises(AccessDenied, match="another user"):  # ours on ::, someone else's on 127.0.0.1
        ports.check_port(8004, found, owners)
    with pytest.raises(AccessDenied, match="agent's own"):
        ports.check_port(8005, found, owners)
    with pytest.raises(AccessDenied):
        ports.check_port(8006, found, owners)
    with pytest.raises(NotFound, match="nothing listens"):
        ports.check_port(9999, found, owners)
    with pytest.raises(UsageError):
        ports.check_port(70000, found, owners)


def test_check_port_same_uid_but_socket_not_held_by_our_processes():
    found = [L("0.0.0.0", 8000, os.getuid(), 1)]
    with pytest.raises(AccessDenied):
        ports.check_port(8000, found, {})


@pytest.fixture
def listener():
    """A process of ours (not the test process) listening on a free port of 127.0.0.1."""
    code = ("import socket,sys,time; s=socket.socket(); s.bind(('127.0.0.1',0)); s.listen(); "
            "print(s.getsockname()[1], flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    port = int(proc.stdout.readline())
    yield proc, port
    proc.kill()
    proc.wait()


def test_own_ports_real_proc(listener, agent):
    proc, port = listener
    mine = {p["port"]: p for p in ports.own_ports()}
    assert port in mine and mine[port]["pid"] == proc.pid and mine[port]["process"].startswith("python")
    assert ports.check_port(port)["pid"] == proc.pid
    client, _, headers = agent
    body = client.get("/api/ports", headers=headers).get_json()
    assert any(p["port"] == port and p["address"] == "127.0.0.1" for p in body)
    assert client.get(f"/api/ports/{port}", headers=headers).get_json()["connect"] == "127.0.0.1"


def test_own_ports_excludes_the_agents_own_sockets(agent):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        assert port not in {p["port"] for p in ports.own_ports()}
        client, _, headers = agent
        resp = client.get(f"/api/ports/{port}", headers=headers)
        assert resp.status_code == 403 and "own port" in resp.get_json()["message"]
        assert client.get(f"/proxy/{port}/", headers=headers).status_code == 403
    finally:
        s.close()


def test_sock_diag_agrees_with_proc_net_tcp():
    """Both sources of listeners see the same sockets (IPv4 and IPv6) in this namespace."""
    code = ("import socket,time; a=socket.socket(); a.bind(('127.0.0.1',0)); a.listen(); "
            "b=socket.socket(socket.AF_INET6); b.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0); "
            "b.bind(('::',0)); b.listen(); print(a.getsockname()[1], b.getsockname()[1], flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        p4, p6 = map(int, proc.stdout.readline().split())
        diag = tcptable.diag_listeners(socket.AF_INET) + tcptable.diag_listeners(socket.AF_INET6)
        table = []
        for path in tcptable.PROC_TABLES:
            with open(path) as f:
                table += tcptable.parse_listeners(f.read())
        ours = lambda found: {s for s in found if s.port in (p4, p6)}  # noqa: E731
        assert ours(diag) == ours(table)
        assert {(s.address, s.port) for s in ours(diag)} == {("127.0.0.1", p4), ("::", p6)}
        assert ports.check_port(p6)["connect"] == "127.0.0.1"  # dual-stack: reached on 127.0.0.1
    finally:
        proc.kill()
        proc.wait()
