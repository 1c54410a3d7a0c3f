"""The kernels of the normal combine replayed as a CUDA graph (deepport/backends/triton/moe_sum_graph*.py):
the eager table kernel (table entries, ``in_rank``'s copy and running counts across scan blocks) and the
table-driven copy of each rank's part into its block, on fresh random inputs with poisoned outputs (the
interpreter here, the GPU where there is one). The whole path against all_to_all runs in
tests/test_hopper_peer_transport.py (and captured on a GPU in tests/peer_cuda_one_gpu.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deepport.backends.triton import _runtime
from deepport.backends.triton.moe_sum_graph_kernels import (
    MAX_WORLD,
    TABLE_SIZE,
    moe_parts_to_blocks_kernel,
    moe_sum_table_kernel,
)

pytestmark = pytest.mark.skipif(not _runtime.interpreting() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
DEVICE = torch.device("cpu" if _runtime.interpreting() else "cuda")


@pytest.mark.parametrize("tokens, world, block", [(2500, 3, 1024), (7, 2, 1024), (64, 8, 16), (1, 2, 16)])
def test_the_table_kernel_writes_the_table_and_scans_in_rank_across_blocks(tokens: int, world: int,
                                                                          block: int) -> None:
    g = torch.Generator().manual_seed(tokens * 10 + world)
    in_rank = (torch.rand((tokens, world), generator=g) < 0.4).to(DEVICE)
    rows = torch.empty((50, 96), dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty((tokens, 96), dtype=torch.bfloat16, device=DEVICE)
    sends = torch.randint(0, 9, (world,), generator=g).tolist()
    me = world - 1
    starts = [sum(sends[:r]) for r in range(world)]
    counts = [0 if r == me else c for r, c in enumerate(sends)]
    pad = [0] * (MAX_WORLD - world)
    table = torch.full((TABLE_SIZE,), -7, dtype=torch.int64, device=DEVICE)
    flags = torch.full((tokens, world), 5, dtype=torch.uint8, device=DEVICE)
    cumsum = torch.full((world, tokens), -7, dtype=torch.int64, device=DEVICE)
    row_bytes = 96 * 2
    own = rows.data_ptr() + starts[me] * row_bytes
    moe_sum_table_kernel[(world,)](table, rows, out, own, in_rank.view(torch.uint8), flags, cumsum, tokens,
                                   *starts, *pad, *counts, *pad, WORLD=world, BLOCK_T=block)
    got = table.cpu().tolist()
    assert got[:3] == [rows.data_ptr(), out.data_ptr(), rows.data_ptr() + starts[me] * row_bytes]
    assert got[3:3 + world] == starts and got[11:11 + world] == counts
    assert got[3 + world:11] == pad and got[11 + world:] == pad
    assert torch.equal(flags.cpu(), in_rank.cpu().view(torch.uint8))
    assert torch.equal(cumsum.cpu(), torch.cumsum(in_rank.cpu().t().to(torch.int64), 1))


@pytest.mark.parametrize("world, me, sends", [(2, 0, [3, 5]), (3, 1, [4, 2, 0]), (4, 3, [1, 0, 6, 2])])
def test_the_parts_land_in_their_ranks_blocks_and_nothing_else_is_written(world: int, me: int,
                                                                          sends: list[int]) -> None:
    g = torch.Generator().manual_seed(world)
    cols = 40  # int64 words of a row (320 bytes, 16-byte aligned rows)
    rows = torch.randint(-(1 << 40), 1 << 40, (sum(sends), cols), generator=g, dtype=torch.int64).to(DEVICE)
    blocks = [torch.full((8, cols), -3, dtype=torch.int64, device=DEVICE) for _ in range(world)]
    table = torch.zeros(TABLE_SIZE, dtype=torch.int64)
    table[0] = rows.data_ptr()
    for r in range(world):
        table[3 + r] = sum(sends[:r])
        table[11 + r] = 0 if r == me else sends[r]
    bases = torch.tensor([b.data_ptr() for b in blocks], dtype=torch.int64, device=DEVICE)
    moe_parts_to_blocks_kernel[(3, 2)](table.to(DEVICE), bases, rows, me, cols, WORLD=world, BLOCK_C=32)
    for r in range(world):
        want = torch.full((8, cols), -3, dtype=torch.int64)
        if r != me:
            start = sum(sends[:r])
            want[:sends[r]] = rows.cpu()[start: start + sends[r]]
        assert torch.equal(blocks[r].cpu(), want), r
