"""RS256 tokens and challenge signatures, checked and signed without cryptography.

The agent's worker checks every request's token and signs the master's challenges. PyJWT and
cryptography (OpenSSL through Rust) would cost it ~11 MiB resident for that; this module does it
with the pure-Python ``rsa`` package (RSASSA-PKCS1-v1_5, SHA-256): ~1.5 MiB with its ASN.1 parser.
:mod:`dxflow.auth` (which mints tokens with PyJWT, on the login node) checks through here too, so
there is one verifier.

A signature is checked by encoding what it should be (``00 01 FF.. 00 DigestInfo(SHA-256) hash``,
RFC 8017 §8.2.2) and comparing the whole block with what the public key makes of the signature:
nothing in it is parsed, so no lenient parser can be fooled (the Bleichenbacher'06 forgeries).
A token is checked as PyJWT checked it before (same claims, same messages), for ``alg`` RS256 only.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import rsa
import rsa.pem

from dxflow.errors import AuthError, ConfigError

#: seconds a token's ``exp`` and ``iat`` may be off (clocks of login and compute nodes differ a little)
TOKEN_LEEWAY = 5
MAX_TOKEN_LIFETIME = 300
#: ``use`` claims: a bearer token has none (as every dxflow before the claim minted them).
BEARER = "bearer"
CONSOLE_LOGIN = "console-login"
#: bits of the keys dxflow makes (the user's, an agent's)
KEY_BITS = 2048
#: claims a token must have (PyJWT's ``require`` option, in its order)
REQUIRED = ("exp", "iat", "sub", "aud")

#: the object identifier of RSA keys (RFC 8017 appendix C)
RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
#: DER of AlgorithmIdentifier{rsaEncryption, NULL} (RFC 8017 appendix A.1)
_RSA_ALGORITHM = bytes.fromhex("300d06092a864886f70d0101010500")
#: DER of DigestInfo{sha256, NULL} up to the 32 hash bytes (RFC 8017 §9.2, note 1)
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")
_BASE64URL = re.compile(rb"[A-Za-z0-9_-]*")


class TokenError(Exception):
    """Why a token is refused, in PyJWT's words (the text after "token refused: ")."""


# -- keys --------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)  # the user's and the site's key, checked with every new token
def load_public_key(pem: str) -> rsa.PublicKey:
    """An RSA public key from PEM: ``PUBLIC KEY`` (SubjectPublicKeyInfo, what dxflow writes) or
    ``RSA PUBLIC KEY`` (PKCS#1). ValueError if it is neither."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        if b"-----BEGIN RSA PUBLIC KEY-----" in data:
            return rsa.PublicKey.load_pkcs1(data)
        return rsa.PublicKey.load_pkcs1_openssl_pem(data)
    except Exception as e:  # pyasn1 and the PEM reader raise many kinds; any of them means "not a key"
        raise ValueError("Could not parse the provided public key.") from e


def load_private_key(pem: bytes) -> rsa.PrivateKey:
    """An RSA private key from PEM: PKCS#1 (``RSA PRIVATE KEY``, what :mod:`dxflow.agent.keygen` prints)
    or unencrypted PKCS#8 (``PRIVATE KEY``, what :func:`dxflow.auth.private_pem` writes)."""
    if b"-----BEGIN RSA PRIVATE KEY-----" in pem:
        return rsa.PrivateKey.load_pkcs1(pem)
    from pyasn1.codec.der import decoder  # python-rsa's own ASN.1 reader

    info, _ = decoder.decode(rsa.pem.load_pem(pem, "PRIVATE KEY"))  # PrivateKeyInfo, RFC 5208 §5
    if str(info[1][0]) != RSA_ENCRYPTION:
        raise ValueError("not an RSA private key")
    return rsa.PrivateKey.load_pkcs1(bytes(info[2]), "DER")


@functools.lru_cache(maxsize=4096)  # the master asks for every relayed request
def fingerprint(public_key_pem: str) -> str:
    """``SHA256:<base64>`` of the key's DER SubjectPublicKeyInfo: the name an agent's tokens are
    addressed to. The PEM may be ``PUBLIC KEY`` or ``RSA PUBLIC KEY``: one key has one name either way.
    ValueError if it is neither."""
    der = _subject_public_key_info(load_public_key(public_key_pem))
    return "SHA256:" + base64.b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")


