"""Issue #10 item 5 on the lab: the audit trail reaches syslog, and the site's scheduler folder is used.

A real syslog receiver: a Unix datagram socket bound here, named as ``audit_socket`` in a site config
given to alice's master and agent (``DXFLOW_SITE_CONFIG``, which a hook also passes on to the agents it
starts). The master and the agent are real and alice's own, in a home of their own for this test
(HOME=a temporary folder of hers, with a copy of her SSH setup), so that other tests' masters never
see this site config. The agent is started on the job's node as the prolog's launcher starts it: alice, detached,
for a running job. ``scheduler_bin`` names a folder of wrappers around the lab's Slurm commands that
note each call: the agent asks Slurm through them although /usr/bin is on its PATH.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from conftest import DXFLOW, NETNS, Lines, run, stop, wait_for

from dxflow import audit

ALICE = pwd.getpwnam("alice")
PYTHON = "/opt/dxflow/venv/bin/python"
RELAY = ("import sys, json; from dxflow.master.client import MasterClient; c = MasterClient(); "
         "print(json.dumps(c.json(sys.argv[1], c.agent_path(sys.argv[2], sys.argv[4], sys.argv[3]))))")


def node_of(job: str) -> str:
    """The node a one-node job runs on (whichever was free: other tests share the lab)."""
    return run(["squeue", "-h", "-j", job, "-o", "%N"]).stdout.strip()


class Syslog:
    """A syslog daemon's /dev/log, as far as dxflow can tell: a Unix datagram socket that keeps what it
    gets, with the sender's uid as the kernel gives it (SO_PASSCRED, what journald records as _UID)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        path.chmod(0o666)  # as /dev/log: every user's processes may send
        self.sock.settimeout(0.2)
        self.records: list[str] = []
        self.senders: dict[str, int] = {}  # record -> the uid of the process that sent it

    def read(self) -> list[str]:
        while True:
            try:
                data, ancillary, _flags, _addr = self.sock.recvmsg(65536, socket.CMSG_SPACE(12))
            except (socket.timeout, BlockingIOError):
                return self.records
            text = data.decode().rstrip("\0")
            for level, kind, cred in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    self.senders[text] = struct.unpack("3i", cred[:12])[1]
            self.records.append(text)

    def find(self, action: str, **fields: str) -> list[str]:
        want = [f"action={action}"] + [f"{k}={v}" for k, v in fields.items()]
        return [r for r in self.read() if all(f" {w} " in f" {r} " for w in want)]


@pytest.fixture
def site(lab) -> Iterator[dict]:
    folder = Path(tempfile.mkdtemp(prefix="dxflow-audit-"))
    folder.chmod(0o755)
    home = folder / "home"
    home.mkdir()
    shutil.copytree(Path(ALICE.pw_dir) / ".ssh", home / ".ssh")
    bindir = folder / "bin"
    bindir.mkdir()
    calls = folder / "calls"
    calls.touch(0o666)
    calls.chmod(0o666)
    for name in ("squeue", "sinfo", "scontrol"):
        # each call noted with the network namespace it came from: n1's (the agent) or the host's (the master)
        (bindir / name).write_text(f'#!/bin/sh\necho "$(readlink /proc/$$/ns/net) {name} $*" >> {calls}\n'
                                   f'exec /usr/bin/{name} "$@"\n')
        (bindir / name).chmod(0o755)
    syslog = Syslog(folder / "log")
    config = folder / "dxflow.toml"
    config.write_text(f'audit_socket = "{folder / "log"}"\naudit_facility = "local5"\nscheduler_bin = "{bindir}"\n')
    config.chmod(0o644)
    for path in [home, *home.rglob("*")]:
        os.lchown(path, ALICE.pw_uid, ALICE.pw_gid)
    yield {"home": home, "config": config, "syslog": syslog, "calls": calls}
    alice(home, config, DXFLOW, "master", "stop", check=False)
    syslog.sock.close()
    shutil.rmtree(folder, ignore_errors=True)


def env_of(home: Path, config: Path) -> list[str]:
    return ["env", "-i", f"HOME={home}", "PATH=/usr/local/bin:/usr/bin:/bin", f"DXFLOW_SITE_CONFIG={config}"]


def alice(home: Path, config: Path, *argv: str, check: bool = True, input: str | None = None):
    return run(["runuser", "-u", "alice", "--", *env_of(home, config), *argv], check=check, input=input)


