"""Two replicas of the site service on one PostgreSQL (issue #17, 5): one dies, nothing is lost.

alice works through replica a (the first URL of her site config): `ls`, `exec`, a console login.
Replica a is then SIGKILLed — its whole process group, mid-session, as a machine that dies — and her
next commands and the same console cookie go on through replica b: b reaches her agents over their
own connections to b's gateway (every agent dials every gateway) and reads the session a created from
the shared database. Restarted, a answers again and reaches the agents, which dialled back in.
"""

from __future__ import annotations

import json

import pytest

from conftest import Jobs, wait_for
from sitekit import console_login, http, kill_replica, site_dxflow, site_ls, site_up, start_replica, wait_site_agents
import sitekit
from dxflow.lab import site

USER = "alice"


@pytest.fixture(scope="module")
def site_lab(lab) -> dict:
    return site_up()


@pytest.fixture(scope="module")
def configs(site_lab):
    with sitekit.configs() as found:
        yield found


@pytest.fixture(scope="module")
def job(site_lab):
    jobs = Jobs()
    job = jobs.submit(USER, "sleep 600", "-w", "n1")
    try:
        jobs.wait_running(job, timeout=120)
        yield job
    finally:
        jobs.cancel_all()


@pytest.fixture(scope="module")
def replica_a_back(site_lab):
    """Whatever a test does to replica a, the next module finds it running."""
    yield
    if not site.answers(site.replica("a").api):
        start_replica("a")


def console_agents(base: str, cookie: str) -> tuple[int, list]:
    status, _, body = http(f"{base}/api/agents", cookie)
    return status, (json.loads(body) if status == 200 else [])


def test_replica_dies_mid_session_and_the_other_goes_on(job, configs, replica_a_back):
    # -- alice works through replica a: both URLs configured, a answers first
    wait_site_agents(USER, job, {"n1"}, config=configs["a"])
    wait_site_agents(USER, job, {"n1"}, config=configs["b"])  # her agent dialled both gateways
    assert [a["node"] for a in site_ls(USER) if a["job"] == job] == ["n1"]
    assert site_dxflow(USER, "exec", job, "--", "hostname").stdout.strip() == "n1"
    base, cookie = console_login(USER)
    assert base.endswith(f":{site.replica('a').console}"), base  # the link came from a
    status, agents = console_agents(base, cookie)
    assert status == 200 and job in {a["job"] for a in agents}

    # -- replica a dies
    kill_replica("a")
    assert site_dxflow(USER, "ls", "--json", config=configs["a"], check=False).returncode != 0

    # -- her next command goes on through b, with the same config: nothing to change, nothing lost
    assert [a["state"] for a in site_ls(USER) if a["job"] == job] == ["ready"]
    assert site_dxflow(USER, "exec", job, "--", "hostname").stdout.strip() == "n1"
    # -- and so does the console: the cookie a set is a session in the shared database, valid on b
    base_b = base.replace(f":{site.replica('a').console}", f":{site.replica('b').console}")
    status, agents = console_agents(base_b, cookie)
    assert status == 200, status
    assert job in {a["job"] for a in agents}
    # a cookie nobody issued is not a session anywhere (the check above could not pass by accident)
    name = cookie.split("=", 1)[0]
    assert console_agents(base_b, f"{name}=forged-{'x' * 20}")[0] in (401, 403)

    # -- a restarts and rejoins: the agent dials back in (backoff at most 5 s), a reaches it on its own
    start_replica("a")
    wait_site_agents(USER, job, {"n1"}, config=configs["a"], timeout=60)
    assert site_dxflow(USER, "exec", job, "--", "hostname", config=configs["a"]).stdout.strip() == "n1"
    status, agents = console_agents(base, cookie)  # and the session lives on there too
    assert status == 200 and job in {a["job"] for a in agents}


def test_a_login_token_from_one_replica_is_redeemed_once_on_any(job, configs):
    """One-time login links are in the shared database: used on b, refused on a afterwards."""
    link = json.loads(site_dxflow(USER, "console", "--json", config=configs["a"]).stdout)
    url_b = link["url"].replace(f":{site.replica('a').console}", f":{site.replica('b').console}")
    status, headers, _ = http(url_b)
    assert status in (302, 303) and headers.get_all("Set-Cookie")
    status, headers, _ = http(link["url"])
    assert status not in (302, 303) and not headers.get_all("Set-Cookie")


def test_both_replicas_list_the_same_fleet(job, configs):
    wait_site_agents(USER, job, {"n1"}, config=configs["a"])
    seen = {name: sorted((a.get("cluster"), a["job"], a["node"]) for a in site_ls(USER, configs[name]))
            for name in ("a", "b")}
    assert seen["a"] == seen["b"]
    wait_for(lambda: site.status()["state"] == "up", 10, what="both replicas up")
