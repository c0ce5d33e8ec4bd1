"""Node-local storage (issue #15 item 3): each lab node has its own /tmp and /local, and agents serve
them, alice's files only.

* The lab: a file written in one node's /tmp (or /local) is not in another node's, nor on the login
  node; /home stays shared; sshd and slurmd (so SSH sessions, job steps and agents) live in the
  node's mount namespace (dxflow/lab/mounts.py, docs/lab.md).
* ``dxflow cp data JOB:NODE:/tmp/`` and ``.../local/`` stage a file to that one node's disk, and back.
* bob attacks alice through the node's shared /tmp, and fails: his readable file there is not served
  to her (nor listed), a symlink he planted does not carry her upload into her home, a folder
  symlink of his does not either; and alice's file in /tmp is not served to bob's agent.

Runs on two nodes that have their own /tmp (every node of a lab made by this version's ``lab up``;
an older lab gets it with ``dxflow lab restart-node NODE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path

import pytest

from dxflow.lab import mounts
from dxflow.lab.layout import Layout, Node

from conftest import Jobs, as_user, dxflow, on_node, run, wait_agents

PY = "/opt/dxflow/venv/bin/python"
#: a user's request to one of their agents through their own master: prints "STATUS BODY"
ASK = """
import json, sys
from urllib.parse import quote
from dxflow.master.client import MasterClient
client = MasterClient().ensure()
job, node, api, path = sys.argv[1:5]
resp = client.request("GET", client.agent_path(job, node, api) + ("?path=" + quote(path) if path else ""), None, {}, 30)
print(resp.status, resp.read().decode(errors="replace"))
"""


def local_nodes() -> list[str]:
    """Two nodes of the lab with their own /tmp and /local (the last two that have them)."""
    info = json.loads(run(["/usr/local/bin/dxflow", "lab", "status", "--json"]).stdout)
    have = [n["name"] for n in info["nodes"] if mounts.has_namespace(Layout(), n["name"])]
    if len(have) < 2:
        pytest.fail(f"this lab's nodes share one /tmp (only {have or 'none'} have their own): it predates "
                    "node-local storage; `dxflow lab restart-node NODE` (as root) gives a node its own", pytrace=False)
    return have[-2:]


@pytest.fixture(scope="module")
def nodes(lab) -> list[str]:
    return local_nodes()


@pytest.fixture(scope="module")
def job(nodes):
    """alice's job on both nodes (it sleeps), its agents ready: (job id, [node, node])."""
    jobs = Jobs()
    job_id = jobs.submit("alice", "sleep 900", f"--nodelist={','.join(nodes)}", nodes=2)
    try:
        jobs.wait_running(job_id, timeout=120)
        wait_agents("alice", job_id, 2, timeout=60)
        yield job_id, nodes
    finally:
        jobs.cancel_all()


@pytest.fixture(scope="module")
def bob_job(nodes):
    """bob's own job on the first node, for the attack the other way round."""
    jobs = Jobs()
    job_id = jobs.submit("bob", "sleep 900", f"--nodelist={nodes[0]}")
    try:
        jobs.wait_running(job_id, timeout=120)
        wait_agents("bob", job_id, 1, timeout=60)
        yield job_id
    finally:
        jobs.cancel_all()


@pytest.fixture
def tag(nodes):
    """A name no other run uses; what the test leaves in the nodes' /tmp and /local is removed."""
    name = f"dxlocal-{uuid.uuid4().hex[:8]}"
    yield name
    for node in nodes:
        for user in ("alice", "bob"):
            on_node(node, user, ["sh", "-c", f"rm -rf /tmp/{name}* /local/{name}*"], check=False)


def ask(user: str, job: str, node: str, api: str, path: str = "") -> tuple[int, str]:
    status, _, body = as_user(user, [PY, "-c", ASK, job, node, api, path], timeout=60).stdout.partition(" ")
    return int(status), body[:-1]  # print's newline


def on(node: str, user: str, script: str, **kw):
    return on_node(node, user, ["sh", "-c", script], **kw)


# -- the lab ------------------------------------------------------------------------------------------------

def test_a_file_in_one_nodes_tmp_is_in_no_other_nodes_nor_on_the_login_node(nodes, tag):
    a, b = nodes
    for folder in ("/tmp", "/local"):
        on(a, "alice", f"echo written-on-{a} > {folder}/{tag}")
        assert on(a, "alice", f"cat {folder}/{tag}").stdout == f"written-on-{a}\n"
        assert on(b, "alice", f"test -e {folder}/{tag}", check=False).returncode == 1, f"{folder} shared with {b}"
        assert not Path(folder, tag).exists(), f"{a}'s {folder} shows on the login node"
    # /home stays one file system for all, as on a cluster
    home = Path("/home/alice") / tag
    try:
        on(a, "alice", f"echo shared > {home}")
        assert home.read_text() == "shared\n"
        assert on(b, "alice", f"cat {home}").stdout == "shared\n"
    finally:
        home.unlink(missing_ok=True)


