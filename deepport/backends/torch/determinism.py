"""Which torch-backend ops give bitwise-identical results run to run, and why (``Backend.determinism``).

The dense ops (MLA decode, FP8 GEMMs) are fixed-order torch ops with no atomics; cuBLAS and torch's CPU
kernels return the same bits on every run on one device. Other torch devices are not claimed (not
verified). MoE data movement is exact (raw bytes, integer counts), but three sums run through torch's
``index_add_`` / ``scatter_add_``, whose GPU kernels add floats with atomics in a varying order (on the
CPU they add in index order). The triton and opencl backends run the same routing code, so they share
:data:`SLOT_WEIGHT_SUMS` and :data:`RANK_SUMS`.
"""

from deepport.dispatch import Determinism, reproducible

_DENSE = reproducible("fixed-order float32 torch ops, no atomics (cuBLAS and torch's CPU kernels return the "
                      "same bits on one device; other devices not verified)", on=("cpu", "cuda"))
_MOVES = reproducible("moves rows as raw bytes, counts in integers, the FP8 cast is elementwise")
_ROW_SUMS = reproducible("sums rows per token with index_add_, whose GPU kernel adds floats with atomics in a "
                         "varying order (in index order on the CPU)", on=("cpu",))

SLOT_WEIGHT_SUMS = reproducible(
    "sums the weights of a token's slots that name the same expert with torch's scatter_add_ (float atomics on "
    "GPUs: the bits can vary when three or more slots name one expert; in slot order on the CPU)", on=("cpu",))
"""moe_dispatch_expanded (and the multi-rank low-latency combine) of every backend using the torch routing."""

RANK_SUMS = reproducible(
    "the per-token sum of the rows returned by the ranks is torch's index_add_ (float atomics on GPUs: the bits "
    "can vary with three or more ranks; in rank order on the CPU; one process: no sum)", on=("cpu",))
"""The combines' final per-token sum, where a backend keeps the torch step."""

MULTI_RANK_SUMS = reproducible(
    "with more than one rank, the slots' weight sums (scatter_add_) and the per-token sum over ranks (index_add_) "
    "are torch's, float atomics on GPUs (the bits can vary with three or more slots naming one expert, or three "
    "or more ranks); one process sums in a fixed order", on=("cpu",))
"""The low-latency combine of a backend whose own row sums are fixed-order (triton)."""

DETERMINISM: dict[str, Determinism] = {
    "mla_decode": _DENSE,
    "fp8_gemm_nt": _DENSE,
    "fp8_gemm_nn": _DENSE,
    "fp8_gemm_tn": _DENSE,
    "fp8_gemm_tt": _DENSE,
    "m_grouped_fp8_gemm_nt_contiguous": _DENSE,
    "m_grouped_fp8_gemm_nt_masked": _DENSE,
    "moe_layout": _MOVES,
    "moe_dispatch": _MOVES,
    "moe_low_latency_dispatch": _MOVES,
    "moe_combine": _ROW_SUMS,
    "moe_dispatch_expanded": SLOT_WEIGHT_SUMS,
    "moe_combine_expanded": _ROW_SUMS,
    "moe_low_latency_combine": _ROW_SUMS,
}
