"""``dxflow hook prolog|epilog``: what the scheduler's scripts call, as root, on each node.

Rules (each scheduler's hook contract: docs/schedulers.md): return fast, never hang the job, exit 0
whatever happens to dxflow, never touch another job's processes. Standard library
only, so the prolog finishes in a few tens of milliseconds; the agent itself
(Flask, gunicorn) starts detached after the hook has returned — born in a cgroup of its
own, and moved into the job's cgroups where the scheduler makes them (dxflow.adopt) —
and every wait of the epilog has a deadline (docs/admin-slurm.md §6).
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from dxflow import config, jobcgroup
from dxflow.asuser import as_user, home_reachable, user_groups
from dxflow.config import SiteConfig, agent_name
from dxflow.errors import ConfigError
from dxflow.layout import UserLayout
from dxflow.locks import locked
from dxflow.procs import read_proc, stop_tree
from dxflow.registration import JOB_NODES_ENV
from dxflow.schedulers import HookJob, Scheduler, get_scheduler
from dxflow.schedulers.hostlist import fold

log = logging.getLogger("dxflow.hook")

#: Environment given to the agent; nothing else of the hook's environment passes.
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
#: Seconds a hook waits for the lock on an agent's record (another hook for the same job and node holds it).
RECORD_LOCK_WAIT = 10.0
#: Seconds a hook gives a child that works in the user's home as the user (:func:`as_user`): a hung
#: file system, or a FIFO the user put there, must not hang the hook (the node would drain).
REGISTRATION_TIMEOUT = 5.0


def hook_log(site: SiteConfig) -> Path:
    """The site's hook log; a hook run as the job's user (LSF's default) logs to ~/.dxflow/logs."""
    if os.getuid() == 0:
        return Path(site.hook_log)
    return UserLayout.of(pwd.getpwuid(os.getuid()).pw_dir).hook_log


def runtime_dir(site: SiteConfig) -> Path:
    """Where a hook keeps its agent records: root's runtime dir, or ~/.dxflow/run for a hook run as the user."""
    if os.getuid() == 0:
        return Path(site.runtime_dir)
    return UserLayout.of(pwd.getpwuid(os.getuid()).pw_dir).run_dir


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
    """The recorded agent (or its launcher, root until it becomes the agent) still runs: same pid,
    same start time — a pid alone may have been reused by an unrelated process."""
    p = read_proc(int(record.get("pid", 0)))
    return bool(p and record.get("start") is not None and p.start == record.get("start"))


def agent_env(pw: pwd.struct_passwd, passthrough: dict[str, str]) -> dict[str, str]:
    env = {
        "HOME": pw.pw_dir, "USER": pw.pw_name, "LOGNAME": pw.pw_name, "SHELL": pw.pw_shell or "/bin/sh",
        "PATH": SAFE_PATH, "LANG": "C.UTF-8",
    }
    env.update(passthrough)
    return env


def agent_passthrough(sched: Scheduler, job: HookJob) -> dict[str, str]:
    """What the agent's environment gets from the hook's: the scheduler's variables the agent needs
    (:attr:`Scheduler.passthrough_env`), the site config's path when it is not the default one, and every
    node of the job, folded (:data:`dxflow.registration.JOB_NODES_ENV`: into the agent's registration, so
    that ``JOB:all`` is known without asking the controller)."""
    passthrough = {k: v for k in sched.passthrough_env if (v := sched.environ.get(k))}
    if config.SITE_CONFIG != config.DEFAULT_SITE_CONFIG:  # the agent reads the site config the hook read
        passthrough["DXFLOW_SITE_CONFIG"] = str(config.SITE_CONFIG)
    if job.nodes:
        passthrough[JOB_NODES_ENV] = fold(job.nodes)
    return passthrough


def agent_argv(site: SiteConfig, job: HookJob) -> list[str]:
    python = site.python or sys.executable
    argv = [python, "-I", "-m", "dxflow.agent", "--scheduler", job.scheduler, "--cluster", job.cluster,
            "--job", job.job, "--node", job.node]
    for flag, value in (("--work-dir", job.work_dir), ("--stdout", job.stdout), ("--stderr", job.stderr)):
        if value:  # one element, FLAG=VALUE: a value starting with "-" is still that flag's value
            argv.append(f"{flag}={value}")
    return argv


def join_own_cgroup(job: HookJob) -> Path | None:
    """Put this hook into a new cgroup for the agent alone (root only), so that the agent is born in it
    and the epilog can kill it whole; None where no cgroup tree lets dxflow make one."""
    own = jobcgroup.own_cgroup(jobcgroup.hierarchies(), agent_name(job.cluster, job.job, job.node))
    if own is None or os.getuid() != 0:
        return None
    try:
        jobcgroup.create(own)
        jobcgroup.join(own)
    except OSError as e:
        log.warning("job %s node %s: no cgroup of its own for the agent (%s): the epilog falls back to "
                    "its process tree", job.job, job.node, e)
        return None
    return own


def start_agent(site: SiteConfig, sched: Scheduler, job: HookJob, pw: pwd.struct_passwd, path: Path) -> int:
    """Start the agent detached and write its record; return its pid. Called with the record locked.

    The agent is born in its own cgroup (:func:`join_own_cgroup`). As root it starts as
    :mod:`dxflow.adopt`, root for the moment it takes to join the job's own cgroups where the scheduler
    makes them (Slurm's extern step), then the agent (same pid: the record holds). The launcher drops
    root before it enters the home: a root-squashed home (NFS, GPFS) of mode 0700 refuses root, and
    ``Popen(cwd=home, user=...)`` would enter it first. A hook run as the user (LSF's default) starts
    the agent directly (a user cannot move processes between cgroups either way).
    """
    env = agent_env(pw, agent_passthrough(sched, job))
    as_root = os.getuid() == 0
    own = join_own_cgroup(job)
    plan = sched.job_cgroups(job) if as_root else None
    groups = os.getgrouplist(job.user, job.gid)
    if as_root:
        spec = {"job": plan.to_dict() if plan else None, "record": str(path), "log": str(hook_log(site)),
                "uid": job.uid, "gid": job.gid, "groups": groups, "cwd": pw.pw_dir, "argv": agent_argv(site, job)}
        if site.site_gateways:  # the launcher enrolls the agent, still root (dxflow.enroll): not the hook's time
            spec["enroll"] = {"cluster": job.cluster, "job": job.job, "node": job.node, "user": job.user,
                              "folder": str(UserLayout.of(pw.pw_dir).run_dir)}
        argv, cwd = [site.python or sys.executable, "-I", "-m", "dxflow.adopt", json.dumps(spec)], "/"
    else:  # run as the job's user already (LSF's default): stay as is
        argv, cwd = agent_argv(site, job), pw.pw_dir
        if site.site_gateways:
            log.warning("job %s node %s: this hook runs as the user, so the agent is not enrolled with the "
                        "site's gateways (only root vouches for an agent): run the hook as root", job.job, job.node)
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)
    child = read_proc(proc.pid)
    record: dict[str, Any] = {
        "pid": proc.pid, "start": child.start if child else None,
        "uid": job.uid, "gid": job.gid, "user": job.user, "job": job.job, "node": job.node,
        "cluster": job.cluster, "scheduler": job.scheduler, "home": pw.pw_dir,
        "own_cgroup": str(own) if own else None, "job_cgroups": [], "time": time.time()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)
    proc.returncode = 0  # never waited for: the agent lives on in its own session
    return proc.pid


