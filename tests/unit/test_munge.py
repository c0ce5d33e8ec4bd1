"""dxflow.munge against the real munged of this host (the lab's; skipped where none runs), through
libmunge and through the munge/unmunge commands alike."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from dxflow import munge
from dxflow.errors import AuthError

pytestmark = pytest.mark.skipif(not Path("/run/munge/munge.socket.2").exists() or not shutil.which("unmunge"),
                                reason="needs a running munged (the lab's) and the munge commands")


@pytest.fixture(params=["libmunge", "commands"])
def way(request, monkeypatch):
    """Each test twice: through libmunge, and through the munge/unmunge commands (its fallback)."""
    if request.param == "commands":
        monkeypatch.setattr(munge, "_library", lambda: None)
    elif munge._library() is None:
        pytest.skip("libmunge.so.2 is not installed")
    return request.param


def test_a_credential_tells_who_made_it_and_its_payload(way):
    cred = munge.encode(b'{"job": "42"}\x00\xff', ttl=60)
    got = munge.decode(cred)
    assert (got.uid, got.gid) == (os.getuid(), os.getgid())
    assert got.payload == b'{"job": "42"}\x00\xff'
    assert got.ttl == 60 and abs(got.encode_time - time.time()) < 60
    assert got.encode_host.count(".") == 3


def test_an_empty_payload_is_fine(way):
    assert munge.decode(munge.encode()).payload == b""


@pytest.mark.skipif(os.getuid() != 0, reason="makes a credential as another user (runuser)")
def test_a_credential_made_by_another_user_carries_that_users_uid(way):
    bob = pwd.getpwnam("bob") if "bob" in {p.pw_name for p in pwd.getpwall()} else None
    if bob is None:
        pytest.skip("no user bob (the lab's)")
    cred = subprocess.run(["runuser", "-u", "bob", "--", "munge", "-s", "root please"], capture_output=True,
                          text=True, check=True).stdout.strip()
    got = munge.decode(cred)
    assert got.uid == bob.pw_uid != 0 and got.payload == b"root please"


def test_a_replayed_credential_is_refused(way):
    cred = munge.encode(b"once")
    munge.decode(cred)
    with pytest.raises(munge.MungeError, match="replayed") as e:
        munge.decode(cred)
    assert e.value.code == munge.CRED_REPLAYED and isinstance(e.value, AuthError)


def test_an_expired_credential_is_refused(way):
    cred = munge.encode(b"soon gone", ttl=1)
    time.sleep(2.2)
    with pytest.raises(munge.MungeError, match="expired") as e:
        munge.decode(cred)
    assert e.value.code == munge.CRED_EXPIRED


@pytest.mark.parametrize("bad", ["", "hello", "MUNGE:AAAA:", "MUNGE:é:"])
def test_what_is_not_a_credential_is_refused(way, bad):
    with pytest.raises(munge.MungeError):
        munge.decode(bad)


def test_an_altered_credential_is_refused(way):
    cred = munge.encode(b"uid 0 says: alice's key")
    body = cred[len("MUNGE:"):-1]
    flipped = body[:40] + ("A" if body[40] != "A" else "B") + body[41:]
    with pytest.raises(munge.MungeError, match="invalid|not a MUNGE"):
        munge.decode("MUNGE:" + flipped + ":")


def test_munged_away_is_said_plainly(way, tmp_path):
    with pytest.raises(munge.MungeError, match="munged is not running") as e:
        munge.encode(b"x", socket_path=str(tmp_path / "no.socket"))
    assert e.value.code == munge.SOCKET
    with pytest.raises(munge.MungeError, match="munged is not running"):
        munge.decode(munge.encode(b"y"), socket_path=str(tmp_path / "no.socket"))