def test_ssh_sessions_and_job_steps_see_the_nodes_own_tmp(job, tag):
    job_id, (a, _) = job
    on(a, "alice", f"echo mine > /tmp/{tag}")
    # sshd lives in the node's mount namespace: a session there sees the node's /tmp
    assert as_user("alice", ["ssh", "-o", "BatchMode=yes", a, "cat", f"/tmp/{tag}"], timeout=60).stdout == "mine\n"
    # so does a job step that slurmd starts (and the agent the prolog starts)
    step = as_user("alice", ["srun", f"--jobid={job_id}", "--overlap", f"--nodelist={a}", "-N1", "-n1",
                             "cat", f"/tmp/{tag}"], timeout=60)
    assert step.stdout == "mine\n"
    assert dxflow("alice", "exec", f"{job_id}:{a}", "--", "cat", f"/tmp/{tag}", timeout=60).stdout == "mine\n"


# -- dxflow cp to a node's own disk ---------------------------------------------------------------------------

def test_cp_stages_a_file_to_one_nodes_tmp_and_local_and_back(job, tag):
    job_id, (a, b) = job
    data = Path("/home/alice") / f"{tag}.dat"
    back = Path("/home/alice") / f"{tag}.back"
    try:
        as_user("alice", ["sh", "-c", f"head -c 300000 /dev/urandom > {data}"])
        want = hashlib.sha256(data.read_bytes()).hexdigest()
        dxflow("alice", "cp", "-q", str(data), f"{job_id}:{a}:/tmp/", timeout=120)
        dxflow("alice", "cp", "-q", str(data), f"{job_id}:{b}:/local/{tag}.dat", timeout=120)
        assert on(a, "alice", f"sha256sum /tmp/{tag}.dat").stdout.split()[0] == want
        assert on(b, "alice", f"sha256sum /local/{tag}.dat").stdout.split()[0] == want
        # each only on the node it was sent to
        assert on(b, "alice", f"test -e /tmp/{tag}.dat", check=False).returncode == 1
        assert on(a, "alice", f"test -e /local/{tag}.dat", check=False).returncode == 1
        assert not Path("/tmp", f"{tag}.dat").exists()
        dxflow("alice", "cp", "-q", f"{job_id}:{a}:/tmp/{tag}.dat", str(back), timeout=120)
        assert hashlib.sha256(back.read_bytes()).hexdigest() == want
        # the agent lists its node-local roots
        status, body = ask("alice", job_id, a, "/api/files/roots")
        assert status == 200 and {"name": "node-local", "path": "/tmp"} in json.loads(body)
    finally:
        data.unlink(missing_ok=True)
        back.unlink(missing_ok=True)


# -- bob attacks alice through the shared /tmp ---------------------------------------------------------------

def test_bobs_readable_file_in_tmp_is_neither_served_nor_listed_to_alice(job, tag):
    job_id, (a, _) = job
    on(a, "bob", f"echo bob-secret > /tmp/{tag}-bob && chmod 644 /tmp/{tag}-bob && mkdir -m 755 /tmp/{tag}-bobdir "
                 f"&& echo in-dir > /tmp/{tag}-bobdir/f && chmod 644 /tmp/{tag}-bobdir/f")
    on(a, "alice", f"echo alice-own > /tmp/{tag}-alice")
    # the kernel alone would let alice read it (mode 644): the agent refuses
    assert on(a, "alice", f"cat /tmp/{tag}-bob").stdout == "bob-secret\n"
    dst = Path("/home/alice") / f"{tag}-stolen"
    for path in (f"/tmp/{tag}-bob", f"/tmp/{tag}-bobdir/f"):
        out = dxflow("alice", "cp", "-q", f"{job_id}:{a}:{path}", str(dst), check=False, timeout=60)
        assert out.returncode == 9 and "belongs to another user" in out.stderr, (path, out.returncode, out.stderr)
        assert not dst.exists()
        status, body = ask("alice", job_id, a, "/api/files/content", path)
        assert status == 403 and "bob-secret" not in body and "in-dir" not in body, (status, body)
    # a listing of /tmp shows alice's own entries, not bob's
    status, body = ask("alice", job_id, a, "/api/files", "/tmp")
    names = {e["name"] for e in json.loads(body)["entries"]}
    assert status == 200 and f"{tag}-alice" in names
    assert not names & {f"{tag}-bob", f"{tag}-bobdir"}, names