def prolog(scheduler: str, argv: Sequence[str] = ()) -> int:
    """Start this job's agent on this node, detached, as the job's user. Always returns 0."""
    t0 = time.monotonic()
    site = SiteConfig()
    try:
        site = SiteConfig.load()
        _site_logger(site)
        sched = get_scheduler(scheduler)
        job = sched.hook_job(argv)
        sched.complete_hook_job(job)  # what the hook's environment lacks (OpenPBS's prologue: the work dir)
        pw = pwd.getpwnam(job.user)
        if job.uid == 0:
            log.warning("job %s belongs to root: no agent (agents never run as root)", job.job)
            return 0
        as_root = os.getuid() == 0
        if not as_root and job.uid != os.getuid():
            log.error("job %s of %s: this hook runs as uid %d and can start agents only for itself",
                      job.job, job.user, os.getuid())
            return 0
        # looked at as the user: root may not enter a root-squashed home (issue #10)
        reached = as_user(job.uid, job.gid, user_groups(job.user, job.gid), lambda: home_reachable(pw.pw_dir),
                          REGISTRATION_TIMEOUT, f"job {job.job}: a look at home {pw.pw_dir}")
        if not reached:
            why = "missing or not open to its user" if reached is False else \
                f"not answering within {REGISTRATION_TIMEOUT:.0f} s"
            log.error("job %s: home %s of %s is %s: no agent", job.job, pw.pw_dir, job.user, why)
            return 0
        rundir = runtime_dir(site)
        rundir.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = record_path(site, job)
        # Two prologs for the same job and node at once (a retried RPC, a hand-run hook) start one agent.
        with locked(path.with_suffix(".lock"), RECORD_LOCK_WAIT) as held:
            if not held:
                log.error("job %s node %s: %s stayed locked for %.0f s (another hook is starting this "
                          "agent): none started", job.job, job.node, path, RECORD_LOCK_WAIT)
                return 0
            old = read_record(path)
            if old and agent_alive(old):
                log.info("job %s node %s: agent %s already running", job.job, job.node, old["pid"])
                return 0
            pid = start_agent(site, sched, job, pw, path)
        log.info("job %s node %s user %s: agent pid %d started in %.0f ms", job.job, job.node, job.user,
                 pid, (time.monotonic() - t0) * 1000)
    except Exception as e:  # the job must run whatever happens to dxflow
        _site_logger(site)
        log.error("prolog (%s): no agent started: %s: %s", scheduler, type(e).__name__, e)
    return 0


