"""Boundary checks shared by the op modules. Each raises with the argument's name, expected and got."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from deepport.errors import ArgumentTypeError, InvalidArgumentError

INT32_MAX = 2**31 - 1
"""Largest count an int32 index or count tensor can hold (block ids, lengths, per-expert counts)."""


def expect_tensor(name: str, value: object) -> torch.Tensor:
    if type(value) is not torch.Tensor and not isinstance(value, torch.Tensor):
        raise ArgumentTypeError(name, f"expected a torch.Tensor, got {type(value).__name__}")
    return value


def expect_dtype(name: str, t: torch.Tensor, allowed: Collection[torch.dtype]) -> None:
    if t.dtype not in allowed:
        want = " or ".join(str(d) for d in allowed)
        raise ArgumentTypeError(name, f"expected dtype {want}, got {t.dtype}")


def expect_ndim(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if t.dim() != ndim:
        raise InvalidArgumentError(
            name, f"expected {ndim} dimensions {layout}, got {t.dim()} with shape {tuple(t.shape)}"
        )


def expect_dim(name: str, t: torch.Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise InvalidArgumentError(
            name, f"expected size {expected} ({what}) in dimension {dim}, got shape {tuple(t.shape)}"
        )


def expect_shape(name: str, t: torch.Tensor, shape: Sequence[int], layout: str) -> None:
    if tuple(t.shape) != tuple(shape):
        raise InvalidArgumentError(name, f"expected shape {tuple(shape)} {layout}, got {tuple(t.shape)}")


def expect_positive(name: str, t: torch.Tensor, dim: int, what: str) -> None:
    if t.shape[dim] <= 0:
        raise InvalidArgumentError(name, f"{what} (dimension {dim}) must be > 0, got shape {tuple(t.shape)}")


def expect_same_device(name: str, t: torch.Tensor, device: torch.device, anchor: str) -> None:
    if t.device != device:
        raise InvalidArgumentError(name, f"expected device {device} (the device of `{anchor}`), got {t.device}")


def expect_last_dim_contiguous(name: str, t: torch.Tensor) -> None:
    if t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise InvalidArgumentError(
            name, f"expected the last dimension to be contiguous (stride 1), got strides {t.stride()}"
        )


def expect_contiguous(name: str, t: torch.Tensor) -> None:
    if not t.is_contiguous():
        raise InvalidArgumentError(
            name, f"expected a contiguous tensor, got shape {tuple(t.shape)} with strides {t.stride()}"
        )


def expect_data(name: str, t: torch.Tensor) -> None:
    """A tensor whose values are read (index checks) or written (by a backend): not a ``meta`` tensor,
    which has a shape and a dtype but no data. Called after the shape checks, so the op layer still
    validates the shapes of a call made of meta tensors before refusing to run it."""
    if t.device.type == "meta":
        raise InvalidArgumentError(name, f"expected a tensor with data, got a tensor on the meta device (shape "
                                   f"{tuple(t.shape)}, no values to read or write)")


def expect_int(name: str, value: object, *, minimum: int | None = None, maximum: int | None = None,
               why: str = "") -> int:
    """A Python int (not bool) in ``[minimum, maximum]``; ``why`` says where ``maximum`` comes from."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(name, f"expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise InvalidArgumentError(name, f"expected an int >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise InvalidArgumentError(name, f"expected an int <= {maximum}{f' ({why})' if why else ''}, got {value}")
    return value


def expect_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(name, f"expected a bool, got {type(value).__name__}")
    return value


def _byte_span(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last)`` bytes a tensor can touch (its strided extent; exact for contiguous tensors)."""
    ptr, numel = t.data_ptr(), t.numel()
    if numel == 0:
        return ptr, ptr
    if t.is_contiguous():  # the common case, without a Python loop over the dimensions
        return ptr, ptr + numel * t.element_size()
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    return ptr, ptr + extent * t.element_size()


def expect_no_overlap(name: str, t: torch.Tensor, others: dict[str, torch.Tensor]) -> None:
    """An output must not share memory with an input or another output (it would be read while written)."""
    if t.device.type == "meta":  # no memory to share (every meta tensor reports address 0)
        return
    first, last = _byte_span(t)
    for other_name, other in others.items():
        if other.device != t.device:
            continue
        o_first, o_last = _byte_span(other)
        if first < o_last and o_first < last:
            raise InvalidArgumentError(name, f"expected memory disjoint from `{other_name}`, got overlapping "
                                       f"byte ranges [{first:#x}, {last:#x}) and [{o_first:#x}, {o_last:#x})")
