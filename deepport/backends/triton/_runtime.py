"""Shared plumbing of the Triton backend: the availability probe, interpreter detection, the device
requirement and the lookup of tuned configurations.

Nothing here imports triton at module level: ``import deepport`` must work without it. Kernel modules
(``*_kernels.py``) import triton themselves and are loaded only when an op runs.

Interpreter mode (``TRITON_INTERPRET=1``, read by triton when a kernel is decorated) runs the kernels
on CPU tensors through numpy. It has known faults that the wrappers work around (see
:func:`interpreting`): bf16 ``tl.dot`` multiplies bit patterns, and fp32 -> bf16/fp16/fp8 stores are
not correctly rounded.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import torch

from deepport.dispatch import Requirement

_log = logging.getLogger("deepport.backends.triton")

GPU_KINDS = frozenset({"cuda", "rocm", "xpu"})
_TRUE = frozenset({"1", "true", "yes", "on", "y"})


def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter (``TRITON_INTERPRET`` set to a true value).

    When it does, wrappers (1) upcast bf16 ``tl.dot`` operands to float32 inside the kernels
    (the interpreter's bf16 dot is wrong) and (2) let kernels store float32 and round to the output
    dtype with torch (the interpreter truncates float32 -> bf16 and drops carries in fp8 casts).
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def _gpu_present() -> bool:
    if torch.cuda.is_available():
        return True
    xpu = getattr(torch, "xpu", None)
    return bool(xpu is not None and xpu.is_available())


def probe() -> str | None:
    """``None`` when triton can run kernels in this process, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'deepport[triton]')"
    if interpreting():
        return None
    if not _gpu_present():
        return ("no GPU visible to torch (cuda, rocm or xpu) and TRITON_INTERPRET is not set "
                "(TRITON_INTERPRET=1 runs the kernels on CPU tensors through triton's interpreter)")
    import triton

    try:
        triton.runtime.driver.active.get_current_target()
    except Exception as exc:  # no usable triton driver for the GPU torch sees
        return f"triton has no usable driver for this GPU: {type(exc).__name__}: {exc}"
    return None


def identity() -> dict[str, str]:
    """Triton's version and how it runs the kernels (compiled for a GPU, or interpreted on the CPU), for
    certificates; empty when triton is not installed."""
    if importlib.util.find_spec("triton") is None:
        return {}
    import triton

    mode = "interpreter (TRITON_INTERPRET=1)" if interpreting() else "compiled"
    return {"triton": str(triton.__version__), "mode": mode}


def _device_check(sig: Any) -> str | None:
    kind = sig.device.kind
    if kind in GPU_KINDS and not interpreting():
        return None
    if kind == "cpu" and interpreting():
        return None
    mode = "interpreter (TRITON_INTERPRET=1)" if interpreting() else "compiled (TRITON_INTERPRET unset)"
    return f"a {kind} device with triton in {mode} mode"


DEVICE = Requirement("a GPU (cuda, rocm, xpu) device, or a cpu device under TRITON_INTERPRET=1", _device_check)
"""The device requirement every Triton op declares: compiled kernels need a GPU, the interpreter CPU tensors."""


C = TypeVar("C")


def pick_config(table: Mapping[str, Sequence[tuple[str, C]]], default: Sequence[tuple[str, C]],
                device_name: str, bucket: str, what: str) -> C:
    """The tuned configuration for ``bucket`` on the GPU named ``device_name``.

    ``table`` maps a device-name key (matched as a case-insensitive substring of the device name,
    e.g. ``"H200"`` in ``"NVIDIA H200"``) to ``(bucket, config)`` pairs; ``default`` is used for a
    device with no entry or a bucket its entry lacks. The choice is logged once per
    (what, device, bucket) at INFO.
    """
    name = device_name.lower()
    family, rows = "default", default
    for key, entries in table.items():
        if key.lower() in name and any(b == bucket for b, _ in entries):
            family, rows = key, entries
            break
    config = next((c for b, c in rows if b == bucket), None)
    if config is None:
        family, config = "default", next(c for b, c in default if b == bucket)
    _log_choice(what, device_name, bucket, family, repr(config))
    return config


@functools.cache
def _log_choice(what: str, device_name: str, bucket: str, family: str, config: str) -> None:
    _log.info("deepport triton %s on %s, shape bucket %s: %s config %s", what, device_name, bucket, family, config)
