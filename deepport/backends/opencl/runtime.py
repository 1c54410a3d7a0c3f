"""The OpenCL device, context, queue and program cache of this process.

Device choice (once per process and value of ``DEEPPORT_OPENCL_DEVICE``):

- ``DEEPPORT_OPENCL_DEVICE`` set: the first device whose ``"<platform name> / <device name>"`` contains
  the value (case-insensitive), e.g. ``NVIDIA``, ``pthread``, ``Portable Computing Language``. No match
  makes the backend unavailable, with the list of devices in the reason.
- unset: the GPU with the most ``compute units x clock``; else the first CPU device; else any device.

Only devices whose compiler builds a one-line probe kernel take part (:func:`build_failure`); the others
are named in the reason, so a driver that cannot compile here (PoCL 3.0 on a CPU its LLVM does not know)
makes way for another one, or makes the backend unavailable with that reason.

Programs are built once per ``(source, options, device, driver version)`` in this process (the key of
:data:`_PROGRAMS`); pyopencl's and the driver's own caches make later processes cheap. The first build
of each program is logged on ``deepport.opencl`` at INFO with its duration.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

ENV_DEVICE = "DEEPPORT_OPENCL_DEVICE"
_HEADER = "bf16_fp8.h"
_log = logging.getLogger("deepport.opencl")


@dataclass(frozen=True)
class DeviceLimits:
    """What the kernels' tile choices read from the device (never a vendor name)."""

    platform: str
    name: str
    version: str
    driver_version: str
    is_gpu: bool
    compute_units: int
    max_work_group_size: int
    local_mem_size: int  # bytes per work-group
    local_mem_is_global: bool  # emulated local memory (CPU drivers): large tiles are cheap
    max_alloc: int
    fp32_denorms: bool  # CL_FP_DENORM: float32 denormals are kept (enables the one-multiply e4m3 decode)

    @property
    def label(self) -> str:
        return f"{self.platform} / {self.name}"


def _cl() -> Any:
    import pyopencl as cl

    return cl


def all_devices() -> list[Any]:
    """Every OpenCL device of every platform (an empty list when there is no platform)."""
    cl = _cl()
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        return []
    found: list[Any] = []
    for platform in platforms:
        try:
            found += platform.get_devices()
        except cl.Error:  # a platform with no device raises DEVICE_NOT_FOUND
            continue
    return found


_PROBE_SOURCE = "__kernel void deepport_probe(__global int *a) { a[get_global_id(0)] += 1; }"
_probes: dict[str, str | None] = {}
_probes_lock = threading.Lock()


def build_failure(device: Any) -> str | None:
    """``None`` when ``device``'s compiler builds a one-line kernel, else the first line of its build log
    (once per device and driver version in this process). PoCL 3.0's LLVM 14, for one, cannot compile for
    a CPU it does not know (AMD family 1Ah, seen 2026-12-02: ``unknown target CPU 'generic'``), while a
    newer PoCL next to it can; such a device is set aside rather than chosen and failing at every call."""
    cl = _cl()
    key = f"{label(device)} | {device.driver_version.strip()} | {device.int_ptr}"
    with _probes_lock:
        if key not in _probes:
            try:
                cl.Program(cl.Context([device]), _PROBE_SOURCE).build()
                _probes[key] = None
            except cl.Error as exc:
                lines = [ln.strip() for ln in str(exc).splitlines() if "error" in ln.lower()]
                _probes[key] = (lines[-1] if lines else str(exc).splitlines()[0])[:200]
        return _probes[key]


def buildable_devices() -> tuple[list[Any], list[str]]:
    """``(devices, set_aside)``: the devices of :func:`all_devices` whose compiler works, and for each other
    one ``"<label>: <build error>"``."""
    kept, aside = [], []
    for device in all_devices():
        failure = build_failure(device)
        if failure is None:
            kept.append(device)
        else:
            aside.append(f"{label(device)}: {failure}")
    return kept, aside


def _choose() -> tuple[Any | None, str]:
    """:func:`choose_device` among the devices that build a kernel; the reason names those set aside."""
    kept, aside = buildable_devices()
    if aside and not kept:
        return None, (f"no OpenCL device builds a kernel ({'; '.join(aside)}); PoCL 3.0 cannot compile for a CPU "
                      f"its LLVM 14 does not know: install a newer PoCL (Debian: apt-get install pocl-opencl-icd)")
    device, why = choose_device(kept, os.environ.get(ENV_DEVICE, "").strip() or None)
    if aside:
        why += f" (set aside, their compiler fails: {'; '.join(aside)})"
    return device, why


def label(device: Any) -> str:
    return f"{device.platform.name.strip()} / {device.name.strip()}"


def choose_device(devices: list[Any], request: str | None) -> tuple[Any | None, str]:
    """``(device, why)``: the device for ``request`` (a substring) or the best one; ``None`` and the
    reason when nothing matches."""
    if not devices:
        return None, "no OpenCL platform or device found (install an ICD, e.g. pip install pocl-binary-distribution)"
    if request:
        for device in devices:
            if request.lower() in label(device).lower():
                return device, f"${ENV_DEVICE}={request!r}"
        names = "; ".join(label(d) for d in devices)
        return None, f"${ENV_DEVICE}={request!r} matches no OpenCL device (found: {names})"
    cl = _cl()
    gpus = [d for d in devices if d.type & cl.device_type.GPU]
    if gpus:
        return max(gpus, key=lambda d: d.max_compute_units * max(d.max_clock_frequency, 1)), "the fastest GPU"
    cpus = [d for d in devices if d.type & cl.device_type.CPU]
    return (cpus or devices)[0], "no GPU found" if cpus else "no GPU or CPU device found"


