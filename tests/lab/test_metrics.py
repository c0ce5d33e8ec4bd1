"""Issue #16 on the lab: job metrics that tell the truth, and only to the job's owner.

- a job given two cores that keeps one busy reports about 50 % CPU efficiency — the CPU the
  kernel counted for it, within 10 % (other tests share the lab's cores and may take some), its cores and memory
  limit read from the job's own cgroup (Slurm's cpuset and memory controllers), and its report is
  the user's own file, written before the job's end took the agent with it;
- a two-node job's series come from both nodes (``dxflow metrics``, ``--csv``, ``JOB:NODE``) and
  the master's ``/metrics`` parses with prometheus-client's own parser;
- the console's node page charts the job's whole life, and the whole job; ``/metrics`` answers through
  the console with the login, and not without;
- bob reads none of it: not through alice's master socket, not from alice's agents (with no token or
  with his own), not from her reports, not through his own master.
"""

from __future__ import annotations

import csv
import io
import json
import pwd
import re
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import DXFLOW, as_user, dxflow, dxflow_json, job_state, on_node, wait_agents, wait_for

ALICE_HOME = Path(pwd.getpwnam("alice").pw_dir)
#: one core busy for BUSY seconds in a job given two (a shell loop: no Python in the job's way); the
#: batch shell then prints, with `times`, the CPU its children used: the kernel's own count
BUSY = 20
BUSY_JOB = f"timeout {BUSY} sh -c 'while :; do :; done'; times"


def seconds(text: str) -> float:
    """``1m2.50s`` (the shell's ``times``) in seconds."""
    m, _, s = text.rstrip("s").partition("m")
    return 60 * float(m) + float(s)
NOT_FOUND = 5
#: seconds a job may wait in the queue: other tests share the lab's four cores
QUEUED = 600


@pytest.fixture(scope="module", autouse=True)
def fresh_masters(lab):
    """Masters that run this checkout's code: one started before the metrics routes existed is stopped
    (the next command starts it again)."""
    for user in ("alice", "bob"):
        probe = as_user(user, [DXFLOW, "report", "no-such-job"], check=False)
        if "no report of job" not in probe.stderr:
            dxflow(user, "master", "stop", check=False)


def master_socket(user: str) -> str:
    home = Path(pwd.getpwnam(user).pw_dir)
    socks = sorted(home.glob(".dxflow/hosts/*/master.sock"))
    assert socks, f"{user}'s master socket not found"
    return str(socks[0])


def curl_as(user: str, sock: str, path: str):
    return as_user(user, ["curl", "-sS", "--max-time", "30", "--unix-socket", sock, f"http://master{path}"],
                   check=False, timeout=60)


