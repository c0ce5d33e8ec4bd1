"""``pbslab``: a second, small cluster beside the lab's Slurm one, for the federated site service.

There is no PBS server in Debian, so ``pbslab`` is the PBS stand-ins the contract tests use
(tests/lab/fakes: ``qstat`` prints OpenPBS's ``-f -F json`` from a job table, ``pbs_attach`` attaches
a command to a job the table runs on this host), installed as a PBS site installs PBS: ``PBS_EXEC``
with ``bin/qstat`` and ``bin/pbs_attach``, ``PBS_HOME`` with ``mom_priv/jobs``, and a ``pbs.conf``
that names the server ``pbslab`` (so job ids are ``N.pbslab`` and the agents' cluster is ``pbslab``).
Its compute hosts are the lab's nodes (their network and UTS namespaces). A job "runs" when
:func:`start_job` enters it in the job table, writes MoM's job files and runs the classic prologue
on each of its hosts as pbs_mom would (root, in the node, MoM's environment, a session of its own);
:func:`end_job` runs the epilogue and takes it out again. See docs/lab.md, "The site service".
"""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dxflow.lab.install import find_source_tree
from dxflow.lab.layout import Layout, Node
from dxflow.lab.runner import LabError

log = logging.getLogger(__name__)

NAME = "pbslab"
STAND_INS = ("qstat", "pbs_attach")
DXFLOW = "/usr/local/bin/dxflow"
HOOK_TIMEOUT = 30.0   # pbs_mom's $prologalarm default


@dataclass(frozen=True)
class PbsLab:
    """Where the stand-in PBS install lives (under the lab's state folder)."""

    layout: Layout

    @property
    def root(self) -> Path:
        """``PBS_EXEC``: ``bin/`` holds the stand-ins and their job table."""
        return self.layout.root / NAME

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def home(self) -> Path:
        """``PBS_HOME``."""
        return self.root / "pbs_home"

    @property
    def conf(self) -> Path:
        return self.root / "pbs.conf"

    @property
    def jobs_file(self) -> Path:
        return self.bin / "pbs-jobs.json"

    @property
    def env(self) -> dict[str, str]:
        """What every PBS command (and dxflow's PBS adapter) needs to find this install."""
        return {"PBS_CONF_FILE": str(self.conf)}

    def job_id(self, seq: int | str) -> str:
        return f"{seq}.{NAME}"


def up(pbs: PbsLab) -> None:
    """Install the stand-ins (idempotent; the job table is kept)."""
    # the checkout dxflow runs from (an editable install), else the one we are in (scripts/setup.sh
    # runs from the checkout it installed dxflow from, into the venv: not editable)
    tops = [top for top in (find_source_tree(), Path.cwd()) if top is not None]
    fakes = next((top / "tests" / "lab" / "fakes" for top in tops
                  if all((top / "tests" / "lab" / "fakes" / name).is_file() for name in STAND_INS)), None)
    if fakes is None:
        raise LabError("the PBS stand-ins (tests/lab/fakes) are not at hand: run `dxflow lab site up` from a "
                       "dxflow checkout")
    for folder in (pbs.root, pbs.bin, pbs.home, pbs.home / "aux", pbs.home / "mom_priv"):
        folder.mkdir(mode=0o755, parents=True, exist_ok=True)
        folder.chmod(0o755)
    jobs_dir = pbs.home / "mom_priv" / "jobs"
    jobs_dir.mkdir(mode=0o751, exist_ok=True)
    jobs_dir.chmod(0o751)  # as pbs_postinstall makes it: a job's user can stat its file, not list
    spool = pbs.home / "spool"
    spool.mkdir(exist_ok=True)
    spool.chmod(0o1777)
    for name in STAND_INS:
        shutil.copyfile(fakes / name, pbs.bin / name)
        (pbs.bin / name).chmod(0o755)
    # the stand-ins log every call and task here, whoever runs them (users, agents, the site service)
    for name in ("calls.log", "tasks.log"):
        (pbs.bin / name).touch()
        (pbs.bin / name).chmod(0o666)
    if not pbs.jobs_file.exists():
        _write_jobs(pbs, {})
    pbs.conf.write_text(f"PBS_EXEC={pbs.root}\nPBS_HOME={pbs.home}\nPBS_SERVER={NAME}\n")
    pbs.conf.chmod(0o644)
    # MoM's environment (setup_env reads it): what a prologue gets, besides PBS_JOBDIR
    (pbs.home / "pbs_environment").write_text(f"TZ=UTC\nPATH=/bin:/usr/bin\nPBS_CONF_FILE={pbs.conf}\n")


def jobs(pbs: PbsLab) -> dict[str, dict]:
    try:
        return json.loads(pbs.jobs_file.read_text())
    except (OSError, ValueError):
        return {}


def _write_jobs(pbs: PbsLab, table: dict[str, dict]) -> None:
    tmp = pbs.jobs_file.with_name(pbs.jobs_file.name + ".tmp")
    tmp.write_text(json.dumps(table, indent=1))
    tmp.chmod(0o644)
    os.replace(tmp, pbs.jobs_file)


