"""The FP8 GEMM kernel's single ``__grid_constant__`` parameter, packed on the host.

Mirrors ``struct dp::Params`` of ``kernels/sm90_fp8_gemm.cu``. The compile passes :data:`LAYOUT_DEFINES`
so the kernel's ``static_assert`` checks that both sides agree on the struct's size and the packed size
of its fields (NVRTC has no ``offsetof``; the fields are ordered largest first, so there are no gaps).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

TMAP_BYTES = 128
OFF_SFA = 2 * TMAP_BYTES
OFF_STRIDES = OFF_SFA + 4 * 8
OFF_ROWS = OFF_STRIDES + 8 * 8
USED = OFF_ROWS + 4 * 4  # 368 bytes of fields, no gaps
SIZE = 384  # USED rounded up to the struct's 64-byte alignment
_POINTERS = struct.Struct("<4Q")
_STRIDES = struct.Struct("<8q")
_SIZES = struct.Struct("<4i")

LAYOUT_DEFINES: tuple[str, ...] = (f"-DDP_PARAMS_SIZE={SIZE}", f"-DDP_PARAMS_USED={USED}")


@dataclass(frozen=True)
class GemmParams:
    """Field values of ``dp::Params`` (addresses as ints, strides in elements)."""

    tmap_a: bytes
    tmap_b: bytes
    sfa: int
    sfb: int
    groups: int
    out: int
    sfa_strides: tuple[int, int, int]  # (group, row, k block)
    sfb_strides: tuple[int, int, int]  # (group, 128-row block, k block)
    out_strides: tuple[int, int]  # (group, row)
    rows: int
    n: int
    k: int
    num_groups: int

    def pack(self) -> bytes:
        if len(self.tmap_a) != TMAP_BYTES or len(self.tmap_b) != TMAP_BYTES:
            raise ValueError("tensor maps must be 128 bytes")
        body = (self.tmap_a + self.tmap_b
                + _POINTERS.pack(self.sfa, self.sfb, self.groups, self.out)
                + _STRIDES.pack(*self.sfa_strides, *self.sfb_strides, *self.out_strides)
                + _SIZES.pack(self.rows, self.n, self.k, self.num_groups))
        return body + bytes(SIZE - len(body))
