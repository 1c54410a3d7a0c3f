"""The MoE ops' definitions in NumPy (int64 routing, float64 arithmetic), from the whole world's inputs.

Every function takes what all ranks hold (lists indexed by rank) and returns what rank ``me`` gets,
so the reference backend (which gathers the world) and the conformance suite (which generated it)
share one definition. Conventions: :mod:`deepport.kernels.moe_args` (a token reaches each rank and
each expert once; -1 selects nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FP8_MAX = np.float32(448.0)
AMAX_FLOOR = np.float32(1e-4)
FP8_MAX_INV = np.float32(1.0 / 448.0)  # DeepEP's kFP8AmaxInv


def layout_f64(topk: np.ndarray, num_experts: int, num_ranks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens per rank [R], tokens per expert [E], is_token_in_rank [T, R])`` as int64/bool."""
    num_local = num_experts // num_ranks
    t = topk.shape[0]
    per_expert = np.zeros(num_experts, dtype=np.int64)
    in_rank = np.zeros((t, num_ranks), dtype=bool)
    for i in range(t):
        experts = {int(e) for e in topk[i] if e >= 0}
        for e in experts:
            per_expert[e] += 1
            in_rank[i, e // num_local] = True
    return in_rank.sum(axis=0).astype(np.int64), per_expert, in_rank


def local_ids(topk_row: np.ndarray, me: int, num_local: int) -> np.ndarray:
    out = np.full(topk_row.shape, -1, dtype=np.int64)
    for k, e in enumerate(topk_row):
        if e >= 0 and e // num_local == me:
            out[k] = e - me * num_local
    return out


@dataclass
class Dispatched:
    """What rank ``me`` receives in a normal dispatch (rows in canonical order)."""

    src_rank: np.ndarray  # int64 [n]
    src_token: np.ndarray  # int64 [n]
    local_idx: np.ndarray  # int64 [n, K]
    weights: np.ndarray | None  # float64 [n, K], 0 on non-local slots
    per_expert: np.ndarray  # int64 [L], distinct tokens per local expert (unaligned)
    recv_counts: np.ndarray  # int64 [R], rows from each source rank


def dispatch_f64(topks: list[np.ndarray], weights: list[np.ndarray] | None, me: int,
                 num_experts: int) -> Dispatched:
    world = len(topks)
    num_local = num_experts // world
    src_rank, src_token, local, w = [], [], [], []
    for r in range(world):
        for t in range(topks[r].shape[0]):
            ids = local_ids(topks[r][t], me, num_local)
            if (ids >= 0).any():
                src_rank.append(r)
                src_token.append(t)
                local.append(ids)
                if weights is not None:
                    w.append(np.where(ids >= 0, weights[r][t].astype(np.float64), 0.0))
    k = topks[0].shape[1] if topks else 0
    local_arr = np.array(local, dtype=np.int64).reshape(len(local), k)
    per_expert = np.zeros(num_local, dtype=np.int64)
    for ids in local_arr:
        for e in {int(v) for v in ids if v >= 0}:
            per_expert[e] += 1
    recv_counts = np.bincount(np.array(src_rank, dtype=np.int64), minlength=world).astype(np.int64)
    weights_arr = None if weights is None else np.array(w, dtype=np.float64).reshape(len(w), k)
    return Dispatched(np.array(src_rank, dtype=np.int64), np.array(src_token, dtype=np.int64), local_arr,
                      weights_arr, per_expert, recv_counts)


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def expanded_rows_f64(local_idx: np.ndarray, weights: np.ndarray, num_local: int,
                      alignment: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(src_row [M], m_indices [M], row_weights [M])``: -1/-1/0 on padding; each expert's segment
    starts at a multiple of ``alignment`` and lists its received rows in order."""
    src_row: list[int] = []
    m_indices: list[int] = []
    row_w: list[float] = []
    for e in range(num_local):
        rows = [j for j in range(local_idx.shape[0]) if (local_idx[j] == e).any()]
        for j in rows:
            src_row.append(j)
            m_indices.append(e)
            row_w.append(float(weights[j][local_idx[j] == e].sum()))
        pad = align_up(len(rows), alignment) - len(rows)
        src_row += [-1] * pad
        m_indices += [-1] * pad
        row_w += [0.0] * pad
    return np.array(src_row, dtype=np.int64), np.array(m_indices, dtype=np.int64), np.array(row_w)


def packed_rows_f64(local_idx: np.ndarray, num_local: int, capacity: int) -> np.ndarray:
    """int64 ``[L, capacity]``: received row held by each low-latency row, -1 past the expert's count."""
    packed = np.full((num_local, capacity), -1, dtype=np.int64)
    for e in range(num_local):
        rows = [j for j in range(local_idx.shape[0]) if (local_idx[j] == e).any()]
        packed[e, : len(rows)] = rows
    return packed


def combine_f64(rows: list[np.ndarray], src_rank: list[np.ndarray], src_token: list[np.ndarray], me: int,
                num_tokens: int) -> np.ndarray:
    """``out[t]`` = sum over ranks ``d`` of the rows ``d`` holds for (``me``, ``t``), in float64."""
    hidden = rows[0].shape[1:] if rows else ()
    out = np.zeros((num_tokens, *hidden), dtype=np.float64)
    for d in range(len(rows)):
        for j in range(rows[d].shape[0]):
            if src_rank[d][j] == me:
                out[src_token[d][j]] += rows[d][j]
    return out


def cast_fp8_f64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per token and 128 channels, DeepEP's float32 rule emulated in NumPy float32 (each step one correctly
    rounded float32 operation): ``amax = max(|x|, float32(1e-4))``, ``scale = float32(amax *
    float32(1/448))`` (exact: the output's bits), and the value ``float32(x * float32(448 / amax))``
    whose e4m3 rounding is the output's. ``x`` holds bf16 values (exact in float32)."""
    t, hidden = x.shape
    blocks = x.reshape(t, hidden // 128, 128).astype(np.float32)
    amax = np.maximum(np.abs(blocks).max(axis=2, initial=np.float32(0.0)), AMAX_FLOOR)
    scale = amax * FP8_MAX_INV
    values = blocks * (FP8_MAX / amax)[:, :, None]
    return values.reshape(t, hidden).astype(np.float64), scale.astype(np.float64)