def clean_home(record: dict, keep_log: bool = False, timeout: float = REGISTRATION_TIMEOUT) -> bool:
    """Remove, as the user (:func:`as_user`), the stopped agent's registration (only if it still names
    that agent: a newer one may have replaced it) and, unless the site keeps them (``keep_agent_logs``),
    its log from the user's home. True when done."""
    name = agent_name(record["cluster"], record["job"], record["node"])
    layout = UserLayout.of(record["home"])

    def work() -> bool:
        from dxflow.registration import remove
        remove(layout.fleet_dir, name, pid=int(record["pid"]))
        if not keep_log:
            layout.agent_log(name).unlink(missing_ok=True)
        return True

    uid, gid = int(record["uid"]), int(record["gid"])
    done = as_user(uid, gid, user_groups(str(record.get("user", "")), gid), work, timeout,
                   f"job {record['job']} node {record['node']}: removing {layout.fleet_dir}/{name}.json and its log")
    if done is None:
        log.error("job %s node %s: registration and log left (the master drops a registration once its agent "
                  "does not answer)", record["job"], record["node"])
    elif not done:
        log.error("job %s node %s: could not clean %s as uid %d: registration %s.json or its log left",
                  record["job"], record["node"], layout.base, uid, name)
    return bool(done)


def own_cgroup_of(record: dict) -> Path | None:
    """The cgroup the prolog made for this agent alone, if the record names one that looks like it."""
    own = record.get("own_cgroup")
    name = agent_name(record["cluster"], record["job"], record["node"])
    if not own:
        return None
    if Path(own).name == name and Path(own).parent.name == jobcgroup.OWN_DIR:
        return Path(own)
    log.error("record of %s names cgroup %s, not the agent's own: left alone", name, own)
    return None


def stop_agent(record: dict, timeout: float) -> set[int]:
    """Stop the recorded agent and everything it started; return the pids still there after ``timeout``.

    First the cgroup made for the agent alone, whole (a process forking in a loop cannot escape a
    cgroup); then, for what may live outside one (none could be made here), its process tree,
    session and groups — never by pid alone: a pid whose start time differs from the record's
    belongs to someone else. The job's own cgroups are left to the scheduler: the agent shares
    them with the job's other processes (Slurm's extern step, SSH sessions adopted into it).
    """
    left: set[int] = set()
    launcher = read_proc(int(record["pid"]))
    if launcher and launcher.uid == 0 and agent_alive(record):
        # still the launcher, waiting for the job's cgroups: root, and nothing started yet
        os.kill(launcher.pid, signal.SIGKILL)
    own = own_cgroup_of(record)
    if own:
        left |= jobcgroup.kill(own, timeout)
        jobcgroup.remove(own)
    left |= stop_tree(int(record["pid"]), int(record["uid"]), timeout=timeout, start=record.get("start"))
    return left


def _stop_recorded(path: Path, job: HookJob, site: SiteConfig) -> tuple[dict | None, str]:
    """Stop the agent ``path`` records and remove the record; (the record, what happened) or (None, "")."""
    record = read_record(path)
    if not record:
        log.info("job %s node %s: no agent record, nothing to stop", job.job, job.node)
        return None, ""
    if record.get("job") != job.job or record.get("uid") != job.uid:
        log.error("record %s does not match job %s / uid %s: left alone", path, job.job, job.uid)
        return None, ""
    note = "agent stopped" if agent_alive(record) else "agent already gone"
    left = stop_agent(record, site.stop_timeout)
    if left:
        log.error("job %s node %s: processes %s still there after %.1f s", job.job, job.node, sorted(left),
                  site.stop_timeout)
    path.unlink(missing_ok=True)
    return record, note


def epilog(scheduler: str, argv: Sequence[str] = ()) -> int:
    """Stop exactly this job's agent on this node and everything it started. Always returns 0,
    within bounded time: every wait here has a deadline."""
    site = SiteConfig()
    try:
        try:
            site = SiteConfig.load()
        except ConfigError as e:  # an agent left running is worse than a record looked for in the default place
            _site_logger(site)
            log.error("epilog (%s): %s; stopping the agent with the default settings", scheduler, e)
        _site_logger(site)
        job = get_scheduler(scheduler).hook_job(argv)
        path = record_path(site, job)
        if not path.parent.is_dir():
            log.info("job %s node %s: no agent record, nothing to stop", job.job, job.node)
            return 0
        lock = path.with_suffix(".lock")
        try:
            # the launcher notes its cgroups in the record under this lock; a hung one is not waited for
            with locked(lock, RECORD_LOCK_WAIT) as held:
                if not held:
                    log.warning("job %s node %s: %s stayed locked; stopping the agent anyway", job.job,
                                job.node, path)
                record, note = _stop_recorded(path, job, site)
        finally:
            lock.unlink(missing_ok=True)
        if record:
            clean_home(record, site.keep_agent_logs)  # after the lock is released: a stuck child must not hold it
            log.info("job %s node %s: %s (pid %d)", job.job, job.node, note, int(record["pid"]))
    except Exception as e:
        _site_logger(site)
        log.error("epilog (%s): %s: %s", scheduler, type(e).__name__, e)
    return 0
