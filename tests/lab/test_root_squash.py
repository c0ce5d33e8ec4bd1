"""Issue #10 item 3 on the lab: a home root cannot read (root-squashed NFS/GPFS, mode 0700) still gets
its agent, and the epilog still cleans it.

Root squash is stood in for by root without its file-permission capabilities: the hooks run under
``capsh --drop=cap_dac_override,cap_dac_read_search``, in the node's network namespace, with the
environment slurmd gives them, while alice's home is 0700. Root then is refused in alice's home just
as a squashed root (nobody) is on NFS. Both launch paths are tried: with the job's own cgroups to join
(the lab's PrologFlags=Contain) and without (a slurm.conf without Contain, as at many sites).
"""

from __future__ import annotations

import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import DXFLOW, NETNS, agent_pids, dxflow, run, wait_agents, wait_for

SQUASHED = [shutil.which("capsh") or "/usr/sbin/capsh", "--drop=cap_dac_override,cap_dac_read_search", "--"]


def node_of(job: str) -> str:
    """The node a one-node job runs on (whichever was free: other tests share the lab)."""
    return run(["squeue", "-h", "-j", job, "-o", "%N"]).stdout.strip()


def squashed_hook(phase: str, job: str, user: str, node: str, slurm_conf: str,
                   **extra: str) -> subprocess.CompletedProcess:
    """``dxflow hook PHASE`` as slurmd runs it on ``node``, by a root that cannot read users' files."""
    pw = pwd.getpwnam(user)
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": job, "SLURM_JOB_USER": user, "SLURM_JOB_UID": str(pw.pw_uid),
           "SLURM_JOB_GID": str(pw.pw_gid), "SLURMD_NODENAME": node, "SLURM_CLUSTER_NAME": "dxlab",
           "SLURM_CONF": slurm_conf, **extra}
    return run(["nsenter", f"--net=/var/run/netns/{NETNS.format(node=node)}", *SQUASHED, "-c",
                f"exec {DXFLOW} hook {phase} --scheduler slurm"], env=env, timeout=60)


@pytest.fixture
def closed_home():
    """alice's home at mode 0700 for the test, its mode restored after."""
    home = Path(pwd.getpwnam("alice").pw_dir)
    mode = home.stat().st_mode & 0o7777
    home.chmod(0o700)
    try:
        yield home
    finally:
        home.chmod(mode)


@pytest.fixture
def no_contain():
    """A copy of the lab's slurm.conf without PrologFlags=Contain (no job cgroups to join), readable by all."""
    folder = Path(tempfile.mkdtemp(prefix="dxflow-squash-"))
    folder.chmod(0o755)
    text = Path("/etc/slurm/slurm.conf").read_text().replace("PrologFlags=Alloc,Contain", "PrologFlags=Alloc")
    (folder / "slurm.conf").write_text(text)
    (folder / "slurm.conf").chmod(0o644)
    yield str(folder / "slurm.conf")
    shutil.rmtree(folder, ignore_errors=True)


def test_the_stand_in_for_root_squash_keeps_root_out_of_a_closed_home(lab, closed_home):
    """The premise: under capsh, root cannot list a 0700 home it does not own (else this file proves nothing)."""
    seen = run([*SQUASHED, "-c", f"ls {closed_home}"], check=False)
    assert seen.returncode != 0 and "Permission denied" in seen.stderr
    assert run(["ls", str(closed_home)]).returncode == 0  # root with its capabilities can


@pytest.mark.parametrize("contain", [True, False], ids=["with-job-cgroups", "without-job-cgroups"])
def test_an_agent_starts_in_a_home_root_cannot_read_and_the_epilog_cleans_it(jobs, closed_home, no_contain,
                                                                               contain):
    conf = "/etc/slurm/slurm.conf" if contain else no_contain
    job = jobs.submit("alice", "sleep 600")
    jobs.wait_running(job, timeout=120)
    node = node_of(job)
    wait_agents("alice", job, 1)  # slurmd's own prolog ran with full root: replaced by ours below
    fleet = closed_home / ".dxflow" / "fleet"
    reg = fleet / f"dxlab.{job}.{node}.json"
    log = closed_home / ".dxflow" / "logs" / f"dxlab.{job}.{node}.log"

    squashed_hook("epilog", job, "alice", node, conf)
    wait_for(lambda: not agent_pids(job), 20, what="slurmd's agent stopped")
    assert not reg.exists() and not log.exists()

    squashed_hook("prolog", job, "alice", node, conf)
    agents = wait_agents("alice", job, 1, timeout=60)
    assert agents[0]["node"] == node
    out = dxflow("alice", "exec", job, "--", "sh", "-c", "id -un; pwd").stdout.split()
    assert out[0] == "alice"
    assert reg.exists() and log.exists()

    squashed_hook("epilog", job, "alice", node, conf)
    wait_for(lambda: not agent_pids(job), 20, what="the agent stopped by the epilog")
    assert not reg.exists(), "the epilog left the registration"
    assert not log.exists(), "the epilog left the agent's log (keep_agent_logs is false by default)"
    hooks = Path("/var/log/dxflow/hooks.log").read_text()
    assert f"job {job}: home" not in hooks  # the prolog never found the home unreachable


def test_a_site_that_keeps_agent_logs_keeps_them_and_agents_read_their_hooks_site_config(jobs, closed_home,
                                                                                        no_contain):
    """keep_agent_logs = true in the site config the hooks are given (DXFLOW_SITE_CONFIG): the epilog
    removes the registration and keeps the log; the agent was started with that same site config."""
    site = Path(no_contain).with_name("dxflow.toml")
    site.write_text("keep_agent_logs = true\n")
    site.chmod(0o644)
    job = jobs.submit("alice", "sleep 600")
    jobs.wait_running(job, timeout=120)
    node = node_of(job)
    wait_agents("alice", job, 1)
    conf = "/etc/slurm/slurm.conf"
    squashed_hook("epilog", job, "alice", node, conf)  # slurmd's agent, with the default settings
    wait_for(lambda: not agent_pids(job), 20, what="slurmd's agent stopped")
    squashed_hook("prolog", job, "alice", node, conf, DXFLOW_SITE_CONFIG=str(site))
    wait_agents("alice", job, 1, timeout=60)
    pid = agent_pids(job)[0]
    assert f"DXFLOW_SITE_CONFIG={site}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    reg = closed_home / ".dxflow" / "fleet" / f"dxlab.{job}.{node}.json"
    log = closed_home / ".dxflow" / "logs" / f"dxlab.{job}.{node}.log"
    assert reg.exists() and log.exists()
    squashed_hook("epilog", job, "alice", node, conf, DXFLOW_SITE_CONFIG=str(site))
    wait_for(lambda: not agent_pids(job), 20, what="the agent stopped by the epilog")
    assert not reg.exists() and log.exists()
    log.unlink()
