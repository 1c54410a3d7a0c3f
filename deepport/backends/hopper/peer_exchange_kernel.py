"""Host side of ``kernels/sm90_peer_exchange.cu``: its parameter block, its compile options and its launch.

The kernel moves one equal-split all-to-all between GPUs of one host in a single launch (the fixed
exchange of :mod:`.peer_transport`); :class:`~.peer_memory_cuda.CudaPeerMemory` owns the areas, flags and
counters it works on and calls :func:`launch_fixed_exchange`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import torch

MAX_RANKS = 64  # DP_FX_MAX_RANKS: area and flag addresses per launch
# DP_FX_CTAS: blocks per launch, the same on every rank of a group (one H200, two ranks in loopback:
# 64 beat 32; 128 per rank exceed what two ranks sharing one GPU can keep resident)
CTAS = 64
THREADS = 512  # DP_FX_THREADS
_TAIL = struct.Struct("<4Q3q2i")  # send, out, counters, error; pair_bytes, slot_bytes, timeout_ns; world, rank
PARAMS_SIZE = MAX_RANKS * 16 + _TAIL.size  # 1088 bytes, well under the 4 KiB parameter limit
OPTIONS = (f"-DDP_FX_MAX_RANKS={MAX_RANKS}", f"-DDP_FX_CTAS={CTAS}", f"-DDP_FX_THREADS={THREADS}")


def pack_params(areas: Sequence[int], flags: Sequence[int], send: int, out: int, counters: int, error: int,
                pair_bytes: int, slot_bytes: int, timeout_ns: int, rank: int) -> bytes:
    """The kernel's ``dp::FixedExchangeParams``: per rank its area and fixed-flag addresses (mapped here),
    then this rank's buffers, the sizes, the timeout, the world size and this rank."""
    world = len(areas)
    if not 1 < world <= MAX_RANKS or len(flags) != world:
        raise ValueError(f"expected 2..{MAX_RANKS} ranks with one area and one flag array each, got "
                         f"{world} areas and {len(flags)} flag arrays")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a group of {world}")
    if not 0 <= pair_bytes <= slot_bytes or slot_bytes % 16:
        raise ValueError(f"pair_bytes must lie in [0, slot_bytes] and slot_bytes be a multiple of 16, got "
                         f"{pair_bytes} and {slot_bytes}")
    pad = bytes(8 * (MAX_RANKS - world))
    body = struct.pack(f"<{world}Q", *areas) + pad + struct.pack(f"<{world}Q", *flags) + pad
    return body + _TAIL.pack(send, out, counters, error, pair_bytes, slot_bytes, timeout_ns, world, rank)


def function(device_index: int) -> Any:
    """The kernel's CuPy function on ``device_index`` (compiled or loaded from the cache once)."""
    from deepport.backends.hopper import jit, launch
    from deepport.backends.hopper.sources import peer_source

    source = peer_source("sm90_peer_exchange.cu", "dp_fixed_exchange_kernel")
    key, cubin = jit.get_cubin(source, OPTIONS)
    return launch.load_function(key, cubin, source.entry, device_index, 0)


def launch_fixed_exchange(fn: Any, params: bytes, device: torch.device) -> None:
    """One launch of ``CTAS`` blocks of ``THREADS`` threads on torch's current stream."""
    from deepport.backends.hopper import launch

    launch.launch(fn, CTAS, THREADS, 0, params, device)
