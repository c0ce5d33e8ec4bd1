"""dxflow.signatures: the one verifier of tokens and challenges, without cryptography (issue #14 item 6).

Tokens are minted by dxflow.auth (PyJWT and cryptography, on the login node) and checked here the way
PyJWT checked them: each refusal below is compared with what ``jwt.decode`` itself says of the token.
"""

from __future__ import annotations

import base64
import json
import os
import time

import jwt
import pytest
import rsa
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from dxflow import auth, signatures
from dxflow.agent.keygen import user_public_key
from dxflow.errors import AuthError, ConfigError

USER = "alice"


@pytest.fixture(scope="module")
def user_key():
    return auth.new_key()


@pytest.fixture(scope="module")
def audience():
    return auth.fingerprint(auth.public_pem(auth.new_key()))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(audience: str, **changes) -> dict:
    now = int(time.time())
    return {"sub": USER, "aud": audience, "iat": now, "exp": now + 60, "jti": "0123", **changes}


def pyjwt_message(token: str, pem: str, audience: str) -> str:
    """What dxflow.auth said of a token before dxflow.signatures: PyJWT's refusal."""
    try:
        jwt.decode(token, pem, algorithms=["RS256"], audience=audience,
                   options={"require": ["exp", "iat", "sub", "aud"]}, leeway=auth.TOKEN_LEEWAY)
    except jwt.PyJWTError as e:
        return f"token refused: {e}"
    return ""


def test_auth_checks_with_the_one_verifier():
    assert auth.verify_token is signatures.verify_token
    assert auth.check_challenge is signatures.check_challenge


def test_a_token_minted_by_dxflow_auth_verifies(user_key, audience):
    pem = auth.public_pem(user_key)
    got = signatures.verify_token(auth.mint_token(user_key, USER, audience), pem, USER, audience)
    assert got["sub"] == USER and got["aud"] == audience
    login = auth.mint_login_token(user_key, USER, audience)
    assert signatures.verify_token(login, pem, USER, audience, use=signatures.CONSOLE_LOGIN)["use"] == "console-login"


def _tampered(token: str) -> str:
    head, payload, sig = token.split(".")
    body = json.loads(base64.urlsafe_b64decode(payload + "=="))
    return ".".join((head, b64(json.dumps({**body, "sub": "bob"}).encode()), sig))


def _hmac(token_claims: dict, secret: bytes) -> str:
    import hashlib
    import hmac

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(token_claims).encode())
    return head + "." + b64(hmac.new(secret, head.encode(), hashlib.sha256).digest())


BAD = {
    "tampered payload": lambda k, aud: _tampered(auth.mint_token(k, USER, aud)),
    "another key": lambda k, aud: auth.mint_token(auth.new_key(), USER, aud),
    "alg none": lambda k, aud: b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(json.dumps(claims(aud)).encode()) + ".",
    "HS256 keyed with the public key": lambda k, aud: _hmac(claims(aud), auth.public_pem(k).encode()),
    "expired": lambda k, aud: jwt.encode(claims(aud, iat=int(time.time()) - 400, exp=int(time.time()) - 100),
                                         k, "RS256"),
    "another audience": lambda k, aud: auth.mint_token(k, USER, "SHA256:someone-else"),
    "no exp": lambda k, aud: jwt.encode({key: v for key, v in claims(aud).items() if key != "exp"}, k, "RS256"),
    "issued later": lambda k, aud: jwt.encode(claims(aud, iat=int(time.time()) + 100,
                                                     exp=int(time.time()) + 160), k, "RS256"),
    "not yet valid": lambda k, aud: jwt.encode(claims(aud, nbf=int(time.time()) + 100), k, "RS256"),
    "not a token": lambda k, aud: "garbage",
    "bad base64": lambda k, aud: "!!!." + auth.mint_token(k, USER, aud).split(".", 1)[1],
    "signature cut short": lambda k, aud: auth.mint_token(k, USER, aud)[:-4],
}


@pytest.mark.parametrize("name", BAD)
def test_a_bad_token_is_refused_with_pyjwts_words(name, user_key, audience):
    token = BAD[name](user_key, audience)
    pem = auth.public_pem(user_key)
    with pytest.raises(AuthError) as refused:
        signatures.verify_token(token, pem, USER, audience)
    assert str(refused.value) == pyjwt_message(token, pem, audience)


def test_refusals_dxflow_adds_to_pyjwts(user_key, audience):
    pem = auth.public_pem(user_key)
    with pytest.raises(AuthError, match="not for this agent's user"):
        signatures.verify_token(auth.mint_token(user_key, "bob", audience), pem, USER, audience)
    now = int(time.time())
    with pytest.raises(AuthError, match="lifetime over 300 s"):
        signatures.verify_token(jwt.encode(claims(audience, exp=now + 3600), user_key, "RS256"), pem, USER, audience)
    with pytest.raises(AuthError, match="a console login token opens no API"):
        signatures.verify_token(auth.mint_login_token(user_key, USER, audience), pem, USER, audience)
    with pytest.raises(AuthError, match="not a console login token"):
        signatures.verify_token(auth.mint_token(user_key, USER, audience), pem, USER, audience,
                                use=signatures.CONSOLE_LOGIN)


