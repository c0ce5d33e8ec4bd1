"""``POST /api/exec``: run a command in the job on this node, streaming its output as it comes.

The command runs as the job's user (the agent's own user) in the job's environment
and work dir, in its own process group but still a child of the agent: in the agent's
cgroups — the job's own where the scheduler makes them (Slurm's extern step, see
dxflow/adopt.py), so it counts against the job's CPU and memory limits, and the one the
prolog made for the agent, which the epilog kills whole. Where the scheduler has a launcher
(PBS ``pbs_attach``, LSF ``blaunch``: dxflow/agent/injob.py) the command is started through it,
as a task of the job. Its output arrives as
NDJSON lines ``{"stream": "stdout"|"stderr", "data": <base64>}`` and a last
``{"exit": code}``; a blank line is a keepalive after ``KEEPALIVE`` seconds of
silence (it is also how a relay notices a client that went away). When the client
goes away, the command's process group gets SIGTERM, then SIGKILL.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from typing import Iterator

from flask import Blueprint, Response, current_app, request

from dxflow import audit
from dxflow.agent.injob import in_job
from dxflow.agent.jobenv import job_environment, job_workdir
from dxflow.agent.logs import ClientWatch, client_socket
from dxflow.errors import UsageError

log = logging.getLogger(__name__)
bp = Blueprint("exec", __name__)

KEEPALIVE = 2.0
READ_SIZE = 64 * 1024
KILL_GRACE = 1.0
MAX_STDIN = 64 * 1024 * 1024


def _strings(value, what: str) -> None:
    if not isinstance(value, str) or "\0" in value:
        raise UsageError(f"{what} must be a string without NUL bytes")


def parse_request(body) -> dict:
    """Check an exec request body; return argv, cwd, env overrides and stdin bytes (or None)."""
    if not isinstance(body, dict):
        raise UsageError('expected a JSON object: {"argv": ["cmd", "arg", ...], "cwd"?, "env"?, "stdin"?}')
    argv = body.get("argv")
    if not isinstance(argv, list) or not argv:
        raise UsageError('"argv" must be a non-empty list of strings: the command and its arguments')
    for a in argv:
        _strings(a, "every argv item")
    if not argv[0]:
        raise UsageError('"argv" must start with a command name')
    cwd = body.get("cwd")
    if cwd is not None:
        _strings(cwd, '"cwd"')
    env = body.get("env")
    env = {} if env is None else env
    if not isinstance(env, dict):
        raise UsageError('"env" must be an object of NAME: value strings')
    for k, v in env.items():
        _strings(k, "an env name")
        _strings(v, f"env {k}")
        if not k or "=" in k:
            raise UsageError(f"invalid environment variable name {k!r}")
    stdin = body.get("stdin")
    if stdin is not None:
        _strings(stdin, '"stdin"')
        stdin = stdin.encode("utf-8", errors="surrogateescape")
        if len(stdin) > MAX_STDIN:
            raise UsageError(f'"stdin" is larger than {MAX_STDIN // 2**20} MiB')
    return {"argv": argv, "cwd": cwd, "env": env, "stdin": stdin}


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def exit_code(returncode: int) -> int:
    """A shell's view of how the command ended: its status, or 128 + the signal that killed it."""
    return 128 - returncode if returncode < 0 else returncode


def start(argv: list[str], cwd: str, env: dict[str, str], stdin: bytes | None) -> subprocess.Popen:
    return subprocess.Popen(
        argv, cwd=cwd, env=env, close_fds=True,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        process_group=0,  # its own group, to signal all of it; never a new session (stays in the agent's tree)
    )


def _feed(proc: subprocess.Popen, data: bytes) -> None:
    assert proc.stdin is not None  # started with a pipe for its stdin when there is data to feed
    try:
        proc.stdin.write(data)
    except (BrokenPipeError, OSError):
        pass
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass


