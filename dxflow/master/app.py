"""The master's HTTP API (on its Unix socket for the CLI): the fleet, and a relay to each agent.

``/api/fleet/JOB/NODE/<path>`` (NODE ``-`` = the job's first node) relays any request
to that agent's ``/<path>`` through the node's tunnel, streaming both ways. The site service
(:mod:`dxflow.site.app`) serves the same relay (:func:`add_relay`) and the extensions of
:data:`RELAY_EXTENSIONS` with its own fleet, whose agents it reaches through their dial-out.
"""

from __future__ import annotations

import http.client
import importlib
import os
import signal

from flask import Flask, Response, jsonify, request

from dxflow import __version__, audit
from dxflow.edge import httperrors
from dxflow.edge.http import RELAY_DROP, request_target, without_own_cookies
from dxflow.errors import AgentUnreachable, UsageError
from dxflow.master.fleet import Fleet

CHUNK = 256 * 1024
#: an answer at most this long (its Content-Length) is read whole before it is passed on
SMALL_BODY = 64 * 1024
#: modules that add to the master's app: each has ``init_app(app, fleet)``.
EXTENSIONS = ("dxflow.master.websocket", "dxflow.master.forward", "dxflow.master.console", "dxflow.master.openapi",
              "dxflow.master.metrics", "dxflow.master.broadcast", "dxflow.master.jobnodes")
#: those of them the site's app adds too, with its own fleet (its console is its own: dxflow.site.console)
RELAY_EXTENSIONS = ("dxflow.master.websocket", "dxflow.master.forward", "dxflow.master.openapi",
                    "dxflow.master.metrics")


def create_app(fleet: Fleet) -> Flask:
    """The per-user master's app: the relay (:func:`add_relay`), the fleet, the console and the rest."""
    app = Flask("dxflow.master")
    app.config["FLEET"] = fleet
    for name in EXTENSIONS:
        importlib.import_module(name).init_app(app, fleet)

    @app.get("/api/master")
    def master_status():
        return jsonify(pid=os.getpid(), user=fleet.user, version=__version__, tunnels=fleet.pool.status(),
                       agents=len(fleet.registry.all()))

    @app.post("/api/shutdown")
    def shutdown():
        os.kill(os.getppid(), signal.SIGTERM)  # the gunicorn arbiter
        return jsonify(status="stopping")

    @app.get("/api/agents")
    def agents():
        if request.args.get("refresh"):
            fleet.refresh()
        show_all = request.args.get("all") == "1"
        items = [a.to_dict() for a in fleet.registry.all() if show_all or a.state != "gone"]
        return jsonify(items)

    add_relay(app, fleet)
    httperrors.install(app, default_status=502)
    return app


def add_relay(app: Flask, fleet) -> None:
    """The relay route ``/api/fleet/JOB/NODE/<path>``, on the master's app and the site's alike.

    ``fleet`` is the master's :class:`Fleet` or the site's :class:`dxflow.site.fleet.SiteFleet`: the
    relay needs only ``relay_target`` (whose agent, and may this request reach it), ``token``,
    ``acquire``/``connection``/``release`` (HTTP connections to the agent's port).
    """

    @app.route("/api/fleet/<job>/<node>/<path:path>", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    def relay(job: str, node: str, path: str):
        agent = fleet.relay_target(job, None if node == "-" else node)
        if request.method not in ("GET", "HEAD", "OPTIONS") or path.startswith("proxy/"):  # acts, not looks
            audit.record("relay", f"{request.method} /{path}", agent.reg, request.environ)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in RELAY_DROP}
        cookie = without_own_cookies(request.headers.get("Cookie", ""))
        if cookie and request.environ.get("dxflow.service"):  # a job's service on its own origin: its own cookies
            headers["Cookie"] = cookie
        headers["Authorization"] = f"Bearer {fleet.token(agent)}"
        query = request.query_string.decode()
        target = request_target(path, query)
        conn, reused = fleet.acquire(agent, timeout=3600)
        body = None
        length = request.content_length
        if request.method in ("POST", "PUT", "PATCH"):
            body = _iter_body(request.stream, length)
            if length is None:
                headers["Transfer-Encoding"] = "chunked"
            else:
                headers["Content-Length"] = str(length)

        def send(conn):
            conn.request(request.method, target, body=body, headers=headers,
                         encode_chunked=body is not None and length is None)
            return conn.getresponse()

        try:
            try:
                resp = send(conn)
            except (OSError, http.client.HTTPException):
                if not reused or body is not None:
                    raise
                conn.close()  # a kept-alive channel the agent had closed meanwhile: once more, on a new one
                conn = fleet.connection(agent, timeout=3600)
                resp = send(conn)
        except _BodyBroken as e:  # the client went away mid-upload: end the agent's side too
            conn.close()
            raise UsageError(f"request body to agent {agent.name} broken off: {e}") from e
        except (OSError, http.client.HTTPException) as e:
            try:  # the agent may have refused (403, 404 …) and closed before taking the whole body
                resp = conn.getresponse()
            except (OSError, http.client.HTTPException):
                conn.close()
                raise AgentUnreachable(f"agent {agent.name}: {e}") from e

        out_headers = [(k, v) for k, v in resp.getheaders() if k.lower() not in RELAY_DROP]
        if resp.getheader("Content-Length"):
            out_headers.append(("Content-Length", resp.getheader("Content-Length")))
        out_headers.append(("X-Dxflow-Agent", agent.name))
        if resp.length is not None and resp.length <= SMALL_BODY:
            # most answers: read whole, the channel is free for the next request before this one is
            # written back, and the answer leaves in one piece (no generator, no second write)
            try:
                content = resp.read()
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise AgentUnreachable(f"agent {agent.name}: its answer broke off: {e}") from e
            fleet.release(agent, conn, resp.isclosed() and not resp.will_close)
            return Response(content, status=resp.status, headers=out_headers, direct_passthrough=True)

        # A body of known length (a download) is passed on in full CHUNKs: fewer, larger writes
        # cost the master less CPU per byte. Anything else (SSE, NDJSON, chunked) is passed on as
        # it arrives, so live streams stay live.
        read = resp.read if resp.length is not None else resp.read1

        def stream():  # uses nothing of the request: no request context is kept for it
            try:
                while True:
                    chunk = read(CHUNK)
                    if not chunk:
                        break
                    yield chunk
            finally:  # read to the end: keep the channel for the next request; else close it
                fleet.release(agent, conn, resp.isclosed() and not resp.will_close)

        return Response(stream(), status=resp.status, headers=out_headers, direct_passthrough=True)


class _BodyBroken(Exception):
    """The client's request body ended before its Content-Length."""


def _iter_body(stream, length: int | None = None, size: int = CHUNK):
    # Stop with an error when the client's body ends short: http.client then aborts the
    # request and the agent sees its connection close (instead of waiting for the rest).
    sent = 0
    while True:
        try:
            chunk = stream.read(size)
        except Exception as e:  # noqa: BLE001 - gunicorn raises its own errors on a dropped client
            raise _BodyBroken(f"after {sent} bytes: {e}") from e
        if not chunk:
            break
        sent += len(chunk)
        yield chunk
    if length is not None and sent < length:
        raise _BodyBroken(f"{sent} of {length} bytes arrived")
