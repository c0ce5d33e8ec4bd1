"""One command on many nodes of a job at once, as ``clush``/``pdsh`` do it: ``dxflow exec 12:all``
and ``dxflow logs 12:all -f``.

Each node is one request through the master's existing per-node path (the same ``/api/exec`` or log
stream a single-node command uses), in a thread of its own; at most ``fanout`` run at a time. Output
comes line by line with a ``NODE: `` prefix as it arrives (:class:`Lines`: whole lines only, so two
nodes never mix inside one line), or is gathered (``--gather``: one block per distinct output, headed
by the folded node set, like ``clush -b`` and ``dshbak -c``), or becomes one JSON record per node.
A node that is lost (its agent killed, its link down: no keepalive for ``SILENCE`` seconds) or that
runs past ``--timeout`` is reported as such, and the others go on: each has its own connection.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable

from dxflow.cli.targets import Resolved
from dxflow.errors import EXIT_CONNECTION_LOST, DxflowError
from dxflow.master.client import check
from dxflow.schedulers.hostlist import fold, sort_hosts

#: seconds without a byte (the agent sends a keepalive every 2 s while a command is silent) before a
#: node counts as lost
SILENCE = 30.0
#: exit code of a node stopped by --timeout (as timeout(1) reports it)
EXIT_TIMEOUT = 124
RULE = "-" * 15


class Lines:
    """Writes whole lines of several nodes to the user's stdout and stderr, each with ``NODE: ``
    unless ``prefix`` is off; a line's bytes are kept until its newline (or the node's end)."""

    def __init__(self, prefix: bool = True, out: IO[bytes] | None = None, err: IO[bytes] | None = None) -> None:
        self.prefix = prefix
        self.sinks = {"stdout": out or sys.stdout.buffer, "stderr": err or sys.stderr.buffer}
        self._lock = threading.Lock()
        self._partial: dict[tuple[str, str], bytes] = {}

    def write(self, node: str, stream: str, data: bytes) -> None:
        key = (node, stream)
        data = self._partial.pop(key, b"") + data
        *lines, rest = data.split(b"\n")
        if rest:
            self._partial[key] = rest
        if lines:
            self._emit(node, stream, lines)

    def close(self, node: str) -> None:
        """The node is done: a last line without its newline is written with one."""
        for stream in ("stdout", "stderr"):
            rest = self._partial.pop((node, stream), b"")
            if rest:
                self._emit(node, stream, [rest])

    def _emit(self, node: str, stream: str, lines: list[bytes]) -> None:
        head = f"{node}: ".encode() if self.prefix else b""
        sink = self.sinks[stream]
        with self._lock:
            sink.write(b"".join(head + line + b"\n" for line in lines))
            sink.flush()


@dataclass
class NodeResult:
    node: str
    exit: int | None = None
    #: "ok", "failed" (non-zero exit), "lost", "timeout" or "error" (refused before it ran)
    status: str = "lost"
    error: str = ""
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)

    @property
    def code(self) -> int:
        """The node's exit code, or what stands for it when none came."""
        if self.exit is not None:
            return self.exit
        return EXIT_TIMEOUT if self.status == "timeout" else EXIT_CONNECTION_LOST

    def outcome(self) -> str:
        if self.status in ("ok", "failed"):
            return f"exit {self.exit}"
        if self.status == "timeout":
            return f"timed out {self.error}".strip()
        return f"{'lost' if self.status == 'lost' else 'error'}: {self.error}"

    def record(self, job: str) -> dict[str, Any]:
        return {"job": job, "node": self.node, "status": self.status, "exit": self.exit,
                "stdout": self.stdout.decode("utf-8", errors="replace"),
                "stderr": self.stderr.decode("utf-8", errors="replace"), "error": self.error or None}


class Run:
    """One node's request, which another thread may stop (timeout, Ctrl-C)."""

    def __init__(self, node: str) -> None:
        self.result = NodeResult(node)
        #: the connection's socket, kept here: http.client lets go of it once a response that closes the
        #: connection has begun (the response reads on through its own file)
        self.sock: socket.socket | None = None
        self.stopped = ""  # why it was stopped from outside: "timeout" or "interrupted"
        self.done = threading.Event()

    def connect(self, client, timeout: float | None) -> http.client.HTTPConnection:
        """A connection to the master whose socket :meth:`stop` can shut down from another thread."""
        conn = client.connection(timeout=timeout)
        conn.connect()
        self.sock = conn.sock
        if self.stopped:  # stopped while connecting
            self.stop(self.stopped)
        return conn

    def stop(self, why: str) -> None:
        self.stopped = why
        sock = self.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the reading thread; the agent then stops the command
            except OSError:
                pass