def unavailable_reason() -> str | None:
    """``None`` when pyopencl imports and a device can be chosen, else why not (the backend's probe)."""
    try:
        _cl()
    except ImportError as exc:
        return f"pyopencl is not installed ({exc}); pip install 'deepport[opencl]'"
    device, why = _choose()
    return why if device is None else None


def limits_of(device: Any) -> DeviceLimits:
    cl = _cl()
    return DeviceLimits(
        platform=device.platform.name.strip(), name=device.name.strip(), version=device.version.strip(),
        driver_version=device.driver_version.strip(), is_gpu=bool(device.type & cl.device_type.GPU),
        compute_units=int(device.max_compute_units), max_work_group_size=int(device.max_work_group_size),
        local_mem_size=int(device.local_mem_size),
        local_mem_is_global=int(device.local_mem_type) == int(cl.device_local_mem_type.GLOBAL),
        max_alloc=int(device.max_mem_alloc_size),
        fp32_denorms=bool(device.single_fp_config & cl.device_fp_config.DENORM))


class Runtime:
    """One device, its context, an in-order profiling queue and the programs built for it."""

    def __init__(self, device: Any, why: str) -> None:
        cl = _cl()
        self.device = device
        self.limits = limits_of(device)
        self.context = cl.Context([device])
        self.queue = cl.CommandQueue(self.context, properties=cl.command_queue_properties.PROFILING_ENABLE)
        self._programs: dict[str, Any] = {}
        self._kernels: dict[tuple[str, str], Any] = {}
        self._lock = threading.Lock()
        _log.info("deepport.opencl: using %s (%s; %s)", self.limits.label, self.limits.version, why)

    def kernel(self, source: str, name: str, defines: Mapping[str, int | float] | None = None) -> Any:
        """The kernel ``name`` of ``source`` (a ``.cl`` file of this folder) built with ``defines``."""
        options = _options({"DEEPPORT_FP32_DENORMS": int(self.limits.fp32_denorms), **(defines or {})})
        key = _program_key(_source_text(source), options, self.limits)
        with self._lock:
            kernel = self._kernels.get((key, name))
            if kernel is None:
                kernel = _cl().Kernel(self._program(source, key, options), name)
                self._kernels[(key, name)] = kernel
        return kernel

    def _program(self, source: str, key: str, options: list[str]) -> Any:
        program = self._programs.get(key)
        if program is None:
            start = time.perf_counter()
            program = _cl().Program(self.context, _source_text(source)).build(options=options)
            _log.info("deepport.opencl: built %s %s for %s in %.2f s", source, " ".join(options),
                      self.limits.label, time.perf_counter() - start)
            self._programs[key] = program
        return program

    def require_work_group(self, kernel: Any, threads: int) -> None:
        """Raise a clear error when the compiled ``kernel`` cannot run work-groups of ``threads`` here
        (e.g. too many registers for the tile): the driver would only say INVALID_WORK_GROUP_SIZE."""
        cl = _cl()
        limit = int(kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, self.device))
        if limit < threads:
            raise RuntimeError(f"deepport.opencl: kernel {kernel.function_name} runs at most {limit} work-items "
                               f"per work-group on {self.limits.label}, its tile needs {threads}")


def _options(defines: Mapping[str, int | float]) -> list[str]:
    opts = ["-cl-std=CL1.2"]
    for name in sorted(defines):
        value = defines[name]
        opts.append(f"-D{name}={value!r}f" if isinstance(value, float) else f"-D{name}={int(value)}")
    return opts


def _program_key(text: str, options: list[str], limits: DeviceLimits) -> str:
    h = hashlib.sha256()
    for part in (text, " ".join(options), limits.platform, limits.name, limits.version, limits.driver_version):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@functools.cache
def _source_text(name: str) -> str:
    """The kernel file ``name`` with the shared header prepended (concatenation: no include paths)."""
    folder = resources.files(__package__ or "deepport.backends.opencl")
    header = folder.joinpath(_HEADER).read_text()
    return f"{header}\n#line 1\n{folder.joinpath(name).read_text()}"


_runtimes: dict[str, Runtime] = {}
_runtimes_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The runtime of the device :func:`choose_device` picks (one per value of ``DEEPPORT_OPENCL_DEVICE``)."""
    request = os.environ.get(ENV_DEVICE, "").strip()
    with _runtimes_lock:
        rt = _runtimes.get(request)
        if rt is None:
            device, why = _choose()
            if device is None:
                raise RuntimeError(f"deepport.opencl: {why}")
            rt = Runtime(device, why)
            _runtimes[request] = rt
        return rt


def describe_devices() -> list[dict[str, Any]]:
    """Every OpenCL device with its versions, limits and extensions, and which one the backend uses
    (for ``deepport info``). Empty when pyopencl is missing or no platform exists."""
    try:
        devices = all_devices()
    except ImportError:
        return []
    chosen, _ = _choose()
    rows = []
    for d in devices:
        lim = limits_of(d)
        rows.append({"device": lim.label, "selected": d == chosen, "build_failure": build_failure(d),
                     "version": lim.version,
                     "opencl_c": d.opencl_c_version.strip(), "driver": lim.driver_version, "gpu": lim.is_gpu,
                     "compute_units": lim.compute_units, "max_work_group_size": lim.max_work_group_size,
                     "local_mem_bytes": lim.local_mem_size, "local_mem_emulated": lim.local_mem_is_global,
                     "extensions": sorted(d.extensions.split())})
    return rows
