"""DeepEP's API (``deep_ep``) on deepport's MoE ops: ``Buffer``, ``EventOverlap``, ``Config``.

Drop-in for DeepEP's V1 ``Buffer`` (the API SGLang, vLLM, Megatron and TRT-LLM integrate)::

    from deepport.compat.deep_ep import Buffer

    buffer = Buffer(group)                    # a torch.distributed group, or None for one process
    num_tokens_per_rank, _, num_tokens_per_expert, is_token_in_rank, _ = buffer.get_dispatch_layout(
        topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, counts, handle, event = buffer.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
        is_token_in_rank=is_token_in_rank, num_tokens_per_expert=num_tokens_per_expert)
    combined_x, _, event = buffer.combine(expert_out, handle)

    recv_x, recv_count, handle, event, hook = buffer.low_latency_dispatch(x, topk_idx, T_max, num_experts)
    combined_x, event, hook = buffer.low_latency_combine(expert_out, topk_idx, topk_weights, handle)

Every call runs deepport's MoE op of the same meaning (on any backend and device; NCCL groups need
CUDA tensors, gloo groups CPU tensors). :mod:`deepport.compat.deep_ep.buffer` lists what DeepEP's
arguments mean here and where deepport differs.
"""

from __future__ import annotations

import torch

from deepport.compat.deep_ep.buffer import Buffer
from deepport.compat.deep_ep.config import Config
from deepport.compat.deep_ep.event import EventHandle, EventOverlap
from deepport.compat.deep_ep.handles import DispatchHandle, LowLatencyHandle

topk_idx_t = torch.int64
"""DeepEP's default dtype of ``topk_idx`` (deepport's MoE ops also accept int32)."""

__version__ = "2.1.0"  # the DeepEP API generation emulated (V1 Buffer as shipped with 2.1.0)

__all__ = ["Buffer", "Config", "DispatchHandle", "EventHandle", "EventOverlap", "LowLatencyHandle", "topk_idx_t"]
