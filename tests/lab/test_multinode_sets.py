"""Node sets and fan-out on a job of four nodes (issue #15 items 1, 2, 5 and 8), as alice.

tests/lab/test_multinode.py covers the same commands on whatever the job gets (two nodes on the demo
lab); here the job has four, so that what only shows with more than two can fail: a subset of the
job's nodes (``J:n[1-3]``-style, folded), ``J:all`` and ``J:*`` on every command that takes nodes
(exec, logs, cp, info, ports), --gather folding nodes that printed the same into one block,
exit codes and the summary folding nodes by outcome, one JSON record per node, a node whose link
goes silent mid-fan-out (its agent frozen: no byte, no keepalive) reported lost while the three others
finish, bad node sets (exit 2) and sets naming no node of the job (named, exit 5) on each command,
``logs J:all -f`` merging four streams, ``--path 'out-%N.log'``, and a download from every node's
own /tmp named after each node.

The job runs one task per node (``srun -o out-%N.log``, in the job's folder, its work dir) that
writes a tick every half second and serves ``python3 -m http.server`` on 127.0.0.1:PORT.
"""

from __future__ import annotations

import json
import os
import pwd
import random
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dxflow.lab import mounts
from dxflow.lab.layout import Layout
from dxflow.schedulers.hostlist import fold

from conftest import DXFLOW, Jobs, Lines, agent_pids, as_user, dxflow, popen_as, stop, wait_agents, wait_for

SIZE = 4
PORT = random.randint(20000, 29999)
TASK = ("python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 & "
        "while true; do echo tick $(hostname); sleep 0.5; done")
JOB_SCRIPT = "echo batch-started && srun -o out-%N.log sh -c {task}"
#: prints or exits by the node's place in the job: OUTCOME.sh A B C D (one word per node, in job order)
#: where a word is "echo:TEXT" or "exit:CODE"
BY_NODE = """#!/bin/sh
i=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | grep -nx "$(hostname)" | cut -d: -f1)
eval "word=\\${$i}"
case "$word" in
  echo:*) echo "${word#echo:}" ;;
  exit:*) echo "exiting ${word#exit:} on $(hostname)" >&2; exit "${word#exit:}" ;;
esac
"""


@pytest.fixture(scope="module")
def job(lab):
    if len(lab.get("nodes", [])) < SIZE:
        pytest.skip(f"the lab has {len(lab.get('nodes', []))} nodes, fewer than {SIZE}: "
                    f"`dxflow lab up --nodes {SIZE}` (scripts/test.sh does)")
    pw = pwd.getpwnam("alice")
    jobs = Jobs()
    d = Path(pw.pw_dir) / f"dxtest-sets-{os.getpid()}-{int(time.time())}"
    d.mkdir()
    (d / "by-node.sh").write_text(BY_NODE)
    (d / "by-node.sh").chmod(0o755)
    for p in (d, d / "by-node.sh"):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    try:
        # its work dir is its folder (the last --chdir wins): --path patterns are relative to it
        job_id = jobs.submit("alice", JOB_SCRIPT.format(task=shlex.quote(TASK.format(port=PORT))), f"--chdir={d}",
                             nodes=SIZE)
        jobs.wait_running(job_id, timeout=180)
        nodes = sorted((a["node"] for a in wait_agents("alice", job_id, SIZE, timeout=90)),
                       key=lambda n: int(re.sub(r"\D", "", n) or 0))
        wait_for(lambda: all((d / f"out-{n}.log").exists() for n in nodes), 30, what="each task's log")
        yield {"id": job_id, "dir": d, "nodes": nodes}
    finally:
        jobs.cancel_all()
        subprocess.run(["rm", "-rf", str(d)], check=False)


def by_node(job, *words: str) -> list[str]:
    return [str(job["dir"] / "by-node.sh"), *words]


# -- which nodes a set names -----------------------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["all", "*", "first-three", "last-and-first"])
def test_exec_runs_on_exactly_the_nodes_the_set_names(job, spelling):
    nodes = job["nodes"]
    want = {"all": nodes, "*": nodes, "first-three": nodes[:3], "last-and-first": [nodes[0], nodes[-1]]}[spelling]
    target = f"{job['id']}:{spelling if spelling in ('all', '*') else fold(want)}"
    out = dxflow("alice", "exec", target, "--", "hostname", timeout=90)
    assert sorted(out.stdout.splitlines()) == sorted(f"{n}: {n}" for n in want)


