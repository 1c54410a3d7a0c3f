"""Boundary checks and records shared by the MoE ops (layout, dispatch/combine, expanded, low-latency).

Conventions every MoE op follows:

- ``topk_idx``: int64 or int32 ``[num_tokens, num_topk]``, contiguous; values in ``[-1, num_experts)``,
  ``-1`` = no selection. Experts are partitioned contiguously over the ``world_size`` ranks of the
  group: expert ``e`` lives on rank ``e // num_local_experts`` as local expert
  ``e % num_local_experts`` (``num_local_experts = num_experts // world_size``).
- **Duplicates**: an expert named twice in one token's top-k is reached once. A token counts once per
  rank (DeepEP) and once per expert: per-expert counts, expanded rows and low-latency rows hold one
  row per distinct (token, expert); the weighted combines apply the *sum* of the weights of the slots
  naming that expert. ``recv_topk_idx`` / ``recv_topk_weights`` keep every slot as given.
- ``group``: a ``torch.distributed`` process group (every rank calls the op collectively, with the
  same ``num_experts``, ``hidden``, ``num_topk`` and dtypes), or ``None`` for one process holding all
  experts. NCCL groups need CUDA tensors, gloo groups CPU tensors.
- ``alloc``: optional ``(shape, dtype) -> torch.Tensor`` returning a contiguous tensor on the inputs'
  device; every output tensor of the op is obtained from it (default ``torch.empty``), so a caller
  can pool output memory, or poison it to prove every element is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch

from deepport.dispatch import settings
from deepport.dispatch.device import DeviceInfo, device_info
from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import _checks as chk

FP8 = torch.float8_e4m3fn
FP8_BLOCK = 128  # channels per FP8 scale (1x128 per-token blocks)
TOPK_DTYPES = (torch.int64, torch.int32)

Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]
MoEInput = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

_CallT = TypeVar("_CallT", contravariant=True)
_ResultT = TypeVar("_ResultT", covariant=True)


class MoEImpl(Protocol[_CallT, _ResultT]):
    """How a backend runs a MoE op: ``fn(call) -> result`` (named by ``OpSupport.entry``), one per op:

    ========================  ============================  ===============================
    op                        call                          result
    ========================  ============================  ===============================
    moe_layout                MoELayoutCall                 MoELayout
    moe_dispatch              MoEDispatchCall               MoEDispatchResult
    moe_combine               MoECombineCall                MoECombineResult
    moe_dispatch_expanded     MoEExpandedDispatchCall       MoEExpandedDispatchResult
    moe_combine_expanded      MoEExpandedCombineCall        torch.Tensor (combined_x)
    moe_low_latency_dispatch  MoELowLatencyDispatchCall     MoELowLatencyDispatchResult
    moe_low_latency_combine   MoELowLatencyCombineCall      torch.Tensor (combined_x)
    ========================  ============================  ===============================

    Every output tensor comes from ``call.alloc(shape, dtype)`` (the conformance suite poisons what it
    returns: every element must be written) and the result records hold them (handles included, built
    from the op module's records). Ranks call collectively over ``call.group`` (``None``: one process);
    follow the conventions above (-1 routes select nothing; a duplicate expert counts once). Never modify
    an input.
    """

    def __call__(self, call: _CallT, /) -> _ResultT: ...


@dataclass(frozen=True)
class MoEGroup:
    """The expert-parallel group of a call: ``None`` group means one rank holding every expert."""

    group: Any  # torch.distributed.ProcessGroup | None
    rank: int
    world_size: int
    comm: str  # "none", or the torch.distributed backend name ("gloo", "nccl", ...)


@dataclass(frozen=True)
class MoESignature:
    """What dispatch sees of an MoE call (hashable). ``dtype`` is the payload dtype (bf16, or e4m3
    for an FP8 tuple); ``comm`` is ``"none"`` for a single process."""

    device: DeviceInfo
    dtype: torch.dtype
    hidden: int
    num_topk: int
    num_experts: int
    world_size: int
    comm: str

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return (f"{dt} hidden={self.hidden} top{self.num_topk} of {self.num_experts} experts, "
                f"{self.world_size} rank(s) ({self.comm})")


def resolve_group(group: object, device: torch.device) -> MoEGroup:
    """Validate ``group`` against the device of the call's tensors."""
    if group is None:
        return MoEGroup(None, 0, 1, "none")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise InvalidArgumentError("group", "expected a process group of an initialised torch.distributed, "
                                   "got a group while torch.distributed is not initialised")
    if not isinstance(group, dist.ProcessGroup):
        raise ArgumentTypeError("group", f"expected a torch.distributed.ProcessGroup or None, got "
                                f"{type(group).__name__}")
    comm = str(dist.get_backend(group))
    if comm == "nccl" and device.type != "cuda":
        raise InvalidArgumentError("group", f"expected CUDA tensors for an NCCL group, got tensors on {device}")
    if comm == "gloo" and device.type != "cpu":
        raise InvalidArgumentError("group", f"expected CPU tensors for a gloo group, got tensors on {device}")
    return MoEGroup(group, dist.get_rank(group), dist.get_world_size(group), comm)


def check_num_experts(num_experts: object, world_size: int) -> int:
    n = chk.expect_int("num_experts", num_experts, minimum=1, maximum=chk.INT32_MAX,
                       why="expert ids and per-expert counts are int32: m_indices, num_tokens_per_expert")
    if n % world_size != 0:
        raise InvalidArgumentError("num_experts", f"expected a multiple of the group's world size {world_size} "
                                   f"(experts are split evenly over ranks), got {n}")
    return n


def check_topk_idx(topk_idx: object, num_experts: int, device: torch.device | None = None,
                   num_tokens: int | None = None) -> torch.Tensor:
    """``topk_idx`` int64/int32 ``[num_tokens, num_topk]``, contiguous, ids in ``[-1, num_experts)``."""
    t = chk.expect_tensor("topk_idx", topk_idx)
    chk.expect_dtype("topk_idx", t, TOPK_DTYPES)
    chk.expect_ndim("topk_idx", t, 2, "[num_tokens, num_topk]")
    chk.expect_positive("topk_idx", t, 1, "num_topk")
    if device is not None:
        chk.expect_same_device("topk_idx", t, device, "x")
    if num_tokens is not None:
        chk.expect_dim("topk_idx", t, 0, num_tokens, "num_tokens, the first dimension of `x`")
    chk.expect_contiguous("topk_idx", t)
    if int(t.shape[0]) > chk.INT32_MAX:
        raise InvalidArgumentError("topk_idx", f"expected num_tokens <= {chk.INT32_MAX} (token counts are int32: "
                                   f"num_tokens_per_rank, num_tokens_per_expert, recv_count), got shape "
                                   f"{tuple(t.shape)}")
    chk.expect_data("topk_idx", t)
    if settings.check_values() and t.numel() > 0:
        bad = (t < -1) | (t >= num_experts)
        if bool(bad.any()):
            i, k = (int(v) for v in torch.nonzero(bad)[0])
            raise InvalidArgumentError("topk_idx", f"expected expert ids in [-1, {num_experts}) (-1 = no "
                                       f"selection), got topk_idx[{i}, {k}] = {int(t[i, k])}")
    return t


def check_topk_weights(topk_weights: object, topk_idx: torch.Tensor) -> torch.Tensor:
    w = chk.expect_tensor("topk_weights", topk_weights)
    chk.expect_dtype("topk_weights", w, (torch.float32,))
    chk.expect_shape("topk_weights", w, tuple(topk_idx.shape), "[num_tokens, num_topk], the shape of `topk_idx`")
    chk.expect_same_device("topk_weights", w, topk_idx.device, "topk_idx")
    chk.expect_contiguous("topk_weights", w)
    return w


def check_payload(name: str, x: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` bf16 ``[T, H]`` contiguous, or the FP8 tuple ``(e4m3 [T, H] contiguous, fp32 [T, H/128])``
    (scales any strides); returns ``(data, scales or None)``."""
    if isinstance(x, tuple):
        if len(x) != 2:
            raise ArgumentTypeError(name, f"expected a bf16 tensor or a 2-tuple (e4m3 data, fp32 scales), "
                                    f"got a tuple of {len(x)}")
        data = chk.expect_tensor(f"{name}[0]", x[0])
        chk.expect_dtype(f"{name}[0]", data, (FP8,))
        chk.expect_ndim(f"{name}[0]", data, 2, "[num_tokens, hidden]")
        chk.expect_contiguous(f"{name}[0]", data)
        hidden = int(data.shape[1])
        if hidden % FP8_BLOCK != 0 or hidden == 0:
            raise InvalidArgumentError(f"{name}[0]", f"expected hidden to be a positive multiple of {FP8_BLOCK} "
                                       f"for FP8 payloads, got {hidden}")
        scales = chk.expect_tensor(f"{name}[1]", x[1])
        chk.expect_dtype(f"{name}[1]", scales, (torch.float32,))
        chk.expect_shape(f"{name}[1]", scales, (int(data.shape[0]), hidden // FP8_BLOCK),
                         "[num_tokens, hidden / 128]")
        chk.expect_same_device(f"{name}[1]", scales, data.device, f"{name}[0]")
        return data, scales
    data = chk.expect_tensor(name, x)
    chk.expect_dtype(name, data, (torch.bfloat16,))
    chk.expect_ndim(name, data, 2, "[num_tokens, hidden]")
    chk.expect_positive(name, data, 1, "hidden")
    chk.expect_contiguous(name, data)
    return data, None


def check_alignment(name: str, value: object) -> int:
    return chk.expect_int(name, value, minimum=1, maximum=chk.INT32_MAX,
                          why="an int32 in DeepEP's API; aligned per-expert counts stay int32")


def default_alloc(device: torch.device) -> Alloc:
    def alloc(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    return alloc


def checked_alloc(alloc: Alloc | None, device: torch.device, inputs: Mapping[str, object] | None = None) -> Alloc:
    """The call's allocator; a caller's one is checked on every use (shape, dtype, device, contiguity, and
    memory disjoint from the call's ``inputs`` (tensors, or records holding tensors, e.g. a handle) and from
    every tensor it returned before in this call: an output that aliases an input would be read while
    written). The check runs when a backend asks for the tensor, before anything is written to it."""
    if alloc is None:
        return default_alloc(device)
    if not callable(alloc):
        raise ArgumentTypeError("alloc", f"expected a callable (shape, dtype) -> Tensor or None, got "
                                f"{type(alloc).__name__}")
    taken = {f"{name}{suffix}": t for name, value in (inputs or {}).items() for suffix, t in _tensors_in(value)}
    given = 0

    def wrapped(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nonlocal given
        t = alloc(shape, dtype)
        if (not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype
                or t.device != device or not t.is_contiguous()):
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise InvalidArgumentError("alloc", f"expected a contiguous {dtype} {tuple(shape)} tensor on {device}, "
                                       f"got {got}")
        chk.expect_no_overlap("alloc", t, taken)
        taken[f"output {given} of alloc"] = t
        given += 1
        return t

    return wrapped


def _tensors_in(value: object) -> list[tuple[str, torch.Tensor]]:
    """``(suffix, tensor)`` for a tensor, the tensors of a tuple, or the tensor fields of a (nested) record."""
    if isinstance(value, torch.Tensor):
        return [("", value)]
    if isinstance(value, tuple | list):
        return [(f"[{i}]{s}", t) for i, v in enumerate(value) for s, t in _tensors_in(v)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f".{f.name}{s}", t) for f in dataclasses.fields(value) for s, t in _tensors_in(getattr(value, f.name))]
    return []


def signature(device: torch.device, dtype: torch.dtype, hidden: int, num_topk: int, num_experts: int,
              grp: MoEGroup) -> MoESignature:
    return MoESignature(device_info(device), dtype, hidden, num_topk, num_experts, grp.world_size, grp.comm)


def align_up(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` with standard row-major strides (``contiguous()`` keeps odd strides of size-1 dimensions,
    which a dtype-changing ``view`` rejects)."""
    standard, step = [], 1
    for size in reversed(t.shape):
        standard.append(step)
        step *= int(size)
    if t.numel() == 0 or tuple(reversed(standard)) == t.stride():
        return t
    out = torch.empty(tuple(t.shape), dtype=t.dtype, device=t.device)
    return out.copy_(t)
