"""Where one call of the one-process expanded MoE dispatch spends its time on a GPU (issue 10's permute
target): torch.profiler over a few warm calls of the public op (value checks off) per backend, printing
each kernel's device time, the sum of device time per call against the call's wall time, and the host
sync points. The bench config's shape: t=4096 tokens, hidden 7168, top-8 of 256 experts, alignment 128.

    PYTHONPATH=$PWD DEEPPORT_CHECK_VALUES=0 python3 scripts/gpu_moe_trace.py [--backend triton torch] [--calls 5]
    ... --block-t 64 256 512   the layout kernel per BLOCK_T;  --rows   the rows kernel alone per width/BLOCK_C/warps
    ... --combine              the expanded combine: its kernels per call, its weighted-rows kernel per BLOCK_C/warps
    ... --place                the one-process low-latency dispatch (128 tokens, FP8) per place_rows variant
                               (row width, bytes per program, warps): device time per call, bits checked first
    ... --ll-routes            the multi-rank low-latency routes kernels at EP=2 (128 tokens per rank, top-8
                               of 256): the receive kernel per slots per step, the one-kernel sender (FP8
                               cast) per blocks per program; outputs checked equal across variants, device
                               time per launch
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

import deepport
from deepport.bench.configs.moe import EXPERTS, HIDDEN, TOPK, routing


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", nargs="+", default=["triton", "torch"])
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--block-t", type=int, nargs="*", default=[],
                        help="triton only: time the count and layout kernels at each BLOCK_T (tokens per block)")
    parser.add_argument("--rows", action="store_true",
                        help="time the rows kernel alone over element widths, BLOCK_C and num_warps")
    parser.add_argument("--rows-mode", action="store_true",
                        help="the fused dispatch with its rows gathered (one program per expanded row) and "
                             "scattered (one program per token, then the padding rows): per-kernel device time")
    parser.add_argument("--place", action="store_true",
                        help="the low-latency dispatch per place_rows variant (moe_permute._PLACE_*)")
    parser.add_argument("--ll-routes", action="store_true",
                        help="the multi-rank low-latency send and receive routes kernels per step size")
    parser.add_argument("--combine", action="store_true",
                        help="profile the triton expanded combine, then time its weighted-rows kernel alone "
                             "over BLOCK_C and num_warps")
    args = parser.parse_args()
    if args.block_t:
        layout_sweep(args)
    if args.rows:
        rows_sweep(args)
    if args.rows_mode:
        layout_sweep(args, modes=("gather", "scatter"))
    if args.combine:
        combine_sweep(args)
    if args.place:
        place_sweep(args)
    if args.ll_routes:
        ll_routes_sweep()
    if args.block_t or args.rows or args.rows_mode or args.combine or args.place or args.ll_routes:
        return
    device = torch.device("cuda")
    x, idx, w = routing(args.tokens, HIDDEN, EXPERTS, TOPK, 0, device)
    for backend in args.backend:
        def call(backend: str = backend) -> object:
            return deepport.moe_dispatch_expanded(x, idx, w, EXPERTS, expert_alignment=128, backend=backend)
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.calls):
            call()
        torch.cuda.synchronize()
        wall_us = (time.perf_counter() - start) * 1e6 / args.calls
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                call()
            torch.cuda.synchronize()
        events = prof.key_averages()
        device_us = sum(e.self_device_time_total for e in events) / args.calls
        print(f"== {backend}: wall {wall_us:.0f} us per call (unprofiled), device busy {device_us:.0f} us per call")
        print(events.table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=60))
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels.sort(key=lambda e: e.time_range.start)
        if kernels:  # the last call's kernels in order: gaps between them are host time
            per = max(1, len(kernels) // args.calls)
            last = kernels[-per:]
            t0 = last[0].time_range.start
            print(f"last call's {len(last)} device ops, start offset / duration (us):")
            for e in last:
                print(f"  {e.time_range.start - t0:8.0f} {e.time_range.elapsed_us():7.0f}  {e.name[:70]}")


def layout_sweep(args: argparse.Namespace, modes: tuple[str, ...] = ()) -> None:
    """Device time of the triton count, layout and rows kernels per call at each ``--block-t`` (tokens per
    block of the count and layout kernels), or with ``modes`` at the default BLOCK_T per rows mode
    (``_ROWS``: gather, scatter), each variant's outputs first checked bit for bit against the
    general route (:func:`~deepport.backends.torch.moe_layouts.dispatch_expanded_routed`, triton steps)."""
    from deepport.backends.torch import moe_layouts
    from deepport.backends.triton import moe_expanded_dispatch as fused
    from deepport.backends.triton.moe_permute import TRITON
    from deepport.kernels import moe_dispatch_expanded as dispatch_op

    device = torch.device("cuda")
    x, idx, w = routing(args.tokens, HIDDEN, EXPERTS, TOPK, 0, device)
    call = dispatch_op.bind(x, idx, w, EXPERTS, expert_alignment=128)
    want = moe_layouts.dispatch_expanded_routed(call, TRITON)
    variants = [(f"BLOCK_T {b:5d}", b, fused._ROWS) for b in args.block_t] if not modes else \
        [(f"rows {m:8s}", fused._BLOCK_T, m) for m in modes]
    defaults = fused._BLOCK_T, fused._ROWS  # restored after the sweep: the next sweep runs at the defaults
    for label, block_t, mode in variants:
        fused._BLOCK_T, fused._ROWS = block_t, mode
        got = fused.dispatch(call)
        pairs = [(got.recv_x, want.recv_x), (got.m_indices, want.m_indices), (got.recv_weights, want.recv_weights),
                 (got.handle.expanded_src_row, want.handle.expanded_src_row),
                 (got.handle.routes.recv_src_idx, want.handle.routes.recv_src_idx)]
        if not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in pairs):
            print(f"{label}: WRONG (differs from the general route)")
            continue
        for _ in range(3):
            deepport.moe_dispatch_expanded(x, idx, w, EXPERTS, expert_alignment=128, backend="triton")
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                deepport.moe_dispatch_expanded(x, idx, w, EXPERTS, expert_alignment=128, backend="triton")
            torch.cuda.synchronize()
        times = {e.key: e.self_device_time_total / args.calls for e in prof.key_averages()}
        layout = sum(v for k, v in times.items() if k.startswith(("moe_expanded_count", "moe_expanded_layout")))
        moves = sum(v for k, v in times.items() if k.startswith(("moe_expanded_rows", "moe_expanded_scatter",
                                                                   "moe_expanded_pad")))
        print(f"{label}: count + layout {layout:.1f} us, rows {moves:.1f} us; " + ", ".join(
            f"{k} {v:.1f} us" for k, v in times.items() if k.startswith("moe_")))
    fused._BLOCK_T, fused._ROWS = defaults


def _check_and_time(launch: Callable[[], None], out: torch.Tensor, want: torch.Tensor, moved: int,
                    label: str) -> None:
    """One launch into ``out`` (poisoned by the caller), compared bit for bit with ``want``; if equal, the
    mean of 20 launches between CUDA events. Prints ``label`` with the time and GB/s, or WRONG."""
    launch()
    torch.cuda.synchronize()
    if not torch.equal(out.view(torch.int16), want.view(torch.int16)):
        print(f"{label}: WRONG")
        return
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        launch()
    end.record()
    end.synchronize()
    us = start.elapsed_time(end) * 1e3 / 20
    print(f"{label}: {us:7.1f} us {moved / us / 1e3:6.0f} GB/s")


def rows_sweep(args: argparse.Namespace) -> None:
    """Device time of ``moe_expanded_rows_kernel`` alone (events around 20 launches) per element width,
    ``BLOCK_C`` and ``num_warps``, on the rows of a real dispatch; each candidate's output checked against
    the dispatch's ``recv_x`` bit for bit first."""
    from deepport.backends.triton.moe_expanded_dispatch_kernels import moe_expanded_rows_kernel

    device = torch.device("cuda")
    x, idx, w = routing(args.tokens, HIDDEN, EXPERTS, TOPK, 0, device)
    res = deepport.moe_dispatch_expanded(x, idx, w, EXPERTS, expert_alignment=128, backend="triton")
    src_row = res.handle.expanded_src_row
    token_of = torch.where(src_row >= 0, res.handle.routes.recv_src_idx[src_row.clamp(min=0)], -1)
    want = res.recv_x
    m = int(token_of.shape[0])
    moved = (x.numel() + want.numel()) * x.element_size()
    for bits in (torch.int16, torch.int32, torch.int64):
        xb = x.view(bits)
        cols = int(xb.shape[1])
        for block in (256, 512, 1024, 2048, 4096):
            if block > 4 * cols or block * xb.element_size() < 1024:
                continue
            for warps in (2, 4, 8):
                out = torch.full_like(want, float("nan"))
                ob = out.view(bits)

                def launch(ob: torch.Tensor = ob, xb: torch.Tensor = xb, cols: int = cols, block: int = block,
                           warps: int = warps) -> None:
                    moe_expanded_rows_kernel[(m, -(-cols // block))](
                        xb, token_of, ob, cols, xb.stride(0), xb, ob, 0, 0, 0, HAS_SCALES=False, BLOCK_C=block,
                        BLOCK_S=16, num_warps=warps)

                _check_and_time(launch, out, want, moved, f"{bits!s:12s} BLOCK_C {block:5d} warps {warps:2d}")


def combine_sweep(args: argparse.Namespace) -> None:
    """The triton expanded combine: its kernels' device time per call (profiler), then
    ``moe_weighted_rows_kernel`` alone (events around 20 launches) per ``BLOCK_C`` and ``num_warps``, each
    candidate's bf16 output checked bit for bit against the op's first."""
    from deepport.backends.torch.moe_index import compact
    from deepport.backends.triton.moe_permute_kernels import moe_weighted_rows_kernel

    device = torch.device("cuda")
    x, idx, w = routing(args.tokens, HIDDEN, EXPERTS, TOPK, 0, device)
    res = deepport.moe_dispatch_expanded(x, idx, w, EXPERTS, expert_alignment=128, backend="triton")
    y = torch.randn(res.recv_x.shape, device=device).to(torch.bfloat16)
    want = deepport.moe_combine_expanded(y, res.handle, backend="triton")
    for _ in range(3):
        deepport.moe_combine_expanded(y, res.handle, backend="triton")
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(args.calls):
            deepport.moe_combine_expanded(y, res.handle, backend="triton")
        torch.cuda.synchronize()
    print("combine, device time per call:")
    for e in sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)[:12]:
        print(f"  {e.self_device_time_total / args.calls:8.1f} us  {e.key[:90]}")
    h = res.handle
    routes = h.routes
    rows = compact(h.m_indices >= 0, sum(routes.num_recv_tokens_per_expert))
    token = routes.recv_src_idx[h.expanded_src_row[rows]]
    order = torch.sort(token, stable=True).indices
    num_rows, cols = int(want.shape[0]), int(want.shape[1])
    seg = torch.zeros(num_rows + 1, dtype=torch.int64, device=device)
    seg[1:] = torch.bincount(token, minlength=num_rows).cumsum(0)
    src_pos = rows[order].to(torch.int64).contiguous()
    weights = h.weights[rows][order].to(torch.float32).contiguous()
    moved = (y.numel() + want.numel()) * 2
    for prefetch in (False, True):
        for block in (512, 1024, 2048, 4096, 8192):
            for warps in (2, 4, 8, 16):
                out = torch.full_like(want, float("nan"))

                def launch(out: torch.Tensor = out, block: int = block, warps: int = warps,
                           prefetch: bool = prefetch) -> None:
                    moe_weighted_rows_kernel[(num_rows, -(-cols // block))](
                        y, src_pos, weights, seg, out, cols, y.stride(0), BLOCK_C=block, PREFETCH=prefetch,
                        num_warps=warps)

                _check_and_time(launch, out, want, moved,
                                f"BLOCK_C {block:5d} warps {warps:2d} prefetch {int(prefetch)}")


PLACE_VARIANTS = ((False, 0, 4),  # today: the payload's width (fp8 as bytes), up to 4096 per 4-warp program
                  (True, 0, 4), (True, 0, 8), (True, 2048, 2), (True, 4096, 4), (True, 8192, 4), (True, 16384, 8))


def place_sweep(args: argparse.Namespace) -> None:
    """The triton one-process low-latency dispatch (128 tokens of 7168, FP8 cast, top-8 of 256 experts,
    capacity 128; rows past an expert's count are left unwritten) per ``place_rows`` variant (``_PLACE_WIDE``,
    ``_PLACE_BYTES``, ``_PLACE_WARPS``): each variant's outputs checked bit for bit against today's first,
    then the device time per call of its kernels (profiler over ``--calls`` calls)."""
    from deepport.backends.triton import moe_permute as mp

    device = torch.device("cuda")
    x, idx, _ = routing(128, HIDDEN, EXPERTS, TOPK, 0, device)
    defaults = mp._PLACE_WIDE, mp._PLACE_BYTES, mp._PLACE_WARPS

    def call() -> tuple[torch.Tensor, ...]:
        """The rows each expert received (rows past its count are unwritten, so not compared)."""
        res = deepport.moe_low_latency_dispatch(x, idx, 128, EXPERTS, backend="triton")
        data, scales = res.recv_x
        count = res.recv_count.to(torch.int64)
        valid = torch.arange(data.shape[1], device=device)[None, :] < count[:, None]
        return data.view(torch.uint8)[valid], scales[valid], count

    want = call()
    for wide, nbytes, warps in PLACE_VARIANTS:
        mp._PLACE_WIDE, mp._PLACE_BYTES, mp._PLACE_WARPS = wide, nbytes, warps
        label = f"place wide {int(wide)} bytes {nbytes:5d} warps {warps:2d}"
        got = call()
        if not all(torch.equal(a, b) for a, b in zip(got, want, strict=True)):
            print(f"{label}: WRONG (differs from today's placement)")
            continue
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                call()
            torch.cuda.synchronize()
        times = {e.key: e.self_device_time_total / args.calls for e in prof.key_averages()}
        place = sum(v for k, v in times.items() if k.startswith("moe_place_rows"))
        print(f"{label}: device {sum(times.values()):7.1f} us per call, moe_place_rows_kernel {place:7.1f} us")
    mp._PLACE_WIDE, mp._PLACE_BYTES, mp._PLACE_WARPS = defaults


def _kernel_us(launch: Callable[[], object], kernel: str, iters: int = 20) -> float:
    """Mean device time per call of the kernels whose name starts with ``kernel`` (torch.profiler over
    ``iters`` calls after a warm one): launch costs on the host, which dominate a lone small kernel's
    wall time, are left out."""
    launch()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            launch()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages() if e.key.startswith(kernel)) / iters


def ll_routes_sweep(world: int = 2, tokens: int = 128) -> None:
    """The triton low-latency routes kernels of a multi-rank dispatch at issue 14's EP=2 size: the receiver's
    (``moe_ll_receive_kernel``, one program per local expert) per slots per step, on the metadata rank 0
    receives (each source's tokens, then unused slots); the one-kernel sender's (``moe_ll_send_rows_kernel``,
    FP8 cast) per blocks of 128 channels per program. Every variant's outputs must equal the default's."""
    from deepport.backends.triton import moe_permute as mp

    device = torch.device("cuda")
    num_local, slots = EXPERTS // world, world * tokens
    meta = torch.full((slots, 1 + TOPK), -1, dtype=torch.int32, device=device)
    for source in range(world):
        _, idx, _ = routing(tokens, HIDDEN, EXPERTS, TOPK, 10 + source, device)
        mine = (idx // num_local == 0).any(1)  # the tokens of this source that select an expert of rank 0
        n = int(mine.sum())
        meta[source * tokens: source * tokens + n, 0] = torch.nonzero(mine)[:, 0].to(torch.int32)
        meta[source * tokens: source * tokens + n, 1:] = idx[mine].to(torch.int32)
    _, idx, _ = routing(tokens, HIDDEN, EXPERTS, TOPK, 10, device)

    def receive() -> tuple[torch.Tensor, ...]:
        return mp.low_latency_receive(meta, 0, num_local, torch.empty(num_local, dtype=torch.int32, device=device))

    x, _, _ = routing(tokens, HIDDEN, EXPERTS, TOPK, 10, device)
    fmt_bytes = HIDDEN + 4 * (HIDDEN // 128) + 4 * (1 + TOPK)  # the send buffer's row: FP8 data, scales, meta
    send_buffer = torch.zeros((world * tokens, fmt_bytes), dtype=torch.uint8, device=device)

    def send_rows() -> tuple[torch.Tensor, ...]:
        meta = send_buffer[:, HIDDEN + 4 * (HIDDEN // 128):].view(torch.int32)
        meta.fill_(-7)
        scales = send_buffer[:, HIDDEN: HIDDEN + 4 * (HIDDEN // 128)].view(torch.float32)
        got = mp.low_latency_send_rows(x, idx, world, num_local, tokens, meta, send_buffer[:, :HIDDEN], scales)
        return (*got, send_buffer.clone())

    for name, attr, fn, sizes in (("receive", "_RECEIVE_SLOTS", receive, (32, 64, 128, 256)),
                                  ("receive", "_RECEIVE_WARPS", receive, (1, 2, 4, 8, 16)),
                                  ("send_rows", "_SEND_ROWS_BLOCKS", send_rows, (1, 2, 4, 8, 14))):
        kernel = f"moe_ll_{name}_kernel"
        default = getattr(mp, attr)
        want = fn()
        for size in sizes:
            setattr(mp, attr, size)
            got = fn()
            ok = all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
            print(f"ll {name} routes, {attr} = {size:3d}{' (default)' if size == default else ''}: "
                  + (f"{_kernel_us(fn, kernel):6.1f} us per launch" if ok else "WRONG (differs from the default)"))
        setattr(mp, attr, default)


if __name__ == "__main__":
    main()