def test_info_and_ports_take_node_sets(job):
    nodes = job["nodes"]
    rows = json.loads(dxflow("alice", "info", f"{job['id']}:{fold(nodes[1:])}", "--json", timeout=90).stdout)
    assert sorted((r["node"], r["hostname"]) for r in rows) == [(n, n) for n in sorted(nodes[1:])]
    ports = json.loads(dxflow("alice", "ports", f"{job['id']}:*", "--json", timeout=90).stdout)
    assert sorted(p["node"] for p in ports if p["port"] == PORT) == sorted(nodes)


# -- fan-out exec: gather, exit codes, JSON ------------------------------------------------------------------------

def test_gather_folds_the_nodes_that_printed_the_same(job):
    n = job["nodes"]
    out = dxflow("alice", "exec", "--gather", f"{job['id']}:all", "--",
                 *by_node(job, "echo:odd", "echo:even", "echo:odd", "echo:even"), timeout=90).stdout
    blocks = {f"---------------\n{fold([n[0], n[2]])} (2)\n---------------\nodd\n",
              f"---------------\n{fold([n[1], n[3]])} (2)\n---------------\neven\n"}
    assert any(out == a + b for a in blocks for b in blocks if a != b), out
    same = dxflow("alice", "exec", "--gather", f"{job['id']}:*", "--", "echo", "same", timeout=90).stdout
    assert same == f"---------------\n{fold(n)} (4)\n---------------\nsame\n"


def test_exit_code_is_the_largest_and_the_summary_folds_nodes_by_outcome(job):
    n = job["nodes"]
    out = dxflow("alice", "exec", f"{job['id']}:all", "--",
                 *by_node(job, "echo:fine", "exit:3", "exit:4", "exit:4"), check=False, timeout=90)
    assert out.returncode == 4, out.stderr
    assert out.stdout == f"{n[0]}: fine\n"
    for node in n[1:]:
        assert re.search(rf"^{node}: exiting \d on {node}$", out.stderr, re.M), out.stderr
    assert f"3 of 4 nodes failed: {n[1]}: exit 3; {fold(n[2:])}: exit 4" in out.stderr, out.stderr
    ok = dxflow("alice", "exec", f"{job['id']}:all", "--", "true", check=False, timeout=90)
    assert (ok.returncode, ok.stderr) == (0, "")