def attrs(user: str, nodes: list[str], seq: str, state: str = "R") -> dict:
    """A running job as ``qstat -f -F json`` shows it."""
    home = pwd.getpwnam(user).pw_dir
    return {"Job_Name": "pbslab", "Job_Owner": f"{user}@dxlab-login", "job_state": state, "queue": "workq",
            "euser": user, "egroup": user, "exec_host": "+".join(f"{n}/0" for n in nodes),
            "Output_Path": f"dxlab-login:{home}/pbslab.o{seq}", "Error_Path": f"dxlab-login:{home}/pbslab.e{seq}",
            "Join_Path": "n", "Keep_Files": "n", "Variable_List": {"PBS_O_WORKDIR": home, "PBS_O_HOST": "dxlab-login"}}


def mom_env(pbs: PbsLab, user: str) -> dict[str, str]:
    """What pbs_mom hands a classic prologue: its pbs_environment plus PBS_JOBDIR (the user's home)."""
    return {"TZ": "UTC", "PATH": "/bin:/usr/bin", "PBS_CONF_FILE": str(pbs.conf),
            "PBS_JOBDIR": pwd.getpwnam(user).pw_dir}


def on_node(pbs: PbsLab, node: str, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """``argv`` as root on NODE (its network and UTS namespaces), as MoM's child: a session of its own."""
    index = int(node[1:]) if node[1:].isdigit() else 0
    n = Node(index, pbs.layout.prefix)
    uts = pbs.layout.uts_file(n.name)
    wrapper = ["nsenter", f"--net={n.netns_path}", *([f"--uts={uts}"] if uts.exists() else []), *argv]
    try:
        return subprocess.run(wrapper, env=env, cwd=str(pbs.home / "mom_priv"), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, start_new_session=True, timeout=HOOK_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"the PBS hook on {node} still ran after {HOOK_TIMEOUT:.0f} s", argv=wrapper) from e


def start_job(pbs: PbsLab, seq: int | str, user: str, nodes: list[str], site_config: str = "") -> str:
    """Job ``SEQ.pbslab`` of USER running on NODES: in the job table, MoM's job files, the prologue run on
    each host. Returns the job id; the agents come up in the background, as after a real prologue.
    ``site_config``: a dxflow.toml the hooks (and so the agents) read instead of /etc/dxflow/dxflow.toml
    (``DXFLOW_SITE_CONFIG``: bench/site.py's own site service)."""
    env = mom_env(pbs, user) | ({"DXFLOW_SITE_CONFIG": site_config} if site_config else {})
    job = pbs.job_id(seq)
    table = jobs(pbs)
    table[job] = attrs(user, nodes, str(seq))
    _write_jobs(pbs, table)
    (pbs.home / "aux" / job).write_text("".join(f"{n}\n" for n in nodes))
    jobs_dir = pbs.home / "mom_priv" / "jobs"
    (jobs_dir / f"{job}.JB").write_bytes(b"\0" * 64)
    (jobs_dir / f"{job}.JB").chmod(0o600)
    (jobs_dir / f"{job}.SC").write_text("#!/bin/sh\n")
    (jobs_dir / f"{job}.SC").chmod(0o700)
    for node in nodes:
        # OpenPBS runs the classic prologue on the primary host only; the lab's pbslab runs it on each
        # host, as the execjob_begin hook (pbs/dxflow_hook.py) does for sister hosts
        result = on_node(pbs, node, [DXFLOW, "hook", "prolog", "--scheduler", "pbs", "--", job, user, user], env)
        if result.returncode != 0:
            raise LabError(f"the PBS prologue of {job} on {node} failed", returncode=result.returncode,
                           stderr=result.stderr)
    log.info("pbslab job %s of %s runs on %s", job, user, ",".join(nodes))
    return job


def end_job(pbs: PbsLab, job: str) -> None:
    """The end of JOB: the epilogue on each host (the agents stop), then out of the job table."""
    table = jobs(pbs)
    info = table.get(job)
    if info is None:
        return
    user = info["euser"]
    hosts = [h.split("/")[0] for h in info["exec_host"].split("+") if h]
    for node in hosts:
        on_node(pbs, node, [DXFLOW, "hook", "epilog", "--scheduler", "pbs", "--", job, user, user, "pbslab",
                            "0", "ncpus=1", "cput=00:00:00", "workq", "null", "0"], mom_env(pbs, user))
    table = jobs(pbs)
    table.pop(job, None)
    _write_jobs(pbs, table)
    (pbs.home / "aux" / job).unlink(missing_ok=True)
    for suffix in (".SC", ".JB"):
        (pbs.home / "mom_priv" / "jobs" / f"{job}{suffix}").unlink(missing_ok=True)


def down(pbs: PbsLab) -> None:
    """End every job (their agents stop) and remove the install."""
    for job in list(jobs(pbs)):
        try:
            end_job(pbs, job)
        except LabError as e:
            log.warning("%s", e)
    shutil.rmtree(pbs.root, ignore_errors=True)
