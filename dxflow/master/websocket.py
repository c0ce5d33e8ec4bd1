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
import threading

from flask import Flask, Response, jsonify, request

from dxflow.errors import AgentUnreachable
from dxflow.master.fleet import Fleet
from dxflow.master.registry import Agent

log = logging.getLogger(__name__)

#: request headers never passed on: hop-by-hop (RFC 9110 7.6.1) and what the relay sets itself.
#: Upgrade and Connection are set again; Sec-WebSocket-* pass unchanged (the key and the accept match end to end).
DROP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
        "transfer-encoding", "upgrade", "host", "authorization", "cookie", "content-length"}
#: response headers never passed on when the agent refuses the upgrade.
DROP_RESPONSE = {"connection", "keep-alive", "transfer-encoding", "content-length", "upgrade", "date", "server"}
MAX_HEAD = 64 * 1024
HANDSHAKE_TIMEOUT = 30.0
CLOSE_GRACE = 5.0   # seconds one direction may go on after the other has ended
CHUNK = 64 * 1024


def init_app(app: Flask, fleet: Fleet) -> None:
    def fleet_websocket(job: str, node: str, path: str):
        agent = fleet.find(job, None if node == "-" else node)
        if agent.state == "starting":
            fleet.refresh()
        query = request.query_string.decode()
        return relay_websocket(fleet, agent, "/" + path + (f"?{query}" if query else ""))

    app.add_url_rule("/api/fleet/<job>/<node>/<path:path>", endpoint="fleet_websocket", view_func=fleet_websocket,
                     methods=["GET"], websocket=True)


def relay_websocket(fleet: Fleet, agent: Agent, target: str):
    """Relay the current upgrade request to ``target`` on ``agent``; for any gunicorn-served route."""
    client = request.environ.get("gunicorn.socket")
    if client is None:
        return jsonify(error="not_implemented", message="WebSocket relay needs the master to run under gunicorn"), 501
    upstream = fleet.pool.channel(agent.reg.address, agent.reg.port)
    try:
        upstream.settimeout(HANDSHAKE_TIMEOUT)
        upstream.sendall(_request_head(target, agent.reg.port, fleet.token(agent)))
        head, rest = _read_head(upstream)
        status, headers = _parse_head(head)
    except (OSError, EOFError, ValueError) as e:
        _close(upstream)
        raise AgentUnreachable(f"agent {agent.name}: WebSocket upgrade failed: {e}") from e
    if status != 101:  # the agent refused (401, 404, 400 …): an ordinary answer
        body = _read_body(upstream, headers, rest)
        _close(upstream)
        out = [(k, v) for k, v in headers if k.lower() not in DROP_RESPONSE]
        out.append(("X-Dxflow-Agent", agent.name))
        return Response(body, status=status, headers=out)
    try:
        upstream.settimeout(None)
        client.sendall(head + rest)
        early = _read_ahead(request.environ)
        if early:
            upstream.sendall(early)
        pipe(client, upstream)
    finally:
        _close(upstream)
        _cut(client)  # gunicorn closes it (closing it here would make its own close fail)
    return Hijacked()


class Hijacked(Response):
    """Ends a request whose socket the app has taken over: gunicorn writes nothing and closes the connection."""

    def __call__(self, environ, start_response):
        raise StopIteration()  # gunicorn's workers treat it as "close this connection" (as flask-sock does)


def _request_head(target: str, port: int, token: str) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Authorization: Bearer {token}"]
    for key, value in request.headers.items():
        if key.lower() not in DROP and "\r" not in value and "\n" not in value:
            lines.append(f"{key}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_ahead(environ: dict) -> bytes:
    """Bytes the client sent after its upgrade request that gunicorn's parser has already read, if any."""
    unreader = getattr(getattr(environ.get("wsgi.input"), "reader", None), "unreader", None)
    take = getattr(unreader, "take_buffered", None)
    try:
        return (take() or b"") if take else b""
    except Exception:  # noqa: BLE001 - a gunicorn without it: nothing read ahead that we could get
        return b""


def _read_head(sock) -> tuple[bytes, bytes]:
    """The response head (status line and headers, with the blank line) and whatever came after it."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            raise EOFError("response head too long")
        data = sock.recv(CHUNK)
        if not data:
            raise EOFError("the agent closed the connection before answering")
        buf += data
    end = buf.index(b"\r\n\r\n") + 4
    return buf[:end], buf[end:]


def _parse_head(head: bytes) -> tuple[int, list[tuple[str, str]]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise ValueError(f"the agent answered with {lines[0][:100]!r}")
    status = int(parts[1])
    headers = []
    for line in lines[1:]:
        key, sep, value = line.partition(":")
        if sep:
            headers.append((key.strip(), value.strip()))
    return status, headers


def _read_body(sock, headers: list[tuple[str, str]], rest: bytes, limit: int = 1 << 20) -> bytes:
    length = next((v for k, v in headers if k.lower() == "content-length"), None)
    want = int(length) if length and length.isdigit() else limit
    body = rest
    try:
        while len(body) < min(want, limit):
            data = sock.recv(CHUNK)
            if not data:
                break
            body += data
    except OSError:
        pass
    return body[:want]


def pipe(client: socket.socket, upstream) -> None:
    """Copy bytes both ways until both directions end; once one has ended, the other gets CLOSE_GRACE seconds."""
    up_done = threading.Event()
    down_done = threading.Event()

    def down():  # agent -> client, in a helper thread
        try:
            _copy(upstream, client)
        finally:
            _shutdown_write(client)
            down_done.set()
        if not up_done.wait(CLOSE_GRACE):
            _cut(client)  # the client does not finish its close: end the request thread's read

    t = threading.Thread(target=down, name="ws-relay", daemon=True)
    t.start()
    try:
        _copy(client, upstream)  # client -> agent, in the request's thread
    finally:
        _shutdown_write(upstream)
        up_done.set()
    if not down_done.wait(CLOSE_GRACE):
        _cut(upstream)
    t.join()


def _copy(src, dst) -> None:
    while True:
        try:
            data = src.recv(CHUNK)
        except OSError:
            return
        if not data:
            return
        try:
            dst.sendall(data)
        except OSError:
            return


def _shutdown_write(sock) -> None:
    try:
        if hasattr(sock, "shutdown_write"):  # paramiko Channel
            sock.shutdown_write()
        else:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


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