def test_json_gives_one_record_per_node_of_four(job):
    n = job["nodes"]
    out = dxflow("alice", "exec", "--json", f"{job['id']}:all", "--",
                 *by_node(job, "echo:a", "echo:b", "exit:7", "echo:d"), check=False, timeout=90)
    records = {r["node"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert sorted(records) == sorted(n)
    assert [(records[x]["status"], records[x]["exit"]) for x in n] == [("ok", 0), ("ok", 0), ("failed", 7), ("ok", 0)]
    assert [records[x]["stdout"] for x in (n[0], n[1], n[3])] == ["a\n", "b\n", "d\n"]
    assert out.returncode == 7


def test_a_node_whose_link_goes_silent_mid_fanout_is_reported_lost_and_the_others_finish(job):
    """The agent of one node is frozen (SIGSTOP) after its command started: its connection stays open
    but nothing comes, not even the keepalive, as when a node's link is cut. The other three print
    their last line and the command ends, naming that node as lost."""
    nodes, victim = job["nodes"], job["nodes"][1]
    proc = popen_as("alice", [DXFLOW, "exec", f"{job['id']}:all", "--", "sh", "-c",
                              "echo started on $(hostname); sleep 5; echo finished on $(hostname)"])
    lines = Lines(proc)
    frozen: list[int] = []
    try:
        lines.wait_for(rf"^{victim}: started on {victim}$", 60)
        frozen = [p for p in agent_pids(job["id"])
                  if f"--node {victim} " in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")]
        assert frozen
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        finished: set[str] = set()
        while finished != set(nodes) - {victim}:  # in any order
            finished.add(lines.wait_for(r"^n\d+: finished on ", 60).split(":")[0])
        proc.wait(120)  # the silent node does not hold the command past its silence limit
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
        stop(proc)
    err = proc.stderr.read()
    assert proc.returncode == 255, err
    assert re.search(rf"1 of 4 nodes failed: {victim}: lost", err), err
    # thawed, the agent answers again
    assert dxflow("alice", "exec", f"{job['id']}:{victim}", "--", "hostname", timeout=90).stdout == f"{victim}\n"


# -- bad node sets on every command ---------------------------------------------------------------------------------

COMMANDS = {
    "exec": lambda t: ["exec", t, "--", "true"],
    "logs": lambda t: ["logs", t],
    "cp": lambda t: ["cp", f"{t}:out.txt", "/home/alice/"],
    "info": lambda t: ["info", t],
    "ports": lambda t: ["ports", t],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("nodes", ["n[1-", "n[4-1]", "n[a-b]", "n1,,n2"])
def test_a_node_set_of_bad_syntax_exits_2_with_one_line_on_every_command(job, command, nodes):
    out = dxflow("alice", *COMMANDS[command](f"{job['id']}:{nodes}"), check=False, timeout=60)
    assert out.returncode == 2, (command, nodes, out.returncode, out.stderr)
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_a_node_set_naming_no_node_of_the_job_is_named_on_every_command(job, command):
    out = dxflow("alice", *COMMANDS[command](f"{job['id']}:n[90-93]"), check=False, timeout=60)
    assert out.returncode == 5, (command, out.returncode, out.stderr)
    assert f"job {job['id']} runs on {fold(job['nodes'])}: n[90-93] is not one of its nodes" in out.stderr


# -- logs -------------------------------------------------------------------------------------------------------------

def test_logs_all_follow_merges_the_four_nodes_streams(job):
    proc = popen_as("alice", [DXFLOW, "logs", f"{job['id']}:all", "-f", "--path", "out-%N.log", "-n", "1"])
    try:
        lines = Lines(proc)
        seen = set()
        deadline = time.monotonic() + 60
        while seen != set(job["nodes"]) and time.monotonic() < deadline:
            line = lines.wait_for(r"^n\d+: tick n\d+$", 30)
            node, _, text = line.rstrip("\n").partition(": ")
            assert text == f"tick {node}", line  # each line from its own node's file
            seen.add(node)
        assert seen == set(job["nodes"])
    finally:
        stop(proc)


def test_logs_of_a_subset_read_only_those_nodes_files(job):
    subset = job["nodes"][2:]
    out = dxflow("alice", "logs", f"{job['id']}:{fold(subset)}", "--path", "out-%N.log", "-n", "2", timeout=90)
    got = [line.split(": ", 1) for line in out.stdout.splitlines()]
    assert sorted({node for node, _ in got}) == sorted(subset)
    assert all(text == f"tick {node}" for node, text in got), out.stdout


# -- cp from several nodes ---------------------------------------------------------------------------------------------

def test_download_from_a_subset_names_each_copy_after_its_node(job):
    dst = job["dir"] / "got-subset"
    as_user("alice", ["mkdir", str(dst)])
    subset = job["nodes"][:3]
    dxflow("alice", "cp", "-q", f"{job['id']}:{fold(subset)}:by-node.sh", str(dst), timeout=90)
    assert sorted(p.name for p in dst.iterdir()) == sorted(f"by-node.sh.{n}" for n in subset)


def test_download_of_each_nodes_own_tmp_file_from_all(job):
    if not all(mounts.has_namespace(Layout(), n) for n in job["nodes"]):
        pytest.skip("some of the job's nodes share the host's /tmp: the lab predates node-local storage "
                    "(`dxflow lab restart-node NODE` gives a node its own)")
    name = f"who-{job['id']}-{os.getpid()}"
    dxflow("alice", "exec", f"{job['id']}:all", "--", "sh", "-c", f"hostname > /tmp/{name}", timeout=90)
    dst = job["dir"] / "got-tmp"
    as_user("alice", ["mkdir", str(dst)])
    try:
        dxflow("alice", "cp", "-q", f"{job['id']}:all:/tmp/{name}", str(dst), timeout=90)
        assert {p.name: p.read_text() for p in dst.iterdir()} == {f"{name}.{n}": f"{n}\n" for n in job["nodes"]}
    finally:
        dxflow("alice", "exec", f"{job['id']}:all", "--", "rm", "-f", f"/tmp/{name}", check=False, timeout=90)
