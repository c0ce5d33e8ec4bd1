"""``/proxy/PORT/<path>``: the job's own web services on this node (Jupyter, TensorBoard, ...).

Only ports whose listening socket belongs to one of the job user's processes are
reached (see :mod:`dxflow.agent.ports`), and only on this node. HTTP streams both
ways, a chunk at a time (server-sent events arrive as they are sent). An upgrade
(WebSocket) takes over the client's raw socket from gunicorn: the request goes to
the service, whose answer (``101 Switching Protocols``) and everything after it
is piped both ways until either side closes.
"""

from __future__ import annotations

import logging
import re
import socket
from typing import Iterator

from flask import Blueprint, Response, current_app, jsonify, request

from dxflow import audit
from dxflow.agent.logs import client_socket
from dxflow.agent.ports import check_port
from dxflow.errors import AccessDenied
from dxflow.edge.answer import Answer, AnswerError
from dxflow.edge.http import HOP_BY_HOP, Hijacked, buffered_after_head, forwarded_headers, service_response_headers
from dxflow.edge.pipes import pipe

log = logging.getLogger(__name__)
bp = Blueprint("proxy", __name__)

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
#: hop-by-hop headers, the agent's own credentials, and what http.client sets itself.
HOP_HEADERS = HOP_BY_HOP | {"host", "authorization", "content-length", "expect"}
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 3600.0     # a quiet stream (SSE, long poll) may be silent this long
SMALL_BODY = 64 * 1024
CHUNK = 256 * 1024
_PREFIX = re.compile(r"^/proxy/\d+")


