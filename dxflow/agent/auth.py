"""Every request to an agent carries a bearer token from the agent's user; anything else gets 401.

A token is let in when it names the agent's own user and its key (``aud``) and is signed by the
user's key (``~/.dxflow/id_rsa``, what the user's master signs with) or, where the site runs a
site service (``site_gateways``; docs/site.md), by the site's token key the site admin publishes
(``site_keys``/token_key.pem): the service signs for a job's owner only, and a token naming any
other user (bob's, to alice's agent) is refused whoever signed it.

The token is read from the ``Authorization`` header only, never from the query string: a URL
ends up in logs, shell history and browser history. The one exception, the node console's
one-time login link, takes its own kind of token in its own view (``dxflow.agent.console``).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from flask import Flask, current_app, g, jsonify, request

from dxflow.signatures import BEARER, TOKEN_LEEWAY, verify_token
from dxflow.config import SiteConfig
from dxflow.errors import AuthError

log = logging.getLogger("dxflow.agent")

#: tokens whose check is remembered at once (the master reuses one token per agent for a minute or two)
KNOWN_TOKENS = 256


class CheckedTokens:
    """Bearer tokens that passed :func:`~dxflow.signatures.verify_token`, remembered until they expire.

    The master sends the same token with every request for a minute or more, and checking its
    RS256 signature is a good part of a small proxied request's cost in the agent. The token is
    remembered whole, signature included: only that exact string is let in again, and only until
    its ``exp`` (with the leeway the full check grants); then it is checked in full, and refused.
    """

    def __init__(self, size: int = KNOWN_TOKENS) -> None:
        self.size = size
        self._claims: dict[tuple[str, str, str, str, str], dict] = {}
        self._lock = threading.Lock()

    def verify(self, token: str, public_key_pem: str, user: str, audience: str, site_key_pem: str = "") -> dict:
        """The claims of a bearer token for this user and audience, signed by the user's key or by the
        site's (``site_key_pem``, "" for none); AuthError as verify_token."""
        key = (token, public_key_pem, site_key_pem, user, audience)
        claims = self._claims.get(key)
        if claims is not None and time.time() <= claims["exp"] + TOKEN_LEEWAY:
            return claims
        claims = verify_either(token, (public_key_pem, site_key_pem), user, audience)
        with self._lock:
            self._claims.pop(key, None)
            while len(self._claims) >= self.size:  # the oldest first: dicts keep insertion order
                self._claims.pop(next(iter(self._claims)))
            self._claims[key] = claims
        return claims


def verify_either(token: str, keys: tuple[str, ...], user: str, audience: str) -> dict:
    """The claims of a bearer token signed by any of ``keys`` (empty ones skipped), for ``user`` and
    ``audience``; the AuthError of the first key otherwise, unless another key's says more than a
    wrong signature (a site token for another user: "not for this agent's user")."""
    errors: list[AuthError] = []
    for pem in (k for k in keys if k):
        try:
            return verify_token(token, pem, user, audience, use=BEARER)
        except AuthError as e:
            errors.append(e)
    if not errors:
        raise AuthError("token refused: no key to check it with")
    told = [e for e in errors if "Signature verification failed" not in str(e)]
    raise (told or errors)[0]


def site_token_key(site: SiteConfig) -> str:
    """PEM of the site service's token key (``site_keys``/token_key.pem), "" (logged) when unreadable:
    then only the user's own tokens open this agent."""
    path = Path(site.site_keys) / "token_key.pem"
    try:
        pem = path.read_text()
    except OSError as e:
        log.error("cannot read the site's token key %s: the site service cannot reach this agent's API: %s",
                  path, e)
        return ""
    if "PRIVATE" in pem:  # a private key published by mistake: refuse to lean on it
        log.error("%s holds a private key, not the site's public token key: ignored", path)
        return ""
    return pem


def init_app(app: Flask) -> None:
    checked = CheckedTokens()

    @app.before_request
    def require_token():
        if request.endpoint in app.config.get("PUBLIC_ENDPOINTS", ()):
            return None
        if g.get("console_session"):  # a browser with the node console's session cookie (dxflow.agent.console)
            return None
        state = current_app.config["AGENT"]
        header = request.headers.get("Authorization", "")
        token = header[7:] if header.startswith("Bearer ") else ""
        if not token:
            return _refuse("missing bearer token: use `dxflow` on the login node, or send "
                           "'Authorization: Bearer <token>' signed by your ~/.dxflow/id_rsa")
        try:
            g.claims = checked.verify(token, state.user_public_key, state.user, state.audience,
                                      state.extra.get("site_token_key", ""))
        except AuthError as e:
            return _refuse(str(e))
        return None


def _refuse(message: str):
    resp = jsonify(error="unauthorized", message=message)
    resp.status_code = 401
    resp.headers["WWW-Authenticate"] = 'Bearer realm="dxflow-agent"'
    return resp
