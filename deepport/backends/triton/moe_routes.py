"""The normal-layout MoE dispatch and combine on the triton backend.

Routing, the count table and every byte that crosses ranks are the torch backend's
(:mod:`deepport.backends.torch.moe_routes`, over ``torch.distributed`` ``all_to_all_single``); this module
hands it :data:`ROUTES`, the triton :class:`~deepport.backends.torch.moe_local.LocalSteps` plus two
kernels for the per-device work of these two ops:

- ``take_rows_into``: the payload rows (data and FP8 scales) each rank sends, gathered in send order
  straight into their part of the packed send rows (and this rank's own rows into its output), as raw
  bits in the widest integer type the rows allow
  (:func:`deepport.backends.triton.moe_permute.place_rows`): equal to torch's gather bit for bit.
- ``sum_rows``: the combine's per-token sum of the rows (and top-k weights) that come back from the
  ranks, float32, each token's rows added in a fixed rank order (the order the torch routing hands
  them over: with top-k weights this rank's own rows first, then the received ones; entries sorted
  stably by token), with no float atomics, so the result's bits do not depend on the GPU's scheduling.

The other MoE ops keep :data:`deepport.backends.triton.moe_permute.TRITON` (their multi-rank sums stay
torch's, as certified); only these two ops take the steps above.
"""

from __future__ import annotations

import dataclasses

import torch

from deepport.backends.torch import moe_routes
from deepport.backends.triton.moe_blocks import blocks_to_rows, rows_to_blocks
from deepport.backends.triton.moe_permute import TRITON, place_rows, weighted_rows
from deepport.backends.triton.moe_route_graph import blocks_exchange, finish_sent, route_prelude
from deepport.backends.triton.moe_sum_graph import sum_in_place
from deepport.kernels.moe_combine import MoECombineCall, MoECombineResult
from deepport.kernels.moe_dispatch import MoEDispatchCall, MoEDispatchResult


def take_rows_into(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
    """``out[i] = x[index[i]]`` bit for bit (``x [n, C]``, ``out [k, C]`` of one element type, ``out``'s rows
    at any stride with dense elements, ``index`` int64 ``[k]`` in ``[0, n)``, no ``-1``)."""
    rows, cols = int(index.shape[0]), int(out.shape[1])
    if rows and cols:
        place_rows(x, out[None], index.reshape(1, rows), False)


def sum_rows(rows: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
    """float32 ``[n, ...]``: row ``d`` the sum of the ``rows[e]`` (bf16 or float32 ``[N, ...]``) with
    ``dst[e] == d`` (int64 ``[N]`` in ``[0, n)``), added in the order of ``e``; 0 where none."""
    count = int(rows.shape[0])
    width = int(torch.Size(rows.shape[1:]).numel())
    if n == 0 or width == 0:
        return torch.zeros((n, *rows.shape[1:]), dtype=torch.float32, device=rows.device)
    flat = rows.reshape(count, width)
    entries = torch.arange(count, dtype=torch.int64, device=rows.device)
    ones = torch.ones(count, dtype=torch.float32, device=rows.device)  # x * 1.0 is exact: a plain sum
    return weighted_rows(flat, entries, dst.to(torch.int64), ones, n).view(n, *rows.shape[1:])


ROUTES = dataclasses.replace(TRITON, take_rows_into=take_rows_into, sum_rows=sum_rows, rows_to_blocks=rows_to_blocks,
                             blocks_to_rows=blocks_to_rows, sum_in_place=sum_in_place,
                             route_prelude=route_prelude, blocks_exchange=blocks_exchange, finish_sent=finish_sent)


def dispatch(call: MoEDispatchCall) -> MoEDispatchResult:
    return moe_routes.dispatch(call, ROUTES)


def combine(call: MoECombineCall) -> MoECombineResult:
    return moe_routes.combine(call, ROUTES)
