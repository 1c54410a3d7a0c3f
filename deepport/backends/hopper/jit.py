"""Compile-or-load of Hopper kernels: the cache key, the in-process and on-disk caches, ``DEEPPORT_JIT``.

:func:`get_cubin` returns the sm_90a cubin of a kernel source and option list. The key is the sha256
of the source and its headers, the options, the NVRTC version, the driver version (``"none"`` where
no CUDA device is visible, so caches built on a machine without a GPU are never mixed with a GPU
machine's) and the target arch, so any change of these compiles anew.

Environment (``DEEPPORT_`` prefix, read at each compile):

======================  =======  =====================================================================
variable                default  meaning
======================  =======  =====================================================================
``DEEPPORT_CACHE_DIR``  unset    kernel cache directory (default ``~/.cache/deepport/hopper``)
``DEEPPORT_JIT``        1        ``0``: never compile at run time; a kernel missing from the cache
                                 raises :class:`JitDisabledError` (pre-built caches only)
======================  =======  =====================================================================
"""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections.abc import Sequence

from deepport.backends.hopper import cache, nvrtc
from deepport.backends.hopper.sources import KernelSource

CACHE_FORMAT = "1"
_memory: dict[str, bytes] = {}
_lock = threading.Lock()


class JitDisabledError(RuntimeError):
    """``DEEPPORT_JIT=0`` and the kernel is not in the cache."""


def jit_enabled() -> bool:
    return os.environ.get("DEEPPORT_JIT", "1").strip().lower() not in {"0", "false", "no", "off"}


@functools.cache
def driver_version() -> str:
    """The CUDA driver's version (``"13000"``), or ``"none"`` where no CUDA device is visible."""
    import torch

    if not torch.cuda.is_available():
        return "none"
    from cuda.bindings import driver

    result, value = driver.cuDriverGetVersion()
    return str(value) if result == driver.CUresult.CUDA_SUCCESS else "none"


def cache_key(source: KernelSource, options: Sequence[str]) -> str:
    """sha256 over everything that determines the cubin."""
    h = hashlib.sha256()
    parts = [CACHE_FORMAT, source.name, source.text, source.entry, *(f"{n}\0{t}" for n, t in source.headers),
             *nvrtc.BASE_OPTIONS, *options, nvrtc.version(), driver_version(), nvrtc.ARCH]
    for part in parts:
        data = part.encode()
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def get_cubin(source: KernelSource, options: Sequence[str]) -> tuple[str, bytes]:
    """``(key, cubin)``: from memory, else the verified disk cache, else compiled (and stored)."""
    key = cache_key(source, options)
    cubin = _memory.get(key)
    if cubin is not None:
        return key, cubin
    with _lock:
        cubin = _memory.get(key)
        if cubin is None:
            cubin = _load_or_compile(key, source, options)
            _memory[key] = cubin
    return key, cubin


def _load_or_compile(key: str, source: KernelSource, options: Sequence[str]) -> bytes:
    directory = cache.cache_dir()
    cubin = cache.load(directory, key)
    if cubin is not None:
        return cubin
    if not jit_enabled():
        raise JitDisabledError(
            f"DEEPPORT_JIT=0 forbids compiling at run time, and {source.entry} ({' '.join(options)}) is not in the "
            f"kernel cache {directory} (key {key[:16]}...): build the cache with DEEPPORT_JIT=1 on a machine with "
            f"the same NVRTC {nvrtc.version()} and driver ({driver_version()}), or unset DEEPPORT_JIT")
    with cache.locked(directory, key):
        cubin = cache.load(directory, key)  # another process may have finished it while we waited
        if cubin is None:
            cubin, _ = nvrtc.compile_cubin(source, options)
            cache.store(directory, key, cubin)
    return cubin


def clear_memory() -> None:
    """Forget the in-process copies (tests)."""
    with _lock:
        _memory.clear()
