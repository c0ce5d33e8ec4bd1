"""``dxflow logs JOB:NODES [-f] [--path PATTERN]``: every node's log at once, each line after ``NODE: ``.

Without ``--path`` each node's agent reads the job's stdout, stderr or its own log (``/api/logs``), as
for one node; with ``-f`` the nodes' streams are merged line by line as they come (:class:`Lines`). With
``--path`` each node reads its own file (``srun -o out-%N.log`` writes one per node) through the files
API: read whole, or followed by asking for the bytes past what was shown every ``POLL`` seconds
(a Range request), as ``tail -F`` does on a shared file system. A node whose agent is gone (the job
ended there) ends its part; the command ends when every node's has.
"""

from __future__ import annotations

import sys
import time
from urllib.parse import urlencode

from dxflow.cli.fanout import Lines, Run, run_all
from dxflow.cli.logs import read_events
from dxflow.cli.targets import Resolved
from dxflow.errors import AgentUnreachable, NotFound
from dxflow.master.client import check

#: seconds between two looks at a --path file that is followed
POLL = 1.0
#: --path tokens (Slurm's filename pattern, sbatch(1)/srun(1)): the node's short name, the job id
TOKENS = {"%N": "node", "%j": "job"}


def expand(pattern: str, job: str, node: str) -> str:
    """``out-%N.log`` on n2 -> ``out-n2.log``; ``%%`` is a ``%``; other tokens are left as written."""
    out, i = [], 0
    while i < len(pattern):
        two = pattern[i:i + 2]
        if two == "%%":
            out.append("%")
        elif two in TOKENS:
            out.append(node if TOKENS[two] == "node" else job)
        else:
            out.append(pattern[i])
            i += 1
            continue
        i += 2
    return "".join(out)


def logs_all(client, where: Resolved, name: str, pattern: str | None, lines: int | None, follow: bool,
             prefix: bool) -> int:
    nodes = [n for n in where.nodes if n] or ([_first_node(client, where.job)] if where.nodes == [None] else [])
    out = Lines(prefix=prefix)
    note = Lines(prefix=prefix)  # dxflow's own words about a node go to stderr
    for node, why in where.missing:  # nodes of the set without an agent: named first, and the exit is 1
        print(f"dxflow: {node}: not read: {why}", file=sys.stderr, flush=True)
    if pattern is None and len(nodes) > 1:
        nodes = _distinct_files(client, where.job, nodes, name)

    def work(run: Run) -> None:
        node = run.result.node
        try:
            if pattern is not None:
                _file(client, run, where.job, node, expand(pattern, where.job, node), lines, follow, out, note)
            else:
                _log(client, run, where.job, node, name, lines, follow, out, note)
            run.result.status = "ok"
        except (NotFound, AgentUnreachable) as e:
            if not follow:
                raise
            note.write(node, "stderr", f"dxflow: {e}\n".encode())  # the job ended on that node
            run.result.status = "ok"
        finally:
            out.close(node)

    results = run_all(nodes, work, None, None)
    failed = [r for r in results if r.status != "ok"]
    for r in failed:
        print(f"dxflow: {r.node}: {r.error}", file=sys.stderr)
    if follow and nodes and not failed:
        print(f"dxflow: job {where.job} ended", file=sys.stderr)
    return 1 if failed or where.missing else 0


def _distinct_files(client, job: str, nodes: list[str], name: str) -> list[str]:
    """The nodes whose agents read different files for log ``name``: the job's stdout is one file that
    every node of a shared file system sees (Slurm's batch host writes it, and srun's tasks into it);
    shown once, from the first node that has it, not once per node."""
    from concurrent.futures import ThreadPoolExecutor

    from dxflow.errors import DxflowError
    from dxflow.schedulers.hostlist import fold

    def path_of(node: str) -> str:
        try:
            logs = client.json("GET", client.agent_path(job, node, "/api/logs"), timeout=30)
        except (DxflowError, OSError):
            return f"?{node}"  # asked again (and its error shown) when read
        item: dict = next((i for i in logs if i.get("name") == name), {})
        return str(item.get("path") or f"?{node}")

    with ThreadPoolExecutor(max_workers=min(32, len(nodes))) as pool:
        paths = list(pool.map(path_of, nodes))
    by_path: dict[str, list[str]] = {}
    for node, path in zip(nodes, paths):
        by_path.setdefault(path, []).append(node)
    for path, same in by_path.items():
        if len(same) > 1:
            print(f"dxflow: {fold(same)} all read {path}: shown once, from {same[0]}", file=sys.stderr)
    return [same[0] for same in by_path.values()]


def _first_node(client, job: str) -> str:
    return str(client.json("GET", client.agent_path(job, None, "/api/node"))["node"])


def _request(client, run: Run, path: str, headers: dict | None = None):
    conn = run.connect(client, None)
    conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
    return conn.getresponse()


def _log(client, run: Run, job: str, node: str, name: str, lines: int | None, follow: bool, out: Lines,
         note: Lines) -> None:
    query = f"?lines={lines}" if lines is not None else ""
    resp = _request(client, run, client.agent_path(job, node, f"/api/logs/{name}" + ("/follow" if follow else "")
                                                   + query))
    check(resp)
    if not follow:
        while chunk := resp.read1(256 * 1024):
            out.write(node, "stdout", chunk)
        return
    for event, data in read_events(resp):
        if event == "end":
            note.write(node, "stderr", f"dxflow: {data}\n".encode())
            return
        out.write(node, "stdout", data.encode() + b"\n")
    raise NotFound(f"the log stream of job {job} on {node} ended (the job ended there)")


def _file(client, run: Run, job: str, node: str, path: str, lines: int | None, follow: bool, out: Lines,
          note: Lines) -> None:
    url = client.agent_path(job, node, "/api/files/content") + "?" + urlencode({"path": path})
    offset, waiting = 0, False
    if lines is not None or not follow:
        resp = _request(client, run, url)
        raw = resp.read()
        if follow and resp.status == 404 and b"no agent" not in raw:
            raw = b""  # not written yet: followed from its first byte once it is
        else:
            check(resp, raw)
        offset = len(raw)
        if lines is not None:
            raw = b"".join(raw.splitlines(keepends=True)[-lines:]) if lines else b""
        out.write(node, "stdout", raw)
        if not follow:
            return
    while True:
        resp = _request(client, run, url, {"Range": f"bytes={offset}-"})
        raw = resp.read()
        if resp.status in (200, 206):
            waiting = False
        if resp.status == 206:
            offset += len(raw)
            out.write(node, "stdout", raw)
        elif resp.status == 200:  # the file was replaced by a shorter one: start over, as tail -F does
            offset = len(raw)
            out.write(node, "stdout", raw)
        elif resp.status == 404 and b"no agent" not in raw:
            if not waiting:  # not written yet: said once, as tail -F does
                waiting = True
                note.write(node, "stderr", f"dxflow: {path} is not there (yet); waiting for it\n".encode())
        elif resp.status != 416:  # 416: nothing new
            check(resp, raw)
        time.sleep(POLL)
