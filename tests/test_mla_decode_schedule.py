"""The split-KV schedule (plan_split_kv): every 64-token block of every request is dealt exactly once,
in order, and the records, split counts and flags agree with each other."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deepport
from deepport.kernels import mla_schedule
from deepport.kernels.mla_schedule import BLOCK_N, FIXED_OVERHEAD, RECORD_SIZE, num_sm_parts, plan_split_kv


def pieces_of(records: np.ndarray, blocks: np.ndarray) -> list[tuple[int, int, int, int]]:
    """``(part, request, begin_block, end_block)`` of every piece the records describe, in part order."""
    b = len(blocks)
    found = []
    for part, (br, er, bb, eb, *_rest) in enumerate(records.tolist()):
        if br > er:
            assert (br, er, bb, eb) == (b, b - 1, 0, 0), f"part {part}: an empty part is (b, b - 1, 0, 0)"
            continue
        assert 0 <= br <= er < b, f"part {part}: requests {br}..{er} out of [0, {b})"
        for req in range(br, er + 1):
            begin = bb if req == br else 0
            end = eb if req == er else int(blocks[req])
            found.append((part, req, begin, end))
    return found


def check_plan(lens: np.ndarray, parts: int) -> None:
    records, num_splits = plan_split_kv(lens, parts)
    b = len(lens)
    blocks = -(-lens.astype(np.int64) // BLOCK_N)
    assert records.dtype == np.int32 and records.shape == (parts, RECORD_SIZE)
    assert num_splits.dtype == np.int32 and num_splits.shape == (b + 1,)
    pieces = pieces_of(records, blocks)

    # every block of every request is covered exactly once, by contiguous pieces in part order
    per_request: dict[int, list[tuple[int, int, int]]] = {i: [] for i in range(b)}
    for part, req, begin, end in pieces:
        per_request[req].append((part, begin, end))
    for req in range(b):
        mine = per_request[req]
        assert mine, f"request {req} (length {lens[req]}) is in no part"
        assert [p for p, _, _ in mine] == sorted({p for p, _, _ in mine}), f"request {req}: parts out of order"
        cursor = 0
        for _, begin, end in mine:
            assert begin == cursor, f"request {req}: piece starts at block {begin}, expected {cursor}"
            assert end > begin or (blocks[req] == 0 and len(mine) == 1), f"request {req}: empty piece"
            cursor = end
        assert cursor == blocks[req], f"request {req}: covered {cursor} of {blocks[req]} blocks"
    # requests are dealt in order: the pieces, read part by part, visit requests 0, 1, ..., b - 1
    assert [req for _, req, _, _ in pieces] == sorted(req for _, req, _, _ in pieces)

    # num_splits is the exclusive prefix sum of pieces per request
    counts = np.array([len(per_request[i]) for i in range(b)], dtype=np.int64)
    assert num_splits[0] == 0 and num_splits[-1] == len(pieces)
    assert np.array_equal(np.diff(num_splits), counts)

    # begin_split_idx is the split-accumulator row of the part's first piece; flags say whether the
    # part's first / last request is cut across parts
    row = 0
    for part, (br, er, _bb, _eb, begin_split, first_split, last_split, pad) in enumerate(records.tolist()):
        assert pad == 0
        assert begin_split == row, f"part {part}: begin_split_idx {begin_split}, expected {row}"
        if br > er:
            assert (first_split, last_split) == (0, 0)
            continue
        assert first_split == int(counts[br] > 1) and last_split == int(counts[er] > 1), f"part {part}"
        row += sum(1 for p, *_ in pieces if p == part)
    assert row == len(pieces)

    # load balance: no part carries more than the payload it was dealt
    total = int(blocks.sum()) + FIXED_OVERHEAD * b
    payload = -(-total // parts) + FIXED_OVERHEAD
    for part in range(parts):
        load = sum(end - begin + FIXED_OVERHEAD for p, _, begin, end in pieces if p == part)
        assert load <= payload, f"part {part} carries {load} > payload {payload}"


@pytest.mark.parametrize("seed", range(6))
def test_every_block_is_dealt_exactly_once_in_order_for_random_batches(seed: int) -> None:
    rng = np.random.default_rng(seed)
    for parts in range(1, 201):
        b = int(rng.integers(1, 24))
        lens = rng.integers(0, 4 * BLOCK_N * (1 + seed), b)
        lens[rng.random(b) < 0.25] = 0
        check_plan(lens.astype(np.int32), parts)


@pytest.mark.parametrize("parts", [1, 2, 3, 7, 64, 132, 200])
@pytest.mark.parametrize("lens", [
    [0], [0, 0, 0], [1], [64], [65], [64 * 1000], [1, 64 * 1000, 1], [0, 64 * 300, 0, 64 * 300 + 1, 0],
    [127] * 40, list(range(0, 64 * 40, 64)),
], ids=lambda v: f"b{len(v)}-max{max(v)}")
def test_every_block_is_dealt_exactly_once_at_the_edges(lens: list[int], parts: int) -> None:
    check_plan(np.array(lens, dtype=np.int32), parts)


def test_empty_batch_gives_empty_parts() -> None:
    records, num_splits = plan_split_kv(np.zeros(0, dtype=np.int32), 4)
    assert num_splits.tolist() == [0]
    assert records.tolist() == [[0, -1, 0, 0, 0, 0, 0, 0]] * 4


def test_one_long_request_is_cut_across_all_parts() -> None:
    records, num_splits = plan_split_kv(np.array([64 * 1000], dtype=np.int32), 8)
    assert num_splits.tolist() == [0, 8]
    assert records[:, 4].tolist() == list(range(8))  # one piece per part, rows 0..7
    assert records[:, 5].all() and records[:, 6].all()
    assert records[0, 2] == 0 and records[-1, 3] == 1000


def test_short_requests_are_not_split() -> None:
    records, num_splits = plan_split_kv(np.array([10, 20, 30, 40], dtype=np.int32), 2)
    assert num_splits.tolist() == [0, 1, 2, 3, 4]
    assert not records[:, 5:7].any()


def test_num_sm_parts_divides_the_multiprocessors_among_kv_heads_and_row_tiles() -> None:
    assert num_sm_parts(132, 1, 128) == 66  # H100/H200, DeepSeek decode: 128 rows are two 64-row tiles
    assert num_sm_parts(132, 1, 64) == 132
    assert num_sm_parts(132, 2, 65) == 33
    assert num_sm_parts(4, 8, 128) == 1  # never fewer than one part


def test_get_mla_metadata_holds_the_plan_for_its_lengths() -> None:
    lens = torch.tensor([0, 5, 700, 64], dtype=torch.int32)
    md = deepport.get_mla_metadata(lens, 128, 1, num_heads_q=128)
    parts = num_sm_parts(deepport.dispatch.device_info(lens.device).multiprocessors, 1, 128)
    records, splits = mla_schedule.plan_split_kv(lens.numpy(), parts)
    assert (md.batch, md.num_q_tokens_per_head_k, md.num_heads_k, md.num_heads_q, md.num_sm_parts) == \
        (4, 128, 1, 128, parts)
    assert md.tile_scheduler_metadata.dtype == torch.int32 and md.num_splits.dtype == torch.int32
    assert np.array_equal(md.tile_scheduler_metadata.numpy(), records)
    assert np.array_equal(md.num_splits.numpy(), splits)
    assert torch.equal(md.cache_seqlens, lens) and md.cache_seqlens.data_ptr() != lens.data_ptr()
