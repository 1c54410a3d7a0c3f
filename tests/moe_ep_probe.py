"""Counting what an MoE call costs outside its arithmetic: collectives (and their bytes) and host syncs.

:class:`Probe` is a context manager for one rank: it wraps the ``torch.distributed`` collectives
(module attributes, so ``dist.all_to_all_single(...)`` looked up at call time is seen) and watches
the aten ops through a ``TorchDispatchMode``. A *host sync* is an op that makes the host wait for the
device on CUDA: reading a value (``item``/``int``/``bool``, ``tolist``, ``numpy``, ``equal``) or an
op whose output size depends on values (``nonzero``, boolean-mask indexing, ``masked_select``,
``unique``, ``repeat_interleave`` without ``output_size``). ``host_tensors`` counts tensors built from
host data (``torch.tensor(list)``: a host-to-device copy on a GPU, which a CUDA graph cannot capture).
On CPU nothing waits, so the probe is how the CPU tests prove a path free of syncs.

The rank jobs at the bottom run under ``deepport.conformance.rank_group`` (gloo); ``python -m
tests.moe_ep_probe`` prints the per-op table of ``deepport/backends/torch/MOE_NOTES.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

COLLECTIVES = ("all_to_all_single", "all_to_all", "all_gather", "all_gather_into_tensor", "all_reduce",
               "reduce_scatter_tensor", "broadcast", "gather", "scatter", "barrier", "send", "recv", "isend",
               "irecv", "batch_isend_irecv", "all_gather_object")
_SYNC_OPS = {"aten._local_scalar_dense.default": "item", "aten.nonzero.default": "nonzero",
             "aten.masked_select.default": "masked_select", "aten.equal.default": "equal",
             "aten.is_nonzero.default": "item", "aten.unique_consecutive.default": "unique",
             "aten._unique2.default": "unique", "aten.unique_dim.default": "unique"}


@dataclass
class Collective:
    name: str
    bytes_sent: int
    dtypes: tuple[str, ...]


@dataclass
class Probe:
    """What one rank did inside the ``with`` block (see the module docstring)."""

    collectives: list[Collective] = field(default_factory=list)
    syncs: Counter[str] = field(default_factory=Counter)
    host_tensors: int = 0
    forbid_syncs: bool = False

    @property
    def num_syncs(self) -> int:
        return sum(self.syncs.values())

    def collective_names(self) -> list[str]:
        return [c.name for c in self.collectives]

    def sync(self, kind: str) -> None:
        self.syncs[kind] += 1
        if self.forbid_syncs:
            raise AssertionError(f"host sync ({kind}) in a path that must not synchronise")


def _sent_bytes(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, tuple[str, ...]]:
    tensors: list[torch.Tensor] = []
    if name in ("all_to_all_single", "all_gather_into_tensor", "reduce_scatter_tensor"):
        src = kwargs.get("input", args[1] if len(args) > 1 else None)
        tensors = [src] if isinstance(src, torch.Tensor) else []
    elif name in ("all_to_all",):
        src = kwargs.get("input_tensor_list", args[1] if len(args) > 1 else [])
        tensors = [t for t in src if isinstance(t, torch.Tensor)]
    elif name == "batch_isend_irecv":
        ops = args[0] if args else kwargs.get("p2p_op_list", [])
        tensors = [op.tensor for op in ops if getattr(op.op, "__name__", "") == "isend"]
    else:
        tensors = [a for a in args[:1] if isinstance(a, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors), tuple(str(t.dtype).removeprefix("torch.")
                                                                    for t in tensors)


class _Watch(TorchDispatchMode):
    def __init__(self, probe: Probe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        name = str(func)
        kind = _SYNC_OPS.get(name)
        if kind is None and name in ("aten.index.Tensor", "aten.index_put_.default", "aten.index_put.default"):
            indices = args[1] if len(args) > 1 else []
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                kind = "bool_index"
        if kind is None and name.startswith("aten.repeat_interleave") and (kwargs or {}).get("output_size") is None:
            kind = "repeat_interleave"
        if kind is not None:
            self.probe.sync(kind)
        if name == "aten.lift_fresh.default":
            self.probe.host_tensors += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def probe(forbid_syncs: bool = False) -> Iterator[Probe]:
    """Count collectives and host syncs in the block (``forbid_syncs``: raise at the first sync)."""
    p = Probe(forbid_syncs=forbid_syncs)
    originals: dict[str, Callable[..., Any]] = {}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            sent, dtypes = _sent_bytes(name, args, kwargs)
            p.collectives.append(Collective(name, sent, dtypes))
            return fn(*args, **kwargs)

        return counted

    def host_read(kind: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def read(*args: Any, **kwargs: Any) -> Any:
            p.sync(kind)
            return fn(*args, **kwargs)

        return read

    for name in COLLECTIVES:
        if hasattr(dist, name):
            originals[name] = getattr(dist, name)
            setattr(dist, name, wrap(name, originals[name]))
    tensor_methods = {"tolist": torch.Tensor.tolist, "numpy": torch.Tensor.numpy}
    for name, fn in tensor_methods.items():
        setattr(torch.Tensor, name, host_read(name, fn))
    try:
        with _Watch(p):
            yield p
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
        for name, fn in tensor_methods.items():
            setattr(torch.Tensor, name, fn)


# --- rank jobs (run with deepport.conformance.rank_group on gloo) ---------------------------------------


def _inputs(rank: int, params: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    from deepport.conformance.suites import moe_common as mc

    p = {**mc.DEFAULTS, **params}
    p["tokens"] = tuple(p["tokens"])
    return mc.rank_inputs(p, seed, rank)


def _record(p: Probe) -> dict[str, Any]:
    return {"collectives": [(c.name, c.bytes_sent, c.dtypes) for c in p.collectives], "syncs": dict(p.syncs),
            "host_tensors": p.host_tensors}


def _backend_call(op: str, backend: str) -> Callable[..., Any]:
    from deepport.dispatch import registry

    fn: Callable[..., Any] = registry.get(backend).implementation(op)
    return fn


def measure_op(rank: int, group: Any, device: torch.device, op: str, params: dict[str, Any], seed: int = 0,
               backend: str = "torch") -> dict[str, Any]:
    """One rank's cost of ``op``'s backend implementation (the op layer's checks run outside the probe):
    collectives, bytes, host syncs. Combines are measured after a dispatch made outside the probe."""
    from deepport.kernels import (
        moe_combine,
        moe_combine_expanded,
        moe_dispatch,
        moe_dispatch_expanded,
        moe_low_latency_combine,
        moe_low_latency_dispatch,
    )

    x = _inputs(rank, params, seed)
    data, idx, w = x["x"].to(device), x["topk_idx"].to(device), x["topk_weights"].to(device)
    experts, t_max = int(params["experts"]), int(params.get("t_max", 64))
    fp8 = bool(params.get("use_fp8", False))
    if op == "moe_dispatch":
        call: Any = moe_dispatch.bind(data, idx, w, experts, group=group)
    elif op == "moe_combine":
        d = moe_dispatch.moe_dispatch(data, idx, w, experts, group=group, backend=backend)
        call = moe_combine.bind(d.recv_x, d.handle, d.recv_topk_weights)  # type: ignore[arg-type]
    elif op == "moe_dispatch_expanded":
        call = moe_dispatch_expanded.bind(data, idx, w, experts, group=group, expert_alignment=4)
    elif op == "moe_combine_expanded":
        e = moe_dispatch_expanded.moe_dispatch_expanded(data, idx, w, experts, group=group, expert_alignment=4,
                                                        backend=backend)
        call = moe_combine_expanded.bind(e.recv_x, e.handle)  # type: ignore[arg-type]
    elif op == "moe_low_latency_dispatch":
        call = moe_low_latency_dispatch.bind(data, idx, t_max, experts, group=group, use_fp8=fp8)
    elif op == "moe_low_latency_combine":
        ll = moe_low_latency_dispatch.moe_low_latency_dispatch(data, idx, t_max, experts, group=group,
                                                               use_fp8=False, backend=backend)
        call = moe_low_latency_combine.bind(ll.recv_x, idx, w, ll.handle)  # type: ignore[arg-type]
    else:
        raise ValueError(op)
    run = _backend_call(op, backend)
    with probe() as p:
        run(call)
    return _record(p)


OPS = ("moe_dispatch", "moe_combine", "moe_dispatch_expanded", "moe_combine_expanded", "moe_low_latency_dispatch",
       "moe_low_latency_combine")


def measure_all(rank: int, group: Any, device: torch.device, params: dict[str, Any], seed: int = 0,
                backend: str = "torch") -> dict[str, Any]:
    """:func:`measure_op` for every op (the low-latency dispatch with and without FP8), and the cached
    re-dispatch (``"moe_dispatch (cached)"``)."""
    from deepport.kernels import moe_dispatch

    out = {op: measure_op(rank, group, device, op, params, seed, backend) for op in OPS}
    out["moe_low_latency_dispatch (fp8)"] = measure_op(rank, group, device, "moe_low_latency_dispatch",
                                                       {**params, "use_fp8": True}, seed, backend)
    x = _inputs(rank, params, seed)
    first = moe_dispatch.moe_dispatch(x["x"].to(device), x["topk_idx"].to(device), None, int(params["experts"]),
                                      group=group, backend=backend)
    call = moe_dispatch.bind(x["x2"].to(device), handle=first.handle)
    with probe() as p:
        _backend_call("moe_dispatch", backend)(call)
    out["moe_dispatch (cached)"] = _record(p)
    return out


def low_latency_without_sync(rank: int, group: Any, device: torch.device, params: dict[str, Any], seed: int = 0,
                             use_fp8: bool = False) -> dict[str, Any]:
    """The torch backend's low-latency dispatch and combine under ``probe(forbid_syncs=True)`` (the op
    layer's checks, which read values, run outside it); returns the host tensors they built and how
    far (in bf16 steps) the combined rows are from the reference backend's combine of the same handle."""
    from deepport.kernels import moe_low_latency_combine as llc
    from deepport.kernels import moe_low_latency_dispatch as lld

    x = _inputs(rank, params, seed)
    data, idx, w = x["x"].to(device), x["topk_idx"].to(device), x["topk_weights"].to(device)
    call = lld.bind(data, idx, int(params["t_max"]), int(params["experts"]), group=group, use_fp8=use_fp8)
    cuda_check = torch.cuda.set_sync_debug_mode if device.type == "cuda" else (lambda mode: None)
    cuda_check("error")  # on a GPU, CUDA itself refuses any synchronising call too
    try:
        with probe(forbid_syncs=True) as p_dispatch:
            got = _backend_call(lld.OP, "torch")(call)
    finally:
        cuda_check("default")
    y = got.recv_x[0].to(torch.bfloat16) if use_fp8 else got.recv_x
    combine = llc.bind(y, idx, w, got.handle)
    cuda_check("error")
    try:
        with probe(forbid_syncs=True) as p_combine:
            out = _backend_call(llc.OP, "torch")(combine)
    finally:
        cuda_check("default")
    reference = _backend_call(llc.OP, "reference")(combine)  # reads the handle's host fields: lazily synced
    return {"host_tensors": p_dispatch.host_tensors + p_combine.host_tensors,
            "collectives": [c.name for c in p_dispatch.collectives + p_combine.collectives],
            "dtype": str(out.dtype), "bf16_steps_from_reference": bf16_ulps(out, reference)}


def _same(what: str, a: Any, b: Any, bad: list[str]) -> None:
    """Bit-exact equality of tensors (any dtype), tuples of them, or plain values."""
    if isinstance(a, tuple) and isinstance(b, tuple) and a and isinstance(a[0], torch.Tensor):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _same(f"{what}[{i}]", x, y, bad)
        return
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        ok = a.shape == b.shape and a.dtype == b.dtype and torch.equal(
            a.contiguous().view(torch.uint8) if a.element_size() == 1 else a, b.contiguous().view(torch.uint8)
            if b.element_size() == 1 else b)
    else:
        ok = a == b
    if not ok:
        bad.append(f"{what} differs")


def bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in bf16 steps between two bf16 tensors of one shape (sign-magnitude order)."""
    def order(t: torch.Tensor) -> torch.Tensor:
        i = t.contiguous().view(torch.int16).to(torch.int32)
        return torch.where(i < 0, -32768 - i, i)

    return int((order(a) - order(b)).abs().max()) if a.numel() else 0


def _valid_rows(t: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    out = (t.view(torch.uint8) if t.element_size() == 1 else t).contiguous().clone()
    rows = torch.arange(out.shape[1], device=out.device)
    out[rows[None, :] >= count.to(torch.int64)[:, None]] = 0
    return out


def agreement(rank: int, group: Any, device: torch.device, params: dict[str, Any], seed: int = 0) -> list[str]:
    """Every MoE op on the torch and reference backends from the same inputs: routes, counts and moved
    payloads bit for bit, combines within one bf16 step; and each backend's combine driven by the
    other's handle (the low-latency one too, whose host fields the torch backend fills lazily)."""
    import deepport

    p = {**params}
    x = _inputs(rank, p, seed)
    data, idx, w = x["x"].to(device), x["topk_idx"].to(device), x["topk_weights"].to(device)
    payload: Any = (data, x["x_scales"].to(device)) if "x_scales" in x else data
    experts, t_max = int(p["experts"]), int(p.get("t_max", 32))
    bad: list[str] = []
    runs = {b: deepport.moe_dispatch(payload, idx, w, experts, group=group, backend=b) for b in ("torch", "reference")}
    t, r = runs["torch"], runs["reference"]
    for name in ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert"):
        _same(f"dispatch {name}", getattr(t, name), getattr(r, name), bad)
    for name in ("send_counts", "recv_counts", "recv_src_idx", "recv_topk_idx", "num_recv_tokens_per_expert",
                 "is_token_in_rank", "topk_idx"):
        _same(f"dispatch handle.{name}", getattr(t.handle, name), getattr(r.handle, name), bad)
    again: Any = (x["x2"].to(device), x["x2_scales"].to(device)) if "x2_scales" in x else x["x2"].to(device)
    _same("cached dispatch", deepport.moe_dispatch(again, handle=t.handle, backend="torch").recv_x,
          deepport.moe_dispatch(again, handle=r.handle, backend="reference").recv_x, bad)
    if "x_scales" not in x:
        combined = {(b, h): deepport.moe_combine(run.recv_x, run.handle, run.recv_topk_weights, backend=b)  # type: ignore[arg-type]
                    for b in ("torch", "reference") for h, run in runs.items()}
        for (b, h), c in combined.items():
            if bf16_ulps(c.combined_x, combined[("reference", "reference")].combined_x) > 1:
                bad.append(f"combine on {b} with the {h} handle: more than one bf16 step off")
            _same(f"combine weights on {b} with the {h} handle", c.combined_topk_weights,
                  combined[("reference", "reference")].combined_topk_weights, bad)
    align = int(p.get("alignment", 4))
    ex = {b: deepport.moe_dispatch_expanded(payload, idx, w, experts, group=group, expert_alignment=align, backend=b)
          for b in ("torch", "reference")}
    for name in ("recv_x", "m_indices", "recv_weights", "num_recv_tokens_per_expert"):
        _same(f"expanded {name}", getattr(ex["torch"], name), getattr(ex["reference"], name), bad)
    _same("expanded handle.expanded_src_row", ex["torch"].handle.expanded_src_row,
          ex["reference"].handle.expanded_src_row, bad)
    if "x_scales" not in x:
        ys = {h: e.recv_x.clone() for h, e in ex.items()}  # type: ignore[union-attr]
        for h, y in ys.items():
            y[ex[h].m_indices < 0] = float("nan")
        outs = {(b, h): deepport.moe_combine_expanded(ys[h], ex[h].handle, backend=b)
                for b in ("torch", "reference") for h in ex}
        for key, out in outs.items():
            if bf16_ulps(out, outs[("reference", "reference")]) > 1:
                bad.append(f"expanded combine {key}: more than one bf16 step off")
    for fp8 in (() if "x_scales" in x else (False, True)):  # the low-latency dispatch takes bf16 (and casts)
        ll = {b: deepport.moe_low_latency_dispatch(data, idx, t_max, experts, group=group, use_fp8=fp8, backend=b)
              for b in ("torch", "reference")}
        count = ll["reference"].recv_count
        _same(f"low-latency fp8={fp8} recv_count", ll["torch"].recv_count, count, bad)
        got, ref = ll["torch"].recv_x, ll["reference"].recv_x
        if fp8:  # the cast rounds float32 vs float64 products: judged by the suite, not here
            _same("low-latency fp8 packed_src_row", ll["torch"].handle.packed_src_row,
                  ll["reference"].handle.packed_src_row, bad)
            continue
        _same("low-latency recv_x (valid rows)", _valid_rows(got, count), _valid_rows(ref, count), bad)  # type: ignore[arg-type]
        _same("low-latency packed_src_row", ll["torch"].handle.packed_src_row, ll["reference"].handle.packed_src_row,
              bad)
        for name in ("send_counts", "recv_counts", "recv_src_idx", "recv_topk_idx", "num_recv_tokens_per_expert"):
            _same(f"low-latency handle.routes.{name}", getattr(ll["torch"].handle.routes, name),
                  getattr(ll["reference"].handle.routes, name), bad)
        ys = {}
        for h, run in ll.items():
            y = run.recv_x.clone()  # type: ignore[union-attr]
            rows = torch.arange(y.shape[1], device=y.device)
            y[rows[None, :] >= run.recv_count.to(torch.int64)[:, None]] = float("nan")
            ys[h] = y
        outs_ll = {(b, h): deepport.moe_low_latency_combine(ys[h], idx, w, ll[h].handle, backend=b)
                   for b in ("torch", "reference") for h in ll}
        for key, out in outs_ll.items():
            if bf16_ulps(out, outs_ll[("reference", "reference")]) > 1:
                bad.append(f"low-latency combine {key}: more than one bf16 step off")
    return bad


def nothing_routed(rank: int, group: Any, device: torch.device, params: dict[str, Any], seed: int = 0) -> list[str]:
    """Every op on the torch backend when no token of any rank selects an expert: nothing moves, every
    count is 0, combines give 0. (The reference backend cannot run this world: ``moe_args.dense``
    returns empty tensors with numpy's zero strides, which its gather cannot view as bytes.)"""
    import deepport

    x = _inputs(rank, {**params, "nowhere": 1.0}, seed)
    data, idx, w = x["x"].to(device), x["topk_idx"].to(device), x["topk_weights"].to(device)
    experts, t, bad = int(params["experts"]), int(data.shape[0]), []
    d = deepport.moe_dispatch(data, idx, w, experts, group=group, backend="torch")
    if d.recv_topk_idx is None or d.recv_topk_idx.shape[0] != 0 or any(d.num_recv_tokens_per_expert or [1]):
        bad.append("dispatch received something")
    c = deepport.moe_combine(d.recv_x, d.handle, d.recv_topk_weights, backend="torch")  # type: ignore[arg-type]
    if c.combined_x.shape != (t, data.shape[1]) or bool(c.combined_x.ne(0).any()):
        bad.append("combine is not all zeros")
    e = deepport.moe_dispatch_expanded(data, idx, w, experts, group=group, backend="torch")
    if e.m_indices.numel() or any(e.num_recv_tokens_per_expert):
        bad.append("expanded dispatch received something")
    if bool(deepport.moe_combine_expanded(e.recv_x, e.handle, backend="torch").ne(0).any()):  # type: ignore[arg-type]
        bad.append("expanded combine is not all zeros")
    ll = deepport.moe_low_latency_dispatch(data, idx, int(params["t_max"]), experts, group=group, use_fp8=False,
                                           backend="torch")
    if bool(ll.recv_count.ne(0).any()) or ll.handle.routes.num_recv != 0:
        bad.append("low-latency dispatch received something")
    out = deepport.moe_low_latency_combine(ll.recv_x, idx, w, ll.handle, backend="torch")  # type: ignore[arg-type]
    if bool(out.ne(0).any()):
        bad.append("low-latency combine is not all zeros")
    return bad


def optional_steps(rank: int, group: Any, device: torch.device, params: dict[str, Any], seed: int = 0,
                   into: bool = False) -> dict[str, Any]:
    """The normal and expanded ops with a :class:`LocalSteps` that has ``take_rows`` (``take_rows_into`` with
    ``into``) and ``sum_rows`` (torch functions, counted): which steps ran, and the bf16 steps / bit
    differences from the plain torch steps."""
    from deepport.backends.torch import moe_layouts, moe_routes
    from deepport.backends.torch.moe_local import TORCH, LocalSteps, sum_rows
    from deepport.kernels import moe_combine, moe_combine_expanded, moe_dispatch, moe_dispatch_expanded

    used: Counter[str] = Counter()

    def take(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        used["take_rows"] += 1
        return x[index]

    def total(rows: torch.Tensor, dst: torch.Tensor, n: int) -> torch.Tensor:
        used["sum_rows"] += 1
        return sum_rows(rows, dst, n)

    def take_into(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> None:
        used["take_rows_into"] += 1
        assert x.dtype == out.dtype, (x.dtype, out.dtype)  # handed integer views of one type
        out.copy_(x[index])

    steps = LocalSteps(TORCH.place_rows, TORCH.weighted_rows, TORCH.cast_fp8, sum_rows=total,
                       **({"take_rows_into": take_into} if into else {"take_rows": take}))
    x = _inputs(rank, params, seed)
    data, idx, w = x["x"].to(device), x["topk_idx"].to(device), x["topk_weights"].to(device)
    experts, bad, steps_off = int(params["experts"]), [], 0
    got = {name: moe_routes.dispatch(moe_dispatch.bind(data, idx, w, experts, group=group), local)
           for name, local in (("torch", TORCH), ("steps", steps))}
    _same("dispatch recv_x", got["torch"].recv_x, got["steps"].recv_x, bad)
    for weighted in (False, True):
        out = [moe_routes.combine(moe_combine.bind(d.recv_x, d.handle,  # type: ignore[arg-type]
                                                   d.recv_topk_weights if weighted else None), local)
               for d, local in ((got["torch"], TORCH), (got["steps"], steps))]
        steps_off = max(steps_off, bf16_ulps(out[0].combined_x, out[1].combined_x))
        if weighted and not torch.allclose(out[0].combined_topk_weights, out[1].combined_topk_weights):  # type: ignore[arg-type]
            bad.append("combined weights differ")
    for k in (int(idx.shape[1]), 1):  # top-1: the expanded combine's single-row path
        top, top_w = idx[:, :k].contiguous(), w[:, :k].contiguous()
        exp = [moe_layouts.dispatch_expanded(moe_dispatch_expanded.bind(data, top, top_w, experts, group=group), local)
               for local in (TORCH, steps)]
        _same("expanded recv_x", exp[0].recv_x, exp[1].recv_x, bad)
        back = [moe_layouts.combine_expanded(moe_combine_expanded.bind(e.recv_x, e.handle), local)  # type: ignore[arg-type]
                for e, local in zip(exp, (TORCH, steps), strict=True)]
        steps_off = max(steps_off, bf16_ulps(back[0], back[1]))
    return {"used": dict(used), "bad": bad, "bf16_steps": steps_off}


@contextlib.contextmanager
def counting_all_to_all(used: Counter[str]) -> Iterator[None]:
    """Inside, each ``torch.distributed.all_to_all_single`` call adds one to ``used["all_to_all_single"]``."""
    original = dist.all_to_all_single
    dist.all_to_all_single = _counted(used, "all_to_all_single", original)  # type: ignore[assignment]
    try:
        yield
    finally:
        dist.all_to_all_single = original


def _counted(used: Counter[str], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, counting its calls in ``used[name]``."""
    def run(*args: Any, **kwargs: Any) -> Any:
        used[name] += 1
        return fn(*args, **kwargs)
    return run


def _early_counted(used: Counter[str], fn: Callable[..., Any]) -> Callable[..., Any]:
    """``rows_to_blocks``, counting in ``used["rows_to_blocks before the read"]`` the calls made before the
    dispatch's outputs exist (no ``outs``: the early send into the collective's send buffer)."""
    def run(*args: Any) -> Any:
        if args[9] is None:
            used["rows_to_blocks before the read"] += 1
        return fn(*args)
    return run


def low_latency_steps(rank: int, group: Any, device: torch.device, params: dict[str, Any],
                      seed: int = 0) -> dict[str, Any]:
    """The multi-rank low-latency ops with the triton backend's steps (the sender's routes, meta and FP8-cast
    rows in one kernel, also with the torch sender in front of triton's receiver; the receiver's routes kernel,
    source-side placement, the combine's sender and receiver terms and per-slot partial sums) against the
    torch steps on the same group: every route field and count bit for bit, the received rows and
    ``packed_src_row`` too, combines bit for bit from either handle (same terms, same order). Which
    optional steps ran is counted."""
    from deepport.backends.torch import moe_low_latency as ll
    from deepport.backends.torch.moe_local import TORCH
    from deepport.backends.triton.moe_permute import TRITON
    from deepport.kernels import moe_low_latency_combine, moe_low_latency_dispatch

    used: Counter[str] = Counter()
    counted = functools.partial(_counted, used)

    assert TRITON.low_latency_receive is not None and TRITON.scatter_rows is not None
    assert TRITON.scatter_row_pair is not None
    assert TRITON.token_rows_into is not None and TRITON.low_latency_send_rows is not None
    assert TRITON.low_latency_return is not None and TRITON.low_latency_pairs is not None
    steps = dataclasses.replace(TRITON, low_latency_receive=counted("low_latency_receive", TRITON.low_latency_receive),
                                scatter_rows=counted("scatter_rows", TRITON.scatter_rows),
                                scatter_row_pair=counted("scatter_row_pair", TRITON.scatter_row_pair),
                                token_rows_into=counted("token_rows_into", TRITON.token_rows_into),
                                low_latency_send_rows=counted("low_latency_send_rows", TRITON.low_latency_send_rows),
                                low_latency_return=counted("low_latency_return", TRITON.low_latency_return),
                                low_latency_pairs=counted("low_latency_pairs", TRITON.low_latency_pairs))
    unfused = dataclasses.replace(steps, low_latency_send_rows=None)  # the torch sender, triton's receiver
    x = _inputs(rank, params, seed)
    data, idx, w = x["x"].to(device), x["topk_idx"].to(device), x["topk_weights"].to(device)
    experts, t_max, bad = int(params["experts"]), int(params.get("t_max", 32)), []
    for fp8 in (False, True):
        got = {name: ll.dispatch_low_latency(moe_low_latency_dispatch.bind(data, idx, t_max, experts, group=group,
                                                                            use_fp8=fp8), local)
               for name, local in (("torch", TORCH), ("triton", steps), ("unfused", unfused))}
        a = got["torch"]
        fa = ll.fixed_routes(a.handle)
        for variant in ("triton", "unfused"):
            b, tag = got[variant], f"{variant} fp8={fp8}"
            _same(f"{tag} recv_count", b.recv_count, a.recv_count, bad)
            _same(f"{tag} handle.recv_count", b.handle.recv_count, a.handle.recv_count, bad)
            _same(f"{tag} handle.topk_idx", b.handle.topk_idx, a.handle.topk_idx, bad)
            fb = ll.fixed_routes(b.handle)
            for name in ("send_slot", "recv_token", "recv_local", "pair_valid", "count"):
                _same(f"{tag} routes.{name}", getattr(fb, name), getattr(fa, name), bad)
            _same(f"{tag} is_token_in_rank", b.handle.routes.is_token_in_rank, a.handle.routes.is_token_in_rank, bad)
            _same(f"{tag} routes.pair_position (valid pairs)", fb.pair_position[fa.pair_valid],
                  fa.pair_position[fa.pair_valid], bad)
            _same(f"{tag} packed_src_row", b.handle.packed_src_row, a.handle.packed_src_row, bad)
            parts = [(b.recv_x, a.recv_x)] if not fp8 else list(zip(b.recv_x, a.recv_x, strict=True))  # type: ignore[arg-type]
            for i, (gb, ga) in enumerate(parts):
                _same(f"{tag} recv_x[{i}] (valid rows)", _valid_rows(gb, a.recv_count), _valid_rows(ga, a.recv_count),
                      bad)
        del got["unfused"]
        if fp8:
            continue
        y = a.recv_x.clone()  # type: ignore[union-attr]
        rows = torch.arange(y.shape[1], device=y.device)
        y[rows[None, :] >= a.recv_count.to(torch.int64)[:, None]] = float("nan")  # never read
        outs = {(s, h): ll.combine_low_latency(moe_low_latency_combine.bind(y, idx, w, got[h].handle), local)
                for s, local in (("torch", TORCH), ("triton", steps)) for h in got}
        for key, out in outs.items():
            if bf16_ulps(out, outs[("torch", "torch")]) > 1:
                bad.append(f"combine {key}: more than one bf16 step off")
        _same("triton combine, either handle", outs[("triton", "torch")], outs[("triton", "triton")], bad)
    return {"bad": bad, "used": dict(used)}


def normal_token_rows(rank: int, group: Any, device: torch.device, params: dict[str, Any],
                      seed: int = 0) -> dict[str, Any]:
    """The normal dispatch with the triton backend's steps (its routing counts in one kernel, as the count table
    or as counts; staged with the early send and without it, or packed by index; its routing up to the read in one
    step, ``route_prelude``, three calls) against the torch steps bit for bit; the normal combine (no weights)
    with them: each token's returned rows summed by ``token_rows_into`` straight into the bf16 output, against
    the same steps without it (``sum_rows``, then a copy) bit for bit, and within one bf16 step of the torch
    steps; which step ran is counted."""
    import dataclasses

    from deepport.backends.torch import moe_routes
    from deepport.backends.torch.moe_local import TORCH
    from deepport.backends.triton.moe_routes import ROUTES
    from deepport.kernels import moe_combine, moe_dispatch

    used: Counter[str] = Counter()
    counted = functools.partial(_counted, used)

    assert ROUTES.token_rows_into is not None and ROUTES.sum_rows is not None and ROUTES.layout_counts is not None
    assert ROUTES.layout_table is not None and ROUTES.rows_to_blocks is not None and ROUTES.rank_rows_at is not None
    fused = dataclasses.replace(ROUTES, route_prelude=None,  # step by step: the prelude runs below, apart
                                token_rows_into=counted("token_rows_into", ROUTES.token_rows_into),
                                sum_rows=counted("sum_rows", ROUTES.sum_rows),
                                layout_counts=counted("layout_counts", ROUTES.layout_counts),
                                layout_table=counted("layout_table", ROUTES.layout_table),
                                rows_to_blocks=counted("rows_to_blocks", _early_counted(used, ROUTES.rows_to_blocks)),
                                rank_rows_at=counted("rank_rows_at", ROUTES.rank_rows_at))
    counts_only = dataclasses.replace(fused, layout_table=None)  # the counts without the table: torch builds it
    gathered = dataclasses.replace(fused, rows_to_blocks=None)  # packed by index, not straight into the send buffer
    by_table = dataclasses.replace(fused, rank_rows_at=None)  # the combine's per-token table, not the staged sum
    plain = dataclasses.replace(ROUTES, token_rows_into=None, rank_rows_at=None)
    assert ROUTES.route_prelude is not None
    route_prelude = ROUTES.route_prelude

    def prelude_taken(*args: Any) -> Any:
        found = route_prelude(*args)
        if found is not None:
            used["route_prelude"] += 1
            if found.sent is not None:  # the others' rows stored in the step too (the packed wire)
                used["rows stored in route_prelude"] += 1
        return found

    assert ROUTES.finish_sent is not None
    finish_sent = ROUTES.finish_sent

    def finish_taken(*args: Any) -> bool:
        ran = finish_sent(*args)
        if ran:  # the own rows and the copy out in one step after that store
            used["finish_sent"] += 1
        return ran

    prelude = dataclasses.replace(ROUTES, route_prelude=prelude_taken, finish_sent=finish_taken)
    x = _inputs(rank, params, seed)
    data, idx, w = x["x"].to(device), x["topk_idx"].to(device), x["topk_weights"].to(device)
    bad: list[str] = []
    wire = params.get("wire")  # DEEPPORT_MOE_WIRE for the staged runs: "split" (the default) or "packed"
    saved = os.environ.get(moe_routes.WIRE_ENV)
    bound = moe_routes.EARLY_SEND_BYTES
    original = dist.batch_isend_irecv
    dist.batch_isend_irecv = _counted(used, "batch_isend_irecv", original)  # type: ignore[assignment]
    if wire is not None:
        os.environ[moe_routes.WIRE_ENV] = wire
    try:
        got, mine, by_counts, by_index = (
            moe_routes.dispatch(moe_dispatch.bind(data, idx, w, int(params["experts"]), group=group), steps)
            for steps in (TORCH, fused, counts_only, gathered))
        moe_routes.EARLY_SEND_BYTES = 0  # the staged order without the early send: every row stored after the read
        late = moe_routes.dispatch(moe_dispatch.bind(data, idx, w, int(params["experts"]), group=group), counts_only)
        moe_routes.EARLY_SEND_BYTES = bound
        # the routing up to the read in one step (on a GPU a CUDA graph: eager, captured, replayed; on CPU its
        # eager record, made to apply here), then the staged exchange
        from deepport.backends.triton import moe_route_graph

        applies = moe_route_graph.collective_prelude
        moe_route_graph.collective_prelude = lambda d: True  # type: ignore[assignment]
        try:
            stepped = [moe_routes.dispatch(moe_dispatch.bind(data, idx, w, int(params["experts"]), group=group),
                                           prelude) for _ in range(3)]
        finally:
            moe_route_graph.collective_prelude = applies  # type: ignore[assignment]
    finally:
        moe_routes.EARLY_SEND_BYTES = bound
        dist.batch_isend_irecv = original  # type: ignore[assignment]
        if saved is None:
            os.environ.pop(moe_routes.WIRE_ENV, None)
        else:
            os.environ[moe_routes.WIRE_ENV] = saved
    for how, ran in (("layout_table", mine), ("layout_counts", by_counts), ("gathered", by_index),
                     ("sent after the read", late), *((f"prelude, call {i}", r) for i, r in enumerate(stepped))):
        for name in ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert"):
            _same(f"dispatch {name} ({how})", getattr(ran, name), getattr(got, name), bad)
        for name in ("send_counts", "recv_counts", "recv_src_idx", "is_token_in_rank"):
            _same(f"dispatch handle.{name} ({how})", getattr(ran.handle, name), getattr(got.handle, name), bad)
    y = torch.randn(tuple(got.recv_x.shape), generator=torch.Generator().manual_seed(seed + rank))  # type: ignore[union-attr]
    y = y.to(torch.bfloat16).to(device)
    out = {name: moe_routes.combine(moe_combine.bind(y, got.handle), steps).combined_x
           for name, steps in (("fused", fused), ("table", by_table), ("plain", plain), ("torch", TORCH))}
    _same("combine staged (rank_rows_at where it applies) vs sum_rows", out["fused"], out["plain"], bad)
    _same("combine with token_rows_into vs sum_rows", out["table"], out["plain"], bad)
    if bf16_ulps(out["fused"], out["torch"]) > 1:
        bad.append("combine more than one bf16 step from the torch steps")
    return {"bad": bad, "used": dict(used)}


def staged_window(rank: int, group: Any, device: torch.device, ranks: int) -> list[str]:
    """``moe_comm.staged_rows_window`` on every rank: rank ``s`` sends rank ``r`` ``(s + 2 * r) % 3`` rows of 16
    bytes (none to itself), each byte naming ``s``, ``r`` and its row; written into the send parts, begun twice
    (one collective), received, released. Returns what is wrong: a part that should be None or is not, sizes,
    the bytes that arrived, collectives counted."""
    from deepport.backends.torch import moe_comm
    from deepport.kernels.moe_args import MoEGroup

    def rows(s: int, r: int) -> int:
        return 0 if s == r else (s + 2 * r) % 3

    def pattern(s: int, r: int) -> torch.Tensor:
        n = rows(s, r)
        return (torch.arange(n * 16, dtype=torch.int64).view(n, 16) + 50 * s + 7 * r).to(torch.uint8)

    world = ranks
    grp = MoEGroup(group, rank, world, "gloo")
    bad: list[str] = []
    used: Counter[str] = Counter()
    with counting_all_to_all(used):
        window = moe_comm.staged_rows_window([16 * rows(rank, r) for r in range(world)],
                                             [16 * rows(s, rank) for s in range(world)], device, grp, "test")
        for r, part in enumerate(window.send):
            if (part is None) != (rows(rank, r) == 0):
                bad.append(f"send part {r}: {'None' if part is None else 'a tensor'} for {rows(rank, r)} rows")
            elif part is not None:
                part.copy_(pattern(rank, r).view(-1))
        assert window.begin is not None
        window.begin()
        window.begin()  # starts nothing more
        got = window.receive()
        for s, part in enumerate(got):
            if (part is None) != (rows(s, rank) == 0):
                bad.append(f"receive part {s}: {'None' if part is None else 'a tensor'} for {rows(s, rank)} rows")
            elif part is not None and not torch.equal(part.view(-1, 16), pattern(s, rank)):
                bad.append(f"receive part {s}: other bytes")
        window.release()
    if used["all_to_all_single"] != 1:
        bad.append(f"{used['all_to_all_single']} collectives, expected 1")
    return bad


def stalled_peer(rank: int, group: Any, device: torch.device, timeout_s: float, tokens: tuple[int, ...] = (8, 8),
                 experts: int = 16) -> str:
    """Run on every rank of the rank group: ranks ``0 .. len(tokens) - 1`` make a group whose collectives
    time out after ``timeout_s``; every member but the last dispatches ``tokens[rank]`` tokens on it (0: a
    rank that sends nothing), the last never does. A dispatching rank returns the error it got (or "no
    error"), the last "stayed away", ranks outside the group "not a member"."""
    from datetime import timedelta

    import deepport

    world = len(tokens)
    # every process calls new_group (torch 2.13's use_local_synchronization hangs for a rank set the
    # process group already has), under a generous timeout while connecting, then the short one
    sub = dist.new_group(list(range(world)), timeout=timedelta(seconds=60))
    if rank >= world:
        return "not a member"
    dist.all_reduce(torch.ones(1), group=sub)
    dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s), sub)
    if rank == world - 1:
        return "stayed away"
    x = _inputs(rank, {"world": world, "tokens": tokens, "experts": experts}, 0)
    try:
        deepport.moe_dispatch(x["x"], x["topk_idx"], None, experts, group=sub, backend="torch")
    except Exception as exc:  # the test inspects type and message
        return f"{type(exc).__module__}.{type(exc).__qualname__}: {exc}"
    return "no error"


def main() -> None:
    """Print, per op, the collectives, bytes and host syncs of one call at world 2 and 4 (gloo)."""
    import sys

    from deepport.conformance.rank_group import rank_group

    backend = sys.argv[1] if len(sys.argv) > 1 else "torch"
    print("| op | world | collectives (rank 0, in order) | bytes sent rank 0 | host syncs rank 0 | host tensors |")
    print("|---|---|---|---|---|---|")
    for world, tokens in ((2, (32, 32)), (4, (32, 0, 32, 16))):
        params = dict(world=world, tokens=tokens, hidden=256, experts=16, topk=4, t_max=32)
        every = rank_group(world, "cpu").run("tests.moe_ep_probe:measure_all", world, params=params,
                                             backend=backend)[0]
        for label, res in every.items():
            names = ", ".join(f"{n}[{'/'.join(d)}]" for n, _, d in res["collectives"])
            sent = sum(b for _, b, _ in res["collectives"])
            syncs = ", ".join(f"{k} x{v}" for k, v in sorted(res["syncs"].items())) or "0"
            print(f"| {label} | {world} | {len(res['collectives'])}: {names} | {sent} | {syncs} | "
                  f"{res['host_tensors']} |")


if __name__ == "__main__":
    main()
