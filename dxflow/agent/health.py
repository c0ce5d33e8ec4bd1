"""``/api/health``: alive, and (with ``?challenge=``) proof that this is the registered agent."""

from __future__ import annotations

import time

from flask import Blueprint, current_app, jsonify, request

from dxflow import API_VERSION, __version__
from dxflow.auth import sign_challenge

bp = Blueprint("health", __name__)


@bp.get("/api/health")
def health():
    state = current_app.config["AGENT"]
    body = {"status": "ok", "job": state.job, "node": state.node, "user": state.user,
            "api_version": API_VERSION, "version": __version__, "uptime": time.time() - state.started}
    challenge = request.args.get("challenge", "")
    if challenge:
        if len(challenge) > 256:
            return jsonify(error="bad_request", message="challenge longer than 256 characters"), 400
        body["signature"] = sign_challenge(state.key, challenge)
    return jsonify(body)
