"""``dxflow forward`` and ``dxflow ports``: reach the web services your job runs on its nodes.

``forward`` listens on 127.0.0.1 on the login node. Each connection to it becomes a
raw TCP pipe through the master (``/api/forward``, the node's SSH transport) to the
port on the node, after the agent has checked that one of your processes listens
there. With a master that has no ``/api/forward`` (or with ``--http``), each HTTP
request is relayed through the agent's ``/proxy/PORT/`` instead.
"""

from __future__ import annotations

import argparse
import sys

CHUNK = 64 * 1024


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forward", help="open a local port that leads to a port of your job on a node",
                       description=(
                           "Listen on 127.0.0.1:LPORT on this (login) node; every connection to it leads to "
                           "PORT on NODE (default: the job's first node), where a process of yours must "
                           "listen (Jupyter, TensorBoard, a web app). Prints the URL and runs until Ctrl-C. "
                           "From a laptop, add `ssh -L LPORT:127.0.0.1:LPORT login-node`."))
    p.add_argument("target", metavar="JOB[:NODE]")
    p.add_argument("port", type=int, metavar="PORT", help="the port on the node")
    p.add_argument("--local", type=int, metavar="LPORT", default=None,
                   help="local port (default: PORT when it is free, else any free port; 0 = any)")
    p.add_argument("--http", action="store_true",
                   help="relay HTTP requests through the agent's proxy instead of a raw TCP pipe "
                        "(no WebSockets)")
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("ports", help="list the ports your job listens on, on a node",
                       description="List the TCP ports your processes listen on, on NODE of JOB (default: "
                       "the job's first node), with the owning process. Reach one with `dxflow forward`.")
    p.add_argument("target", metavar="JOB[:NODE]")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_ports)


def cmd_ports(args: argparse.Namespace) -> int:
    from dxflow.cli.util import parse_target, print_json, print_table
    from dxflow.master.client import MasterClient

    job, node = parse_target(args.target)
    client = MasterClient().ensure()
    ports = client.json("GET", client.agent_path(job, node, "/api/ports"))
    if args.json:
        print_json(ports)
        return 0
    if not ports:
        print(f"no ports: none of your processes listens on TCP on that node of job {job}")
        return 0
    print_table(["PORT", "ADDRESS", "PID", "PROCESS", "COMMAND"],
                [[p["port"], p["address"], p["pid"], p["process"], p.get("command", "")[:60]] for p in ports])
    return 0


# -- forward -------------------------------------------------------------------------------------------

def _listen(port: int | None, wanted: int):
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    candidates = [port] if port is not None else [wanted, 0]
    for i, p in enumerate(candidates):
        try:
            s.bind(("127.0.0.1", p))
            break
        except OSError as e:
            if i == len(candidates) - 1:
                from dxflow.errors import UsageError
                raise UsageError(f"cannot listen on 127.0.0.1:{p}: {e.strerror}; choose another with --local") from e
    s.listen(64)
    return s


def _not_found_route(raw: bytes) -> bool:
    """A 404 of the master's router (no such endpoint), not of the job or node."""
    import json

    try:
        return json.loads(raw).get("error") == "not_found"
    except (ValueError, AttributeError):
        return False


def cmd_forward(args: argparse.Namespace) -> int:
    import json
    import logging
    import threading
    from urllib.parse import quote

    from dxflow.cli.util import parse_target
    from dxflow.master.client import MasterClient, check

    log = logging.getLogger("dxflow.forward")
    job, node = parse_target(args.target)
    client = MasterClient().ensure()
    mode = "http" if args.http else "tcp"
    path = f"/api/forward/{quote(job, safe='')}/{quote(node or '-', safe='')}/{args.port}"
    if mode == "tcp":
        resp = client.request("GET", path, timeout=30)
        raw = resp.read()
        if resp.status == 404 and _not_found_route(raw):
            log.warning("this master has no raw forwarding (/api/forward): relaying HTTP through the agent")
            mode = "http"
        else:
            check(resp, raw)
            info = json.loads(raw)
    if mode == "http":
        info = client.json("GET", client.agent_path(job, node, f"/api/ports/{args.port}"))
        info.setdefault("node", node or "(first node)")
    server = _listen(args.local, args.port)
    lport = server.getsockname()[1]
    print(f"http://127.0.0.1:{lport}/ -> job {job} node {info.get('node')} port {args.port} "
          f"({info.get('process') or 'pid ' + str(info.get('pid'))}); Ctrl-C to stop", flush=True)
    try:
        if mode == "tcp":
            while True:
                conn, _ = server.accept()
                threading.Thread(target=_tcp_connection, args=(client, path, conn), daemon=True).start()
        else:
            _serve_http(server, client, job, node, args.port)
    except KeyboardInterrupt:
        return 0
    finally:
        server.close()


