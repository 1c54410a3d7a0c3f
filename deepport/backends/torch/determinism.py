"""Which torch-backend ops give bitwise-identical results run to run, and why (``Backend.determinism``).

The dense ops (MLA decode, FP8 GEMMs) are fixed-order torch ops with no atomics; cuBLAS returns the same
bits on every run on one device. On CPUs this is not claimed: twice a CI machine returned MLA outputs one
bf16 ulp apart for identical inputs (once from the very same input tensors), never reproduced on the
development machine; MKL, torch's CPU BLAS, documents results that can vary with memory alignment and
thread count. Other torch devices are not claimed (not verified). MoE data movement is exact (raw bytes,
integer counts) and the slot-weight sums are dense fixed-order reductions, but the combines' row sums run
through torch's ``index_add_``, whose GPU kernel adds floats with atomics in a varying order (on the CPU it
adds in index order). The triton backend keeps
the expanded combine's per-token sum over ranks (:data:`RANK_SUMS`).
"""

from deepport.dispatch import Determinism, reproducible

_DENSE = reproducible("fixed-order float32 torch ops, no atomics (cuBLAS returns the same bits on one device); "
                      "not claimed on CPUs: on a CI machine two calls with the same input tensors returned MLA "
                      "outputs one bf16 ulp apart (MKL's results can vary with alignment and thread count); "
                      "other devices not verified", on=("cuda",))
_MOVES = reproducible("moves rows as raw bytes, counts in integers, sums a token's slot weights in slot order "
                      "(a dense reduction), the FP8 cast is elementwise")
_ROW_SUMS = reproducible("sums rows per token with index_add_, whose GPU kernel adds floats with atomics in a "
                         "varying order (in index order on the CPU)", on=("cpu",))

RANK_SUMS = reproducible(
    "the per-token sum of the float32 rows returned by the ranks is torch's index_add_ (float atomics on GPUs: "
    "the bits can vary with three or more ranks; in rank order on the CPU; one process: one row per token)",
    on=("cpu",))
"""The expanded combine's final per-token sum, where a backend keeps the torch step."""

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
    "moe_dispatch_expanded": _MOVES,
    "moe_combine_expanded": _ROW_SUMS,
    "moe_low_latency_combine": _ROW_SUMS,
}
