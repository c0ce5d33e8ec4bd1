"""Bearer tokens and console login tokens: each is refused where the other is expected, and no
agent endpoint takes a token from the query string except the console's login link."""

from __future__ import annotations

import jwt
import pytest

from dxflow import auth
from dxflow.errors import AuthError

#: endpoints of every kind: JSON, files, a stream, a WebSocket upgrade
API_PATHS = ["/api/node", "/api/files?path=.", "/api/logs", "/api/logs/agent/follow", "/api/shell"]


class Browser:
    """A client on the agent's own loopback address (the console refuses other Host names); keeps cookies."""

    def __init__(self, app) -> None:
        self.client = app.test_client()

    def get(self, path: str, **kwargs):
        return self.client.get(path, base_url="http://127.0.0.1:8765", **kwargs)


@pytest.fixture
def agent(make_agent, keys, tmp_path):
    """The agent's app of job 7 (tests/conftest.py), its state and its user's key."""
    client, state, _ = make_agent({"FILE_SCRATCH_ROOTS": []}, job="7", home=tmp_path, work_dir=str(tmp_path))
    return client.application, state, keys[0]


def test_verify_token_tells_the_kinds_apart():
    key = auth.new_key()
    pub, aud = auth.public_pem(key), "SHA256:agent"
    bearer, login = auth.mint_token(key, "alice", aud), auth.mint_login_token(key, "alice", aud)
    assert auth.verify_token(bearer, pub, "alice", aud)["sub"] == "alice"
    assert auth.verify_token(login, pub, "alice", aud, use=auth.CONSOLE_LOGIN)["use"] == auth.CONSOLE_LOGIN
    with pytest.raises(AuthError, match="login token opens no API"):
        auth.verify_token(login, pub, "alice", aud)
    with pytest.raises(AuthError, match="login token opens no API"):
        auth.verify_token(login, pub, "alice", aud, use=auth.BEARER)
    with pytest.raises(AuthError, match="not a console login token"):
        auth.verify_token(bearer, pub, "alice", aud, use=auth.CONSOLE_LOGIN)
    with pytest.raises(ValueError):
        auth.verify_token(bearer, pub, "alice", aud, use="anything")


def test_login_token_lives_at_most_five_minutes():
    key = auth.new_key()
    claims = jwt.decode(auth.mint_login_token(key, "alice", "a", lifetime=3600), options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] <= 300 and claims["use"] == "console-login" and claims["jti"]


def test_a_login_token_is_refused_as_a_bearer_token(agent):
    app, state, key = agent
    login = auth.mint_login_token(key, state.user, state.audience)
    client = Browser(app)
    for path in API_PATHS:
        resp = client.get(path, headers={"Authorization": f"Bearer {login}"})
        assert resp.status_code == 401, (path, resp.data)
    # the control: a bearer token of the same user for the same agent opens the API
    bearer = auth.mint_token(key, state.user, state.audience)
    assert client.get("/api/node", headers={"Authorization": f"Bearer {bearer}"}).status_code == 200


def test_a_bearer_token_is_refused_at_the_console_login(agent):
    app, state, key = agent
    client = Browser(app)
    resp = client.get(f"/console/login?token={auth.mint_token(key, state.user, state.audience)}")
    assert resp.status_code == 403 and b"not a console login token" in resp.data
    assert "Set-Cookie" not in resp.headers
    assert client.get("/api/node").status_code == 401
    # the control: a login token logs in
    assert client.get(f"/console/login?token={auth.mint_login_token(key, state.user, state.audience)}"
                      ).status_code == 303


@pytest.mark.parametrize("path", API_PATHS)
@pytest.mark.parametrize("mint", [auth.mint_token, auth.mint_login_token], ids=["bearer", "login"])
def test_a_token_in_the_query_string_opens_no_api(agent, path, mint):
    app, state, key = agent
    token = mint(key, state.user, state.audience)
    sep = "&" if "?" in path else "?"
    resp = Browser(app).get(f"{path}{sep}token={token}", buffered=False)  # a stream let in would never end
    assert resp.status_code == 401, resp.status
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
