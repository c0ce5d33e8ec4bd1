"""``/api/logs``: the job's stdout and stderr on this node, and the agent's own log; tail and follow.

Where the job's output goes comes from the prolog (``SLURM_JOB_STDOUT`` and the
like). That value may be an unexpanded pattern (``/home/alice/slurm-%j.out``) or
empty (Slurm 22.05 with the default file name); then the scheduler's job record,
which carries the expanded path, is asked once and remembered.

PBS, Torque and LSF write a running job's output to a spool of their own and copy it
to that final path only when the job ends. Where the spool is, is the scheduler
adapter's knowledge (``Scheduler.spooled_output``, asked once): while a regular file
is there, it is what is read; once the scheduler has moved it, the final path is.

Following polls the file's size every ``POLL`` seconds (no inotify: it misses
writes made on other nodes of a shared file system) and sends each complete line
as a server-sent event at once.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import stat
import threading
import time
from typing import Callable, Iterator

from flask import Blueprint, Response, current_app, jsonify, request

from dxflow.agent import jobwatch
from dxflow.agent.paths import open_regular
from dxflow.agent.state import AgentState
from dxflow.config import agent_name
from dxflow.errors import DxflowError, NotFound, UsageError
from dxflow.layout import UserLayout
from dxflow.schedulers import get_scheduler

log = logging.getLogger(__name__)
bp = Blueprint("logs", __name__)

NAMES = ("stdout", "stderr", "agent")
POLL = 0.025              # seconds between two looks at a followed file
KEEPALIVE = 5.0           # an SSE comment after this much silence (finds clients that went away)
JOB_CHECK = 3.0           # seconds between two looks on this node at the job's end (never slurmctld), shared by all followers
RETRY_LOOKUP = 10.0       # seconds before asking the scheduler again after it could not tell the paths
MAX_LINES = 10_000_000
READ_CHUNK = 256 * 1024
MAX_PARTIAL = 64 * 1024   # a line longer than this is sent in pieces


# -- where the logs are ------------------------------------------------------------------------------


def _absolute(path: str, state: AgentState) -> str:
    if path and not os.path.isabs(path):
        base = state.work_dir or str(state.home)
        path = os.path.join(base, path)
    return path


_lookup_lock = threading.Lock()


def job_output_paths(state: AgentState) -> dict[str, str]:
    """``{"stdout": path, "stderr": path}`` of the job, expanded; cached once the scheduler told."""
    cached = state.extra.get("log_paths")
    if cached is not None:
        return cached
    with _lookup_lock:
        cached = state.extra.get("log_paths")
        if cached is not None:
            return cached
        sched = get_scheduler(state.scheduler)
        given = {"stdout": state.stdout, "stderr": state.stderr}
        fields = sched.output_fields(state.job, state.user)
        if given["stdout"] and not any(sched.output_is_pattern(p) for p in given.values()):
            # stderr goes to stdout when the user named no file for it
            paths = {"stdout": _absolute(given["stdout"], state),
                     "stderr": _absolute(given["stderr"] or given["stdout"], state)}
            state.extra["log_paths"] = paths
            return paths
        info = None
        if time.monotonic() >= state.extra.get("log_lookup_retry", 0.0):
            try:
                info = sched.job(state.job)
            except (DxflowError, OSError, ValueError) as e:
                log.warning("cannot ask %s where job %s writes its output: %s", state.scheduler, state.job, e)
            if info is None:
                state.extra["log_lookup_retry"] = time.monotonic() + RETRY_LOOKUP
        if info is not None:
            if info.work_dir and not state.work_dir:
                state.work_dir = info.work_dir
            named = sched.output_fields(state.job, state.user, info.name)
            out = info.stdout or sched.expand_output(given["stdout"] or sched.default_output, named)
            err = info.stderr or sched.expand_output(given["stderr"], named) or out
            paths = {"stdout": _absolute(out, state), "stderr": _absolute(err, state)}
            state.extra["log_paths"] = paths
            return paths
        # the scheduler could not tell (yet): best effort from what the prolog gave
        out = sched.expand_output(given["stdout"] or sched.default_output, fields)
        err = sched.expand_output(given["stderr"], fields) or out
        return {"stdout": _absolute(out, state), "stderr": _absolute(err, state)}


def spooled_paths(state: AgentState) -> dict[str, str]:
    """Where the scheduler holds the job's output while the job runs (the adapter knows, see the
    module docstring); {} for a scheduler that writes the final path directly. Asked once."""
    cached = state.extra.get("log_spool")
    if cached is not None:
        return cached
    if time.monotonic() < state.extra.get("log_spool_retry", 0.0):
        return {}
    try:
        spool = get_scheduler(state.scheduler).spooled_output(state.job)
    except (DxflowError, OSError, ValueError) as e:
        log.warning("cannot ask %s where job %s's output is spooled: %s", state.scheduler, state.job, e)
        state.extra["log_spool_retry"] = time.monotonic() + RETRY_LOOKUP
        return {}
    state.extra["log_spool"] = spool
    return spool


def _regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def log_path(state: AgentState, name: str) -> str:
    if name == "agent":
        return str(UserLayout.of(state.home).agent_log(agent_name(state.cluster, state.job, state.node)))
    if name in ("stdout", "stderr"):
        final = job_output_paths(state)
        if name == "stderr" and final["stderr"] == final["stdout"]:  # one file holds both: read it as stdout
            return log_path(state, "stdout")
        spool = spooled_paths(state).get(name, "")
        if spool and _regular_file(spool):  # the job runs and its scheduler spools its output
            return spool
        if not final[name]:
            raise NotFound(f"the scheduler does not say where job {state.job} writes its {name}")
        return final[name]
    raise NotFound(f"no log named {name!r}: the logs are {', '.join(NAMES)}")


# -- the job's end: the agent's own look at this node, at most every JOB_CHECK seconds (issue #11) -----

def job_over(state: AgentState) -> bool:
    """Whether the job has ended, as the agent's job watch (:mod:`dxflow.agent.jobwatch`) sees it on this
    node, looked at again when older than JOB_CHECK; False in an app without a watch (tests)."""
    watch = jobwatch.of(state)
    return watch is not None and watch.over(JOB_CHECK)


# -- the client, for noticing that it went away ---------------------------------------------------------

def client_socket(environ: dict) -> socket.socket | None:
    sock = environ.get("gunicorn.socket") or environ.get("werkzeug.socket")
    return sock if isinstance(sock, socket.socket) else None


class ClientWatch:
    """Sleeps, waking up early when the client closed its connection."""

    def __init__(self, sock: socket.socket | None) -> None:
        self.sock = sock
        self.gone = False

    def sleep(self, seconds: float) -> bool:
        """Wait up to ``seconds``; True when the client went away."""
        if self.sock is None:
            time.sleep(seconds)
            return False
        try:
            ready, _, _ = select.select([self.sock], [], [], seconds)
            if ready:
                data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                if data:  # a pipelined request, not a close: stop watching this socket
                    self.sock = None
                else:
                    self.gone = True
        except BlockingIOError:
            pass
        except (OSError, ValueError):
            self.gone = True
        return self.gone


# -- reading --------------------------------------------------------------------------------------------

def _lines_arg() -> int | None:
    raw = request.args.get("lines")
    if raw is None or raw == "":
        return None
    try:
        lines = int(raw)
    except ValueError:
        raise UsageError(f"lines must be a whole number, not {raw!r}") from None
    if not 0 <= lines <= MAX_LINES:
        raise UsageError(f"lines must be between 0 and {MAX_LINES}")
    return lines


def tail_offset(f, lines: int) -> int:
    """Offset in the open binary file ``f`` where its last ``lines`` lines begin."""
    end = f.seek(0, os.SEEK_END)
    if lines <= 0:
        return end
    pos, found = end, 0
    while pos > 0:
        step = min(64 * 1024, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step)
        i = len(block)
        while True:
            i = block.rfind(b"\n", 0, i)
            if i < 0:
                break
            if pos + i + 1 == end:  # the file's final newline ends the last line; it starts none
                continue
            found += 1
            if found == lines:
                return pos + i + 1
    return 0


def _open(path: str, name: str):
    """The log opened for reading; a FIFO or a device in its place is refused (400), never waited on."""
    try:
        return open_regular(path)
    except FileNotFoundError:
        raise NotFound(f"{name} log {path} does not exist (yet)") from None
    except PermissionError:
        raise NotFound(f"{name} log {path} cannot be read by the job's user") from None
    except UsageError as e:
        raise UsageError(f"{name} log: {e}") from None


def sse_event(data: str, event: str = "", event_id: int | None = None) -> bytes:
    """One server-sent event; a carriage return inside the line becomes a line break (SSE forbids it)."""
    out = []
    if event:
        out.append(f"event: {event}\n")
    if event_id is not None:
        out.append(f"id: {event_id}\n")
    for part in data.split("\n"):
        for piece in part.split("\r"):
            out.append(f"data: {piece}\n")
    out.append("\n")
    return "".join(out).encode()


def follow(state: AgentState, path: str, lines: int | None, start: int | None, watch: ClientWatch,
           poll: float = POLL, resolve: Callable[[], str] | None = None) -> Iterator[bytes]:
    """Server-sent events for ``path``: its last ``lines`` lines (or from byte ``start``), then new lines.
    While no file is there yet, ``resolve`` (when given) says again which path to wait for: a spool
    that appears once the job starts writing replaces the final path that appears only at its end."""
    yield b"retry: 1000\n\n"
    f = None
    last_sent = time.monotonic()
    while f is None:
        if resolve is not None:
            try:
                path = resolve()
            except NotFound:
                pass
        try:
            f = open_regular(path)
        except UsageError as e:  # replaced by a fifo or a device since the route looked
            yield sse_event(str(e), event="error")
            return
        except OSError:
            if job_over(state):
                yield sse_event(f"job {state.job} ended", event="end")
                return
            if time.monotonic() - last_sent >= KEEPALIVE:
                yield f": waiting for {path} to appear\n\n".encode()
                last_sent = time.monotonic()
            if watch.sleep(poll):
                return
    with f:
        if start is not None:
            pos = min(start, os.fstat(f.fileno()).st_size)
        elif lines is None:
            pos = 0
        else:
            pos = tail_offset(f, lines)
        inode = os.fstat(f.fileno()).st_ino
        partial = b""
        checked_rename = time.monotonic()
        while True:
            size = os.fstat(f.fileno()).st_size
            if size < pos:  # truncated: start over
                pos, partial = 0, b""
            if size > pos:
                f.seek(pos)
                while pos < size:
                    data = f.read(min(READ_CHUNK, size - pos))
                    if not data:
                        break
                    pos += len(data)
                    buf = partial + data
                    cut = buf.rfind(b"\n")
                    if cut < 0 and len(buf) < MAX_PARTIAL:
                        partial = buf
                        continue
                    if cut < 0:  # a line longer than MAX_PARTIAL: send what there is as one piece
                        pieces, ends, partial = [buf], 0, b""
                    else:
                        pieces, ends, partial = buf[:cut].split(b"\n"), 1, buf[cut + 1:]
                    offset = pos - len(partial) - sum(len(p) + ends for p in pieces)
                    out = []
                    for piece in pieces:
                        offset += len(piece) + ends
                        out.append(sse_event(piece.decode(errors="replace").removesuffix("\r"), event_id=offset))
                    yield b"".join(out)
                last_sent = time.monotonic()
                continue
            now = time.monotonic()
            if now - checked_rename >= 1.0:  # rotated or replaced: follow the name, like tail -F
                checked_rename = now
                try:
                    if os.stat(path).st_ino != inode:
                        fresh = open_regular(path)  # before closing: if it fails, f is still the one read
                        f.close()
                        f = fresh
                        inode, pos, partial = os.fstat(f.fileno()).st_ino, 0, b""
                        continue
                except UsageError as e:  # the new file under the name is a fifo or a device
                    yield sse_event(str(e), event="error")
                    return
                except OSError:
                    pass
                if job_over(state):
                    size = os.fstat(f.fileno()).st_size
                    if size > pos:
                        continue  # send what the job wrote last, then end
                    if partial:
                        yield sse_event(partial.decode(errors="replace"), event_id=pos)
                    yield sse_event(f"job {state.job} ended", event="end")
                    return
            if now - last_sent >= KEEPALIVE:
                yield b": keepalive\n\n"
                last_sent = now
            if watch.sleep(poll):
                return


def _stream_file(f, start: int) -> Iterator[bytes]:
    with f:
        f.seek(start)
        while True:
            chunk = f.read(READ_CHUNK)
            if not chunk:
                return
            yield chunk


# -- routes ---------------------------------------------------------------------------------------------

@bp.get("/api/logs")
def list_logs():
    state = current_app.config["AGENT"]
    out = []
    for name in NAMES:
        try:
            path = log_path(state, name)
        except NotFound:
            out.append({"name": name, "path": "", "size": None, "exists": False})
            continue
        try:
            size = os.stat(path).st_size
        except OSError:
            size = None
        item = {"name": name, "path": path, "size": size, "exists": size is not None}
        if name == "stderr" and path == log_path(state, "stdout"):
            item["same_as"] = "stdout"
        out.append(item)
    return jsonify(out)


@bp.get("/api/logs/<name>")
def read_log(name: str):
    state = current_app.config["AGENT"]
    lines = _lines_arg()
    path = log_path(state, name)
    f = _open(path, name)
    start = 0 if lines is None else tail_offset(f, lines)
    size = os.fstat(f.fileno()).st_size
    resp = Response(_stream_file(f, start), mimetype="text/plain", direct_passthrough=True)
    resp.headers["Content-Length"] = str(size - start)
    resp.headers["X-Dxflow-Path"] = path
    return resp


@bp.get("/api/logs/<name>/follow")
def follow_log(name: str):
    state = current_app.config["AGENT"]
    lines = _lines_arg()
    path = log_path(state, name)
    try:  # a fifo or a device is refused now, with a status; a log that is not there yet is waited for
        _open(path, name).close()
    except NotFound:
        pass
    start = None
    last_id = request.headers.get("Last-Event-ID", "") or request.args.get("offset", "")
    if last_id:
        if not last_id.isdigit():
            raise UsageError(f"Last-Event-ID / offset must be a byte offset, not {last_id!r}")
        start = int(last_id)
    watch = ClientWatch(client_socket(request.environ))
    resp = Response(follow(state, path, lines, start, watch, resolve=lambda: log_path(state, name)),
                    mimetype="text/event-stream", direct_passthrough=True)
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    resp.headers["X-Dxflow-Path"] = path
    return resp


_ERR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string", "enum": list(NAMES)}}
_LINES = {"name": "lines", "in": "query", "required": False,
          "description": "only the last K lines (default: the whole file)",
          "schema": {"type": "integer", "minimum": 0, "maximum": MAX_LINES}}

OPENAPI = {
    "/api/logs": {"get": {
        "summary": "the logs: the job's stdout and stderr, and the agent's log", "operationId": "listLogs",
        "tags": ["logs"],
        "responses": {"200": {"description": "one entry per log", "content": {"application/json": {"schema": {
            "type": "array", "items": {"type": "object", "properties": {
                "name": {"type": "string", "enum": list(NAMES)}, "path": {"type": "string"},
                "size": {"type": "integer", "nullable": True}, "exists": {"type": "boolean"},
                "same_as": {"type": "string"}}}}}}}}}},
    "/api/logs/{name}": {"get": {
        "summary": "a log's text (its last K lines with ?lines=K)", "operationId": "readLog", "tags": ["logs"],
        "parameters": [_NAME, _LINES],
        "responses": {"200": {"description": "the text", "content": {"text/plain": {"schema": {"type": "string"}}}},
                      "400": {"description": "bad lines", **_ERR}, "404": {"description": "no such log", **_ERR}}}},
    "/api/logs/{name}/follow": {"get": {
        "summary": "follow a log: server-sent events, `data: <line>` per line, `event: end` when the job ends",
        "operationId": "followLog", "tags": ["logs"],
        "parameters": [_NAME, _LINES,
                       {"name": "offset", "in": "query", "required": False,
                        "description": "resume after this byte offset (an event id); also the Last-Event-ID header",
                        "schema": {"type": "integer", "minimum": 0}}],
        "responses": {"200": {"description": "an endless event stream",
                              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                      "400": {"description": "bad lines or offset", **_ERR},
                      "404": {"description": "no such log", **_ERR}}}},
}
