"""Recovery without the user noticing (issue #9, item 5).

* ``dxflow cp`` of 400 MB while the node's sshd session that carries the master's tunnel is
  killed (what a restart of sshd that ends its sessions does): the copy completes with the
  right sha256, resumed by Range (downloads) or from the kept partial file (uploads) where
  it broke, not restarted from zero.
* The same copy while the link to the node is cut for 10 s (its packets dropped, both ways, by
  routing rules for this user's SSH connections only) completes, resumed where it broke if it did.
* An upload whose ``dxflow cp`` is killed leaves its bytes in a partial file under a temporary
  name on the node; the next ``dxflow cp`` of the same source continues it.
* The master, SIGKILLed, comes back on the next command with the same fleet, even when its
  pid file names a live process that is not a master (a reused pid) or a zombie; and
  ``dxflow master stop`` never signals a process that is not the master holding the lock.

These tests run as bob: they cut bob's own tunnel and kill bob's own master, so that the
other lab tests (mostly alice's) are not disturbed.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import DXFLOW, NETNS, Jobs, dxflow, dxflow_json, popen_as, stop, wait_agents, wait_for
from dxflow.layout import UserLayout, this_host

USER = "bob"
SIZE = 400 * 1024 * 1024
CUT_AT = 40 * 1024 * 1024  # the tunnel is cut once this much has arrived


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@pytest.fixture(scope="module")
def job(lab):
    jobs = Jobs()
    job_id = jobs.submit(USER, "sleep 900")
    try:
        jobs.wait_running(job_id)
        wait_agents(USER, job_id, 1, timeout=60)
        node = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%N"], capture_output=True,
                              text=True).stdout.strip()
        yield {"id": job_id, "node": node}
    finally:
        jobs.cancel_all()


@pytest.fixture
def folder(lab):
    pw = pwd.getpwnam(USER)
    d = Path(pw.pw_dir) / f"dxtest-recovery-{os.getpid()}-{time.monotonic_ns()}"
    d.mkdir()
    os.chown(d, pw.pw_uid, pw.pw_gid)
    yield d
    subprocess.run(["rm", "-rf", str(d)], check=False)


def big_file(path: Path) -> str:
    """SIZE random bytes at path, owned by the test user; their sha256."""
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(SIZE // (4 << 20)):
            chunk = os.urandom(4 << 20)
            digest.update(chunk)
            f.write(chunk)
    pw = pwd.getpwnam(USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)
    return digest.hexdigest()


def netns_inode(node: str) -> int:
    return os.stat(f"/var/run/netns/{NETNS.format(node=node)}").st_ino


def user_sshd_sessions(node: str) -> list[int]:
    """The test user's sshd session processes on NODE (``sshd: bob@notty``, in the node's namespace)."""
    uid, ns = pwd.getpwnam(USER).pw_uid, netns_inode(node)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid or os.stat(f"/proc/{entry}/ns/net").st_ino != ns:
                continue
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if cmdline.startswith(f"sshd: {USER}".encode()):
            found.append(int(entry))
    return found


def cut_tunnel(node: str) -> None:
    """End the test user's SSH sessions on NODE, as an sshd restart that ends its sessions does."""
    pids = wait_for(lambda: user_sshd_sessions(node), 10, what=f"{USER}'s sshd session on {node}")
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def size_of(paths) -> int:
    return max((p.stat().st_size for p in paths if p.exists()), default=0)


