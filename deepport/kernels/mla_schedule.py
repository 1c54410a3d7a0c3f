"""Split-KV schedule for MLA decode: FlashMLA's documented greedy tile scheduler, computed on the host.

Work is measured in 64-token KV blocks plus a fixed overhead per (request, part) piece, and dealt to
``num_sm_parts`` parts in request order so that every part gets about the same load. A request cut
between parts is "split": its partial results are merged with the usual log-sum-exp combine.
Backends may use this plan (a persistent kernel reads one record per part) or ignore it.
"""

from __future__ import annotations

import numpy as np

BLOCK_N = 64  # tokens per scheduling block
FIXED_OVERHEAD = 5  # blocks' worth of work charged per piece (load q, write out, combine)
RECORD_SIZE = 8  # int32 fields per part, as in FlashMLA's tile_scheduler_metadata


def num_sm_parts(multiprocessors: int, num_heads_k: int, num_q_tokens_per_head_k: int) -> int:
    """Parts to split the batch into: one per SM group serving a 64-row tile of every KV head."""
    tiles = -(-num_q_tokens_per_head_k // 64)
    return max(multiprocessors // num_heads_k // tiles, 1)


def plan_split_kv(seqlens: np.ndarray, parts: int) -> tuple[np.ndarray, np.ndarray]:
    """Deal the KV blocks of each request to ``parts`` parts.

    Returns ``(records, num_splits)``:

    - ``records``: int32 ``[parts, 8]``, per part ``begin_req, end_req (inclusive), begin_block
      (in begin_req), end_block (exclusive, in end_req), begin_split_idx, first_req_is_split,
      last_req_is_split, 0``. Blocks are ``BLOCK_N``-token blocks. ``begin_split_idx`` is the row of
      the split accumulator that the part's first piece writes (``num_splits[begin_req]`` plus the
      piece's index within its request; FlashMLA's record stores only the latter, and tokens rather
      than blocks). A ``*_is_split`` flag is 1 when that request is cut into several pieces. A part
      with no work is ``(b, b - 1, 0, 0, total pieces, 0, 0, 0)``.
    - ``num_splits``: int32 ``[b + 1]``, the exclusive prefix sum of pieces per request
      (``num_splits[0] = 0``); request ``i``'s partial results occupy rows
      ``num_splits[i] : num_splits[i + 1]`` of a split accumulator.
    """
    lens = np.asarray(seqlens, dtype=np.int64)
    b = int(lens.shape[0])
    blocks = -(-lens // BLOCK_N)
    total = int(blocks.sum()) + FIXED_OVERHEAD * b
    payload = -(-total // parts) + FIXED_OVERHEAD
    pieces = np.zeros(b, dtype=np.int64)
    raw: list[tuple[int, int, int, int, int]] = []
    req, blk, cursor = 0, 0, 0
    for part in range(parts):
        begin_req, begin_blk, begin_split = req, blk, cursor
        end_req, end_blk, emitted = b - 1, 0, 0
        remaining = payload
        while req < b:
            cost = int(blocks[req]) - blk + FIXED_OVERHEAD
            if cost <= remaining or part == parts - 1:  # the last part takes whatever is left
                remaining -= cost
                end_req, end_blk = req, int(blocks[req])
                pieces[req] += 1
                cursor, emitted = cursor + 1, emitted + 1
                req, blk = req + 1, 0
                continue
            take = remaining - FIXED_OVERHEAD
            if take > 0:  # cut the request here; the next part resumes at block `blk`
                blk += take
                end_req, end_blk = req, blk
                pieces[req] += 1
                cursor, emitted = cursor + 1, emitted + 1
            break
        if emitted == 0:
            raw.append((b, b - 1, 0, 0, begin_split))
        else:
            raw.append((begin_req, end_req, begin_blk, end_blk, begin_split))
    num_splits = np.zeros(b + 1, dtype=np.int32)
    num_splits[1:] = np.cumsum(pieces)
    records = np.zeros((parts, RECORD_SIZE), dtype=np.int32)
    for p, (br, er, bb, eb, bs) in enumerate(raw):
        first_split = int(br < b and pieces[br] > 1)
        last_split = int(br <= er and pieces[er] > 1)
        records[p] = (br, er, bb, eb, bs, first_split, last_split, 0)
    return records, num_splits
