"""What device a call runs on, as dispatch sees it: a small frozen record derived from torch.device."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    """Identity of one torch device.

    ``kind`` is the key of backend priority lists: ``"cpu"``, ``"cuda"`` (NVIDIA), ``"rocm"`` (AMD
    through torch's HIP build, which torch also calls ``cuda``), ``"xpu"``, ``"mps"`` or the raw torch
    device type for anything else (``"npu"``, ``"privateuseone"`` ...).
    """

    type: str  # torch device type: "cpu", "cuda", "xpu", ...
    index: int | None
    kind: str
    vendor: str
    name: str
    capability: tuple[int, int] | None  # CUDA compute capability (NVIDIA only)
    multiprocessors: int  # SMs / CUs / cores: the parallelism a split-KV schedule targets

    @property
    def arch(self) -> str:
        """Architecture tag: ``sm_90`` for an H100/H200, the device kind otherwise."""
        if self.capability is not None:
            return f"sm_{self.capability[0]}{self.capability[1]}"
        return self.kind

    def describe(self) -> str:
        where = self.type if self.index is None else f"{self.type}:{self.index}"
        extra = f", {self.arch}" if self.capability else ""
        return f"{where} ({self.name}{extra}, {self.multiprocessors} units)"


@functools.cache
def _device_info(device_type: str, index: int | None) -> DeviceInfo:
    if device_type == "cpu":
        return DeviceInfo("cpu", None, "cpu", "cpu", platform.processor() or platform.machine(),
                          None, os.cpu_count() or 1)
    if device_type == "cuda":
        idx = torch.cuda.current_device() if index is None else index
        props = torch.cuda.get_device_properties(idx)
        if getattr(torch.version, "hip", None):
            return DeviceInfo("cuda", idx, "rocm", "amd", props.name, None, props.multi_processor_count)
        return DeviceInfo("cuda", idx, "cuda", "nvidia", props.name, (props.major, props.minor),
                          props.multi_processor_count)
    if device_type == "xpu":
        xpu = getattr(torch, "xpu")  # noqa: B009 - only present in XPU builds
        idx = xpu.current_device() if index is None else index
        props = xpu.get_device_properties(idx)
        units = int(getattr(props, "gpu_subslice_count", 0) or getattr(props, "max_compute_units", 1))
        return DeviceInfo("xpu", idx, "xpu", "intel", str(props.name), None, units)
    return DeviceInfo(device_type, index, device_type, device_type, device_type, None, 1)


def device_info(device: torch.device) -> DeviceInfo:
    """The :class:`DeviceInfo` of a torch device (cached per device)."""
    return _device_info(device.type, device.index)


def visible_devices() -> list[DeviceInfo]:
    """Every device this torch build can see: the CPU, then each GPU."""
    found = [device_info(torch.device("cpu"))]
    if torch.cuda.is_available():
        found += [device_info(torch.device("cuda", i)) for i in range(torch.cuda.device_count())]
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        found += [device_info(torch.device("xpu", i)) for i in range(xpu.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append(device_info(torch.device("mps")))
    return found
