"""DeepGEMM's run-time knobs: the SM budget, the contiguous-layout alignment and the JIT tuning hints.

deepport's backends pick their own launch grids, so the SM budget is recorded and reported back
(``get_num_sms``) but no backend reads it; likewise the tuning hints of DeepGEMM's JIT heuristics
(``set_tc_util``, ``set_pdl``, ``set_ignore_compile_dims``, ``set_block_size_multiple_of``): each is
checked as DeepGEMM checks it, recorded, and has no effect on any result (nor did it upstream).
The M alignment of the contiguous layout is 128 in deepport's grouped op (DeepGEMM's SM90 value);
other values are rejected rather than ignored, since they would change which ``grouped_layout`` is
valid.
"""

from __future__ import annotations

import torch

from deepport.dispatch import device_info
from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels.fp8_layout import get_mk_alignment_for_contiguous_layout

_num_sms: int | None = None


def _device_units() -> int:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return device_info(device).multiprocessors


def set_num_sms(num_sms: int) -> None:
    """Record the SM budget for GEMM kernels (``0 < num_sms <`` the device's SMs; CPU: its cores).
    No deepport backend reads it (they choose their own grids)."""
    units = _device_units()
    value = chk.expect_int("num_sms", num_sms, minimum=1)
    if value > units:
        raise InvalidArgumentError("num_sms", f"expected at most the device's {units} units, got {value}")
    global _num_sms
    _num_sms = value


def get_num_sms() -> int:
    """The budget set by :func:`set_num_sms`, else the current device's SM count (CPU: cores)."""
    return _device_units() if _num_sms is None else _num_sms


def get_theoretical_mk_alignment_for_contiguous_layout(expected_m: int | None = None) -> int:
    """The alignment deepport's contiguous layout uses whatever ``expected_m`` is: 128."""
    return get_mk_alignment_for_contiguous_layout()


def set_mk_alignment_for_contiguous_layout(alignment: int) -> None:
    """Accepts 128, deepport's fixed alignment (DeepGEMM's SM90 value); raises for any other value."""
    value = chk.expect_int("alignment", alignment, minimum=1)
    fixed = get_mk_alignment_for_contiguous_layout()
    if value != fixed:
        raise InvalidArgumentError("alignment", f"expected {fixed}: deepport's grouped GEMM checks group segments "
                                   f"at a fixed alignment of {fixed} rows, got {value}")


# ---- tuning knobs of DeepGEMM's JIT heuristics (2025-09 .. 2026-04): recorded, never read -------------

_tc_util = 0
_pdl = False
_ignore_compile_dims = False
_block_size_multiple_of = (1, 1)


def set_tc_util(new_tc_util: int) -> None:
    """Record the tensor-core utilisation target DeepGEMM's heuristics plan for (``0 <= x <= 100``, 0 meaning
    the default 100). A performance hint: no deepport backend reads it."""
    global _tc_util
    _tc_util = chk.expect_int("new_tc_util", new_tc_util, minimum=0, maximum=100, why="a percentage")


def get_tc_util() -> int:
    """The value of :func:`set_tc_util`, 100 when unset or 0 (DeepGEMM's convention)."""
    return _tc_util or 100


def set_pdl(new_enable_pdl: bool) -> None:
    """Record whether kernels may use programmatic dependent launch (a CUDA launch attribute that only
    overlaps a kernel's prologue with its predecessor's tail; never changes a result). No deepport
    backend reads it."""
    global _pdl
    _pdl = chk.expect_bool("new_enable_pdl", new_enable_pdl)


def get_pdl() -> bool:
    """The value of :func:`set_pdl` (default ``False``, as DeepGEMM)."""
    return _pdl


def set_ignore_compile_dims(new_value: bool) -> None:
    """Record DeepGEMM's switch that makes its JIT ignore ``compiled_dims`` (a compile-time specialisation
    knob; deepport ignores ``compiled_dims`` anyway)."""
    global _ignore_compile_dims
    _ignore_compile_dims = chk.expect_bool("new_value", new_value)


def set_block_size_multiple_of(new_value: int | tuple[int, int]) -> None:
    """Record DeepGEMM's constraint on its tile sizes (one int for BLOCK_M and BLOCK_N, or a pair). Tiles are
    each backend's own choice in deepport; the value is checked (positive ints) and has no effect."""
    pair = new_value if isinstance(new_value, (tuple, list)) else (new_value, new_value)
    if len(pair) != 2:
        raise InvalidArgumentError("new_value", f"expected an int or a pair (block_m, block_n), got {new_value!r}")
    global _block_size_multiple_of
    _block_size_multiple_of = (chk.expect_int("new_value[0]", pair[0], minimum=1),
                               chk.expect_int("new_value[1]", pair[1], minimum=1))
