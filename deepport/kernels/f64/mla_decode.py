"""MLA decode in NumPy float64: the definition every backend and the conformance suite measure against."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from deepport.kernels.mla_decode import MLADecodeCall


def _f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def _softmax_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool,
) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Per request ``i`` with tokens: ``(i, probs [h_kv, rows, L], kv [L, h_kv, d_qk], peak, total)``, rows
    ``(token j, head in group)`` of each KV head, ``peak``/``total`` the softmax's max and sum per row."""
    b, s_q, h_q, d_qk = (int(x) for x in q.shape)
    page, h_kv = int(k_cache.shape[1]), int(k_cache.shape[2])
    group = h_q // h_kv
    lens = cache_seqlens.detach().cpu().numpy().astype(np.int64)
    table = block_table.detach().cpu().numpy()
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
        yield i, probs, kv, np.where(seen, peak, -np.inf), total


def _to_out(o: np.ndarray, s_q: int, h_q: int) -> np.ndarray:
    """``[h_kv, s_q * group, d]`` rows of each KV head back to ``[s_q, h_q, d]``."""
    h_kv, _, d = o.shape
    return o.reshape(h_kv, s_q, h_q // h_kv, d).transpose(1, 0, 2, 3).reshape(s_q, h_q, d)


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
    b, s_q, h_q, _ = (int(x) for x in q.shape)
    h_kv = int(k_cache.shape[2])
    out = np.zeros((b, s_q, h_q, head_dim_v), dtype=np.float64)
    lse = np.full((b, h_q, s_q), np.inf, dtype=np.float64)
    for i, probs, kv, peak, total in _softmax_rows(q, k_cache, block_table, cache_seqlens, softmax_scale, causal):
        o = probs @ kv[:, :, :head_dim_v].transpose(1, 0, 2)  # [h_kv, rows, d_v]
        out[i] = _to_out(o, s_q, h_q)
        row_lse = np.where(np.isfinite(peak), peak + np.log(np.where(total > 0, total, 1.0)), np.inf)[..., 0]
        lse[i] = row_lse.reshape(h_kv, s_q, h_q // h_kv).transpose(0, 2, 1).reshape(h_q, s_q)
    return out, lse


def mla_decode_p_rounding_bound(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    softmax_scale: float,
    causal: bool,
    unit: float,
    spread: float = 6.0,
) -> np.ndarray:
    """Per element of ``out``, what rounding each probability to a ``unit``-roundoff format before ``P V``
    can add: ``min(unit * sum_t p_t |v_t|, spread * unit * sqrt(sum_t (p_t v_t)^2))`` (float64).

    A kernel whose matrix units take 16-bit operands (FlashMLA's wgmma, every tensor-core ``P V``) rounds
    ``p_t`` to the input dtype: ``p~_t = p_t (1 + e_t)``, ``|e_t| <= unit``, so the output moves by
    ``sum_t e_t p_t v_t``. The first term bounds that for any ``e_t``; the second is the same sum when the
    ``e_t`` are independent and zero-mean (its standard deviation is at most ``unit / sqrt(3)`` times the
    root sum of squares, so ``spread = 6`` is over 10 standard deviations) and makes the bound tight for
    long, flat attention rows, where the worst case would be loose. Equal probabilities round alike, but
    then the error is ``e * out``, inside the relative tolerance.
    """
    b, s_q, h_q, _ = (int(x) for x in q.shape)
    bound = np.zeros((b, s_q, h_q, head_dim_v), dtype=np.float64)
    for i, probs, kv, _, _ in _softmax_rows(q, k_cache, block_table, cache_seqlens, softmax_scale, causal):
        v = kv[:, :, :head_dim_v].transpose(1, 0, 2)  # [h_kv, L, d_v]
        worst = probs @ np.abs(v)
        spread_rms = np.sqrt(np.square(probs) @ np.square(v))
        bound[i] = _to_out(unit * np.minimum(worst, spread * spread_rms), s_q, h_q)
    return bound


def run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    o, lse_f64 = mla_decode_f64(call.q, call.k_cache, call.block_table, call.cache_seqlens, call.head_dim_v,
                          call.softmax_scale, call.causal)
    out.copy_(torch.from_numpy(o).to(out.dtype))
    lse.copy_(torch.from_numpy(lse_f64).to(torch.float32))
