"""``mla_decode`` on this backend. Spec: :func:`deepport.mla_decode`; convention: :class:`MLADecodeImpl`."""

from __future__ import annotations

import torch

from deepport.kernels.mla_decode import MLADecodeCall


def run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Write ``out`` and ``lse`` of one validated call in place (the :class:`MLADecodeImpl` convention)."""
    raise NotImplementedError(
        "mla_decode: write out [b, s_q, h_q, d_v] (q's dtype) and lse [b, h_q, s_q] float32 in place, every "
        "element (the suite poisons them with NaN). Read call.q [b, s_q, h_q, d_qk] and call.k_cache "
        "[num_blocks, page, h_kv, d_qk] through call.block_table, only tokens t < call.cache_seqlens[i] "
        "(tails may hold NaN); V is the first call.head_dim_v channels of K; scale logits by "
        "call.softmax_scale; call.causal masks bottom-right (query j sees t <= L - s_q + j). Edges: L = 0 or "
        "a query that sees nothing -> out = 0, lse = +inf; query head h reads KV head h // (h_q // h_kv). "
        "Oracle: deepport.kernels.f64.mla_decode.")
