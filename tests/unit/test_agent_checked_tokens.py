"""dxflow.agent.auth.CheckedTokens: a bearer token's check is remembered, never beyond what the full
check lets in (the agent's side of issue #14 item 6: no RS256 verification per proxied request)."""

from __future__ import annotations

import time

import jwt
import pytest

from dxflow import auth
from dxflow.agent.auth import CheckedTokens
from dxflow.errors import AuthError


@pytest.fixture(scope="module")
def keys():
    user = auth.new_key()
    agent_pub = auth.public_pem(auth.new_key())
    return user, auth.public_pem(user), auth.fingerprint(agent_pub)


def test_token_checked_once_is_let_in_again(keys):
    user, pub, aud = keys
    checked = CheckedTokens()
    token = auth.mint_token(user, "alice", aud)
    first = checked.verify(token, pub, "alice", aud)
    assert checked.verify(token, pub, "alice", aud) is first  # remembered, not checked again


def test_bob_token_is_refused_even_with_alice_token_remembered(keys):
    user, pub, aud = keys
    checked = CheckedTokens()
    checked.verify(auth.mint_token(user, "alice", aud), pub, "alice", aud)
    bob = auth.new_key()
    with pytest.raises(AuthError):  # signed by another key
        checked.verify(auth.mint_token(bob, "alice", aud), pub, "alice", aud)
    with pytest.raises(AuthError):  # alice's key, but for bob
        checked.verify(auth.mint_token(user, "bob", aud), pub, "alice", aud)


def test_tampered_copy_of_a_remembered_token_is_refused(keys):
    user, pub, aud = keys
    checked = CheckedTokens()
    token = auth.mint_token(user, "alice", aud)
    checked.verify(token, pub, "alice", aud)
    head, claims, sig = token.split(".")
    forged = jwt.utils.base64url_encode(b'{"sub":"alice","aud":"%s","iat":%d,"exp":%d}' % (
        aud.encode(), time.time(), time.time() + 300)).decode()
    with pytest.raises(AuthError):
        checked.verify(f"{head}.{forged}.{sig}", pub, "alice", aud)


def test_remembered_token_for_another_audience_is_refused(keys):
    user, pub, aud = keys
    checked = CheckedTokens()
    token = auth.mint_token(user, "alice", aud)
    checked.verify(token, pub, "alice", aud)
    other = auth.fingerprint(auth.public_pem(auth.new_key()))
    with pytest.raises(AuthError):
        checked.verify(token, pub, "alice", other)


def test_remembered_token_is_refused_once_it_expires(keys):
    user, pub, aud = keys
    checked = CheckedTokens()
    now = int(time.time())
    # expired already, but within the leeway the full check grants: let in, and remembered
    token = jwt.encode({"sub": "alice", "aud": aud, "iat": now - 20, "exp": now - auth.TOKEN_LEEWAY + 1},
                       user, algorithm="RS256")
    checked.verify(token, pub, "alice", aud)
    time.sleep(1.5)  # now past exp + leeway
    with pytest.raises(AuthError, match="expired"):
        checked.verify(token, pub, "alice", aud)


def test_remembered_tokens_are_bounded(keys):
    user, pub, aud = keys
    checked = CheckedTokens(size=4)
    for _ in range(10):
        checked.verify(auth.mint_token(user, "alice", aud), pub, "alice", aud)
    assert len(checked._claims) == 4
