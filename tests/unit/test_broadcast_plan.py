"""The shape of a broadcast (``dxflow cp FILE JOB:all:PATH``): the tree the login node draws, the plan each
agent checks before it passes anything on, the summary that names failed nodes, and an agent's own part
(write, verify by sha256, or drop) through a test client of the real app."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from dxflow.agent.broadcast import depth, read_plan, subtree
from dxflow.cli.broadcast import Outcome, plan_sources, specs, summary, tree
from dxflow.errors import NotFound, UsageError

NODES = [f"n{i}" for i in range(1, 33)]
SHA = "0" * 64


def parents(shape, up=None, out=None):
    out = {} if out is None else out
    out[shape.node] = up
    for c in shape.children:
        parents(c, shape.node, out)
    return out


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 32, 64])
@pytest.mark.parametrize("fanout", [1, 2, 3, 8])
def test_tree_holds_every_node_once_rooted_at_the_first(count, fanout):
    nodes = [f"n{i}" for i in range(1, count + 1)]
    shape = tree(nodes, fanout)
    assert shape.node == "n1"
    assert sorted(shape.nodes()) == sorted(nodes) and len(shape.nodes()) == count
    up = parents(shape)
    assert all(sum(1 for p in up.values() if p == n) <= fanout for n in nodes)


@pytest.mark.parametrize("count, fanout", [(32, 2), (64, 2), (64, 4), (5, 1)])
def test_tree_is_as_shallow_as_its_fanout_allows(count, fanout):
    shape = tree([f"n{i}" for i in range(count)], fanout)
    full = count if fanout == 1 else math.ceil(math.log(count * (fanout - 1) + 1, fanout))
    assert shape.depth() == full


def test_a_fanout_below_one_is_refused():
    with pytest.raises(UsageError):
        tree(NODES, 0)


def test_specs_carry_each_nodes_own_token_and_subtree():
    shape = tree(NODES[:4], 2)
    peers = {n: {"node": n, "address": n, "port": 40000 + i, "public_key": f"key-{n}", "token": f"tok-{n}"}
             for i, n in enumerate(NODES[:4])}
    children = specs(shape.children, peers)
    assert [c["node"] for c in children] == ["n2", "n3"]
    assert children[0]["children"][0]["token"] == "tok-n4" and children[0]["children"][0]["port"] == 40003
    plan = read_plan(f'{{"op": "file", "path": "x", "size": 3, "sha256": "{SHA}", "children": '
                     f'{__import__("json").dumps(children)}}}'.encode())
    assert subtree(plan["children"][0]) == ["n2", "n4"] and depth(plan["children"][0]) == 1


@pytest.mark.parametrize("line", [
    b"not json", b"[]", b'{"op": "rm"}', b'{"op": "file", "path": "x", "size": -1, "sha256": "' + SHA.encode() + b'"}',
    b'{"op": "file", "path": "x", "size": 3}', b'{"op": "mkdir", "paths": "x"}',
    b'{"op": "mkdir", "paths": ["x"], "children": [{"node": "n2"}]}',
    b'{"op": "mkdir", "paths": ["x"], "children": [{"node": "n2", "address": "n2", "port": "22", '
    b'"public_key": "k", "token": "t", "children": []}]}',
])
def test_a_malformed_plan_is_refused_before_anything_moves(line):
    with pytest.raises(UsageError):
        read_plan(line)


def test_a_plan_nested_without_end_is_refused():
    child: dict = {"node": "n", "address": "n", "port": 1, "public_key": "k", "token": "t", "children": []}
    for _ in range(80):
        child = {**child, "children": [child]}
    with pytest.raises(UsageError, match="deeper"):
        read_plan(__import__("json").dumps({"op": "mkdir", "paths": [], "children": [child]}).encode())


def test_sources_become_folders_parents_first_and_files(tmp_path: Path):
    src = tmp_path / "data"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("1")
    (src / "a" / "b" / "deep.txt").write_text("2")
    (src / "link").symlink_to(src / "a")  # a symlink to a folder is not followed
    folders, files = plan_sources([src], "/dst", recursive=True, many=False, is_folder=True)
    assert folders == ["/dst/data", "/dst/data/a", "/dst/data/a/b"]
    assert sorted(t for _, t in files) == ["/dst/data/a/b/deep.txt", "/dst/data/top.txt"]
    with pytest.raises(UsageError, match="-r"):
        plan_sources([src], "/dst", recursive=False, many=False, is_folder=True)
    with pytest.raises(NotFound):
        plan_sources([tmp_path / "missing"], "/dst", recursive=False, many=False, is_folder=True)


def test_summary_folds_the_nodes_that_failed_alike():
    outcomes = [Outcome("n1"), Outcome("n2", error="lost"), Outcome("n3", error="lost"), Outcome("n5", error="full")]
    assert summary(outcomes) == "n[2-3]: lost; n5: full"


# -- the agent's own part, through a Flask test client of the real app ---------------------------------------

def put(client, plan: dict, body: bytes):
    import json

    return client.put("/api/broadcast", data=json.dumps(plan).encode() + b"\n" + body,
                      content_type="application/octet-stream")


def lines_of(resp) -> list[dict]:
    import json

    return [json.loads(t) for t in resp.data.splitlines() if t.strip()]


def test_the_agent_writes_a_file_with_the_plans_sha256(client, tree):
    import hashlib

    body = b"x" * 100_000
    r = put(client, {"op": "file", "path": "in.bin", "size": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                     "overwrite": True, "children": []}, body)
    assert r.status_code == 200
    (line,) = lines_of(r)
    assert line["ok"] and line["size"] == len(body) and line["sha256"] == hashlib.sha256(body).hexdigest()
    assert (tree / "home/alice/job/in.bin").read_bytes() == body


def test_the_agent_drops_bytes_that_do_not_hash_to_the_plans_sha256(client, tree):
    work = tree / "home/alice/job"
    (work / "keep.bin").write_bytes(b"old")
    r = put(client, {"op": "file", "path": "keep.bin", "size": 3, "sha256": SHA, "overwrite": True}, b"new")
    (line,) = lines_of(r)
    assert not line["ok"] and "dropped" in line["error"] and not line["reroute"]
    assert (work / "keep.bin").read_bytes() == b"old"
    assert not [p for p in work.iterdir() if p.name.startswith(".dxflow-upload-")]


def test_a_path_outside_the_roots_is_this_nodes_error_alone(client, tree):
    import hashlib

    r = put(client, {"op": "file", "path": "/etc/passwd", "size": 1, "sha256": hashlib.sha256(b"x").hexdigest()},
            b"x")
    (line,) = lines_of(r)
    assert not line["ok"] and line["node"] == "n1"


def test_folders_are_made_and_a_body_of_another_length_is_refused(client, tree):
    r = put(client, {"op": "mkdir", "paths": ["a/b/c", "a/d"]}, b"")
    assert lines_of(r)[0]["ok"] and (tree / "home/alice/job/a/b/c").is_dir()
    r = put(client, {"op": "file", "path": "short.bin", "size": 10, "sha256": SHA}, b"abc")
    assert r.status_code == 400
    assert not (tree / "home/alice/job/short.bin").exists()
