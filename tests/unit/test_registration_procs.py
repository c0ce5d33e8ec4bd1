import os
import pwd
import subprocess
import time

import pytest

from dxflow import registration
from dxflow.procs import read_proc, stop_tree, tree


def reg(**kw):
    base = dict(cluster="c", scheduler="slurm", job="1", node="n1", address="n1", port=1234, pid=99, user="u",
                started="2026-01-01T00:00:00+00:00", public_key="PEM", api_version=1, version="0")
    base.update(kw)
    return registration.Registration(**base)


def test_registration_write_read_remove(tmp_path):
    registration.write(tmp_path, reg())
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / ".c.2.n1.x.tmp").write_text("{}")
    found = registration.read_all(tmp_path)
    assert [r.name for r in found] == ["c.1.n1"]
    registration.remove(tmp_path, "c.1.n1", pid=12345)  # someone else's: kept
    assert (tmp_path / "c.1.n1.json").exists()
    registration.remove(tmp_path, "c.1.n1", pid=99)
    assert not (tmp_path / "c.1.n1.json").exists()
    registration.remove(tmp_path, "c.1.n1")  # idempotent


def _nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user nobody on this machine")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start processes as another user")
def test_stop_tree_gets_daemonized_and_setsid_children():
    nobody = _nobody()
    # a leader with a child, a grandchild that setsid()s, and one that daemonizes (double fork)
    script = ("import os,subprocess,time\n"
              "subprocess.Popen(['sleep','300'])\n"
              "subprocess.Popen(['setsid','sleep','301'])\n"
              "subprocess.Popen(['sh','-c','sleep 302 & exit 0'])\n"
              "time.sleep(300)\n")
    leader = subprocess.Popen(["/usr/bin/python3", "-c", script], user=nobody.pw_uid, group=nobody.pw_gid,
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # the daemonized sleep 302 is re-parented to init but keeps the leader's session id
        deadline = time.time() + 5
        while len(tree(leader.pid, nobody.pw_uid)) < 4 and time.time() < deadline:
            time.sleep(0.05)
        members = tree(leader.pid, nobody.pw_uid)
        assert len(members) >= 4
        assert tree(leader.pid, 12345) == set()  # uid filter: nobody's processes only
        left = stop_tree(leader.pid, nobody.pw_uid, timeout=2)
        leader.wait(timeout=2)
        assert left == set()
        assert all(read_proc(p) is None for p in members)
    finally:
        if leader.poll() is None:
            leader.kill()


def test_stop_tree_refuses_root():
    with pytest.raises(ValueError):
        stop_tree(os.getpid(), 0)


def test_registry_of_job(tmp_path):
    from dxflow.master.registry import Registry

    r = Registry(tmp_path / "fleet.db")
    for job, node in (("1", "n1"), ("1", "n2"), ("12", "n1"), ("1.srv", "n1")):
        r.upsert(reg(job=job, node=node))
    assert [a.reg.node for a in r.of_job("1")] == ["n1", "n2"]
    assert [a.reg.job for a in r.of_job("1.srv")] == ["1.srv"]
    assert r.of_job("404") == []
    r.close()


def test_read_all_cache_rereads_only_changed_files(tmp_path, monkeypatch):
    registration.write(tmp_path, reg(job="1"))
    registration.write(tmp_path, reg(job="2"))
    cache: dict = {}
    assert sorted(r.job for r in registration.read_all(tmp_path, cache)) == ["1", "2"]
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: (opened.append(str(p)), real_open(p, *a, **k))[1])
    registration.read_all(tmp_path, cache)
    assert opened == []  # nothing changed: nothing read
    registration.write(tmp_path, reg(job="2", port=999))
    assert {r.job: r.port for r in registration.read_all(tmp_path, cache)}["2"] == 999
    registration.remove(tmp_path, "c.1.n1")
    assert [r.job for r in registration.read_all(tmp_path, cache)] == ["2"] and len(cache) == 1
