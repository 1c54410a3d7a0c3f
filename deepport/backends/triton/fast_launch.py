"""Launching a Triton kernel again without Triton's per-call argument binding.

``kernel[grid](*args)`` binds and specialises every argument in Python at each call (the specialisation key,
the cache lookup, the launch metadata): on the lent machines' CPU that costs far more than the launch itself
for kernels of twenty-odd arguments, and the expert-parallel ops' eager calls are timed with their host work.
:class:`FastLaunch` keeps, per configuration, the compiled kernel that Triton's first call returned and
launches it directly afterwards (``CompiledKernel[grid](*args)``, Triton's own runner).

The configuration key covers everything Triton specialises on, computed from the arguments the way Triton
does: each tensor's dtype and whether its address is 16-byte aligned; each integer's type (32 or 64 bits),
whether it is 1 and whether it is a multiple of 16; each constexpr's value; ``num_warps``. A key that is
finer than Triton's only compiles (and caches) the same kernel twice. Under Triton's interpreter every call
takes the ordinary path. Callers pass every parameter of the kernel, in order (constexprs included): the
compiled kernel's runner takes them all positionally.
"""

from __future__ import annotations

from typing import Any

import torch

from deepport.backends.triton._runtime import interpreting

_INT32 = range(-(1 << 31), 1 << 31)


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.dtype, int(value.data_ptr()) % 16 == 0
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value in _INT32, value == 1, value % 16 == 0
    if isinstance(value, float):
        return float
    raise TypeError(f"FastLaunch: unsupported argument type {type(value).__name__}")


class FastLaunch:
    """``FastLaunch(kernel)(grid, *args, num_warps=w)``: ``kernel[grid](*args, num_warps=w)`` (module
    docstring); ``args`` are all of ``kernel``'s parameters in order."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        self.names: tuple[str, ...] = tuple(kernel.arg_names)
        # the interpreter's stand-in has no constexpr list (nor a compiled kernel): it takes Triton's path
        self.constexprs = frozenset(int(i) for i in getattr(kernel, "constexprs", ()))
        self.compiled: dict[tuple[Any, ...], Any] = {}

    def __call__(self, grid: tuple[int, ...], *args: Any, num_warps: int = 4) -> None:
        if len(args) != len(self.names):
            raise TypeError(f"{self.names[0] if self.names else 'kernel'}...: FastLaunch takes all "
                            f"{len(self.names)} parameters of {getattr(self.kernel, '__name__', 'the kernel')} "
                            f"in order, got {len(args)}")
        if interpreting():
            self.kernel[grid](*args, num_warps=num_warps)
            return
        key = (num_warps, *(a if i in self.constexprs else _spec(a) for i, a in enumerate(args)))
        compiled = self.compiled.get(key)
        if compiled is None:  # Triton's path: compiles or loads, launches, returns the compiled kernel
            got = self.kernel[grid](*args, num_warps=num_warps)
            if hasattr(got, "__getitem__"):  # a Triton whose launch returns no runner keeps taking this path
                self.compiled[key] = got
            return
        compiled[(*grid, *(1,) * (3 - len(grid)))](*args)