def test_one_busy_core_of_two_is_about_half_cpu_efficiency(jobs):
    job = jobs.submit("alice", BUSY_JOB, "--cpus-per-task=2", "--mem=200M")
    jobs.wait_running(job, timeout=QUEUED)
    (agent,) = wait_agents("alice", job, 1, timeout=60)
    wait_for(lambda: job_state(job) == "GONE", BUSY + 60, interval=1, what=f"job {job} to end")
    part = ALICE_HOME / ".dxflow" / "reports" / job / f"{agent['node']}.json"
    wait_for(lambda: part.exists() and json.loads(part.read_text())["final"], 30, what="the node's final report")
    report = dxflow_json("alice", "report", job)
    assert report["cores"] == 2 and report["nodes"][0]["cores"] == 2   # Slurm's cpuset of the job
    assert report["memory_limit_bytes"] == 200 * 2**20                  # its memory cgroup's limit
    # the loop's CPU as the kernel counted it (the batch shell's children); on a quiet machine one core's
    # worth: 50 %. Other tests share the lab's cores, so the loop may get less: the report must say what
    # it got, and never more than the one core a single loop can use
    out_file = ALICE_HOME / f"slurm-{job}.out"
    out = out_file.read_text().split()
    out_file.unlink()
    truth = seconds(out[-2]) + seconds(out[-1])
    assert abs(report["cpu_seconds"] - truth) <= 0.1 * truth + 1.0, (report["cpu_seconds"], truth)
    wall = report["nodes"][0]["wall_seconds"]
    assert abs(report["cpu_efficiency"] - truth / (2 * wall)) <= 0.05, (report["cpu_efficiency"], truth, wall)
    assert report["cpu_efficiency"] <= 0.55
    if truth >= 0.9 * BUSY:  # the loop had its core: the case
        assert 0.35 <= report["cpu_efficiency"] <= 0.65, report
    assert report["complete"]
    assert any("memory peak was" in n for n in report["notes"])          # a shell loop: far below 200 MiB
    text = dxflow("alice", "report", job).stdout
    assert "CPU efficiency:" in text and f"Job ID: {job}" in text
    merged = ALICE_HOME / ".dxflow" / "reports" / f"{job}.json"
    st = merged.stat()
    assert st.st_uid == pwd.getpwnam("alice").pw_uid and st.st_mode & 0o777 == 0o600
    assert st.st_uid == part.stat().st_uid  # the agent wrote as alice, never root
    # bob cannot read it, nor have his master find it
    assert as_user("bob", ["cat", str(merged)], check=False).returncode != 0
    assert as_user("bob", [DXFLOW, "report", job], check=False).returncode == NOT_FOUND


def test_two_nodes_series_prometheus_and_bob_sees_nothing(jobs):
    job = jobs.submit("alice", "srun sleep 300", nodes=2)
    jobs.wait_running(job, timeout=QUEUED)
    agents = wait_agents("alice", job, 2, timeout=60)
    wait_for(lambda: all(len(n["rows"]) >= 3 for n in dxflow_json("alice", "metrics", job)["nodes"]), 30,
             interval=1, what="three samples on each node")
    data = dxflow_json("alice", "metrics", job, "--since", "5m")
    assert [n["node"] for n in data["nodes"]] == ["n1", "n2"] and data["errors"] == {}
    for n in data["nodes"]:
        cols = n["columns"]
        last = dict(zip(cols, n["rows"][-1]))
        assert last["processes"] >= 1 and last["memory_bytes"] > 0
        assert n["user"] == "alice" and n["summary"]["cores"] >= 1
    one = dxflow_json("alice", "metrics", f"{job}:n2")
    assert [n["node"] for n in one["nodes"]] == ["n2"]
    table = list(csv.reader(io.StringIO(dxflow("alice", "metrics", job, "--csv").stdout)))
    assert table[0][:3] == ["node", "t", "cpu_cores"] and {r[0] for r in table[1:]} == {"n1", "n2"}
    assert "NODE" in dxflow("alice", "metrics", job).stdout
    assert as_user("alice", [DXFLOW, "metrics", job, "--since", "soon"], check=False).returncode == 2
    # the report of a job that runs: both nodes, from their agents now, and said to be partial
    report = dxflow_json("alice", "report", job)
    assert [n["node"] for n in report["nodes"]] == ["n1", "n2"] and not report["complete"]
    assert report["cores"] == 2 and report["cpu_efficiency"] is not None

    sock = master_socket("alice")
    scrape = curl_as("alice", sock, "/metrics")
    assert scrape.returncode == 0, scrape.stderr
    fams = {f.name: f for f in text_string_to_metric_families(scrape.stdout)}
    cpu = [s for s in fams["dxflow_job_cpu_seconds"].samples if s.labels["job"] == job]
    assert {s.labels["node"] for s in cpu} == {"n1", "n2"} and {s.labels["user"] for s in cpu} == {"alice"}

    # bob: not through alice's master socket ...
    denied = curl_as("bob", sock, "/metrics")
    assert denied.returncode != 0 and "dxflow_job" not in denied.stdout
    # ... not through his own master (it knows no agent of alice's) ...
    assert as_user("bob", [DXFLOW, "metrics", job], check=False).returncode == NOT_FOUND
    bob_scrape = curl_as("bob", master_socket("bob"), "/metrics")
    assert f'job="{job}"' not in bob_scrape.stdout
    # ... not from alice's agents on the nodes, with no token or with one of his own
    for a in agents:
        reg = json.loads((ALICE_HOME / ".dxflow" / "fleet" / f"dxlab.{job}.{a['node']}.json").read_text())
        url = f"http://127.0.0.1:{reg['port']}/api/metrics"
        for headers in ([], ["-H", "Authorization: Bearer " + forged_token(reg)]):
            got = on_node(a["node"], "bob", ["curl", "-s", "-w", "\n%{http_code}", *headers, url], check=False)
            body, _, code = got.stdout.rpartition("\n")
            # the agent's server drops another user's connection at accept (000); were it to answer: 401
            assert code in ("000", "401") and '"rows"' not in body, (a["node"], headers, got.stdout)
        # and behind the accept check, the token: even alice's own connection gets nothing without one
        got = on_node(a["node"], "alice", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url], check=False)
        assert got.stdout == "401"


