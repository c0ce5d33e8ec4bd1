"""The master's metrics routes (:mod:`dxflow.master.metrics`): a job's nodes merged, its report, and
``/metrics`` — a real Fleet and real agent apps sampling for real; the controller and SSH are the faked
seams of ``tests/conftest.py``."""

from __future__ import annotations

import getpass
import json
import socket
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dxflow.agent import node as agent_node
from dxflow.master.app import create_app

USER = getpass.getuser()


@pytest.fixture
def base(user_base):
    return user_base


@pytest.fixture
def fleet(fake_fleet):
    return fake_fleet


@pytest.fixture
def two_nodes(tmp_path, base, fleet, fake_scheduler, node_agent, settle, monkeypatch):
    """Job 7 on n1 and n2, each agent sampling every 0.2 s; the user's home (reports) in tmp_path/home."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fake_scheduler.add("7", nodes=("n1", "n2"))
    agents = [node_agent(base, "7", node=n, port=7000 + i) for i, n in enumerate(("n1", "n2"))]
    samplers = [agent_node.start_sampling(a.state, 0.2) for a in agents]
    settle(fleet, [a.reg.name for a in agents])
    time.sleep(0.8)
    # a request on the master's CLI socket (gunicorn hands the accepted socket, named by its listener)
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fleet.layout.master_sock.parent.mkdir(parents=True, exist_ok=True)
    cli.bind(str(fleet.layout.master_sock))
    client = create_app(fleet).test_client()
    client.environ_base["gunicorn.socket"] = cli
    yield client
    cli.close()
    for s in samplers:
        s.stopped.set()


def test_a_jobs_nodes_merged_filtered_and_since(two_nodes):
    client = two_nodes
    body = client.get("/api/metrics/7").get_json()
    assert [n["node"] for n in body["nodes"]] == ["n1", "n2"] and body["errors"] == {}
    assert all(len(n["rows"]) >= 2 for n in body["nodes"])
    one = client.get("/api/metrics/7?node=n2").get_json()
    assert [n["node"] for n in one["nodes"]] == ["n2"]
    middle = body["nodes"][0]["rows"][len(body["nodes"][0]["rows"]) // 2][0]  # an epoch time: one instant for all
    recent = client.get(f"/api/metrics/7?since={middle!r}").get_json()
    assert all(r["rows"] and r["rows"][0][0] >= middle for r in recent["nodes"])  # the older half left out
    assert client.get("/api/metrics/7?node=n9").status_code == 404
    assert client.get("/api/metrics/8").status_code == 404
    assert client.get("/api/metrics/7?since=yesterday").status_code == 400


def test_report_of_a_running_job_from_its_agents_and_written_for_the_user(two_nodes, tmp_path):
    client = two_nodes
    r = client.get("/api/report/7")
    assert r.status_code == 200
    report = r.get_json()
    assert [n["node"] for n in report["nodes"]] == ["n1", "n2"] and not report["complete"]
    written = tmp_path / "home" / ".dxflow" / "reports" / "7.json"
    assert json.loads(written.read_text())["job"] == "7"
    assert written.stat().st_mode & 0o777 == 0o600
    assert client.get("/api/report/..").status_code in (400, 404)
    assert client.get("/api/report/nope").status_code == 404


def test_prometheus_text_of_every_ready_agent(two_nodes):
    r = two_nodes.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    fams = {f.name: f for f in text_string_to_metric_families(r.get_data(as_text=True))}
    nodes = {s.labels["node"] for s in fams["dxflow_job_cpu_seconds"].samples if s.labels["job"] == "7"}
    assert nodes == {"n1", "n2"}
    assert {s.labels["user"] for s in fams["dxflow_job_processes"].samples} == {USER}


def test_without_the_cli_socket_nor_a_console_login_nothing(two_nodes):
    client = two_nodes
    stranger = client.application.test_client()  # a browser on the console's port, not logged in
    for path in ("/metrics", "/api/metrics/7", "/api/report/7"):
        r = stranger.get(path, headers={"Host": "127.0.0.1"})
        assert r.status_code in (302, 401) and b"dxflow_job" not in r.data and b"rows" not in r.data, path


@pytest.mark.parametrize("job", ["..", ".hidden", "a\x00b", "x" * 200, "7;rm", "é"])
def test_a_report_of_a_hostile_job_name_is_refused_and_reads_nothing(two_nodes, job):
    from urllib.parse import quote
    r = two_nodes.get(f"/api/report/{quote(job, safe='')}")
    assert r.status_code in (400, 404), (job, r.status_code)
    assert r.get_json()["error"]
