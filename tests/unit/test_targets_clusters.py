"""``CLUSTER/JOB`` targets (dxflow.cli.targets) for a site service serving several clusters: named where
two clusters have a job id, found by a PBS id's number, and ls's CLUSTER and USER columns."""

from __future__ import annotations

import argparse

import pytest

from dxflow.cli import fleet, targets
from dxflow.errors import NotFound, UsageError

NOW = "2026-11-30T10:00:00+00:00"


def agent(cluster: str, job: str, node: str, state: str = "ready", user: str = "alice") -> dict:
    return {"cluster": cluster, "job": job, "node": node, "state": state, "detail": "", "user": user,
            "started": NOW}


LISTING = [agent("dxlab", "12", "n1"), agent("dxlab", "12", "n2"), agent("pbslab", "12.pbslab", "n3"),
           agent("dxlab", "30", "n1"), agent("pbslab", "31.pbslab", "n4"), agent("dxlab", "31", "n2", "gone"),
           agent("dxlab", "40", "n1"), agent("pbslab", "40", "n2", "gone")]


class Listing:
    """The list of agents; nothing more of a job's nodes (an older master)."""

    def json(self, method: str, path: str, timeout: float = 0) -> list[dict]:
        return LISTING

    def job_nodes(self, job: str) -> None:
        return None


@pytest.mark.parametrize("text, cluster, job, nodes", [
    ("dxlab/12", "dxlab", "12", None),
    ("pbslab/12:n3", "pbslab", "12", "n3"),
    ("pbslab~12:n3", "pbslab", "12", "n3"),
    ("12", None, "12", None),
])
def test_a_cluster_is_read_from_the_target(text, cluster, job, nodes):
    t = targets.parse(text)
    assert (t.cluster, t.job, t.nodes) == (cluster, job, nodes)


@pytest.mark.parametrize("text", ["/12", "dx lab/12", "dxlab/", "dxlab/abc", "-x/12", "a/b/12"])
def test_a_malformed_cluster_target_exits_2(text):
    with pytest.raises(UsageError):
        targets.parse(text)


def test_a_bare_id_two_clusters_have_exits_2_naming_both():
    with pytest.raises(UsageError, match=r"several clusters \(dxlab, pbslab\).*dxlab/12"):
        targets.resolve(Listing(), targets.parse("12"))


def test_the_cluster_picks_the_job_and_the_api_gets_its_own_id():
    assert targets.resolve(Listing(), targets.parse("dxlab/12:all")) == targets.Resolved("12", ["n1", "n2"])
    assert targets.resolve(Listing(), targets.parse("pbslab/12")) == targets.Resolved("12.pbslab", [None])


def test_an_id_two_clusters_have_exactly_goes_to_the_api_as_cluster_tilde_job():
    """40 runs on dxlab; pbslab's 40 ended (still listed): the running one, named so the site cannot mix them."""
    assert targets.resolve(Listing(), targets.parse("40")) == targets.Resolved("dxlab~40", [None])
    with pytest.raises(NotFound, match="has ended"):
        targets.resolve(Listing(), targets.parse("pbslab/40"))


def test_an_id_of_one_cluster_needs_no_cluster_and_a_pbs_id_is_found_by_its_number():
    assert targets.resolve(Listing(), targets.parse("30")) == targets.Resolved("30", [None])
    # 31: running on pbslab only (dxlab's 31 ended): that one, by its PBS number
    assert targets.resolve(Listing(), targets.parse("31")) == targets.Resolved("31.pbslab", [None])


def test_a_job_of_another_cluster_is_not_found():
    with pytest.raises(NotFound):
        targets.resolve(Listing(), targets.parse("pbslab/30"))


def ls_table(listing: list[dict], capsys, me: str = "alice") -> str:
    class Client:
        def ensure(self):
            return self

        def json(self, method, path, timeout=0):
            return listing

    import dxflow.cli.service as service_module

    import getpass

    saved, saved_user = service_module.service, getpass.getuser
    service_module.service = lambda: Client()  # type: ignore[assignment]
    getpass.getuser = lambda: me
    try:
        fleet.cmd_ls(argparse.Namespace(all=False, json=False, job=None))
    finally:
        service_module.service = saved  # type: ignore[assignment]
        getpass.getuser = saved_user
    return capsys.readouterr().out


def test_ls_shows_cluster_and_user_columns_only_where_they_differ(capsys):
    one = ls_table([agent("dxlab", "12", "n1"), agent("dxlab", "30", "n2")], capsys)
    assert one.splitlines()[0].split()[:2] == ["JOB", "NODE"]
    both = ls_table([agent("dxlab", "12", "n1"), agent("pbslab", "12.pbslab", "n3")], capsys)
    assert both.splitlines()[0].split()[:3] == ["CLUSTER", "JOB", "NODE"]
    assert both.splitlines()[2].split()[:2] == ["pbslab", "12.pbslab"]
    admin = ls_table([agent("dxlab", "12", "n1"), agent("pbslab", "7.pbslab", "n3", user="bob")], capsys, "dana")
    assert admin.splitlines()[0].split()[:3] == ["CLUSTER", "USER", "JOB"]
    assert admin.splitlines()[2].split()[:3] == ["pbslab", "bob", "7.pbslab"]
    one_user = ls_table([agent("dxlab", "12", "n1")], capsys, "dana")  # only alice's jobs run: still whose
    assert one_user.splitlines()[0].split()[:2] == ["USER", "JOB"]


def test_ls_shows_a_record_without_its_start_time_with_no_uptime(capsys):
    """A site keeps records of agents it knows only by name (an ended job's): ls shows them, UP as "-"."""
    record = {**agent("dxlab", "12", "n1"), "started": "", "state": "gone"}
    table = ls_table([agent("dxlab", "30", "n2"), record], capsys)
    row = next(line.split() for line in table.splitlines() if line.split()[:2] == ["12", "n1"])
    assert row[2:4] == ["gone", "-"]
