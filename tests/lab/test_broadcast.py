"""Broadcast copy (issue #15 item 4), on the lab, as alice, on a job of four nodes: ``dxflow cp FILE
JOB:all:PATH`` and ``cp -r`` put the same bytes on every node (read back on each node by sha256sum), a
node set that is malformed or not the job's is refused before anything moves, bob can neither use
alice's broadcast nor be sent a byte of it by squatting a port, nodes that cannot reach each other get
the file from the login node (and the note says so), the relay goes through alice's own OpenSSH
ControlMasters inside the job, and a node whose agent is killed mid-broadcast is named while every other
node (the one it was passing the file on to as well) completes.

Where the lab's nodes have their own /tmp (dxflow.lab.mounts), the copies go there and each node's copy
is its own; else to a job-private folder under alice's (shared) home: then every node still reads
the file back through its own agent, and the NDJSON of the broadcast named each node as written.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import re
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from dxflow.schedulers.hostlist import fold

from conftest import (DXFLOW, Jobs, agent_pids, dxflow, on_node, popen_as, run, stop, uid, wait_agents,
                      wait_for)

NODES = 4


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def node_local_tmp(nodes: list[str]) -> bool:
    """Whether a file alice writes in /tmp on one node is absent on another."""
    probe = f"/tmp/dxtest-bcast-probe-{os.getpid()}"
    on_node(nodes[0], "alice", ["touch", probe])
    try:
        return on_node(nodes[1], "alice", ["test", "-e", probe], check=False).returncode != 0
    finally:
        on_node(nodes[0], "alice", ["rm", "-f", probe], check=False)


@pytest.fixture(scope="module")
def job(lab):
    if len(lab.get("nodes", [])) < NODES:
        pytest.skip(f"the lab has fewer than {NODES} nodes")
    pw = pwd.getpwnam("alice")
    jobs = Jobs()
    home = Path(pw.pw_dir) / f"dxtest-bcast-{os.getpid()}-{int(time.time())}"
    home.mkdir()
    os.chown(home, pw.pw_uid, pw.pw_gid)
    try:
        job_id = jobs.submit("alice", "sleep 3000", nodes=NODES)
        jobs.wait_running(job_id, timeout=120)
        nodes = sorted(a["node"] for a in wait_agents("alice", job_id, NODES, timeout=90))
        local = node_local_tmp(nodes)
        dest = f"/tmp/dxtest-bcast-{job_id}" if local else str(home / "dest")
        for n in (nodes if local else nodes[:1]):
            on_node(n, "alice", ["mkdir", "-p", dest])
        yield {"id": job_id, "nodes": nodes, "dest": dest, "src": home, "local": local, "uid": pw.pw_uid,
               "gid": pw.pw_gid}
    finally:
        jobs.cancel_all()
        subprocess.run(["rm", "-rf", str(home)], check=False)


def make(job, name: str, size: int) -> Path:
    path = job["src"] / name
    path.write_bytes(os.urandom(size))
    os.chown(path, job["uid"], job["gid"])
    return path


def sums_on(node: str, path: str) -> dict[str, str]:
    """``sha256sum`` of every file under path (or of path), read on the node itself: relative name -> sha256."""
    out = on_node(node, "alice", ["sh", "-c", f"cd {path} 2>/dev/null && find . -type f ! -name '.dxflow-*' "
                                  f"-exec sha256sum {{}} + || sha256sum {path}"]).stdout
    return {name: digest for digest, name in (line.split(None, 1) for line in out.splitlines())}


def test_a_file_reaches_every_node_with_its_sha256(job):
    src = make(job, "input.bin", 3 * 1024 * 1024 + 17)
    out = dxflow("alice", "cp", str(src), f"{job['id']}:all:{job['dest']}/", timeout=120)
    assert f"on each of {fold(job['nodes'])}" in out.stderr, out.stderr
    for n in job["nodes"]:
        assert sums_on(n, f"{job['dest']}/input.bin") == {f"{job['dest']}/input.bin": sha256(src)}, n


def test_each_copy_goes_to_the_disk_without_filling_the_page_cache(job):
    """The copies are written with O_DIRECT (dxflow.agent.writeback): on the lab's ext4, each node's page
    cache holds at most the last partial page of its copy, where sbcast's copies stay cached whole."""
    fs = on_node(job["nodes"][0], "alice", ["stat", "-f", "-c", "%T", job["dest"]]).stdout.strip()
    if fs in ("tmpfs", "ramfs"):
        pytest.skip(f"{job['dest']} is on {fs}: its pages are the file")
    src = make(job, "direct.bin", 5 * 1024 * 1024 + 100)
    dxflow("alice", "cp", str(src), f"{job['id']}:all:{job['dest']}/", timeout=120)
    for n in (job["nodes"] if job["local"] else job["nodes"][:1]):
        resident = on_node(n, "alice", ["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES",
                                        f"{job['dest']}/direct.bin"]).stdout.strip()
        assert int(resident) <= 4096, (n, resident)
    for n in job["nodes"]:
        assert sums_on(n, f"{job['dest']}/direct.bin") == {f"{job['dest']}/direct.bin": sha256(src)}, n


