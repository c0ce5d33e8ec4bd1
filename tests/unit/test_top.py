"""``dxflow top`` (issue #15 item 6): frames rendered and sorted from a recorded answer of the master; the
job's processes measured for real (:mod:`dxflow.metrics.top`); the agent's ``/api/top`` and the master's
``/api/top/JOB`` with real agent apps on the faked SSH seam of ``tests/conftest.py``, a node that is
gone and one that hangs included. The live view in a terminal is tested on the lab (tests/lab/test_top.py).
"""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time

import pytest

from dxflow.agent import node as agent_node
from dxflow.cli import top as cli_top
from dxflow.master import top as master_top
from dxflow.master.app import create_app
from dxflow.metrics.top import Top

GiB = 2**30


def node(name: str, cpu: float, mem: int, gpu: float | None = None, procs: int = 2) -> dict:
    """A node's row as the agent's /api/top answers it (recorded from the lab, numbers changed)."""
    return {"node": name, "state": "ready", "job": "12", "user": "alice", "cores": 2, "cpu_cores": cpu,
            "cpu_source": "processes", "memory_bytes": mem, "memory_limit_bytes": 4 * GiB, "load": [1.5, 1.0, 0.5],
            "gpus": [] if gpu is None else [{"index": 0, "name": "A100", "utilization": gpu}],
            "process_count": procs, "window": 2.0,
            "processes": [{"pid": 100 + i, "user": "alice", "cpu_percent": cpu * 100 / (i + 1),
                           "memory_bytes": mem // (i + 2), "command": f"python rank.py --rank {name}-{i}"}
                          for i in range(procs)]}


RECORDED = {"job": "12", "time": 1796000000.0, "node_set": "n[1-3,10]", "nodes": [
    node("n1", 0.5, 1 * GiB, gpu=10), node("n2", 1.9, 3 * GiB, gpu=90), node("n10", 1.0, 2 * GiB, gpu=50),
    {"node": "n3", "state": "lost", "error": "agent lost: nothing listens on port 4000 on n3"}]}


def node_column(lines: list[str]) -> list[str]:
    """The node rows' names, in order (between the table's header and its total)."""
    head = next(i for i, line in enumerate(lines) if line.startswith("NODE ") and "STATE" in line)
    out = []
    for line in lines[head + 1:]:
        if line.startswith("n[") or not line.strip():
            break
        out.append(line.split()[0])
    return out


@pytest.mark.parametrize("sort, order", [
    ("cpu", ["n2", "n10", "n1", "n3"]), ("c", ["n2", "n10", "n1", "n3"]),
    ("memory", ["n2", "n10", "n1", "n3"]), ("node", ["n1", "n2", "n3", "n10"]),
    ("gpu", ["n2", "n10", "n1", "n3"])])
def test_nodes_sorted_busiest_first_lost_last_or_by_name(sort, order):
    assert node_column(cli_top.render(RECORDED, sort)) == order


def test_sorted_by_memory_and_by_gpu_differ_from_cpu():
    data = copy.deepcopy(RECORDED)
    data["nodes"][0]["memory_bytes"] = 4 * GiB   # n1: the least CPU, the most memory
    data["nodes"][2]["gpus"][0]["utilization"] = 99  # n10: the busiest GPU
    assert node_column(cli_top.render(data, "memory"))[0] == "n1"
    assert node_column(cli_top.render(data, "gpu"))[0] == "n10"


def test_a_frame_has_every_node_the_total_and_each_nodes_processes():
    lines = cli_top.render(RECORDED, "cpu", processes=2)
    text = "\n".join(lines)
    assert lines[0].startswith("dxflow top · job 12 · 4 nodes · ") and lines[0].endswith("sort: cpu")
    n2 = next(line for line in lines if line.startswith("n2 "))
    assert n2.split()[:4] == ["n2", "ready", "95.0", "1.90/2"]     # CPU% of the node's cores
    assert "3.0 GiB" in n2 and "4.0 GiB" in n2 and "1.50" in n2 and " 90" in n2
    assert next(line for line in lines if line.startswith("n3 ")).split()[1:3] == ["lost", "-"]
    total = next(line for line in lines if line.startswith("n[1-3,10]"))
    # three nodes up: 3.4 cores busy of 6 (56.7 %), 6 GiB of 12 GiB, the mean load and GPU use
    assert total.split()[:4] == ["n[1-3,10]", "3/4", "up", "56.7"] and "3.40/6" in total, total
    assert "6.0 GiB" in total and "12.0 GiB" in total and "50" in total
    assert "python rank.py --rank n2-0" in text and "python rank.py --rank n2-1" in text
    assert "n3: lost: agent lost: nothing listens on port 4000 on n3" in text
    assert "\x1b" not in text   # no terminal control unless live


def test_process_rows_follow_the_node_order_and_the_count_asked():
    lines = cli_top.render(RECORDED, "node", processes=1)
    procs = [line.split()[0] for line in lines[lines.index(next(x for x in lines if x.startswith("NODE  ") and "PID" in x)) + 1:]
             if line and not line.startswith("n3:")]
    assert procs == ["n1", "n2", "n10"]
    assert not any("PID" in line for line in cli_top.render(RECORDED, "cpu", processes=0))


def test_a_small_window_shrinks_processes_then_cuts_nodes_and_long_lines():
    def commands(lines: list[str]) -> list[str]:
        return [line.rsplit(" ", 1)[-1] for line in lines if "rank.py" in line]

    # room for one process per node that answers: each node's busiest
    lines = cli_top.render(RECORDED, "cpu", processes=3, width=80, height=15)
    assert len(lines) <= 15 and node_column(lines) == ["n2", "n10", "n1", "n3"]
    assert commands(lines) == ["n2-0", "n10-0", "n1-0"]
    # room for fewer processes than nodes: the job's busiest, wherever they run; long lines cut
    lines = cli_top.render(RECORDED, "cpu", processes=3, width=40, height=12)
    assert len(lines) <= 12 and all(len(line) <= 40 for line in lines)
    assert node_column(lines) == ["n2", "n10", "n1", "n3"]  # the nodes first: the processes make room
    assert [line.split()[:2] for line in lines if line.split()[1:2] == ["100"]] == [["n2", "100"], ["n10", "100"]]
    # room for fewer nodes than the job has: the busiest kept, the rest counted, the total always there
    tiny = cli_top.render(RECORDED, "cpu", processes=3, height=7)
    assert len(tiny) <= 7 and "… 2 more nodes (make the window taller)" in tiny, tiny
    assert node_column(tiny) == ["n2", "n10", "…"] and any(line.startswith("n[1-3,10]") for line in tiny)


def test_live_frames_carry_the_keys_and_colours():
    lines = cli_top.render(RECORDED, "cpu", live=True, error="the master does not answer")
    assert "[q]uit" in lines[0] and lines[1] == "! the master does not answer"
    assert any(line.startswith(cli_top.REVERSE + "NODE") for line in lines)
    assert any("\x1b[31mlost" in line for line in lines) and any("\x1b[32mready" in line for line in lines)


def test_json_records_one_per_node_in_node_order():
    recs = cli_top.records(RECORDED)
    assert [r["node"] for r in recs] == ["n1", "n2", "n3", "n10"]
    assert all(r["job"] == "12" and "_order" not in r for r in recs)


def test_bad_options_exit_2_before_anything_is_asked(capsys):
    from dxflow.cli import main

    for argv in (["top", "12", "--interval", "0"], ["top", "12", "-n", "99"], ["top", "12:n[1-"],
                 ["top", "abc:n1"]):
        assert main(argv) == 2, argv
        assert "dxflow:" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["top", "12", "--sort", "size"])
    assert e.value.code == 2


