"""The site's own routes (dxflow.site.app) on the real app and store, with credentials from this host's real
munged: what ``/api/master`` and ``/api/agents`` say, and that no user stops the service. This test's user
(root) is no admin of the site here; the agents of other users are in the store beside its own."""

from __future__ import annotations

import getpass
import os
import shutil
from pathlib import Path

import pytest

from dxflow.site.app import create_app
from dxflow.site.client import request_credential
from dxflow.site.config import SiteServiceConfig
from dxflow.site.fleet import SiteFleet
from dxflow.site.store import Store

pytestmark = pytest.mark.skipif(not Path("/run/munge/munge.socket.2").exists() or not shutil.which("unmunge"),
                                reason="needs a running munged (the lab's)")

ME = getpass.getuser()


@pytest.fixture
def site(tmp_path):
    config = SiteServiceConfig(state_dir=str(tmp_path), publish_dir=str(tmp_path / "pub"), replica="r1",
                               admin_group="dxflow-test-no-such-group")
    store = Store(str(tmp_path / "site.db"))
    store.enroll("c1", "7", "n1", ME, os.getuid(), "k1")
    store.enroll("c1", "8", "n2", "alice-of-another-test", 1001, "k2")
    store.enroll("c1", "9", "n1", ME, os.getuid(), "k3")
    store.set_state("c1.9.n1", "gone", "job ended")
    app = create_app(SiteFleet(config, store))
    yield app.test_client()
    store.close()


def get(client, target: str, method: str = "GET"):
    return client.open(target, method=method, headers={"Authorization": f"MUNGE {request_credential(method, target)}"})


def test_agents_lists_the_users_own_and_gone_ones_only_when_asked(site):
    resp = get(site, "/api/agents")
    assert resp.status_code == 200
    assert [(a["job"], a["cluster"]) for a in resp.get_json()] == [("7", "c1")]
    assert {a["job"] for a in get(site, "/api/agents?all=1").get_json()} == {"7", "9"}


def test_master_describes_this_replica_and_the_user(site):
    info = get(site, "/api/master").get_json()
    assert (info["site"], info["replica"], info["database"], info["user"], info["agents"]) == (True, "r1", "sqlite",
                                                                                              ME, 1)


def test_no_user_stops_the_site_service(site):
    resp = get(site, "/api/shutdown", method="POST")
    assert resp.status_code == 403 and "admin" in resp.get_json()["message"]


def test_another_users_agent_is_not_relayed_to_and_not_confirmed(site):
    theirs = get(site, "/api/fleet/8/-/api/node")
    none = get(site, "/api/fleet/4711/-/api/node")
    assert theirs.status_code == none.status_code == 404
    assert theirs.get_json()["message"].replace("8", "J") == none.get_json()["message"].replace("4711", "J")
