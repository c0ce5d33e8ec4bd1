"""The user's dxflow key, the short-lived tokens it signs, and agents' identity proofs.

* ``~/.dxflow/id_rsa`` (0600) is made on first use. Only its owner can read it, so
  only its owner can mint tokens that the owner's agents accept.
* A token is an RS256 JWT: ``sub`` = user, ``aud`` = the agent's key fingerprint,
  at most :data:`MAX_TOKEN_LIFETIME` seconds between ``iat`` and ``exp``.
* Two kinds, told apart by the ``use`` claim: a bearer token (no ``use``) goes in the
  ``Authorization`` header of API requests; a login token (``use`` = :data:`CONSOLE_LOGIN`)
  goes in the one-time link to a node's console, where a URL may be logged or shown.
  Each kind is refused where the other is expected, so a login link never opens the API.
* An agent proves who it is by signing the master's random challenge with the
  key whose public half it put in its registration.

Tokens and challenges are checked, and agents' keys named, by :mod:`dxflow.signatures` (re-exported
here), which the agent's worker uses without loading PyJWT or cryptography; minting and making keys stay here.
"""

from __future__ import annotations

import base64
import os
import secrets
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from dxflow import layout
from dxflow.errors import ConfigError
# checked without cryptography, by the one verifier the agent's worker uses too (dxflow.signatures);
# an agent's key is named (fingerprint) there too, so the agent and the master name it alike
from dxflow.signatures import (BEARER, CONSOLE_LOGIN, KEY_BITS, MAX_TOKEN_LIFETIME, TOKEN_LEEWAY,
                               check_challenge, check_key_file, fingerprint, verify_token)

__all__ = ["BEARER", "CONSOLE_LOGIN", "MAX_TOKEN_LIFETIME", "TOKEN_LEEWAY", "DEFAULT_TOKEN_LIFETIME",
           "LOGIN_TOKEN_LIFETIME", "KEY_BITS", "new_key", "private_pem", "public_pem", "fingerprint", "user_key",
           "user_public_key", "mint_token", "mint_login_token", "verify_token", "sign_challenge", "check_challenge"]

DEFAULT_TOKEN_LIFETIME = 120
LOGIN_TOKEN_LIFETIME = 300


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: rsa.RSAPrivateKey | rsa.RSAPublicKey) -> str:
    pub = key.public_key() if isinstance(key, rsa.RSAPrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def _write_new(path: Path, data: bytes, mode: int) -> bool:
    """Write ``path`` only if it does not exist yet (atomically); False if someone else won."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def user_key(base: Path) -> rsa.RSAPrivateKey:
    """The user's signing key in ``base`` (``~/.dxflow``), made on first use.

    Agents on several nodes may start at once on a shared home: the first one to
    link its key wins and the others read it.
    """
    path = base / layout.KEY
    if not path.exists():
        key = new_key()
        if _write_new(path, private_pem(key), layout.FILE_MODE):
            _write_new(base / layout.PUBLIC_KEY, public_pem(key).encode(), layout.PUBLIC_KEY_MODE)
            return key
    check_key_file(path)
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{path} is not a usable key: {e}; remove it to make a new one") from e
    if not isinstance(loaded, rsa.RSAPrivateKey):
        raise ConfigError(f"{path} is not an RSA key; remove it to make a new one")
    return loaded


def user_public_key(base: Path) -> str:
    """PEM of the user's public key, made with the key pair on first use."""
    pub = base / layout.PUBLIC_KEY
    try:
        return pub.read_text()
    except FileNotFoundError:
        return public_pem(user_key(base))


def mint_token(key: rsa.RSAPrivateKey, user: str, audience: str, lifetime: int = DEFAULT_TOKEN_LIFETIME) -> str:
    """A bearer token for API requests to the agent whose key fingerprint is ``audience``."""
    return _mint(key, user, audience, lifetime, {})


def mint_login_token(key: rsa.RSAPrivateKey, user: str, audience: str,
                     lifetime: int = LOGIN_TOKEN_LIFETIME) -> str:
    """A login token for the agent's ``/console/login?token=`` link: it logs in once and opens no API."""
    return _mint(key, user, audience, lifetime, {"use": CONSOLE_LOGIN})


def _mint(key: rsa.RSAPrivateKey, user: str, audience: str, lifetime: int, extra: dict) -> str:
    now = int(time.time())
    lifetime = min(lifetime, MAX_TOKEN_LIFETIME)
    claims = {"sub": user, "aud": audience, "iat": now, "exp": now + lifetime, "jti": secrets.token_hex(8), **extra}
    return jwt.encode(claims, key, algorithm="RS256")


def sign_challenge(key: rsa.RSAPrivateKey, challenge: str) -> str:
    """As :func:`dxflow.signatures.sign_challenge` (what agents answer with), for a cryptography key."""
    sig = key.sign(challenge.encode(), padding.PKCS1v15(), hashes.SHA256())
    return base64.b64encode(sig).decode()
