"""Benchmark the Slurm hooks on the lab: prolog wall time, prolog → agent answering, epilog → agent gone.

Runs as root on a machine where `dxflow lab up` ran. Each round calls the installed
hook scripts exactly as slurmd does (root, the prolog environment of Slurm 22.05,
stdio away from a terminal) inside node n1's network namespace, for a fresh job id,
and times:

* prolog wall time, next to a no-op prolog (``#!/bin/sh`` + ``exit 0``) timed in the same run;
* prolog start → the agent's registration exists and the agent answers ``/api/health``
  with a token signed by the user's key;
* epilog start → the agent and every process it started are gone (the epilog returns
  only then, and the bench checks /proc afterwards);
* the agent's memory: RSS of its gunicorn arbiter and worker (each, and their sum: pages the two share,
  the worker being the arbiter's fork, are counted twice), the physical pages resident in either of
  them, each counted once (their frame numbers, read from /proc/PID/pagemap as root: what the two
  really occupy), their PSS, and their USS (the pages only they map: what the node gets back when the
  agent stops).

The user's key is made (as the user, never as root) if the home has none yet. ``--site-config``
gives the hooks (and so the agents) another site config than /etc/dxflow/dxflow.toml: a site with
``site_gateways`` makes each agent dial out to the site service (paramiko, 7 MiB more per worker).

With ``PrologFlags=Contain`` (the lab's), slurmd makes the job's extern step and its cgroups
before the prolog runs, and the prolog's launcher joins them: for its made-up jobs the bench
makes those cgroups itself, with a process in them, as slurmstepd does, and removes them after.

Usage: /opt/dxflow/venv/bin/python bench/hooks.py [--rounds 20] [--node n1] [--user alice] [--site-config PATH]
"""

from __future__ import annotations

import argparse
import array
import ctypes
import json
import os
import pwd
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CLONE_NEWNET = 0x40000000
PROLOG = "/etc/dxflow/hooks/slurm-prolog"
EPILOG = "/etc/dxflow/hooks/slurm-epilog"


