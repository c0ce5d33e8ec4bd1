"""Benchmark the site service with many real agents (issue #17, 6): one replica, then two on PostgreSQL.

Runs as root on the lab with its site (``dxflow lab site up``). The agents are real: each is a
``dxflow hook prolog --scheduler pbs`` run as root in a lab node's namespaces for a job of the second
cluster ``pbslab`` (dxflow/lab/pbslab.py), so each one enrolls with its MUNGE credential, dials both
gateways and is checked against the scheduler (the PBS stand-in's job table) exactly as in production;
the pbslab jobs cost nothing else (no Slurm limits on how many share a node). Jobs go round-robin over
the users (alice, bob, dana) and the lab's nodes (n1..nN), one agent each.

Reported:

- one replica on SQLite, the embedded default: a site service of the bench's own beside the lab's (its
  own ports, state and keys; the bench's agents' hooks are given a dxflow.toml naming its gateway), the
  same measures as the next;
- one replica (b stopped, so a alone serves, on the lab's PostgreSQL): registration to ready (seconds
  from each prologue's start until the site lists the agent ready: median, 90th percentile, last; the
  site is asked in a loop, each user in turn, while the agents start: one loop, a few seconds on a
  loaded machine, is the resolution), ``dxflow ls`` latency per user (the whole command, median of
  --rounds; the baseline is the same user's ``dxflow ls`` through the per-user master, before the
  bench's agents exist, and again while they run), the replica's resident memory (arbiter + worker)
  before and after, per agent, and the machine's available memory before and after;
- two replicas: b started with every agent already running: seconds until b lists all of them ready
  (each dials the new replica within its backoff), then ``dxflow ls`` through both and b's memory;
- two replicas from the start: those jobs end, as many new ones start with a and b both up: registration
  to ready as above (through a), and how many b lists ready too.

The agents' own memory is summed too: that, not the site, bounds how many fit. The bench starts no
more agents once the machine's available memory would fall under --reserve-mib (the lab is shared),
and says so.

Usage: /opt/dxflow/venv/bin/python bench/site.py [--agents 200] [--users alice,bob,dana] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from dxflow.lab import pbslab, site
from dxflow.lab.layout import Layout

DXFLOW = "/usr/local/bin/dxflow"
FIRST_SEQ = 800000   # pbslab job numbers of the bench: far from the lab tests' (Slurm ids)


def cli(user: str, args: list[str], config: str | None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = f"DXFLOW_SITE_CONFIG={shlex.quote(config)} " if config else ""
    return subprocess.run(["runuser", "-l", user, "-c", f"{env}exec {DXFLOW} {shlex.join(args)}"],
                          capture_output=True, text=True, timeout=timeout)


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (gunicorn's arbiter and worker)."""
    total = 0
    try:
        children = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return 0
    for p in [pid, *children]:
        try:
            total += int(next(line.split()[1] for line in Path(f"/proc/{p}/status").read_text().splitlines()
                              if line.startswith("VmRSS:")))
        except (OSError, StopIteration):
            pass
    return total


def agents_rss_mib(jobs: list[str]) -> float:
    """Resident memory of the bench's agents (every process whose command line names one of its jobs)."""
    total = 0
    wanted = set(jobs)
    for status in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = status.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"dxflow.agent" in argv and any(a.decode(errors="replace") in wanted for a in argv):
            total += rss_kib_one(int(status.parent.name))
    return total / 1024


def rss_kib_one(pid: int) -> int:
    try:
        return int(next(line.split()[1] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                        if line.startswith("VmRSS:")))
    except (OSError, StopIteration):
        return 0


def replica_rss(name: str) -> int:
    state = site.load_state(Layout())
    pid = site.replica_pid(state, site.replica(name)) if state else None
    return rss_kib(pid) if pid else 0


