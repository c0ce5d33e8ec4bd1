"""``dxflow top`` on the lab (issue #15 item 6), on a four-node job of alice's that burns one core on its
batch node (a shell loop whose command line carries ``dxtop-burn``) and sleeps on the others:

- ``--once`` lists all four nodes, the whole job's row (its node set folded) and the burning process
  on the node where it runs, with its CPU; ``--json`` gives one record per node;
- the live view in a terminal (a real pty) draws frames, re-sorts on a key, and ends on ``q`` and on
  Ctrl-C with the terminal's modes given back exactly and the alternate screen left;
- the console's job page shows the same rows, refreshing;
- bob sees none of it: not through his master, not from alice's agents' ``/api/top``;
- last (it stops an agent): a node whose agent hangs shows as lost and does not hold up the frame.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import pwd
import re
import select
import signal
import struct
import termios
import time
from pathlib import Path

import pytest

from conftest import (DXFLOW, Jobs, agent_pids, as_user, dxflow, on_node, run, wait_agents, wait_for)

from dxflow.schedulers.hostlist import fold

NOT_FOUND = 5
QUEUED = 600
MARK = "dxtop-burn"
#: the first line of every frame
HEAD = "dxflow top · job".encode()
JOB_SCRIPT = (f"srun sleep 600 & timeout 600 sh -c 'while :; do :; done' {MARK}; wait")


@pytest.fixture(scope="module")
def job(lab):
    jobs = Jobs()
    for user in ("alice", "bob"):  # a master started before /api/top existed is stopped (the next command starts it)
        probe = as_user(user, ["curl", "-sS", "--max-time", "20", "--unix-socket", master_socket(user),
                               "http://master/api/top/999999999"], check=False)
        if "no agent of job" not in probe.stdout:
            dxflow(user, "master", "stop", check=False)
    try:
        job_id = jobs.submit("alice", JOB_SCRIPT, nodes=4)
        jobs.wait_running(job_id, timeout=QUEUED)
        agents = wait_agents("alice", job_id, 4, timeout=90)
        nodes = sorted(a["node"] for a in agents)
        batch = re.search(r"BatchHost=(\S+)", run(["scontrol", "show", "job", job_id]).stdout).group(1)
        wait_for(lambda: burning(job_id, batch), 60, interval=1, what=f"{MARK} busy on {batch}")
        yield {"id": job_id, "nodes": nodes, "batch": batch}
    finally:
        jobs.cancel_all()


def master_socket(user: str) -> str:
    home = Path(os.path.expanduser(f"~{user}"))
    socks = sorted(home.glob(".dxflow/hosts/*/master.sock"))
    return str(socks[0]) if socks else str(home / ".dxflow" / "no-master.sock")


def records(job_id: str, *args: str) -> dict[str, dict]:
    out = dxflow("alice", "top", job_id, "--json", *args, timeout=60)
    return {r["node"]: r for r in map(json.loads, out.stdout.splitlines())}


def burning(job_id: str, node: str) -> bool:
    rows = records(job_id).get(node, {}).get("processes", [])
    return any(MARK in p["command"] and p["cpu_percent"] > 10 for p in rows)


def test_once_lists_every_node_the_total_and_the_burning_process(job):
    out = dxflow("alice", "top", job["id"], "--once", "-n", "5", timeout=60)
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"dxflow top · job {job['id']} · 4 nodes"), out.stdout
    heads = [i for i, line in enumerate(lines) if re.match(r"NODE +STATE +CPU%", line)]
    assert heads, out.stdout
    table = lines[heads[0]:]
    for node in job["nodes"]:
        assert any(re.match(rf"{node}\s+ready\s+[\d.]+\s+[\d.]+/\d+", line) for line in table), (node, out.stdout)
    assert any(line.startswith(fold(job["nodes"])) and "4/4 up" in line for line in table), out.stdout
    burner = [line for line in table if line.startswith(job["batch"] + " ") and MARK in line]
    assert burner, out.stdout
    cpu = float(burner[0].split()[3])  # NODE PID USER CPU% ...
    assert cpu > 10, burner  # a core busy (other tests share the lab's cores: not necessarily all of it)
    assert "\x1b" not in out.stdout  # no terminal control for scripts


def test_json_has_one_record_per_node(job):
    recs = records(job["id"])
    assert sorted(recs) == job["nodes"]
    for node, r in recs.items():
        assert r["state"] == "ready" and r["job"] == job["id"] and r["cores"] >= 1, r
        assert r["memory_limit_bytes"] is None or r["memory_bytes"] <= r["memory_limit_bytes"]
        assert all(p["user"] == "alice" for p in r["processes"]), r["processes"]
    busy = recs[job["batch"]]
    # the lab's Slurm makes no cpuacct cgroup: the job's processes' sum, as `dxflow metrics` counts it
    assert busy["cpu_cores"] > 0.1 and busy["cpu_source"] in ("cgroup", "processes"), busy
    assert any(MARK in p["command"] for p in busy["processes"])
    # the other nodes run only the step's `sleep`: nothing of the burner there
    for node in set(job["nodes"]) - {job["batch"]}:
        assert not any(MARK in p["command"] for p in recs[node]["processes"]), recs[node]
    by_memory = records(job["id"], "--sort", "memory", "-n", "50")[job["batch"]]["processes"]
    sizes = [p["memory_bytes"] for p in by_memory]
    assert sizes == sorted(sizes, reverse=True)


# -- the live view in a real terminal ----------------------------------------------------------------------

def read_until(fd: int, pattern: str, timeout: float, seen: bytearray) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern.encode(), bytes(seen)):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {pattern!r} on the terminal within {timeout:.0f} s: {bytes(seen)[-2000:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                seen += os.read(fd, 65536)
            except OSError:  # the other side closed
                raise AssertionError(f"the view ended before {pattern!r}: {bytes(seen)[-2000:]!r}")


def live_top(job_id: str) -> tuple[int, int, list]:
    """``dxflow top JOB`` as alice on a fresh pty of 50x160 (its controlling terminal, as in a login
    session): (pid, the pty's master side, the pty's modes before)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 160, 0, 0))
    modes = termios.tcgetattr(slave)
    pw = pwd.getpwnam("alice")
    env = {"HOME": pw.pw_dir, "USER": "alice", "LOGNAME": "alice", "SHELL": pw.pw_shell, "TERM": "xterm",
           "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    pid = os.fork()
    if pid == 0:  # the child: alice with the pty as her controlling terminal, dxflow alone in the foreground
        try:  # (no runuser in between: Ctrl-C would end it too, and it would say so on the terminal)
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            for fd in (0, 1, 2):
                os.dup2(slave, fd)
            os.initgroups("alice", pw.pw_gid)
            os.setgid(pw.pw_gid)
            os.setuid(pw.pw_uid)
            os.chdir(pw.pw_dir)
            os.execve(DXFLOW, [DXFLOW, "top", job_id], env)
        finally:
            os._exit(127)
    os.close(slave)
    return pid, master, modes


def finish(pid: int, master: int, timeout: float) -> tuple[int, bytes]:
    """Wait for the view to end, draining its terminal: (exit code, what it wrote last)."""
    deadline = time.monotonic() + timeout
    tail = bytearray()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            try:
                while select.select([master], [], [], 0.2)[0]:
                    tail += os.read(master, 65536)
            except OSError:
                pass
            return os.waitstatus_to_exitcode(status), bytes(tail)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"the view did not end within {timeout:.0f} s: {bytes(tail)[-2000:]!r}")
        if select.select([master], [], [], 0.2)[0]:
            try:
                tail += os.read(master, 65536)
            except OSError:
                pass


