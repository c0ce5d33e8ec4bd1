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

The added latency is master − node (medians); the design's target is ≤ 2 ms.

The master is a private instance of the installed master (same code, its own socket
in ``~/.dxflow-bench-PID``, reading the user's registrations), so that other users
of a shared lab restarting the user's master do not disturb the run.

Usage: /opt/dxflow/venv/bin/python bench/proxy_latency.py [--requests 300] [--user alice]
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
import textwrap
import time

PYTHON = "/opt/dxflow/venv/bin/python"
PORT = 8765
TARGET_MS = 2.0

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


# Runs as the user: the installed master, on a private base folder (argv: base).
MASTER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from dxflow.master.server import MasterServer, socket_path
    base = Path(sys.argv[1])
    socket_path(base).unlink(missing_ok=True)
    MasterServer(base).run()
""")

AGENTS = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from dxflow.master.client import MasterClient
    print(json.dumps(MasterClient(Path(sys.argv[1])).json("GET", "/api/agents?refresh=1", timeout=10)))
""")


def private_master(pw: pwd.struct_passwd) -> tuple[str, subprocess.Popen]:
    """A master of the user's own, on ``~/.dxflow-bench-PID``, sharing the user's registrations and key."""
    home = os.path.join(pw.pw_dir, ".dxflow")
    base = os.path.join(pw.pw_dir, f".dxflow-bench-{os.getpid()}")
    os.makedirs(os.path.join(base, "logs"), mode=0o700)
    os.symlink(os.path.join(home, "fleet"), os.path.join(base, "fleet"))
    for name in ("id_rsa", "id_rsa.pub"):
        with open(os.path.join(home, name), "rb") as src, open(os.path.join(base, name), "wb") as dst:
            dst.write(src.read())
    os.chmod(os.path.join(base, "id_rsa"), 0o600)
    for root, dirs, files in os.walk(base):
        for name in [root, *[os.path.join(root, f) for f in files + dirs]]:
            os.lchown(name, pw.pw_uid, pw.pw_gid)
    proc = subprocess.Popen(["runuser", "-l", pw.pw_name, "-c", shlex.join([PYTHON, "-c", MASTER, base])],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 20
    while not os.path.exists(os.path.join(base, "master.sock")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the private master did not start; see {base}/logs/master.log")
        time.sleep(0.1)
    return base, proc


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
    base, master = private_master(pw)
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
        for _ in range(a.rounds):
            for mode, netns, extra in (("node", f"dxlab-{node}", reg), ("login", None, job)):
                out = json.loads(as_user(a.user, [PYTHON, "-c", MEASURE, mode, str(a.requests), "1", extra,
                                                  str(PORT), base], netns=netns))
                for k, v in out.items():
                    results.setdefault(k, []).extend(v)
    finally:
        if job:
            subprocess.run(["scancel", job], check=False)
        try:
            os.killpg(master.pid, signal.SIGTERM)
            master.wait(10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        subprocess.run(["rm", "-rf", www, base], check=False)

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
          f"target ≤ {TARGET_MS:.0f} ms → {added / TARGET_MS:.2f}× target "
          f"({'met' if added <= TARGET_MS else 'NOT met'})")
    print(f"master → agent API round trip (median):           {med['api']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