def test_a_signature_is_compared_whole_not_parsed(user_key):
    """python-rsa's own ``rsa.verify`` takes the hash named inside the signature: a SHA-1 signature, or
    one with a byte more, must not pass for SHA-256."""
    pub = signatures.load_public_key(auth.public_pem(user_key))
    message = b"header.payload"
    good = user_key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    assert signatures.verify(pub, message, good)
    assert not signatures.verify(pub, message, user_key.sign(message, padding.PKCS1v15(), hashes.SHA1()))
    assert not signatures.verify(pub, message, b"\x00" + good)
    assert not signatures.verify(pub, message, pub.n.to_bytes(256, "big"))  # not below the modulus
    assert not signatures.verify(pub, b"header.payloaD", good)


def test_challenges_cross_between_the_two_libraries():
    crypto_key = auth.new_key()
    agent_key = signatures.load_private_key(auth.private_pem(crypto_key))  # as the agent holds its key
    pem = auth.public_pem(crypto_key)
    by_agent = signatures.sign_challenge(agent_key, "nonce")
    assert auth.check_challenge(pem, "nonce", by_agent)
    crypto_key.public_key().verify(base64.b64decode(by_agent), b"nonce", padding.PKCS1v15(), hashes.SHA256())
    assert signatures.check_challenge(pem, "nonce", auth.sign_challenge(crypto_key, "nonce"))
    assert not signatures.check_challenge(pem, "other", by_agent)
    assert not signatures.check_challenge(auth.public_pem(auth.new_key()), "nonce", by_agent)
    assert not signatures.check_challenge(pem, "nonce", "not base64!")
    assert not signatures.check_challenge("not a key", "nonce", by_agent)


def test_a_signature_is_the_same_bytes_as_python_rsas_and_as_cryptographys():
    crypto_key = auth.new_key()
    agent_key = signatures.load_private_key(auth.private_pem(crypto_key))
    for message in (b"", b"nonce", os.urandom(300)):
        ours = signatures.sign(agent_key, message)
        assert ours == rsa.sign(message, agent_key, "SHA-256")  # PKCS#1 v1.5 signatures are deterministic
        assert ours == crypto_key.sign(message, padding.PKCS1v15(), hashes.SHA256())


def test_a_faulty_private_operation_is_not_sent(monkeypatch):
    agent_key = signatures.load_private_key(auth.private_pem(auth.new_key()))
    monkeypatch.setattr(type(agent_key), "blinded_decrypt", lambda self, m: (m + 1) % self.n)  # a CRT half gone wrong
    with pytest.raises(ValueError, match="did not check out"):
        signatures.sign(agent_key, b"nonce")


def test_keys_read_in_every_form_dxflow_writes():
    from cryptography.hazmat.primitives import serialization

    key = auth.new_key()
    pkcs1 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption())
    assert signatures.load_private_key(pkcs1) == signatures.load_private_key(auth.private_pem(key))
    pub = auth.public_pem(key)
    rsa_pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()
    assert signatures.load_public_key(rsa_pub) == signatures.load_public_key(pub)


def test_one_key_has_one_fingerprint_whichever_pem_form_it_comes_in():
    """The name tokens are addressed to is SHA-256 of the DER SubjectPublicKeyInfo (as cryptography
    encodes it, computed here independently), for a ``PUBLIC KEY`` and an ``RSA PUBLIC KEY`` PEM alike."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    public = auth.new_key().public_key()
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    spki = auth.public_pem(public)
    pkcs1 = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1).decode()
    assert spki.startswith("-----BEGIN PUBLIC KEY-----") and pkcs1.startswith("-----BEGIN RSA PUBLIC KEY-----")
    assert signatures.fingerprint(spki) == signatures.fingerprint(pkcs1) == expected
    assert auth.fingerprint is signatures.fingerprint  # one function: the master and the agent name keys alike
    assert signatures.fingerprint(auth.public_pem(auth.new_key())) != expected
    for bad in ("not a key", spki.replace("PUBLIC KEY", "CERTIFICATE")):
        with pytest.raises(ValueError):
            signatures.fingerprint(bad)


def test_the_agents_key_is_made_in_its_own_process(tmp_path):
    from dxflow.agent import keygen

    key, pub = keygen.start().key()
    assert signatures.check_challenge(pub, "n", signatures.sign_challenge(key, "n"))
    other, _ = keygen.start().key()
    assert other.n != key.n  # a new key each time


def test_the_users_key_pair_is_made_when_missing_and_refused_when_open(tmp_path):
    base = tmp_path / ".dxflow"
    base.mkdir(mode=0o700)
    pem = user_public_key(base)
    assert pem == auth.public_pem(auth.user_key(base))  # the pair the master signs with
    assert (base / "id_rsa").stat().st_mode & 0o777 == 0o600
    assert user_public_key(base) == pem
    os.chmod(base / "id_rsa", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        user_public_key(base)
    (base / "id_rsa.pub").unlink()  # made again by the key's process, which refuses the open key too
    with pytest.raises(ConfigError, match="chmod 600"):
        user_public_key(base)
