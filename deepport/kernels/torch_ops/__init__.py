"""deepport's ops as torch custom ops: ``torch.ops.deepport.<op>`` for ``torch.compile`` and CUDA graphs.

``import deepport`` registers them (:func:`register_torch_ops`, about 3 ms per op). Each op's module is
named by its descriptor (``OpDescriptor.custom_op``); it defines, with ``torch.library.custom_op``:

- the **functional** form ``torch.ops.deepport.<op>(...)``: every output is a new tensor;
- for the ops whose deepport form writes into caller buffers, an **out** form
  ``torch.ops.deepport.<op>_out(..., out, ...) -> None`` whose schema marks what it writes (``Tensor(a!)``);
- a **fake** kernel per form: exact output shapes, dtypes and strides from the input shapes alone (no
  value is read, nothing synchronises; symbolic shapes pass through), so ``torch.compile(fullgraph=True)``
  traces a model calling them without a graph break.

The real kernel of every form calls the deepport op itself: validation in the op layer, then dispatch
to whichever backend is chosen (``backend=`` is not part of the schemas: choose with
:func:`deepport.use_backend` or ``DEEPPORT_BACKEND[_<OP>]``, read each time the real kernel runs). Tensor
pairs such as DeepGEMM's ``(A, SFA)`` are flattened into two arguments; Python objects become tensors:

============================================  ============================================================
op (``torch.ops.deepport.``)                  form
============================================  ============================================================
``mla_decode``, ``mla_decode_out``            the plan as its two tensors ``md.tile_scheduler_metadata``,
                                              ``md.num_splits`` (FlashMLA's convention), or ``None``
``fp8_gemm_{nt,nn,tn,tt}[_out]``              ``(a, sfa, b, sfb[, out], c=None, recipe=None)``; the
                                              functional form's ``out_dtype`` defaults to bfloat16
                                              (float32 with ``c``)
``m_grouped_fp8_gemm_nt_contiguous[_out]``    ``(a, sfa, b, sfb[, out], m_indices, recipe=None)``
``m_grouped_fp8_gemm_nt_masked[_out]``        ``(a, sfa, b, sfb[, out], masked_m, expected_m,
                                              recipe=None)``; the functional form's rows past
                                              ``masked_m[g]`` are zero
``moe_layout``                                ``(topk_idx, num_experts, num_ranks)``
``moe_low_latency_dispatch``                  one process (``group=None``); the handle is ``recv_count``
                                              and ``packed_src_row``; rows past ``recv_count[e]`` are zero
``moe_low_latency_combine``                   one process; takes that handle back
============================================  ============================================================

Where the real kernels synchronise: the op layer's value checks (sequence lengths and block ids,
``m_indices``, ``masked_m``, expert ids, the routing a low-latency handle was made for) read device
values on the host; ``DEEPPORT_CHECK_VALUES=0`` skips them. Then, on the torch backend, ``mla_decode``
(bounded by the plan's lengths, or by the block table without a plan), the dense FP8 GEMMs,
``m_grouped_fp8_gemm_nt_masked`` (every row computed, the rows in use kept on the device),
``moe_layout`` and the one-process low-latency dispatch and combine read nothing on the host, so a CUDA
graph can capture them; ``m_grouped_fp8_gemm_nt_contiguous`` still reads ``m_indices`` on the host. The
hopper backend's GEMMs never synchronise; the triton backend's ``mla_decode`` needs the plan. The fake
kernels never read a value.

A plan's tensors live on the host, and inductor's CUDA-graph mode (``mode="reduce-overhead"``) skips graphs
with CPU tensor inputs: capture the compiled model with ``torch.cuda.graph`` instead, which works.

The low-latency combine gets the dispatch's handle back through the dispatch's ``recv_count`` tensor
(see :func:`deepport.kernels.torch_ops.moe.handle_of`); given copies, it rebuilds the handle from them.

The MoE ops that are not custom ops, and why, are :data:`NOT_CUSTOM_OPS`.
"""

from __future__ import annotations

import importlib

from deepport.kernels.descriptor import descriptors

NAMESPACE = "deepport"

NOT_CUSTOM_OPS: dict[str, str] = {
    "moe_dispatch": "the number of received rows depends on the routing values (a data-dependent output "
                    "shape), and its handle is a Python object of host counts; DeepEP's fixed-size form "
                    "(num_worst_tokens) is offered by deepport.compat.deep_ep.Buffer.dispatch (eager only)",
    "moe_combine": "consumes the normal dispatch's handle (routes held as host counts and data-dependent "
                   "row maps), which no tensor-only schema can carry",
    "moe_dispatch_expanded": "the expanded row count (sum of per-expert counts rounded up to the alignment) "
                             "depends on the routing values (a data-dependent output shape)",
    "moe_combine_expanded": "consumes the expanded dispatch's handle (a Python object built from "
                            "data-dependent routes)",
}
"""The ops without a custom op, with the reason (also why their descriptors name no ``custom_op``)."""


def register_torch_ops() -> tuple[str, ...]:
    """Register every declared op that has a custom-op module (idempotent; ``import deepport`` calls it).

    Returns the op names now reachable as ``torch.ops.deepport.<name>``. Ops declared later (a plug-in's
    descriptor) are registered by calling this again."""
    names = []
    for d in descriptors():
        if d.custom_op is not None:
            importlib.import_module(d.custom_op)  # a module registers its ops once, when first imported
            names.append(d.name)
    return tuple(names)
