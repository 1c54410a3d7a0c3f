"""The hopper backend's expert-parallel MoE ops: the torch backend's routing over the peer transport.

Every exchange of a dispatch or combine is written straight into the destination GPUs' memory over
NVLink (:mod:`.peer_transport` on :mod:`.peer_memory_cuda`) instead of going through NCCL: no
communicator launch, no count collective for the fixed-size low-latency layout, and a device-side wait
per peer. The routing, the layouts and the per-device steps are the tested torch-backend code
(:mod:`deepport.backends.torch.moe_routes`, :mod:`~deepport.backends.torch.moe_layouts`), with the triton
backend's kernels for the steps where triton runs (for the normal dispatch and combine the triton backend's
own steps of those ops, :func:`normal_steps_for`: over the peer blocks the dispatch is two kernels), so
results are those of the torch and triton backends (the transport only moves bytes).

The peer memory of a group is created on the group's first call (collectively: every rank calls the op)
and kept for the process's life. Environment (read at that first call):

===============================  =========  ==================================================================
variable                         default    meaning
===============================  =========  ==================================================================
``DEEPPORT_PEER_BUFFER_MB``      64         receive block per source rank (MiB). A normal dispatch whose
                                            parts all fit gathers its rows straight into the peers' blocks
                                            (one round; 4096 bf16 tokens of hidden 7168 need 59 MB); larger
                                            exchanges move in chunks of this size
``DEEPPORT_PEER_FIXED_MB``       8          slot per source rank and parity (MiB) of the one-launch fixed
                                            exchange (the low-latency layouts' equal splits); ``0``: off,
                                            larger equal splits: the chunked rounds
``DEEPPORT_PEER_TIMEOUT_S``      group's    seconds a rank waits for a peer before MoECommTimeout (default:
                                            the process group's timeout, else 300)
``DEEPPORT_PEER_MAPPING``        symmetric  how the peers' buffers are mapped: ``symmetric`` (PyTorch
                                            symmetric memory) or ``ipc`` (CUDA IPC handles gathered over the
                                            group, each opened on this rank's own GPU)
``DEEPPORT_MOE_GRAPHS``          1          the normal dispatch's routing and exchange and the normal
                                            combine's work through the blocks replayed as CUDA graphs per
                                            shape (:mod:`deepport.backends.triton.moe_route_graph`,
                                            :mod:`~deepport.backends.triton.moe_sum_graph`; read per call);
                                            ``0``: the same kernels launched one by one
===============================  =========  ==================================================================
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from deepport.backends.hopper.peer_transport import PeerMemory, PeerTransport
from deepport.backends.torch import moe_layouts, moe_routes
from deepport.backends.torch.moe_comm import use_transport
from deepport.backends.torch.moe_local import TORCH, LocalSteps
from deepport.kernels.moe_args import MoEGroup

DEFAULT_BUFFER_MB = 64
DEFAULT_FIXED_MB = 8
DEFAULT_TIMEOUT_S = 300.0
_transports: dict[tuple[str, str], PeerTransport] = {}
_lock = threading.Lock()
R = TypeVar("R")


def group_timeout_s(group: Any, device: torch.device) -> float:
    """``DEEPPORT_PEER_TIMEOUT_S``, else the process group's timeout, else :data:`DEFAULT_TIMEOUT_S`."""
    text = os.environ.get("DEEPPORT_PEER_TIMEOUT_S", "").strip()
    if text:
        value = float(text)
        if value <= 0:
            raise ValueError(f"DEEPPORT_PEER_TIMEOUT_S must be positive, got {text!r}")
        return value
    try:
        return float(group._get_backend(device).options._timeout.total_seconds())
    except (AttributeError, RuntimeError):
        return DEFAULT_TIMEOUT_S