def test_exec_file_writes_deletes_and_forwards_are_in_the_audit_trail(site, jobs):
    home, config, syslog = site["home"], site["config"], site["syslog"]
    port = random.randint(20000, 29999)
    job = jobs.submit("alice", f"exec python3 -m http.server {port} --bind 127.0.0.1")
    jobs.wait_running(job, timeout=120)
    node = node_of(job)
    agent = subprocess.Popen(
        ["nsenter", f"--net=/var/run/netns/{NETNS.format(node=node)}", "runuser", "-u", "alice", "--",
         *env_of(home, config), PYTHON, "-I", "-m", "dxflow.agent", "--scheduler", "slurm", "--cluster", "dxlab",
         "--job", job, "--node", node],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    forward = None
    try:
        def ready():
            rows = json.loads(alice(home, config, DXFLOW, "ls", "--json").stdout)
            return rows if [r["state"] for r in rows] == ["ready"] else None
        wait_for(ready, 90, interval=1, what="alice's agent ready")
        where = {"job": job, "node": node, "user": "alice", "uid": str(ALICE.pw_uid)}

        out = alice(home, config, DXFLOW, "exec", job, "--", "echo", "audited; rm -rf ~").stdout
        assert out.strip() == "audited; rm -rf ~"
        src = home / "upload.txt"
        src.write_text("hello\n")
        os.chown(src, ALICE.pw_uid, ALICE.pw_gid)
        name = f"audit-{job}.txt"
        alice(home, config, DXFLOW, "cp", "-q", str(src), f"{job}:{home}/{name}")
        alice(home, config, PYTHON, "-c", RELAY, "DELETE", job, f"/api/files?path={home}/{name}", node)
        forward = subprocess.Popen(["runuser", "-u", "alice", "--", *env_of(home, config), DXFLOW, "forward", job,
                                    str(port), "--local", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True, start_new_session=True)
        url = re.search(r"http://127\.0\.0\.1:\d+/", Lines(forward).wait_for(r"http://127", 60)).group(0)
        fetched = alice(home, config, PYTHON, "-c", "import sys, urllib.request as u; "
                        "print(u.urlopen(sys.argv[1], timeout=30).status)", url).stdout.strip()  # hers only
        assert fetched == "200"
        alice(home, config, DXFLOW, "logs", job, check=False)  # the agent asks Slurm for the job's output paths

        execs = wait_for(lambda: syslog.find("exec", **where), 20, what="the exec's record")
        assert len(execs) == 1 and "what=\"echo 'audited; rm -rf ~'\"" in execs[0], execs
        record = execs[0]
        assert re.match(r"<\d+>dxflow-agent\[\d+\]: ", record), record
        assert int(record[1:record.index(">")]) >> 3 == 21  # local5, the site's facility
        assert f"peer_uid={ALICE.pw_uid} " in record and "loginuid=" in record
        writes = syslog.find("write", **where)
        assert len(writes) == 1 and f"what={home}/{name} " in writes[0] + " ", writes
        assert len(syslog.find("delete", **where, what=f"{home}/{name}")) == 1
        forwards = wait_for(lambda: syslog.find("forward", job=job, node=node, port=str(port)), 20,
                            what="the forward's record")
        # the master's record of the same exec: the asking process's pid and login uid (runuser keeps ours)
        relays = syslog.find("relay", job=job, node=node, what='"POST /api/exec"')
        assert len(relays) == 1 and "peer_pid=unknown" not in relays[0], relays
        assert f" loginuid={audit.loginuid('self')} " in relays[0] + " "
        assert syslog.find("relay", job=job, what='"DELETE /api/files"')
        assert forwards[0].split(":")[0].split(">")[1].startswith("dxflow-master[")
        # the master knows its client's process: a Unix socket's peer
        assert f"peer_uid={ALICE.pw_uid} " in forwards[0] and "peer_pid=unknown" not in forwards[0]
        # the kernel's word on each sender matches the record's uid: the records are alice's processes' own
        assert all(syslog.senders[r] == ALICE.pw_uid for r in execs + writes + forwards + relays)
        there = f"net:[{os.stat('/var/run/netns/' + NETNS.format(node=node)).st_ino}]"
        host = os.readlink("/proc/self/ns/net")
        wait_for(lambda: f"{there} squeue" in site["calls"].read_text(), 20, what="the agent's call of the site's squeue")
        assert f"{host} squeue" in site["calls"].read_text()  # the master's (it lists alice's jobs)
    finally:
        if forward is not None:
            stop(forward)
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(15)


def test_a_missing_syslog_socket_never_fails_the_act(site, jobs, tmp_path):
    """No syslog daemon (the socket removed): commands work as before, the agent's log says so once."""
    home, config, syslog = site["home"], site["config"], site["syslog"]
    syslog.sock.close()
    Path(str(config).replace("dxflow.toml", "log")).unlink()
    job = jobs.submit("alice", "sleep 300")
    jobs.wait_running(job, timeout=120)
    node = node_of(job)
    agent = subprocess.Popen(
        ["nsenter", f"--net=/var/run/netns/{NETNS.format(node=node)}", "runuser", "-u", "alice", "--",
         *env_of(home, config), PYTHON, "-I", "-m", "dxflow.agent", "--scheduler", "slurm", "--cluster", "dxlab",
         "--job", job, "--node", node],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        def ready():
            rows = json.loads(alice(home, config, DXFLOW, "ls", "--json").stdout)
            return rows if [r["state"] for r in rows] == ["ready"] else None
        wait_for(ready, 90, interval=1, what="alice's agent ready")
        for n in range(2):
            assert alice(home, config, DXFLOW, "exec", job, "--", "echo", str(n)).stdout.strip() == str(n)
        log = home / ".dxflow" / "logs" / f"dxlab.{job}.{node}.log"
        said = wait_for(lambda: log.read_text().count("audit records cannot be sent"), 10,
                        what="the agent's note")
        assert said == 1
    finally:
        os.killpg(agent.pid, signal.SIGTERM)
        agent.wait(15)


def test_bob_cannot_pass_a_record_off_as_alices(site):
    """bob may write to the syslog socket (every user may) and claim to be alice's agent; the sender's
    uid that the kernel attaches, and a syslog daemon records, still says bob."""
    syslog = site["syslog"]
    forged = f"<86>dxflow-agent[1]: action=delete job=1 node=n1 user=alice uid={ALICE.pw_uid} what=/home/alice/thesis"
    code = (f"import socket; s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); "
            f"s.sendto({forged!r}.encode(), {str(site['config'].with_name('log'))!r})")
    run(["runuser", "-u", "bob", "--", PYTHON, "-c", code])
    got = wait_for(lambda: [r for r in syslog.read() if r == forged], 10, what="bob's datagram")
    assert syslog.senders[got[0]] == pwd.getpwnam("bob").pw_uid != ALICE.pw_uid
