"""Rank jobs of tests/test_hopper_peer_transport.py (run under ``deepport.conformance.rank_group``, gloo).

The hopper backend's MoE ops are the torch routing over the one-sided peer transport; on CPU the
transport's memory is shared-memory files (:class:`ShmPeerMemory`), so these jobs run the very algorithm
(rounds, chunks, counters, acknowledgements) that runs over NVLink, and compare every output with the
same ops over ``all_to_all_single``.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

from tests.moe_ep_probe import _inputs, _same, counting_all_to_all


def _outputs(group: Any, device: torch.device, p: dict[str, Any], seed: int, rank: int,
             backend: str = "torch") -> dict[str, Any]:
    """Every MoE op of ``backend`` on this rank's inputs: name -> tensor (or tuple of tensors)."""
    import deepport

    x = _inputs(rank, p, seed)
    data, idx, w = x["x"].to(device), x["topk_idx"].to(device), x["topk_weights"].to(device)
    fp8 = "x_scales" in x
    payload: Any = (data, x["x_scales"].to(device)) if fp8 else data
    experts, t_max, align = int(p["experts"]), int(p.get("t_max", 32)), int(p.get("alignment", 4))
    out: dict[str, Any] = {}
    d = deepport.moe_dispatch(payload, idx, w, experts, group=group, backend=backend)
    for name in ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert"):
        out[f"dispatch {name}"] = getattr(d, name)
    for name in ("send_counts", "recv_counts", "recv_src_idx", "recv_topk_idx"):
        out[f"dispatch handle.{name}"] = getattr(d.handle, name)
    again: Any = (x["x2"].to(device), x["x2_scales"].to(device)) if fp8 else x["x2"].to(device)
    out["cached dispatch"] = deepport.moe_dispatch(again, handle=d.handle, backend=backend).recv_x
    if not fp8:
        c = deepport.moe_combine(d.recv_x, d.handle, d.recv_topk_weights, backend=backend)  # type: ignore[arg-type]
        out["combine"], out["combine weights"] = c.combined_x, c.combined_topk_weights
        out["combine unweighted"] = deepport.moe_combine(d.recv_x, d.handle, backend=backend).combined_x  # type: ignore[arg-type]
    e = deepport.moe_dispatch_expanded(payload, idx, w, experts, group=group, expert_alignment=align, backend=backend)
    for name in ("recv_x", "m_indices", "recv_weights", "num_recv_tokens_per_expert"):
        out[f"expanded {name}"] = getattr(e, name)
    if not fp8:
        y = e.recv_x.clone()  # type: ignore[union-attr]
        y[e.m_indices < 0] = float("nan")
        out["expanded combine"] = deepport.moe_combine_expanded(y, e.handle, backend=backend)
        for use_fp8 in (False, True):
            ll = deepport.moe_low_latency_dispatch(data, idx, t_max, experts, group=group, use_fp8=use_fp8,
                                                   backend=backend)
            count = ll.recv_count.to(torch.int64)
            rows = torch.arange(ll.handle.world_size * t_max, device=count.device)[None, :] < count[:, None]
            got = ll.recv_x if isinstance(ll.recv_x, tuple) else (ll.recv_x,)
            out[f"low-latency fp8={use_fp8} recv_count"] = ll.recv_count
            out[f"low-latency fp8={use_fp8} recv_x"] = tuple(g[rows] for g in got)
            out[f"low-latency fp8={use_fp8} packed_src_row"] = ll.handle.packed_src_row
            if not use_fp8:
                yl = ll.recv_x.clone()  # type: ignore[union-attr]
                yl[~rows] = float("nan")  # rows past recv_count are never read
                out["low-latency combine"] = deepport.moe_low_latency_combine(yl, idx, w, ll.handle, backend=backend)
    return out


