"""Registration records (:mod:`dxflow.registration`): the files agents write in ``~/.dxflow/fleet``, read
back by the master into its registry (:mod:`dxflow.master.registry`)."""

from __future__ import annotations

from dxflow import registration
from dxflow.master.registry import Registry


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


def test_registry_of_job(tmp_path):
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
