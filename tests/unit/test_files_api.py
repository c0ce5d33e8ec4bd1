"""``/api/files`` through a Flask test client: every operation, and every kind of escape refused."""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path

import pytest


def snapshot(root: Path) -> dict:
    """Every file and folder under root with its content and mtime (to prove nothing changed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p)] = (st.st_mtime_ns, p.read_bytes() if p.is_file() else None)
    return out


def test_token_required(client):
    c = client.application.test_client()
    assert c.get("/api/files/roots").status_code == 401


def test_roots(client, tree):
    roots = client.get("/api/files/roots").get_json()
    assert [r["name"] for r in roots] == ["workdir", "home", "scratch"]
    assert roots[2]["path"] == str((tree / "scratch/alice").resolve())


def test_list_and_stat(client, tree):
    work = tree / "home/alice/job"
    (work / "b.txt").write_bytes(b"hello")
    (work / "sub").mkdir()
    (work / "ln").symlink_to("b.txt")
    body = client.get("/api/files").get_json()
    assert body["path"] == str(work.resolve())
    assert [(e["name"], e["type"]) for e in body["entries"]] == [("b.txt", "file"), ("ln", "link"), ("sub", "dir")]
    assert body["entries"][0]["size"] == 5 and body["entries"][0]["mode"] == (work / "b.txt").stat().st_mode & 0o777
    st = client.get("/api/files/stat", query_string={"path": "b.txt", "sha256": "1"}).get_json()
    assert st["type"] == "file" and st["size"] == 5 and st["sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert "sha256" not in client.get("/api/files/stat?path=b.txt").get_json()
    assert client.get("/api/files?path=b.txt").status_code == 400
    assert client.get("/api/files?path=nothing").status_code == 404
    assert client.get("/api/files/stat?path=nothing").status_code == 404


def test_download_and_ranges(client, tree):
    data = os.urandom(3 * 1024 * 1024 + 17)
    (tree / "home/alice/job/big").write_bytes(data)
    r = client.get("/api/files/content?path=big")
    assert r.status_code == 200 and r.data == data
    assert r.headers["Content-Length"] == str(len(data)) and r.headers["Accept-Ranges"] == "bytes"
    r = client.get("/api/files/content?path=big", headers={"Range": "bytes=1000000-"})
    assert r.status_code == 206 and r.data == data[1000000:]
    assert r.headers["Content-Range"] == f"bytes 1000000-{len(data) - 1}/{len(data)}"
    r = client.get("/api/files/content?path=big", headers={"Range": "bytes=10-19"})
    assert r.status_code == 206 and r.data == data[10:20]
    r = client.get("/api/files/content?path=big", headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(data)}"
    assert client.get("/api/files/content?path=.").status_code == 400
    assert client.get("/api/files/content?path=missing").status_code == 404


def test_upload(client, tree):
    work = tree / "home/alice/job"
    data = os.urandom(2 * 1024 * 1024 + 5)
    r = client.put("/api/files/content?path=up.bin", data=data)
    assert r.status_code == 201
    assert r.get_json() == {"path": str((work / "up.bin").resolve()), "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()}
    assert (work / "up.bin").read_bytes() == data
    r = client.put("/api/files/content?path=up.bin", data=b"new")
    assert r.status_code == 400 and "overwrite" in r.get_json()["message"]
    os.chmod(work / "up.bin", 0o640)
    r = client.put("/api/files/content?path=up.bin&overwrite=1", data=b"new")
    assert r.status_code == 200 and (work / "up.bin").read_bytes() == b"new"
    assert (work / "up.bin").stat().st_mode & 0o777 == 0o640  # a replaced file keeps its mode
    assert client.put("/api/files/content?path=.", data=b"x").status_code == 400
    assert client.put("/api/files/content?path=no/such/folder/f", data=b"x").status_code == 404
    assert sorted(p.name for p in work.iterdir()) == ["up.bin"]  # no temporary file left


def test_broken_upload_leaves_nothing(client, tree):
    work = tree / "home/alice/job"
    (work / "keep.bin").write_bytes(b"old")
    for name, query in (("keep.bin", "&overwrite=1"), ("new.bin", "")):
        # the client says 1 MiB but the connection ends after 1000 bytes
        r = client.put(f"/api/files/content?path={name}{query}", input_stream=io.BytesIO(b"x" * 1000),
                       environ_overrides={"CONTENT_LENGTH": str(1 << 20)})
        assert r.status_code == 400
    assert (work / "keep.bin").read_bytes() == b"old"
    assert sorted(p.name for p in work.iterdir()) == ["keep.bin"]


def test_mkdir_move_delete(client, tree):
    work = tree / "home/alice/job"
    assert client.post("/api/files/mkdir", json={"path": "a/b"}).status_code == 404
    assert client.post("/api/files/mkdir", json={"path": "a/b", "parents": True}).status_code == 201
    assert client.post("/api/files/mkdir", json={"path": "a/b", "parents": True}).status_code == 201
    assert client.post("/api/files/mkdir", json={"path": "a"}).status_code == 400
    assert client.post("/api/files/mkdir", json={}).status_code == 400
    (work / "a/b/f").write_text("f")
    r = client.post("/api/files/move", json={"src": "a/b/f", "dst": "g"})
    assert r.status_code == 200 and (work / "g").read_text() == "f"
    (work / "h").write_text("h")
    assert client.post("/api/files/move", json={"src": "g", "dst": "h"}).status_code == 400
    assert client.post("/api/files/move", json={"src": "g", "dst": "h", "overwrite": True}).status_code == 200
    assert (work / "h").read_text() == "f" and not (work / "g").exists()
    assert client.post("/api/files/move", json={"src": "missing", "dst": "x"}).status_code == 404
    assert client.delete("/api/files?path=a").status_code == 400  # not empty
    assert client.delete("/api/files?path=a&recursive=1").status_code == 200 and not (work / "a").exists()
    assert client.delete("/api/files?path=h").status_code == 200 and not (work / "h").exists()
    assert client.delete("/api/files?path=h").status_code == 404


def test_roots_themselves_stay(client, tree):
    home = tree / "home/alice"
    assert client.delete("/api/files", query_string={"path": str(home), "recursive": "1"}).status_code == 403
    assert client.delete("/api/files?path=.&recursive=1").status_code == 403
    assert client.post("/api/files/move", json={"src": ".", "dst": "../moved"}).status_code == 403
    assert (home / "job").is_dir()


def test_deleting_a_symlink_removes_only_the_link(client, tree):
    before = snapshot(tree / "outside")
    assert client.delete("/api/files?path=../etc&recursive=1").status_code == 200
    assert not (tree / "home/alice/etc").is_symlink()
    assert snapshot(tree / "outside") == before


ESCAPES = {
    "dotdot": "../../../outside/sentinel",
    "absolute": "{tmp}/outside/sentinel",
    "symlinked folder": "../etc/sentinel",
    "other user": "{tmp}/home/bob/secret",
    "system": "/etc/passwd",
    "private": "../.dxflow/id_rsa",
    "nul": "a\x00b",
    "long name": "x" * 300,
}


@pytest.mark.parametrize("kind", list(ESCAPES))
def test_escapes_refused_and_change_nothing(client, tree, kind):
    path = ESCAPES[kind].format(tmp=tree)
    want = 400 if kind in ("nul", "long name") else 403
    before = {p: snapshot(tree / p) for p in ("outside", "home/bob", "home/alice/.dxflow")}
    calls = [
        client.get("/api/files", query_string={"path": path}),
        client.get("/api/files/stat", query_string={"path": path, "sha256": "1"}),
        client.get("/api/files/content", query_string={"path": path}),
        client.put("/api/files/content", query_string={"path": path, "overwrite": "1"}, data=b"pwned"),
        client.post("/api/files/mkdir", json={"path": path + "-dir", "parents": True}),
        client.post("/api/files/move", json={"src": path, "dst": "moved", "overwrite": True}),
        client.delete("/api/files", query_string={"path": path, "recursive": "1"}),
    ]
    (tree / "home/alice/job/mine").write_text("mine")
    calls.append(client.post("/api/files/move", json={"src": "mine", "dst": path, "overwrite": True}))
    for r in calls:
        assert r.status_code == want, (r.request.method, r.request.path, r.get_json())
        assert r.get_json()["message"]
    assert {p: snapshot(tree / p) for p in before} == before
    assert (tree / "outside/sentinel").read_text() == "keep"


def test_symlinked_file_is_not_read_or_written_through(client, tree):
    before = snapshot(tree / "outside")
    calls = [
        client.get("/api/files/stat", query_string={"path": "../passwd", "sha256": "1"}),
        client.get("/api/files/content", query_string={"path": "../passwd"}),
        client.get("/api/files", query_string={"path": "../passwd"}),
        client.put("/api/files/content", query_string={"path": "../passwd", "overwrite": "1"}, data=b"pwned"),
    ]
    assert [r.status_code for r in calls] == [403] * 4
    assert snapshot(tree / "outside") == before
    assert (tree / "home/alice/passwd").is_symlink()


def test_openapi_fragment_covers_every_route(client):
    from dxflow.agent.files import OPENAPI
    rules = {r.rule for r in client.application.url_map.iter_rules() if r.endpoint.startswith("files.")}
    assert rules == set(OPENAPI)


@pytest.mark.parametrize("header", ["bytes=3871-,-107,351-", "bytes=-107", "bytes=5-2", "bytes=0-0", "items=0-5",
                                    "bytes=99999999-", "garbage"])
def test_odd_ranges(client, tree, header):
    data = os.urandom(5000)
    (tree / "home/alice/job/f").write_bytes(data)
    r = client.get("/api/files/content?path=f", headers={"Range": header})
    assert r.status_code in (200, 206, 416), r.data[:300]
    if r.status_code == 200:
        assert r.data == data


@pytest.mark.parametrize("name", ["plain.txt", "𝕿𝖍𝖊 quick.bin", 'quo"te\\.txt', "été.csv"])
def test_download_header_stays_latin1(client, tree, name):
    (tree / "home/alice/job" / name).write_bytes(b"x")
    r = client.get("/api/files/content", query_string={"path": name})
    assert r.status_code == 200 and r.data == b"x"
    r.headers["Content-Disposition"].encode("latin-1")  # what gunicorn will do with it
