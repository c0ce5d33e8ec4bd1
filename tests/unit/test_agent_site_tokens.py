"""An agent lets in tokens signed by the site service's token key (``site_keys``/token_key.pem) as well
as its user's own, and either only when it names the agent's own user: the real agent app."""

from __future__ import annotations

import pytest

from dxflow import auth
from dxflow.agent.auth import site_token_key
from dxflow.config import SiteConfig


@pytest.fixture(scope="module")
def site_key():
    return auth.new_key()


@pytest.fixture
def site_agent(make_agent, site_key):
    """alice's agent (the test's user) that trusts the site's token key."""
    a = make_agent()
    a.state.extra["site_token_key"] = auth.public_pem(site_key)
    return a


def get(a, token: str) -> int:
    return a.client.get("/api/health", headers={"Authorization": f"Bearer {token}"}).status_code


def test_a_site_token_for_the_agents_user_is_let_in(site_agent, site_key):
    assert get(site_agent, auth.mint_token(site_key, site_agent.state.user, site_agent.state.audience)) == 200


def test_the_users_own_token_is_still_let_in(site_agent):
    assert site_agent.client.get("/api/health", headers=site_agent.headers).status_code == 200


def test_a_site_token_naming_another_user_is_refused(site_agent, site_key):
    """bob's token from the site, to alice's agent: 401, whoever signed it."""
    other = "bob" if site_agent.state.user != "bob" else "alice"   # never whoever runs the tests
    resp = site_agent.client.get("/api/health", headers={
        "Authorization": f"Bearer {auth.mint_token(site_key, other, site_agent.state.audience)}"})
    assert resp.status_code == 401 and "not for this agent's user" in resp.get_json()["message"]


def test_a_site_token_for_another_agent_is_refused(site_agent, site_key):
    other = auth.fingerprint(auth.public_pem(auth.new_key()))
    assert get(site_agent, auth.mint_token(site_key, site_agent.state.user, other)) == 401


def test_a_token_signed_by_another_key_is_refused(site_agent):
    assert get(site_agent, auth.mint_token(auth.new_key(), site_agent.state.user, site_agent.state.audience)) == 401


def test_an_agent_without_the_sites_key_refuses_site_tokens(make_agent, site_key):
    a = make_agent()
    assert get(a, auth.mint_token(site_key, a.state.user, a.state.audience)) == 401


def test_the_published_key_is_read_and_a_private_one_is_not_trusted(tmp_path, site_key):
    (tmp_path / "token_key.pem").write_text(auth.public_pem(site_key))
    assert site_token_key(SiteConfig(site_keys=str(tmp_path))) == auth.public_pem(site_key)
    (tmp_path / "token_key.pem").write_bytes(auth.private_pem(site_key))
    assert site_token_key(SiteConfig(site_keys=str(tmp_path))) == ""
    assert site_token_key(SiteConfig(site_keys=str(tmp_path / "missing"))) == ""
