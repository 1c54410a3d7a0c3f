"""Loading cubins with CuPy and launching them on torch's current stream.

A kernel takes one ``__grid_constant__`` struct parameter; :func:`launch` passes its packed bytes by
pointer (CuPy's ``CPointer``), so the driver copies them into the kernel's parameter space at launch
(also under CUDA-graph capture). Modules are loaded once per (cache key, device) and keep the dynamic
shared-memory limit raised to what the kernel needs (more than the default 48 KiB).
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from typing import Any

import torch

_loaded: dict[tuple[str, int], Any] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class _Stream:
    """What CuPy's launch reads of a stream: its handle."""

    ptr: int


def load_function(key: str, cubin: bytes, entry: str, device_index: int, smem_bytes: int) -> Any:
    """The CuPy ``Function`` of ``entry`` in ``cubin`` on ``device_index`` (loaded once per key and
    device), with its dynamic shared-memory limit raised to ``smem_bytes``."""
    cached = _loaded.get((key, device_index))
    if cached is not None:
        return cached
    import cupy
    from cupy.cuda.function import Module
    from cupy_backends.cuda.api import driver

    with _lock, cupy.cuda.Device(device_index):
        cached = _loaded.get((key, device_index))
        if cached is None:
            module = Module()
            module.load(cubin)
            cached = module.get_function(entry)  # keeps its module alive
            driver.funcSetAttribute(cached.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes)
            _loaded[(key, device_index)] = cached
    return cached


def launch(function: Any, grid: int | tuple[int, ...], threads: int, smem_bytes: int, params: bytes,
           device: torch.device) -> None:
    """Launch ``function<<<grid, threads, smem_bytes, torch's current stream>>>(params)`` (``grid`` an int or
    up to three dimensions)."""
    import cupy
    from cupy.cuda.function import CPointer

    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = _Stream(_current_raw_stream(index))
    buffer = ctypes.create_string_buffer(params, len(params))
    dims = (grid,) if isinstance(grid, int) else tuple(grid)
    args = (CPointer(ctypes.addressof(buffer)),)
    if cupy.cuda.runtime.getDevice() == index:  # the usual case: no device switch (each costs host time)
        function(dims, (threads,), args, shared_mem=smem_bytes, stream=stream)
        return
    with cupy.cuda.Device(index):
        function(dims, (threads,), args, shared_mem=smem_bytes, stream=stream)


def _current_raw_stream(index: int) -> int:
    """torch's current stream on device ``index`` as a raw handle: torch's C accessor where the build has it
    (what Triton's launcher uses; ``torch.cuda.current_stream`` builds a Python stream object per call)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return int(raw(index))
    return int(torch.cuda.current_stream(index).cuda_stream)
