"""Moving torch tensors to and from OpenCL buffers (through the host).

Inputs are copied as their logical elements in row-major order (``contiguous()`` on the host: strided
views and padding never travel), reinterpreted as raw integers where numpy has no such dtype (bf16 as
uint16, e4m3 as uint8). Outputs are read back into host arrays and copied into the caller's tensor, on
whatever torch device it lives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from deepport.backends.opencl.runtime import Runtime

_RAW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float8_e4m3fn: torch.uint8}
_MIN_BYTES = 16  # OpenCL rejects zero-sized buffers


def host_array(t: torch.Tensor) -> np.ndarray:
    """The tensor's logical elements, row-major, as a host numpy array (bf16/fp16 as int16, e4m3 as uint8)."""
    host = t.detach().to("cpu").contiguous()
    raw = _RAW.get(host.dtype)
    if raw is not None:
        host = host.view(raw)
    elif host.dtype == torch.bool:
        host = host.to(torch.uint8)
    return host.numpy()


def upload(rt: Runtime, t: torch.Tensor | np.ndarray, *, writable: bool = False) -> Any:
    """A device buffer holding ``t``'s logical elements (row-major); read-only unless ``writable``."""
    import pyopencl as cl

    arr = t if isinstance(t, np.ndarray) else host_array(t)
    arr = np.ascontiguousarray(arr)
    if arr.nbytes < _MIN_BYTES:
        padded = np.zeros(_MIN_BYTES, dtype=np.uint8)
        padded[: arr.nbytes] = arr.reshape(-1).view(np.uint8)
        arr = padded
    access = cl.mem_flags.READ_WRITE if writable else cl.mem_flags.READ_ONLY
    return cl.Buffer(rt.context, access | cl.mem_flags.COPY_HOST_PTR, hostbuf=arr)


def scratch(rt: Runtime, nbytes: int) -> Any:
    """An uninitialised read-write device buffer of at least ``nbytes``."""
    import pyopencl as cl

    return cl.Buffer(rt.context, cl.mem_flags.READ_WRITE, size=max(int(nbytes), _MIN_BYTES))


def download(rt: Runtime, buf: Any, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of ``shape`` and ``dtype`` with the first bytes of ``buf`` (blocking read)."""
    import pyopencl as cl

    raw = _RAW.get(dtype, dtype)
    host = torch.empty(shape, dtype=raw)
    if host.numel():
        cl.enqueue_copy(rt.queue, host.numpy(), buf)
    return host.view(dtype) if raw != dtype else host
