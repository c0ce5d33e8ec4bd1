"""``dxflow cp`` against a real agent app on loopback, with the master seam faked at one place."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path
from urllib.parse import unquote

import pytest
from werkzeug.serving import make_server

from dxflow.cli.files import PART_SUFFIX, Copier, Location, parse_location
from dxflow.errors import AccessDenied, DxflowError, NotFound, UsageError
from dxflow.master.client import MasterClient


@pytest.mark.parametrize("text, want", [
    ("file.txt", Location("file.txt")),
    ("./a:b", Location("./a:b")),
    ("/abs/x:y", Location("/abs/x:y")),
    ("dir/a:b", Location("dir/a:b")),
    ("123:", Location("", "123")),
    ("123:data/x", Location("data/x", "123")),
    ("123:/abs/p", Location("/abs/p", "123")),
    ("123:n2:rel", Location("rel", "123", "n2")),
    ("123:n2:", Location("", "123", "n2")),
    ("123:n2:/abs:colon", Location("/abs:colon", "123", "n2")),
    ("123:/abs:colon", Location("/abs:colon", "123")),
])
def test_parse_location(text, want):
    assert parse_location(text) == want


def test_parse_location_needs_a_job():
    with pytest.raises(UsageError, match="JOB is missing"):
        parse_location(":x")


class FakeMaster:
    """Stands in for the user's master on its Unix socket: ``/api/fleet/JOB/NODE/<path>`` goes
    straight to one agent app, with the token added; the real MasterClient talks to it."""

    def __init__(self, agent_app, token: str) -> None:
        self.agent_app = agent_app
        self.token = token
        self.requests: list[tuple[str, str, dict]] = []

    def __call__(self, environ, start_response):
        path = environ["PATH_INFO"]
        if path == "/api/master":
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"pid": 1}']
        assert path.startswith("/api/fleet/"), path
        environ["PATH_INFO"] = "/" + path.split("/", 5)[5]
        environ["HTTP_AUTHORIZATION"] = f"Bearer {self.token}"
        self.requests.append((environ["REQUEST_METHOD"], environ["PATH_INFO"] + "?" + unquote(
            environ.get("QUERY_STRING", "")), {"Range": environ.get("HTTP_RANGE")}))
        return self.agent_app(environ, start_response)


@pytest.fixture
def tree(tmp_path):
    home = tmp_path / "home"
    (home / "job").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (tmp_path / "local").mkdir()
    return tmp_path


@pytest.fixture
def master(tree, make_agent):
    """(the real MasterClient, the fake master it talks to)."""
    agent, state, headers = make_agent({"TESTING": False, "FILE_SCRATCH_ROOTS": []}, cluster="c", user="alice",
                                       home=tree / "home", work_dir=str(tree / "home" / "job"))
    fake = FakeMaster(agent.application, headers["Authorization"].removeprefix("Bearer "))
    base = tree / "base"
    base.mkdir()
    server = make_server(f"unix://{MasterClient(base).sock}", 0, fake, threaded=True)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    client = MasterClient(base)
    client.fake = fake
    yield client
    server.shutdown()
    server.server_close()


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_upload_and_download_a_file(master, tree):
    local = tree / "local" / "data.bin"
    local.write_bytes(os.urandom(3 * 1024 * 1024 + 1))
    cp = Copier(master, quiet=True, recursive=False)
    cp.upload(local, parse_location("42:"), many=False)
    assert sha(tree / "home/job/data.bin") == sha(local)
    cp.upload(local, parse_location("42:n1:renamed.bin"), many=False)
    assert sha(tree / "home/job/renamed.bin") == sha(local)
    out = tree / "local" / "back"
    out.mkdir()
    cp.download(parse_location("42:data.bin"), str(out), many=False)
    assert sha(out / "data.bin") == sha(local)
    assert not (out / ("data.bin" + PART_SUFFIX)).exists()
    cp.download(parse_location(f"42:{tree}/home/job/renamed.bin"), str(out / "x.bin"), many=False)
    assert sha(out / "x.bin") == sha(local)


def test_download_resumes_from_the_part_file(master, tree):
    data = os.urandom(5 * 1024 * 1024)
    (tree / "home/job/big").write_bytes(data)
    dst = tree / "local" / "big"
    Path(str(dst) + PART_SUFFIX).write_bytes(data[:2_000_000])
    cp = Copier(master, quiet=True, recursive=False)
    cp.download(parse_location("42:big"), str(dst), many=False)
    assert dst.read_bytes() == data and cp.bytes == len(data) - 2_000_000
    gets = [h for m, p, h in master.fake.requests if m == "GET" and p.startswith("/api/files/content")]
    assert gets[-1]["Range"] == "bytes=2000000-"


def test_download_of_a_changed_file_fails_the_check_and_starts_over(master, tree):
    data = os.urandom(1024 * 1024)
    (tree / "home/job/f").write_bytes(data)
    dst = tree / "local" / "f"
    part = Path(str(dst) + PART_SUFFIX)
    part.write_bytes(b"not the same start" * 100)
    cp = Copier(master, quiet=True, recursive=False)
    with pytest.raises(DxflowError, match="sha256"):
        cp.download(parse_location("42:f"), str(dst), many=False)
    assert not part.exists() and not dst.exists()
    cp.download(parse_location("42:f"), str(dst), many=False)
    assert dst.read_bytes() == data


def test_recursive_both_ways(master, tree):
    src = tree / "local" / "tree"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "a" / "b" / "deep.bin").write_bytes(os.urandom(70000))
    (src / "empty").mkdir()
    cp = Copier(master, quiet=True, recursive=True)
    cp.upload(src, parse_location("42:"), many=False)
    remote = tree / "home/job/tree"
    assert (remote / "top.txt").read_text() == "top" and (remote / "empty").is_dir()
    assert sha(remote / "a/b/deep.bin") == sha(src / "a/b/deep.bin")
    back = tree / "local" / "back"
    cp.download(parse_location("42:tree"), str(back), many=False)  # DST missing: DST becomes the copy
    assert sha(back / "a/b/deep.bin") == sha(src / "a/b/deep.bin") and (back / "empty").is_dir()
    with pytest.raises(UsageError, match="-r"):
        Copier(master, quiet=True, recursive=False).download(parse_location("42:tree"), str(back), many=False)


def test_refusals_surface_as_errors(master, tree):
    (tree / "outside" / "secret").write_text("s")
    local = tree / "local" / "f"
    local.write_text("x")
    cp = Copier(master, quiet=True, recursive=False)
    with pytest.raises(AccessDenied, match="outside"):
        cp.download(parse_location(f"42:{tree}/outside/secret"), str(tree / "local"), many=False)
    with pytest.raises(AccessDenied):
        cp.upload(local, parse_location("42:../../outside/f"), many=False)
    with pytest.raises(NotFound):
        cp.upload(local, parse_location("42:no/such/dir/f"), many=False)
    with pytest.raises(NotFound):
        cp.download(parse_location("42:missing"), str(tree / "local"), many=False)
    assert sorted(os.listdir(tree / "outside")) == ["secret"]


def test_relay_response_reads_what_has_arrived():
    """The master's relay must pass on a live stream's first bytes without waiting for more."""
    from dxflow.edge.channelhttp import ChannelResponse

    class Channel:  # what a paramiko channel offers: recv, and a file without read1
        def __init__(self, sock):
            self.sock = sock

        def recv(self, n):
            return self.sock.recv(n)

        def makefile(self, mode):
            class NoRead1:
                def close(self):
                    pass
            return NoRead1()

    a, b = socket.socketpair()
    a.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    b.settimeout(5)
    resp = ChannelResponse(Channel(b), method="GET")
    resp.begin()
    assert resp.read1(256 * 1024) == b"hello"  # the stream stays open: read(n) would block here
    a.sendall(b"0\r\n\r\n")
    assert resp.read1(1024) == b""
    a.close()
    b.close()


def test_refused_big_upload_reports_the_refusal(master, tree):
    """The agent answers 403 without reading a 20 MB body: the answer, not a broken pipe, reaches the user."""
    from dxflow.cli.files import Agent
    from dxflow.master.client import check

    agent = Agent(master, "42", None)
    size = 20 * 1024 * 1024
    body = (b"x" * (1 << 20) for _ in range(20))
    resp = agent.upload(agent.url("/api/files/content", path=f"{tree}/outside/big"), body,
                        {"Content-Length": str(size)})
    with pytest.raises(AccessDenied, match="outside"):
        check(resp)
    assert not (tree / "outside" / "big").exists()