def _read_head(sock) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(CHUNK)
        if not data:
            break
        buf += data
        if len(buf) > 64 * 1024:
            break
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


def _tcp_connection(client, path: str, local) -> None:
    """One local connection: an upgraded connection to the master, then bytes both ways."""
    import socket

    from dxflow.master.forward import UPGRADE, pipe

    up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        up.connect(str(client.sock))
        up.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: {UPGRADE}\r\n\r\n"
                   .encode())
        head, rest = _read_head(up)
        status = head.split(b" ", 2)[1:2]
        if status != [b"101"]:
            message = _error_message(up, head, rest)
            print(f"dxflow: forward: {message}", file=sys.stderr, flush=True)
            body = f"dxflow forward: {message}\n".encode()
            local.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            return
        if rest:
            local.sendall(rest)
        pipe(local, up)
    except OSError as e:
        print(f"dxflow: forward: {e}", file=sys.stderr, flush=True)
    finally:
        up.close()
        local.close()


def _error_message(sock, head: bytes, rest: bytes) -> str:
    import json

    length = 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    sock.settimeout(5)
    try:
        while len(rest) < length:
            data = sock.recv(CHUNK)
            if not data:
                break
            rest += data
    except OSError:
        pass
    try:
        data = json.loads(rest)
        return data.get("message") or data.get("error") or head.split(b"\r\n")[0].decode()
    except ValueError:
        return head.split(b"\r\n")[0].decode(errors="replace")


def _serve_http(server, client, job: str, node: str | None, port: int) -> None:
    """Relay each HTTP request through the master to the agent's /proxy/PORT/ (streamed back)."""
    import http.client
    import socketserver
    from http.server import BaseHTTPRequestHandler

    from dxflow.master.client import UnixHTTPConnection

    hop = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
           "transfer-encoding", "upgrade", "host", "content-length"}

    class Relay(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

        def relay(self):
            length = int(self.headers.get("Content-Length") or 0)
            if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
                self.send_error(411, "dxflow forward --http needs a Content-Length on request bodies")
                return
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
            if body is not None:
                headers["Content-Length"] = str(length)
            conn = UnixHTTPConnection(client.sock, timeout=None)
            try:
                conn.request(self.command, client.agent_path(job, node, f"/proxy/{port}{self.path}"),
                             body=body, headers=headers)
                resp = conn.getresponse()
                self.send_response(resp.status, resp.reason)
                for k, v in resp.getheaders():
                    if (k.lower() not in hop or k.lower() == "content-length") and k.lower() not in ("server", "date"):
                        self.send_header(k, v)
                if resp.getheader("Content-Length") is None and self.command != "HEAD" \
                        and resp.status >= 200 and resp.status not in (204, 304):
                    self.send_header("Connection", "close")  # the end of the body is the end of the connection
                    self.close_connection = True
                self.end_headers()
                while self.command != "HEAD":
                    chunk = resp.read1(CHUNK)
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    self.wfile.flush()
            except (OSError, http.client.HTTPException) as e:
                self.close_connection = True
                print(f"dxflow: forward: {e}", file=sys.stderr, flush=True)
            finally:
                conn.close()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = relay

    class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
        daemon_threads = True

        def __init__(self, sock):
            socketserver.TCPServer.__init__(self, sock.getsockname(), Relay, bind_and_activate=False)
            self.socket = sock

    Server(server).serve_forever()