@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_live_view_draws_frames_sorts_and_quits_restoring_the_terminal(job, key):
    pid, master, modes = live_top(job["id"])
    try:
        seen = bytearray()
        read_until(master, r"\x1b\[\?1049h", 30, seen)  # the alternate screen
        read_until(master, rf"{re.escape(job['batch'])} +\S*ready", 60, seen)
        frames = bytes(seen).count(HEAD)
        read_until(master, rf"(?s)({re.escape(HEAD.decode())}.*){{{frames + 1}}}", 30, seen)  # a new frame, unasked
        before = len(seen)
        os.write(master, b"n")  # sort by node: the frame says so at once
        read_until(master, r"sort: node", 30, seen)
        assert len(seen) > before
        # while it runs the terminal is in cbreak mode: no echo, keys one at a time
        live = termios.tcgetattr(master)
        assert not live[3] & termios.ECHO and not live[3] & termios.ICANON
        os.write(master, key)
        code, tail = finish(pid, master, 30)
        assert code == 0, (code, tail[-500:])
        out = bytes(seen) + tail
        assert out.rstrip().endswith(b"\x1b[?25h\x1b[?1049l"), out[-200:]  # cursor shown, main screen back
        assert termios.tcgetattr(master) == modes  # the pty's modes exactly as they were (master and slave share them)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(master)


