"""Rank jobs for tests/test_moe_faults.py (ranks import this module by name: they get the parent's
``sys.path``). Each job takes ``rank``, ``group`` (the job's process group), ``device`` and its own keywords.

Every job builds small bf16 inputs from ``(rank, layout)`` alone, so the ranks agree without talking:
``tokens[r]`` tokens on rank ``r``; ``routes[r]`` names how they are routed (``"local"``: only to experts
of their own rank, ``"nowhere"``: every slot -1, ``"spread"``: top-2 of all experts).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

import deepport

EXPERTS, HIDDEN, TOPK, T_MAX = 8, 128, 2, 12
COLLECTIVES = ("all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "all_reduce", "broadcast",
               "gather", "scatter", "reduce_scatter", "reduce_scatter_tensor", "barrier", "send", "recv", "isend",
               "irecv", "batch_isend_irecv")


def inputs(rank: int, tokens: list[int], routes: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x bf16 [T, H], topk_idx int64 [T, 2], topk_weights float32 [T, 2]) of ``rank``."""
    g = torch.Generator().manual_seed(1000 + rank)
    t = tokens[rank]
    x = torch.randn(t, HIDDEN, generator=g).to(torch.bfloat16)
    per_rank = EXPERTS // len(tokens)
    if routes[rank] == "nowhere":
        idx = torch.full((t, TOPK), -1, dtype=torch.int64)
    elif routes[rank] == "local":
        idx = torch.stack([rank * per_rank + (torch.arange(t) + j) % per_rank for j in range(TOPK)], 1)
    else:
        idx = torch.stack([torch.randperm(EXPERTS, generator=g)[:TOPK] for _ in range(t)]) if t else \
            torch.zeros(0, TOPK, dtype=torch.int64)
    weights = 0.5 + torch.rand(t, TOPK, generator=g)
    return x, idx.contiguous(), weights


def _implements(backend: str, op: str) -> bool:
    from deepport.dispatch import registry

    return registry.get(backend).support(op) is not None


def all_ops(backend: str, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, group: Any) -> dict[str, torch.Tensor]:
    """Every MoE op the backend implements, dispatch then combine (identity experts), results by name."""
    got: dict[str, torch.Tensor] = {}
    if _implements(backend, "moe_dispatch"):
        d = deepport.moe_dispatch(x, idx, w, EXPERTS, group=group, expert_alignment=4, backend=backend)
        assert isinstance(d.recv_x, torch.Tensor) and d.recv_topk_idx is not None and d.recv_topk_weights is not None
        got |= {"dispatch.recv_x": d.recv_x, "dispatch.recv_topk_idx": d.recv_topk_idx,
                "dispatch.recv_topk_weights": d.recv_topk_weights,
                "dispatch.counts": torch.tensor(d.num_recv_tokens_per_expert or [])}
        c = deepport.moe_combine(d.recv_x, d.handle, d.recv_topk_weights, backend=backend)
        got |= {"combine.x": c.combined_x}
    if _implements(backend, "moe_dispatch_expanded"):
        e = deepport.moe_dispatch_expanded(x, idx, w, EXPERTS, group=group, expert_alignment=4, backend=backend)
        assert isinstance(e.recv_x, torch.Tensor)
        got |= {"expanded.recv_x": e.recv_x, "expanded.m_indices": e.m_indices, "expanded.weights": e.recv_weights}
        got |= {"expanded.combined": deepport.moe_combine_expanded(e.recv_x, e.handle, backend=backend)}
    if _implements(backend, "moe_low_latency_dispatch"):
        ll = deepport.moe_low_latency_dispatch(x, idx, T_MAX, EXPERTS, group=group, use_fp8=False, backend=backend)
        assert isinstance(ll.recv_x, torch.Tensor)
        rows = torch.arange(ll.recv_x.shape[1])[None, :] < ll.recv_count[:, None].cpu()
        got |= {"low_latency.recv_x": ll.recv_x.cpu()[rows], "low_latency.count": ll.recv_count}
        got |= {"low_latency.combined": deepport.moe_low_latency_combine(ll.recv_x, idx, w, ll.handle,
                                                                          backend=backend)}
    return {k: v.detach().cpu() for k, v in got.items()}


