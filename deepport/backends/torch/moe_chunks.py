"""The normal dispatch's payload in several collectives, so that gathering and unpacking overlap the transfer.

With ``DEEPPORT_MOE_CHUNKS=C`` (default 1: one collective, :func:`deepport.backends.torch.moe_routes.route`'s
own exchange) each rank splits its ``T`` tokens into ``C`` ranges (``[T * c // C, T * (c + 1) // C)``) and
sends range ``c``'s rows in collective ``c``. The collectives run asynchronously (NCCL: on its own stream), so
the gather of chunk ``c + 1`` runs while chunk ``c`` travels, and chunk ``c``'s rows are copied into the
outputs while later ones travel. The counts of every chunk travel in the count exchange the dispatch already
makes (``C`` more columns of its table), and the one host sync reads them with the others: no collective or
sync is added besides the ``C - 1`` extra payload collectives.

Order: the contract's received rows are grouped by source rank, each source's rows in token order; the chunks
are token ranges in order, so source ``s``'s rows of chunk ``c`` land after its rows of chunks ``< c``. The
results are those of the single collective bit for bit.

Whether it pays depends on the collective's fixed cost against the work it hides (unmeasured on two GPUs
yet); the setting is a knob for that measurement, off by default.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from deepport.backends.torch.moe_comm import RowFormat, start_all_to_all
from deepport.backends.torch.moe_index import compact
from deepport.kernels.moe_args import MoEGroup

MAX_CHUNKS = 64


def payload_chunks() -> int:
    """``DEEPPORT_MOE_CHUNKS`` (1 to :data:`MAX_CHUNKS`, default 1). Every rank of a group must use the same
    value (the collectives pair up by number; a range may hold no token)."""
    text = os.environ.get("DEEPPORT_MOE_CHUNKS", "").strip()
    if not text:
        return 1
    try:
        chunks = int(text)
    except ValueError:
        chunks = 0
    if not 1 <= chunks <= MAX_CHUNKS:
        raise ValueError(f"DEEPPORT_MOE_CHUNKS must be an integer in 1..{MAX_CHUNKS}, got {text!r}")
    return chunks


def bounds(tokens: int, chunks: int) -> list[int]:
    """The ``chunks + 1`` token boundaries of the ranges."""
    return [tokens * c // chunks for c in range(chunks + 1)]


def chunk_counts(in_rank: torch.Tensor, chunks: int) -> torch.Tensor:
    """int64 ``[world, chunks]``: the tokens of each range that go to each rank (``in_rank`` bool ``[T, world]``)."""
    edges = bounds(int(in_rank.shape[0]), chunks)
    return torch.stack([in_rank[edges[c]: edges[c + 1]].sum(0) for c in range(chunks)], 1).to(torch.int64)


def exchange_chunked(fmt: RowFormat, sources: dict[str, torch.Tensor], in_rank: torch.Tensor, sends: list[int],
                     recvs: list[int], send_chunks: list[list[int]], recv_chunks: list[list[int]], grp: MoEGroup,
                     outs: dict[str, torch.Tensor], what: str,
                     take: Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None],
                     copy: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
    """The normal dispatch's exchange with ``outs`` (module docstring): ``send_chunks[r][c]`` rows of range ``c``
    go to rank ``r``, ``recv_chunks[s][c]`` arrive from rank ``s``; ``take(part, dst, src, rows)`` gathers a
    part's rows, ``copy(dst, src)`` copies rows bit for bit. This rank's own rows skip the collectives."""
    me, t, world = grp.rank, int(in_rank.shape[0]), grp.world_size
    chunks = len(send_chunks[0])
    edges = bounds(t, chunks)
    mask = in_rank.t().clone()
    mask[me].fill_(False)
    flight = []
    for c in range(chunks):  # gather chunk c (while chunk c - 1 travels), then send it
        wire_sends = [0 if r == me else send_chunks[r][c] for r in range(world)]
        wire_recvs = [0 if s == me else recv_chunks[s][c] for s in range(world)]
        lo, hi = edges[c], edges[c + 1]
        rows = compact(mask[:, lo:hi], sum(wire_sends)) % max(hi - lo, 1) + lo
        send = fmt.empty(sum(wire_sends), in_rank.device)
        for name, src in sources.items():
            take(name, fmt.part(send, name), src, rows)
        recv = fmt.empty(sum(wire_recvs), in_rank.device)
        flight.append((start_all_to_all(recv, send, wire_recvs, wire_sends, grp, f"{what} (chunk {c})"), recv,
                       wire_recvs))
    start = sum(recvs[:me])
    mine = compact(in_rank[:, me], sends[me])  # while the chunks travel
    for name, src in sources.items():
        take(name, outs[name][start: start + recvs[me]], src, mine)
    done = [0] * world  # rows of each source already placed
    for pending, recv, wire_recvs in flight:
        pending.wait()
        at = 0
        for s, count in enumerate(wire_recvs):
            if count:
                to = sum(recvs[:s]) + done[s]
                for name, out in outs.items():
                    copy(out[to: to + count], fmt.part(recv, name)[at: at + count])
                done[s] += count
            at += count
