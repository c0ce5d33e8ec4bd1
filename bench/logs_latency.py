"""Benchmark ``dxflow logs -f``: a line written to a job's stdout → shown by the CLI on the login node.

Runs as root on a machine where `dxflow lab up` ran. It submits a 1-node job as the
lab user whose batch script, once told to start, prints ``tick <time.time()>`` lines
at random 100–200 ms intervals (flushed at once, so Slurm writes each to the job's
output file as it comes). Two readers run on the login node at the same time:

* **dxflow**: ``dxflow logs -f JOB`` (master → SSH tunnel → agent, server-sent events);
* **tail**: ``tail -F`` of the same output file through the shared home (the baseline:
  Slurm's write to the file plus a local reader).

Each reader stamps each tick line when it arrives; the latency is arrival − the
time in the line (the lab's nodes share the login node's clock). Target: ≤ 200 ms
median for dxflow.
Usage: /opt/dxflow/venv/bin/python bench/logs_latency.py [--lines 100] [--user alice]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time

TARGET_MS = 200.0

JOB = ("while [ ! -e {go} ]; do sleep 0.05; done; echo ready; "
       "python3 -u -c 'import random, time\n"
       "for i in range({n}):\n"
       "    time.sleep(0.1 + random.random() * 0.1)\n"
       "    print(\"tick\", repr(time.time()), flush=True)\n'; sleep 2")


def as_user(user: str, argv: list[str], timeout: float = 60) -> str:
    proc = subprocess.run(["runuser", "-l", user, "-c", shlex.join(argv)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout


def reader(user: str, argv: list[str], sink: dict, ready: threading.Event) -> subprocess.Popen:
    proc = subprocess.Popen(["runuser", "-l", user, "-c", shlex.join(argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True, bufsize=0)

    def read() -> None:
        buf = b""
        while True:
            data = os.read(proc.stdout.fileno(), 65536)
            now = time.time()
            if not data:
                return
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                parts = line.decode(errors="replace").split()
                if parts[:1] == ["ready"] or parts[:1] == ["tick"]:
                    ready.set()
                if len(parts) == 2 and parts[0] == "tick":
                    sink[parts[1]] = now - float(parts[1])
    threading.Thread(target=read, daemon=True).start()
    return proc


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass


def stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs) * 1000, xs[min(len(xs) - 1, int(0.95 * len(xs)))] * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lines", type=int, default=100)
    p.add_argument("--user", default="alice")
    a = p.parse_args()
    pw = pwd.getpwnam(a.user)
    go = os.path.join(pw.pw_dir, f".dxbench-logs-go-{os.getpid()}")
    job = as_user(a.user, ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", f"--chdir={pw.pw_dir}",
                           f"--wrap={JOB.format(go=shlex.quote(go), n=a.lines)}"]).strip().split(";")[0]
    out_file = os.path.join(pw.pw_dir, f"slurm-{job}.out")  # Slurm's default name: the agent expands it
    readers = []
    got: dict[str, dict] = {"dxflow": {}, "tail": {}}
    try:
        deadline = time.monotonic() + 60
        while True:
            agents = [x for x in json.loads(as_user(a.user, ["dxflow", "ls", "--json"])) if x["job"] == job]
            if agents and all(x["state"] == "ready" for x in agents):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"job {job}: agent not ready after 60 s")
            time.sleep(0.5)
        ready = {k: threading.Event() for k in got}
        readers.append(reader(a.user, ["dxflow", "logs", "-f", job], got["dxflow"], ready["dxflow"]))
        readers.append(reader(a.user, ["tail", "-n", "+1", "-F", out_file], got["tail"], ready["tail"]))
        time.sleep(1.0)  # both readers connected and waiting
        with open(go, "w"):
            pass
        os.chown(go, pw.pw_uid, pw.pw_gid)
        for k, ev in ready.items():
            if not ev.wait(30):
                raise SystemExit(f"{k} showed nothing within 30 s")
        deadline = time.monotonic() + a.lines * 0.25 + 20
        while time.monotonic() < deadline and min(len(v) for v in got.values()) < a.lines:
            time.sleep(0.2)
    finally:
        for r in readers:
            stop(r)
        subprocess.run(["scancel", job], check=False)
        for path in (go, out_file):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    print(f"logs -f latency, job {job}: a line written to the job's stdout → shown on the login node")
    print(f"{'reader':<46} {'lines':>6} {'median ms':>10} {'p95 ms':>10}")
    med = {}
    for key, label in (("tail", "tail -F of the output file (baseline)"),
                       ("dxflow", "dxflow logs -f (master → tunnel → agent, SSE)")):
        if not got[key]:
            print(f"{label:<46} {0:>6} {'-':>10} {'-':>10}")
            continue
        m, p95 = stats(list(got[key].values()))
        med[key] = m
        print(f"{label:<46} {len(got[key]):>6} {m:>10.1f} {p95:>10.1f}")
    if "dxflow" in med:
        print(f"dxflow median {med['dxflow']:.1f} ms: target ≤ {TARGET_MS:.0f} ms → "
              f"{med['dxflow'] / TARGET_MS:.2f}× target ({'met' if med['dxflow'] <= TARGET_MS else 'NOT met'})"
              + (f"; {med['dxflow'] - med['tail']:.1f} ms more than the baseline" if "tail" in med else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
