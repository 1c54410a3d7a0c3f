"""The portable path's normal dispatch and combine on a GPU, staged or gathered: two processes on one GPU.

Over ``all_to_all_single`` (NCCL between GPUs) the triton backend's normal dispatch stores every row straight
into its place in the collective's send buffer and reads the received rows where they landed
(``moe_comm.staged_rows_window`` with the ``rows_to_blocks`` / ``blocks_to_rows`` kernels), and its combine
sends the returned rows straight from the caller's tensor and sums them where they landed (``rank_rows_at``).
Before, it packed the send buffer by index and copied the received rows out part by part ("gathered").

NCCL needs one GPU per rank, so on one GPU the collective is stood in for by ``--via``:

- ``peer`` (default): the CUDA-IPC peer transport's all-to-all of whole buffers, its one-sided windows hidden
  (the staged path then runs exactly as over NCCL, the bytes moved by copies on this GPU);
- ``gloo``: ``torch.distributed.all_to_all_single`` of the CUDA tensors on a gloo group (through host memory).

Variants: ``staged`` (the others' rows stored into the send buffer before the host read, while the count
exchange runs; one packed row per token and destination, copied out), ``staged split`` (the split wire: payload
rows straight into the output, side rows apart), ``staged late`` (packed, stored after the read), ``gathered``,
the torch steps. Per variant it checks the outputs (against gathered bit for bit: received rows, routes, counts,
handle, also for an FP8 payload: the rows and their scales; and the combine's sums; the torch steps' dispatch
bit for bit, their combine within one bf16 step), then splits each call's host time at its device-to-host reads
(``tests.peer_cuda_host.split_call``: *before* the count read, *after* it; the collective's own host time counts
in both), issue 14's sizes (4096 tokens, hidden 7168, top-8 of 256, EP=2). The rows ``transport alone`` time the
stand-in's all-to-all of the same bytes.

``python -m tests.staged_cuda_host [--calls N] [--via peer|gloo] [--cprofile STEP]``
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tests.peer_cuda_host import _cprofile, median_split
from tests.peer_cuda_one_gpu import run_ranks

TOKENS, HIDDEN, EXPERTS, TOPK = 4096, 7168, 256, 8


class BuffersOnly:
    """A transport that moves whole buffers only: another transport's ``start`` (``inner``, or gloo's
    ``all_to_all_single`` when None), its windows hidden; its ``start_parts`` (the split wire's separate
    tensors, as NCCL's grouped point-to-point moves them) packs the parts per rank into one buffer, moves it with
    ``start`` and copies them out where they belong once it has arrived."""

    def __init__(self, inner: Any = None) -> None:
        self.inner = inner

    def start(self, out: torch.Tensor, send: torch.Tensor, recv_counts: Any, send_counts: Any, grp: Any,
              what: str) -> Any:
        if self.inner is not None:
            return self.inner.start(out, send, recv_counts, send_counts, grp, what)
        from deepport.backends.torch.moe_comm import Pending

        work = dist.all_to_all_single(out, send, None if recv_counts is None else list(recv_counts),
                                      None if send_counts is None else list(send_counts), group=grp.group,
                                      async_op=True)
        return Pending(what, grp, work, out, send)

    def start_parts(self, recv: list[torch.Tensor | None], send: list[torch.Tensor | None], grp: Any,
                    what: str) -> Any:
        from deepport.backends.torch.moe_comm import Pending

        world = grp.world_size
        parts = len(send) // world

        def size(t: torch.Tensor | None) -> int:
            return 0 if t is None else int(t.numel())

        empty = torch.empty(0, dtype=torch.uint8, device=torch.cuda.current_device())
        packed = torch.cat([empty, *(t for r in range(world) for i in range(parts)
                                     if (t := send[i * world + r]) is not None)])
        sends = [sum(size(send[i * world + r]) for i in range(parts)) for r in range(world)]
        recvs = [sum(size(recv[i * world + s]) for i in range(parts)) for s in range(world)]
        out = torch.empty(sum(recvs), dtype=torch.uint8, device=empty.device)
        pending = self.start(out, packed, recvs, sends, grp, what)

        class Unpack:
            def wait(self) -> None:
                pending.wait()
                at = 0
                for s in range(world):
                    for i in range(parts):
                        t = recv[i * world + s]
                        if t is not None:
                            t.copy_(out[at: at + t.numel()])
                            at += t.numel()

        return Pending(what, grp, Unpack(), out)


def _compare(bad: list[str], what: str, a: Any, b: Any) -> None:
    """Bit for bit (tensors through integer views, so NaN payloads compare too), else ``==``."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        def raw(t: torch.Tensor) -> torch.Tensor:
            return t.contiguous().view(torch.uint8) if t.is_floating_point() else t
        same = a.shape == b.shape and a.dtype == b.dtype and torch.equal(raw(a), raw(b))
    else:
        same = a == b
    if not same:
        bad.append(what)


MODES = {"staged": (True, "packed"), "staged split": (True, "split"), "staged late": (False, "packed")}
"""The staged variants: (the early send, ``DEEPPORT_MOE_WIRE``); the others run with the defaults."""


def _dispatch(call: Any, steps: Any, name: str = "") -> Any:
    """``moe_routes.dispatch`` with ``steps`` in variant ``name``'s mode (:data:`MODES`): without the early send
    the staged send buffers are made and filled after the host read (``EARLY_SEND_BYTES`` 0 for the call), as
    before the early send; the wire split (payload straight into the output) or packed (one row, copied out)."""
    import os

    from deepport.backends.torch import moe_routes

    early, wire = MODES.get(name, (True, "packed"))
    bound, saved = moe_routes.EARLY_SEND_BYTES, os.environ.get(moe_routes.WIRE_ENV)
    moe_routes.EARLY_SEND_BYTES = bound if early else 0
    os.environ[moe_routes.WIRE_ENV] = wire
    try:
        return moe_routes.dispatch(call, steps)
    finally:
        moe_routes.EARLY_SEND_BYTES = bound
        if saved is None:
            os.environ.pop(moe_routes.WIRE_ENV, None)
        else:
            os.environ[moe_routes.WIRE_ENV] = saved


def _syncs(step: Callable[[], Any]) -> list[str]:
    """Where in deepport ``step`` (a collective call: every rank runs it) made the host wait for the GPU:
    ``torch.cuda.set_sync_debug_mode("warn")``'s warnings, by file and line."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename.split('/deepport/')[-1]}:{w.lineno}" for w in caught
            if "synchroniz" in str(w.message) and "/deepport/" in w.filename]


def _check(group: Any, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, variants: dict[str, Any]) -> list[str]:
    from deepport.backends.torch import moe_routes
    from deepport.backends.triton.moe_permute import cast_fp8
    from deepport.kernels import moe_combine, moe_dispatch
    from tests.moe_ep_probe import bf16_ulps

    bad: list[str] = []
    fp8 = cast_fp8(x)  # FP8 payloads: their scales travel in the side rows of the split wire
    got8 = {name: _dispatch(moe_dispatch.bind(fp8, idx, w, EXPERTS, group=group), steps, name)
            for name, steps in variants.items()}
    for name, ran in got8.items():
        for i, (a, b) in enumerate(zip(ran.recv_x, got8["gathered"].recv_x, strict=True)):
            _compare(bad, f"fp8 dispatch {name} recv_x[{i}]", a, b)
        _compare(bad, f"fp8 dispatch {name} recv_topk_weights", ran.recv_topk_weights,
                 got8["gathered"].recv_topk_weights)
    got = {name: _dispatch(moe_dispatch.bind(x, idx, w, EXPERTS, group=group), steps, name)
           for name, steps in variants.items()}
    base = got["gathered"]
    for name, ran in got.items():
        for field in ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert"):
            _compare(bad, f"dispatch {name} {field}", getattr(ran, field), getattr(base, field))
        for field in ("send_counts", "recv_counts", "recv_src_idx", "recv_topk_idx", "is_token_in_rank", "topk_idx"):
            _compare(bad, f"dispatch {name} handle.{field}", getattr(ran.handle, field), getattr(base.handle, field))
    y = torch.randn(tuple(base.recv_x.shape), generator=torch.Generator().manual_seed(7 + dist.get_rank(group)))
    y = y.to(torch.bfloat16).to(x.device)
    out = {name: moe_routes.combine(moe_combine.bind(y, base.handle), steps).combined_x
           for name, steps in variants.items()}
    _compare(bad, "combine staged vs gathered", out["staged"], out["gathered"])
    if bf16_ulps(out["staged"], out["torch"]) > 1:
        bad.append("combine staged more than one bf16 step from the torch steps")
    return bad


def _kernels(name: str, step: Callable[[], Any], device: torch.device, calls: int = 5) -> list[str]:
    """torch.profiler over ``calls`` calls of ``step`` (both ranks call it): kernels and copies per call, their
    summed GPU time (time-sliced with the other rank), the largest by name."""
    torch.cuda.synchronize(device)
    dist.barrier()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize(device)
    dist.barrier()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name, []).append(e.device_time)
    lines = [f"profile {name}: {len(kernels) / calls:.0f} kernels/copies per call, "
             f"{sum(e.device_time for e in kernels) / calls:.1f} us of GPU time per call"]
    for kname, times in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:16]:
        lines.append(f"    {len(times) / calls:4.1f} x {sum(times) / calls:7.1f} us  {kname[:90]}")
    return lines


def _worker(rank: int, world: int, init: str, results: Any, calls: int, via: str, profile: str) -> None:
    import os

    import deepport
    from deepport.backends.hopper.peer_memory_cuda import CudaPeerMemory
    from deepport.backends.hopper.peer_transport import PeerTransport
    from deepport.backends.torch import moe_comm, moe_routes
    from deepport.backends.torch.moe_local import TORCH
    from deepport.backends.triton.moe_routes import ROUTES
    from deepport.bench.configs.moe import routing
    from deepport.kernels import moe_args, moe_combine, moe_dispatch

    out: list[str] = []
    try:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120))
        group = dist.group.WORLD
        checked = moe_args.resolve_group  # CUDA tensors on a gloo group: the stand-in moves the bytes
        moe_args.resolve_group = lambda g, d: checked(g, torch.device("cpu"))  # type: ignore[assignment]
        context: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
        if via == "peer":
            memory = CudaPeerMemory(group, device, capacity=64 << 20, timeout_s=60.0, mapping="ipc",
                                    fixed_capacity=8 << 20)
            context = moe_comm.use_transport(BuffersOnly(PeerTransport(memory)))  # type: ignore[arg-type]
        else:  # gloo's point-to-point takes no CUDA tensors: the split wire's parts travel packed, as above
            context = moe_comm.use_transport(BuffersOnly())  # type: ignore[arg-type]
        os.environ["DEEPPORT_CHECK_VALUES"] = "0"
        x, idx, w = routing(TOKENS, HIDDEN, EXPERTS, TOPK, 2000 + rank, device)
        gathered = dataclasses.replace(ROUTES, rows_to_blocks=None, rank_rows_at=None)
        variants = {"staged": ROUTES, "staged split": ROUTES, "staged late": ROUTES, "gathered": gathered,
                    "torch": TORCH}
        with context:
            bad = _check(group, x, idx, w, variants)
            out.append(f"checks ({via}): " + ("ok" if not bad else "WRONG " + "; ".join(bad)))
            for name in MODES:
                where = _syncs(functools.partial(_dispatch, moe_dispatch.bind(x, idx, w, EXPERTS, group=group),
                                                 variants[name], name))
                out.append(f"{name}: dispatch: {len(where)} synchronizing calls in deepport (1 expected: the count "
                           f"read): {', '.join(where)}")
            first = moe_routes.dispatch(moe_dispatch.bind(x, idx, w, EXPERTS, group=group), ROUTES)
            h = first.handle
            assert isinstance(first.recv_x, torch.Tensor)
            y = first.recv_x
            row = HIDDEN * 2
            wire_d = [0 if r == rank else c for r, c in enumerate(h.send_counts)]
            wire_r = [0 if s == rank else c for s, c in enumerate(h.recv_counts)]
            send = torch.empty((sum(wire_d), row), dtype=torch.uint8, device=device)
            recv = torch.empty((sum(wire_r), row), dtype=torch.uint8, device=device)
            grp = moe_args.MoEGroup(group, rank, world, via)

            def transport_alone() -> None:
                moe_comm.start_all_to_all(recv, send, wire_r, wire_d, grp, "transport alone").wait()

            steps: list[tuple[str, Callable[[], Any]]] = [("transport alone (wire rows)", transport_alone)]
            for name, local in variants.items():
                dcall = moe_dispatch.bind(x, idx, w, EXPERTS, group=group)
                ccall = moe_combine.bind(y, h)
                steps += [(f"{name}: dispatch 4096", functools.partial(_dispatch, dcall, local, name)),
                          (f"{name}: combine 4096", functools.partial(moe_routes.combine, ccall, local))]
            steps += [("public op, triton: dispatch 4096", functools.partial(
                deepport.moe_dispatch, x, idx, w, EXPERTS, group=group, backend="triton")),
                      ("public op, triton: combine 4096", functools.partial(
                          deepport.moe_combine, y, h, backend="triton"))]
            out.append(f"{'step':<36} {'reads':>5} {'before':>8} {'blocked':>8} {'between':>8} {'after':>8} "
                       f"{'wall':>8} {'span':>8}   (us, median of {calls}, checks off)")
            for name, step in steps:
                med = median_split(step, device, calls)
                out.append(f"{name:<36} {med['reads']:>5.0f} {med['before']:>8.1f} {med['blocked']:>8.1f} "
                           f"{med['between']:>8.1f} {med['after']:>8.1f} {med['wall']:>8.1f} {med['span']:>8.1f}")
                if profile and profile in name:
                    found = _cprofile(step, device, calls)  # collective calls: both ranks run it
                    out += found if rank == 0 else []
            for name, step in steps:  # the GPU's side: kernels per call and their time
                if name.split(":")[0] in ("staged", "gathered") or (name.startswith("staged") and "dispatch" in name):
                    out += _kernels(name, step, device)
        torch.cuda.synchronize(device)
        dist.barrier()
    except Exception:
        out.append("FAILED: " + traceback.format_exc())
    results[rank] = out


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 2
    calls = int(sys.argv[sys.argv.index("--calls") + 1]) if "--calls" in sys.argv else 20
    via = sys.argv[sys.argv.index("--via") + 1] if "--via" in sys.argv else "peer"
    if via not in ("peer", "gloo"):
        print(f"--via takes peer or gloo, got {via!r}")
        return 2
    profile = sys.argv[sys.argv.index("--cprofile") + 1] if "--cprofile" in sys.argv else ""
    lines = run_ranks(_worker, (calls, via, profile), timeout_s=400)
    print("\n".join(lines))
    return 1 if any("FAILED" in line or "WRONG" in line or "no result" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())
