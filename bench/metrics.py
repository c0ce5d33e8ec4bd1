"""Benchmark what sampling a job costs the agent (issue #16 goals: under 1 % of one core at 2 s,
under 10 MiB of history for a 24-hour job).

Two processes run side by side for the same time, each importing what the agent's sampler imports:
one samples a synthetic job every ``--interval`` seconds exactly as the agent does
(:class:`dxflow.metrics.sampler.Sampler`: the job's processes found by their environment, /proc read,
node totals, the report part written), the other only sleeps (the control). Their CPU time
(``getrusage``) and peak RSS are compared. The job is ``--processes`` sleeping processes carrying the
job's id, plus, in the "busy" run, one process busy on a core; the "idle" run has no busy process.
Then the history of a 24-hour job at 2 s (with 0 and 8 GPUs) is filled and its bytes counted.

No lab needed (it runs anywhere /proc is); the machine should be otherwise quiet.

Usage: /opt/dxflow/venv/bin/python bench/metrics.py [--seconds 60] [--interval 2] [--processes 50]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, os, resource, sys, time
from pathlib import Path
from dxflow.metrics.sampler import Sampler
mode, seconds, interval, job, home = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
start_cpu = resource.getrusage(resource.RUSAGE_SELF)
t0 = time.monotonic()
samples = 0
if mode == "sample":
    s = Sampler(job=job, node="bench", user="bench", cluster="bench", scheduler="local", home=Path(home),
                job_env_names=("DXFLOW_BENCH_JOB",), interval=interval, gpu_allocation=lambda pids: [],
                agent_pids=lambda: {os.getpid()})
    while time.monotonic() - t0 < seconds:
        s.tick()
        samples += 1
        time.sleep(max(0.0, interval - (time.monotonic() - t0) % interval))
else:
    time.sleep(seconds)
end = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"cpu": end.ru_utime + end.ru_stime - start_cpu.ru_utime - start_cpu.ru_stime,
                  "wall": time.monotonic() - t0, "maxrss_kib": end.ru_maxrss, "samples": samples}))
"""


def run_pair(seconds: float, interval: float, job: str, home: str) -> dict:
    env = {**os.environ}
    env.pop("DXFLOW_BENCH_JOB", None)
    procs = {m: subprocess.Popen([sys.executable, "-c", CHILD, m, str(seconds), str(interval), job, home],
                                 stdout=subprocess.PIPE, text=True, env=env) for m in ("sample", "control")}
    return {m: json.loads(p.communicate()[0]) for m, p in procs.items()}


def history_bytes() -> dict:
    from dxflow.metrics.history import History
    from dxflow.metrics.summary import columns
    out = {}
    for gpus in (0, 8):
        cols = columns(gpus)
        h = History(cols, interval=2.0)
        t = 0.0
        for _ in range(43200):
            t += 2.0
            h.add(t, [1.0] * len(cols))
        out[f"{gpus} GPUs"] = h.nbytes()
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--interval", type=float, default=2.0)
    p.add_argument("--processes", type=int, default=50, help="sleeping processes of the synthetic job")
    a = p.parse_args()
    job = f"bench{os.getpid()}"
    env = {**os.environ, "DXFLOW_BENCH_JOB": job}
    results = {}
    with tempfile.TemporaryDirectory() as home:
        (Path(home) / ".dxflow").mkdir()
        sleepers = [subprocess.Popen(["sleep", str(a.seconds * 3)], env=env) for _ in range(a.processes)]
        try:
            for load in ("idle", "busy"):
                busy = None
                if load == "busy":
                    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], env=env)
                try:
                    results[load] = run_pair(a.seconds, a.interval, job, home)
                finally:
                    if busy:
                        busy.kill()
                        busy.wait()
        finally:
            for s in sleepers:
                s.kill()
                s.wait()
    print(f"sampling every {a.interval:g} s for {a.seconds:g} s, a job of {a.processes} processes "
          f"(+1 busy on a core in the busy run), {os.cpu_count()} CPUs")
    for load, r in results.items():
        extra_cpu = r["sample"]["cpu"] - r["control"]["cpu"]
        print(f"  node {load}: sampler {r['sample']['samples']} samples, {100 * extra_cpu / r['sample']['wall']:.2f} % "
              f"of one core over the control; peak RSS {r['sample']['maxrss_kib'] / 1024:.1f} MiB vs "
              f"{r['control']['maxrss_kib'] / 1024:.1f} MiB")
    for name, n in history_bytes().items():
        print(f"  history of a 24-hour job at 2 s, {name}: {n / 2**20:.2f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