# -- the job's processes, measured ---------------------------------------------------------------------------
@pytest.fixture
def burner():
    """A process that keeps a core busy, and one that sleeps."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass", "dxtop-unit-burn"])
    idle = subprocess.Popen(["sleep", "60"])
    yield busy, idle
    for p in (busy, idle):
        p.kill()
        p.wait()


def test_busiest_process_first_with_its_command_line(burner):
    busy, idle = burner
    top = Top(lambda: {busy.pid, idle.pid}, lambda: None, lambda: {os.getpid()})
    top.processes()
    time.sleep(1.1)
    got = top.processes()
    assert [p["pid"] for p in got["processes"]] == [busy.pid, idle.pid]
    first = got["processes"][0]
    assert first["cpu_percent"] > 5 and got["processes"][1]["cpu_percent"] < first["cpu_percent"]
    assert first["command"].endswith("-c while True: pass dxtop-unit-burn")
    assert got["process_count"] == 2 and got["window"] >= 1.0 and got["cpu_source"] == "processes"
    assert got["cpu_cores"] == pytest.approx(sum(p["cpu_percent"] for p in got["processes"]) / 100, abs=0.01)
    assert [p["pid"] for p in top.processes(1)["processes"]] == [busy.pid]
    assert top.processes(0)["processes"] == [] and top.processes(0)["process_count"] == 2


def test_two_viewers_a_moment_apart_both_get_a_full_window(burner):
    busy, idle = burner
    top = Top(lambda: {busy.pid, idle.pid}, lambda: None, lambda: set())
    top.processes()
    time.sleep(1.1)
    top.processes()
    again = top.processes()  # a moment after the last: measured from the look before it
    assert again["window"] >= 1.0


def test_only_the_users_own_processes(burner):
    busy, _idle = burner
    others = Top(lambda: {1, busy.pid}, lambda: None, lambda: set(), uid=os.getuid() + 12345)
    assert others.processes()["processes"] == []   # neither pid 1 nor ours is that uid's


# -- the agent's /api/top ------------------------------------------------------------------------------------
def test_agent_answers_the_nodes_row_and_checks_its_arguments(agent):
    client, _, headers = agent
    body = client.get("/api/top?processes=5&sort=memory", headers=headers).get_json()
    assert body["node"] == "n1" and body["job"] == "42" and body["cores"] >= 1
    assert len(body["load"]) == 3 and body["node_memory_bytes"] > 0 and isinstance(body["processes"], list)
    for bad in ("processes=-1", "processes=51", "processes=x", "sort=pid"):
        r = client.get(f"/api/top?{bad}", headers=headers)
        assert r.status_code == 400 and r.get_json()["message"], bad
    assert client.get("/api/top").status_code == 401


# -- the master's /api/top/JOB -------------------------------------------------------------------------------
@pytest.fixture
def job_on_three(tmp_path, user_base, fake_fleet, fake_scheduler, node_agent, settle, monkeypatch):
    """Job 7 on n1-n3 (real agents, sampling every 0.2 s) and a process of the job burning a core."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    fake_scheduler.add("7", nodes=("n1", "n2", "n3"))
    agents = [node_agent(user_base, "7", node=n, port=7000 + i) for i, n in enumerate(("n1", "n2", "n3"))]
    samplers = [agent_node.start_sampling(a.state, 0.2) for a in agents]
    # it ends by itself after two minutes: a test run killed midway leaves no core burning
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.monotonic() + 120\n"
                             "while time.monotonic() < end: pass", "dxtop-unit-job"],
                            env={**os.environ, "SLURM_JOB_ID": "7"})
    cli = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        settle(fake_fleet, [a.reg.name for a in agents])
        time.sleep(0.6)  # the samplers have found the job's process
        fake_fleet.layout.master_sock.parent.mkdir(parents=True, exist_ok=True)
        cli.bind(str(fake_fleet.layout.master_sock))
        client = create_app(fake_fleet).test_client()
        client.environ_base["gunicorn.socket"] = cli
        yield client, agents
    finally:
        busy.kill()
        busy.wait()
        cli.close()
        for s in samplers:
            s.stopped.set()


