"""``PUT /api/files/content?resume=KEY``: a broken upload keeps its bytes, the next one sends only the rest."""

from __future__ import annotations

import hashlib
import io
import os

KEY = "0123456789abcdef0123456789abcdef"
PART = f".dxflow-upload-{KEY}.part"


def put(client, query: str, body: bytes, claimed: int | None = None):
    """PUT ``body``; with ``claimed``, the client says that many bytes and the connection ends after ``body``."""
    extra = {"environ_overrides": {"CONTENT_LENGTH": str(claimed)}} if claimed is not None else {}
    return client.put(f"/api/files/content?path=up.bin&overwrite=1&resume={KEY}&{query}",
                      input_stream=io.BytesIO(body), **extra)


def test_broken_upload_is_kept_and_resumed_from_its_offset(client, tree):
    work = tree / "home/alice/job"
    (work / "up.bin").write_bytes(b"old")
    data = os.urandom(3 * 1024 * 1024 + 7)
    cut = 1024 * 1024 + 3
    r = put(client, "offset=0", data[:cut], claimed=len(data))
    assert r.status_code == 400 and "kept" in r.get_json()["message"]
    assert (work / "up.bin").read_bytes() == b"old"  # the target is left as it was
    assert (work / PART).read_bytes() == data[:cut]
    st = client.get(f"/api/files/stat?path={PART}").get_json()  # how the client learns where to go on
    assert st["size"] == cut
    r = put(client, f"offset={cut}&sha256={hashlib.sha256(data).hexdigest()}", data[cut:])
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["size"] == len(data) and r.get_json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert (work / "up.bin").read_bytes() == data
    assert sorted(p.name for p in work.iterdir()) == ["up.bin"]  # the partial file became the target


def test_resumed_upload_with_the_wrong_sha256_leaves_the_target(client, tree):
    work = tree / "home/alice/job"
    (work / "up.bin").write_bytes(b"old")
    put(client, "offset=0", b"a" * 100, claimed=200)
    r = put(client, f"offset=100&sha256={hashlib.sha256(b'b' * 200).hexdigest()}", b"a" * 100)
    assert r.status_code == 400 and "hash" in r.get_json()["message"]
    assert (work / "up.bin").read_bytes() == b"old"
    assert sorted(p.name for p in work.iterdir()) == ["up.bin"]  # the bad bytes are dropped


def test_resume_past_the_kept_bytes_or_with_a_bad_key_is_refused(client, tree):
    work = tree / "home/alice/job"
    put(client, "offset=0", b"a" * 10, claimed=20)
    assert put(client, "offset=50", b"a" * 10).status_code == 400
    r = client.put("/api/files/content?path=up.bin&resume=../../etc&offset=0", data=b"x")
    assert r.status_code == 400
    (work / "elsewhere").write_text("keep")
    os.unlink(work / PART)
    os.symlink(work / "elsewhere", work / PART)  # a planted link at the partial name is not followed
    assert put(client, "offset=0", b"zz").status_code >= 400
    assert (work / "elsewhere").read_text() == "keep"