def kill_group(proc: subprocess.Popen, grace: float = KILL_GRACE) -> None:
    """SIGTERM the command's process group; SIGKILL what is left of it after ``grace`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the whole group is gone
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            if sig == signal.SIGKILL:
                log.warning("exec: pid %d did not end after SIGKILL", proc.pid)


def stream(proc: subprocess.Popen, watch: ClientWatch, stdin: bytes | None,
           keepalive: float | None = None) -> Iterator[bytes]:
    keepalive = KEEPALIVE if keepalive is None else keepalive
    if stdin is not None:
        threading.Thread(target=_feed, args=(proc, stdin), daemon=True, name="exec-stdin").start()
    assert proc.stdout is not None and proc.stderr is not None  # start() pipes both
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "stdout")
    sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
    client = watch.sock
    if client is not None:
        sel.register(client, selectors.EVENT_READ, None)
    finished = False
    try:
        open_pipes = 2
        last = time.monotonic()
        while open_pipes:
            events = sel.select(keepalive)
            if not events:
                yield b"\n"
                last = time.monotonic()
                continue
            out = []
            for key, _ in events:
                if key.data is None:  # the client's socket: readable means it closed (or pipelined)
                    sel.unregister(key.fileobj)
                    if watch.sleep(0):
                        log.info("exec: client went away, stopping pid %d", proc.pid)
                        return
                    continue
                data = os.read(key.fd, READ_SIZE)
                if not data:
                    sel.unregister(key.fileobj)
                    open_pipes -= 1
                    continue
                out.append(_line({"stream": key.data, "data": base64.b64encode(data).decode()}))
            if out:
                yield b"".join(out)
                last = time.monotonic()
            elif time.monotonic() - last >= keepalive:
                yield b"\n"
                last = time.monotonic()
        rc = proc.wait()
        finished = True
        result = {"exit": exit_code(rc)}
        if rc < 0:
            result["signal"] = -rc
        yield _line(result)
    finally:
        sel.close()
        if not finished:  # the client went away: the command goes too
            kill_group(proc)
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()


@bp.post("/api/exec")
def run_command():
    state = current_app.config["AGENT"]
    req = parse_request(request.get_json(silent=True))
    workdir = job_workdir(state)
    cwd = workdir if req["cwd"] is None else os.path.join(workdir, os.path.expanduser(req["cwd"]))
    if not os.path.isdir(cwd):
        raise UsageError(f"working folder {cwd} does not exist on node {state.node}")
    env = job_environment(state)
    env.update(req["env"])
    try:
        argv, env = in_job(state, req["argv"], cwd, env)  # the scheduler's launcher, where it has one
        proc = start(argv, cwd, env, req["stdin"])
    except (FileNotFoundError, PermissionError, OSError) as e:
        # like a shell: 127 for a command not found, 126 for one that cannot run
        code = 127 if isinstance(e, FileNotFoundError) else 126
        why = "command not found" if code == 127 else (e.strerror or str(e))
        message = f"dxflow exec: {req['argv'][0]}: {why}\n".encode()
        body = _line({"stream": "stderr", "data": base64.b64encode(message).decode()}) + _line({"exit": code})
        return Response(body, mimetype="application/x-ndjson")
    log.info("exec pid %d: %s (cwd %s)", proc.pid, " ".join(req["argv"])[:200], cwd)
    audit.record("exec", req["argv"], state, request.environ, cwd=cwd, pid=proc.pid)
    watch = ClientWatch(client_socket(request.environ))
    resp = Response(stream(proc, watch, req["stdin"]), mimetype="application/x-ndjson", direct_passthrough=True)
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    return resp


_ERR = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

OPENAPI = {
    "/api/exec": {"post": {
        "summary": "run a command in the job's environment and work dir; its output streams as NDJSON",
        "operationId": "exec", "tags": ["exec"],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {
            "type": "object", "required": ["argv"], "properties": {
                "argv": {"type": "array", "minItems": 1, "items": {"type": "string"},
                         "description": "the command and its arguments (no shell)"},
                "cwd": {"type": "string", "description": "relative to the job's work dir"},
                "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "stdin": {"type": "string", "description": "given to the command's stdin, then closed"}}}}}},
        "responses": {
            "200": {"description": 'lines {"stream": "stdout"|"stderr", "data": base64} ... {"exit": code}; '
                                   "blank lines are keepalives",
                    "content": {"application/x-ndjson": {"schema": {"type": "string"}}}},
            "400": {"description": "bad request or missing work folder", **_ERR}}}},
}
