"""``python -I -m dxflow.adopt SPEC``: the prolog's launcher — put this process where the job's
processes belong on this node, then become the job's agent.

The prolog starts it as root, detached (own session, stdio on /dev/null), already inside the
cgroup it made for this one agent, and returns at once: the job's own cgroups do not exist yet
while the prolog runs (Slurm makes the extern step's just after it). In order, the launcher

1. waits, at most ``job.wait`` seconds, for the job's own cgroups on this node and joins them, as
   ``pam_slurm_adopt`` does for an SSH session: from then on the agent and everything it starts
   (``dxflow exec``, ``dxflow shell``) count against the job's CPU and memory limits, and the
   scheduler kills them with the job;
2. writes the cgroups it joined into the prolog's record of the agent (under the record's lock);
3. where the site has gateways (``site_gateways``), makes the agent's gateway key and root's MUNGE
   credential for it (:mod:`dxflow.enroll`), handed over, once it is the user, in a file of the user's;
4. becomes the job's user and execs the agent: same pid and start time as the record says.

Whatever fails on the way, the agent still starts (outside what could not be joined) and the
hook log says why. SPEC is one JSON object written by :func:`dxflow.hook.prolog`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dxflow import jobcgroup
from dxflow.locks import locked

if TYPE_CHECKING:  # imported when the site has gateways only (cryptography is not light)
    from dxflow.enroll import Enrollment

log = logging.getLogger("dxflow.hook")

#: seconds between two looks for the job's cgroups: the first soon, then up to POLL_MAX (a 64-node job's
#: launchers all wait at once, on the same cores as the slurmstepds they wait for)
POLL = 0.01
POLL_MAX = 0.05
RECORD_LOCK_WAIT = 5.0


def join_job(spec: dict | None) -> list[str]:
    """Wait for the job's cgroups on this node (bounded) and join them; the paths joined."""
    if not spec:
        return []
    plan = jobcgroup.JobCgroups.from_dict(spec)
    deadline = time.monotonic() + plan.wait
    ready = plan.ready()
    pause = POLL
    while ready is None and time.monotonic() < deadline:
        time.sleep(pause)
        pause = min(pause * 1.5, POLL_MAX)
        ready = plan.ready()
    if ready is None:
        log.warning("agent pid %d: the job's cgroup %s did not appear within %.0f s: the agent runs "
                    "outside the job's limits", os.getpid(), plan.groups[0][0] if plan.groups else "?", plan.wait)
        return []
    joined = []
    for cg in ready:
        try:
            jobcgroup.join(cg)
            joined.append(str(cg))
        except OSError as e:
            log.warning("agent pid %d: cannot join the job's cgroup %s: %s", os.getpid(), cg, e)
    return joined


def note_cgroups(record: Path, joined: list[str]) -> None:
    """Add the cgroups joined to the prolog's record, if it is still this agent's."""
    with locked(record.with_suffix(".lock"), timeout=RECORD_LOCK_WAIT) as ok:
        if not ok:
            log.warning("agent pid %d: record %s stayed locked: cgroups not noted", os.getpid(), record)
            return
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            return
        if data.get("pid") != os.getpid():
            return
        data["job_cgroups"] = joined
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, record)


def enroll_agent(spec: dict | None) -> Enrollment | None:
    """As root: the agent's gateway key and root's MUNGE credential for it, where the site has gateways
    (``site_gateways``; dxflow.enroll). None where it has none, or MUNGE failed: the agent starts all
    the same (the user's own master still reaches it), and the hook log says why."""
    if not spec:
        return None
    from dxflow import enroll

    try:
        return enroll.make(spec["cluster"], spec["job"], spec["node"], spec["user"])
    except Exception as e:  # noqa: BLE001 - the agent starts whatever happens to its enrollment
        log.error("agent pid %d: not enrolled with the site's gateways (it will not dial out): %s: %s",
                  os.getpid(), type(e).__name__, e)
        return None


def hand_over(enrollment: Enrollment, folder: str) -> None:
    """As the job's user: the enrollment into a file of the user's alone, its path into the agent's env."""
    from dxflow import enroll

    try:
        os.environ[enroll.ENV] = str(enroll.write(Path(folder), enrollment))
    except OSError as e:
        log.error("agent pid %d: cannot write its enrollment into %s (it will not dial out): %s",
                  os.getpid(), folder, e)


def become(uid: int, gid: int, groups: list[int], cwd: str, argv: list[str],
           enrollment: Enrollment | None = None, enroll_dir: str = "") -> None:
    """Drop root for the job's user (groups first: they cannot be set afterwards), then exec the agent."""
    if os.getuid() == 0:
        os.setgroups(groups)
        os.setgid(gid)
        os.setuid(uid)
    os.chdir(cwd)
    if enrollment is not None:
        hand_over(enrollment, enroll_dir)
    os.execve(argv[0], argv, os.environ)


def main(argv: list[str]) -> int:
    spec = json.loads(argv[1])
    if spec.get("log"):
        try:
            handler: logging.Handler = logging.FileHandler(spec["log"])
        except OSError:
            handler = logging.NullHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    joined = join_job(spec.get("job"))
    if spec.get("record"):
        note_cgroups(Path(spec["record"]), joined)
    if joined:
        log.info("agent pid %d joined the job's cgroups %s", os.getpid(), ", ".join(joined))
    enrollment = enroll_agent(spec.get("enroll"))
    become(int(spec["uid"]), int(spec["gid"]), [int(g) for g in spec["groups"]], spec["cwd"], spec["argv"],
           enrollment, (spec.get("enroll") or {}).get("folder", ""))
    return 127  # not reached: execve replaced this process (closing the log: Python opens it close-on-exec)


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv))
    except Exception as e:  # noqa: BLE001 - nobody reads our stderr (/dev/null): say it in the hook log
        log.error("agent launcher failed: %s: %s", type(e).__name__, e)
        raise SystemExit(1)