def test_a_folder_reaches_every_node_with_r(job):
    tree = job["src"] / "tree"
    (tree / "a" / "empty").mkdir(parents=True)
    (tree / "a" / "x.dat").write_bytes(os.urandom(70_000))
    (tree / "top.txt").write_text("top\n")
    run(["chown", "-R", f"{job['uid']}:{job['gid']}", str(tree)])
    dxflow("alice", "cp", "-r", str(tree), f"{job['id']}:all:{job['dest']}", timeout=120)
    want = {"./a/x.dat": sha256(tree / "a" / "x.dat"), "./top.txt": sha256(tree / "top.txt")}
    for n in job["nodes"]:
        assert sums_on(n, f"{job['dest']}/tree") == want, n
        on_node(n, "alice", ["test", "-d", f"{job['dest']}/tree/a/empty"])


def test_a_node_set_gets_it_and_a_folder_without_r_is_refused(job):
    src = make(job, "some.bin", 1000)
    some = job["nodes"][1:3]
    dxflow("alice", "cp", str(src), f"{job['id']}:{fold(some)}:{job['dest']}/", timeout=60)
    for n in some:
        assert sums_on(n, f"{job['dest']}/some.bin") == {f"{job['dest']}/some.bin": sha256(src)}
    if job["local"]:  # the others' own /tmp was left alone
        for n in set(job["nodes"]) - set(some):
            assert on_node(n, "alice", ["test", "-e", f"{job['dest']}/some.bin"], check=False).returncode != 0
    out = dxflow("alice", "cp", str(job["src"]), f"{job['id']}:all:{job['dest']}/", check=False, timeout=60)
    assert out.returncode == 2 and "-r" in out.stderr


@pytest.mark.parametrize("nodes", ["n[1-", "n[2-1]", "n1,,n2", "all,", "n[a]"])
def test_a_bad_node_set_exits_2_before_anything_moves(job, nodes):
    src = make(job, "never.bin", 10)
    out = dxflow("alice", "cp", str(src), f"{job['id']}:{nodes}:{job['dest']}/", check=False, timeout=30)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert on_node(job["nodes"][0], "alice", ["test", "-e", f"{job['dest']}/never.bin"], check=False).returncode


def test_a_node_not_of_the_job_is_named(job):
    src = make(job, "never2.bin", 10)
    out = dxflow("alice", "cp", str(src), f"{job['id']}:n[1-4],n99:{job['dest']}/", check=False, timeout=30)
    assert out.returncode == 5 and "n99 is not one of its nodes" in out.stderr, out.stderr


def test_bob_cannot_broadcast_into_alices_job(job):
    bob_file = Path("/tmp") / f"dxtest-bob-{os.getpid()}"
    bob_file.write_text("bob was here\n")
    os.chmod(bob_file, 0o644)
    try:
        out = dxflow("bob", "cp", str(bob_file), f"{job['id']}:all:{job['dest']}/", check=False, timeout=60)
        assert out.returncode == 5, out.stderr  # bob's master knows no agent of alice's job
        assert on_node(job["nodes"][0], "alice", ["test", "-e", f"{job['dest']}/{bob_file.name}"],
                       check=False).returncode
    finally:
        bob_file.unlink()


