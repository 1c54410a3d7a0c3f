"""MLA decode in vectorised PyTorch: gather the pages in use, mask, float32 softmax, write in place.

Synchronises with the device only to learn the longest sequence when neither the op layer's value check
nor a plan gives it, and never under ``DEEPPORT_CHECK_VALUES=0`` (see :func:`_longest`), so a call with
checks off can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from deepport.backends.torch._precision import ieee_fp32_matmul
from deepport.dispatch import settings
from deepport.kernels.mla_decode import MLADecodeCall

# Working-set budget per chunk of requests (gathered KV in float32 plus logits and probabilities).
_BUDGET_BYTES = {"cuda": 2 << 30, "cpu": 256 << 20}
_DEFAULT_BUDGET = 1 << 30




def run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    sig = call.signature
    b, page = call.batch, sig.page_block_size
    lens = call.cache_seqlens.to(torch.int64)
    max_len = _longest(call, lens)
    if max_len == 0:
        out.zero_()
        lse.fill_(float("inf"))
        return
    pages = -(-max_len // page)
    tokens = pages * page
    per_request = 4 * tokens * (sig.h_kv * sig.d_qk * 2 + sig.s_q * sig.h_q * 2) + 2 * tokens * sig.h_kv * sig.d_qk
    budget = _BUDGET_BYTES.get(call.q.device.type, _DEFAULT_BUDGET)
    chunk = max(1, min(b, budget // max(per_request, 1)))
    with ieee_fp32_matmul(call.q.device):
        for start in range(0, b, chunk):
            stop = min(b, start + chunk)
            o, chunk_lse = _decode_chunk(call, lens[start:stop], start, stop, pages)
            out[start:stop].copy_(o)
            lse[start:stop].copy_(chunk_lse)


def _longest(call: MLADecodeCall, lens: torch.Tensor) -> int:
    """A bound on the longest sequence, read on the host only when nothing else gives one: the op layer's
    value check, else the plan's host copy of the lengths (a plan is valid only for those lengths), else
    under ``DEEPPORT_CHECK_VALUES=0`` the block table's capacity (no device read: CUDA-graph capturable,
    every page slot gathered), else ``max(cache_seqlens)`` (one device-to-host copy)."""
    if call.max_seqlen is not None:
        return call.max_seqlen
    if call.metadata is not None:
        host = call.metadata.cache_seqlens.numpy()  # the plan's host copy: no device read
        return int(host.max()) if host.size else 0
    if not settings.check_values():
        return int(call.block_table.shape[1]) * call.signature.page_block_size
    return int(lens.max())


def _decode_chunk(call: MLADecodeCall, lens: torch.Tensor, start: int, stop: int,
                  pages: int) -> tuple[torch.Tensor, torch.Tensor]:
    sig = call.signature
    bc, s_q, h_q, h_kv, d_qk, d_v = stop - start, sig.s_q, sig.h_q, sig.h_kv, sig.d_qk, sig.d_v
    page, group, device = sig.page_block_size, h_q // h_kv, call.q.device
    tokens = pages * page

    # Gather the pages in use; slots past a request's last page may hold anything, read page 0 instead.
    slot = torch.arange(pages, device=device)
    page_in_use = slot[None, :] < ((lens + page - 1) // page)[:, None]
    ids = torch.where(page_in_use, call.block_table[start:stop, :pages].to(torch.int64), 0)
    kv = call.k_cache[ids.reshape(-1)].reshape(bc, tokens, h_kv, d_qk)
    token = torch.arange(tokens, device=device)
    in_seq = token[None, :] < lens[:, None]  # [bc, T]
    # Zero everything past the sequence so poisoned tails (NaN) never reach the matmuls.
    kv = torch.where(in_seq[:, :, None, None], kv, torch.zeros((), dtype=kv.dtype, device=device))
    k = kv.permute(0, 2, 1, 3).to(torch.float32)  # [bc, h_kv, T, d_qk]

    q = call.q[start:stop].to(torch.float32).reshape(bc, s_q, h_kv, group, d_qk)
    q = q.permute(0, 2, 1, 3, 4).reshape(bc, h_kv, s_q * group, d_qk)
    logits = torch.matmul(q, k.transpose(-1, -2)).mul_(call.softmax_scale)  # [bc, h_kv, s_q*group, T]

    visible = in_seq[:, None, :].expand(bc, s_q, tokens)
    if call.causal and s_q > 1:
        last = lens[:, None] - s_q + torch.arange(s_q, device=device)[None, :]  # [bc, s_q]
        visible = visible & (token[None, None, :] <= last[:, :, None])
    visible = visible[:, None, :, None, :].expand(bc, h_kv, s_q, group, tokens).reshape(bc, h_kv, s_q * group, tokens)
    logits.masked_fill_(~visible, float("-inf"))

    row_lse = torch.logsumexp(logits, dim=-1)  # -inf where a query sees nothing
    empty = torch.isneginf(row_lse)
    probs = torch.exp(logits.sub_(torch.where(empty, 0.0, row_lse)[..., None]))  # exp(-inf) = 0 on empty rows
    o = torch.matmul(probs, k[..., :d_v])  # [bc, h_kv, s_q*group, d_v]
    o = o.reshape(bc, h_kv, s_q, group, d_v).permute(0, 2, 1, 3, 4).reshape(bc, s_q, h_q, d_v)
    lse = torch.where(empty, float("inf"), row_lse).reshape(bc, h_kv, s_q, group)
    lse = lse.permute(0, 1, 3, 2).reshape(bc, h_q, s_q)
    return o.to(call.q.dtype), lse
