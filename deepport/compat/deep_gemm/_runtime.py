"""DeepGEMM's run-time knobs: the SM budget and the contiguous-layout alignment.

deepport's backends pick their own launch grids, so the SM budget is recorded and reported back
(``get_num_sms``) but no backend reads it. The M alignment of the contiguous layout is 128 in
deepport's grouped op (DeepGEMM's SM90 value); other values are rejected rather than ignored, since
they would change which ``grouped_layout`` is valid.
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