def ls_seconds(user: str, rounds: int, config: str | None) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.monotonic()
        proc = cli(user, ["ls", "--json"], config)
        times.append(time.monotonic() - t0)
        if proc.returncode != 0:
            raise SystemExit(f"`dxflow ls` of {user} failed: {proc.stderr.strip()[-400:]}")
    return statistics.median(times)


def ready_jobs(users: list[str], config: str) -> dict[str, str]:
    """{job: state} of every pbslab agent the site lists for these users."""
    out: dict[str, str] = {}
    for user in users:
        proc = cli(user, ["ls", "--json"], config)
        if proc.returncode == 0:
            for a in json.loads(proc.stdout):
                if a.get("cluster") == pbslab.NAME:
                    out[a["job"]] = a["state"]
    return out


def available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def start(pbs: pbslab.PbsLab, count: int, users: list[str], nodes: list[str], config: str,
          timeout: float, reserve_mib: int, jobs: list[str], first: int = FIRST_SEQ,
          site_config: str = "") -> list[float]:
    """Start up to COUNT agents (their jobs appended to JOBS as they start, for the clean-up), fewer when
    the machine's available memory would drop under RESERVE_MIB (the lab is shared); wait until the site
    lists each ready. Returns the seconds to ready of each. A prologue that started no agent (see the
    hook log) is counted and left out."""
    started: dict[str, float] = {}
    took: dict[str, float] = {}
    done = threading.Event()

    def poll() -> None:
        """Ask the site, once a second per user, while the agents start: each one's first listing as ready."""
        while not done.is_set():
            now = time.monotonic()
            for job, state in ready_jobs(users, config).items():
                if state == "ready" and job in started and job not in took:
                    took[job] = now - started[job]
            time.sleep(1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    for i in range(count):
        if available_mib() < reserve_mib:
            print(f"  stopped at {i} agents: {available_mib()} MiB available, the reserve is {reserve_mib} MiB")
            break
        node = nodes[i % len(nodes)]
        t0 = time.monotonic()
        job = pbslab.start_job(pbs, first + i, users[i % len(users)], [node], site_config)
        jobs.append(job)
        if Path(f"/run/dxflow/{pbslab.NAME}.{job}.{node}.json").exists():
            started[job] = t0
    if len(started) < len(jobs):
        print(f"  {len(jobs) - len(started)} prologue(s) started no agent: see /var/log/dxflow/hooks.log")
    deadline = time.monotonic() + timeout
    while len(took) < len(started) and time.monotonic() < deadline:
        time.sleep(1)
    done.set()
    poller.join()
    if len(took) < len(started):
        print(f"  only {len(took)} of {len(started)} agents ready after {timeout:.0f} s")
    return sorted(took.values())


def end_jobs(pbs: pbslab.PbsLab, jobs: list[str]) -> None:
    """The epilogue of each job (its agent stops); JOBS is emptied."""
    t0 = time.monotonic()
    for job in jobs:
        pbslab.end_job(pbs, job)
    if jobs:
        print(f"({len(jobs)} jobs ended in {time.monotonic() - t0:.0f} s)")
    jobs.clear()


class SqliteSite:
    """A site service of the bench's own, one replica on SQLite (``database = ""``), beside the lab's: its own
    ports, state and published keys, reached only by the bench's agents (their hooks read a dxflow.toml
    naming its gateway: ``DXFLOW_SITE_CONFIG``) and by the bench's CLI calls. The lab's replicas, and
    whoever tests against them, are left alone."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.root = layout.root / "bench-site"
        self.replica = site.Replica("bench", 8490, 8492, 8491, self.root / "site.toml")
        self.agents_config = self.root / "dxflow.toml"
        self.client_config = self.root / "client.toml"
        state = site.load_state(layout)
        if state is None:
            raise SystemExit("the lab's site is not up: dxflow lab site up")
        self.state = state

    def __enter__(self) -> "SqliteSite":
        from dxflow.lab import postgres

        self.root.mkdir(mode=0o755, exist_ok=True)
        text = site.service_toml(self.layout, self.replica, postgres.Postgres(self.layout), pbslab.PbsLab(self.layout))
        text = "\n".join('database = ""' if line.startswith("database = ") else
                         f'state_dir = "{self.root / "state"}"' if line.startswith("state_dir = ") else
                         f'publish_dir = "{self.root / "publish"}"' if line.startswith("publish_dir = ") else line
                         for line in text.splitlines()) + "\n"
        self.replica.config.write_text(text)
        self.replica.config.chmod(0o644)
        subprocess.run([DXFLOW, "site", "init", "--config", str(self.replica.config), "--name", site.API_HOST],
                       check=True, capture_output=True, timeout=120)
        keys = f'site_keys = "{self.root / "publish"}"\n'
        self.agents_config.write_text(f'site_gateways = ["{site.API_HOST}:{self.replica.gateway}"]\n{keys}')
        self.client_config.write_text(f'site = ["{self.replica.url}"]\n{keys}')
        for path in (self.agents_config, self.client_config):
            path.chmod(0o644)
        site.start_replica(self.layout, self.state, self.replica)
        return self

    def rss(self) -> int:
        pid = site.replica_pid(self.state, self.replica)
        return rss_kib(pid) if pid else 0

    def __exit__(self, *exc: object) -> None:
        site.stop_replica(self.layout, self.state, self.replica)
        shutil.rmtree(self.root, ignore_errors=True)


def report(label: str, took: list[float], count: int, ls: dict[str, float], base: dict[str, float],
           rss: tuple[int, int], agents_mib: float) -> None:
    if took:
        p90 = took[int(0.9 * (len(took) - 1))]
        print(f"{label}: {len(took)}/{count} agents ready; registration->ready median "
              f"{statistics.median(took):.1f} s, p90 {p90:.1f} s, last {max(took):.1f} s")
    else:
        print(f"{label}:")
    for user, seconds in ls.items():
        print(f"  dxflow ls ({user}): {seconds * 1000:.0f} ms via the site; per-user master {base[user] * 1000:.0f} ms "
              f"(ratio {seconds / base[user]:.2f})")
    before, after = rss
    if not after:
        return
    print(f"  replica RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB: {(after - before) / max(1, count):.0f} KiB "
          f"per agent; the agents themselves {agents_mib:.0f} MiB ({agents_mib / max(1, count):.1f} MiB each)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--users", default="alice,bob,dana")
    ap.add_argument("--rounds", type=int, default=5, help="`dxflow ls` runs per user, median reported")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for every agent to be ready")
    ap.add_argument("--sqlite", action=argparse.BooleanOptionalAction, default=True,
                    help="also one replica on SQLite, a site service of the bench's own (default on)")
    ap.add_argument("--reserve-mib", type=int, default=4096,
                    help="start no more agents once the machine has less memory available than this")
    args = ap.parse_args()
    users = args.users.split(",")
    layout = Layout()
    info = site.status(layout)
    if info["state"] != "up":
        raise SystemExit("the lab's site is not up: dxflow lab site up")
    lab_state = json.loads(layout.state_file.read_text())
    nodes = lab_state["nodes"]
    pbs = pbslab.PbsLab(layout)
    only_a = Path("/tmp/dxflow-bench-site-a.toml")
    only_a.write_text("\n".join(f'site = ["{site.replica("a").url}"]' if line.startswith("site = ") else line
                                for line in site.CLIENT_CONFIG.read_text().splitlines()) + "\n")
    only_a.chmod(0o644)
    both = str(site.CLIENT_CONFIG)
    print(f"{args.agents} agents of {', '.join(users)} on {', '.join(nodes)} (pbslab jobs {FIRST_SEQ}..)")
    base = {u: ls_seconds(u, args.rounds, None) for u in users}
    state = site.load_state(layout)
    assert state is not None
    a, b = site.replica("a"), site.replica("b")
    jobs: list[str] = []
    try:
        # -- one replica on SQLite, a site service of the bench's own
        if args.sqlite:
            with SqliteSite(layout) as own:
                rss_own = own.rss()
                took = start(pbs, args.agents, users, nodes, str(own.client_config), args.timeout, args.reserve_mib,
                             jobs, FIRST_SEQ + 20000, str(own.agents_config))
                ls = {u: ls_seconds(u, args.rounds, str(own.client_config)) for u in users}
                report("one replica on SQLite (the bench's own site service)", took, len(took), ls, base,
                       (rss_own, own.rss()), agents_rss_mib(jobs))
                end_jobs(pbs, jobs)
        # -- one replica on PostgreSQL: b stopped (the agents' dials to b fail and are retried)
        site.start_replica(layout, state, a)
        site.stop_replica(layout, state, b)
        rss_a = replica_rss("a")
        free_before = available_mib()
        took = start(pbs, args.agents, users, nodes, str(only_a), args.timeout, args.reserve_mib, jobs)
        count = len(took)
        agents_mib = agents_rss_mib(jobs)
        ls = {u: ls_seconds(u, args.rounds, str(only_a)) for u in users}
        loaded = {u: ls_seconds(u, args.rounds, None) for u in users}
        print("  per-user masters now (same agents running, their registrations in each user's fleet folder): "
              + ", ".join(f"{u} {t * 1000:.0f} ms" for u, t in loaded.items()))
        report("one replica (a; b stopped)", took, count, ls, base, (rss_a, replica_rss("a")), agents_mib)
        print(f"  memory: {free_before} MiB available before, {available_mib()} after "
              f"({(free_before - available_mib()) / max(1, count):.1f} MiB per agent, agents and site together)")
        # -- two replicas: b starts, every agent dials it (backoff at most 5 s); then both serve
        t0 = time.monotonic()
        site.start_replica(layout, state, b)
        b_config = Path("/tmp/dxflow-bench-site-b.toml")
        b_config.write_text(only_a.read_text().replace(a.url, b.url))
        b_config.chmod(0o644)
        deadline = time.monotonic() + args.timeout
        through_b = 0
        while time.monotonic() < deadline and through_b < count:  # the agents ready through a
            through_b = sum(1 for s in ready_jobs(users, str(b_config)).values() if s == "ready")
            time.sleep(1)
        print(f"two replicas: replica b started, {through_b}/{count} agents ready through b after "
              f"{time.monotonic() - t0:.1f} s (every agent dialled the new replica)")
        b_config.unlink(missing_ok=True)
        ls = {u: ls_seconds(u, args.rounds, both) for u in users}
        # b's growth since its start is its own warming up as much as the agents: only its size is shown
        report("two replicas (a and b, on one PostgreSQL)", [], count, ls, base, (0, 0), agents_mib)
        print(f"  replica a {replica_rss('a') / 1024:.1f} MiB, b {replica_rss('b') / 1024:.1f} MiB with {count} agents each")
        # -- two replicas from the start: the same agents again, new jobs, each dialling both at once
        end_jobs(pbs, jobs)
        took = start(pbs, args.agents, users, nodes, both, args.timeout, args.reserve_mib, jobs, FIRST_SEQ + 10000)
        b_config.write_text(only_a.read_text().replace(a.url, b.url))
        on_b = sum(1 for s in ready_jobs(users, str(b_config)).values() if s == "ready")
        b_config.unlink(missing_ok=True)
        report("two replicas, agents started with both up", took, len(took), {}, base, (0, 0), agents_rss_mib(jobs))
        print(f"  listed ready through b alone as well: {on_b}")
    finally:
        end_jobs(pbs, jobs)
        only_a.unlink(missing_ok=True)
        for r in site.REPLICAS:
            site.start_replica(layout, state, r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
