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
import os
import re
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dxflow.errors import ConfigError, UsageError

if TYPE_CHECKING:
    import socket

CHUNK = 64 * 1024
WAIT_POLL = 1.0  # seconds between two asks whether the service listens yet
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes with the final NUL (man 7 unix)


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
    p.add_argument("target", metavar="JOB[:NODE]")
    p.add_argument("port", type=int, metavar="PORT", help="the port on the node")
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

def _listen(port: int | None, wanted: int) -> socket.socket:
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
                s.close()
                raise UsageError(f"cannot listen on 127.0.0.1:{p}: {e.strerror}; choose another with --local") from e
    s.listen(64)
    return s


def _unix_path(text: str, job: str, node: str, port: int) -> Path:
    """``--unix PATH`` as given, or ``~/.dxflow/forward/JOB-NODE-PORT.sock`` in a folder only the user enters."""
    if text:
        return Path(text).expanduser().absolute()
    from dxflow.config import ensure_user_dir

    folder = ensure_user_dir() / "forward"
    folder.mkdir(mode=0o700, exist_ok=True)
    st = folder.lstat()
    if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{folder} is not a folder owned by you; remove it and retry")
    if st.st_mode & 0o077:
        os.chmod(folder, 0o700)
    name = "-".join(re.sub(r"[^A-Za-z0-9._-]+", "_", part) for part in (job, node, str(port)))
    return folder / f"{name}.sock"


def _listen_unix(path: Path) -> tuple[socket.socket, int]:
    """A Unix socket listening at ``path`` (mode 0600) and its inode; a dead forward's socket is replaced."""
    import socket

    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise UsageError(f"{path}: too long for a Unix socket (at most {UNIX_PATH_MAX} bytes); "
                         "choose a shorter one with --unix PATH")
    _remove_stale(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # born 0600: at no moment can another user connect (the peer check stays anyway)
    try:
        s.bind(str(path))
    except OSError as e:
        s.close()
        raise UsageError(f"cannot listen on {path}: {e.strerror}; choose another path with --unix PATH") from e
    finally:
        os.umask(old)
    s.listen(64)
    return s, path.lstat().st_ino


def _remove_stale(path: Path) -> None:
    """Remove the socket a dead forward left at ``path``; refuse a live one, and anything not a socket."""
    import socket

    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise UsageError(f"{path} exists and is not a socket: remove it, or choose another path with --unix PATH")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            path.unlink(missing_ok=True)  # nobody listens: what a killed forward (SIGKILL, a reboot) leaves
        except OSError as e:
            raise UsageError(f"cannot remove the stale socket {path}: {e.strerror}") from e
        return
    except OSError as e:
        raise UsageError(f"cannot tell whether {path} is in use ({e.strerror or e}): remove it, or choose "
                         "another path with --unix PATH") from e
    finally:
        probe.close()
    raise UsageError(f"another `dxflow forward` listens on {path}: stop it first, or choose another path "
                     "with --unix PATH")


def _remove_own(path: Path, inode: int) -> None:
    """Remove the socket file this forward made (not one that has replaced it since)."""
    try:
        if path.lstat().st_ino == inode:
            path.unlink()
    except FileNotFoundError:
        pass


def _admitted(conn: socket.socket) -> bool:
    """Whether the process at the other end of ``conn`` is the user's; a stranger's attempt is logged."""
    import pwd

    from dxflow.edge.peer import peer_uid

    uid = peer_uid(conn)
    if uid == os.getuid():
        return True
    if uid is None:
        who = "a process whose owner the kernel cannot tell"
    else:
        try:
            who = f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
        except KeyError:
            who = f"uid {uid}"
    print(f"dxflow: forward: refused a connection from {who}: only your own processes may use this forward",
          file=sys.stderr, flush=True)
    return False


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

    from dxflow.cli.util import parse_target
    from dxflow.master.client import MasterClient, check

    log = logging.getLogger("dxflow.forward")
    job, node = parse_target(args.target)
    client = MasterClient().ensure()
    mode = "http" if args.http else "tcp"
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
        unix_path = _unix_path(args.unix, job, node or (info.get("node") if mode == "tcp" else None) or "first",
                               args.port)
        server, inode = _listen_unix(unix_path)
    else:
        server = _listen(args.local, args.port)
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
                if not _admitted(conn):
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
            _remove_own(unix_path, inode)
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
            up.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\n"
                       f"Upgrade: {FORWARD_UPGRADE}\r\n\r\n".encode())
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
            return _admitted(request)  # a refused one is closed by socketserver, unread

    Server(server).serve_forever()
