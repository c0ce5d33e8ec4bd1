"""Benchmark dxflow's two SSH transports against each other and against `ssh cat`, in the same run.

Runs as root on a machine where `dxflow lab up` ran; measures as the lab user (alice) from the
login node to n1. On n1 (its network namespace, as the user) a small TCP server listens on
127.0.0.1: asked ``S N`` it sends N bytes; asked ``E`` it echoes. Then, for each transport
(``paramiko``: :class:`dxflow.master.tunnels.TunnelPool`; ``openssh``: the ControlMaster pool):

* **throughput**: one channel, N bytes read to the end (MB/s, the best of --rounds);
* **request**: a new channel, a 100-byte request, its 100-byte answer, channel closed — what one
  proxied request costs the master, which opens a channel per request (median and p90, ms);
* **round trip**: on an open channel, 100 bytes there and back (median, ms).

The reference is ``ssh n1 cat FILE > /dev/null`` of a file of the same size (its login included,
so a large --mbytes keeps that small), through a fresh connection as a user would type it.

Usage: /opt/dxflow/venv/bin/python bench/transports.py [--mbytes 256] [--requests 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import subprocess
import sys
import textwrap
import time

PYTHON = "/opt/dxflow/venv/bin/python"
NODE = "n1"
PORT = 8766

SERVER = textwrap.dedent("""
    import socket, sys, threading
    BLOCK = b"x" * (1 << 20)
    def serve(conn):
        with conn:
            head = b""
            while b"\\n" not in head:
                data = conn.recv(4096)
                if not data:
                    return
                head += data
            first, rest = head.split(b"\\n", 1)
            line = first.split()
            if line[:1] == [b"S"]:
                left = int(line[1])
                while left:
                    n = conn.send(BLOCK[:min(left, len(BLOCK))])
                    left -= n
            elif line[:1] == [b"E"]:
                conn.sendall(rest)
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    conn.sendall(data)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen(64)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
""")

# Runs as the user on the login node; prints JSON {transport: {measure: value}}.
MEASURE = textwrap.dedent("""
    import json, statistics, sys, time
    from dxflow.master.tunnels import TunnelPool
    node, port, size, requests, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    out = {}

    def read_all(chan, n):
        got = 0
        while got < n:
            data = chan.recv(1 << 20)
            if not data:
                raise SystemExit(f"stream ended after {got} of {n} bytes")
            got += len(data)

    for name in ("paramiko", "openssh"):
        pool = TunnelPool(transport=name)
        pool.connect(node)
        best = 0.0
        for _ in range(rounds):
            chan = pool.channel(node, port)
            chan.settimeout(120)
            t0 = time.perf_counter()
            chan.sendall(f"S {size}\\n".encode())
            read_all(chan, size)
            best = max(best, size / (time.perf_counter() - t0) / 1e6)
            chan.close()
        req = []
        for i in range(requests + 5):
            t0 = time.perf_counter()
            chan = pool.channel(node, port)
            chan.settimeout(30)
            chan.sendall(b"E\\n" + b"r" * 97)
            read_all(chan, 97)
            chan.close()
            if i >= 5:  # warm-up left out
                req.append(time.perf_counter() - t0)
        chan = pool.channel(node, port)
        chan.settimeout(30)
        chan.sendall(b"E\\n")
        rtt = []
        for _ in range(requests):
            t0 = time.perf_counter()
            chan.sendall(b"p" * 100)
            read_all(chan, 100)
            rtt.append(time.perf_counter() - t0)
        chan.close()
        pool.close()
        req.sort()
        out[name] = {"throughput_MBps": round(best, 1), "request_ms": round(statistics.median(req) * 1e3, 2),
                     "request_p90_ms": round(req[int(len(req) * 0.9)] * 1e3, 2),
                     "round_trip_ms": round(statistics.median(rtt) * 1e3, 3)}
    print(json.dumps(out))
""")


def as_user(user: str, argv: list[str], **kw) -> subprocess.CompletedProcess:
    home = pwd.getpwnam(user).pw_dir
    env = ["env", "-i", f"HOME={home}", f"USER={user}", f"LOGNAME={user}", "PATH=/usr/local/bin:/usr/bin:/bin"]
    return subprocess.run(["runuser", "-u", user, "--", *env, *argv], capture_output=True, text=True, **kw)


def ssh_cat(user: str, path: str, size: int, rounds: int) -> float:
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        proc = as_user(user, ["sh", "-c", f"ssh -o BatchMode=yes {NODE} cat {path} | wc -c"], timeout=600)
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0 or int(proc.stdout.strip() or 0) != size:
            sys.exit(f"ssh cat failed: {proc.stderr.strip()}")
        best = max(best, size / elapsed / 1e6)
    return round(best, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--user", default="alice")
    ap.add_argument("--mbytes", type=int, default=256)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root on a machine where `dxflow lab up` ran")
    size = args.mbytes << 20
    path = f"/tmp/dxflow-bench-transports-{os.getpid()}"
    with open(path, "wb") as f:
        f.truncate(size)  # sparse zeros: the disk is not what is measured
    os.chmod(path, 0o644)
    server = subprocess.Popen(["nsenter", f"--net=/var/run/netns/dxlab-{NODE}", "runuser", "-u", args.user, "--",
                               "python3", "-c", SERVER, str(PORT)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              start_new_session=True)
    try:
        if server.stdout is None or server.stdout.readline().strip() != "ready":
            sys.exit("the byte source on the node did not start")
        proc = as_user(args.user, [PYTHON, "-c", MEASURE, NODE, str(PORT), str(size), str(args.requests),
                                   str(args.rounds)], timeout=1800)
        if proc.returncode != 0:
            sys.exit(f"measuring failed:\n{proc.stderr[-2000:]}")
        result = json.loads(proc.stdout)
        result["ssh cat"] = {"throughput_MBps": ssh_cat(args.user, path, size, args.rounds)}
    finally:
        server.terminate()
        server.wait(5)
        os.unlink(path)
    print(f"{'':10} {'MB/s':>8} {'request ms (p50/p90)':>22} {'round trip ms':>14}   ({args.mbytes} MiB, "
          f"{args.requests} requests)")
    for name, r in result.items():
        req = f"{r['request_ms']}/{r['request_p90_ms']}" if "request_ms" in r else "-"
        print(f"{name:10} {r['throughput_MBps']:>8} {req:>22} {r.get('round_trip_ms', '-'):>14}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
