"""``dxflow forward`` and ``dxflow ports``: reach the web services your job runs on its nodes.

``forward`` listens on 127.0.0.1 on the login node (or, with ``--unix``, on a Unix socket
in ``~/.dxflow/forward/``). Each connection to it becomes a raw TCP pipe through the master
(``/api/forward``, the node's SSH transport) to the port on the node, after the agent has
checked that one of your processes listens there. With a master that has no ``/api/forward``
(or with ``--http``), each HTTP request is relayed through the agent's ``/proxy/PORT/`` instead.

A port on 127.0.0.1 is open to every user of the login node, so every accepted connection
is first asked whose it is (:mod:`dxflow.edge.peer`, the kernel's word) and one that is not
the user's is closed before a byte is read, sent, or passed to the master.

The forward does not need the service to be up: started right after ``sbatch``, before the
job runs or Jupyter has bound its port, it listens at once, says it waits for NODE:PORT, and
holds each connection until the service listens (the master checks the port's owner again
for every connection). Only a refusal (another user's port, the agent's own) ends it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dxflow.errors import UsageError

if TYPE_CHECKING:
    import socket

CHUNK = 64 * 1024
WAIT_POLL = 1.0  # seconds between two asks whether the service listens yet


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("forward", help="open a local port that leads to a port of your job on a node",
                       description=(
                           "Listen on 127.0.0.1:LPORT on this (login) node; every connection to it leads to "
                           "PORT on NODE (default: the job's first node), where a process of yours must "
                           "listen (Jupyter, TensorBoard, a web app). Only your own processes may connect: "
                           "a connection from another user of this node is refused and closed unread. "
                           "Prints the URL and runs until Ctrl-C. Start it right after sbatch if you like: "
                           "until the job's service listens it says it waits for NODE:PORT and holds each "
                           "connection, then connects it. From a laptop, add "
                           "`ssh -L LPORT:127.0.0.1:LPORT login-node`. With --unix, listen on a Unix socket "
                           "that only you can open instead, and print the `ssh -L` line that reaches it."))
    p.add_argument("target", metavar="JOB[:NODE]", help="the job (and node), or a node where one job of yours runs")
    p.add_argument("port", metavar="[LPORT:]PORT", help="the port on the node; LPORT:PORT also sets the local "
                   "port, as in ssh -L (same as --local LPORT)")
    p.add_argument("--local", type=int, metavar="LPORT", default=None,
                   help="local port (default: PORT when it is free, else any free port; 0 = any); with "
                        "--unix, the laptop's port in the printed ssh line (default: PORT)")
    p.add_argument("--unix", nargs="?", const="", default=None, metavar="PATH",
                   help="listen on a Unix socket (mode 0600) instead of a TCP port: PATH, by default "
                        "~/.dxflow/forward/JOB-NODE-PORT.sock (write --unix=PATH, or put --unix last)")
    p.add_argument("--http", action="store_true",
                   help="relay HTTP requests through the agent's proxy instead of a raw TCP pipe "
                        "(no WebSockets)")
    p.set_defaults(func=cmd_forward)

    p = sub.add_parser("ports", help="list the ports your job listens on, on a node",
                       description="List the TCP ports your processes listen on, on NODE of JOB (default: "
                       "the job's first node), with the owning process. Reach one with `dxflow forward`.")
    p.add_argument("target", metavar="JOB[:NODES]", help="a job, JOB:NODE, or a node set (JOB:n[1-4], JOB:all): "
                   "one row per port of each node")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_ports)


def cmd_ports(args: argparse.Namespace) -> int:
    from dxflow.cli import targets
    from dxflow.cli.service import service
    from dxflow.cli.util import print_json, print_table

    target = targets.parse(args.target)
    client = service().ensure()
    where = targets.resolve(client, target)
    if target.several:
        return _ports_nodes(client, where, args.json)
    job, node = where.job, where.nodes[0]
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




def _ports_nodes(client, where, as_json: bool) -> int:
    """``dxflow ports JOB:NODES``: every node asked at once; one row per port, with its node."""
    import sys
    from concurrent.futures import ThreadPoolExecutor

    from dxflow.cli.util import print_json, print_table
    from dxflow.errors import DxflowError
    from dxflow.schedulers.hostlist import fold

    def ask(node: str) -> tuple[str, list | str]:
        try:
            return node, client.json("GET", client.agent_path(where.job, node, "/api/ports"), timeout=30)
        except (DxflowError, OSError) as e:
            return node, str(e)

    with ThreadPoolExecutor(max_workers=max(1, min(32, len(where.nodes)))) as pool:
        answers = list(pool.map(ask, where.nodes))
    answers += list(where.missing)  # nodes of the set without an agent, and why
    rows = [{"node": node, **p} for node, ports in answers if isinstance(ports, list) for p in ports]
    failed = {node: why for node, why in answers if isinstance(why, str)}
    if as_json:
        print_json(rows)
    elif rows:
        print_table(["NODE", "PORT", "ADDRESS", "PID", "PROCESS", "COMMAND"],
                    [[p["node"], p["port"], p["address"], p["pid"], p["process"], p.get("command", "")[:50]]
                     for p in rows])
    else:
        print(f"no ports: none of your processes listens on TCP on {fold(where.nodes)} of job {where.job}")
    for node, why in failed.items():
        print(f"dxflow: {node}: {why}", file=sys.stderr)
    return 1 if failed else 0

# -- forward -------------------------------------------------------------------------------------------

def _stop_on_signals() -> None:
    """SIGTERM, and SIGHUP (the terminal or ssh session closed), end the forward as Ctrl-C does: cleanly."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:  # leave nohup's ignored SIGHUP ignored
            signal.signal(sig, interrupt)


