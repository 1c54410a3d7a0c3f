"""Ahead-of-time compilation of the backend's real launches for a GPU target, without a GPU.

:func:`recorded_launches` runs a launcher (e.g. ``mla_decode.run(call, out, lse, config)`` on CPU tensors
of the shapes and strides of a GPU call) with the named kernels' launches recorded instead of run;
:func:`compile_launch` compiles one recorded launch for a target (default Hopper, ``sm_90a``) with the
specialisation triton's launcher would derive from the same arguments (pointer alignment, integers
divisible by 16 or equal to 1, tensor descriptors' block shapes), so what compiles here is what the
GPU run compiles; :func:`lowering` summarises the result (tensor-core instructions, bulk tensor copies,
shared memory, registers and spills from ptxas).

Needs ``TRITON_INTERPRET`` unset (the interpreter replaces compilation) and a triton with the NVIDIA
backend; uses triton's launch-time helpers (``create_function_from_signature``, ``_pack_args``), which
are internal: a triton without them raises ``RuntimeError`` saying so.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    kernel: Any  # triton.runtime.jit.JITFunction
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return str(self.kernel.fn.__name__)


@contextlib.contextmanager
def recorded_launches(kernels: Sequence[Any]) -> Iterator[list[Launch]]:
    """Within the block, launches of ``kernels`` (triton JIT functions) are appended to the yielded list
    and not run (the launcher's host code runs as usual)."""
    found: list[Launch] = []

    def recorder(kernel: Any) -> Callable[..., None]:
        def run(*args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
            grid_t = tuple(grid) if not callable(grid) else tuple(grid(kwargs))
            found.append(Launch(kernel, grid_t, args, kwargs))
        return run

    for kernel in kernels:
        kernel.run = recorder(kernel)  # instance attribute: shadows JITFunction.run for this kernel only
    try:
        yield found
    finally:
        for kernel in kernels:
            del kernel.run


def hopper() -> Any:
    """triton's ``GPUTarget`` of an H100/H200 (``sm_90a`` when compiling)."""
    from triton.backends.compiler import GPUTarget

    return GPUTarget("cuda", 90, 32)


def compile_launch(launch: Launch, target: Any = None) -> Any:
    """Compile ``launch``'s kernel for ``target`` (default :func:`hopper`) as triton's launcher would for
    the same arguments; returns triton's compiled kernel (``.asm``, ``.metadata``)."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        raise RuntimeError("TRITON_INTERPRET is set: the interpreter replaces compilation; unset it to compile")
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    target = target or hopper()
    fn = launch.kernel
    make_binder = getattr(jit, "create_function_from_signature", None)
    if make_binder is None or not hasattr(fn, "_pack_args"):
        raise RuntimeError(f"triton {triton.__version__} lacks the launch-time helpers this compiles through")
    backend = make_backend(target)
    binder = make_binder(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, launch.kwargs, bound, specialization, options)
    source = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)


@dataclass(frozen=True)
class Lowering:
    """What one compiled kernel holds: Hopper tensor-core instructions (``wgmma``, with operand types),
    Ampere-style ``mma.sync``, bulk tensor copies (TMA), static shared memory (bytes), registers per
    thread and spill bytes (ptxas; -1 when ptxas was not found), threads per program."""

    kernel: str
    wgmma: int
    wgmma_types: tuple[str, ...]
    mma_sync: int
    tma: int
    shared: int
    registers: int
    spill_bytes: int
    threads: int

    def programs_per_sm(self, smem_per_sm: int = 233472, regs_per_sm: int = 65536) -> int:
        """Programs of this kernel one H100/H200 multiprocessor holds at once (228 KiB of shared memory,
        1 KiB of it reserved per program; 64 Ki registers, allocated per warp in units of 256)."""
        by_smem = smem_per_sm // (self.shared + 1024) if self.shared else 32
        if self.registers <= 0:
            return by_smem
        per_warp = -(-self.registers * 32 // 256) * 256
        return max(0, min(by_smem, regs_per_sm // (per_warp * (self.threads // 32))))

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "wgmma": self.wgmma, "wgmma_types": list(self.wgmma_types),
                "mma_sync": self.mma_sync, "tma": self.tma, "shared": self.shared, "registers": self.registers,
                "spill_bytes": self.spill_bytes, "threads": self.threads,
                "programs_per_sm": self.programs_per_sm()}


_WGMMA_TYPES = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m\d+n\d+k\d+\.(\w+)\.(\w+)\.(\w+)")


def lowering(compiled: Any, name: str = "") -> Lowering:
    """Summarise a compiled kernel (see :class:`Lowering`)."""
    ptx = compiled.asm["ptx"]
    regs, spills = _ptxas_counts(compiled)
    types = sorted({".".join(m.groups()[1:]) for m in _WGMMA_TYPES.finditer(ptx)})
    return Lowering(kernel=name, wgmma=ptx.count("wgmma.mma_async"), wgmma_types=tuple(types),
                    mma_sync=ptx.count("mma.sync.aligned"), tma=ptx.count("cp.async.bulk.tensor"),
                    shared=int(compiled.metadata.shared), registers=regs, spill_bytes=spills,
                    threads=32 * int(compiled.metadata.num_warps))


def _ptxas_counts(compiled: Any) -> tuple[int, int]:
    """(registers, spill bytes) of the compiled cubin, from ``ptxas -v`` on its PTX; (-1, -1) without ptxas."""
    ptxas = _ptxas()
    if ptxas is None:
        return -1, -1
    arch = "sm_90a" if ".target sm_90a" in compiled.asm["ptx"] else None
    if arch is None:
        match = re.search(r"\.target (sm_\w+)", compiled.asm["ptx"])
        arch = match.group(1) if match else "sm_90a"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        res = subprocess.run([ptxas, f"-arch={arch}", "-v", path, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    text = res.stderr + res.stdout
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return (int(regs.group(1)) if regs else -1), sum(spills)


def _ptxas() -> str | None:
    """The ptxas triton itself uses for sm_90 (triton >= 3.9 ships a newer one as ``ptxas-blackwell``)."""
    try:
        from triton.backends.nvidia import compiler
    except ImportError:
        return None
    getter = getattr(compiler, "get_ptxas", None)
    if getter is not None:
        try:
            return str(getter(90).path)
        except TypeError:  # triton 3.6: get_ptxas() takes no argument
            return str(getter().path)
        except Exception:
            return None
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    return path if os.path.exists(path) else None
