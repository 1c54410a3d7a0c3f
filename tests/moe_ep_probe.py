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
import functools
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


def main() -> None:
    """Print, per op, the collectives, bytes and host syncs of one call at world 2 and 4 (gloo)."""
    import sys

    from deepport.conformance.rank_group import rank_group

    backend = sys.argv[1] if len(sys.argv) > 1 else "torch"
    ops = ("moe_dispatch", "moe_combine", "moe_dispatch_expanded", "moe_combine_expanded",
           "moe_low_latency_dispatch", "moe_low_latency_combine")
    print("| op | world | collectives (rank 0, in order) | bytes sent rank 0 | host syncs rank 0 | host tensors |")
    print("|---|---|---|---|---|---|")
    for world, tokens in ((2, (32, 32)), (4, (32, 0, 32, 16))):
        for op in ops:
            for fp8 in ((False, True) if op == "moe_low_latency_dispatch" else (False,)):
                params = dict(world=world, tokens=tokens, hidden=256, experts=16, topk=4, t_max=32, use_fp8=fp8)
                res = rank_group(world, "cpu").run("tests.moe_ep_probe:measure_op", world, op=op, params=params,
                                                   backend=backend)[0]
                names = ", ".join(f"{n}[{'/'.join(d)}]" for n, _, d in res["collectives"])
                sent = sum(b for _, b, _ in res["collectives"])
                syncs = ", ".join(f"{k} x{v}" for k, v in sorted(res["syncs"].items())) or "0"
                label = op + (" (fp8)" if fp8 else "")
                print(f"| {label} | {world} | {len(res['collectives'])}: {names} | {sent} | {syncs} | "
                      f"{res['host_tensors']} |")


if __name__ == "__main__":
    main()