def enter_netns(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{name}") as f:
        if libc.setns(f.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")


def node_conf(node: str) -> str:
    """The node's slurm.conf (the lab runs each slurmd with its own: ``slurmd -f``)."""
    from dxflow.lab.layout import Layout, Node

    path = Layout().node_slurm_conf(Node(int(node.lstrip("n"))))
    return str(path) if path.exists() else "/etc/slurm/slurm.conf"


class ExternStep:
    """The job's extern step cgroups on the node, made as slurmstepd makes them (a sleep inside)."""

    def __init__(self, conf: str, node: str, uid: int, job: int) -> None:
        cgroup_conf = Path(conf).with_name("cgroup.conf")
        mount = Path("/sys/fs/cgroup")
        if cgroup_conf.exists():
            for line in cgroup_conf.read_text().splitlines():
                key, _, value = line.partition("=")
                if key.strip().lower() == "cgroupmountpoint":
                    mount = Path(value.strip())
        self.dirs = [mount / ctrl / f"slurm_{node}" / f"uid_{uid}" / f"job_{job}" / "step_extern"
                     for ctrl in ("freezer", "cpuset", "memory", "devices", "cpuacct")
                     if (mount / ctrl / f"slurm_{node}").is_dir()]
        self.sleep = subprocess.Popen(["sleep", "600"]) if self.dirs else None
        for d in self.dirs:
            for level in (d.parent.parent, d.parent, d):
                level.mkdir(exist_ok=True)
                if "cpuset" in level.parts:
                    for name in ("cpuset.cpus", "cpuset.mems"):  # a v1 cpuset takes no task before these
                        if not (level / name).read_text().strip():
                            (level / name).write_text((level.parent / name).read_text())
            (d / "cgroup.procs").write_text(str(self.sleep.pid))

    def remove(self) -> None:
        if self.sleep:
            self.sleep.kill()
            self.sleep.wait()
        for d in self.dirs:
            for level in (d, d.parent, d.parent.parent):
                try:
                    level.rmdir()
                except OSError:
                    break


def rss_kib(pid: int) -> int:
    """Resident memory of a process, shared pages included (what ``ps`` and ``top`` show)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def smaps_kib(pid: int, *fields: str) -> int:
    """The sum of ``fields`` of /proc/PID/smaps_rollup, in KiB (0 for a process that is gone)."""
    try:
        return sum(int(line.split()[1]) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
                   if line.split(":")[0] in fields)
    except OSError:
        return 0


PAGE = os.sysconf("SC_PAGE_SIZE")
PFN_MASK = (1 << 55) - 1  # bits 0-54 of a pagemap entry: the page frame number (Documentation/admin-guide/mm/pagemap.rst)
PRESENT = 1 << 63


def resident_frames(pid: int) -> set[int]:
    """The physical page frames resident in a process's mappings (/proc/PID/pagemap; only root reads the
    frame numbers, others get 0s). Two processes that share a page have the same frame in both sets."""
    frames: set[int] = set()
    try:
        maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        with open(f"/proc/{pid}/pagemap", "rb") as pagemap:
            for line in maps:
                start, end = (int(x, 16) for x in line.split()[0].split("-"))
                if start >= 1 << 47:  # [vsyscall]: above user space, not in pagemap
                    continue
                pagemap.seek(start // PAGE * 8)
                entries = array.array("Q", pagemap.read((end - start) // PAGE * 8))
                frames.update(e & PFN_MASK for e in entries if e & PRESENT)
    except OSError:  # gone meanwhile
        pass
    return frames


def distinct_kib(pids: set[int]) -> int:
    """Resident pages of ``pids`` together, each physical page once (what RSS summed counts twice)."""
    frames: set[int] = set()
    for pid in pids:
        frames |= resident_frames(pid)
    return len(frames) * PAGE // 1024


def pss_kib(pid: int) -> int:
    """Proportional set size: each shared page counted once over the processes sharing it. For
    arbiter + worker (a fork) it is what the two really take together; RSS counts shared pages twice."""
    return smaps_kib(pid, "Pss")


def uss_kib(pid: int) -> int:
    """Unique set size: the pages no other process maps (summed over arbiter and worker, the pages they
    share are not in it: a lower bound of what stopping the agent gives back)."""
    return smaps_kib(pid, "Private_Clean", "Private_Dirty")


def ensure_user_key(pw: pwd.struct_passwd) -> None:
    """The user's key pair, made by the user (a key made by root would be root's file in the user's home)."""
    if (Path(pw.pw_dir) / ".dxflow" / "id_rsa").exists():
        return
    make = ("from dxflow.auth import user_key; from dxflow.layout import UserLayout; "
            "user_key(UserLayout.of().ensure_shared().base)")
    # found on the caller's PATH: the user's environment below has no /usr/sbin, where Debian keeps runuser
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    subprocess.run([runuser, "-u", pw.pw_name, "--", sys.executable, "-I", "-c", make], check=True,
                   env={"HOME": pw.pw_dir, "PATH": "/usr/bin:/bin"}, cwd="/")


def hook_env(job: int, node: str, pw: pwd.struct_passwd) -> dict[str, str]:
    return {"SLURM_JOB_ID": str(job), "SLURM_JOBID": str(job), "SLURM_JOB_USER": pw.pw_name,
            "SLURM_JOB_UID": str(pw.pw_uid), "SLURM_UID": str(pw.pw_uid), "SLURM_JOB_GID": str(pw.pw_gid),
            "SLURMD_NODENAME": node, "SLURM_NODELIST": node, "SLURM_CLUSTER_NAME": "dxlab",
            "SLURM_JOB_WORK_DIR": pw.pw_dir, "SLURM_JOB_PARTITION": "debug",
            "SLURM_SCRIPT_CONTEXT": "prolog_slurmd", "SLURM_CONF": node_conf(node)}


def timed(argv: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                   check=True)
    return time.perf_counter() - t0


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children so far (the hook scripts and what they wait for)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def process_cpu(pid: int, waited: bool = True) -> float:
    """CPU seconds of a live process (with ``waited``: and of the children it has waited for, such as the
    worker's key maker), from /proc/PID/stat (utime, stime, cutime, cstime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(fields[11]) + int(fields[12]) + ((int(fields[13]) + int(fields[14])) if waited else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def answering(reg_path: Path, key, user: str, deadline: float) -> bool:
    from dxflow.auth import fingerprint, mint_token

    while time.perf_counter() < deadline:
        try:
            reg = json.loads(reg_path.read_text())
        except (OSError, ValueError):
            time.sleep(0.002)
            continue
        req = urllib.request.Request(f"http://127.0.0.1:{reg['port']}/api/health")
        req.add_header("Authorization", "Bearer " + mint_token(key, user, fingerprint(reg["public_key"])))
        try:
            with urllib.request.urlopen(req, timeout=2) as resp:
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.002)
    return False


def summary(name: str, values: list[float], target: float | None = None) -> str:
    values = sorted(values)
    med = statistics.median(values)
    p95 = values[min(len(values) - 1, int(round(0.95 * (len(values) - 1))))]
    line = f"{name:<38} median {med * 1000:7.1f} ms   p95 {p95 * 1000:7.1f} ms"
    if target is not None:
        line += f"   target ≤ {target * 1000:.0f} ms: {'met' if med <= target else 'NOT met'}"
    return line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--node", default="n1")
    ap.add_argument("--user", default="alice")
    ap.add_argument("--first-job", type=int, default=7_000_000)
    ap.add_argument("--site-config", help="the site config the hooks read (default: /etc/dxflow/dxflow.toml)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root on the lab (dxflow lab up)")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dxflow.auth import user_key
    from dxflow.procs import all_procs

    pw = pwd.getpwnam(args.user)
    ensure_user_key(pw)
    key = user_key(Path(pw.pw_dir) / ".dxflow")
    enter_netns(f"dxlab-{args.node}")
    noop = Path(tempfile.mkdtemp()) / "noop-prolog"
    noop.write_text("#!/bin/sh\nexit 0\n")
    noop.chmod(0o755)

    base_t, pro_t, ans_t, epi_t, orphans, rss, pss, uss, split, distinct = [], [], [], [], 0, [], [], [], [], []
    cpu: list[float] = []
    cpu_split: list[tuple[float, float, float]] = []
    for i in range(args.rounds):
        job = args.first_job + int(time.time()) % 100000 * 100 + i
        env = hook_env(job, args.node, pw)
        if args.site_config:
            env["DXFLOW_SITE_CONFIG"] = args.site_config
        base_t.append(timed([str(noop)], env))
        reg = Path(pw.pw_dir) / ".dxflow" / "fleet" / f"dxlab.{job}.{args.node}.json"
        step = ExternStep(env["SLURM_CONF"], args.node, pw.pw_uid, job)
        try:
            t0 = time.perf_counter()
            cpu0 = children_cpu()
            pro_t.append(timed([PROLOG], env))
            hook_cpu = children_cpu() - cpu0
            if not answering(reg, key, args.user, t0 + 10):
                print(f"round {i}: agent of job {job} did not answer within 10 s", file=sys.stderr)
                return 1
            ans_t.append(time.perf_counter() - t0)
            record = json.loads(Path(f"/run/dxflow/dxlab.{job}.{args.node}.json").read_text())
            before = {p.pid for p in all_procs().values() if p.sid == record["pid"]} | {record["pid"]}
            time.sleep(0.5)  # the worker has booted and served: its memory as it stays
            rss.append(sum(rss_kib(p) for p in before) / 1024)
            pss.append(sum(pss_kib(p) for p in before) / 1024)
            uss.append(sum(uss_kib(p) for p in before) / 1024)
            distinct.append(distinct_kib(before) / 1024)
            split.append((rss_kib(record["pid"]) / 1024, sum(rss_kib(p) for p in before - {record["pid"]}) / 1024))
            # the launcher (dxflow.adopt) execs the arbiter: its CPU is in the arbiter's own; the worker's key
            # maker is waited for by the worker (its cutime); the worker is the arbiter's live child
            parts = (hook_cpu, process_cpu(record["pid"], waited=False),
                     sum(process_cpu(p) for p in before - {record["pid"]}))
            cpu.append(sum(parts))
            cpu_split.append(parts)
            env["SLURM_SCRIPT_CONTEXT"] = "epilog_slurmd"
            epi_t.append(timed([EPILOG], env))
            left = before & set(all_procs())
            orphans += len(left)
        finally:
            step.remove()
    print(f"{args.rounds} rounds on {args.node} as {args.user} (Slurm hook scripts, as slurmd runs them; "
          f"site config {args.site_config or '/etc/dxflow/dxflow.toml'})")
    print(summary("no-op prolog (baseline)", base_t))
    print(summary("dxflow prolog", pro_t, 0.100))
    print(f"{'  ratio to no-op prolog':<38} {statistics.median(pro_t) / statistics.median(base_t):.1f}x "
          f"(+{(statistics.median(pro_t) - statistics.median(base_t)) * 1000:.1f} ms)")
    print(summary("prolog start -> agent answering", ans_t, 0.500))
    print(f"{'CPU to start one agent (all processes)':<38} median {statistics.median(cpu) * 1000:7.1f} ms   "
          "(what bounds 'all agents ready' when many nodes share few cores, as on the lab)")
    print(f"{'  hook, launcher + arbiter, worker + key':<38} median "
          + ", ".join(f"{statistics.median(p[i] for p in cpu_split) * 1000:.0f}" for i in range(3)) + " ms")
    print(summary("epilog start -> agent and children gone", epi_t, 1.0))
    print(f"{'orphans left after epilogs':<38} {orphans}")
    print(f"{'agent memory (arbiter + worker RSS)':<38} median {statistics.median(rss):7.1f} MiB   target ≤ 50 MiB: "
          f"{'met' if statistics.median(rss) <= 50 else 'NOT met'} (RSS summed counts shared pages twice)")
    print(f"{'  the two together (each page once)':<38} median {statistics.median(distinct):7.1f} MiB   "
          f"target ≤ 50 MiB: {'met' if statistics.median(distinct) <= 50 else 'NOT met'}")
    print(f"{'  arbiter RSS, worker RSS':<38} median {statistics.median(a for a, _ in split):7.1f} MiB, "
          f"{statistics.median(w for _, w in split):.1f} MiB")
    print(f"{'  arbiter + worker PSS (shared once)':<38} median {statistics.median(pss):7.1f} MiB")
    print(f"{'  arbiter + worker USS (theirs alone)':<38} median {statistics.median(uss):7.1f} MiB")
    return 0 if orphans == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