def _not_found_route(raw: bytes) -> bool:
    """A 404 of the master's router (no such endpoint), not of the job or node."""
    import json

    try:
        return json.loads(raw).get("error") == "not_found"
    except (ValueError, AttributeError):
        return False


def _not_yet(status: int, raw: bytes) -> str | None:
    """Why the service cannot be reached *yet* (nothing listens, no agent of the job yet, the agent
    being checked): the message to show while waiting; None for any other answer."""
    import json

    if status not in (404, 502) or _not_found_route(raw):
        return None
    try:
        data = json.loads(raw)
    except (ValueError, AttributeError):
        return f"HTTP {status}"
    if data.get("error") == "AgentLost":  # the agent died or its port was taken: no waiting makes it come back
        return None
    return str(data.get("message") or data.get("error") or f"HTTP {status}")


def _client_left(conn: socket.socket) -> bool:
    """Whether the local client closed its connection (read: an end of file waiting, no data)."""
    import select
    import socket

    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def cmd_forward(args: argparse.Namespace) -> int:
    import json
    import logging
    import threading
    from urllib.parse import quote

    from dxflow.cli import targets
    from dxflow.cli.forward_local import admitted, listen_tcp, listen_unix, remove_own, unix_socket_path
    from dxflow.cli.service import service
    from dxflow.master.client import check

    log = logging.getLogger("dxflow.forward")
    target = targets.parse(args.target, several=False, command="forward")
    local, args.port = targets.port_pair(str(args.port))  # before anything is contacted: exit 2
    if local is not None:
        if args.local is not None and args.local != local:
            raise UsageError(f"two local ports named: {local} (in {local}:{args.port}) and --local {args.local}")
        args.local = local
    if args.local is not None and not 0 <= args.local < 65536:
        raise UsageError(f"--local {args.local}: expected a number from 0 to 65535")
    client = service().ensure()
    job, node = (targets.one(client, args.target, "forward") if target.bare or target.cluster
                 else (target.job, target.nodes))
    # a site service reaches only the agents' own API, never another port of a node: HTTP through the agent
    mode = "http" if args.http or not getattr(client, "raw_forward", True) else "tcp"
    path = f"/api/forward/{quote(job, safe='')}/{quote(node or '-', safe='')}/{args.port}"
    waiting: str | None = None
    info: dict = {}
    if mode == "tcp":
        resp = client.request("GET", path, timeout=30)
        raw = resp.read()
        if resp.status == 404 and _not_found_route(raw):
            log.warning("this master has no raw forwarding (/api/forward): relaying HTTP through the agent")
            mode = "http"
        else:
            waiting = _not_yet(resp.status, raw)
            if waiting is None:
                check(resp, raw)
                info = json.loads(raw)
    if mode == "http":
        resp = client.request("GET", client.agent_path(job, node, f"/api/ports/{args.port}"), timeout=30)
        raw = resp.read()
        waiting = _not_yet(resp.status, raw)
        if waiting is None:
            check(resp, raw)
            info = json.loads(raw)
        info.setdefault("node", node or "(first node)")
    where = f"{info.get('node') or node or 'its first node'}:{args.port}"
    about = (f"job {job} node {info.get('node')} port {args.port} "
             f"({info.get('process') or 'pid ' + str(info.get('pid'))})" if waiting is None
             else f"job {job} {where} (once it listens)")
    unix_path: Path | None = None
    inode = 0
    if args.unix is not None:
        unix_path = unix_socket_path(args.unix, job, node or (info.get("node") if mode == "tcp" else None) or "first",
                               args.port)
        server, inode = listen_unix(unix_path)
    else:
        server = listen_tcp(args.local, args.port)
    try:
        _stop_on_signals()
        if unix_path is None:
            print(f"http://127.0.0.1:{server.getsockname()[1]}/ -> {about}; Ctrl-C to stop", flush=True)
        else:
            print(_unix_banner(unix_path, about, args.local or args.port), flush=True)
        if waiting is not None:
            print(f"waiting for job {job} {where}: {waiting}; connections are held until it listens",
                  flush=True)
        if mode == "tcp":
            while True:
                conn, _ = server.accept()
                if not admitted(conn):
                    conn.close()  # unread: nothing reaches the master, nothing goes back
                    continue
                threading.Thread(target=_tcp_connection, args=(client, path, conn), daemon=True).start()
        else:
            _serve_http(server, client, job, node, args.port)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
        if unix_path is not None:
            remove_own(unix_path, inode)
    return 0