def run_cp_cut_midway(job: dict, src: str, dst: str, growing) -> subprocess.CompletedProcess:
    """``dxflow cp SRC DST`` as the test user; its tunnel is cut once ``growing()`` holds CUT_AT bytes."""
    proc = popen_as(USER, [DXFLOW, "cp", src, dst])
    try:
        wait_for(lambda: size_of(growing()) >= CUT_AT or proc.poll() is not None, 120, interval=0.05,
                 what="the copy under way")
        assert proc.poll() is None, "the copy ended before the tunnel could be cut: make SIZE larger"
        cut_tunnel(job["node"])
        out, err = proc.communicate(timeout=300)
    finally:
        stop(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_download_completes_after_the_nodes_sshd_session_ends_midway(job, folder):
    src = folder / "big.bin"
    want = big_file(src)
    dst = folder / "copy.bin"
    cp = run_cp_cut_midway(job, f"{job['id']}:{src}", str(dst), lambda: [Path(f"{dst}.dxflow-part")])
    assert cp.returncode == 0, cp.stderr
    assert sha256_of(dst) == want
    resumed = re.search(r"resuming \S+ at byte (\d+) of", cp.stderr)
    assert resumed and int(resumed.group(1)) >= CUT_AT, f"not resumed by Range where it broke: {cp.stderr}"
    assert not Path(f"{dst}.dxflow-part").exists()


def test_upload_completes_after_the_nodes_sshd_session_ends_midway(job, folder):
    src = folder / "src.bin"
    want = big_file(src)
    remote = folder / "up"
    remote.mkdir()
    os.chown(remote, pwd.getpwnam(USER).pw_uid, -1)
    cp = run_cp_cut_midway(job, str(src), f"{job['id']}:{remote}/", lambda: list(remote.glob(".dxflow-upload-*")))
    assert cp.returncode == 0, cp.stderr
    assert sha256_of(remote / "src.bin") == want
    resumed = re.search(r"resuming the upload of \S+ at byte (\d+) of", cp.stderr)
    assert resumed and int(resumed.group(1)) > 0, f"the upload was not resumed where it broke: {cp.stderr}"
    assert sorted(p.name for p in remote.iterdir()) == ["src.bin"]  # no partial file left


#: Priority of the routing rules that cut the link: before the main table, after the local one.
CUT_PREF = 90


def node_address(node: str) -> str:
    """NODE's address on the lab network (its eth0, as ``ip -j addr`` shows it)."""
    out = subprocess.run(["ip", "-j", "-n", NETNS.format(node=node), "-4", "addr", "show", "dev", "eth0"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)[0]["addr_info"][0]["local"]


def ssh_peer_ports(node: str) -> set[int]:
    """Login-side ports of the test user's SSH connections to NODE, read from NODE's sshd sessions:
    their socket fds, matched in their namespace's TCP table (``/proc/PID/net/tcp``) to port 22."""
    ports = set()
    for pid in user_sshd_sessions(node):
        try:
            inodes = {os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1] for fd in os.listdir(f"/proc/{pid}/fd")
                      if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")}
            lines = Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]
            lines += Path(f"/proc/{pid}/net/tcp6").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(local.rsplit(":", 1)[1], 16) == 22:
                ports.add(int(remote.rsplit(":", 1)[1], 16))
    return ports


@contextmanager
def link_cut(node: str) -> Iterator[Callable[[], None]]:
    """The test user's traffic over the link to NODE is dropped, both ways, until the block ends.

    As on a cut cable, packets are lost, not refused: TCP on both ends retransmits and the
    connection lives on if the link comes back in time. Only the test user's SSH traffic is cut,
    not the node's link (other lab tests use the node meanwhile): on the login side by a routing
    rule for the user's own sockets (``uidrange``) to NODE's port 22, which also stops any new
    connection; on NODE by a rule for the answers of its sshd to each of the user's connections
    (port pair), which are root's sockets there. The returned function adds the rules for
    connections made since (call it while the link is down)."""
    uid = pwd.getpwnam(USER).pw_uid
    netns = NETNS.format(node=node)
    login_rule = ["pref", str(CUT_PREF), "uidrange", f"{uid}-{uid}", "to", f"{node_address(node)}/32",
                  "ipproto", "tcp", "dport", "22", "blackhole"]
    node_rules: list[list[str]] = []

    def cut_new_connections() -> None:
        for port in sorted(ssh_peer_ports(node)):
            rule = ["pref", str(CUT_PREF), "ipproto", "tcp", "sport", "22", "dport", str(port), "blackhole"]
            if rule not in node_rules:
                subprocess.run(["ip", "-n", netns, "rule", "add", *rule], check=True)
                node_rules.append(rule)

    subprocess.run(["ip", "rule", "add", *login_rule], check=True)
    try:
        cut_new_connections()
        assert node_rules, f"no SSH connection of {USER} to {node} to cut"
        yield cut_new_connections
    finally:
        subprocess.run(["ip", "rule", "del", *login_rule], check=False)
        for rule in node_rules:
            subprocess.run(["ip", "-n", netns, "rule", "del", *rule], check=False)


def test_download_completes_after_its_link_is_cut_for_10_s(job, folder):
    """No packet of the copy's connection passes for 10 s, then the link is back: the copy completes
    with the right bytes, and if it broke meanwhile it was resumed where it broke, not from zero."""
    src = folder / "big.bin"
    want = big_file(src)
    dst = folder / "copy.bin"
    part = Path(f"{dst}.dxflow-part")
    proc = popen_as(USER, [DXFLOW, "cp", f"{job['id']}:{src}", str(dst)])
    try:
        wait_for(lambda: size_of([part]) >= CUT_AT or proc.poll() is not None, 120, interval=0.05,
                 what="the copy under way")
        assert proc.poll() is None, "the copy ended before the link could be cut: make SIZE larger"
        with link_cut(job["node"]) as cut_new_connections:
            time.sleep(2)  # what was in flight (socket buffers on the way) lands
            held = size_of([part])
            for _ in range(40):  # 8 s more: 10 s in all
                time.sleep(0.2)
                cut_new_connections()
            # nothing moved while the link was down: the cut is real, not a slowdown
            assert size_of([part]) == held and not dst.exists(), "bytes arrived through the cut link"
        _out, err = proc.communicate(timeout=300)
    finally:
        stop(proc)
    assert proc.returncode == 0, err
    assert sha256_of(dst) == want
    for offset in re.findall(r"resuming \S+ at byte (\d+) of", err):
        assert int(offset) >= CUT_AT, f"restarted below where it broke: {err}"
    assert not part.exists()


def cp_processes(src: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-u", USER, "-f", f"dxflow cp {src} "], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def test_interrupted_upload_is_continued_by_the_next_cp_of_the_same_source(job, folder):
    src = folder / "src.bin"
    want = big_file(src)
    remote = folder / "up"
    remote.mkdir()
    os.chown(remote, pwd.getpwnam(USER).pw_uid, -1)
    proc = popen_as(USER, [DXFLOW, "cp", str(src), f"{job['id']}:{remote}/"])
    try:
        wait_for(lambda: size_of(remote.glob(".dxflow-upload-*")) >= CUT_AT or proc.poll() is not None, 120,
                 interval=0.05, what="the upload under way")
        assert proc.poll() is None, "the upload ended before it could be interrupted: make SIZE larger"
    finally:
        for pid in cp_processes(src):  # the copy itself: `runuser -l` runs it in a session of its own
            os.kill(pid, signal.SIGKILL)
        stop(proc)
    kept = wait_for(lambda: list(remote.glob(".dxflow-upload-*.part")), 10, what="the kept partial upload")
    assert not (remote / "src.bin").exists()  # nothing under the real name before it is complete
    time.sleep(1)  # the agent's side of the broken request lets go of the partial file
    cp = dxflow(USER, "cp", str(src), f"{job['id']}:{remote}/", timeout=300)
    resumed = re.search(r"resuming the upload of \S+ at byte (\d+) of", cp.stderr)
    assert resumed and int(resumed.group(1)) >= CUT_AT, f"not continued from {kept}: {cp.stderr}"
    assert sha256_of(remote / "src.bin") == want
    assert sorted(p.name for p in remote.iterdir()) == ["src.bin"]


# -- the master ------------------------------------------------------------------------------------

ZOMBIE = """
import os, sys, time
child = os.fork()
if child == 0:
    os._exit(0)
print(child, flush=True)  # never waited for: a zombie while this process lives
time.sleep(600)
"""
DECOY = "import os, time; print(os.getpid(), flush=True); time.sleep(600)"


def dot_dxflow() -> Path:
    return Path(pwd.getpwnam(USER).pw_dir) / ".dxflow"


def master_processes() -> list[int]:
    """The test user's processes that hold the master's lock file open (the master and its worker)."""
    lock = os.stat(UserLayout(dot_dxflow(), this_host()).master_lock)
    uid = pwd.getpwnam(USER).pw_uid
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{entry}").st_uid != uid:
                continue
            for fd in os.listdir(f"/proc/{entry}/fd"):
                st = os.stat(f"/proc/{entry}/fd/{fd}")
                if (st.st_dev, st.st_ino) == (lock.st_dev, lock.st_ino):
                    found.append(int(entry))
                    break
        except OSError:
            continue
    return found


def stray(script: str) -> tuple[subprocess.Popen, int]:
    """A process of the test user running ``script``, and the pid it prints (its own, or its zombie child's)."""
    proc = popen_as(USER, ["/opt/dxflow/venv/bin/python", "-c", script])
    line = proc.stdout.readline()
    return proc, int(line)


def write_pid_file(pid: int) -> None:
    path = UserLayout(dot_dxflow(), this_host()).master_pid
    path.write_text(f"{pid}\n")
    pw = pwd.getpwnam(USER)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.parametrize("left_behind", ["zombie", "reused"])
def test_sigkilled_master_comes_back_with_the_same_fleet_despite_its_stale_pid_file(job, left_behind):
    before = {(a["job"], a["node"]) for a in dxflow_json(USER, "ls")}
    assert (job["id"], job["node"]) in before
    for pid in master_processes():
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not master_processes(), 15, what="the killed master gone")
    proc, pid = stray(ZOMBIE if left_behind == "zombie" else DECOY)
    try:
        if left_behind == "zombie":
            wait_for(lambda: process_state(pid) == "Z", 10, what="a zombie")
        write_pid_file(pid)  # what the killed master left, naming a process that is not a master
        t0 = time.monotonic()
        after = {(a["job"], a["node"]) for a in dxflow_json(USER, "ls", timeout=60)}
        print(f"the next command answered after {time.monotonic() - t0:.1f} s")
        assert after == before
        wait_agents(USER, job["id"], 1, timeout=60)
        assert process_state(pid) in ("Z", "S", "R"), "the process the stale pid file named was signalled"
    finally:
        stop(proc)


def test_master_stop_signals_only_the_master_holding_the_lock(job):
    dxflow(USER, "ls")  # a master runs
    decoy, pid = stray(DECOY)
    try:
        write_pid_file(pid)  # a stale pid file naming someone else
        out = dxflow(USER, "master", "stop").stdout
        assert "master stopped" in out
        assert not master_processes()
        assert decoy.poll() is None, "dxflow master stop signalled a process that is not the master"
        write_pid_file(pid)  # no master at all now
        assert "was not running" in dxflow(USER, "master", "stop").stdout
        assert decoy.poll() is None
    finally:
        stop(decoy)
    wait_agents(USER, job["id"], 1, timeout=60)  # the next command starts it again, same fleet