def peer_agreement(rank: int, group: Any, device: torch.device, params: dict[str, Any], capacity: int,
                   seed: int = 0, calls: int = 2, fixed: int = 0, backend: str = "torch") -> dict[str, Any]:
    """Every MoE op of the torch backend over all_to_all_single, then of ``backend`` (its steps, e.g. triton's
    sender that writes straight into the peers' slots) over the peer transport (``calls`` times, the same
    memory: counters carry over between calls); bit-exact agreement, and no collective in the peer runs.
    ``fixed``: the memory's fixed-exchange slot bytes (0: every exchange in rounds)."""
    from deepport.backends.hopper.peer_memory_shm import ShmPeerMemory
    from deepport.backends.hopper.peer_transport import PeerTransport
    from deepport.backends.torch.moe_comm import use_transport

    p = {**params, "tokens": tuple(params["tokens"])}
    memory = ShmPeerMemory(group, capacity, timeout_s=30.0, fixed_capacity=fixed)
    transport = PeerTransport(memory)
    bad: list[str] = []
    used: Counter[str] = Counter()
    for call in range(calls):
        want = _outputs(group, device, p, seed + call, rank)
        with counting_all_to_all(used), use_transport(transport):
            got = _outputs(group, device, p, seed + call, rank, backend)
        if got.keys() != want.keys():
            bad.append(f"call {call}: outputs {sorted(got)} vs {sorted(want)}")
        for name in want:
            _same(f"call {call}: {name}", got.get(name), want[name], bad)
    in_place = prelude = exchanges = 0
    if backend == "triton":
        from deepport.backends.triton import moe_route_graph, moe_sum_graph

        in_place = moe_sum_graph.usage(transport)[0]
        prelude, _, exchanges, _ = moe_route_graph.usage(transport)
    return {"bad": bad, "collectives": used["all_to_all_single"], "chunks": sum(memory.sent), "compared": len(want),
            "fixed_exchanges": memory.fixed_exchanges, "written": memory.written_exchanges,
            "landed": memory.landed_exchanges,
            "rows_windows": transport.rows_windows, "in_place": in_place, "prelude": prelude,
            "exchanges": exchanges}


def fixed_exchanges(rank: int, group: Any, device: torch.device, sizes: list[int], fixed: int,
                    seed: int = 0) -> dict[str, Any]:
    """Equal-split exchanges of ``sizes[i]`` bytes per pair, back to back on one memory, each against
    ``all_to_all_single`` of the same bytes: the parity areas must never hand out stale or torn bytes
    even when a fast rank runs ahead (ranks sleep at random between exchanges)."""
    import random
    import time

    from deepport.backends.hopper.peer_memory_shm import ShmPeerMemory
    from deepport.backends.hopper.peer_transport import PeerTransport

    world = dist.get_world_size(group)
    memory = ShmPeerMemory(group, 64, timeout_s=30.0, fixed_capacity=fixed)
    transport = PeerTransport(memory)
    pause = random.Random(seed * 31 + rank)
    bad: list[str] = []
    for i, n in enumerate(sizes):
        g = torch.Generator().manual_seed(seed * 7919 + i * 97 + rank)
        send = torch.randint(0, 256, (world * n,), generator=g, dtype=torch.uint8)
        want = torch.empty_like(send)
        dist.all_to_all_single(want, send, group=group)
        got = torch.full_like(send, 7)
        time.sleep(pause.random() * 0.004)
        transport.exchange(got, send, None, None, f"exchange {i}")
        if not torch.equal(got, want):
            bad.append(f"exchange {i} ({n} bytes per pair): wrong bytes")
    return {"bad": bad, "fixed_exchanges": memory.fixed_exchanges, "chunks": sum(memory.sent)}