def _unix_banner(path: Path, about: str, lport: int) -> str:
    """Where the Unix socket leads, and the two ways to use it: here, and from a laptop through ssh."""
    import getpass
    import shlex

    from dxflow.cli.console import login_host

    return (f"{path} -> {about}; Ctrl-C to stop\n"
            f"On this node: curl --unix-socket {shlex.quote(str(path))} http://localhost/\n"
            f"From your laptop: ssh -N -L {shlex.quote(f'{lport}:{path}')} {getpass.getuser()}@{login_host()}\n"
            f"then open http://127.0.0.1:{lport}/ there.")


def _tcp_connection(client, path: str, local: socket.socket) -> None:
    """One local connection: an upgraded connection to the master, then bytes both ways.

    While the service does not listen yet, the upgrade is asked for again every WAIT_POLL
    seconds (each ask is a full check of the port's owner), as long as the local client waits."""
    import time

    from dxflow.edge.http import FORWARD_UPGRADE, parse_head, read_body, read_head
    from dxflow.edge.pipes import pipe
    from dxflow.errors import MasterUnavailable

    waited = False
    while True:
        try:
            up = client.socket(timeout=60)
        except MasterUnavailable as e:
            print(f"dxflow: forward: {e}", file=sys.stderr, flush=True)
            local.close()
            return
        try:
            proof = "".join(f"{k}: {v}\r\n" for k, v in client.auth_headers("GET", path))  # the site's, per request
            up.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                       f"Upgrade: {FORWARD_UPGRADE}\r\n{proof}\r\n".encode())
            head, rest = read_head(up)
            status, headers = parse_head(head)
            if status == 101:
                break
            up.settimeout(5)
            raw = read_body(up, headers, rest)
        except (OSError, EOFError, ValueError) as e:
            print(f"dxflow: forward: {e}", file=sys.stderr, flush=True)
            up.close()
            local.close()
            return
        up.close()
        if _not_yet(status, raw) is not None:
            if _client_left(local):  # it gave up waiting
                local.close()
                return
            waited = True
            time.sleep(WAIT_POLL)
            continue
        message = _error_message(head, raw)
        print(f"dxflow: forward: {message}", file=sys.stderr, flush=True)
        body = f"dxflow forward: {message}\n".encode()
        try:
            local.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                          b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        except OSError:
            pass
        local.close()
        return
    if waited:
        _, node, port = path.rsplit("/", 2)
        print(f"dxflow: forward: {node}:{port} listens now: connected", file=sys.stderr, flush=True)
    try:
        up.settimeout(None)
        if rest:
            local.sendall(rest)
        pipe(local, up)
    except (OSError, EOFError, ValueError) as e:  # EOFError, ValueError: no (HTTP) answer from the master
        print(f"dxflow: forward: {e}", file=sys.stderr, flush=True)
    finally:
        up.close()
        local.close()


def _error_message(head: bytes, body: bytes) -> str:
    """The master's JSON error message, else its status line."""
    import json

    status_line = head.split(b"\r\n")[0].decode(errors="replace")
    try:
        data = json.loads(body)
        return data.get("message") or data.get("error") or status_line
    except (ValueError, AttributeError):
        return status_line


def _serve_http(server: socket.socket, client, job: str, node: str | None, port: int) -> None:
    """Relay each HTTP request through the master to the agent's /proxy/PORT/ (streamed back)."""
    import http.client
    import socketserver
    from http.server import BaseHTTPRequestHandler

    from dxflow.cli.forward_local import admitted
    from dxflow.edge.http import HOP_BY_HOP

    hop = HOP_BY_HOP | {"host", "content-length"}

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
            conn = client.connection(timeout=None)
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

        def __init__(self, sock: socket.socket) -> None:
            socketserver.TCPServer.__init__(self, sock.getsockname(), Relay, bind_and_activate=False)
            self.socket.close()  # the one TCPServer made: ours is bound (TCP or Unix) and listening
            self.socket = sock

        def verify_request(self, request, client_address) -> bool:
            return admitted(request)  # a refused one is closed by socketserver, unread

    Server(server).serve_forever()
