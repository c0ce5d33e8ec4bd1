"""Fixtures shared by the unit tests: an agent app with a file tree to serve (the files API's tests)."""

from __future__ import annotations

import pytest

from dxflow import auth
from dxflow.agent import create_app
from dxflow.agent.state import AgentState


@pytest.fixture(scope="module")
def keys():
    return auth.new_key(), auth.new_key()  # the user's key, the agent's key


@pytest.fixture
def tree(tmp_path):
    home = tmp_path / "home" / "alice"
    work = home / "job"
    for d in (work, tmp_path / "scratch" / "alice", tmp_path / "outside", tmp_path / "home" / "bob"):
        d.mkdir(parents=True)
    (tmp_path / "outside" / "sentinel").write_text("keep")
    (tmp_path / "home" / "bob" / "secret").write_text("bob's")
    (home / "etc").symlink_to(tmp_path / "outside")
    (home / "passwd").symlink_to(tmp_path / "outside" / "sentinel")
    (home / ".dxflow").mkdir()
    (home / ".dxflow" / "id_rsa").write_text("key")
    return tmp_path


@pytest.fixture
def client(tree, keys):
    user_key, agent_key = keys
    pub = auth.public_pem(agent_key)
    state = AgentState(scheduler="local", cluster="c", job="42", node="n1", user="alice",
                       home=tree / "home" / "alice", key=agent_key, public_key=pub,
                       audience=auth.fingerprint(pub), user_public_key=auth.public_pem(user_key),
                       work_dir=str(tree / "home" / "alice" / "job"))
    app = create_app(state, {"TESTING": True, "FILE_SCRATCH_ROOTS": [str(tree / "scratch" / "$USER")]})
    c = app.test_client()
    c.environ_base["HTTP_AUTHORIZATION"] = "Bearer " + auth.mint_token(user_key, "alice", state.audience)
    return c