def test_a_symlink_bob_plants_in_tmp_does_not_carry_alices_upload_into_her_home(job, tag):
    job_id, (a, _) = job
    victim = Path("/home/alice") / f"{tag}-victim"
    src = Path("/home/alice") / f"{tag}-upload"
    try:
        as_user("alice", ["sh", "-c", f"echo precious > {victim} && echo payload > {src}"])
        # bob guesses where alice stages her input, and plants links there: to her file, to her home
        on(a, "bob", f"ln -s {victim} /tmp/{tag}-in.dat && ln -s /home/alice /tmp/{tag}-stage")
        for dst in (f"/tmp/{tag}-in.dat", f"/tmp/{tag}-stage/", f"/tmp/{tag}-stage/{tag}-victim"):
            out = dxflow("alice", "cp", "-q", str(src), f"{job_id}:{a}:{dst}", check=False, timeout=60)
            assert out.returncode == 9 and "belongs to another user" in out.stderr, (dst, out.returncode, out.stderr)
        assert victim.read_text() == "precious\n"
        assert src.read_text() == "payload\n"
        assert sorted(p.name for p in Path("/home/alice").glob(f"{tag}*")) == [f"{tag}-upload", f"{tag}-victim"]
        # nor is what the links point to read through them
        status, _ = ask("alice", job_id, a, "/api/files/content", f"/tmp/{tag}-in.dat")
        assert status == 403
        # alice's own link in /tmp is hers: it is followed (into her home)
        on(a, "alice", f"ln -s {victim} /tmp/{tag}-mine")
        status, body = ask("alice", job_id, a, "/api/files/content", f"/tmp/{tag}-mine")
        assert (status, body) == (200, "precious\n")
    finally:
        victim.unlink(missing_ok=True)
        src.unlink(missing_ok=True)


def test_alices_file_in_tmp_is_not_served_to_bobs_agent(job, bob_job, tag):
    _, (a, _) = job
    on(a, "alice", f"echo alice-data > /tmp/{tag}-a && chmod 644 /tmp/{tag}-a")
    out = dxflow("bob", "cp", "-q", f"{bob_job}:{a}:/tmp/{tag}-a", f"/home/bob/{tag}", check=False, timeout=60)
    try:
        assert out.returncode == 9 and "belongs to another user" in out.stderr, (out.returncode, out.stderr)
        assert not Path(f"/home/bob/{tag}").exists()
    finally:
        Path(f"/home/bob/{tag}").unlink(missing_ok=True)


def test_the_lab_daemons_of_a_node_run_in_its_mount_namespace(nodes):
    layout = Layout()
    for node in nodes:
        ns = os.stat(mounts.ns_file(layout, node)).st_ino
        for pidfile in (layout.slurmd_pidfile(Node(int(node[1:]))), layout.sshd_pidfile(Node(int(node[1:])))):
            pid = int(pidfile.read_text().split()[0])
            assert os.stat(f"/proc/{pid}/ns/mnt").st_ino == ns, (node, pidfile)


def test_a_node_mount_namespace_is_made_again_unchanged_and_removed_whole(tmp_path):
    """What ``lab up`` and ``lab down`` do for a node, on a layout of its own (the running lab is left alone)."""
    layout = Layout(root=tmp_path / "root", runtime=tmp_path / "run")
    node = Node(97)
    try:
        path = mounts.ensure_node(layout, node)
        assert mounts.has_namespace(layout, node)
        run(["nsenter", f"--mount={path}", "sh", "-c", "echo private > /tmp/dxlocal-probe"])
        assert (mounts.data_dir(layout, node) / "tmp" / "dxlocal-probe").read_text() == "private\n"
        assert not Path("/tmp/dxlocal-probe").exists()
        inode = os.stat(path).st_ino
        mounts.ensure_node(layout, node)  # again: the same namespace, not a new one
        assert os.stat(path).st_ino == inode
    finally:
        mounts.remove_all(layout)
    assert not mounts.has_namespace(layout, node)
    assert not mounts.mounted_at(mounts.ns_dir(layout))
    assert not (layout.root / "nodes").exists()
    assert Path("/local").is_dir()  # the lab's own mount point, made before this test, stays


def test_restart_node_leaves_daemons_already_in_place_alone_and_refuses_other_names(nodes):
    layout = Layout()
    node = Node(int(nodes[0][1:]))
    before = [layout.slurmd_pidfile(node).read_text(), layout.sshd_pidfile(node).read_text()]
    run(["/usr/local/bin/dxflow", "lab", "restart-node", node.name], timeout=120)
    assert [layout.slurmd_pidfile(node).read_text(), layout.sshd_pidfile(node).read_text()] == before
    bad = run(["/usr/local/bin/dxflow", "lab", "restart-node", "login"], check=False)
    assert bad.returncode == 2 and "is not a lab node name" in bad.stderr
    absent = run(["/usr/local/bin/dxflow", "lab", "restart-node", "n99"], check=False)
    assert absent.returncode == 1 and "n99 is not a node of this lab" in absent.stderr