def target_uri(environ: dict, path: str) -> str:
    """The path and query to ask the service for, as the client wrote them (no re-encoding)."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw and raw.startswith("/proxy/"):
        rest = _PREFIX.sub("", raw, count=1)
    else:
        query = environ.get("QUERY_STRING", "")
        rest = "/" + path + (f"?{query}" if query else "")
    if not rest.startswith("/"):
        rest = "/" + rest
    return rest


def _host_header(connect: str, port: int) -> str:
    return f"[{connect}]:{port}" if ":" in connect else f"{connect}:{port}"


def _error(status: int, error: str, message: str):
    resp = jsonify(error=error, message=message)
    resp.status_code = status
    return resp


# werkzeug matches WebSocket upgrades only to rules marked websocket=True: one set each.
# (distinct endpoints: werkzeug redirects between rules of one endpoint with the same defaults)
@bp.route("/proxy/<int:port>", defaults={"path": ""}, methods=METHODS, endpoint="proxy_bare")
@bp.route("/proxy/<int:port>/", defaults={"path": ""}, methods=METHODS, endpoint="proxy_root")
@bp.route("/proxy/<int:port>/<path:path>", methods=METHODS)
@bp.route("/proxy/<int:port>", defaults={"path": ""}, websocket=True, endpoint="proxy_ws_bare")
@bp.route("/proxy/<int:port>/", defaults={"path": ""}, websocket=True, endpoint="proxy_ws_root")
@bp.route("/proxy/<int:port>/<path:path>", websocket=True, endpoint="proxy_ws")
def proxy(port: int, path: str):
    state = current_app.config["AGENT"]
    if state.port and port == state.port:
        raise AccessDenied(f"port {port} is the dxflow agent's own port, not a service of your job")
    target = check_port(port)  # AccessDenied / NotFound unless the user's own process listens there
    connect = target["connect"]
    uri = target_uri(request.environ, path)
    audit.record("proxy", uri, state, request.environ, port=port, method=request.method)
    if "upgrade" in request.headers.get("Connection", "").lower() and request.headers.get("Upgrade"):
        return _upgrade(connect, port, uri)
    return _http(connect, port, uri)


def _http(connect: str, port: int, uri: str):
    length = request.content_length
    chunked = length is None and "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    head = [f"{request.method} {uri} HTTP/1.1", f"Host: {_host_header(connect, port)}"]
    head += [f"{key}: {value}" for key, value in forwarded_headers(request.headers.items(), HOP_HEADERS)]
    if length is not None:
        head.append(f"Content-Length: {length}")
    elif chunked:
        head.append("Transfer-Encoding: chunked")
    if any("\r" in line or "\n" in line for line in head):  # gunicorn lets none through: never split a line
        return _error(400, "bad_request", "a header or the path holds a line break")
    try:
        # the request's own bytes (gunicorn hands them over latin-1 decoded): one write, no re-encoding
        sock = socket.create_connection((connect, port), timeout=CONNECT_TIMEOUT)
    except ConnectionRefusedError:
        return _error(502, "bad_gateway", f"nothing answers on {_host_header(connect, port)} on this node")
    except socket.timeout:
        return _error(504, "gateway_timeout", f"the service on port {port} did not accept a connection in time")
    except OSError as e:
        return _error(502, "bad_gateway", f"the service on port {port} failed: {type(e).__name__}: {e}")
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        if length or chunked:
            stream = request.stream
            while True:
                data = stream.read(CHUNK)
                if not data:
                    break
                sock.sendall(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        sock.settimeout(READ_TIMEOUT)
        resp = Answer(sock, request.method)
    except socket.timeout:
        sock.close()
        return _error(504, "gateway_timeout", f"the service on port {port} did not answer in time")
    except (OSError, AnswerError) as e:
        sock.close()
        return _error(502, "bad_gateway", f"the service on port {port} failed: {type(e).__name__}: {e}")

    def body():
        try:
            while True:
                try:
                    chunk = resp.read1(CHUNK)
                except (OSError, AnswerError) as e:  # the service broke off: so do we
                    log.info("proxy port %d: %s", port, e)
                    return
                if not chunk:
                    return
                yield chunk
        finally:
            sock.close()

    headers = service_response_headers((k, v) for k, v in resp.headers if k.lower() not in HOP_HEADERS)
    declared = resp.getheader("Content-Length")
    if declared is not None and request.method != "HEAD":
        headers.append(("Content-Length", declared))
    if resp.length is not None and resp.length <= SMALL_BODY:
        # A small answer leaves in one piece right behind its headers: streamed, its pieces would
        # cross the tunnel as separate SSH packets, and sshd holds the second for the first's ACK.
        try:
            content: bytes | Iterator[bytes] = resp.read()
        except (OSError, AnswerError) as e:
            return _error(502, "bad_gateway", f"the service on port {port} failed: {type(e).__name__}: {e}")
        finally:
            sock.close()
    else:
        content = body()
    out = Response(content, status=resp.status, headers=headers, direct_passthrough=True)
    if resp.getheader("Content-Type") is None:
        del out.headers["Content-Type"]
    if request.method == "HEAD" and declared is not None:
        out.headers["Content-Length"] = declared  # what a GET would carry (the empty body made it 0)
    return out


def _upgrade(connect: str, port: int, uri: str):
    client = client_socket(request.environ)
    if client is None:
        return _error(400, "bad_request", "this server cannot hand over connections: upgrades need the agent "
                                          "under gunicorn")
    try:
        backend = socket.create_connection((connect, port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        return _error(502, "bad_gateway", f"nothing answers on {_host_header(connect, port)}: {e}")
    head = [f"{request.method} {uri} HTTP/1.1", f"Host: {_host_header(connect, port)}"]
    for key, value in forwarded_headers(request.headers.items(), {"host", "authorization", "content-length",
                                                                   "proxy-authorization"}):
        head.append(f"{key}: {value}")
    try:
        backend.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        early = buffered_after_head(request.environ)
        if early:
            backend.sendall(early)
        backend.settimeout(None)
        client.settimeout(None)
        pipe(client, backend)
    except OSError as e:
        log.info("proxy upgrade port %d: %s", port, e)
    finally:
        backend.close()
    return Hijacked()


_ERR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_PROXY_OP = {
    "summary": "HTTP (and WebSocket) proxy to a service the job's user runs on this node",
    "tags": ["proxy"],
    "responses": {"default": {"description": "whatever the service answers"},
                  "403": {"description": "not the user's port (another user's, or the agent's own)", **_ERR},
                  "404": {"description": "nothing listens on the port", **_ERR},
                  "502": {"description": "the service does not answer", **_ERR}},
}
_PORT = {"name": "port", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1,
                                                                      "maximum": 65535}}
_PATH = {"name": "path", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "passed on to the service as /PATH"}

OPENAPI = {
    "/proxy/{port}/": {m.lower(): {**_PROXY_OP, "operationId": f"proxyRoot{m.title()}", "parameters": [_PORT]}
                       for m in ("GET", "POST")},
    "/proxy/{port}/{path}": {m.lower(): {**_PROXY_OP, "operationId": f"proxy{m.title()}",
                                         "parameters": [_PORT, _PATH]}
                             for m in ("GET", "POST", "PUT", "DELETE")},
}
