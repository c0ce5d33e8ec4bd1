"""WebSocket upgrades through the master: ``/api/fleet/JOB/NODE/<path>`` to the agent's ``/<path>``.

The upgrade request goes to the agent through the node's tunnel with the master's
token; the agent's answer comes back as is. After a ``101`` the relay is a byte
pipe (frames are not parsed) until either side closes. Only the gunicorn server
hands the raw client socket to the app (``gunicorn.socket``); the route answers
501 anywhere else.

The route carries werkzeug's ``websocket=True``, so upgrades match it and plain
requests match the HTTP relay, and both pass the app's ``before_request`` checks.
"""

from __future__ import annotations

import logging
import socket

from flask import Flask, Response, jsonify, request

from dxflow import audit
from dxflow.edge.http import (HOP_BY_HOP, RELAY_DROP, Hijacked, buffered_after_head, parse_head, read_body,
                              read_head, request_target, without_own_cookies)
from dxflow.edge.pipes import pipe

from dxflow.errors import AgentUnreachable
from dxflow.master.fleet import Fleet
from dxflow.master.registry import Agent

log = logging.getLogger(__name__)

#: response headers never passed on when the agent refuses the upgrade.
DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}
HANDSHAKE_TIMEOUT = 30.0
CLOSE_GRACE = 5.0   # seconds one direction may go on after the other has ended


def init_app(app: Flask, fleet: Fleet) -> None:
    def fleet_websocket(job: str, node: str, path: str):
        agent = fleet.relay_target(job, None if node == "-" else node)
        audit.record("relay", f"WebSocket /{path}", agent.reg, request.environ)  # a shell, a proxied socket
        query = request.query_string.decode()
        return relay_websocket(fleet, agent, request_target(path, query))

    app.add_url_rule("/api/fleet/<job>/<node>/<path:path>", endpoint="fleet_websocket", view_func=fleet_websocket,
                     methods=["GET"], websocket=True)


def relay_websocket(fleet: Fleet, agent: Agent, target: str):
    """Relay the current upgrade request to ``target`` on ``agent``; for any gunicorn-served route."""
    client = request.environ.get("gunicorn.socket")
    if client is None:
        return jsonify(error="not_implemented", message="WebSocket relay needs the master to run under gunicorn"), 501
    upstream = fleet.pool.channel(agent.reg.address, agent.reg.port, generation=fleet.proven_generation(agent))
    try:
        upstream.settimeout(HANDSHAKE_TIMEOUT)
        upstream.sendall(_request_head(target, agent.reg.port, fleet.token(agent)))
        head, rest = read_head(upstream)
        status, headers = parse_head(head)
    except (OSError, EOFError, ValueError) as e:
        _close(upstream)
        raise AgentUnreachable(f"agent {agent.name}: WebSocket upgrade failed: {e}") from e
    if status != 101:  # the agent refused (401, 404, 400 …): an ordinary answer
        body = read_body(upstream, headers, rest)
        _close(upstream)
        out = [(k, v) for k, v in headers if k.lower() not in DROP_RESPONSE]
        out.append(("X-Dxflow-Agent", agent.name))
        return Response(body, status=status, headers=out)
    try:
        upstream.settimeout(None)
        client.sendall(head + rest)
        early = buffered_after_head(request.environ)
        if early:
            upstream.sendall(early)
        pipe(client, upstream, close_grace=CLOSE_GRACE)
    finally:
        _close(upstream)
        _cut(client)  # gunicorn closes it (closing it here would make its own close fail)
    return Hijacked()


def _request_head(target: str, port: int, token: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Authorization: Bearer {token}"]
    for key, value in request.headers.items():
        if key.lower() not in RELAY_DROP and "\r" not in value and "\n" not in value:
            lines.append(f"{key}: {value}")
    cookie = without_own_cookies(request.headers.get("Cookie", ""))
    if cookie and request.environ.get("dxflow.service"):  # a job's service on its own origin: its own cookies
        lines.append(f"Cookie: {cookie}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _cut(sock) -> None:
    """Wake a thread blocked reading ``sock``: shutdown for a socket, close for a paramiko channel."""
    try:
        if isinstance(sock, socket.socket):
            sock.shutdown(socket.SHUT_RDWR)
        else:
            sock.close()
    except OSError:
        pass


def _close(sock) -> None:
    try:
        sock.close()
    except OSError:
        pass
