"""``/api/health``: alive, and (with ``?challenge=``) proof that this is the registered agent.

``/api/heartbeat``: an answer that never ends, a line every :data:`BEAT_EVERY` seconds. The master
keeps one open per checked agent: when this process dies, the stream's end tells the master at
once, before anyone else could take the agent's port (``dxflow.master.heartbeat``). The writes
also end the stream (and free its thread) once the master has gone.
"""

from __future__ import annotations

import os
import time
from typing import Iterator

from flask import Blueprint, Response, current_app, jsonify, request

from dxflow import API_VERSION, __version__
from dxflow.auth import sign_challenge

bp = Blueprint("health", __name__)

BEAT_EVERY = 5.0
BEAT_CHECK = 0.5  # how often a beating stream checks that the agent's arbiter lives


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


@bp.get("/api/heartbeat")
def heartbeat():
    parent = os.getppid()  # the gunicorn arbiter: the agent's registered pid

    def beats() -> Iterator[bytes]:
        # the worker outlives a SIGKILLed arbiter for a moment: the beat stops with the arbiter, not later
        while os.getppid() == parent:
            yield b": beat\n\n"  # an SSE comment: the first one sends the head at once
            time.sleep(BEAT_CHECK)
            for _ in range(int(BEAT_EVERY / BEAT_CHECK) - 1):
                if os.getppid() != parent:
                    return
                time.sleep(BEAT_CHECK)

    return Response(beats(), mimetype="text/event-stream", headers={"Cache-Control": "no-store"})
