"""``dxflow cp`` when an agent's answers name files that would land outside DST.

The real MasterClient talks to the fake master of ``test_files_cli`` (the seam ``dxflow cp``
uses), which hands each request to the real agent app through :class:`Liar`: it renames one
entry in the agent's answers (a listing's, or a stat's) and maps requests for the lying name
back to the real file, so an agent that lies also serves the content. Without the name check,
the copy would write outside DST.
"""

from __future__ import annotations

import json
import os
import posixpath
import threading
from pathlib import Path
from urllib.parse import parse_qsl, urlencode

import pytest
from werkzeug.serving import make_server

from dxflow.cli.files import Copier, parse_location, safe_name
from dxflow.errors import AccessDenied
from dxflow.master.client import MasterClient
from test_files_cli import FakeMaster, sha

BAD_NAMES = ["../../payload", "..", ".", "", "sub/payload", "/tmp/payload", "pay\x00load"]


class Liar:
    """WSGI middleware in front of an agent app: ``real`` is called ``fake`` in every JSON answer
    (once :meth:`lie` has said which; until then it tells the truth)."""

    def __init__(self, app) -> None:
        self.app = app
        self.real: str | None = None
        self.fake = ""
        self.content_requests: list[str] = []

    def lie(self, real: str, fake: str) -> None:
        self.real, self.fake = real, fake

    def __call__(self, environ, start_response):
        query = dict(parse_qsl(environ.get("QUERY_STRING", ""), keep_blank_values=True))
        path = query.get("path", "")
        if self.real is None:
            return self.app(environ, start_response)
        if posixpath.basename(path) == self.fake or path.endswith("/" + self.fake):
            # what a lying agent would serve for its made-up name: the real file
            query["path"] = path[: len(path) - len(self.fake)] + self.real
            environ["QUERY_STRING"] = urlencode(query)
        if environ["PATH_INFO"] == "/api/files/content":
            self.content_requests.append(query.get("path", ""))
        if environ["PATH_INFO"] not in ("/api/files", "/api/files/stat"):
            return self.app(environ, start_response)
        captured: dict = {}

        def capture(status, headers, exc_info=None):
            captured["status"], captured["headers"] = status, headers

        body = b"".join(self.app(environ, capture))
        if captured["status"].startswith("200"):
            answer = json.loads(body)
            for item in answer.get("entries", [answer]):
                if item.get("name") == self.real:
                    item["name"] = self.fake
            body = json.dumps(answer).encode()
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        start_response(captured["status"], headers + [("Content-Length", str(len(body)))])
        return [body]


def everything(root: Path) -> dict[str, bytes | None]:
    """Every path under root, with the content of each file (to prove nothing was written)."""
    out: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            out[str(p)] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


@pytest.fixture
def tree(tmp_path):
    """tmp_path/{home/job (the job's work dir), local (DST's side)}, and in the work dir tree/: a file
    at the top, the one to lie about two folders down."""
    top = tmp_path / "home/job/tree"
    (top / "a" / "sub").mkdir(parents=True)
    (tmp_path / "local").mkdir()
    (top / "first.txt").write_text("copied first, if the copy started before checking")
    (top / "a" / "sub" / "payload").write_text("export EVIL=1\n")
    (top / "a" / "sub" / "honest.txt").write_text("fine")
    return tmp_path


@pytest.fixture
def master(tree, make_agent):
    """The real MasterClient, its fake master serving the real agent app through a :class:`Liar`
    (``master.liar``)."""
    agent, state, headers = make_agent({"TESTING": False, "FILE_SCRATCH_ROOTS": []}, cluster="c", user="alice",
                                       home=tree / "home", work_dir=str(tree / "home" / "job"))
    liar = Liar(agent.application)
    fake = FakeMaster(liar, headers["Authorization"].removeprefix("Bearer "))
    base = tree / "base"
    base.mkdir()
    server = make_server(f"unix://{MasterClient(base).sock}", 0, fake, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    client = MasterClient(base)
    client.liar = liar  # type: ignore[attr-defined]
    yield client
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_safe_name_refuses_names_that_are_not_one_entry(bad):
    with pytest.raises(AccessDenied, match="nothing was copied"):
        safe_name(bad, "a listing")


@pytest.mark.parametrize("good", ["payload", ".bashrc", "..hidden", "a b", "ünï", "x:y", "-rf"])
def test_safe_name_keeps_plain_names(good):
    assert safe_name(good, "a listing") == good


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_cp_r_with_a_lying_listing_writes_nothing_at_all(master, tree, bad):
    liar = master.liar
    liar.lie("payload", bad)
    (tree / "local" / "mine").write_text("the user's own file")
    before = everything(tree)
    dst = tree / "local" / "copy"
    with pytest.raises(AccessDenied) as refused:
        Copier(master, quiet=True, recursive=True).download(parse_location("42:tree"), str(dst), many=False)
    assert repr(bad) in str(refused.value) and "a/sub" in str(refused.value)
    assert everything(tree) == before   # nothing outside DST, and not DST either
    assert liar.content_requests == []  # the whole tree was checked before the first byte was asked for


def test_cp_r_copies_the_same_tree_when_the_agent_tells_the_truth(master, tree):
    """The control: the setup above copies fine without the lie."""
    dst = tree / "local" / "copy"
    Copier(master, quiet=True, recursive=True).download(parse_location("42:tree"), str(dst), many=False)
    assert sha(dst / "a/sub/payload") == sha(tree / "home/job/tree/a/sub/payload")
    assert (dst / "first.txt").is_file() and (dst / "a/sub/honest.txt").read_text() == "fine"


@pytest.mark.parametrize("bad", ["../../.bashrc", "..", ""])
def test_cp_of_a_file_whose_own_name_is_a_lie_writes_nothing(master, tree, bad):
    (tree / "home/job/data.txt").write_text("data")
    master.liar.lie("data.txt", bad)
    before = everything(tree)
    with pytest.raises(AccessDenied, match="nothing was copied"):
        Copier(master, quiet=True, recursive=False).download(parse_location("42:data.txt"), str(tree / "local"),
                                                             many=False)
    assert everything(tree) == before
