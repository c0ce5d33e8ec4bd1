"""``dxflow hook prolog|epilog``: what the scheduler's scripts call, as root, on each node.

Rules (see docs/admin.md and CONTRACTS.md): return fast, never hang the job, exit 0
whatever happens to dxflow, never touch another job's processes. Standard library
only, so the prolog finishes in a few tens of milliseconds; the agent itself
(Flask, gunicorn) starts detached after the hook has returned.
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from dxflow.config import SiteConfig, agent_name
from dxflow.procs import read_proc, stop_tree
from dxflow.schedulers import HookJob, get_scheduler

log = logging.getLogger("dxflow.hook")

#: Environment given to the agent; nothing else of the hook's environment passes.
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


def hook_log(site: SiteConfig) -> Path:
    """The site's hook log; a hook run as the job's user (LSF's default) logs to ~/.dxflow/logs."""
    if os.getuid() == 0:
        return Path(site.hook_log)
    return Path(pwd.getpwuid(os.getuid()).pw_dir) / ".dxflow" / "logs" / "hooks.log"


def runtime_dir(site: SiteConfig) -> Path:
    """Where a hook keeps its agent records: root's runtime dir, or ~/.dxflow/run for a hook run as the user."""
    if os.getuid() == 0:
        return Path(site.runtime_dir)
    return Path(pwd.getpwuid(os.getuid()).pw_dir) / ".dxflow" / "run"


def _site_logger(site: SiteConfig) -> None:
    """Log to the site's hook log, quietly doing without it if it cannot be opened."""
    if any(getattr(h, "dxflow_site", False) for h in log.handlers):
        return
    try:
        path = hook_log(site)
        path.parent.mkdir(mode=0o755 if os.getuid() == 0 else 0o700, parents=True, exist_ok=True)
        handler: logging.Handler = logging.FileHandler(path)
    except OSError:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
    handler.dxflow_site = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


def record_path(site: SiteConfig, job: HookJob) -> Path:
    return runtime_dir(site) / f"{agent_name(job.cluster, job.job, job.node)}.json"


def read_record(path: Path) -> dict | None:
    try:
        st = path.lstat()
        if st.st_uid != os.getuid():
            log.error("ignoring %s: not owned by uid %d", path, os.getuid())
            return None
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def agent_alive(record: dict) -> bool:
    """The recorded agent still runs: same pid, same start time, same owner."""
    p = read_proc(int(record.get("pid", 0)))
    return bool(p and p.start == record.get("start") and p.uid == record.get("uid"))


def agent_env(job: HookJob, pw: pwd.struct_passwd, passthrough: dict[str, str]) -> dict[str, str]:
    env = {
        "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "SHELL": pw.pw_shell or "/bin/sh",
        "PATH": SAFE_PATH, "LANG": "C.UTF-8",
    }
    env.update(passthrough)
    return env


def agent_argv(site: SiteConfig, job: HookJob) -> list[str]:
    python = site.python or sys.executable
    argv = [python, "-I", "-m", "dxflow.agent", "--scheduler", job.scheduler, "--cluster", job.cluster,
            "--job", job.job, "--node", job.node]
    for flag, value in (("--work-dir", job.work_dir), ("--stdout", job.stdout), ("--stderr", job.stderr)):
        if value:  # one element, FLAG=VALUE: a value starting with "-" is still that flag's value
            argv.append(f"{flag}={value}")
    return argv


def prolog(scheduler: str, argv: Sequence[str] = ()) -> int:
    """Start this job's agent on this node, detached, as the job's user. Always returns 0."""
    t0 = time.monotonic()
    site = SiteConfig()
    try:
        site = SiteConfig.load()
        _site_logger(site)
        sched = get_scheduler(scheduler)
        job = sched.hook_job(argv)
        pw = pwd.getpwnam(job.user)
        if job.uid == 0:
            log.warning("job %s belongs to root: no agent (agents never run as root)", job.job)
            return 0
        if not os.path.isdir(pw.pw_dir):
            log.error("job %s: home %s of %s is missing: no agent", job.job, pw.pw_dir, job.user)
            return 0
        as_root = os.getuid() == 0
        if not as_root and job.uid != os.getuid():
            log.error("job %s of %s: this hook runs as uid %d and can start agents only for itself",
                      job.job, job.user, os.getuid())
            return 0
        rundir = runtime_dir(site)
        rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = record_path(site, job)
        old = read_record(path)
        if old and agent_alive(old):
            log.info("job %s node %s: agent %s already running", job.job, job.node, old["pid"])
            return 0
        passthrough = {k: v for k in sched.passthrough_env if (v := sched.environ.get(k))}
        proc = subprocess.Popen(
            agent_argv(site, job), cwd=pw.pw_dir, env=agent_env(job, pw, passthrough),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            close_fds=True, start_new_session=True,
            # as root, become the job's user; run as that user already (LSF's default), stay as is
            **(dict(user=job.uid, group=job.gid, extra_groups=os.getgrouplist(job.user, job.gid))
               if as_root else {}),
        )
        child = read_proc(proc.pid)
        record = {"pid": proc.pid, "start": child.start if child else None,
                  "uid": job.uid, "gid": job.gid, "user": job.user, "job": job.job, "node": job.node,
                  "cluster": job.cluster, "scheduler": job.scheduler, "home": pw.pw_dir,
                  "time": time.time()}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
        proc.returncode = 0  # never waited for: the agent lives on in its own session
        log.info("job %s node %s user %s: agent pid %d started in %.0f ms", job.job, job.node, job.user,
                 proc.pid, (time.monotonic() - t0) * 1000)
    except Exception as e:  # the job must run whatever happens to dxflow
        _site_logger(site)
        log.error("prolog (%s): no agent started: %s: %s", scheduler, type(e).__name__, e)
    return 0


def _remove_registration(record: dict) -> None:
    """Remove the agent's registration from the user's home, as the user (never follow links as root)."""
    name = agent_name(record["cluster"], record["job"], record["node"])
    fleet = Path(record["home"]) / ".dxflow" / "fleet"
    pid = os.fork()
    if pid == 0:  # child: become the user, then touch the user's files
        try:
            os.setgroups([])
            os.setgid(int(record["gid"]))
            os.setuid(int(record["uid"]))
            from dxflow.registration import remove
            remove(fleet, name)
            os._exit(0)
        except BaseException:
            os._exit(1)
    os.waitpid(pid, 0)


def epilog(scheduler: str, argv: Sequence[str] = ()) -> int:
    """Stop exactly this job's agent on this node and everything it started. Always returns 0."""
    site = SiteConfig()
    try:
        site = SiteConfig.load()
        _site_logger(site)
        job = get_scheduler(scheduler).hook_job(argv)
        path = record_path(site, job)
        record = read_record(path)
        if not record:
            log.info("job %s node %s: no agent record, nothing to stop", job.job, job.node)
            return 0
        if record.get("job") != job.job or record.get("uid") != job.uid:
            log.error("record %s does not match job %s / uid %s: left alone", path, job.job, job.uid)
            return 0
        leader = int(record["pid"])
        alive = agent_alive(record)
        leader_note = "agent stopped" if alive else "agent already gone"
        # Even when the leader is gone, what is left of its session still carries its pid as sid.
        left = stop_tree(leader, job.uid, timeout=site.stop_timeout, leader_alive=alive)
        if left:
            log.error("job %s node %s: processes %s still there after %.1f s", job.job, job.node,
                      sorted(left), site.stop_timeout)
        if os.getuid() == 0:
            _remove_registration(record)
        else:  # the hook runs as the job's user: its own files, nothing to drop
            from dxflow.registration import remove
            remove(Path(record["home"]) / ".dxflow" / "fleet",
                   agent_name(record["cluster"], record["job"], record["node"]))
        path.unlink(missing_ok=True)
        log.info("job %s node %s: %s (pid %d)", job.job, job.node, leader_note, leader)
    except Exception as e:
        _site_logger(site)
        log.error("epilog (%s): %s: %s", scheduler, type(e).__name__, e)
    return 0
