"""Benchmark the latency the proxy adds: a small request to a job's web server, direct vs. through dxflow.

Runs as root on a machine where `dxflow lab up` ran. It submits a 1-node job as the
lab user that serves a 100-byte file with ``python3 -m http.server`` on the node, then
times, in the same run, GET of that file (a new connection per request, as a browser
or curl without keep-alive does):

* **node**: on the node itself, straight to 127.0.0.1:PORT (the baseline);
* **agent**: on the node, through the agent's ``/proxy/PORT/`` (token in the header);
* **master**: from the login node through the user's master (Unix socket, as the CLI
  does) → SSH tunnel → agent → ``/proxy/PORT/``;
* **api**: the master → agent API round trip, ``/api/fleet/JOB/-/api/health``.

The added latency is master − node (medians); the target is ≤ 1.5 ms (issue #14 item 6).

The master is a private instance of the installed master (same code, its own socket
in ``~/.dxflow-bench-PID``, reading the user's registrations), so that other users
of a shared lab restarting the user's master do not disturb the run.

On a shared machine, run more, shorter rounds (``--rounds 8 --requests 100``): the round-by-round
differences show which rounds met load from elsewhere.

Usage: /opt/dxflow/venv/bin/python bench/proxy_latency.py [--requests 300] [--rounds 2] [--user alice]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shlex
import statistics
import subprocess
import sys
import textwrap
import time

from dxflow.lab.private_master import PYTHON, PrivateMaster

PORT = 8765
TARGET_MS = 1.5

# Runs as the user; prints JSON {name: [seconds, ...]}. Blocks alternate so drift hits all alike.
MEASURE = textwrap.dedent("""
    import http.client, json, sys, time
    mode, n, rounds, PORT = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[5])
    out = {}

    def timed(name, fn):
        fn()  # warm up (tunnel, token, caches)
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            out.setdefault(name, []).append(time.perf_counter() - t0)

    if mode == "login":
        from pathlib import Path
        from dxflow.master.client import MasterClient
        c = MasterClient(Path(sys.argv[6]))
        job = sys.argv[4]
        def via(path):
            def go():
                resp = c.request("GET", path, timeout=30)
                body = resp.read()
                assert resp.status == 200, (resp.status, body[:200])
            return go
        tests = [("master", via(f"/api/fleet/{job}/-/proxy/{PORT}/small.txt")),
                 ("api", via(f"/api/fleet/{job}/-/api/health"))]
    else:
        from pathlib import Path
        from dxflow import auth
        reg = json.loads(Path(sys.argv[4]).read_text())
        token = auth.mint_token(auth.user_key(Path.home() / ".dxflow"), reg["user"],
                                auth.fingerprint(reg["public_key"]), lifetime=300)
        def get(port, path, headers):
            def go():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                conn.close()
                assert resp.status == 200, (resp.status, body[:200])
            return go
        tests = [("node", get(PORT, "/small.txt", {})),
                 ("agent", get(reg["port"], f"/proxy/{PORT}/small.txt", {"Authorization": "Bearer " + token}))]
    for _ in range(rounds):
        for name, fn in tests:
            timed(name, fn)
    json.dump(out, sys.stdout)
""")


def run(argv: list[str], **kw) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, argv[:3], proc.stdout, proc.stderr[-3000:])
    return proc.stdout


def as_user(user: str, argv: list[str], netns: str | None = None) -> str:
    cmd = ["runuser", "-l", user, "-c", shlex.join(argv)]
    if netns:
        cmd = ["nsenter", f"--net=/var/run/netns/{netns}"] + cmd
    return run(cmd, timeout=600)


def stats(xs: list[float]) -> tuple[float, float]:
    xs = sorted(xs)
    return statistics.median(xs) * 1000, xs[min(len(xs) - 1, int(0.95 * len(xs)))] * 1000



AGENTS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from dxflow.master.client import MasterClient
    print(json.dumps(MasterClient(Path(sys.argv[1])).json("GET", "/api/agents?refresh=1", timeout=10)))
""")


def wait_ready(user: str, job: str, base: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            agents = json.loads(as_user(user, [PYTHON, "-c", AGENTS, base]))
        except subprocess.CalledProcessError:
            agents = []
        mine = [a for a in agents if a["job"] == job]
        if mine and all(a["state"] == "ready" for a in mine):
            return mine[0]
        time.sleep(0.5)
    raise SystemExit(f"job {job}: its agent is not ready after {timeout:.0f} s")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=300, help="requests per kind and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--user", default="alice")
    a = p.parse_args()
    try:
        return bench(a)
    except subprocess.CalledProcessError as e:
        sys.exit(f"{' '.join(e.cmd)} failed ({e.returncode}):\n{e.stderr}")


