"""Every request to an agent carries a bearer token from the agent's user; anything else gets 401.

The token is read from the ``Authorization`` header only, never from the query string: a URL
ends up in logs, shell history and browser history. The one exception, the node console's
one-time login link, takes its own kind of token in its own view (``dxflow.agent.console``).
"""

from __future__ import annotations

import threading
import time

from flask import Flask, current_app, g, jsonify, request

from dxflow.auth import BEARER, TOKEN_LEEWAY, verify_token
from dxflow.errors import AuthError

#: tokens whose check is remembered at once (the master reuses one token per agent for a minute or two)
KNOWN_TOKENS = 256


class CheckedTokens:
    """Bearer tokens that passed :func:`~dxflow.auth.verify_token`, remembered until they expire.

    The master sends the same token with every request for a minute or more, and checking its
    RS256 signature is a good part of a small proxied request's cost in the agent. The token is
    remembered whole, signature included: only that exact string is let in again, and only until
    its ``exp`` (with the leeway the full check grants); then it is checked in full, and refused.
    """

    def __init__(self, size: int = KNOWN_TOKENS) -> None:
        self.size = size
        self._claims: dict[tuple[str, str, str, str], dict] = {}
        self._lock = threading.Lock()

    def verify(self, token: str, public_key_pem: str, user: str, audience: str) -> dict:
        """The claims of a bearer token for this user's key and audience; AuthError as verify_token."""
        key = (token, public_key_pem, user, audience)
        claims = self._claims.get(key)
        if claims is not None and time.time() <= claims["exp"] + TOKEN_LEEWAY:
            return claims
        claims = verify_token(token, public_key_pem, user, audience, use=BEARER)
        with self._lock:
            self._claims.pop(key, None)
            while len(self._claims) >= self.size:  # the oldest first: dicts keep insertion order
                self._claims.pop(next(iter(self._claims)))
            self._claims[key] = claims
        return claims


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
            g.claims = checked.verify(token, state.user_public_key, state.user, state.audience)
        except AuthError as e:
            return _refuse(str(e))
        return None


def _refuse(message: str):
    resp = jsonify(error="unauthorized", message=message)
    resp.status_code = 401
    resp.headers["WWW-Authenticate"] = 'Bearer realm="dxflow-agent"'
    return resp