def agree_with_reference(rank: int, group: Any, device: torch.device, backend: str, tokens: list[int],
                         routes: list[str]) -> list[str]:
    """Run every op on ``backend`` and on ``reference``; the differences found (empty: they agree)."""
    x, idx, w = inputs(rank, tokens, routes)
    got = all_ops(backend, x, idx, w, group)
    want = all_ops("reference", x, idx, w, group)
    problems = []
    for name, value in got.items():
        ref = want[name]
        if value.shape != ref.shape:
            problems.append(f"rank {rank} {name}: shape {tuple(value.shape)}, reference {tuple(ref.shape)}")
        elif value.dtype == torch.bfloat16 and "combine" in name:
            if not torch.allclose(value.float(), ref.float(), rtol=2 ** -7, atol=1e-6):
                problems.append(f"rank {rank} {name}: max diff {(value.float() - ref.float()).abs().max()}")
        elif not torch.equal(value, ref):
            problems.append(f"rank {rank} {name}: differs from the reference")
    return problems


# --- faults ----------------------------------------------------------------------------------------------------


def _prepared(op: str, backend: str, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor,
              group: Any) -> Callable[[], object]:
    """The call of ``op`` ready to run; for a combine, its dispatch runs here (every rank takes part)."""
    if op == "moe_dispatch":
        return lambda: deepport.moe_dispatch(x, idx, w, EXPERTS, group=group, backend=backend)
    if op == "moe_dispatch_expanded":
        return lambda: deepport.moe_dispatch_expanded(x, idx, w, EXPERTS, group=group, backend=backend)
    if op == "moe_low_latency_dispatch":
        return lambda: deepport.moe_low_latency_dispatch(x, idx, T_MAX, EXPERTS, group=group, use_fp8=False,
                                                         backend=backend)
    if op == "moe_combine":
        d = deepport.moe_dispatch(x, idx, w, EXPERTS, group=group, backend=backend)
        assert isinstance(d.recv_x, torch.Tensor)
        recv_x, weights = d.recv_x, d.recv_topk_weights
        return lambda: deepport.moe_combine(recv_x, d.handle, weights, backend=backend)
    if op == "moe_combine_expanded":
        e = deepport.moe_dispatch_expanded(x, idx, w, EXPERTS, group=group, backend=backend)
        assert isinstance(e.recv_x, torch.Tensor)
        y = e.recv_x
        return lambda: deepport.moe_combine_expanded(y, e.handle, backend=backend)
    if op == "moe_low_latency_combine":
        ll = deepport.moe_low_latency_dispatch(x, idx, T_MAX, EXPERTS, group=group, use_fp8=False, backend=backend)
        assert isinstance(ll.recv_x, torch.Tensor)
        y_ll = ll.recv_x
        return lambda: deepport.moe_low_latency_combine(y_ll, idx, w, ll.handle, backend=backend)
    raise ValueError(f"not a collective MoE op: {op}")


def _outcome(run: Callable[[], object]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        run()
    except Exception as exc:
        return {"types": [c.__name__ for c in type(exc).__mro__], "message": str(exc)[:1500],
                "elapsed": time.monotonic() - started}
    return {"types": [], "message": "returned normally", "elapsed": time.monotonic() - started}


def stalled_peer(rank: int, group: Any, device: torch.device, backend: str, op: str,
                 timeout_s: float) -> dict[str, Any] | None:
    """Both ranks join a fresh subgroup with a ``timeout_s`` limit (and, for a combine, dispatch on it);
    then rank 1 stalls: it never calls ``op``. Rank 0's outcome of calling it."""
    sub = dist.new_group([0, 1], timeout=timedelta(seconds=timeout_s))
    x, idx, w = inputs(rank, [6, 5], ["spread", "spread"])
    run = _prepared(op, backend, x, idx, w, sub)
    if rank == 1:
        return None
    return _outcome(run)


def dying_peer(rank: int, group: Any, device: torch.device, backend: str, op: str,
               die_at: int) -> dict[str, Any] | None:
    """Rank 1 runs ``op`` until its ``die_at``-th collective (counted from the op's start), where its
    process exits (after this job has answered, so the harness hears rank 0's outcome). The subgroup's
    limit is long: a death must be noticed as one, not waited out."""
    sub = dist.new_group([0, 1], timeout=timedelta(seconds=60))
    x, idx, w = inputs(rank, [6, 5], ["spread", "spread"])
    run = _prepared(op, backend, x, idx, w, sub)
    if rank == 0:
        return _outcome(run)
    count = {"n": 0}

    class Died(Exception):
        pass

    def fatal(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            count["n"] += 1
            if count["n"] >= die_at:
                raise Died
            return fn(*args, **kwargs)
        return call

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, fatal(getattr(dist, name)))
    try:
        run()
    except Died:
        threading.Timer(0.5, lambda: os._exit(9)).start()  # the process dies without leaving the collective
        return None
    return {"types": [], "message": f"rank 1 finished the op before collective #{die_at}", "elapsed": 0.0}
