"""Measure dxflow's load on shared infrastructure (issue #11): controller calls, metadata operations on
the fleet folder, and the CPU agents and masters use while idle, for jobs of several sizes in one run.

Runs as root on the lab. For each node count (``--nodes``; the lab's two nodes by default, 8,16,32 on a
lab brought up with that many, ``dxflow lab up --nodes 32``):

1. submits a job of that many nodes as the lab user; the prolog starts one agent per node;
2. starts a private master of that user (its own folder ``~/.dxflow-load-PID``, the user's key) and
   gives it the job's registrations, as ``bench/fleet_scale.py`` does, so that other users of the
   lab's shared master do not enter the counts;
3. for ``--minutes`` minutes, with strace on the master and on every agent (:mod:`dxflow.lab.trace`),
   plays the user: ``dxflow ls`` every 30 s (its two requests), ``dxflow logs -f`` on the job's first
   node, and the web console open on the fleet page (its two polls, as ``web/js/fleet.js`` makes
   them: the fleet every 2 s, each ready agent's ``/api/node`` every 3 s), all through the master's
   socket; counts every scheduler command run and every file-system call naming the fleet folder;
4. then, strace detached and every client gone, reads each agent's and the master's CPU time over
   ``--idle`` seconds.

Usage: /opt/dxflow/venv/bin/python bench/load.py [--nodes 1,2] [--minutes 10] [--idle 60] [--user alice]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from dxflow.lab.trace import Trace, scheduler_commands, under
from dxflow.lab.private_master import PYTHON, PrivateMaster
from dxflow.layout import UserLayout

TICK = os.sysconf("SC_CLK_TCK")
#: the user, as the lab user: `dxflow ls` every 30 s, `logs -f` on the first node, the console's polls
USER = textwrap.dedent("""
    import json, sys, threading, time
    from pathlib import Path
    from dxflow.master.client import MasterClient
    base, job, first, seconds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], float(sys.argv[4])
    end = time.monotonic() + seconds
    c = MasterClient(base)
    done = {"ls": 0, "fleet": 0, "node": 0, "lines": 0, "errors": 0}

    def every(period, what):
        while time.monotonic() < end:
            t = time.monotonic()
            try:
                what()
            except Exception:
                done["errors"] += 1
            time.sleep(max(0.0, period - (time.monotonic() - t)))

    def ls():
        c.json("GET", "/api/master"); c.json("GET", "/api/agents?refresh=1"); done["ls"] += 1

    agents = []
    def fleet():
        agents[:] = c.json("GET", "/api/agents?all=1"); done["fleet"] += 1

    def nodes():
        for a in [a for a in agents if a["state"] == "ready"]:
            c.json("GET", c.agent_path(a["job"], a["node"], "/api/node")); done["node"] += 1

    def follow():
        while time.monotonic() < end:  # from when the first node's agent is ready, again if the stream breaks
            if not any(a["node"] == first and a["state"] == "ready" for a in agents):
                time.sleep(0.5)
                continue
            resp = c.request("GET", c.agent_path(job, first, "/api/logs/stdout/follow?lines=0"),
                             timeout=seconds + 30)
            if resp.status != 200:
                done["errors"] += 1
                resp.close()
                time.sleep(1)
                continue
            while time.monotonic() < end:
                line = resp.fp.readline()
                if not line:
                    break
                done["lines"] += line.startswith(b"data:")
            resp.close()

    threads = [threading.Thread(target=f, daemon=True) for f in
               (lambda: every(30, ls), lambda: every(2, fleet), lambda: every(3, nodes), follow)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 60)
    print(json.dumps(done))
""")


def as_user(user: str, argv: list[str], timeout: float = 120) -> str:
    return subprocess.run(["runuser", "-l", user, "-c", shlex.join(argv)], capture_output=True, text=True,
                          check=True, timeout=timeout).stdout


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / TICK


def tree(pid: int) -> list[int]:
    """``pid`` and its children (a gunicorn arbiter and its worker)."""
    try:
        return [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return [pid]


def agent_pids(job: str) -> dict[str, list[int]]:
    """node -> the agent's arbiter and worker."""
    out = subprocess.run(["pgrep", "-f", f"dxflow.agent .*--job {job} --node "], capture_output=True,
                         text=True).stdout.split()
    nodes: dict[str, list[int]] = {}
    for pid in map(int, out):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        node = argv[argv.index(b"--node") + 1].decode() if b"--node" in argv else "?"
        nodes.setdefault(node, []).append(pid)
    return nodes


def lab_nodes() -> int:
    out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N"], capture_output=True, text=True).stdout.split()
    return len(set(out))


