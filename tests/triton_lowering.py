"""Ahead-of-time compilation of the Triton kernels for a GPU target, without a GPU (lowering tests).

Run in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces compilation). Arguments
are specialised the way triton's launcher does: pointers 16-byte aligned, integers divisible by 16
marked so, integers equal to 1 folded into constants.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass(frozen=True)
class Ptr:
    """A pointer argument of element type ``dtype`` (triton's names: bf16, fp16, fp32, i32 ...)."""

    dtype: str


def compile_for(fn: Any, args: Mapping[str, Any], *, target: GPUTarget = HOPPER, num_warps: int = 4,
                num_stages: int = 3) -> Any:
    """Compile ``fn`` with ``args`` (name -> :class:`Ptr`, int, float, or bool / int constexpr for
    ``tl.constexpr`` parameters) for ``target``; returns triton's compiled kernel (``.asm``)."""
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    params = fn.arg_names
    missing = set(params) - set(args)
    if missing:
        raise ValueError(f"missing arguments {sorted(missing)}")
    for i, name in enumerate(params):
        value = args[name]
        if i in fn.constexprs:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, Ptr):
            signature[name] = "*" + value.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[(i,)] = 1
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def ptxas_info(ptx: str, arch: str = "sm_90a") -> dict[str, int]:
    """Registers, spill bytes and shared memory of a PTX module, from the ptxas bundled with triton."""
    ptxas = _ptxas()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = res.stderr + res.stdout
    found = {"registers": r"Used (\d+) registers", "spill_stores": r"(\d+) bytes spill stores",
             "spill_loads": r"(\d+) bytes spill loads"}
    return {k: int(m.group(1)) if (m := re.search(p, text)) else 0 for k, p in found.items()}


def _ptxas() -> str:
    """The ptxas triton itself uses for sm_90 (triton >= 3.9 ships a newer one as ``ptxas-blackwell``)."""
    from triton.backends.nvidia import compiler

    getter = getattr(compiler, "get_ptxas", None)
    if getter is not None:
        try:
            return str(getter(90).path)
        except TypeError:  # triton 3.6: get_ptxas() takes no argument
            return str(getter().path)
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