def peer_stalled(rank: int, group: Any, device: torch.device, tokens: tuple[int, ...], experts: int,
                 fixed: int = 0) -> str:
    """The last rank builds the memory but never calls the dispatch: the others must time out with a message
    (``fixed``: the fixed-exchange slot bytes, so the low-latency dispatch waits there instead of in rounds)."""
    import deepport
    from deepport.backends.hopper.peer_memory_shm import ShmPeerMemory
    from deepport.backends.hopper.peer_transport import PeerTransport
    from deepport.backends.torch.moe_comm import use_transport

    p = {"hidden": 128, "experts": experts, "topk": 2, "world": len(tokens), "tokens": tuple(tokens)}
    memory = ShmPeerMemory(group, 4096, timeout_s=1.0, fixed_capacity=fixed)
    if rank == len(tokens) - 1:
        return "stayed away"
    x = _inputs(rank, p, 0)
    try:
        with use_transport(PeerTransport(memory)):
            deepport.moe_low_latency_dispatch(x["x"], x["topk_idx"], 64, experts, group=group, use_fp8=False,
                                              backend="torch")
    except Exception as exc:  # the message is what the test checks
        return f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    return "returned"


def peer_agreement_cuda(rank: int, group: Any, device: torch.device, params: dict[str, Any],
                        seed: int = 0) -> dict[str, Any]:
    """2 GPUs over NCCL: every MoE op of the hopper backend (symmetric memory, flag kernel) against the
    torch backend over NCCL, twice; then the low-latency dispatch + combine captured in a CUDA graph and
    replayed on new inputs against eager calls (the device-side flag counters must advance per replay)."""
    from tests.moe_ep_probe import bf16_ulps

    os.environ["DEEPPORT_HOPPER_EP"] = "1"
    p = {**params, "tokens": tuple(params["tokens"])}
    bad: list[str] = []
    for call in range(2):
        want = _outputs(group, device, p, seed + call, rank, backend="torch")
        got = _outputs(group, device, p, seed + call, rank, backend="hopper")
        for name, ref in want.items():
            if "combine" in name and "weights" not in name:  # float32 sums: torch's index_add_ order may differ
                if bf16_ulps(got[name], ref) > 1:
                    bad.append(f"call {call}: {name} more than one bf16 step off")
            else:
                _same(f"call {call}: {name}", got[name], ref, bad)
    bad += _graph_replays(rank, group, device)
    return {"bad": bad}


def _graph_replays(rank: int, group: Any, device: torch.device, backend: str = "hopper",
                   reference: str = "torch") -> list[str]:
    """The low-latency dispatch + combine of ``backend`` captured in a CUDA graph and replayed three times on
    new inputs, each against an eager call of ``reference`` (the peer counters must advance per replay)."""
    import deepport
    from tests.moe_ep_probe import bf16_ulps

    t_max, experts, hidden = 128, 256, 7168
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.empty(t_max, hidden, dtype=torch.bfloat16, device=device)
    idx = torch.empty(t_max, 8, dtype=torch.int64, device=device)
    w = torch.empty(t_max, 8, dtype=torch.float32, device=device)

    def refill() -> None:
        x.copy_(torch.randn(t_max, hidden, generator=g).to(torch.bfloat16))
        idx.copy_(torch.rand(t_max, experts, generator=g).topk(8, dim=1).indices)
        w.copy_(torch.rand(t_max, 8, generator=g))

    def step(backend: str) -> torch.Tensor:
        got = deepport.moe_low_latency_dispatch(x, idx, t_max, experts, group=group, use_fp8=True, backend=backend)
        y = (got.recv_x[0].float() * got.recv_x[1].repeat_interleave(128, dim=2, output_size=hidden)).to(torch.bfloat16)
        out: torch.Tensor = deepport.moe_low_latency_combine(y, idx, w, got.handle, backend=backend)
        return out

    bad: list[str] = []
    refill()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        step(backend)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    os.environ["DEEPPORT_CHECK_VALUES"] = "0"  # the combine's routing comparison reads the device
    try:
        with torch.cuda.graph(graph):
            captured = step(backend)
    finally:
        os.environ.pop("DEEPPORT_CHECK_VALUES", None)
    for replay in range(3):
        refill()
        graph.replay()
        eager = step(reference)
        if bf16_ulps(captured, eager) > 1:
            bad.append(f"graph replay {replay}: more than one bf16 step from the eager {reference} call")
    torch.cuda.synchronize(device)
    return bad
