"""The master's ``/metrics`` text (:mod:`dxflow.metrics.prometheus`), read back with the official parser
of prometheus-client: names in base units, labels job/node/user/gpu, hostile label values escaped."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from dxflow.metrics import prometheus
from dxflow.metrics.summary import columns


def payload(job="7", node="n1", user="alice", gpus=1):
    cols = ["t"] + [c for c, _ in columns(gpus)]
    row = {c: None for c in cols}
    row.update(t=1796000000.0, cpu_cores=0.98, cpu_seconds=50.0, memory_bytes=2e8, rss_bytes=1e8, processes=3.0,
               read_bytes=4096.0, write_bytes=8192.0, node_cpu_cores=1.5, node_memory_bytes=8e8,
               node_rx_bytes=10.0, node_tx_bytes=20.0, agent_cpu_cores=0.01, agent_rss_bytes=3e7)
    if gpus:
        row.update(gpu0_utilization_percent=87.0, gpu0_memory_bytes=3e10, gpu0_power_watts=312.5,
                   gpu0_temperature_celsius=61.0)
    return {"job": job, "node": node, "user": user, "columns": cols, "rows": [[row[c] for c in cols]],
            "gpus": [{"index": 0, "uuid": "GPU-a", "name": "A100"}][:gpus],
            "summary": {"cores": 2, "cpu_seconds": 50.0, "memory_peak_bytes": 2.5e8, "memory_limit_bytes": 4e8,
                        "gpus": [{"index": 0, "uuid": "GPU-a", "power_sum": 900.0, "power_seconds": 3.0}][:gpus]}}


def parse(text: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text.decode())}


def test_text_parses_with_base_units_and_labels():
    fams = parse(prometheus.render([payload(), payload(node="n2", gpus=0)]))
    cpu = fams["dxflow_job_cpu_seconds"]
    assert cpu.type == "counter"
    assert {(s.name, s.labels["node"], s.value) for s in cpu.samples} == {
        ("dxflow_job_cpu_seconds_total", "n1", 50.0), ("dxflow_job_cpu_seconds_total", "n2", 50.0)}
    assert all(set(s.labels) == {"job", "node", "user"} for s in cpu.samples)
    util = fams["dxflow_job_gpu_utilization_ratio"]
    assert [(s.labels["gpu"], s.value) for s in util.samples] == [("0", 0.87)]
    assert fams["dxflow_job_gpu_power_watts"].samples[0].value == 312.5
    assert fams["dxflow_job_gpu_energy_joules"].samples[0].value == 900.0
    assert fams["dxflow_job_memory_limit_bytes"].samples[0].value == 4e8
    for name, fam in fams.items():
        assert name.startswith("dxflow_")
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples)


def test_hostile_label_values_are_escaped():
    job = 'x"} evil{a="1\n'
    fams = parse(prometheus.render([payload(job=job)]))
    assert {s.labels["job"] for s in fams["dxflow_job_cpu_cores"].samples} == {job}


def test_unknown_figures_are_left_out_not_zero():
    p = payload(gpus=0)
    p["rows"][0][p["columns"].index("cpu_cores")] = None
    fams = parse(prometheus.render([p]))
    assert fams["dxflow_job_cpu_cores"].samples == []


def test_no_node_no_series():
    fams = parse(prometheus.render([]))
    assert all(not f.samples for f in fams.values())


def test_the_example_grafana_dashboard_uses_only_series_that_exist():
    import json
    import re
    from pathlib import Path

    dashboard = json.loads((Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json").read_text())
    used = {name for p in dashboard["panels"] for t in p["targets"] for name in re.findall(r"dxflow_\w+", t["expr"])}
    used |= {name for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)
             for name in re.findall(r"dxflow_\w+", v["query"]["query"])}
    rendered = {s.name for f in parse(prometheus.render([payload()])).values() for s in f.samples}
    assert used and used <= rendered, used - rendered
