"""Runs inside a Slurm generation's root file system as PID 1 of its namespaces (dxflow.lab.capture).

Standard library only, any Python from 3.11: it runs with the root's own Python, where dxflow is not
installed. It starts munged, slurmctld and two slurmd (node1, node2: Debian builds Slurm for several
slurmd per host) on 127.0.0.1, submits jobs as ``alice``, and writes into OUT:

- ``version.txt``      ``sinfo --version``
- ``squeue.json``      ``squeue --json`` while the jobs pend and run; ``squeue-ended.json`` after scancel;
  ``squeue-one.json``  ``squeue --json --jobs <the running job>``
- ``scontrol-job.json``, ``sinfo.json``  where the generation has them (else ``*.error.txt``)
- ``squeue-plain.txt`` ``squeue --noheader --format=%A|%u|%T|%N`` (what slurm.py's plain queries read)
- ``jobs.json``        each job: label, id, sbatch arguments, and the output files Slurm made
- ``hookenv/{prolog,epilog}.<job>.<node>.env``  the environment each hook saw
- ``slurm.conf``       the configuration all this ran with
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HOST = "dxcap"
USER, UID = "alice", 1001
HOME = Path("/home/alice")
OUTDIR = HOME / "out"
HOOKENV = Path("/var/tmp/hookenv")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LANG": "C.UTF-8"}

SLURM_CONF = f"""\
ClusterName=dxcap
SlurmctldHost={HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
Prolog=/etc/slurm/prolog.sh
Epilog=/etc/slurm/epilog.sh
PrologFlags=Alloc,Contain
NodeName=node1 NodeHostname=node1 NodeAddr=127.0.0.1 Port=17001 CPUs=16 RealMemory=1000 State=UNKNOWN
NodeName=node2 NodeHostname=node2 NodeAddr=127.0.0.1 Port=17002 CPUs=16 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""

HOOK = """#!/bin/sh
# a site's {kind}: keep the environment slurmd gave it
env > "{dir}/{kind}.${{SLURM_JOB_ID}}.${{SLURMD_NODENAME}}.env"
exit 0
"""

SET_HOSTNAME_AND_EXEC = "import os, socket, sys; socket.sethostname(sys.argv[1]); os.execvp(sys.argv[2], sys.argv[2:])"

SLEEP = "#!/bin/sh\nsleep 600\n"

#: label, sbatch arguments (before the script), whether it should run
JOBS: list[tuple[str, list[str], bool]] = [
    ("pending", ["--hold", "-J", "held", "-o", f"{OUTDIR}/%x-%j.out"], False),
    ("running", ["-J", "run1", "-o", f"{OUTDIR}/%x-%j-%u-%N.out", "-e", f"{OUTDIR}/%x-%j.err"], True),
    ("default_output", ["-J", "plain"], True),
    ("not_array_a", ["-J", "notarr", "-o", f"{OUTDIR}/%x-%A-%a.out"], True),
    ("array", ["--array=1-3", "-J", "arr", "-o", f"{OUTDIR}/%x-%A_%a-%N.out"], True),
    ("array_default", ["--array=1-2", "-J", "arrdef"], True),
    ("multi_task", ["-n", "3", "-J", "tasks", "-o", f"{OUTDIR}/%x.%j.%u.out"], True),
    ("multi_node", ["-N", "2", "-J", "twonodes", "-o", f"{OUTDIR}/%x-%j-%N.out"], True),
    ("hetjob", ["-J", "het", "-o", f"{OUTDIR}/%x-%j.out", "-n", "1", ":", "-n", "1"], True),
]


def sh(argv: list[str], *, user: str | None = None, check: bool = True, cwd: str | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess[str]:
    if user:
        argv = ["runuser", "-u", user, "--", *argv]
    proc = subprocess.run(argv, capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{argv} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
    return proc


def log(msg: str) -> None:
    print(f"[inside] {msg}", flush=True)


def wait(what: str, test: Callable[[], bool], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if test():
            return
        time.sleep(1)
    raise RuntimeError(f"timed out waiting for {what}")


def major() -> int:
    """Slurm's major version from ``sinfo --version`` ("slurm-wlm 24.11.5")."""
    return int(sh(["sinfo", "--version"]).stdout.split()[-1].split(".")[0])


def setup() -> None:
    socket.sethostname(HOST)
    sh(["ip", "link", "set", "lo", "up"])
    # Slurm resolves its listening address with AI_ADDRCONFIG, which finds nothing in a namespace with
    # only a loopback ("getaddrinfo((null):6817) failed", seen on 24.11): a veth pair whose both ends
    # stay in here gives it a non-loopback address that leads nowhere.
    sh(["ip", "link", "add", "dxcap0", "type", "veth", "peer", "name", "dxcap1"])
    sh(["ip", "addr", "add", "192.0.2.1/24", "dev", "dxcap0"])
    for dev in ("dxcap0", "dxcap1"):
        sh(["ip", "link", "set", dev, "up"])
    Path("/etc/hosts").write_text(f"127.0.0.1 localhost {HOST} node1 node2\n")
    Path("/etc/hostname").write_text(HOST + "\n")
    with open("/etc/group", "a") as f:
        f.write(f"{USER}:x:{UID}:\n")
    with open("/etc/passwd", "a") as f:
        f.write(f"{USER}:x:{UID}:{UID}::{HOME}:/bin/sh\n")
    OUTDIR.mkdir(parents=True)
    (HOME / "sleep.sh").write_text(SLEEP)
    for p in (HOME, OUTDIR, HOME / "sleep.sh"):
        os.chown(p, UID, UID)
    (HOME / "sleep.sh").chmod(0o755)
    HOOKENV.mkdir(parents=True)
    for d in ("/var/spool/slurmctld", "/var/log/slurm", "/var/spool/slurmd/node1", "/var/spool/slurmd/node2"):
        Path(d).mkdir(parents=True, exist_ok=True)
    etc = Path("/etc/slurm")
    etc.mkdir(exist_ok=True)
    (etc / "slurm.conf").write_text(SLURM_CONF)
    if major() >= 23:
        # slurmd loads a cgroup plugin even with proctrack/linuxproc and task/none, and there is no
        # cgroup mount in here ("No filesystem mounted on /sys/fs/cgroup", 24.11); "disabled" is 23.02+.
        (etc / "cgroup.conf").write_text("CgroupPlugin=disabled\n")
    else:
        # 22.05 has no "disabled": an empty tmpfs on /sys/fs/cgroup is what autodetect takes for v1, whose
        # plugin loads without touching a controller when nothing tracks or confines through cgroups.
        sh(["mount", "-t", "tmpfs", "-o", "mode=0755", "cgroup", "/sys/fs/cgroup"])
        (etc / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
    for kind in ("prolog", "epilog"):
        (etc / f"{kind}.sh").write_text(HOOK.format(kind=kind, dir=HOOKENV))
        (etc / f"{kind}.sh").chmod(0o755)
    # munged: its own socket in this root's /run (a tmpfs of these namespaces)
    munge = pwd.getpwnam("munge")
    run_munge = Path("/run/munge")
    run_munge.mkdir(exist_ok=True)
    os.chown(run_munge, munge.pw_uid, munge.pw_gid)
    key = Path("/etc/munge/munge.key")
    if not key.exists():
        key.write_bytes(os.urandom(1024))
    os.chown(key, munge.pw_uid, munge.pw_gid)
    key.chmod(0o400)
    for d in ("/var/lib/munge", "/var/log/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
    sh(["runuser", "-u", "munge", "--", "munged"])
    sh(["slurmctld"])
    for node in ("node1", "node2"):
        # each slurmd in a UTS namespace named after its node, as on a cluster where host name and
        # NodeName agree: %N of an output pattern is the node's host name, not its NodeName
        sh(["unshare", "--uts", "--", sys.executable, "-c", SET_HOSTNAME_AND_EXEC, node, "slurmd", "-N", node])
    wait("both nodes idle", lambda: sh(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.count("idle") == 2)


def submit() -> dict[str, dict]:
    jobs: dict[str, dict] = {}
    for label, args, runs in JOBS:
        proc = sh(["sbatch", "--parsable", *args, str(HOME / "sleep.sh")], user=USER, cwd=str(HOME))
        job = proc.stdout.strip().split(";")[0]
        jobs[label] = {"job": job, "sbatch": args, "runs": runs}
        log(f"{label}: job {job}")

    def all_running() -> bool:
        states = sh(["squeue", "-h", "-r", "-o", "%i %T"]).stdout.split("\n")
        running = sum(1 for s in states if s.endswith(" RUNNING"))
        expected = sum(1 for label, args, runs in JOBS if runs for _ in range(_count(args)))
        return running >= expected

    wait("the jobs to run", all_running)
    time.sleep(2)  # output files are opened by slurmstepd once the batch step starts
    return jobs


def _count(args: list[str]) -> int:
    """Rows ``squeue -r`` shows for a job: one per array element or heterogeneous component."""
    for a in args:
        if a.startswith("--array=1-"):
            return int(a.rsplit("-", 1)[1])
    return 2 if ":" in args else 1


def capture(out: Path, jobs: dict[str, dict]) -> None:
    (out / "version.txt").write_text(sh(["sinfo", "--version"]).stdout)
    (out / "slurm.conf").write_text(SLURM_CONF)
    (out / "squeue.json").write_text(sh(["squeue", "--json"], user=USER).stdout)
    # one job asked for: whether this generation's --json honours the filter (22.05 does not)
    (out / "squeue-one.json").write_text(sh(["squeue", "--json", "--jobs", jobs["running"]["job"]], user=USER).stdout)
    (out / "squeue-plain.txt").write_text(
        sh(["squeue", "--noheader", "--format=%A|%u|%T|%N"], user=USER).stdout)
    for name, argv in (("scontrol-job", ["scontrol", "--json", "show", "job"]), ("sinfo", ["sinfo", "--json"])):
        proc = sh(argv, user=USER, check=False)
        if proc.returncode == 0 and proc.stdout.lstrip().startswith("{"):
            (out / f"{name}.json").write_text(proc.stdout)
        else:
            (out / f"{name}.error.txt").write_text(f"exit {proc.returncode}\n{proc.stdout}{proc.stderr}")
    files = sorted(str(p) for p in list(OUTDIR.iterdir()) + list(HOME.glob("slurm-*.out")))
    for info in jobs.values():
        info["files"] = [f for f in files if re.search(rf"(?<![0-9]){info['job']}(?![0-9])", Path(f).name)]
    (out / "files.txt").write_text("\n".join(files) + "\n")


def finish(out: Path, jobs: dict[str, dict]) -> None:
    ids = [info["job"] for info in jobs.values()]
    sh(["scancel", *ids], user=USER)
    time.sleep(1)
    (out / "squeue-ended.json").write_text(sh(["squeue", "--json"], user=USER).stdout)
    # an epilog on every node that ran a job; slurmd runs it as the job ends there
    ran = {info["job"] for info in jobs.values() if info["runs"]}
    wait("the epilogs", lambda: all(any(HOOKENV.glob(f"epilog.{j}*")) for j in ran), timeout=90)
    time.sleep(2)
    hookenv = out / "hookenv"
    hookenv.mkdir()
    for f in sorted(HOOKENV.iterdir()):
        shutil.copy(f, hookenv / f.name)
    (out / "jobs.json").write_text(json.dumps(jobs, indent=1) + "\n")


def main() -> int:
    out = Path(sys.argv[1])
    try:
        setup()
        jobs = submit()
        capture(out, jobs)
        finish(out, jobs)
    finally:
        logs = out / "logs"
        logs.mkdir(exist_ok=True)
        for f in Path("/var/log/slurm").glob("*.log"):
            shutil.copy(f, logs / f.name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
