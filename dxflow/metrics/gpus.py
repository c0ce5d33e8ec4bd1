"""The job's GPUs on this node: which ones, and what they do.

**Which.** Only the GPUs the scheduler gave the job, never the node's others (another user's job may
run on them). They are named by the scheduler's variables, looked for in the agent's environment and
then in the job's processes' (:data:`ALLOCATION_ENV`, first found wins). An entry is an index
(``0``), a GPU UUID (``GPU-…``) or a MIG device's UUID (``MIG-…``). No variable: no GPU is shown.

**Readings**, by the first reader that works on the node:

1. NVML through ``nvidia-ml-py`` (``import pynvml``; an optional extra, imported only when a job
   has GPUs). Units as NVML gives them: ``nvmlDeviceGetMemoryInfo`` in bytes,
   ``nvmlDeviceGetPowerUsage`` in milliwatts, ``nvmlDeviceGetUtilizationRates().gpu`` in percent of
   the last sample period, ``nvmlDeviceGetTemperature(h, NVML_TEMPERATURE_GPU)`` in °C. A call that
   raises ``NVMLError`` (``NOT_SUPPORTED``: utilisation of a MIG-enabled GPU, power of some boards)
   leaves that figure empty.
2. ``nvidia-smi --query-gpu=… --format=csv,noheader,nounits``: MiB, W, °C, %. ``[N/A]`` and
   ``[Not Supported]`` are empty figures. ``--query-gpu`` lists physical GPUs only: a MIG device is
   matched to nothing there and shows without readings.
3. ``rocm-smi --showuse --showmeminfo vram --showpower --showtemp --json`` for AMD GPUs (keys differ
   between ROCm releases; those known are matched by name).

No GPU exists on the machines dxflow is tested on: the NVML and ``nvidia-smi`` readers are tested
against stand-ins written to NVIDIA's documented interfaces (tests/fakes), rocm-smi's against sample
output. See docs/metrics.md.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from dataclasses import asdict, dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Variables that name a job's GPUs, best first: SLURM_JOB_GPUS holds the node's own indices (also in
#: the prolog's environment); CUDA_VISIBLE_DEVICES may be renumbered from 0 inside a step whose devices
#: cgroup hides the others, so it comes last. PBS Pro and LSF set CUDA_VISIBLE_DEVICES for the job.
ALLOCATION_ENV = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "GPU_DEVICE_ORDINAL", "ROCR_VISIBLE_DEVICES",
                  "CUDA_VISIBLE_DEVICES")
SMI_QUERY = "index,uuid,name,utilization.gpu,memory.used,memory.total,power.draw,temperature.gpu"
SMI_TIMEOUT = 5.0
MIB = 2**20


@dataclass
class GpuReading:
    """One GPU of the job at one moment; None where the device does not tell."""

    index: int | None
    uuid: str
    name: str = ""
    utilization: float | None = None    # percent
    memory_used: float | None = None    # bytes
    memory_total: float | None = None   # bytes
    power: float | None = None          # watts
    temperature: float | None = None    # °C

    def to_dict(self) -> dict:
        return asdict(self)


def allocation(*environments: dict[str, str]) -> list[str] | None:
    """The job's GPUs (indices or UUIDs) from the first environment and variable that names them;
    None when none does (the job has no GPU here), [] for an allocation of none (``NoDevFiles``)."""
    for env in environments:
        for name in ALLOCATION_ENV:
            value = env.get(name)
            if value is None:
                continue
            items = [v.strip() for v in value.split(",") if v.strip()]
            if items in (["NoDevFiles"], ["-1"]):
                return []
            return items
    return None


def _wanted(reading: GpuReading, wanted: list[str]) -> bool:
    return reading.uuid in wanted or (reading.index is not None and str(reading.index) in wanted)


def _missing(readings: list[GpuReading], wanted: list[str]) -> list[GpuReading]:
    """GPUs allocated but not read (a MIG device under ``nvidia-smi``): listed, without figures."""
    seen = {r.uuid for r in readings} | {str(r.index) for r in readings}
    return [GpuReading(index=int(w) if w.isdigit() else None, uuid="" if w.isdigit() else w)
            for w in wanted if w not in seen]


# -- nvidia-smi ---------------------------------------------------------------------
def _smi_number(text: str) -> float | None:
    text = text.strip()
    if not text or text.startswith("[") or text.upper() in ("N/A", "NOT SUPPORTED"):
        return None  # [N/A], [Not Supported], [Unknown Error], [GPU is lost]
    try:
        return float(text)
    except ValueError:
        return None


def parse_smi(out: str) -> list[GpuReading]:
    """Lines of ``nvidia-smi --query-gpu=SMI_QUERY --format=csv,noheader,nounits``."""
    result = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.split(",")]
        if len(cells) != 8:
            continue
        idx, uuid, name, util, used, total, power, temp = cells
        mem_used, mem_total = _smi_number(used), _smi_number(total)
        result.append(GpuReading(
            index=int(idx) if idx.isdigit() else None, uuid=uuid, name=name, utilization=_smi_number(util),
            memory_used=None if mem_used is None else mem_used * MIB,
            memory_total=None if mem_total is None else mem_total * MIB,
            power=_smi_number(power), temperature=_smi_number(temp)))
    return result


def read_smi(exe: str) -> list[GpuReading]:
    out = subprocess.run([exe, f"--query-gpu={SMI_QUERY}", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=SMI_TIMEOUT, check=True).stdout
    return parse_smi(out)


# -- NVML -----------------------------------------------------------------------------
def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Nvml:
    """NVML through ``pynvml`` (nvidia-ml-py), initialised once and kept."""

    def __init__(self, pynvml: Any) -> None:
        self.nv = pynvml
        pynvml.nvmlInit()

    def _call(self, fn: Callable, *args) -> Any:
        try:
            return fn(*args)
        except self.nv.NVMLError:
            return None  # NOT_SUPPORTED and the like: this figure is unknown

    def _handle(self, item: str) -> Any:
        if item.isdigit():
            return self.nv.nvmlDeviceGetHandleByIndex(int(item))
        return self.nv.nvmlDeviceGetHandleByUUID(item)

    def read(self, wanted: list[str]) -> list[GpuReading]:
        out = []
        for item in wanted:
            try:
                h = self._handle(item)
            except self.nv.NVMLError as e:
                log.info("NVML does not know GPU %s: %s", item, e)
                out.append(GpuReading(index=int(item) if item.isdigit() else None,
                                      uuid="" if item.isdigit() else item))
                continue
            uuid = _text(self._call(self.nv.nvmlDeviceGetUUID, h) or item)
            index = self._call(self.nv.nvmlDeviceGetIndex, h)
            if index is None and item.isdigit():
                index = int(item)
            util = self._call(self.nv.nvmlDeviceGetUtilizationRates, h)
            mem = self._call(self.nv.nvmlDeviceGetMemoryInfo, h)
            power = self._call(self.nv.nvmlDeviceGetPowerUsage, h)
            temp = self._call(self.nv.nvmlDeviceGetTemperature, h, self.nv.NVML_TEMPERATURE_GPU)
            out.append(GpuReading(
                index=index, uuid=uuid, name=_text(self._call(self.nv.nvmlDeviceGetName, h) or ""),
                utilization=None if util is None else float(util.gpu),
                memory_used=None if mem is None else float(mem.used),
                memory_total=None if mem is None else float(mem.total),
                power=None if power is None else power / 1000.0,
                temperature=None if temp is None else float(temp)))
        return out


# -- rocm-smi ---------------------------------------------------------------------------
def _rocm_value(card: dict, *needles: str) -> float | None:
    for key, value in card.items():
        k = key.lower()
        if all(n in k for n in needles):
            return _smi_number(str(value))
    return None


def parse_rocm(out: str) -> list[GpuReading]:
    """``rocm-smi --showuse --showmeminfo vram --showpower --showtemp --showuniqueid --json``."""
    data = json.loads(out or "{}")
    result = []
    for card, values in sorted(data.items()):
        if not card.startswith("card") or not isinstance(values, dict):
            continue
        index = int(card[4:]) if card[4:].isdigit() else None
        result.append(GpuReading(
            index=index, uuid=str(values.get("Unique ID", "")), name=str(values.get("Card series", "")),
            utilization=_rocm_value(values, "gpu use"),
            memory_used=_rocm_value(values, "vram", "used", "(b)"),
            memory_total=_rocm_value(values, "vram", "total memory", "(b)"),
            power=_rocm_value(values, "power", "(w)"),
            temperature=_rocm_value(values, "temperature", "edge") or _rocm_value(values, "temperature")))
    return result


def read_rocm(exe: str) -> list[GpuReading]:
    out = subprocess.run([exe, "--showuse", "--showmeminfo", "vram", "--showpower", "--showtemp",
                          "--showuniqueid", "--json"], capture_output=True, text=True, timeout=SMI_TIMEOUT,
                         check=True).stdout
    return parse_rocm(out)


# -- one reader for the agent ------------------------------------------------------------
class GpuReader:
    """Reads the job's GPUs through the first reader that works here; remembers which."""

    def __init__(self, wanted: list[str], path: str | None = None) -> None:
        self.wanted = wanted
        self.path = path  # PATH to look for the tools in (tests give their stand-ins' folder)
        self.how = ""
        self._nvml: Nvml | None = None
        self._exe = ""

    def _choose(self) -> None:
        try:
            import pynvml  # optional (nvidia-ml-py): only nodes with NVIDIA GPUs need it
            self._nvml = Nvml(pynvml)
            self.how = "nvml"
            return
        except ImportError:
            pass
        except Exception as e:  # noqa: BLE001 - NVMLError_LibraryNotFound, DriverNotLoaded...: try the tools
            log.info("NVML unavailable (%s): trying nvidia-smi", e)
        for name, how in (("nvidia-smi", "nvidia-smi"), ("rocm-smi", "rocm-smi")):
            exe = shutil.which(name, path=self.path)
            if exe:
                self.how, self._exe = how, exe
                return
        self.how = "none"

    def read(self) -> list[GpuReading]:
        """The allocated GPUs' readings; those that cannot be read are listed without figures."""
        if not self.wanted:
            return []
        if not self.how:
            self._choose()
        try:
            if self.how == "nvml" and self._nvml is not None:
                return self._nvml.read(self.wanted)
            if self.how == "nvidia-smi":
                readings = read_smi(self._exe)
            elif self.how == "rocm-smi":
                readings = read_rocm(self._exe)
            else:
                readings = []
        except (OSError, subprocess.SubprocessError, ValueError) as e:
            log.info("cannot read GPUs through %s: %s", self.how, e)
            readings = []
        mine = [r for r in readings if _wanted(r, self.wanted)]
        return mine + _missing(mine, self.wanted)
