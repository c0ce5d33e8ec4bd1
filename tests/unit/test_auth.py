import os
import time

import jwt
import pytest

from dxflow import auth
from dxflow.errors import AuthError, ConfigError


@pytest.fixture
def base(tmp_path):
    d = tmp_path / ".dxflow"
    d.mkdir(mode=0o700)
    return d


def test_user_key_made_once_private(base):
    k1 = auth.user_key(base)
    k2 = auth.user_key(base)
    assert auth.public_pem(k1) == auth.public_pem(k2)
    assert (base / "id_rsa").stat().st_mode & 0o777 == 0o600
    assert auth.user_public_key(base) == auth.public_pem(k1)


def test_user_key_refuses_open_permissions(base):
    auth.user_key(base)
    os.chmod(base / "id_rsa", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        auth.user_key(base)


def test_token_roundtrip_and_refusals(base):
    key = auth.user_key(base)
    pub = auth.public_pem(key)
    agent_pub = auth.public_pem(auth.new_key())
    aud = auth.fingerprint(agent_pub)
    tok = auth.mint_token(key, "alice", aud)
    assert auth.verify_token(tok, pub, "alice", aud)["sub"] == "alice"
    with pytest.raises(AuthError):  # another agent
        auth.verify_token(tok, pub, "alice", auth.fingerprint(auth.public_pem(auth.new_key())))
    with pytest.raises(AuthError):  # another user's key
        auth.verify_token(auth.mint_token(auth.new_key(), "alice", aud), pub, "alice", aud)
    with pytest.raises(AuthError):  # another user named in the token
        auth.verify_token(auth.mint_token(key, "bob", aud), pub, "alice", aud)
    now = int(time.time())
    expired = jwt.encode({"sub": "alice", "aud": aud, "iat": now - 400, "exp": now - 100}, key, "RS256")
    with pytest.raises(AuthError):
        auth.verify_token(expired, pub, "alice", aud)
    too_long = jwt.encode({"sub": "alice", "aud": aud, "iat": now, "exp": now + 3600}, key, "RS256")
    with pytest.raises(AuthError, match="lifetime"):
        auth.verify_token(too_long, pub, "alice", aud)
    hs = _hmac_token({"sub": "alice", "aud": aud, "iat": now, "exp": now + 60}, pub.encode())
    with pytest.raises(AuthError):  # algorithm confusion: an HMAC token keyed with the public key
        auth.verify_token(hs, pub, "alice", aud)


def _hmac_token(claims: dict, secret: bytes) -> str:
    import base64, hashlib, hmac, json
    b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + b"." + b64(json.dumps(claims).encode())
    return (head + b"." + b64(hmac.new(secret, head, hashlib.sha256).digest())).decode()


def test_challenge(base):
    k = auth.new_key()
    sig = auth.sign_challenge(k, "nonce")
    assert auth.check_challenge(auth.public_pem(k), "nonce", sig)
    assert not auth.check_challenge(auth.public_pem(k), "other", sig)
    assert not auth.check_challenge(auth.public_pem(auth.new_key()), "nonce", sig)
