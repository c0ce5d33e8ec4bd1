"""FIFOs and devices where the agent expects a file: refused at once (400), never waited on.

``open(2)`` on a FIFO waits for a writer and ``/dev/zero`` never ends: either would pin
one of the agent's few worker threads for good. Each request here runs in a thread of
its own, so a request that hangs fails the test instead of hanging it.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from dxflow.agent.paths import open_regular
from dxflow.errors import UsageError

GENEROUS = 30.0  # seconds: "answers at all", not a measure of speed


def answer(request, *unblock: Path):
    """``request()``'s answer, or a failure if it has none within GENEROUS seconds (the FIFOs in
    ``unblock`` then get a writer, so that the stuck thread ends)."""
    box: list = []
    t = threading.Thread(target=lambda: box.append(request()), daemon=True)
    t.start()
    t.join(GENEROUS)
    if t.is_alive():
        for fifo in unblock:
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        pytest.fail(f"no answer within {GENEROUS:.0f} s: the request waits on a FIFO or a device")
    return box[0]


@pytest.fixture
def work(tmp_path):
    w = tmp_path / "work"
    w.mkdir()
    os.mkfifo(w / "fifo")
    (w / "to-fifo").symlink_to("fifo")
    (w / "plain.txt").write_bytes(b"a regular file\n")
    return w


@pytest.fixture
def agent_with(make_agent, work, tmp_path):
    """``agent_with(**state)``: a test client of an agent working in ``work`` (tests/conftest.py), with its
    user's token."""
    def make(**state_kw):
        # /dev as a scratch root: a site's scratch could hold a device; the roots would let it through
        client, _, headers = make_agent({"FILE_SCRATCH_ROOTS": ["/dev"]}, home=tmp_path, work_dir=str(work),
                                        **state_kw)
        client.environ_base["HTTP_AUTHORIZATION"] = headers["Authorization"]
        return client
    return make


@pytest.fixture
def agent(agent_with, work):
    return agent_with(stdout=str(work / "fifo"), stderr="/dev/zero")


@pytest.mark.parametrize("path, kind", [("fifo", "FIFO"), ("to-fifo", "FIFO"), ("/dev/zero", "character device")])
def test_download_of_a_fifo_or_a_device_is_refused(agent, work, path, kind):
    resp = answer(lambda: agent.get(f"/api/files/content?path={path}", buffered=False), work / "fifo")
    assert resp.status_code == 400, resp.status
    assert kind in resp.get_json()["message"]


def test_sha256_of_a_fifo_or_a_device_is_not_attempted(agent, work):
    for path in ("fifo", "/dev/zero"):
        resp = answer(lambda: agent.get(f"/api/files/stat?path={path}&sha256=1"), work / "fifo")
        assert resp.status_code == 200 and "sha256" not in resp.get_json(), resp.data
        assert resp.get_json()["type"] == "other"


def test_a_regular_file_still_downloads_and_a_fifo_is_still_listed(agent, work):
    resp = answer(lambda: agent.get("/api/files/content?path=plain.txt"))
    assert resp.status_code == 200 and resp.data == b"a regular file\n"
    resp = answer(lambda: agent.get("/api/files/stat?path=plain.txt&sha256=1"))
    assert resp.get_json()["sha256"]
    listing = answer(lambda: agent.get("/api/files")).get_json()["entries"]
    assert {e["name"]: e["type"] for e in listing} == {"fifo": "other", "plain.txt": "file", "to-fifo": "link"}


def test_a_download_of_a_folder_says_so(agent, work):
    (work / "sub").mkdir()
    resp = agent.get("/api/files/content?path=sub")
    assert resp.status_code == 400 and "folder" in resp.get_json()["message"]


@pytest.mark.parametrize("url", ["/api/logs/stdout", "/api/logs/stdout/follow", "/api/logs/stderr",
                                 "/api/logs/stderr/follow?lines=5"])
def test_logs_that_are_a_fifo_or_a_device_are_refused(agent, work, url):
    # unbuffered: an answer streaming /dev/zero fails on its status, instead of filling the memory
    resp = answer(lambda: agent.get(url, buffered=False), work / "fifo")
    assert resp.status_code == 400, resp.status
    assert resp.get_json()["message"].startswith(("stdout log:", "stderr log:"))


def test_a_regular_log_is_still_read_and_followed(agent_with, work):
    (work / "out.txt").write_text("line 1\nline 2\n")
    client = agent_with(stdout=str(work / "out.txt"), stderr=str(work / "out.txt"))
    assert answer(lambda: client.get("/api/logs/stdout?lines=1")).data == b"line 2\n"
    resp = answer(lambda: client.get("/api/logs/stdout/follow?lines=1", buffered=False))
    assert resp.status_code == 200
    stream = iter(resp.response)
    first = b""
    while b"line 2" not in first:
        first += answer(lambda: next(stream))
    resp.close()


def test_open_regular(work):
    with open_regular(work / "plain.txt", follow=False) as f:
        assert f.read() == b"a regular file\n" and os.get_blocking(f.fileno())
    with pytest.raises(OSError) as e:
        open_regular(work / "to-fifo", follow=False)  # O_NOFOLLOW: a symlink is not opened at all
    assert e.value.errno == errno.ELOOP
    with pytest.raises(UsageError, match="folder"):
        open_regular(work)