def run_all(nodes: list[str], work: Callable[[Run], None], fanout: int | None, timeout: float | None,
            on_done: Callable[[NodeResult], None] | None = None) -> list[NodeResult]:
    """``work(run)`` for every node in threads, at most ``fanout`` at once; each is stopped when
    ``timeout`` seconds have passed since it started; ``on_done(result)`` as each ends. Ctrl-C stops
    them all."""
    runs = [Run(n) for n in nodes]
    slots = threading.Semaphore(fanout or len(nodes) or 1)
    started: dict[int, float] = {}

    def one(i: int, run: Run) -> None:
        with slots:
            started[i] = time.monotonic()
            try:
                work(run)
            except (OSError, ValueError, http.client.HTTPException) as e:
                run.result.status, run.result.error = (run.stopped or "lost"), str(e) or type(e).__name__
            except DxflowError as e:
                run.result.status, run.result.error = "error", str(e)
            finally:
                if run.stopped and run.result.exit is None:
                    run.result.status = run.stopped
                    run.result.error = run.result.error if run.stopped != "timeout" else f"after {timeout:g} s"
                if on_done is not None:
                    on_done(run.result)
                run.done.set()

    for i, run in enumerate(runs):
        threading.Thread(target=one, args=(i, run), daemon=True, name=f"fanout-{run.result.node}").start()
    try:
        while not all(r.done.is_set() for r in runs):
            now = time.monotonic()
            for i, run in enumerate(runs):
                if (timeout is not None and not run.done.is_set() and not run.stopped and i in started
                        and now - started[i] > timeout):
                    run.stop("timeout")
            runs[next(i for i, r in enumerate(runs) if not r.done.is_set())].done.wait(0.1)
    except KeyboardInterrupt:
        for run in runs:
            run.stop("interrupted")
        raise
    return [r.result for r in runs]


# -- exec ------------------------------------------------------------------------------------------------

def exec_on(client, job: str, body: bytes, lines: Lines | None, keep: bool) -> Callable[[Run], None]:
    """The work of one node for ``dxflow exec``: its output to ``lines`` as it comes (if given) and
    kept in the result (if ``keep``)."""

    def work(run: Run) -> None:
        node, result = run.result.node, run.result
        conn = run.connect(client, SILENCE)
        try:
            conn.request("POST", client.agent_path(job, node, "/api/exec"), body,
                         {"Content-Type": "application/json", "Connection": "close"})
            resp = conn.getresponse()
            check(resp)
            while True:
                raw = resp.readline()
                if not raw:
                    raise ConnectionError("the stream ended before the command's exit status")
                if not raw.strip():
                    continue  # keepalive
                msg = json.loads(raw)
                if "exit" in msg:
                    result.exit = int(msg["exit"])
                    result.status = "ok" if result.exit == 0 else "failed"
                    return
                stream = msg.get("stream")
                if stream not in ("stdout", "stderr"):
                    continue
                data = base64.b64decode(msg.get("data", ""))
                if keep:
                    (result.stdout if stream == "stdout" else result.stderr).extend(data)
                if lines is not None:
                    lines.write(node, stream, data)
        finally:
            if lines is not None:
                lines.close(node)
            conn.close()

    return work


def gathered(results: list[NodeResult]) -> str:
    """stdout gathered like ``clush -b``: one block per distinct output, headed by its nodes, folded."""
    groups: dict[bytes, list[str]] = {}
    for r in results:
        if r.stdout:
            groups.setdefault(bytes(r.stdout), []).append(r.node)
    out = []
    for text, nodes in groups.items():
        body = text.decode("utf-8", errors="replace")
        out.append(f"{RULE}\n{fold(nodes)} ({len(nodes)})\n{RULE}\n{body}{'' if body.endswith(chr(10)) else chr(10)}")
    return "".join(out)


def summary(results: list[NodeResult]) -> str:
    """The nodes that did not succeed, folded by outcome: ``n2: exit 3; n[3-4]: timed out``."""
    by: dict[str, list[str]] = {}
    for r in results:
        if r.status != "ok":
            by.setdefault(r.outcome(), []).append(r.node)
    return "; ".join(f"{fold(nodes)}: {what}" for what, nodes in by.items())


def missing_results(target: Resolved) -> list[NodeResult]:
    """The nodes of the set that have no agent (:attr:`Resolved.missing`), as failed before they ran."""
    return [NodeResult(node, status="error", error=why) for node, why in target.missing]


def exec_all(client, target: Resolved, body: bytes, *, prefix: bool, gather: bool, as_json: bool,
             fanout: int | None, timeout: float | None) -> int:
    """``dxflow exec JOB:NODES``: every node at once; 0 only when every node's command exited 0,
    else the largest code (124 for a node timed out, 255 for one lost, 255 for a node of the set
    without an agent: nothing ran there), with a summary on stderr."""
    nodes = [n for n in target.nodes if n]
    # --gather prints stdout at the end; stderr still comes as it arrives, with its node
    lines = None if as_json else Lines(prefix=prefix or gather)
    if lines is not None and gather:
        lines.sinks["stdout"] = _Discard()
    json_lock = threading.Lock()

    def record(result: NodeResult) -> None:
        with json_lock:  # one record per node, as each ends
            sys.stdout.write(json.dumps(result.record(target.job)) + "\n")
            sys.stdout.flush()

    absent = missing_results(target)
    if as_json:
        for result in absent:
            record(result)
    results = run_all(nodes, exec_on(client, target.job, body, lines, keep=gather or as_json), fanout, timeout,
                      record if as_json else None) if nodes else []
    order = {n: i for i, n in enumerate(sort_hosts([*nodes, *(r.node for r in absent)]))}
    results = sorted([*results, *absent], key=lambda r: order[r.node])
    if gather:
        sys.stdout.write(gathered(results))
        sys.stdout.flush()
    failed = [r for r in results if r.status != "ok"]
    if not failed:
        return 0
    if not as_json:
        print(f"dxflow: job {target.job}: {len(failed)} of {len(results)} nodes failed: {summary(results)}",
              file=sys.stderr)
    return max(r.code for r in failed)


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)

    def flush(self) -> None:
        pass
