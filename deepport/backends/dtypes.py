"""The dtype sets backends name in their :class:`~deepport.dispatch.OpSupport` records (each op's primary
input dtype, as the op's signature reports it)."""

import torch

MLA = frozenset({torch.bfloat16, torch.float16})  # mla_decode: q and k_cache
FP8 = frozenset({torch.float8_e4m3fn})  # every FP8 GEMM, dense and grouped: A and B
MOE_TOPK = frozenset({torch.int64, torch.int32})  # moe_layout: topk_idx
MOE_PAYLOAD = frozenset({torch.bfloat16, torch.float8_e4m3fn})  # MoE dispatches: x (FP8 with its scales)
MOE_COMBINE = frozenset({torch.bfloat16})  # MoE combines: the expert outputs
