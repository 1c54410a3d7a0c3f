"""Run-time compilation with NVRTC through ``cuda.bindings.nvrtc`` (works on machines without a GPU).

:func:`compile_cubin` turns a :class:`~deepport.backends.hopper.sources.KernelSource` into an sm_90a
cubin with ``-arch=sm_90a -std=c++17`` plus the caller's defines. The headers travel in memory with
the program, so no CUDA include directory is needed. Errors raise :class:`NvrtcError` carrying
NVRTC's log; the log of a successful compile (ptxas' resource report with ``-Xptxas -v``) is returned
with the cubin.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from deepport.backends.hopper.sources import KernelSource

ARCH = "sm_90a"
BASE_OPTIONS: tuple[str, ...] = (f"-arch={ARCH}", "-std=c++17", "--device-as-default-execution-space")


class NvrtcError(RuntimeError):
    """NVRTC failed to compile a kernel (the message holds its log)."""


def _nvrtc() -> Any:
    from cuda.bindings import nvrtc  # lazy: the toolchain is optional

    return nvrtc


def _check(result: Any, what: str, log: str = "") -> None:
    nvrtc = _nvrtc()
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, text = nvrtc.nvrtcGetErrorString(result)
        raise NvrtcError(f"{what} failed: {text.decode() if isinstance(text, bytes) else text}\n{log}".rstrip())


@functools.cache
def version() -> str:
    """NVRTC's version, ``"13.0"`` (part of every cache key)."""
    nvrtc = _nvrtc()
    result, major, minor = nvrtc.nvrtcVersion()
    _check(result, "nvrtcVersion")
    return f"{major}.{minor}"


def compile_cubin(source: KernelSource, options: Sequence[str]) -> tuple[bytes, str]:
    """``(cubin, log)`` of ``source`` compiled with :data:`BASE_OPTIONS` + ``options``."""
    nvrtc = _nvrtc()
    names = [name.encode() for name, _ in source.headers]
    texts = [text.encode() for _, text in source.headers]
    result, prog = nvrtc.nvrtcCreateProgram(source.text.encode(), source.name.encode(), len(names), texts, names)
    _check(result, "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in (*BASE_OPTIONS, *options)]
        compiled = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)[0]
        log = _log(prog)
        _check(compiled, f"compiling {source.name} ({' '.join(options)})", log)
        result, size = nvrtc.nvrtcGetCUBINSize(prog)
        _check(result, "nvrtcGetCUBINSize")
        cubin = b" " * size
        _check(nvrtc.nvrtcGetCUBIN(prog, cubin)[0], "nvrtcGetCUBIN")
        return cubin, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def _log(prog: Any) -> str:
    nvrtc = _nvrtc()
    result, size = nvrtc.nvrtcGetProgramLogSize(prog)
    if result != nvrtc.nvrtcResult.NVRTC_SUCCESS or size <= 1:
        return ""
    buf = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, buf)
    text: str = buf.rstrip(b"\x00").decode(errors="replace")
    return text
