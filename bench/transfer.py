"""Benchmark: a big file down and up through master -> tunnel -> agent, against ``ssh NODE cat``.

Run as root on a lab host (``dxflow lab up``); everything is done as the lab user::

    python bench/transfer.py [--user alice] [--node n1] [--size-mb 512] [--runs 3] [--job JOB]

It submits a one-node job (unless ``--job`` names a running one), writes a random file in
the user's home (the lab's shared file system: the same file on the login node and on
the node), and, alternating so both see the same machine load, times:

* download: ``ssh NODE cat FILE >/dev/null`` and ``GET /api/fleet/JOB/NODE/api/files/content``
  through the user's master, body read and thrown away;
* upload: ``ssh NODE 'cat > FILE2' < FILE`` and ``PUT .../api/files/content`` (the agent also
  hashes and fsyncs what it writes);
* ``dxflow cp NODE -> login`` end to end (writes the file, checks its sha256), for reference.

It prints MB/s (median of the runs) and the ratios; the design's target is a download at
>= 70 % of ``ssh cat``. The files (and the job it submitted) are removed afterwards.
Exit code 0, or 1 with ``--strict`` when the download ratio misses the target.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

PYTHON = "/opt/dxflow/venv/bin/python"
DXFLOW = "/usr/local/bin/dxflow"
TARGET = 0.70


# -- the part that runs as the lab user ---------------------------------------------------
def worker(job: str, node: str, path: str, runs: int) -> dict:
    """Time each way ``runs`` times (alternating); return the MB/s lists. Runs as the user."""
    from dxflow.master.client import MasterClient, check

    client = MasterClient().ensure()
    home = os.path.expanduser("~")
    size = os.path.getsize(os.path.join(home, path))
    up = path + ".up"
    results: dict[str, list[float]] = {k: [] for k in ("ssh_down", "dxflow_down", "ssh_up", "dxflow_up", "cp_down")}

    def timed(fn) -> float:
        client.ensure()  # (re)start the master outside the timing
        t = time.monotonic()
        fn()
        return size / 1e6 / (time.monotonic() - t)

    def ssh_down():
        subprocess.run(["ssh", node, "cat", shlex.quote(path)], stdout=subprocess.DEVNULL, check=True, cwd=home)

    def dxflow_down():
        resp = client.request("GET", client.agent_path(job, node, f"/api/files/content?path={path}"), timeout=600)
        check(resp)
        n = 0
        while True:
            chunk = resp.read1(1 << 20)
            if not chunk:
                break
            n += len(chunk)
        assert n == size, f"got {n} of {size} bytes"

    def ssh_up():
        with open(os.path.join(home, path), "rb") as f:
            subprocess.run(["ssh", node, f"cat > {shlex.quote(up)}"], stdin=f, check=True)

    def dxflow_up():
        with open(os.path.join(home, path), "rb") as f:
            body = iter(lambda: f.read(1 << 20), b"")
            resp = client.request("PUT", client.agent_path(job, node, f"/api/files/content?path={up}&overwrite=1"),
                                  body, {"Content-Length": str(size)}, timeout=600)
            raw = resp.read()
        check(resp, raw)
        assert json.loads(raw)["size"] == size

    def cp_down():
        subprocess.run([DXFLOW, "cp", "-q", f"{job}:{node}:{path}", os.path.join(home, path + ".back")],
                       check=True)

    for _ in range(runs):
        for name, fn in (("ssh_down", ssh_down), ("dxflow_down", dxflow_down), ("ssh_up", ssh_up),
                         ("dxflow_up", dxflow_up), ("cp_down", cp_down)):
            results[name].append(timed(fn))
    for p in (up, path + ".back"):
        try:
            os.unlink(os.path.join(home, p))
        except FileNotFoundError:
            pass
    return results


# -- the driver (root) ------------------------------------------------------------------------
def as_user(user: str, command: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-l", user, "-c", command], capture_output=True, text=True, **kw)


def wait_agent(user: str, job: str, node: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = as_user(user, f"{DXFLOW} ls --json")
        if out.returncode == 0 and any(a["job"] == job and a["node"] == node and a["state"] == "ready"
                                       for a in json.loads(out.stdout)):
            return
        time.sleep(0.5)
    raise SystemExit(f"no ready agent of job {job} on {node} after {timeout:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--user", default="alice")
    p.add_argument("--node", default="n1")
    p.add_argument("--size-mb", type=int, default=512)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--job", help="a running job of the user on --node (default: submit one)")
    p.add_argument("--strict", action="store_true", help="exit 1 when the download misses the target")
    p.add_argument("--worker", nargs=4, metavar=("JOB", "NODE", "PATH", "RUNS"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        job, node, path, runs = a.worker
        print(json.dumps(worker(job, node, path, int(runs))))
        return 0
    if os.geteuid() != 0:
        raise SystemExit("run as root on the lab host: it acts as the lab user through runuser")

    job = a.job
    if not job:
        out = as_user(a.user, f"sbatch --parsable -N1 -w {a.node} --wrap='sleep 1800'", check=True)
        job = out.stdout.strip().split(";")[0]
    name = f"dxflow-bench-{os.getpid()}.bin"
    try:
        wait_agent(a.user, job, a.node)
        as_user(a.user, f"head -c {a.size_mb * 2**20} /dev/urandom > ~/{name}", check=True)
        with open(__file__) as f:
            source = f.read()
        out = as_user(a.user, f"{PYTHON} - --worker {job} {a.node} {name} {a.runs}", input=source, timeout=1800)
        if out.returncode != 0:
            raise SystemExit(f"the benchmark failed:\n{out.stdout}{out.stderr}")
        results = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        as_user(a.user, f"rm -f ~/{name} ~/{name}.up ~/{name}.back")
        if not a.job:
            subprocess.run(["scancel", job], check=False)

    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"{a.size_mb} MiB, {a.runs} run(s) each, node {a.node}, job {job} (median; all runs in brackets)")
    for k in ("ssh_down", "dxflow_down", "cp_down", "ssh_up", "dxflow_up"):
        print(f"  {k:<12} {med[k]:7.0f} MB/s   [{', '.join(f'{x:.0f}' for x in results[k])}]")
    down, up = med["dxflow_down"] / med["ssh_down"], med["dxflow_up"] / med["ssh_up"]
    print(f"  download ratio {down:.0%} (target >= {TARGET:.0%})   upload ratio {up:.0%}   "
          f"dxflow cp download {med['cp_down'] / med['ssh_down']:.0%} (writes, sha256-checks)")
    return 1 if a.strict and down < TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
