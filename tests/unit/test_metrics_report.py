"""The efficiency report (:mod:`dxflow.metrics.report`): nodes merged, figures against what was allocated,
notes in plain words — for one node, several nodes, and GPUs."""

from __future__ import annotations

import pytest

from dxflow.metrics.report import merge, text

GIB = 2**30


def part(node: str, *, cores=2, wall=100.0, cpu=100.0, peak=0.5 * GIB, limit=4 * GIB, idle=0.0, gpus=(), final=True):
    return {"job": "7", "node": node, "user": "alice", "cluster": "c", "scheduler": "slurm", "interval": 2.0,
            "started": 1000.0, "last": 1000.0 + wall, "samples": int(wall / 2), "cores": cores,
            "memory_limit_bytes": limit, "cpu_seconds": cpu, "memory_peak_bytes": peak, "rss_peak_bytes": peak,
            "processes_max": 3, "read_bytes": 0.0, "write_bytes": 0.0, "idle_seconds": idle, "cpu_source": "processes",
            "agent_cpu_seconds": 0.1, "agent_rss_peak_bytes": 30e6, "gpus": list(gpus), "final": final}


def gpu(index, util_mean, util_max, mem_peak=GIB, total=40 * GIB, wall=100.0):
    return {"index": index, "uuid": f"GPU-{index}", "name": "A100", "memory_total_bytes": total,
            "memory_peak_bytes": mem_peak, "utilization_sum": util_mean * wall, "utilization_seconds": wall,
            "utilization_max": util_max, "busy_seconds": wall if util_max else 0.0, "power_sum": 1e4,
            "power_seconds": wall}


def test_one_of_two_cores_busy_is_half_efficiency_and_says_so():
    r = merge([part("n1", cores=2, cpu=100.0, wall=100.0)])
    assert r["cpu_efficiency"] == pytest.approx(0.5)
    assert r["complete"]
    assert not any("CPU time" in n for n in r["notes"])  # 50 % is not below the threshold
    low = merge([part("n1", cores=8, cpu=100.0, wall=100.0)])
    assert any("only 12 % of the CPU time allocated was used" in n for n in low["notes"])


def test_multi_node_weighs_each_node_by_its_own_cores_and_time():
    r = merge([part("n1", cores=4, cpu=400.0), part("n2", cores=4, cpu=0.0, idle=100.0)])
    assert r["cpu_efficiency"] == pytest.approx(0.5)
    assert r["cores"] == 8
    assert [n["cpu_efficiency"] for n in r["nodes"]] == [pytest.approx(1.0), pytest.approx(0.0)]
    assert r["idle_share"] == pytest.approx(0.5)
    assert any("idle" in n for n in r["notes"])
    assert "n2" in text(r)


def test_memory_note_against_the_request():
    r = merge([part("n1", peak=0.25 * GIB, limit=4 * GIB)])
    assert "memory peak was 6 % of what was requested" in r["notes"]
    tight = merge([part("n1", peak=3.9 * GIB, limit=4 * GIB)])
    assert any("close to the limit" in n for n in tight["notes"])
    unknown = merge([part("n1", limit=None)])
    assert unknown["memory_efficiency"] is None
    assert any("no memory limit" in n for n in unknown["notes"])


def test_gpus_never_used_are_counted():
    gs = [gpu(0, 90.0, 100.0), gpu(1, 0.0, 0.0), gpu(2, 0.0, 0.0), gpu(3, 0.0, 0.0)]
    r = merge([part("n1", gpus=gs[:2]), part("n2", gpus=gs[2:])])
    assert "3 of 4 GPUs were never used" in r["notes"]
    g0 = r["gpus"][0]
    assert g0["utilization_mean"] == pytest.approx(0.9) and g0["memory_efficiency"] == pytest.approx(1 / 40)
    assert g0["energy_joules"] == 1e4
    out = text(r)
    assert "n1:0" in out and "n2:3" in out


def test_a_running_job_says_the_report_is_partial():
    r = merge([part("n1", final=False)])
    assert not r["complete"] and "may still run" in r["notes"][0]


def test_no_part_is_an_error():
    with pytest.raises(ValueError):
        merge([])