def _subject_public_key_info(key: rsa.PublicKey) -> bytes:
    """DER SubjectPublicKeyInfo of ``key`` (RFC 5280 §4.1, RFC 8017 appendix A.1.1), encoded afresh, so
    that the name depends on the key and not on how its PEM was written. Written out here rather than
    with pyasn1's encoder, which the agent's worker would load for this alone."""
    rsa_public_key = _der(0x30, _der_integer(key.n) + _der_integer(key.e))
    return _der(0x30, _RSA_ALGORITHM + _der(0x03, b"\x00" + rsa_public_key))  # BIT STRING: 0 unused bits


def _der(tag: int, content: bytes) -> bytes:
    """One DER element (X.690 §8.1): tag, definite length in the fewest bytes, content."""
    n = len(content)
    if n < 0x80:
        return bytes([tag, n]) + content
    size = (n.bit_length() + 7) // 8
    return bytes([tag, 0x80 | size]) + n.to_bytes(size, "big") + content


def _der_integer(value: int) -> bytes:
    """A non-negative DER INTEGER: big-endian, with a leading zero byte where the top bit is set."""
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def check_key_file(path: Path) -> None:
    """ConfigError unless only its owner can read the private key file ``path``."""
    mode = os.stat(path).st_mode
    if mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {mode & 0o777:o}); run: chmod 600 {path}")


# -- signatures --------------------------------------------------------------------------------------------

def _encoded(message: bytes, size: int) -> bytes:
    """EMSA-PKCS1-v1_5 of ``message`` with SHA-256 for a key of ``size`` bytes."""
    t = SHA256_DIGEST_INFO + hashlib.sha256(message).digest()
    return b"\x00\x01" + b"\xff" * (size - len(t) - 3) + b"\x00" + t


