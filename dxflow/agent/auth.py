"""Every request to an agent carries a bearer token from the agent's user; anything else gets 401.

The token is read from the ``Authorization`` header only, never from the query string: a URL
ends up in logs, shell history and browser history. The one exception, the node console's
one-time login link, takes its own kind of token in its own view (``dxflow.agent.console``).
"""

from __future__ import annotations

from flask import Flask, current_app, g, jsonify, request

from dxflow.auth import BEARER, verify_token
from dxflow.errors import AuthError


def init_app(app: Flask) -> None:
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
            g.claims = verify_token(token, state.user_public_key, state.user, state.audience, use=BEARER)
        except AuthError as e:
            return _refuse(str(e))
        return None


def _refuse(message: str):
    resp = jsonify(error="unauthorized", message=message)
    resp.status_code = 401
    resp.headers["WWW-Authenticate"] = 'Bearer realm="dxflow-agent"'
    return resp