SQUAT = textwrap.dedent("""\
    import socket, sys
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(5)
    print(s.getsockname()[1], flush=True)
    got = 0
    s.settimeout(60)
    try:
        while True:
            c, _ = s.accept(); c.settimeout(5)
            try:
                while True:
                    d = c.recv(65536)
                    if not d: break
                    got += len(d); print("got", got, flush=True)
            except OSError:
                pass
    except OSError:
        pass
""")

SEND = textwrap.dedent("""\
    # alice asks her own agent on this node to pass a file on to "n2", whose port is bob's listener
    import hashlib, http.client, json, sys
    from pathlib import Path
    from dxflow.auth import fingerprint, mint_token, user_key
    fleet = Path.home() / ".dxflow" / "fleet"
    job, here, there, port = sys.argv[1:5]
    reg = {r["node"]: r for r in (json.loads(p.read_text()) for p in fleet.glob(f"*.{job}.*.json"))}
    key = user_key(Path.home() / ".dxflow")
    tok = lambda r: mint_token(key, "alice", fingerprint(r["public_key"]), 60)
    body = b"secret of alice\\n"
    child = {"node": there, "address": there, "port": int(port), "public_key": reg[there]["public_key"],
             "token": tok(reg[there]), "children": []}
    plan = {"op": "file", "path": sys.argv[5], "size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
            "overwrite": True, "children": [child]}
    head = json.dumps(plan).encode() + b"\\n"
    c = http.client.HTTPConnection("127.0.0.1", reg[here]["port"], timeout=90)
    c.request("PUT", "/api/broadcast", head + body, {"Authorization": "Bearer " + tok(reg[here])})
    r = c.getresponse()
    print(r.status, r.read().decode())
""")