def verify(public_key: rsa.PublicKey, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``message``'s RSASSA-PKCS1-v1_5 SHA-256 signature by ``public_key``."""
    size = (public_key.n.bit_length() + 7) // 8
    if len(signature) != size or size < len(SHA256_DIGEST_INFO) + 32 + 11:
        return False
    s = int.from_bytes(signature, "big")
    if s >= public_key.n:
        return False
    block = pow(s, public_key.e, public_key.n).to_bytes(size, "big")
    return hmac.compare_digest(block, _encoded(message, size))


def sign(key: rsa.PrivateKey, message: bytes) -> bytes:
    """``message``'s RSASSA-PKCS1-v1_5 SHA-256 signature: the same bytes as ``rsa.sign(message, key, "SHA-256")``.

    The private operation is python-rsa's own, blinded, by the Chinese remainder theorem
    (``blinded_decrypt``: m^d mod n, the same function): ``rsa.sign`` does it with the whole exponent,
    about 3 times slower, and every peer of a broadcast and every check of the master waits for it.
    The result is checked with the public key before it leaves (a fault in one of the two halves of a
    CRT computation would otherwise give away a factor of n)."""
    size = (key.n.bit_length() + 7) // 8
    m = int.from_bytes(_encoded(message, size), "big")
    s = key.blinded_decrypt(m)
    if pow(s, key.e, key.n) != m:
        raise ValueError("the RSA signature did not check out with its own public key: not sent")
    return s.to_bytes(size, "big")


def sign_challenge(key: rsa.PrivateKey, challenge: str) -> str:
    """The agent's answer to a challenge: base64 of its signature (checked by :func:`check_challenge`)."""
    return base64.b64encode(sign(key, challenge.encode())).decode()


def check_challenge(public_key_pem: str, challenge: str, signature: str) -> bool:
    """Whether ``signature`` (base64) is ``challenge`` signed by the key of ``public_key_pem``."""
    try:
        pub = load_public_key(public_key_pem)
        raw = base64.b64decode(signature, validate=True)
    except (ValueError, binascii.Error):
        return False
    return verify(pub, challenge.encode(), raw)


# -- tokens ------------------------------------------------------------------------------------------------

def _segment(segment: bytes, name: str) -> bytes:
    """A base64url segment, refused as PyJWT refuses it (padding at most as base64 would have it)."""
    stripped = segment.rstrip(b"=")
    padding = len(segment) - len(stripped)
    if padding > 2 or (padding and len(segment) % 4) or len(stripped) % 4 == 1 \
            or not _BASE64URL.fullmatch(stripped):
        raise TokenError(f"Invalid {name} padding")
    decoded = base64.urlsafe_b64decode(stripped + b"=" * (-len(stripped) % 4))
    if base64.urlsafe_b64encode(decoded).rstrip(b"=") != stripped:  # no stray bits in the last character
        raise TokenError(f"Invalid {name} padding")
    return decoded


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise TokenError(f"Invalid {name} string: {e}") from e
    if not isinstance(value, dict):
        raise TokenError(f"Invalid {name} string: must be a json object")
    return value


def _int_claim(claims: dict[str, Any], name: str, what: str) -> int:
    try:
        return int(claims[name])
    except (ValueError, TypeError, OverflowError):
        raise TokenError(f"{what} must be an integer.") from None


def decode(token: str, public_key_pem: str, audience: str, leeway: float = TOKEN_LEEWAY) -> dict[str, Any]:
    """The claims of an RS256 JWT signed by ``public_key_pem`` for ``audience``, checked as
    ``jwt.decode(token, pem, algorithms=["RS256"], audience=audience, leeway=leeway,
    options={"require": REQUIRED})`` checks them; TokenError with PyJWT's message otherwise."""
    raw = token.encode()
    try:
        signing_input, crypto = raw.rsplit(b".", 1)
        header_segment, payload_segment = signing_input.split(b".", 1)
    except ValueError:
        raise TokenError("Not enough segments") from None
    header = _json_object(_segment(header_segment, "header"), "header")
    payload = _segment(payload_segment, "payload")
    signature = _segment(crypto, "crypto")
    if "kid" in header and not isinstance(header["kid"], str):
        raise TokenError("Key ID header parameter must be a string")
    if "crit" in header or header.get("b64", True) is not True:  # no extension is understood here
        raise TokenError("Unsupported critical extension or 'b64' header")
    if "alg" not in header:
        raise TokenError("Algorithm not specified")
    if header["alg"] != "RS256":  # never chosen by the token: "none" and HS256 (the key as a secret) fail here
        raise TokenError("The specified alg value is not allowed")
    try:
        pub = load_public_key(public_key_pem)
    except ValueError as e:
        raise TokenError(str(e)) from None
    if not verify(pub, signing_input, signature):
        raise TokenError("Signature verification failed")
    claims = _json_object(payload, "payload")
    for name in REQUIRED:
        if claims.get(name) is None:
            raise TokenError(f'Token is missing the "{name}" claim')
    now = time.time()
    if _int_claim(claims, "iat", "Issued At claim (iat)") > now + leeway:
        raise TokenError("The token is not yet valid (iat)")
    if "nbf" in claims and _int_claim(claims, "nbf", "Not Before claim (nbf)") > now + leeway:
        raise TokenError("The token is not yet valid (nbf)")
    if _int_claim(claims, "exp", "Expiration Time claim (exp)") <= now - leeway:
        raise TokenError("Signature has expired")
    audiences = claims["aud"] if isinstance(claims["aud"], list) else [claims["aud"]]
    if not audiences:
        raise TokenError('Token is missing the "aud" claim')
    if any(not isinstance(a, str) for a in audiences):
        raise TokenError("Invalid claim format in token")
    if audience not in audiences:
        raise TokenError("Audience doesn't match")
    if not isinstance(claims["sub"], str):
        raise TokenError("Subject must be a string")
    if "jti" in claims and not isinstance(claims["jti"], str):
        raise TokenError("JWT ID must be a string")
    return claims


def verify_token(token: str, public_key_pem: str, user: str, audience: str, *, use: str = BEARER) -> dict:
    """The token's claims if it is the user's, for this audience, fresh and of the kind ``use``
    (:data:`BEARER` or :data:`CONSOLE_LOGIN`); :class:`AuthError` otherwise."""
    if use not in (BEARER, CONSOLE_LOGIN):
        raise ValueError(f"unknown token use {use!r}")
    try:
        claims = decode(token, public_key_pem, audience)
    except TokenError as e:
        raise AuthError(f"token refused: {e}") from e
    if claims["sub"] != user:
        raise AuthError("token refused: not for this agent's user")
    if claims["exp"] - claims["iat"] > MAX_TOKEN_LIFETIME:
        raise AuthError(f"token refused: lifetime over {MAX_TOKEN_LIFETIME} s")
    if claims["iat"] > time.time() + TOKEN_LEEWAY:
        raise AuthError("token refused: issued in the future")
    if claims.get("use", BEARER) != use:
        raise AuthError("token refused: a console login token opens no API, send a bearer token"
                        if use == BEARER else "token refused: not a console login token")
    return claims
