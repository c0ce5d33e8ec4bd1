"""Benchmark a multi-node job through dxflow against Slurm's own tools, in the same run (issue #15 item 7).

Runs as root on the lab (or any Slurm cluster where dxflow's prolog starts agents). It submits one
job of ``--nodes`` nodes as ``--user`` and measures, each dxflow figure next to its Slurm baseline:

* time from ``sbatch`` to the job RUNNING (Slurm), and to every node's agent ``ready`` (dxflow);
* fan-out: ``dxflow exec JOB:all -- hostname`` against ``srun --jobid J --overlap -N N hostname``
  (median of ``--repeat`` runs each);
* broadcast: ``dxflow cp FILE JOB:all:DEST`` against ``sbcast --jobid J FILE DEST`` for a file of
  ``--size`` MiB (median of ``--repeat``, the two alternating, each run from the same clean slate: the
  last run's copies removed and ``sync`` done first, untimed); every node's copy is checked by sha256 by
  dxflow itself and fsynced before it takes its name, while sbcast leaves its copies in the page cache,
  so sbcast is also timed until its copies are on disk (``sync`` after it); and the same file to the
  first node alone (the first hop: login node, master, that node's agent);
* the user's master: resident memory (arbiter + worker) and threads, before the job and once its agents
  are ready, per agent of the job;
* ``dxflow ls`` latency (median of 5).

Ratios are dxflow / Slurm: below 1 is faster than Slurm. ``--json`` prints the figures as one object.

Usage: /opt/dxflow/venv/bin/python bench/multinode.py [--nodes 4] [--size 64] [--repeat 3] [--user alice]
       [--dest /tmp] [--fanout 2] [--exclusive] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pwd
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

DXFLOW = "/usr/local/bin/dxflow"


def as_user(user: str, argv: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(["runuser", "-l", user, "-c", shlex.join(argv)], capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return proc


def timed(user: str, argv: list[str], repeat: int) -> float:
    """Median wall time of ``argv`` run ``repeat`` times as the user (each must succeed)."""
    times = []
    for _ in range(repeat):
        t = time.monotonic()
        as_user(user, argv)
        times.append(time.monotonic() - t)
    return statistics.median(times)


def agents(user: str) -> list[dict]:
    return json.loads(as_user(user, [DXFLOW, "ls", "--json"]).stdout)


def master_pids(user: str) -> list[int]:
    """The user's master: the gunicorn arbiter named ``dxflow-master`` and its children."""
    uid = pwd.getpwnam(user).pw_uid
    out = subprocess.run(["pgrep", "-u", str(uid), "-f", "dxflow.master"], capture_output=True, text=True).stdout
    pids = [int(p) for p in out.split()]
    return [p for p in pids if Path(f"/proc/{p}").exists()]


def master_usage(user: str) -> tuple[float, int]:
    """(resident MiB, threads) of every process of the user's master."""
    rss = threads = 0
    for pid in master_pids(user):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
                elif line.startswith("Threads:"):
                    threads += int(line.split()[1])
        except FileNotFoundError:
            continue
    return rss / 1024, threads


