"""TMA descriptors (``CUtensorMap``) built on the host with the driver's ``cuTensorMapEncodeTiled``.

The MLA decode kernel reads q and the KV cache as 3-D 16-bit tensors in 64-value (128-byte) wide boxes.
The FP8 GEMM reads its operands as 3-D tensors ``{K, rows, groups}`` of bytes (innermost first),
in boxes of ``{128, box_rows, 1}`` with 128-byte swizzling (one 128-byte row per box row, the layout
the wgmma shared-memory descriptors expect). TMA needs a 16-byte aligned base address and row and
group strides that are multiples of 16 bytes; elements outside the tensor read as zero.

Descriptors are cached per (address, shape, strides, box) because encoding costs microseconds of
host time per call; a descriptor holds only these values, so a cached one is exact.
"""

from __future__ import annotations

import ctypes
import functools

TMA_ALIGN = 16
MAX_BOX = 256


class TmaError(RuntimeError):
    """The driver refused to encode a tensor map."""


def tma_compatible(address: int, strides_bytes: tuple[int, ...]) -> bool:
    """Whether a tensor with this base address and outer strides (bytes) can be described for TMA."""
    return address % TMA_ALIGN == 0 and all(s % TMA_ALIGN == 0 and 0 < s < (1 << 40) for s in strides_bytes)


@functools.lru_cache(maxsize=4096)
def tile_map_16bit(address: int, dims: tuple[int, ...], strides_bytes: tuple[int, ...],
                   box: tuple[int, ...]) -> bytes:
    """The 128-byte ``CUtensorMap`` of a 16-bit tensor of rank ``len(dims)`` (2 to 5; ``dims`` innermost
    first, the innermost contiguous, ``strides_bytes`` of the others), read in ``box`` tiles with 128-byte
    swizzling (``box[0]`` must be 64: one 128-byte row per box row)."""
    from cuda.bindings import driver

    rank = len(dims)
    if not 2 <= rank <= 5 or len(box) != rank or len(strides_bytes) != rank - 1:
        raise ValueError(f"rank 2..5 with {rank} box sizes and {rank - 1} strides, got dims={dims}, box={box}, "
                         f"strides={strides_bytes}")
    if box[0] * 2 != 128 or not all(0 < b <= MAX_BOX for b in box):
        raise ValueError(f"16-bit TMA boxes must be 64 values wide and at most {MAX_BOX} per dimension, got {box}")
    u64, u32 = driver.cuuint64_t, driver.cuuint32_t
    result, tmap = driver.cuTensorMapEncodeTiled(
        driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT16,
        rank,
        address,
        [u64(d) for d in dims],
        [u64(s) for s in strides_bytes],
        [u32(b) for b in box],
        [u32(1)] * rank,
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if result != driver.CUresult.CUDA_SUCCESS:
        raise TmaError(f"cuTensorMapEncodeTiled failed ({result.name}) for a 16-bit tensor at {address:#x}, "
                       f"dims={dims}, strides={strides_bytes} bytes, box={box}")
    return ctypes.string_at(tmap.getPtr(), 128)


@functools.lru_cache(maxsize=4096)
def fp8_tile_map(address: int, k: int, rows: int, groups: int, row_stride: int, group_stride: int,
                 box_rows: int) -> bytes:
    """The 128-byte ``CUtensorMap`` of an fp8 tensor ``[groups][rows][K]`` (strides in bytes) read in
    ``128 x box_rows`` K-major boxes with 128-byte swizzling."""
    from cuda.bindings import driver

    if not 0 < box_rows <= MAX_BOX:
        raise ValueError(f"TMA box rows must be in [1, {MAX_BOX}], got {box_rows}")
    u64, u32 = driver.cuuint64_t, driver.cuuint32_t
    result, tmap = driver.cuTensorMapEncodeTiled(
        driver.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_UINT8,
        3,
        address,
        [u64(k), u64(rows), u64(groups)],
        [u64(row_stride), u64(group_stride)],
        [u32(128), u32(box_rows), u32(1)],
        [u32(1), u32(1), u32(1)],
        driver.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE,
        driver.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        driver.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        driver.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
    )
    if result != driver.CUresult.CUDA_SUCCESS:
        raise TmaError(f"cuTensorMapEncodeTiled failed ({result.name}) for address {address:#x}, K={k}, rows={rows}, "
                       f"groups={groups}, strides=({row_stride}, {group_stride}) bytes, box rows {box_rows}")
    return ctypes.string_at(tmap.getPtr(), 128)
