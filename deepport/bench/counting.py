"""How work is counted, as upstream counts it, so figures compare (``benchmarks/README.md``, "How work is counted").

Every function returns exact integers (or floats when a mean length is fractional); rates are
``flops / seconds`` and ``bytes / seconds``. The bytes are the minimum traffic: each input read once,
each output written once.
"""

from __future__ import annotations

from collections.abc import Sequence

FP8_BLOCK = 128  # DeepSeek-V3 scaling granularity: 1x128 activation scales, 128x128 weight scales
COMPUTE_BOUND_Q_ROWS = 128  # FlashMLA: decode is compute-bound when s_q * h_q / h_kv >= 128


def mla_decode_flops(b: int, s_q: int, h_q: int, mean_s_k: float, d_qk: int, d_v: int) -> float:
    """``b * s_q * h_q * mean_s_k * 2 * (d_qk + d_v)``: Q K^T and P V, causal masking not discounted."""
    return b * s_q * h_q * mean_s_k * 2 * (d_qk + d_v)


def mla_decode_bytes(b: int, s_q: int, h_q: int, h_kv: int, mean_s_k: float, d_qk: int, d_v: int,
                     element_bytes: int = 2) -> float:
    """``b * (s_q*h_q*d_qk + mean_s_k*h_kv*d_qk + s_q*h_q*d_v) * element_bytes``: q and the KV cache read
    once, out written once (lse, the block table and the lengths are not counted, as upstream)."""
    return b * (s_q * h_q * d_qk + mean_s_k * h_kv * d_qk + s_q * h_q * d_v) * element_bytes


def mla_decode_compute_bound(s_q: int, h_q: int, h_kv: int) -> bool:
    """FlashMLA's rule: compute-bound when each KV head serves at least 128 query rows."""
    return s_q * h_q // h_kv >= COMPUTE_BOUND_Q_ROWS


def gemm_flops(m: int, n: int, k: int) -> int:
    """``2 * M * N * K`` (a multiply and an add per term)."""
    return 2 * m * n * k


def masked_gemm_flops(masked_m: Sequence[int], n: int, k: int) -> int:
    """Masked grouped GEMM: ``2 * sum(masked_m) * N * K`` (only the valid rows count)."""
    return 2 * sum(masked_m) * n * k


def fp8_gemm_bytes(m: int, n: int, k: int, groups: int = 1, out_bytes: int = 2) -> int:
    """Block-scaled FP8 GEMM traffic: A ``[M,K]`` and B ``[G,N,K]`` e4m3 (1 byte), fp32 scales (A: one per
    row and 128-K block; B: one per 128x128 block and group), D ``[M,N]`` written once (bf16: 2 bytes).
    ``M`` is the total row count (all groups together for the grouped layouts)."""
    kb = -(-k // FP8_BLOCK)
    nb = -(-n // FP8_BLOCK)
    return m * k + groups * n * k + 4 * (m * kb + groups * nb * kb) + out_bytes * m * n


def moe_low_latency_row_bytes(hidden: int, fp8: bool) -> int:
    """Payload bytes of one row of a low-latency MoE op: ``hidden`` e4m3 bytes plus one float32 scale per
    128 channels (FP8 dispatch), or ``2 * hidden`` (bf16: the combine, or a dispatch without the cast)."""
    return hidden + 4 * -(-hidden // FP8_BLOCK) if fp8 else 2 * hidden


def moe_low_latency_bytes(world_size: int, max_tokens_per_rank: int, hidden: int, fp8: bool) -> int:
    """Bytes a rank sends to the other ranks in one low-latency dispatch (or combine) over ``world_size``
    ranks: its fixed ``T_max`` rows per other rank, ``(world_size - 1) * T_max`` rows of
    :func:`moe_low_latency_row_bytes`, whatever the routing (the fixed buffers move them all)."""
    return (world_size - 1) * max_tokens_per_rank * moe_low_latency_row_bytes(hidden, fp8)
