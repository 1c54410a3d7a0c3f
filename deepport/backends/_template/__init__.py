"""A backend template: copy this folder, fill one op at a time, certify it. Not registered (not in BUILTIN).

Walk-through
------------
1. Copy ``deepport/backends/_template/`` to ``deepport/backends/<name>/`` and, in every file of the copy,
   replace ``deepport.backends._template`` by ``deepport.backends.<name>`` and ``"template"`` (the name
   below) by ``"<name>"``. (Out of tree: any importable package works; replace by its module path, or let
   ``deepport new-backend <name>`` write the renamed copy and a ``pyproject.toml`` with its entry point.)
2. Write :func:`probe`: return ``None`` when the toolchain is usable in this process, else why not
   ("pyopencl is not installed", "needs an sm_90 device"). Import the toolchain *inside* the probe and
   inside the implementations, never at module level: ``import deepport`` needs only numpy and torch.
3. Fill one op family's stub (``mla_decode.py``, ``fp8_gemm.py``, ``fp8_grouped_gemm.py``, ``moe.py``).
   Each stub's message says what to write; the family's ``*Impl`` protocol (next to its Call record in
   ``deepport/kernels/``) is the calling convention, and the op's docstring is the spec. Calls arrive
   validated: do not re-check inputs, but declare what you cannot run (next step).
4. List the families you implement in ``ops=`` below. An op with no record is ``not_supported`` ("does not
   implement <op>") in ``deepport.explain``, selection and the conformance report; a declared stub that
   raises is an ERROR. Narrow each record to what the kernel really runs: ``dtypes``, ``device_kinds``
   and ``requirements`` (``one_of``, ``at_most``, ``multiple_of``, ``device_arch`` from
   :mod:`deepport.dispatch`), each a reason selection and the report show. Declare in ``determinism=``
   whether each op's results are bitwise reproducible run to run (``reproducible(why, on=kinds)``,
   ``not_reproducible(why)``: floating-point atomics are the usual reason); ``deepport determinism
   --backend <name>`` checks the claim.
5. Register: one line in ``BUILTIN`` (``deepport/backends/__init__.py``), or, out of tree, the entry-point
   group ``deepport.backends`` or ``deepport certify --plugin <module>:BACKEND``. Set ``priority`` per
   device kind (higher wins; the torch backend has 10, the reference 0); leave a kind out to be chosen
   only when asked for by name. Where a performance table measured the call's shape bucket (sm90 GPUs),
   its ranking comes before priorities: add your backend's bench results to it (``deepport tune-table``).
6. Certify: ``python -m deepport certify --backend <name> --tier smoke --op mla_decode [--device cuda]``,
   then ``--tier full`` on the target device, then ``deepport certify --certify`` for the archive a third
   party verifies (``deepport verify ARCHIVE --replay N``); ``docs/PORTING.md`` walks through it all.
   Every case runs on fresh random inputs with poisoned outputs and is judged against the float64
   oracle (:mod:`deepport.kernels.f64`); NaN never passes.
   To start from a known-good answer, an implementation may call the oracle (``deepport.kernels.f64``
   ``run`` functions), then replace it with the kernel.
"""

from __future__ import annotations

from deepport.backends import dtypes
from deepport.dispatch import Backend, OpSupport


def probe() -> str | None:
    """``None`` when this backend can run here, else why not (runs once per process; cheap, no side effects)."""
    return None


def identity() -> dict[str, str]:
    """What this backend runs on, as it sees it (driver, runtime and compiler versions, device ids), as short
    strings: ``deepport certify --certify`` records it in the certificate. Cheap, no side effects."""
    return {}


# One record per op, each naming its implementation as a literal "module:function".
MLA_DECODE = (
    OpSupport(op="mla_decode", entry="deepport.backends._template.mla_decode:run", dtypes=dtypes.MLA),
)
FP8_GEMM = (
    OpSupport(op="fp8_gemm_nt", entry="deepport.backends._template.fp8_gemm:run", dtypes=dtypes.FP8),
    OpSupport(op="fp8_gemm_nn", entry="deepport.backends._template.fp8_gemm:run", dtypes=dtypes.FP8),
    OpSupport(op="fp8_gemm_tn", entry="deepport.backends._template.fp8_gemm:run", dtypes=dtypes.FP8),
    OpSupport(op="fp8_gemm_tt", entry="deepport.backends._template.fp8_gemm:run", dtypes=dtypes.FP8),
)
FP8_GROUPED_GEMM = (
    OpSupport(op="m_grouped_fp8_gemm_nt_contiguous",
              entry="deepport.backends._template.fp8_grouped_gemm:run_contiguous", dtypes=dtypes.FP8),
    OpSupport(op="m_grouped_fp8_gemm_nt_masked", entry="deepport.backends._template.fp8_grouped_gemm:run_masked",
              dtypes=dtypes.FP8),
)
MOE = (
    OpSupport(op="moe_layout", entry="deepport.backends._template.moe:layout", dtypes=dtypes.MOE_TOPK),
    OpSupport(op="moe_dispatch", entry="deepport.backends._template.moe:dispatch", dtypes=dtypes.MOE_PAYLOAD),
    OpSupport(op="moe_combine", entry="deepport.backends._template.moe:combine", dtypes=dtypes.MOE_COMBINE),
    OpSupport(op="moe_dispatch_expanded", entry="deepport.backends._template.moe:dispatch_expanded",
              dtypes=dtypes.MOE_PAYLOAD),
    OpSupport(op="moe_combine_expanded", entry="deepport.backends._template.moe:combine_expanded",
              dtypes=dtypes.MOE_COMBINE),
    OpSupport(op="moe_low_latency_dispatch", entry="deepport.backends._template.moe:dispatch_low_latency",
              dtypes=dtypes.MOE_PAYLOAD),
    OpSupport(op="moe_low_latency_combine", entry="deepport.backends._template.moe:combine_low_latency",
              dtypes=dtypes.MOE_COMBINE),
)

BACKEND = Backend(
    name="template",
    summary="a backend template (copy deepport/backends/_template/)",
    version="0",
    ops=(*MLA_DECODE,),  # step 4: the families you implement, e.g. (*MLA_DECODE, *FP8_GEMM)
    priority={},  # step 5: e.g. {"cuda": 20}; empty = only when asked for by name
    probe=probe,
    identity=identity,
    determinism={},  # step 4: e.g. {"mla_decode": reproducible("one program per output row, fixed order")}
)