def buffer_bytes() -> int:
    text = os.environ.get("DEEPPORT_PEER_BUFFER_MB", "").strip()
    mb = float(text) if text else DEFAULT_BUFFER_MB
    if mb <= 0:
        raise ValueError(f"DEEPPORT_PEER_BUFFER_MB must be positive, got {text!r}")
    return max(16, int(mb * 2**20) // 16 * 16)


def fixed_bytes() -> int:
    """``DEEPPORT_PEER_FIXED_MB`` in bytes (a multiple of 16; 0 turns the fixed exchange off)."""
    text = os.environ.get("DEEPPORT_PEER_FIXED_MB", "").strip()
    mb = float(text) if text else DEFAULT_FIXED_MB
    if mb < 0:
        raise ValueError(f"DEEPPORT_PEER_FIXED_MB must be 0 or positive, got {text!r}")
    return int(mb * 2**20) // 16 * 16


def peer_mapping() -> str:
    """``DEEPPORT_PEER_MAPPING``: how the peers' buffers are mapped, ``symmetric`` (PyTorch symmetric memory, the
    default) or ``ipc`` (CUDA IPC handles gathered over the group, opened on each rank's own GPU)."""
    from deepport.backends.hopper.peer_memory_cuda import MAPPINGS

    text = os.environ.get("DEEPPORT_PEER_MAPPING", "").strip() or MAPPINGS[0]
    if text not in MAPPINGS:
        raise ValueError(f"DEEPPORT_PEER_MAPPING must be one of {', '.join(MAPPINGS)}, got {text!r}")
    return text


def transport_for(grp: MoEGroup, device: torch.device,
                  make: Callable[..., PeerMemory] | None = None) -> PeerTransport:
    """The group's peer transport on ``device``, created on first use (collective) and then reused."""
    key = (str(grp.group.group_name), str(device))
    with _lock:
        found = _transports.get(key)
        if found is None:
            if make is None:
                from deepport.backends.hopper.peer_memory_cuda import CudaPeerMemory

                make = functools.partial(CudaPeerMemory, mapping=peer_mapping())
            found = _transports[key] = PeerTransport(make(grp.group, device, buffer_bytes(),
                                                          group_timeout_s(grp.group, device),
                                                          fixed_capacity=fixed_bytes()))
    return found


def forget_transports() -> None:
    """Drop every cached transport (tests; the buffers are freed once nothing else holds them)."""
    with _lock:
        _transports.clear()


def steps_for(device: torch.device) -> LocalSteps:
    """The triton backend's per-device steps where triton runs on ``device``, else the torch backend's."""
    from deepport.dispatch import registry

    if device.type != "cuda" or "triton" not in {b.name for b in registry.all_backends()}:
        return TORCH
    if registry.get("triton").unavailable_reason is None:
        from deepport.backends.triton.moe_permute import TRITON

        return TRITON
    return TORCH


def normal_steps_for(device: torch.device) -> LocalSteps:
    """The steps of the normal dispatch and combine: the triton backend's for those two ops (its
    :data:`~deepport.backends.triton.moe_routes.ROUTES`: the row copy, the per-token sums, and over this
    transport's blocks the two-kernel exchange) where triton runs on ``device``, else :func:`steps_for`'s."""
    steps = steps_for(device)
    if steps is TORCH:
        return steps
    from deepport.backends.triton.moe_routes import ROUTES

    return ROUTES


def _run(grp: MoEGroup, device: torch.device, what: str, fn: Callable[[LocalSteps], R],
         steps: Callable[[torch.device], LocalSteps] = steps_for) -> R:
    transport = transport_for(grp, device)
    check = getattr(transport.memory, "raise_if_failed", None)
    if check is not None:
        check(what)
    with use_transport(transport):
        return fn(steps(device))


def dispatch(call: Any) -> Any:
    return _run(call.group, call.data.device, "moe_dispatch", lambda s: moe_routes.dispatch(call, s),
                normal_steps_for)


def combine(call: Any) -> Any:
    return _run(call.group, call.x.device, "moe_combine", lambda s: moe_routes.combine(call, s), normal_steps_for)


def dispatch_expanded(call: Any) -> Any:
    return _run(call.group, call.data.device, "moe_dispatch_expanded",
                lambda s: moe_layouts.dispatch_expanded(call, s))


def combine_expanded(call: Any) -> Any:
    return _run(call.group, call.y.device, "moe_combine_expanded", lambda s: moe_layouts.combine_expanded(call, s))


def dispatch_low_latency(call: Any) -> Any:
    return _run(call.group, call.x.device, "moe_low_latency_dispatch",
                lambda s: moe_layouts.dispatch_low_latency(call, s))


def combine_low_latency(call: Any) -> Any:
    return _run(call.group, call.y.device, "moe_low_latency_combine",
                lambda s: moe_layouts.combine_low_latency(call, s))
