"""The master's ``POST /api/broadcast/JOB/peers`` (:mod:`dxflow.master.broadcast`): per node, what a
broadcast's agents need to reach each other, with a token good for that one agent only — a real Fleet and
real agent apps; the controller and SSH are the faked seams of ``tests/conftest.py``."""

from __future__ import annotations

import getpass
import socket

import pytest

from dxflow.auth import fingerprint, verify_token
from dxflow.errors import AuthError
from dxflow.master.app import create_app

USER = getpass.getuser()


@pytest.fixture
def two_nodes(tmp_path, user_base, fake_fleet, fake_scheduler, node_agent, settle, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fake_scheduler.add("7", nodes=("n1", "n2"))
    agents = [node_agent(user_base, "7", node=n, port=7100 + i) for i, n in enumerate(("n1", "n2"))]
    settle(fake_fleet, [a.reg.name for a in agents])
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fake_fleet.layout.master_sock.parent.mkdir(parents=True, exist_ok=True)
    cli.bind(str(fake_fleet.layout.master_sock))
    client = create_app(fake_fleet).test_client()
    client.environ_base["gunicorn.socket"] = cli
    yield client, {a.reg.node: a for a in agents}
    cli.close()


def test_each_node_gets_its_agents_address_key_and_a_token_for_it_alone(two_nodes):
    client, agents = two_nodes
    body = client.post("/api/broadcast/7/peers", json={"nodes": ["n1", "n2", "n9"]}).get_json()
    peers = {p["node"]: p for p in body["peers"]}
    assert "error" in peers["n9"] and "token" not in peers["n9"]
    for node in ("n1", "n2"):
        p, reg = peers[node], agents[node].reg
        assert (p["address"], p["port"], p["public_key"]) == (reg.address, reg.port, reg.public_key)
        user_pub = agents[node].state.user_public_key
        assert verify_token(p["token"], user_pub, USER, fingerprint(reg.public_key))["sub"] == USER
    other = agents["n2"].reg.public_key
    with pytest.raises(AuthError):  # n1's token does not open n2's agent
        verify_token(peers["n1"]["token"], agents["n1"].state.user_public_key, USER, fingerprint(other))


@pytest.mark.parametrize("body", [None, {}, {"nodes": []}, {"nodes": "n1"}, {"nodes": [""]}, {"nodes": [1]}])
def test_a_request_without_a_list_of_nodes_is_refused(two_nodes, body):
    client, _ = two_nodes
    assert client.post("/api/broadcast/7/peers", json=body).status_code == 400