def master_cpu(user: str) -> float:
    """CPU seconds (user + system) the user's master has used so far."""
    ticks = 0
    for pid in master_pids(user):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def job_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def wait(predicate, timeout: float, what: str, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--size", type=int, default=64, help="MiB of the broadcast file (the issue's figure: 1024)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--user", default="alice")
    ap.add_argument("--dest", default="/tmp", help="folder on every node for the copies (node-local scratch)")
    ap.add_argument("--fanout", type=int, default=2, help="dxflow cp --fanout")
    ap.add_argument("--exclusive", action="store_true",
                    help="the job holds its nodes whole (sbatch --exclusive): on the lab, whose nodes share the "
                         "machine's cores, a one-task job is pinned to the same core on every node (its cpuset), "
                         "the agents and their ssh with it, while slurmd (sbcast) runs on all")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    user, n = args.user, args.nodes
    pw = pwd.getpwnam(user)
    tag = f"dxbench-{os.getpid()}"

    # a master of its own: one that still lists earlier runs' agents would hide what these cost
    subprocess.run(["runuser", "-l", user, "-c", shlex.join([DXFLOW, "master", "stop"])], capture_output=True)
    as_user(user, [DXFLOW, "ls"])  # the master runs before the first figure
    before_agents = len(agents(user))
    rss0, threads0 = master_usage(user)
    cpu0 = master_cpu(user)

    t0 = time.monotonic()
    shape = ["--exclusive"] if args.exclusive else []
    job = as_user(user, ["sbatch", "--parsable", f"--nodes={n}", "--ntasks-per-node=1", *shape, f"--chdir={pw.pw_dir}",
                         f"--job-name={tag}", "--wrap=sleep 3600"]).stdout.strip().split(";")[0]
    figures: dict[str, float | int | str] = {"nodes": n, "job": job, "size_mib": args.size,
                                             "exclusive": int(args.exclusive)}
    local = Path(pw.pw_dir) / f"{tag}.bin"
    try:
        wait(lambda: job_state(job) == "RUNNING", 600, f"job {job} running")
        figures["sbatch_to_running_s"] = time.monotonic() - t0
        # each poll is a login shell, a CLI and a master request: once a second, not to slow what it measures
        wait(lambda: sum(1 for a in agents(user) if a["job"] == job and a["state"] == "ready") == n, 900,
             f"{n} ready agents of job {job}", interval=1.0)
        figures["sbatch_to_agents_ready_s"] = time.monotonic() - t0
        rss1, threads1 = master_usage(user)
        # what the login node spent to adopt them: on a real cluster each node starts its agent on its own
        # CPUs, and this (with the agents' own start) is what the time to ready is made of
        figures["master_cpu_to_ready_s"] = master_cpu(user) - cpu0
        held = len(agents(user))
        figures.update(master_rss_mib=rss1, master_threads=threads1, master_agents=held,
                       master_rss_per_agent_mib=(rss1 - rss0) / max(1, held - before_agents),
                       master_threads_per_agent=(threads1 - threads0) / max(1, held - before_agents))

        figures["exec_all_s"] = timed(user, [DXFLOW, "exec", f"{job}:all", "--", "hostname"], args.repeat)
        figures["srun_s"] = timed(user, ["srun", f"--jobid={job}", "--overlap", f"-N{n}", f"-n{n}", "hostname"],
                                  args.repeat)

        with open(local, "wb") as f:
            for _ in range(args.size):
                f.write(os.urandom(1024 * 1024))
        os.chown(local, pw.pw_uid, pw.pw_gid)
        figures["file_sha256"] = hashlib.sha256(local.read_bytes()).hexdigest()
        dest = f"{args.dest.rstrip('/')}/{tag}"
        copies = [f"{dest}.dxflow", f"{dest}.sbcast", f"{dest}.one"]
        remove = ["srun", f"--jobid={job}", "--overlap", f"-N{n}", f"-n{n}", "rm", "-f", *copies]
        cp_all = [DXFLOW, "cp", "-q", "--fanout", str(args.fanout), str(local), f"{job}:all:{dest}.dxflow"]
        sbcast = ["sbcast", f"--jobid={job}", str(local), f"{dest}.sbcast"]
        cp_t, sb_t, sb_sync_t = [], [], []
        for _ in range(args.repeat):
            # the two alternate, each from the same clean slate: no copy of an earlier run on the nodes
            # (sbcast -f over its own last copy would drop that copy's unwritten pages instead of writing
            # them) and nothing of an earlier run left for the disk to write
            for run in ("dxflow", "sbcast"):
                as_user(user, remove)
                os.sync()
                t = time.monotonic()
                as_user(user, cp_all if run == "dxflow" else sbcast)
                took = time.monotonic() - t
                if run == "dxflow":
                    cp_t.append(took)  # each copy fsynced before it takes its name: on the disk at the end
                else:
                    sb_t.append(took)
                    os.sync()  # sbcast leaves its copies to the page cache: the time until they are on disk too
                    sb_sync_t.append(time.monotonic() - t)
        figures["cp_all_s"] = statistics.median(cp_t)
        figures["sbcast_s"] = statistics.median(sb_t)
        figures["sbcast_sync_s"] = statistics.median(sb_sync_t)
        figures["cp_all_runs_s"], figures["sbcast_runs_s"] = cp_t, sb_t
        # the first hop alone (login node -> master -> the first node's agent): the broadcast's floor
        first = sorted(a["node"] for a in agents(user) if a["job"] == job)[0]
        figures["cp_first_node_s"] = timed(user, [DXFLOW, "cp", "-q", str(local), f"{job}:{first}:{dest}.one"],
                                           args.repeat)
        as_user(user, remove)

        ls = []
        for _ in range(5):
            t = time.monotonic()
            as_user(user, [DXFLOW, "ls"])
            ls.append(time.monotonic() - t)
        figures["ls_s"] = statistics.median(ls)
    finally:
        subprocess.run(["scancel", job], check=False)
        local.unlink(missing_ok=True)

    figures["exec_vs_srun"] = figures["exec_all_s"] / figures["srun_s"]  # type: ignore[operator]
    figures["cp_vs_sbcast"] = figures["cp_all_s"] / figures["sbcast_s"]  # type: ignore[operator]
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    f = figures
    rows = [
        ("sbatch -> job running (Slurm)", f"{f['sbatch_to_running_s']:.1f} s", ""),
        ("sbatch -> all agents ready", f"{f['sbatch_to_agents_ready_s']:.1f} s",
         f"master CPU meanwhile {f['master_cpu_to_ready_s']:.1f} s ({f['master_cpu_to_ready_s'] / n * 1000:.0f} ms "
         "per agent)"),
        (f"dxflow exec {job}:all -- hostname", f"{f['exec_all_s']:.2f} s",
         f"{f['exec_vs_srun']:.2f} x srun ({f['srun_s']:.2f} s)"),
        (f"dxflow cp {args.size} MiB {job}:all", f"{f['cp_all_s']:.2f} s",
         f"{f['cp_vs_sbcast']:.2f} x sbcast ({f['sbcast_s']:.2f} s)"),
        ("  sbcast, then its copies on disk", f"{f['sbcast_sync_s']:.2f} s",
         f"dxflow's copies are fsynced: {f['cp_all_s'] / f['sbcast_sync_s']:.2f} x this"),
        ("  runs: dxflow / sbcast", " ".join(f"{t:.1f}" for t in f["cp_all_runs_s"]),
         " ".join(f"{t:.1f}" for t in f["sbcast_runs_s"])),
        (f"dxflow cp {args.size} MiB to one node", f"{f['cp_first_node_s']:.2f} s", "the first hop alone"),
        ("master memory / threads", f"{f['master_rss_mib']:.0f} MiB / {f['master_threads']}",
         f"{f['master_rss_per_agent_mib']:.2f} MiB, {f['master_threads_per_agent']:.1f} threads per agent "
         f"({f['master_agents']} agents held)"),
        ("dxflow ls", f"{f['ls_s']:.2f} s", ""),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{n} nodes, job {job}")
    for what, value, ratio in rows:
        print(f"{what:<{width}}  {value:>16}  {ratio}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
