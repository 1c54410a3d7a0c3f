"""The upstream ``deep_gemm`` names deepport leaves out, each with the reason (see :mod:`deepport.compat._absent`)."""

from __future__ import annotations

_NO_BF16 = "deepport has no BF16 GEMM op; use torch.matmul or your framework's BF16 GEMM"
_NO_FP4 = "deepport has no FP4 (E2M1) operands"
_NO_INDEXER = "the DeepSeek-V3.2 lightning-indexer kernels are not deepport ops"

REASONS = {
    **{f"bf16_gemm_{lay}": _NO_BF16 for lay in ("nt", "nn", "tn", "tt")},
    **{f"cublaslt_gemm_{lay}": "cuBLASLt wrappers are CUDA-only speed baselines, not deepport ops"
       for lay in ("nt", "nn", "tn", "tt")},
    "m_grouped_bf16_gemm_nt_contiguous": _NO_BF16, "m_grouped_bf16_gemm_nn_contiguous": _NO_BF16,
    "m_grouped_bf16_gemm_nt_masked": _NO_BF16, "bf16_m_grouped_gemm_nt_masked": _NO_BF16,
    "k_grouped_bf16_gemm_tn_contiguous": _NO_BF16,
    "einsum": "DeepGEMM's BF16 einsum is not a deepport op", "fp8_einsum": "DeepGEMM's FP8 einsum is not a deepport op",
    "fp8_mqa_logits": _NO_INDEXER, "fp8_paged_mqa_logits": _NO_INDEXER, "fp8_fp4_mqa_logits": _NO_INDEXER,
    "fp8_fp4_paged_mqa_logits": _NO_INDEXER, "get_paged_mqa_logits_metadata": _NO_INDEXER,
    "tf32_hc_prenorm_gemm": "the hyper-connection TF32 GEMM is not a deepport op",
    "SymmBuffer": "Mega MoE needs SM100 symmetric memory; deepport's MoE path is deepport.compat.deep_ep",
    "get_symm_buffer_for_mega_moe": "Mega MoE (fused EP + GEMMs, SM100) is not a deepport op",
    "transform_weights_for_mega_moe": "Mega MoE (fused EP + GEMMs, SM100) is not a deepport op",
    "fp8_fp4_mega_moe": "Mega MoE (fused EP + GEMMs, SM100) is not a deepport op",
    "bf16_mega_moe": "Mega MoE (fused EP + GEMMs, SM100) is not a deepport op",
    "per_token_cast_to_fp4": _NO_FP4, "cast_back_from_fp4": _NO_FP4, "transpose_packed_fp4": _NO_FP4,
    "get_k_grouped_mn_major_tma_aligned_packed_ue8m0_tensor":
        "the K-grouped GEMMs take float32 SFs only (the UE8M0 K-grouped form is SM100's)",
    "bench_kineto": "it filters CUPTI records by DeepGEMM kernel names; use deep_gemm.bench or "
                    "`python -m deepport bench`",
    "legacy": "DeepGEMM's Triton BF16 kernels for A100 (BF16 GEMMs are not deepport ops)",
    "jit": "DeepGEMM's JIT compiler internals (deepport's backends build their own kernels)",
    "jit_kernels": "DeepGEMM v1's JIT kernel internals (deepport's backends build their own kernels)",
    "init_dist": "a torch.distributed set-up helper of DeepGEMM's tests", "uneven_all_gather":
        "a torch.distributed helper of DeepGEMM's tests",
}
