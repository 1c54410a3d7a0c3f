"""Count the host-side work of one call of each one-process MoE op: aten ops, kernel launches, host syncs.

    PYTHONPATH=$PWD python scripts/moe_call_profile.py                 # this tree
    mkdir /tmp/old && git archive 8aabc5e deepport | tar -x -C /tmp/old  # before the one-process expanded path
    PYTHONPATH=/tmp/old python scripts/moe_call_profile.py            # that tree's deepport, this script

Runs ``moe_dispatch_expanded``, ``moe_combine_expanded``, ``moe_low_latency_dispatch`` (FP8) and
``moe_low_latency_combine`` in one process (``group=None``) on the CPU at a small shape, for the torch
backend and the triton backend (under ``TRITON_INTERPRET=1``, set here before triton is imported when no
GPU is visible), each call under ``torch.profiler``. Only the backend's implementation is profiled: the op
layer's argument checks (which read values unless ``DEEPPORT_CHECK_VALUES=0``) and the dispatch feeding a
combine run outside.

Columns, per call:

- ``aten``: top-level aten ops (ops called by another aten op, e.g. ``aten::copy_`` under ``aten::to``,
  are not counted again; ops inside a triton launch, the interpreter's own, neither).
- ``launches``: the top-level aten ops that run a kernel on a GPU (views, ``empty``, no-op ``to`` /
  ``reshape`` / ``contiguous`` and the host reads left out) plus the triton kernel launches. A few
  aten ops launch more than one kernel (``sort``, ``cumsum`` on large inputs, ``nonzero``); each
  counts once. On a GPU each launch costs about 5-10 us of host time.
- ``triton``: triton kernel launches (a subset of ``launches``).
- ``syncs``: host reads that wait for the device on a GPU: ``tolist``/``numpy`` calls (counted by
  wrapping the methods: on the CPU they run no aten op), ``item``/``int``/``bool`` (``aten::_local_scalar_dense``,
  ``aten::is_nonzero``) and ops whose output size depends on values (``nonzero``, ``masked_select``,
  ``unique``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::view", "aten::_unsafe_view", "aten::as_strided",
    "aten::slice", "aten::select", "aten::expand", "aten::expand_as", "aten::t", "aten::transpose",
    "aten::permute", "aten::unsqueeze", "aten::squeeze", "aten::alias", "aten::detach", "aten::resolve_conj",
    "aten::resolve_neg", "aten::lift_fresh", "aten::narrow", "aten::_reshape_alias", "aten::view_as",
    "aten::result_type", "aten::unbind", "aten::split", "aten::chunk", "aten::item", "aten::_local_scalar_dense",
    "aten::is_nonzero", "aten::numpy_T", "aten::set_", "aten::resize_", "aten::is_same_size",
}
MAYBE_KERNEL = {"aten::to", "aten::reshape", "aten::contiguous", "aten::flatten", "aten::clone_if_needed",
                "aten::type_as", "aten::_to_copy"}
SYNC_OPS = {"aten::_local_scalar_dense": "item", "aten::is_nonzero": "item", "aten::nonzero": "nonzero",
            "aten::masked_select": "masked_select", "aten::unique_consecutive": "unique", "aten::_unique2": "unique",
            "aten::unique_dim": "unique"}
TRITON_KERNELS = ("moe_place_rows_kernel", "moe_weighted_rows_kernel", "moe_cast_fp8_kernel", "moe_layout_count_kernel",
                  "moe_weighted_sum_kernel", "moe_expanded_combine_kernel", "moe_expanded_layout_kernel",
                  "moe_expanded_count_kernel", "moe_expanded_rows_kernel")

_in_kernel = [0]
_host_reads: Counter[str] = Counter()


def _runs_kernel(ev: Any) -> bool:
    if ev.name in NO_KERNEL:
        return False
    if ev.name in MAYBE_KERNEL:
        return any(_runs_kernel(c) for c in ev.cpu_children)
    return True


class _CountedKernel:
    """A triton kernel whose launches show in the profile as one ``triton::<name>`` scope."""

    def __init__(self, name: str, kernel: Any) -> None:
        self.name, self.kernel = name, kernel

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        launch = self.kernel[grid]

        def run(*args: Any, **kwargs: Any) -> Any:
            _in_kernel[0] += 1
            try:
                with record_function(f"triton::{self.name}"):
                    return launch(*args, **kwargs)
            finally:
                _in_kernel[0] -= 1

        return run


@contextlib.contextmanager
def _host_read_counter() -> Iterator[None]:
    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def read(*args: Any, **kwargs: Any) -> Any:
            if not _in_kernel[0]:  # the interpreter's own reads of kernel arguments are not the op's
                _host_reads[name] += 1
            return fn(*args, **kwargs)

        return read

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counted(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def measure(fn: Callable[[], Any]) -> dict[str, Any]:
    """Profile one call of ``fn`` (after one warm-up call) and count as the module docstring says."""
    fn()
    _host_reads.clear()
    with _host_read_counter(), profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    aten, launches, triton = 0, 0, 0
    syncs: Counter[str] = Counter(_host_reads)
    for ev in prof.events():
        if ev.name.startswith("triton::") and ev.cpu_parent is None:
            triton += 1
            continue
        if not ev.name.startswith("aten::"):
            continue
        inside = ev.cpu_parent
        while inside is not None and not inside.name.startswith("triton::"):
            inside = inside.cpu_parent
        if inside is not None:
            continue  # the interpreter's work inside a triton launch
        if ev.name in SYNC_OPS:
            syncs[SYNC_OPS[ev.name]] += 1
        if ev.cpu_parent is None:
            aten += 1
            launches += _runs_kernel(ev)
    return {"aten": aten, "launches": launches + triton, "triton": triton, "syncs": syncs}


def _calls(backend: str, tokens: int, hidden: int, topk: int, experts: int, alignment: int,
           capacity: int) -> dict[str, Callable[[], Any]]:
    from deepport.dispatch import registry
    from deepport.kernels import (
        moe_combine_expanded,
        moe_dispatch_expanded,
        moe_low_latency_combine,
        moe_low_latency_dispatch,
    )

    g = torch.Generator().manual_seed(0)
    scores = torch.rand(tokens, experts, generator=g)
    idx = scores.topk(topk, dim=1).indices
    idx[:, -1] = torch.where(torch.rand(tokens, generator=g) < 0.2, -1, idx[:, -1])  # a few -1 slots
    weights = torch.rand(tokens, topk, generator=g)
    x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    impl = registry.get(backend).implementation

    d_call = moe_dispatch_expanded.bind(x, idx, weights, experts, expert_alignment=alignment)
    sent = impl("moe_dispatch_expanded")(d_call)
    y = torch.randn(int(sent.m_indices.shape[0]), hidden, generator=g).to(torch.bfloat16)
    c_call = moe_combine_expanded.bind(y, sent.handle)
    ld_call = moe_low_latency_dispatch.bind(x, idx, capacity, experts, use_fp8=True)
    low = impl("moe_low_latency_dispatch")(ld_call)
    ly = torch.randn(experts, capacity, hidden, generator=g).to(torch.bfloat16)
    lc_call = moe_low_latency_combine.bind(ly, idx, weights, low.handle)
    return {
        "moe_dispatch_expanded": lambda: impl("moe_dispatch_expanded")(d_call),
        "moe_combine_expanded": lambda: impl("moe_combine_expanded")(c_call),
        "moe_low_latency_dispatch (fp8)": lambda: impl("moe_low_latency_dispatch")(ld_call),
        "moe_low_latency_combine": lambda: impl("moe_low_latency_combine")(lc_call),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["torch", "triton"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--alignment", type=int, default=8)
    args = ap.parse_args()
    if "triton" in args.backends and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton decorates the kernels
    import deepport

    print(f"deepport from {os.path.dirname(deepport.__file__)}; T={args.tokens} hidden={args.hidden} "
          f"top-{args.topk} of {args.experts} experts, expert_alignment {args.alignment}, one process, CPU")
    print(f"{'op':34} {'backend':8} {'aten':>5} {'launches':>9} {'triton':>7} {'syncs':>6}  kinds")
    for backend in args.backends:
        if backend == "triton":
            import importlib

            from deepport.backends.triton import moe_permute

            modules = [moe_permute]
            with contextlib.suppress(ImportError):  # the fused expanded dispatch, where this tree has it
                modules.append(importlib.import_module("deepport.backends.triton.moe_expanded_dispatch"))
            for module in modules:
                for name in TRITON_KERNELS:
                    kernel = getattr(module, name, None)
                    if kernel is not None and not isinstance(kernel, _CountedKernel):
                        setattr(module, name, _CountedKernel(name, kernel))
        calls = _calls(backend, args.tokens, args.hidden, args.topk, args.experts, args.alignment, args.tokens)
        for op, fn in calls.items():
            got = measure(fn)
            kinds = ", ".join(f"{k} {v}" for k, v in sorted(got["syncs"].items())) or "-"
            print(f"{op:34} {backend:8} {got['aten']:5d} {got['launches']:9d} {got['triton']:7d} "
                  f"{sum(got['syncs'].values()):6d}  {kinds}")


if __name__ == "__main__":
    main()