def test_master_asks_every_node_and_lists_the_jobs_processes(job_on_three):
    client, _agents = job_on_three
    body = client.get("/api/top/7?processes=3").get_json()
    assert [n["node"] for n in body["nodes"]] == ["n1", "n2", "n3"] and body["node_set"] == "n[1-3]"
    assert all(n["state"] == "ready" for n in body["nodes"])
    assert any("dxtop-unit-job" in p["command"] for p in body["nodes"][0]["processes"])
    one = client.get("/api/top/7?node=n2").get_json()
    assert [n["node"] for n in one["nodes"]] == ["n2"]
    assert client.get("/api/top/7?node=n9").status_code == 404
    assert client.get("/api/top/8").status_code == 404
    for bad in ("sort=pid", "processes=51", "processes=-1"):  # the user's typo, not a lost node
        assert client.get(f"/api/top/7?{bad}").status_code == 400, bad


def test_a_gone_node_and_a_hung_one_are_named_and_do_not_hold_up_the_answer(job_on_three, fake_nodes, monkeypatch):
    client, agents = job_on_three
    monkeypatch.setattr(master_top, "ASK_TIMEOUT", 5.0)
    monkeypatch.setattr(master_top, "DEADLINE", 1.0)
    fake_nodes.node("n2").stop(agents[1].reg.port)    # n2's agent is gone
    hung = []
    fake_nodes.node("n3").listen(agents[2].reg.port, lambda s: hung.append(s))  # n3's accepts, never answers
    body = client.get("/api/top/7").get_json()  # at the deadline, not at n3's own timeout: its row says so
    rows = {n["node"]: n for n in body["nodes"]}
    assert rows["n1"]["state"] == "ready"
    assert rows["n2"]["state"] == "lost" and rows["n2"]["error"]
    assert rows["n3"]["state"] == "lost" and "no answer within 1 s" in rows["n3"]["error"]
    lines = cli_top.render(body, "cpu")
    assert any(line.startswith("n[1-3]") and "1/3 up" in line for line in lines)
