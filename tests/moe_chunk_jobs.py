"""Rank jobs of the chunked normal dispatch (``DEEPPORT_MOE_CHUNKS``, :mod:`deepport.backends.torch.moe_chunks`),
run under ``deepport.conformance.rank_group`` on gloo ranks."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch

from tests.moe_ep_probe import _inputs, _same, counting_all_to_all


def _dispatch(group: Any, p: dict[str, Any], seed: int, rank: int, backend: str) -> dict[str, Any]:
    import deepport

    x = _inputs(rank, p, seed)
    payload: Any = (x["x"], x["x_scales"]) if "x_scales" in x else x["x"]
    d = deepport.moe_dispatch(payload, x["topk_idx"], x["topk_weights"], int(p["experts"]), group=group,
                              backend=backend)
    out: dict[str, Any] = {name: getattr(d, name) for name in ("recv_x", "recv_topk_idx", "recv_topk_weights",
                                                                "num_recv_tokens_per_expert")}
    for name in ("send_counts", "recv_counts", "recv_src_idx", "recv_topk_idx", "num_recv_tokens_per_expert"):
        out[f"handle.{name}"] = getattr(d.handle, name)
    return out


def chunked_dispatch(rank: int, group: Any, device: torch.device, params: dict[str, Any], chunks: int,
                     backend: str = "torch", seed: int = 0) -> dict[str, Any]:
    """The normal dispatch in one payload collective, then in ``chunks``: the same bits, and ``chunks``
    payload collectives plus the count exchange."""
    p = {**params, "tokens": tuple(params["tokens"])}
    want = _dispatch(group, p, seed, rank, backend)
    used: Counter[str] = Counter()
    os.environ["DEEPPORT_MOE_CHUNKS"] = str(chunks)
    try:
        with counting_all_to_all(used):
            got = _dispatch(group, p, seed, rank, backend)
    finally:
        os.environ.pop("DEEPPORT_MOE_CHUNKS", None)
    bad: list[str] = []
    for name in want:
        _same(name, got[name], want[name], bad)
    return {"bad": bad, "collectives": used["all_to_all_single"]}