# -- the console -------------------------------------------------------------------------------------------

def test_console_job_page_shows_the_rows(job, browser):
    link = json.loads(dxflow("alice", "console", "--json").stdout)
    context = browser.new_context(viewport={"width": 1400, "height": 1200})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(link["url"])
        page.wait_for_url(re.compile(r"/console/"))
        page.locator(f'section.job[data-job="{job["id"]}"] a.job-link').click()  # from the fleet
        page.wait_for_url(re.compile(rf"#/job/{job['id']}$"))
        for node in job["nodes"]:
            page.locator(f'.job-top tr[data-node="{node}"] .badge-ready').wait_for(timeout=20_000)
        page.locator(f'.job-processes tr[data-node="{job["batch"]}"] code:has-text("{MARK}")').wait_for(timeout=20_000)
        total = page.locator(".job-top .top-total").inner_text()
        assert fold(job["nodes"]) in total and "4/4 up" in total, total
        stamp = page.locator(".page-head .muted span").inner_text()
        wait_for(lambda: page.locator(".page-head .muted span").inner_text() != stamp, 20, what="a refresh")
        page.get_by_role("button", name="Node").click()
        names = page.locator(".job-top tbody tr[data-node]").evaluate_all("rows => rows.map(r => r.dataset.node)")
        assert names == job["nodes"], names
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the console: {errors}"


# -- bob ---------------------------------------------------------------------------------------------------

def test_bob_sees_nothing_of_alices_job(job):
    out = dxflow("bob", "top", job["id"], "--once", check=False, timeout=60)
    assert out.returncode == NOT_FOUND and MARK not in out.stdout + out.stderr, (out.stdout, out.stderr)
    denied = as_user("bob", ["curl", "-sS", "--max-time", "20", "--unix-socket", master_socket("alice"),
                             f"http://master/api/top/{job['id']}"], check=False)
    assert denied.returncode != 0 and MARK not in denied.stdout
    home = Path(os.path.expanduser("~alice"))
    for node in job["nodes"]:
        reg = json.loads((home / ".dxflow" / "fleet" / f"dxlab.{job['id']}.{node}.json").read_text())
        url = f"http://127.0.0.1:{reg['port']}/api/top"
        got = on_node(node, "bob", ["curl", "-s", "--max-time", "20", "-w", "\n%{http_code}", url], check=False)
        body, _, code = got.stdout.rpartition("\n")
        assert code in ("000", "401") and MARK not in body, (node, got.stdout)


# -- last: it stops an agent of the job --------------------------------------------------------------------

def test_a_hung_node_shows_as_lost_and_does_not_hold_up_the_frame(job):
    victim = next(n for n in job["nodes"] if n != job["batch"])
    pids = [p for p in agent_pids(job["id"])
            if f"--node {victim} " in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")]
    assert pids
    for p in pids:
        os.kill(p, signal.SIGSTOP)
    try:
        out = dxflow("alice", "top", job["id"], "--once", timeout=60)  # answers at all, with the others' rows
        rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.split()[:1] and
                line.split()[0] in job["nodes"] and len(line.split()) > 2 and not line.split()[1].isdigit()}
        assert re.match(rf"{victim}\s+lost\s", rows[victim]), out.stdout
        for node in set(job["nodes"]) - {victim}:
            assert re.match(rf"{node}\s+ready\s", rows[node]), out.stdout
        assert "3/4 up" in out.stdout and f"{victim}: lost:" in out.stdout
    finally:
        for p in pids:
            try:
                os.kill(p, signal.SIGCONT)
            except ProcessLookupError:
                pass
