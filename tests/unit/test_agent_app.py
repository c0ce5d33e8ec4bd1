"""The agent's Flask app in-process: every request needs the user's fresh token for this agent."""

from __future__ import annotations

import time

import jwt
import pytest

from dxflow import auth


@pytest.fixture
def parts(make_agent, keys):
    """The agent of job 7 (tests/conftest.py): its test client, its state, and its user's key."""
    client, state, _ = make_agent(job="7")
    return client, state, keys[0]


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_node_with_token(parts):
    client, state, key = parts
    resp = client.get("/api/node", headers=bearer(auth.mint_token(key, state.user, state.audience)))
    assert resp.status_code == 200
    body = resp.get_json()
    assert body["job"] == "7" and body["cpus"] >= 1 and body["memory_total"] > 0 and len(body["load"]) == 3


@pytest.mark.parametrize("make", [
    lambda s, k: None,
    lambda s, k: "garbage",
    lambda s, k: auth.mint_token(auth.new_key(), s.user, s.audience),            # another user's key
    lambda s, k: auth.mint_token(k, s.user, "SHA256:someone-else"),              # another agent
    lambda s, k: auth.mint_token(k, "mallory", s.audience),                      # another user named
    lambda s, k: jwt.encode({"sub": s.user, "aud": s.audience, "iat": int(time.time()) - 600,
                             "exp": int(time.time()) - 300}, k, "RS256"),        # expired
])
def test_refused_without_a_valid_token(parts, make):
    client, state, key = parts
    token = make(state, key)
    resp = client.get("/api/node", headers=bearer(token) if token else {})
    assert resp.status_code == 401
    assert resp.get_json()["error"] == "unauthorized"
    assert "Bearer" in resp.headers["WWW-Authenticate"]


def test_health_signs_challenge(parts):
    client, state, key = parts
    tok = auth.mint_token(key, state.user, state.audience)
    body = client.get("/api/health?challenge=abc", headers=bearer(tok)).get_json()
    assert auth.check_challenge(state.public_key, "abc", body["signature"])
    assert client.get("/api/health?challenge=" + "x" * 300, headers=bearer(tok)).status_code == 400


def test_heartbeat_ends_when_the_agents_arbiter_is_gone(parts, monkeypatch):
    """A worker outliving its SIGKILLed arbiter must not keep beating: the master takes the end as death."""
    import os

    from dxflow.agent import health

    client, state, key = parts
    monkeypatch.setattr(health, "BEAT_CHECK", 0.01)
    monkeypatch.setattr(health, "BEAT_EVERY", 0.05)
    real = os.getppid()
    calls = {"n": 0}

    def ppid():
        calls["n"] += 1
        return real if calls["n"] < 12 else 1  # re-parented to init after a few checks
    monkeypatch.setattr(health.os, "getppid", ppid)
    resp = client.get("/api/heartbeat", headers=bearer(auth.mint_token(key, state.user, state.audience)))
    body = resp.get_data()  # ends: the stream stops once the parent changed
    assert resp.status_code == 200 and body.count(b": beat") >= 2
