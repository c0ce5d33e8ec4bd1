"""``/api/health``: alive, and (with ``?challenge=``) proof that this is the registered agent.

``/api/heartbeat``: an answer that never ends, a line every :data:`BEAT_EVERY` seconds. The master
keeps one open per checked agent: when this process dies, the stream's end tells the master at
once, before anyone else could take the agent's port (``dxflow.master.heartbeat``). The writes
also end the stream (and free its thread) once the master has gone.
"""

from __future__ import annotations

import os
import select
import time
from typing import Iterator

from flask import Blueprint, Response, current_app, jsonify, request

from dxflow import API_VERSION, __version__
from dxflow.signatures import sign_challenge

bp = Blueprint("health", __name__)

#: A line this often keeps the stream from looking silent to the master (``dxflow.master.heartbeat.SILENT``).
#: The agent's death is told by the stream's end, not by missing lines: so rarely, each line being a
#: wakeup of the agent and of the master, per agent (issue #11: idle CPU).
BEAT_EVERY = 15.0
BEAT_CHECK = 0.5  # where no pidfd can watch the arbiter: how often a beating stream looks that it lives


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
        # the worker outlives a SIGKILLed arbiter for a moment: the beat stops with the arbiter, not later.
        # A pidfd of the arbiter becomes readable the moment it exits: one wakeup per line, none between.
        try:
            watch: int | None = os.pidfd_open(parent)
        except (OSError, AttributeError):  # kernel before 5.3: look every BEAT_CHECK seconds instead
            watch = None
        try:
            while os.getppid() == parent:
                yield b": beat\n\n"  # an SSE comment: the first one sends the head at once
                if watch is not None:
                    if select.select([watch], [], [], BEAT_EVERY)[0]:
                        return
                    continue
                for _ in range(max(1, int(BEAT_EVERY / BEAT_CHECK))):
                    time.sleep(BEAT_CHECK)
                    if os.getppid() != parent:
                        return
        finally:
            if watch is not None:
                os.close(watch)

    return Response(beats(), mimetype="text/event-stream", headers={"Cache-Control": "no-store"})