def test_a_port_taken_by_bob_gets_no_byte_and_no_token(job):
    """Alice's agent on one node is asked to pass a broadcast on to a port on another node that bob's
    process holds (as after an agent stopped and bob took its port): it refuses, names why, sends nothing."""
    here, there = job["nodes"][0], job["nodes"][1]
    squat = subprocess.Popen(["nsenter", f"--net=/var/run/netns/dxlab-{there}", "runuser", "-u", "bob", "--",
                              "/opt/dxflow/venv/bin/python", "-c", SQUAT], stdout=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        port = squat.stdout.readline().strip()
        assert port.isdigit()
        script = job["src"] / "send.py"
        script.write_text(SEND)
        os.chown(script, job["uid"], job["gid"])
        out = on_node(here, "alice", ["/opt/dxflow/venv/bin/python", str(script), job["id"], here, there, port,
                                      f"{job['dest']}/squat.txt"], timeout=120).stdout
        status, _, body = out.partition(" ")
        assert status == "200", out
        lines = {line["node"]: line for line in (json.loads(t) for t in body.splitlines() if t.strip())}
        assert lines[here]["ok"], lines
        assert not lines[there]["ok"] and f"held by another user's process (uid {uid('bob')})" in lines[there]["error"], lines
    finally:
        stop(squat)
    assert "got" not in squat.stdout.read()  # bob's process was never even connected to


def test_nodes_that_cannot_reach_each_other_get_it_from_the_login_node(job, lab):
    """The first node cannot reach the second (a prohibit route in its namespace, for a few seconds): the
    second gets the file from the login node instead, with a note saying so; the first passes it on to the
    second's own children itself; every node has the file and the command succeeds."""
    nodes = job["nodes"]
    address = next(n["addr"] for n in lab["nodes"] if n["name"] == nodes[1])
    src = make(job, "detour.bin", 2 * 1024 * 1024)
    route = ["ip", "netns", "exec", f"dxlab-{nodes[0]}", "ip", "route"]
    run([*route, "add", "prohibit", f"{address}/32"])
    try:
        out = dxflow("alice", "cp", str(src), f"{job['id']}:all:{job['dest']}/", timeout=120)
    finally:
        run([*route, "del", "prohibit", f"{address}/32"], check=False)
    assert re.search(rf"{nodes[1]}: not reached through the other nodes \(not reachable from {nodes[0]}", out.stderr), \
        out.stderr
    assert not any(re.match(rf"dxflow: {n}: not reached", line) for n in (nodes[2], nodes[3])
                   for line in out.stderr.splitlines()), out.stderr
    for n in nodes:
        assert sums_on(n, f"{job['dest']}/detour.bin") == {f"{job['dest']}/detour.bin": sha256(src)}, n


def test_the_relay_goes_through_alices_openssh_inside_the_job(job):
    """The first node passes the file on through alice's own OpenSSH client: a ControlMaster per next node,
    started by its agent, kept a minute (ControlPersist=60, ahead of dxflow's default), in the job's cgroup
    (it ends with the job), and AES-GCM first only because alice's ssh_config chooses no ciphers."""
    nodes = job["nodes"]
    src = make(job, "relay.bin", 1024 * 1024)
    dxflow("alice", "cp", str(src), f"{job['id']}:all:{job['dest']}/", timeout=120)
    uid = job["uid"]
    masters = {}
    for pid in run(["pgrep", "-u", str(uid), "-f", "^ssh -f -N -M"], check=False).stdout.split():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        except FileNotFoundError:
            continue
        if f"/.dxflow/hosts/{nodes[0]}/ssh/" in argv[argv.index("-S") + 1] and f"job_{job['id']}/" in cgroup:
            masters[argv[-2]] = argv
    # --fanout 2: the first node passes it to the next two (and, a minute after an earlier test's detour,
    # may still hold one to the fourth, whose parent it stood in for)
    assert set(nodes[1:3]) <= set(masters) <= set(nodes[1:]), masters
    for argv in masters.values():
        options = [argv[i + 1] for i, a in enumerate(argv) if a == "-o"]
        assert options.index("ControlPersist=60") < options.index("ControlPersist=600")
        user_ciphers = on_node(nodes[0], "alice", ["ssh", "-G", nodes[1]]).stdout
        default = on_node(nodes[0], "alice", ["ssh", "-F", "/dev/null", "-G", nodes[1]]).stdout
        chosen = [line for line in user_ciphers.splitlines() if line.startswith("ciphers ")]
        if chosen == [line for line in default.splitlines() if line.startswith("ciphers ")]:
            assert any(o.startswith("Ciphers=aes128-gcm@openssh.com,") for o in options), options
        else:  # the lab's config chose: it stands
            assert not any(o.startswith("Ciphers=") for o in options), options


# -- last: it kills an agent of the job ---------------------------------------------------------------------

def test_a_node_lost_mid_broadcast_is_named_and_the_rest_complete(job):
    """The second node passes the file on to the fourth (the tree's shape, --fanout 2): it is killed while
    the bytes flow, is named, and the fourth gets the file from the login node instead."""
    nodes = job["nodes"]
    victim = nodes[1]
    src = make(job, "big.bin", 200 * 1024 * 1024)
    folder = Path(job["dest"]) if not job["local"] else None
    proc = popen_as("alice", [DXFLOW, "cp", str(src), f"{job['id']}:all:{job['dest']}/"])
    try:
        if folder is not None:  # the shared folder shows the bytes flowing
            wait_for(lambda: any(p.name.startswith(".dxflow-upload-") for p in folder.iterdir()), 60,
                     interval=0.05, what="the broadcast under way")
        else:
            wait_for(lambda: on_node(victim, "alice", ["sh", "-c", f"ls -a {job['dest']} | grep -q dxflow-upload"],
                                     check=False).returncode == 0, 60, interval=0.05, what="the broadcast under way")
        victims = [p for p in agent_pids(job["id"])
                   if f"--node {victim} " in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")]
        assert victims
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        proc.wait(240)
    finally:
        stop(proc)
    err = proc.stderr.read()
    assert proc.returncode == 1, err
    assert re.search(rf"1 of 4 nodes failed: {victim}: ", err), err
    assert re.search(rf"{nodes[3]}: not reached through the other nodes", err), err
    for n in (nodes[0], nodes[2], nodes[3]):
        assert sums_on(n, f"{job['dest']}/big.bin") == {f"{job['dest']}/big.bin": sha256(src)}, n
