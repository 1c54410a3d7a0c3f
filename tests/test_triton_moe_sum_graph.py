"""The kernels of the normal combine replayed as a CUDA graph (deepport/backends/triton/moe_sum_graph*.py):
the scan kernel (``in_rank``'s copy and running counts across scan blocks, ``in_rank`` read at the table's
address) and the
table-driven copy of each rank's part into its block, on fresh random inputs with poisoned outputs (the
interpreter here, the GPU where there is one). The whole path against all_to_all runs in
tests/test_hopper_peer_transport.py (and captured on a GPU in tests/peer_cuda_one_gpu.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from deepport.backends.triton import _runtime
from deepport.backends.triton.moe_sum_graph_kernels import (
    IN_RANK,
    TABLE_SIZE,
    moe_parts_to_blocks_kernel,
    moe_sum_scan_kernel,
)

pytestmark = pytest.mark.skipif(not _runtime.interpreting() and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 or a CUDA GPU")
DEVICE = torch.device("cpu" if _runtime.interpreting() else "cuda")


@pytest.mark.parametrize("tokens, world, block", [(2500, 3, 1024), (7, 2, 1024), (64, 8, 16), (1, 2, 16)])
def test_the_scan_kernel_copies_in_rank_from_the_tables_address_and_scans_it_across_blocks(tokens: int, world: int,
                                                                                          block: int) -> None:
    g = torch.Generator().manual_seed(tokens * 10 + world)
    in_rank = (torch.rand((tokens, world), generator=g) < 0.4).to(DEVICE)
    decoy = (torch.rand((tokens, world), generator=g) < 0.4).to(DEVICE)  # what a kernel reading its argument sees
    table = torch.full((TABLE_SIZE,), -7, dtype=torch.int64)
    table[IN_RANK] = in_rank.data_ptr()
    flags = torch.full((tokens, world), 5, dtype=torch.uint8, device=DEVICE)
    cumsum = torch.full((world, tokens), -7, dtype=torch.int64, device=DEVICE)
    moe_sum_scan_kernel[(world,)](table.to(DEVICE), decoy.view(torch.uint8), flags, cumsum, tokens, WORLD=world,
                                  BLOCK_T=block)
    assert torch.equal(flags.cpu(), in_rank.cpu().view(torch.uint8))
    assert torch.equal(cumsum.cpu(), torch.cumsum(in_rank.cpu().t().to(torch.int64), 1))


def test_the_combine_table_lists_its_addresses_counts_and_in_rank() -> None:
    from deepport.backends.triton.moe_sum_graph import _Program

    world, me, tokens = 3, 1, 6
    program = _Program(tokens, 8, world, me, 1 << 20, torch.bfloat16, torch.bfloat16, DEVICE)
    rows = torch.empty((9, 8), dtype=torch.bfloat16, device=DEVICE)
    out = torch.empty((tokens, 8), dtype=torch.bfloat16, device=DEVICE)
    in_rank = torch.ones((tokens, world), dtype=torch.bool, device=DEVICE)
    sends = [2, 3, 4]
    for _ in range(6):  # every pinned table in turn, and again
        program.table.fill_(-1)
        program.prepare(rows, out, in_rank, sends)
        got = program.table.cpu().tolist()
        target = out if program.scratch is None else program.scratch
        assert got[:3] == [rows.data_ptr(), target.data_ptr(), rows.data_ptr() + 2 * 16]
        assert got[3:6] == [0, 2, 5] and got[6:11] == [0] * 5
        assert got[11:14] == [2, 0, 4] and got[14:19] == [0] * 5
        assert got[IN_RANK] == in_rank.data_ptr()


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
