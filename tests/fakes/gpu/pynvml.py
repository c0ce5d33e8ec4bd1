"""A stand-in for ``pynvml`` (nvidia-ml-py) on machines without an NVIDIA GPU: tests only.

It follows nvidia-ml-py's documented interface for the calls dxflow makes — names, argument order,
return types and units: ``nvmlDeviceGetMemoryInfo`` gives bytes (``total``, ``free``, ``used``),
``nvmlDeviceGetPowerUsage`` milliwatts (int), ``nvmlDeviceGetUtilizationRates`` percents (``gpu``,
``memory``), ``nvmlDeviceGetTemperature(handle, NVML_TEMPERATURE_GPU)`` °C; errors are ``NVMLError``
subclasses carrying ``value`` (``NVML_ERROR_NOT_SUPPORTED`` = 3, ``NVML_ERROR_NOT_FOUND`` = 6), and a
MIG-enabled GPU (or a MIG device) raises NOT_SUPPORTED for its utilisation, as NVML documents.

The devices are read from the JSON file named by ``DXFLOW_FAKE_GPUS`` (a list of objects: index, uuid,
name, utilization, memory_used_mib, memory_total_mib, power_w, temperature, mig: bool; a figure given
as null is not supported by that device).
"""

from __future__ import annotations

import json
import os

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NOT_FOUND = 6
NVML_TEMPERATURE_GPU = 0
CALLS: list[str] = []  # what was called, for tests


class NVMLError(Exception):
    _names = {1: "Uninitialized", 2: "Invalid Argument", 3: "Not Supported", 6: "Not Found"}

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self._names.get(self.value, f"Unknown Error {self.value}")


class NVMLError_NotSupported(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_NOT_SUPPORTED)


class NVMLError_NotFound(NVMLError):
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_NOT_FOUND)


class c_nvmlMemory_t:
    def __init__(self, total: int, used: int) -> None:
        self.total, self.used, self.free = total, used, total - used


class c_nvmlUtilization_t:
    def __init__(self, gpu: int, memory: int) -> None:
        self.gpu, self.memory = gpu, memory


_devices: list[dict] | None = None


def _load() -> list[dict]:
    with open(os.environ["DXFLOW_FAKE_GPUS"]) as f:
        return json.load(f)


def _dev(handle) -> dict:
    if _devices is None:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    return handle


def nvmlInit() -> None:
    global _devices
    CALLS.append("nvmlInit")
    _devices = _load()


def nvmlShutdown() -> None:
    global _devices
    _devices = None


def nvmlDeviceGetCount() -> int:
    return len(_devices or [])


def nvmlDeviceGetHandleByIndex(index: int):
    if _devices is None:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    for d in _devices:
        if d["index"] == index:
            return d
    raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)


def nvmlDeviceGetHandleByUUID(uuid: str):
    if _devices is None:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)
    for d in _devices:
        if d["uuid"] == uuid:
            return d
    raise NVMLError_NotFound()


def nvmlDeviceGetUUID(handle) -> str:
    return _dev(handle)["uuid"]  # str since nvidia-ml-py 11.515 (bytes before)


def nvmlDeviceGetIndex(handle) -> int:
    d = _dev(handle)
    if d["uuid"].startswith("MIG-"):
        raise NVMLError_NotSupported()  # a MIG device has no index of its own
    return d["index"]


def nvmlDeviceGetName(handle) -> str:
    return _dev(handle)["name"]


def nvmlDeviceGetUtilizationRates(handle) -> c_nvmlUtilization_t:
    d = _dev(handle)
    CALLS.append("nvmlDeviceGetUtilizationRates")
    if d.get("mig") or d["uuid"].startswith("MIG-") or d.get("utilization") is None:
        raise NVMLError_NotSupported()
    return c_nvmlUtilization_t(int(d["utilization"]), 0)


def nvmlDeviceGetMemoryInfo(handle) -> c_nvmlMemory_t:
    d = _dev(handle)
    return c_nvmlMemory_t(int(d["memory_total_mib"]) * 2**20, int(d["memory_used_mib"]) * 2**20)


def nvmlDeviceGetPowerUsage(handle) -> int:
    d = _dev(handle)
    if d.get("power_w") is None:
        raise NVMLError_NotSupported()
    return int(round(d["power_w"] * 1000))  # milliwatts


def nvmlDeviceGetTemperature(handle, sensor: int) -> int:
    d = _dev(handle)
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    if d.get("temperature") is None:
        raise NVMLError_NotSupported()
    return int(d["temperature"])
