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
arguments mean here and where deepport differs; :mod:`deepport.compat.deep_ep.utils` holds the
helpers DeepEP's tests import (``calc_diff``, ``per_token_cast_to_fp8``, ``per_token_cast_back``, ...).
V2's ``ElasticBuffer``/``EPHandle`` and its domain-size helpers are not provided: asking for one
raises ``AttributeError`` with the reason. docs/COMPAT.md has the full table.
"""

from __future__ import annotations

import torch

from deepport.compat._absent import module_getattr
from deepport.compat.deep_ep import utils
from deepport.compat.deep_ep.buffer import Buffer
from deepport.compat.deep_ep.config import Config
from deepport.compat.deep_ep.event import EventHandle, EventOverlap
from deepport.compat.deep_ep.handles import DispatchHandle, LowLatencyHandle

topk_idx_t = torch.int64
"""DeepEP's default dtype of ``topk_idx`` (deepport's MoE ops also accept int32)."""

__version__ = "2.1.0"  # the DeepEP API generation emulated (V1 Buffer as shipped with 2.1.0)

_V2 = ("DeepEP V2 (2026-04, NCCL Gin backend, expanded layouts) is not emulated; deepport's expanded MoE "
       "ops are deepport.moe_dispatch_expanded / moe_combine_expanded")
__getattr__ = module_getattr(__name__, {"ElasticBuffer": _V2, "EPHandle": _V2, "get_physical_domain_size": _V2,
                                        "get_logical_domain_size": _V2})

__all__ = ["Buffer", "Config", "DispatchHandle", "EventHandle", "EventOverlap", "LowLatencyHandle", "topk_idx_t",
           "utils"]