def bench(a: argparse.Namespace) -> int:
    pw = pwd.getpwnam(a.user)
    www = os.path.join(pw.pw_dir, f"dxbench-proxy-{os.getpid()}")
    os.makedirs(www)
    with open(os.path.join(www, "small.txt"), "w") as f:
        f.write("x" * 99 + "\n")
    for path in (www, os.path.join(www, "small.txt")):
        os.chown(path, pw.pw_uid, pw.pw_gid)
    script = f"cd {shlex.quote(www)} && exec python3 -m http.server {PORT} --bind 127.0.0.1"
    private = PrivateMaster(a.user, f".dxflow-bench-{os.getpid()}", share_fleet=True)
    try:
        private.prepare().start()
    except BaseException:  # no master to stop, but the folders made so far go
        subprocess.run(["rm", "-rf", www], check=False)
        private.remove()
        raise
    base = str(private.base)
    job = None
    try:
        job = as_user(a.user, ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=1", f"--chdir={pw.pw_dir}",
                               "--output=/dev/null", f"--wrap={script}"]).strip().split(";")[0]
        agent = wait_ready(a.user, job, base)
        node = agent["node"]
        reg = next(os.path.join(pw.pw_dir, ".dxflow", "fleet", n) for n in os.listdir(
            os.path.join(pw.pw_dir, ".dxflow", "fleet")) if n.endswith(f".{job}.{node}.json"))
        deadline = time.monotonic() + 30
        while True:  # the job's server is up
            try:
                as_user(a.user, ["python3", "-c", f"import urllib.request; urllib.request.urlopen("
                                 f"'http://127.0.0.1:{PORT}/small.txt', timeout=2)"], netns=f"dxlab-{node}")
                break
            except subprocess.CalledProcessError:
                if time.monotonic() > deadline:  # noqa: SIM102
                    raise SystemExit("the job's http.server did not come up")
                time.sleep(0.3)
        results: dict[str, list[float]] = {}
        rounds: list[float] = []  # each round's master − node: a burst of load elsewhere spoils one round only
        for _ in range(a.rounds):
            this: dict[str, list[float]] = {}
            for mode, netns, extra in (("node", f"dxlab-{node}", reg), ("login", None, job)):
                out = json.loads(as_user(a.user, [PYTHON, "-c", MEASURE, mode, str(a.requests), "1", extra,
                                                  str(PORT), base], netns=netns))
                for k, v in out.items():
                    results.setdefault(k, []).extend(v)
                    this.setdefault(k, []).extend(v)
            rounds.append((statistics.median(this["master"]) - statistics.median(this["node"])) * 1000)
    finally:
        if job:
            subprocess.run(["scancel", job], check=False)
        private.stop()
        private.remove()
        subprocess.run(["rm", "-rf", www], check=False)

    print(f"proxy latency, job {job} on {node}, {len(results['node'])} requests each "
          f"(new connection per request, 100-byte file)")
    print(f"{'path':<44} {'median ms':>10} {'p95 ms':>10}")
    labels = {"node": "node: 127.0.0.1:PORT directly (baseline)", "agent": "node: agent /proxy/PORT/",
              "master": "login: master → tunnel → agent → /proxy/PORT/",
              "api": "login: master → agent /api/health"}
    med = {}
    for key in ("node", "agent", "master", "api"):
        m, p95 = stats(results[key])
        med[key] = m
        print(f"{labels[key]:<44} {m:>10.2f} {p95:>10.2f}")
    added = med["master"] - med["node"]
    print(f"added by the agent's proxy (agent − node):        {med['agent'] - med['node']:.2f} ms")
    print(f"added by dxflow end to end (master − node):       {added:.2f} ms  "
          f"target ≤ {TARGET_MS:g} ms → {added / TARGET_MS:.2f}× target "
          f"({'met' if added <= TARGET_MS else 'NOT met'})")
    print(f"master → agent API round trip (median):           {med['api']:.2f} ms")
    print(f"added, round by round (master − node):            {', '.join(f'{r:.2f}' for r in rounds)} ms; "
          f"median {statistics.median(rounds):.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