def measure(n: int, args, pw: pwd.struct_passwd, work: Path) -> dict:
    job = as_user(args.user, ["sbatch", "--parsable", f"-N{n}", "--ntasks-per-node=1",
                              f"--output={pw.pw_dir}/.dxflow-load-{os.getpid()}-%j.out",
                              "--wrap=while true; do date; sleep 5; done"]).strip()
    private = PrivateMaster(args.user, f".dxflow-load-{os.getpid()}-{n}")
    base = private.base
    fleet = UserLayout.of(pw.pw_dir).fleet_dir
    started = False
    agents_trace = master_trace = None
    try:
        deadline = time.monotonic() + 120
        while len(list(fleet.glob(f"*.{job}.*.json"))) < n:
            if time.monotonic() > deadline:
                sys.exit(f"job {job}: its {n} agents did not register within 120 s")
            time.sleep(0.5)
        private.prepare()
        started = True
        arbiter = private.start()
        time.sleep(1)                                        # its workers are up
        master_pids = tree(arbiter)
        agents = agent_pids(job)
        all_agents = [p for pids in agents.values() for p in pids]
        master_trace = Trace(work / f"master-{n}.strace", pids=master_pids)
        agents_trace = Trace(work / f"agents-{n}.strace", pids=all_agents)
        private.adopt(fleet.glob(f"*.{job}.*.json"))        # the job's agents appear to the master now
        first = sorted(agents)[0]
        seconds = args.minutes * 60
        t0 = time.monotonic()
        done = json.loads(as_user(args.user, [PYTHON, "-c", USER, str(base), job, first, str(seconds)],
                                  timeout=seconds + 120))
        minutes = (time.monotonic() - t0) / 60
        master_trace.stop()
        agents_trace.stop()
        m_calls, a_calls = master_trace.calls(), agents_trace.calls()
        m_sched, a_sched = scheduler_commands(m_calls), scheduler_commands(a_calls)
        time.sleep(5)                                        # the clients' last requests are over
        before = {node: cpu_seconds(pids) for node, pids in agents.items()}
        m_before = cpu_seconds(master_pids)
        time.sleep(args.idle)
        agent_cpu = {node: 100 * (cpu_seconds(pids) - before[node]) / args.idle for node, pids in agents.items()}
        master_cpu = 100 * (cpu_seconds(master_pids) - m_before) / args.idle
        return {
            "nodes": n, "job": job, "minutes": minutes, "user": done,
            "master_calls_per_min": len(m_sched) / minutes, "agent_calls_per_min": len(a_sched) / minutes,
            "master_commands": sorted({" ".join(c.argv) for c in m_sched}),
            "agent_commands": sorted({" ".join(c.argv) for c in a_sched}),
            "master_fleet_ops_per_min": len(under(m_calls, private.files.fleet_dir)) / minutes,
            "master_fleet_reads_per_min": sum(c.name == "openat" for c in under(m_calls, private.files.fleet_dir)) / minutes,
            "agent_fleet_ops_per_min": len(under(a_calls, fleet)) / minutes,
            "idle_cpu_master": master_cpu, "idle_cpu_agent_max": max(agent_cpu.values()),
            "idle_cpu_agents": agent_cpu,
        }
    finally:
        for t in (master_trace, agents_trace):
            if t is not None:
                t.stop()
        if started:
            private.stop()
        subprocess.run(["scancel", job], check=False)
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in [*private.files.logs_dir.glob("*.log"), private.files.master_log]:
                if log.exists():
                    shutil.copy2(log, args.logs / f"{n}-nodes-{log.name}")
        private.remove()
        for out in Path(pw.pw_dir).glob(f".dxflow-load-{os.getpid()}-*.out"):
            out.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", default="1,2", help="node counts, comma-separated (default: 1,2)")
    ap.add_argument("--minutes", type=float, default=10.0, help="minutes of user activity per node count")
    ap.add_argument("--idle", type=float, default=120.0, help="seconds of idleness over which CPU is read")
    ap.add_argument("--user", default="alice")
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    ap.add_argument("--logs", type=Path, help="keep the private masters' logs in this folder")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root on the lab (dxflow lab up)")
    if not shutil.which("strace"):
        sys.exit("strace is missing: apt-get install strace")
    counts = [int(x) for x in args.nodes.split(",")]
    if max(counts) > lab_nodes():
        sys.exit(f"the lab has {lab_nodes()} nodes: bring it up with `dxflow lab up --nodes {max(counts)}`")
    pw = pwd.getpwnam(args.user)
    results = []
    with tempfile.TemporaryDirectory(prefix="dxflow-load-") as work:
        for n in counts:
            results.append(measure(n, args, pw, Path(work)))
            r = results[-1]
            print(f"{n} node(s), {r['minutes']:.1f} min: user did {r['user']}", flush=True)
    print()
    print("| nodes | controller calls/min: master | agents (all) | fleet folder ops/min: master (reads) "
          "| agents | idle CPU, % of a core: master | agent (max) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['nodes']} | {r['master_calls_per_min']:.2f} | {r['agent_calls_per_min']:.2f} "
              f"| {r['master_fleet_ops_per_min']:.1f} ({r['master_fleet_reads_per_min']:.2f}) "
              f"| {r['agent_fleet_ops_per_min']:.1f} | {r['idle_cpu_master']:.3f} | {r['idle_cpu_agent_max']:.3f} |")
    for r in results:
        print(f"{r['nodes']} node(s): master ran {r['master_commands']}; agents ran {r['agent_commands']}")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
