"""The job's GPUs (:mod:`dxflow.metrics.gpus`): which ones, and their readings through NVML, nvidia-smi and
rocm-smi — against stand-ins written to NVIDIA's documented interfaces (tests/fakes/gpu; no GPU here)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from dxflow.metrics import gpus

FAKES = Path(__file__).resolve().parents[1] / "fakes" / "gpu"
MIB = 2**20
DEVICES = [
    {"index": 0, "uuid": "GPU-0000aaaa-0000-0000-0000-000000000000", "name": "NVIDIA A100-SXM4-40GB",
     "utilization": 87, "memory_used_mib": 30000, "memory_total_mib": 40960, "power_w": 312.5, "temperature": 61},
    {"index": 1, "uuid": "GPU-1111bbbb-0000-0000-0000-000000000000", "name": "NVIDIA A100-SXM4-40GB",
     "utilization": 0, "memory_used_mib": 4, "memory_total_mib": 40960, "power_w": None, "temperature": 33},
    {"index": 2, "uuid": "GPU-2222cccc-0000-0000-0000-000000000000", "name": "NVIDIA A100-SXM4-40GB",
     "utilization": 50, "memory_used_mib": 10, "memory_total_mib": 40960, "power_w": 90.0, "temperature": 40,
     "mig": True},
    {"index": 2, "uuid": "MIG-3333dddd-0000-0000-0000-000000000000", "name": "NVIDIA A100-SXM4-40GB MIG 1g.5gb",
     "utilization": None, "memory_used_mib": 1000, "memory_total_mib": 4864, "power_w": None, "temperature": None},
]


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    spec = tmp_path / "gpus.json"
    spec.write_text(json.dumps(DEVICES))
    monkeypatch.setenv("DXFLOW_FAKE_GPUS", str(spec))
    return spec


@pytest.fixture
def no_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError


@pytest.fixture
def fake_pynvml(monkeypatch, fake_gpus):
    monkeypatch.syspath_prepend(str(FAKES))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)
    module = importlib.import_module("pynvml")
    module.CALLS.clear()
    return module


def test_allocation_prefers_the_schedulers_own_indices():
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_GPUS": "2,3"}
    assert gpus.allocation(env) == ["2", "3"]
    assert gpus.allocation({"CUDA_VISIBLE_DEVICES": "GPU-ab, MIG-cd"}) == ["GPU-ab", "MIG-cd"]
    assert gpus.allocation({}, {"CUDA_VISIBLE_DEVICES": "1"}) == ["1"]  # the job process's, when the agent has none
    assert gpus.allocation({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}) == []
    assert gpus.allocation({"PATH": "/bin"}) is None


def test_nvidia_smi_csv_with_na_values_and_units_in_base_units():
    out = ("0, GPU-a, Tesla V100, 87, 30000, 40960, 312.50, 61\n"
           "1, GPU-b, Tesla V100, [N/A], 4, 40960, [Not Supported], 33\n")
    a, b = gpus.parse_smi(out)
    assert (a.index, a.uuid, a.utilization, a.memory_used, a.memory_total, a.power, a.temperature) == \
        (0, "GPU-a", 87.0, 30000 * MIB, 40960 * MIB, 312.5, 61.0)
    assert b.utilization is None and b.power is None and b.memory_used == 4 * MIB


def test_fake_nvidia_smi_only_the_jobs_gpus_and_mig_listed_without_figures(fake_gpus, no_pynvml):
    reader = gpus.GpuReader(["1", "MIG-3333dddd-0000-0000-0000-000000000000"], path=str(FAKES))
    readings = reader.read()
    assert reader.how == "nvidia-smi"
    assert [r.index for r in readings] == [1, None]  # GPU 0 and 2 belong to someone else: not shown
    one, mig = readings
    assert one.utilization == 0.0 and one.power is None and one.temperature == 33.0
    assert one.memory_total == 40960 * MIB
    assert mig.uuid.startswith("MIG-") and mig.utilization is None and mig.memory_used is None


def test_fake_nvidia_smi_refuses_unknown_fields_like_the_real_one(fake_gpus):
    import subprocess
    proc = subprocess.run([str(FAKES / "nvidia-smi"), "--query-gpu=index,bogus", "--format=csv"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and 'Field "bogus" is not a valid field to query.' in proc.stdout


def test_nvml_units_and_not_supported(fake_pynvml):
    reader = gpus.GpuReader(["0", "1", "GPU-2222cccc-0000-0000-0000-000000000000",
                             "MIG-3333dddd-0000-0000-0000-000000000000"])
    zero, one, mig_parent, mig = reader.read()
    assert reader.how == "nvml" and "nvmlInit" in fake_pynvml.CALLS
    assert zero.power == 312.5                      # milliwatts -> watts
    assert zero.memory_used == 30000 * MIB          # bytes, as NVML gives them
    assert zero.utilization == 87.0 and zero.temperature == 61.0
    assert one.power is None                        # NOT_SUPPORTED: unknown, not 0
    assert mig_parent.utilization is None           # MIG enabled: utilisation not supported
    assert mig.index is None and mig.memory_total == 4864 * MIB and mig.utilization is None


def test_nvml_unknown_gpu_is_listed_without_figures(fake_pynvml):
    readings = gpus.GpuReader(["7"]).read()
    assert len(readings) == 1 and readings[0].index == 7 and readings[0].memory_used is None


def test_no_tool_no_figures(no_pynvml, tmp_path):
    reader = gpus.GpuReader(["0"], path=str(tmp_path))
    assert [r.to_dict()["utilization"] for r in reader.read()] == [None]
    assert reader.how == "none"


def test_rocm_smi_json():
    out = json.dumps({"card0": {"GPU use (%)": "45", "Temperature (Sensor edge) (C)": "50.0",
                                "Average Graphics Package Power (W)": "120.0",
                                "VRAM Total Memory (B)": "34342961152", "VRAM Total Used Memory (B)": "1073741824",
                                "Unique ID": "0x1234", "Card series": "Instinct MI210"}})
    (r,) = gpus.parse_rocm(out)
    assert (r.index, r.utilization, r.temperature, r.power, r.memory_used, r.memory_total) == \
        (0, 45.0, 50.0, 120.0, 1073741824.0, 34342961152.0)