def forged_token(reg: dict) -> str:
    """A token for alice's agent, addressed right but signed by bob's own key (as bob could make one)."""
    from dxflow import auth
    bob_key = auth.new_key()
    return auth.mint_token(bob_key, "alice", auth.fingerprint(reg["public_key"]))


def test_console_charts_the_jobs_whole_life(jobs, browser):
    """The node page charts the job's usage since it started (all the agent kept, not only since the page
    opened), and on the master's console the whole job too."""
    job = jobs.submit("alice", "srun sh -c 'timeout 20 sh -c \"while :; do :; done\"; sleep 300'", nodes=2)
    jobs.wait_running(job, timeout=QUEUED)
    wait_agents("alice", job, 2, timeout=60)
    wait_for(lambda: all(len(n["rows"]) >= 8 for n in dxflow_json("alice", "metrics", job)["nodes"]), 60,
             interval=1, what="eight samples on each node")
    link = dxflow_json("alice", "console")
    context = browser.new_context(viewport={"width": 1400, "height": 1400})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(link["url"])
        page.wait_for_url(re.compile(r"/console/"))
        page.goto(f"http://127.0.0.1:{link['port']}/console/#/node/{job}/n1/overview")
        for title in ("Job CPU", "Job memory", "Job disk I/O", "Whole job CPU", "Whole job memory"):
            page.locator(f'[data-chart="{title}"] path[d^="M"]').first.wait_for(state="attached", timeout=20_000)
        # the first answer holds the job's past: the chart starts with its first sample, not the page's opening
        span = page.locator('[data-chart="Job CPU"] .chart-span').inner_text()
        assert span.startswith("since the job started"), span
        segments = page.locator('[data-chart="Job CPU"] path').first.get_attribute("d").count("L")
        assert segments >= 6, segments  # eight samples kept before the page opened, the first without a rate
        allocated = page.locator('[data-chart="Whole job CPU"] .chart-value').nth(1).inner_text()
        assert allocated == "2.00", allocated  # a core on each node
        # Prometheus' text through the console, with the same login; nothing without it
        scrape = context.request.get(f"http://127.0.0.1:{link['port']}/metrics")
        assert scrape.status == 200
        fams = {f.name: f for f in text_string_to_metric_families(scrape.text())}
        assert {s.labels["node"] for s in fams["dxflow_job_cpu_cores"].samples if s.labels["job"] == job} == {"n1", "n2"}
        stranger = browser.new_context()
        try:
            anonymous = stranger.request.get(f"http://127.0.0.1:{link['port']}/metrics", max_redirects=0)
            assert anonymous.status in (302, 303, 401, 403) and "dxflow_job" not in anonymous.text()
        finally:
            stranger.close()
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the console: {errors}"
