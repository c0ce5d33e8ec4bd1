"""Slurm: hook environment of slurmd's Prolog/Epilog, jobs from ``squeue --json``.

22.05 ignores filters with ``--json`` and returns every job ("All other formatting
and filtering arguments will be ignored", squeue(1) 22.05), so the caller filters.
A job object (22.05, trimmed)::

    {"job_id": 12, "user_name": "alice", "job_state": "RUNNING", "nodes": "n[1-2]",
     "name": "wrap", "current_working_directory": "/home/alice",
     "standard_output": "/home/alice/slurm-%j.out", "standard_error": ""}

24.11 prints ``"job_state": ["RUNNING"]`` (a list of flags) — both shapes are read. What each
generation (22.05, 24.11, 26.05) really prints is kept in tests/fixtures/slurm/ and read by
tests/unit/test_slurm_generations.py; docs/admin-slurm.md §10 lists the differences.

Load on slurmctld (issue #11). The agent learns whether its job still runs on its node from
slurmstepd's sockets on that node (:attr:`Slurm.local_signs`), not from slurmctld. What is asked
of slurmctld is filtered there: one job (``squeue --jobs JOB``, which loads that job alone) or one
user's jobs (``squeue --user USER``, which loads only theirs), as plain text, which every
generation filters; the whole queue as JSON only for a caller that wants every job.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

from dxflow.errors import SchedulerError
from dxflow.schedulers import pyslurm_backend
from dxflow.jobcgroup import CGROUP_ROOT
from dxflow.schedulers.base import JobInfo, JobState, LocalSign, Scheduler, check_name, run
from dxflow.schedulers.hostlist import expand_hostlist

log = logging.getLogger(__name__)


class Slurm(Scheduler):
    name = "slurm"
    hook_env = {
        "job": ("SLURM_JOB_ID", "SLURM_JOBID"),
        "user": ("SLURM_JOB_USER",),
        "uid": ("SLURM_JOB_UID", "SLURM_UID"),
        "gid": ("SLURM_JOB_GID",),
        "node": ("SLURMD_NODENAME",),
        "cluster": ("SLURM_CLUSTER_NAME",),
        "work_dir": ("SLURM_JOB_WORK_DIR",),
        "stdout": ("SLURM_JOB_STDOUT",),
        "stderr": ("SLURM_JOB_STDERR",),
        # SLURM_JOB_NODELIST reaches the prolog only from 23.02.6; 22.05 sets SLURM_NODELIST.
        "nodes": ("SLURM_JOB_NODELIST", "SLURM_NODELIST"),
    }
    state_map = {
        "PENDING": JobState.PENDING, "CONFIGURING": JobState.PENDING, "REQUEUED": JobState.PENDING,
        "REQUEUE_HOLD": JobState.PENDING, "REQUEUE_FED": JobState.PENDING, "RESV_DEL_HOLD": JobState.PENDING,
        "RUNNING": JobState.RUNNING, "SUSPENDED": JobState.RUNNING, "STOPPED": JobState.RUNNING,
        "SIGNALING": JobState.RUNNING, "RESIZING": JobState.RUNNING, "STAGE_OUT": JobState.RUNNING,
        "COMPLETING": JobState.ENDING,
        "COMPLETED": JobState.ENDED, "CANCELLED": JobState.ENDED, "FAILED": JobState.ENDED,
        "TIMEOUT": JobState.ENDED, "NODE_FAIL": JobState.ENDED, "PREEMPTED": JobState.ENDED,
        "BOOT_FAIL": JobState.ENDED, "DEADLINE": JobState.ENDED, "OUT_OF_MEMORY": JobState.ENDED,
        "SPECIAL_EXIT": JobState.ENDED, "REVOKED": JobState.ENDED,
    }
    # SLURM_CONF: where the node's commands read slurm.conf. The GPU variables: the job's GPUs on this
    # node, set by slurmd in the prolog's environment when the job has GRES gpu (prolog_epilog.html,
    # "environment variables"); the agent's sampler ties GPUs to the job with them (dxflow.metrics.gpus).
    passthrough_env = ("SLURM_CONF", "SLURM_JOB_GPUS", "CUDA_VISIBLE_DEVICES", "GPU_DEVICE_ORDINAL")
    squeue = ("squeue", "--json")
    commands = ("squeue", "sinfo")

    # How a process joins the job on a node (issue #9). With PrologFlags=Contain, slurmd starts the
    # job's "extern" step on every node right after the prolog (_rpc_prolog, then _spawn_prolog_stepd,
    # src/slurmd/slurmd/req.c 22.05); pam_slurm_adopt puts SSH sessions into that step's cgroups.
    # The prolog's launcher does the same for the agent, so what it runs counts against the job.
    # v1: "<CgroupPrepend>/uid_%u/job_%u/step_%s" (xcgroup_create_hierarchy, src/plugins/cgroup/v1/
    # xcgroup.c), CgroupPrepend "/slurm", or "/slurm_%n" in a build for several slurmd per host such
    # as Debian's (src/common/cgroup.c; 22.05 and 24.11). Freezer first: proctrack/cgroup puts the
    # extern step's sleep there after task/cgroup made the others (_spawn_job_container, slurmstepd/mgr.c).
    job_cgroup_v1 = tuple(
        tuple(f"{controller}/{prepend}/uid_{{uid}}/job_{{job}}/step_extern"
              for controller in ("freezer", "cpuset", "memory", "devices", "cpuacct"))
        for prepend in ("slurm", "slurm_{node}"))
    # v2: "<scope>/job_%u/step_%s/user"; the scope is system.slice/slurmstepd.scope (%n_slurmstepd.scope
    # for several slurmd) under the mount (22.05) or under init's parent cgroup (24.11) (_set_int_cg_ns,
    # src/plugins/cgroup/v2/cgroup_v2.c). Not seen running: the lab host is v1.
    job_cgroup_v2 = tuple((f"{init}system.slice/{scope}.scope/job_{{job}}/step_extern/user",)
                          for init in ("", "{init}/") for scope in ("slurmstepd", "{node}_slurmstepd"))
    #: Seconds the launcher waits for the extern step (it normally appears within tens of milliseconds).
    extern_step_wait = 10.0

    def expand_nodes(self, text: str) -> list[str]:
        return expand_hostlist(text) if text else []

    # -- output files: sbatch(1) "filename pattern", expanded by expand_stdio_fields (_is_wildcard,
    # _expand_wildcard, src/common/print_fields.c) for a batch job: %A the array's id (the job's own
    # when not an array), %a the array index, %J and %j the job id, %N the batch host, %n and %t "0"
    # (the batch script is node 0, task 0), %u the user, %x the job name, %% a "%". %b (index modulo 10)
    # and %s (the step) are left as they are. "%4j" zero-pads a number (to 10 digits at most); any "\"
    # in the path turns expansion off.
    output_patterns = {
        "%A": ("array_job", "job"), "%a": ("array_task",), "%J": ("job",), "%j": ("job",),
        "%N": ("node",), "%n": ("=0",), "%t": ("=0",), "%u": ("user",), "%x": ("name",), "%%": ("=%",),
    }
    output_pattern_width = True
    output_pattern_literal = "\\"
    #: "slurm-%j.out" for a batch job without --output, "slurm-%A_%a.out" for an array's (sbatch(1),
    #: --output); squeue's standard_output is then empty (22.05), and the agent's prolog value too.
    default_output = "slurm-%j.out"
    default_array_output = "slurm-%A_%a.out"
    #: what %a becomes in a job that is not an array: NO_VAL (0xfffffffe), "notarr-4-4294967294.out" as
    #: written by 22.05, 24.11 and 26.05 alike (tests/fixtures/slurm/*/files.txt)
    no_array_task = "4294967294"

    def cgroup_setup(self) -> tuple[Path, float]:
        """CgroupMountpoint from the cgroup.conf beside slurmd's slurm.conf (slurmd gives its path to
        the prolog as SLURM_CONF); a wait only when slurm.conf has PrologFlags=Contain and a cgroup
        proctrack, the settings under which slurmd makes the extern step's cgroups."""
        conf = Path(self.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf")
        slurm_conf = read_conf(conf)
        cgroup_conf = read_conf(conf.with_name("cgroup.conf"))
        mount = Path(cgroup_conf.get("cgroupmountpoint", str(CGROUP_ROOT)).rstrip("/") or "/")
        flags = {f.strip().lower() for f in slurm_conf.get("prologflags", "").split(",")}
        contained = "contain" in flags and slurm_conf.get("proctracktype", "").lower() == "proctrack/cgroup"
        return mount, self.extern_step_wait if contained else 0.0

    def jobs(self, user: str | None = None) -> list[JobInfo]:
        if user is not None:  # slurmctld loads this user's jobs only (pyslurm would load every job)
            return self._plain([*self.squeue_user, check_name("user", user)])
        if pyslurm_backend.status(self.environ).usable:
            try:
                items = pyslurm_backend.load_jobs()
            except Exception as e:  # noqa: BLE001 - pyslurm raises its own RPCError; squeue still answers
                log.warning("pyslurm could not list jobs (%s: %s): asking squeue", type(e).__name__, e)
            else:
                return [i for i in map(self._info, items) if user is None or i.user == user]
        argv = list(self.squeue) + (["--user", user] if user else [])
        infos = self._infos(job_items(run(argv)))
        return [i for i in infos if user is None or i.user == user]

    def job(self, job_id: str) -> JobInfo | None:
        """One job with its name, work dir and output paths (the agent asks once, for its logs):
        ``squeue --json --jobs JOB``, filtered by slurmctld where ``--json`` honours filters; 22.05
        lists every job, filtered here. Not for polling: :meth:`job_state` is."""
        check_name("job id", job_id)
        items = job_items(run([*self.squeue, "--jobs", job_id]))
        return next((i for i in self._infos(items) if i.job == job_id), None)

    def job_state(self, job_id: str) -> JobState:
        """The job's state from slurmctld, asked for that one job (the agent's fallback when no look
        at its node can tell): ENDED once slurmctld no longer lists it."""
        found = self._plain([*self.squeue_one, check_name("job id", job_id)])
        info = next((i for i in found if i.job == job_id), None)
        return info.state if info else JobState.ENDED

    def backend(self) -> str:
        return "pyslurm" if pyslurm_backend.status(self.environ).usable else " ".join(self.squeue)

    def backend_why(self) -> str:
        st = pyslurm_backend.status(self.environ)
        why = st.reason if st.usable else f"{st.reason}; Slurm's own JSON output instead"
        note = generation_note(st.slurm_version or pyslurm_backend.slurm_version(self.environ))
        return f"{why}; {note}" if note else why

    def _infos(self, items: list[dict[str, Any]]) -> list[JobInfo]:
        """:meth:`_info` of each; a heterogeneous job's later components get the output paths of its
        first (the one batch script's), which 24.11 prints already expanded with each component's own
        id ("het-10.out" where slurmstepd writes "het-9.out")."""
        infos = [self._info(item) for item in items]
        by_id = {i.job: i for i in infos}
        for item, info in zip(items, infos):
            leader = by_id.get(str(_number(item.get("het_job_id")) or ""))
            if leader is not None and leader is not info:
                info.stdout, info.stderr = leader.stdout, leader.stderr
        return infos

    def _info(self, item: dict[str, Any]) -> JobInfo:
        state = item.get("job_state", "")
        if isinstance(state, list):  # 23.02+: a list of flags, the base state first
            native = next((s for s in state if s in self.state_map), state[0] if state else "")
        else:
            native = str(state)
        job = str(item.get("job_id", ""))
        nodes = item.get("nodes") or ""
        array = _number(item.get("array_job_id"))  # 0 (22.05) or {"set": false, …} (23.02+): not an array
        task = _number(item.get("array_task_id")) if array else None
        # A heterogeneous job's batch script runs in its first component only, named by the leader's id:
        # "-o %x-%j.out" is het-9.out for components 9 and 10 alike (seen on 22.05, 24.11 and 26.05).
        het = _number(item.get("het_job_id")) if _number(item.get("het_job_offset")) else None
        first = expand_hostlist(nodes)[0] if isinstance(nodes, str) and nodes else ""
        fields = {"job": str(het) if het else job, "user": str(item.get("user_name", "")),
                  "name": str(item.get("name", "")), "node": str(item.get("batch_host") or first),
                  "array_job": str(array) if array else "", "array_task": self.no_array_task if task is None
                  else str(task)}
        stdout = str(item.get("standard_output", "") or "")
        stderr = str(item.get("standard_error", "") or "")
        if not stdout and item.get("batch_flag", True):
            stdout = self.default_array_output if array else self.default_output
        work_dir = str(item.get("current_working_directory", ""))
        # A relative path stays relative (the agent puts it under work_dir): 22.05 and 26.05 print
        # "slurm-%j.out" as given, 24.11 prints it joined. Without --error, stderr goes to the --output
        # file (sbatch(1)); 24.11 says so itself.
        stdout = self.expand_output(stdout, fields)
        stderr = self.expand_output(stderr, fields) or stdout
        return JobInfo(
            job=job, user=str(item.get("user_name", "")), state=self.map_state(native),
            nodes=self.expand_nodes(nodes) if isinstance(nodes, str) else list(nodes),
            name=str(item.get("name", "")), work_dir=work_dir, stdout=stdout, stderr=stderr,
        )

    # -- filtered queries as plain text (issue #11) ----------------------------------------------------
    # squeue asks slurmctld for one job when given one id (slurm_load_job) and for one user's jobs when
    # given one user (slurm_load_job_user) instead of every job (_print_job, src/squeue/squeue.c).
    # Sample line: "161|alice|RUNNING|n[1-2]"; %A is the job's own id (an array element's too), %T its
    # state in full, %N its nodes (empty while pending). "|" is in none of them. No line: not listed
    # (ended); squeue exits 1 with "Invalid job id specified" for an id slurmctld forgot.
    #: one job's state and nodes
    squeue_one = ("squeue", "--noheader", "--format=%A|%u|%T|%N", "--jobs")
    #: one user's jobs' states and nodes
    squeue_user = ("squeue", "--noheader", "--format=%A|%u|%T|%N", "--user")
    #: what squeue says for a job slurmctld no longer knows
    unknown_job = "Invalid job id specified"

    def _plain(self, argv: list[str]) -> list[JobInfo]:
        try:
            out = run(argv)
        except SchedulerError as e:
            if self.unknown_job in f"{e.stderr}\n{e.stdout}":
                return []
            raise
        infos = []
        for line in out.splitlines():
            parts = line.strip().split("|")
            if len(parts) != 4 or not parts[0]:
                continue
            job, user, state, nodes = parts
            infos.append(JobInfo(job=job, user=user, state=self.map_state(state),
                                 nodes=self.expand_nodes(nodes) if nodes else []))
        return infos

    # -- is the job still running on this node, asked without slurmctld (issue #11) --------------------
    # slurmstepd listens on "<SlurmdSpoolDir>/<node>_<job>.<step>" while the step runs on the node
    # ("%s/%s_%u.%u", _step_connect in src/common/stepd_api.c; 23.02+ appends ".<component>" for a
    # heterogeneous job's component). stepd_available() in the same file lists them for `scontrol
    # listpids` and `scontrol pidinfo`, which ask the local slurmstepd and never slurmctld. The socket
    # is mode 0777 in a 0755 folder: the job's user sees it (seen on the lab, 22.05). Step ids: slurm.h.
    local_signs = (
        LocalSign("{spool}/{node}_{job}.4294967292", lasting=True,
                  source="extern step (SLURM_EXTERN_CONT, 0xfffffffc): with PrologFlags=Contain slurmd "
                         "starts it on every node of the job after the prolog and ends it with the job"),
        LocalSign("{spool}/{node}_{job}.4294967291", lasting=True,
                  source="batch step (SLURM_BATCH_SCRIPT, 0xfffffffb) on the batch host: the job ends "
                         "when its batch script does"),
        LocalSign("{spool}/{node}_{job}.4294967290", lasting=True,
                  source="interactive step (SLURM_INTERACTIVE_STEP, 0xfffffffa; LaunchParameters="
                         "use_interactive_step): salloc's shell, whose end ends the allocation"),
        LocalSign("{spool}/{node}_{job}.*", lasting=False,
                  source="any other step (srun), while it runs on this node"),
    )
    #: SlurmdSpoolDir when slurm.conf does not set it (slurm.conf(5))
    default_spool = "/var/spool/slurmd"

    def local_sign_fields(self, node: str, job_id: str = "") -> dict[str, str] | None:
        """``{spool}``: SlurmdSpoolDir of the slurm.conf slurmd gave the prolog (SLURM_CONF), with
        ``%n`` (node name) and ``%h`` (host name) expanded as slurmd does (slurm.conf(5)). Read once:
        slurm.conf may live on a shared file system, and the agent looks every few seconds."""
        spools: dict[str, str] = self.__dict__.setdefault("_spools", {})
        if node not in spools:
            conf = read_conf(Path(self.environ.get("SLURM_CONF") or "/etc/slurm/slurm.conf"))
            spool = conf.get("slurmdspooldir") or self.default_spool
            host = socket.gethostname().split(".")[0]
            spools[node] = spool.replace("%n", node).replace("%h", host)
        return {"spool": spools[node]}


# -- the Slurm generations dxflow reads (issue #12) ----------------------------------------------------
#: Generations whose squeue/scontrol/sinfo JSON and prolog/epilog environments were captured from a
#: running Slurm and are read by the tests (tests/fixtures/slurm/<generation>/, made by dxflow.lab.capture).
TESTED_GENERATIONS = ("22.05", "24.11", "26.05")


def release(data: dict[str, Any]) -> str:
    """The Slurm release that printed a JSON document: ``meta.Slurm.release`` (22.05) or
    ``meta.slurm.release`` (23.02+, its version numbers turned to strings); '' when absent."""
    meta = data.get("meta") if isinstance(data, dict) else None
    slurm = (meta.get("slurm") or meta.get("Slurm")) if isinstance(meta, dict) else None
    return str(slurm.get("release") or "") if isinstance(slurm, dict) else ""


def generation_note(version: str) -> str:
    """What ``dxflow doctor`` says of Slurm ``version`` ("24.11.5"): '' for a tested generation, a warning
    for one outside them; '' when the version is unknown (nothing to say)."""
    mm = pyslurm_backend.major_minor(version)
    if mm is None:
        return ""
    tested = [pyslurm_backend.major_minor(g) for g in TESTED_GENERATIONS]
    if mm in tested:
        return f"Slurm {version}: a tested generation"
    known = ", ".join(TESTED_GENERATIONS)
    known_mm = [t for t in tested if t]
    if mm < min(known_mm):
        return (f"Slurm {version} is older than any generation dxflow is tested with ({known}): "
                "squeue --json may lack what dxflow reads")
    if mm > max(known_mm):
        return (f"Slurm {version} is newer than any generation dxflow is tested with ({known}): its "
                "squeue --json is read as the newest one's; report what `dxflow jobs` gets wrong")
    return (f"Slurm {version} lies between the generations dxflow is tested with ({known}): its "
            "squeue --json is read as theirs")


def job_items(text: str) -> list[dict[str, Any]]:
    """The jobs of ``squeue --json``'s output, or SchedulerError naming the Slurm that printed a document
    of another shape (rather than jobs read wrong)."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise SchedulerError(f"squeue --json printed something that is not JSON: {e}") from e
    items = data.get("jobs") if isinstance(data, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) and "job_id" in i for i in items):
        which = release(data) or "of unknown version"
        raise SchedulerError(f"squeue --json of Slurm {which} has no list of jobs with a job_id: a shape "
                             f"dxflow does not know (tested: {', '.join(TESTED_GENERATIONS)}); "
                             "`dxflow doctor` says which Slurm this host runs")
    return items


def read_conf(path: Path) -> dict[str, str]:
    """``Key=Value`` settings of a slurm.conf-style file, keys lower-cased (Slurm ignores their case);
    ``{}`` when it cannot be read. Node and partition lines are skipped; Include is not followed."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        key, sep, value = line.partition("=")
        if sep and key.strip().lower() not in ("nodename", "partitionname", "nodeset", "frontendname"):
            out[key.strip().lower()] = value.strip().split()[0] if value.strip() else ""
    return out


def _number(value: Any) -> int | None:
    """A number of squeue's JSON: a plain one (22.05) or ``{"set": true, "number": N}`` (23.02+)."""
    if isinstance(value, dict):
        value = value.get("number") if value.get("set", True) else None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None
