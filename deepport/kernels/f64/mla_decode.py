"""MLA decode in NumPy float64: the definition every backend and the conformance suite measure against."""

from __future__ import annotations

import numpy as np
import torch

from deepport.kernels.mla_decode import MLADecodeCall


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def mla_decode_f64(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """``(out [b, s_q, h_q, d_v], lse [b, h_q, s_q])`` in float64, exactly as the op's docstring says.

    Reads only the pages in use (``block_table[i, :ceil(L_i / page)]``) and only tokens ``< L_i``;
    inputs are taken as given (already validated) and converted to float64 exactly.
    """
    b, s_q, h_q, d_qk = (int(x) for x in q.shape)
    page, h_kv = int(k_cache.shape[1]), int(k_cache.shape[2])
    group = h_q // h_kv
    lens = cache_seqlens.detach().cpu().numpy().astype(np.int64)
    table = block_table.detach().cpu().numpy()
    out = np.zeros((b, s_q, h_q, head_dim_v), dtype=np.float64)
    lse = np.full((b, h_q, s_q), np.inf, dtype=np.float64)
    for i in range(b):
        length = int(lens[i])
        if length == 0:
            continue
        pages = torch.from_numpy(table[i, : -(-length // page)].astype(np.int64))
        kv = _f64(k_cache.index_select(0, pages.to(k_cache.device)))
        kv = kv.reshape(-1, h_kv, d_qk)[:length]  # [L, h_kv, d_qk]
        rows = s_q * group  # query rows served by one KV head, ordered (token j, head in group)
        qi = _f64(q[i]).reshape(s_q, h_kv, group, d_qk).transpose(1, 0, 2, 3).reshape(h_kv, rows, d_qk)
        logits = softmax_scale * (qi @ kv.transpose(1, 2, 0))  # [h_kv, rows, L]
        if causal:
            # query j sees tokens t <= L - s_q + j (bottom-right aligned)
            last_visible = length - s_q + np.arange(s_q)
            hidden = np.arange(length)[None, :] > last_visible[:, None]  # [s_q, L]
            logits = np.where(np.repeat(hidden, group, axis=0)[None], -np.inf, logits)
        peak = logits.max(axis=-1, keepdims=True)
        seen = np.isfinite(peak)  # False where a query sees no token
        shifted = np.exp(np.where(seen, logits - np.where(seen, peak, 0.0), -np.inf))
        total = shifted.sum(axis=-1, keepdims=True)
        probs = np.divide(shifted, total, out=np.zeros_like(shifted), where=total > 0)
        o = probs @ kv[:, :, :head_dim_v].transpose(1, 0, 2)  # [h_kv, rows, d_v]
        out[i] = o.reshape(h_kv, s_q, group, head_dim_v).transpose(1, 0, 2, 3).reshape(s_q, h_q, head_dim_v)
        row_lse = np.where(seen, peak + np.log(np.where(total > 0, total, 1.0)), np.inf)[..., 0]
        lse[i] = row_lse.reshape(h_kv, s_q, group).transpose(0, 2, 1).reshape(h_q, s_q)
    return out, lse


def run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    o, lse_f64 = mla_decode_f64(call.q, call.k_cache, call.block_table, call.cache_seqlens, call.head_dim_v,
                          call.softmax_scale, call.causal)
    out.copy_(torch.from_numpy(o).to(out.dtype))
    lse.copy_(torch.from_numpy(lse_f64).to(torch.float32))
