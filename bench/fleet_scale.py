"""Benchmark how the master scales with the number of agents: memory, transports, time to ready.

Runs as root on the lab. It submits one 2-node job as the lab user and takes the two
real registrations of its agents. Then, for each step (0, 100, 250, 500 by default)
it gives a private master of that user (the installed code, its own folder
``~/.dxflow-scale-PID``) that many registrations: copies of the two real ones under
other job names, scheduler ``local`` (always running), so every one of them must be
reached through the tunnel and pass the identity challenge of the real agent behind
it. Reported per step: time until every agent is ``ready``, the master's resident
memory (arbiter + worker), memory per agent, and the number of SSH transports — which
must stay one per node.

What this does not show: 500 separate agent processes (they would need ~30 MB each,
more than this machine has to spare); the master's work per agent is the same.

Usage: /opt/dxflow/venv/bin/python bench/fleet_scale.py [--steps 0,100,250,500] [--user alice]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shlex
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from dxflow.lab.private_master import PYTHON, PrivateMaster

QUERY = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from dxflow.master.client import MasterClient
    c = MasterClient(Path(sys.argv[1]))
    print(json.dumps({"agents": c.json("GET", "/api/agents"), "master": c.json("GET", "/api/master")}))
""")


def as_user(user: str, argv: list[str], timeout: float = 120) -> str:
    return subprocess.run(["runuser", "-l", user, "-c", shlex.join(argv)], capture_output=True, text=True,
                          check=True, timeout=timeout).stdout


def rss_kib(pid: int) -> int:
    total = 0
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="0,100,250,500")
    ap.add_argument("--user", default="alice")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root on the lab (dxflow lab up)")
    steps = [int(x) for x in args.steps.split(",")]
    pw = pwd.getpwnam(args.user)
    job = as_user(args.user, ["sbatch", "--parsable", "-N2", "--wrap=sleep 3600"]).strip()
    private = PrivateMaster(args.user, f".dxflow-scale-{os.getpid()}")
    started = False
    try:
        fleet = Path(pw.pw_dir) / ".dxflow" / "fleet"
        deadline = time.monotonic() + 60
        real: list[dict] = []
        while len(real) < 2:
            if time.monotonic() > deadline:
                sys.exit(f"job {job}: its two agents did not register")
            real = [json.loads(p.read_text()) for p in fleet.glob(f"*.{job}.*.json")]
            time.sleep(0.2)
        private.prepare()
        started = True
        arbiter = private.start()
        base = private.base
        print(f"job {job}: 2 real agents (n1, n2); private master pid {arbiter}")
        print(f"{'agents':>7} {'ready after':>12} {'master RSS':>11} {'per agent':>10} {'transports':>11}")
        made = 0
        base_rss = None
        for n in steps:
            t0 = time.monotonic()
            while made < n:
                reg = dict(real[made % 2], cluster="scale", scheduler="local", job=f"s{made // 2}")
                path = base / "fleet" / f"scale.s{made // 2}.{reg['node']}.json"
                path.write_text(json.dumps(reg))
                os.chown(path, pw.pw_uid, pw.pw_gid)
                made += 1
            while True:
                out = json.loads(as_user(args.user, [PYTHON, "-c", QUERY, str(base)]))
                ready = sum(a["state"] == "ready" for a in out["agents"])
                if ready == n:
                    break
                if time.monotonic() - t0 > 300:
                    sys.exit(f"only {ready} of {n} agents ready after 300 s")
                time.sleep(0.5)
            took = time.monotonic() - t0
            time.sleep(2)  # let the checks settle before reading memory
            rss = rss_kib(arbiter)
            base_rss = rss if base_rss is None else base_rss
            per = f"{(rss - base_rss) / n:.0f} KiB" if n and base_rss is not None and n != steps[0] else "-"
            transports = len(out["master"]["tunnels"])
            print(f"{n:>7} {took:>10.1f} s {rss / 1024:>8.1f} MiB {per:>10} {transports:>11}")
        return 0
    finally:
        if started:
            private.stop()
        subprocess.run(["scancel", job], check=False)
        private.remove()


if __name__ == "__main__":
    raise SystemExit(main())
