"""Fixtures for integration tests on the lab cluster.

Everything here talks to the real thing: sbatch/squeue/scancel as the lab users,
the installed ``dxflow`` (/usr/local/bin/dxflow), sshd and slurmd in the node
namespaces. Tests in this folder are marked ``lab`` automatically, and each needs
the lab up (:func:`pytest_runtest_setup`): otherwise they are skipped with one reason,
or fail with it under scripts/test.sh.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import queue
import re
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from dxflow.lab import mounts
from dxflow.lab.layout import Layout

DXFLOW = "/usr/local/bin/dxflow"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
NODES = ("n1", "n2")
NETNS = "dxlab-{node}"
#: the lab's state file to look for instead of the one ``dxflow lab up`` writes (to try the probe)
LAB_STATE_ENV = "DXFLOW_LAB_STATE"
#: "1" (scripts/test.sh): a lab that is not up fails the lab tests instead of skipping them
REQUIRE_LAB_ENV = "DXFLOW_REQUIRE_LAB"


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.lab)


def run(argv: Sequence[str], *, timeout: float = 60, check: bool = True, input: str | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {proc.returncode}\nstdout: {proc.stdout}\n"
                             f"stderr: {proc.stderr}")
    return proc


def uid(user: str) -> int:
    """The lab user's uid as this machine numbers it (``dxflow lab up`` takes the first free ones)."""
    return pwd.getpwnam(user).pw_uid


def gid(user: str) -> int:
    return pwd.getpwnam(user).pw_gid


def as_user(user: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
    """Run argv as ``user`` in a login shell on the login node (the host namespace)."""
    return run(["runuser", "-l", user, "-c", shlex.join(argv)], **kw)


def node_nsenter(node: str) -> list[str]:
    """``nsenter`` into a compute node: its network namespace and, when the node has one, its mount
    namespace (its own /tmp and /local; dxflow.lab.mounts)."""
    own = [f"--mount={mounts.ns_file(Layout(), node)}"] if mounts.has_namespace(Layout(), node) else []
    return ["nsenter", f"--net=/var/run/netns/{NETNS.format(node=node)}", *own]


def on_node(node: str, user: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
    """Run argv as ``user`` inside a compute node's namespaces (as if logged in there)."""
    return run([*node_nsenter(node), "runuser", "-l", user, "-c", shlex.join(argv)], **kw)


def dxflow(user: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return as_user(user, [DXFLOW, *args], **kw)


def dxflow_json(user: str, *args: str, **kw):
    return json.loads(dxflow(user, *args, "--json", **kw).stdout)


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def job_state(job: str) -> str:
    out = run(["squeue", "-h", "-j", job, "-o", "%T"], check=False).stdout.strip()
    return out or "GONE"


class Jobs:
    """Submits jobs as a user and cancels whatever is left at the end of the test."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def submit(self, user: str, script: str, *sbatch_args: str, nodes: int = 1) -> str:
        """A job of ``nodes`` nodes; one of several runs on n1..nN unless the test names its nodes: tests
        name a 2-node job's nodes n1 and n2, and on a lab of four Slurm may pick any two."""
        home = Path(os.path.expanduser(f"~{user}"))
        named = any(a.startswith(("--nodelist", "-w")) for a in sbatch_args)
        pin = [f"--nodelist=n[1-{nodes}]"] if nodes > 1 and not named else []
        argv = ["sbatch", "--parsable", f"--nodes={nodes}", "--ntasks-per-node=1", f"--chdir={home}", *pin,
                *sbatch_args, f"--wrap={script}"]
        job = as_user(user, argv).stdout.strip().split(";")[0]
        self.ids.append(job)
        return job

    def wait_running(self, job: str, timeout: float = 30) -> None:
        wait_for(lambda: job_state(job) == "RUNNING", timeout, what=f"job {job} running")

    def cancel_all(self) -> None:
        for job in self.ids:
            run(["scancel", job], check=False)


def lab_status() -> tuple[str, dict]:
    """Why the lab tier cannot run here ("" when it can), and ``dxflow lab status``'s answer.

    The first look is at the state file ``dxflow lab up`` writes (``DXFLOW_LAB_STATE`` names
    another one, to try this probe without taking the lab down)."""
    state_file = Path(os.environ.get(LAB_STATE_ENV) or Layout().state_file)
    if not state_file.exists():
        return f"the lab is not up (no {state_file}): run `dxflow lab up` as root", {}
    if os.geteuid() != 0:
        return "lab tests run as root (they act as the lab users through runuser)", {}
    status = run([DXFLOW, "lab", "status", "--json"], check=False)
    try:
        info = json.loads(status.stdout)
    except ValueError:
        return f"`dxflow lab status` failed ({status.returncode}): {status.stderr.strip()[-300:]}", {}
    if info.get("state") != "up":
        return f"the lab is {info.get('state')}, not up: see `dxflow lab status`; run `dxflow lab up`", info
    return "", info


@functools.cache
def the_lab() -> tuple[str, dict]:
    """:func:`lab_status`, looked at once per run."""
    return lab_status()


def pytest_runtest_setup(item) -> None:
    """Every lab test needs the lab: without it, each is skipped with the one reason (one line in the
    summary), or fails with it when the run requires the lab (``DXFLOW_REQUIRE_LAB=1``, scripts/test.sh)."""
    why, _ = the_lab()
    if why:
        if os.environ.get(REQUIRE_LAB_ENV) == "1":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)


@pytest.fixture(scope="session")
def lab() -> dict:
    """``dxflow lab status --json`` of the lab, which is up (:func:`pytest_runtest_setup` saw to that)."""
    return the_lab()[1]


@pytest.fixture
def jobs(lab) -> Iterator[Jobs]:
    j = Jobs()
    yield j
    j.cancel_all()


def agents_of(user: str, job: str) -> list[dict]:
    return [a for a in dxflow_json(user, "ls") if a["job"] == job]


def wait_agents(user: str, job: str, count: int, state: str = "ready", timeout: float = 30) -> list[dict]:
    def ready():
        agents = agents_of(user, job)
        return agents if len(agents) == count and all(a["state"] == state for a in agents) else None
    return wait_for(ready, timeout, interval=0.5, what=f"{count} {state} agent(s) of job {job}")


def agent_pids(job: str) -> list[int]:
    """Pids of processes whose command line names this job's agent (any node)."""
    out = run(["pgrep", "-f", f"dxflow.agent .*--job {job} --node "], check=False).stdout
    return [int(x) for x in out.split()]


class Lines:
    """A process's stdout lines, read in a thread, for waiting on with a timeout."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.q.put(line)
        self.q.put(None)

    def wait_for(self, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        seen = []
        while time.monotonic() < deadline:
            try:
                line = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if re.search(pattern, line):
                return line
        raise AssertionError(f"no line matching {pattern!r} within {timeout} s; got {seen[-10:]!r}")


def popen_as(user: str, argv: list[str]) -> subprocess.Popen:
    """A long-running command as ``user`` in its own process group (stopped with stop())."""
    return subprocess.Popen(["runuser", "-l", user, "-c", shlex.join(argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, driven by Playwright (one per test module)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:  # fail, never skip: the browser tests are part of the lab suite
        pytest.fail("the playwright package is missing: /opt/dxflow/venv/bin/pip install playwright "
                    "(never `playwright install`: the tests drive Debian's chromium)")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()
