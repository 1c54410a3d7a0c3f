"""The other ranks' rows stored inside the routing's graph, before the host read (over ``all_to_all_single``).

Over a collective the dispatch's payload exchange can start only once the host has read the counts. What the host
then launches before it, in :func:`deepport.backends.torch.moe_routes.route`'s early send, is one
``rows_to_blocks`` of the other ranks' rows into a send buffer placed by the device's counts
(:class:`~deepport.backends.torch.moe_local.CountedParts`); on the lent H200's host that launch alone cost ~80 us
between the read and the exchange's launch. Here the same kernel is a CUDA graph of its own, replayed right after
the routing's (:mod:`deepport.backends.triton.moe_route_graph`) and after the event the host's read waits on, so the
read does not wait for it: it reads this call's addresses (``x``, its scales, the weights, and the handle's copies of
``in_rank`` and ``idx`` it writes on the way) from a small int64 table copied in from pinned memory before the
replays, and stores the rows into a send buffer of its own. After the read the host launches the exchange at once
(behind the store on the stream). The bytes are the early send's (the same kernel, format and order), so a rank on
either path agrees with its peers.

The send buffer holds the most a rank can send (each token to at most ``min(K, R - 1)`` other ranks). One
buffer per process group and device serves every shape (grown when a larger shape comes; a graph keeps the buffer
it was captured with): calls run in stream order (the exchange of one call is waited for on the stream before the
next call's replay writes the buffer again), as the routing's other buffers assume.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from deepport.backends.torch.moe_comm import RowsWindow
from deepport.backends.torch.moe_local import BlockOutputs, PeerRows
from deepport.backends.triton.fast_launch import FastLaunch
from deepport.backends.triton.moe_blocks import _MOVE_BYTES, _WARPS, _offset, _pow2, _words
from deepport.backends.triton.moe_permute import _guard, block_for_bytes
from deepport.backends.triton.moe_permute_kernels import moe_blocks_to_rows_kernel, moe_rows_to_blocks_kernel

log = logging.getLogger(__name__)
_TO_BLOCKS = FastLaunch(moe_rows_to_blocks_kernel)
_FROM_BLOCKS = FastLaunch(moe_blocks_to_rows_kernel)
_ROW_PROGRAMS = 1024  # programs per column block of the copy out (each strides over the rows the device counts)


def peer_key(peers: PeerRows | None) -> tuple[Any, ...] | None:
    """What a graph that stores ``peers``' rows is specialised on (format, word type and count, scales, weights),
    or None where the store cannot read them through the table: a tensor not dense, not of the format's types, or
    not 16-byte aligned (the kernel assumes it), or a format without the metadata."""
    if peers is None or "meta" not in peers.fmt.names or "x" not in peers.fmt.names:
        return None
    data, scales, weights = peers.data, peers.scales, peers.weights
    if not data.is_contiguous() or data.dim() != 2:
        return None
    for t in (scales, weights):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.dim() != 2):
            return None
    if any(t is not None and int(t.data_ptr()) % 16 for t in (data, scales, weights)):
        return None
    if (scales is None) == ("scales" in peers.fmt.names):
        return None
    words, x_words = _words(data, peers.fmt)
    return peers.fmt, words.dtype, x_words, 0 if scales is None else int(scales.shape[1]), weights is not None


@dataclass
class PeerStore:
    """One format's store of the other ranks' rows in the routing's graph: the table of this call's addresses
    (entries 0-2: ``x``, its scales, the weights; 3-7 and 11 stand-ins (no output is written); 8: 0; 9 and 10: the
    handle's copies of ``in_rank`` and ``idx``), the send buffer, the tensors that give the kernel its types."""

    key: tuple[Any, ...]
    tokens: int
    world: int
    rank: int
    buffer: torch.Tensor
    table: torch.Tensor = field(init=False)
    graph: Any = None
    broken: bool = False
    own_graph: Any = None  # the finish (:meth:`finish`): this rank's own rows, then the copy out
    out_graph: Any = None

    def __post_init__(self) -> None:
        device = self.buffer.device
        self.table = torch.zeros(16, dtype=torch.int64, device=device)
        # the table's values go through pinned memory: rewritten only at the next call, after the routing's read
        # (which waits for an event recorded after this copy)
        pinned = device.type == "cuda"
        self.staging = torch.zeros(16, dtype=torch.int64, pin_memory=pinned)
        # the finish's table (entries 0-11 as the kernels read them), then the received parts' addresses by source
        self.finish_table = torch.zeros(16 + self.world, dtype=torch.int64, device=device)
        self.finish_staging = torch.zeros(16 + self.world, dtype=torch.int64, pin_memory=pinned)
        self.inputs: tuple[int, ...] = ()
        self.like_words = torch.zeros(2, dtype=self.key[1], device=device)
        self.like_f32 = torch.zeros(2, dtype=torch.float32, device=device)
        self.like_i64 = torch.zeros(2, dtype=torch.int64, device=device)

    def prepare(self, peers: PeerRows, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's table (one copy from pinned memory, before the routing's event) and return the
        handle's copies of ``in_rank`` (bool ``[T, R]``) and ``idx`` (int64 ``[T, K]``) that the store fills."""
        device = self.buffer.device
        in_rank = torch.empty((self.tokens, self.world), dtype=torch.bool, device=device)
        idx = torch.empty((self.tokens, topk), dtype=torch.int64, device=device)
        stand_in = int(self.like_i64.data_ptr())
        scales = stand_in if peers.scales is None else int(peers.scales.data_ptr())
        weights = stand_in if peers.weights is None else int(peers.weights.data_ptr())
        self.inputs = (int(peers.data.data_ptr()), scales, weights, int(in_rank.data_ptr()), int(idx.data_ptr()))
        self.staging.numpy()[:12] = (*self.inputs[:3], *(stand_in,) * 5, 0, *self.inputs[3:], stand_in)
        self.table.copy_(self.staging, non_blocking=device.type == "cuda")
        return in_rank, idx

    def finish(self, idx: torch.Tensor, outputs: tuple[torch.Tensor, ...], outs: BlockOutputs, own_start: int,
               window: RowsWindow, num_local: int, replayed: bool, capture: bool) -> bool:
        """After the exchange of :attr:`buffer` began through ``window``: this rank's own rows into ``outs`` from
        row ``own_start`` (``rows_to_blocks``'s part ``"own"``), ``window.receive()``, then every received row out
        of ``window.landing`` (``blocks_to_rows``), reading this call's addresses from :attr:`finish_table` (one
        copy from pinned memory). ``outputs``: the routing's (``in_rank``, ``table``, ``got``, ``cumsum``, ...),
        its graph's own where ``replayed``, and then each kernel is a graph of its own (captured at the first such
        call where ``capture``). False, nothing started, where an address is not 16-byte aligned or the window
        does not offer its landing."""
        landing = window.landing
        if landing is None or not self.inputs:
            return False
        stand_in = int(self.like_i64.data_ptr())
        addresses = [int(outs.x.data_ptr()), stand_in if outs.scales is None else int(outs.scales.data_ptr()),
                     int(outs.src.data_ptr()), int(outs.local.data_ptr()),
                     stand_in if outs.weights is None else int(outs.weights.data_ptr())]
        bases = [0 if p is None else int(p.data_ptr()) for p in landing]
        if any(a % 16 for a in addresses + bases):
            return False
        # entry 11 (a second home for the local ids) is the outputs' own: the kernels write the same values twice
        self.finish_staging.numpy()[:] = (*self.inputs[:3], *addresses, own_start, *self.inputs[3:], addresses[3],
                                          0, 0, 0, 0, *bases)
        self.finish_table.copy_(self.finish_staging, non_blocking=self.buffer.device.type == "cuda")
        in_rank, _, got, cumsum = outputs[:4]
        own = (idx, in_rank, cumsum, self.rank, num_local)
        self.own_graph = self._run(self.own_graph, replayed, capture, self._own_rows, own)
        window.receive()  # the caller's stream waits for the exchange
        self.out_graph = self._run(self.out_graph, replayed, capture, self._rows_out, (idx, got, self.rank, num_local))
        return True

    def _run(self, graph: Any, replayed: bool, capture: bool, record: Any, args: tuple[Any, ...]) -> Any:
        """``record(*args)`` as ``graph`` (replayed; captured first where ``capture``), or eagerly; the graph."""
        if replayed and graph is not None:
            graph.replay()
            return graph
        if replayed and capture and not self.broken:
            made = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(made, capture_error_mode="thread_local"):
                    record(*args)
            except RuntimeError as exc:
                self.broken = True
                log.warning("capturing the store of the other ranks' rows or the finish as a CUDA graph failed (%s); "
                            "they run eagerly from now on", exc)
            else:
                made.replay()
                return made
        record(*args)
        return graph

    def _own_rows(self, idx: torch.Tensor, in_rank: torch.Tensor, cumsum: torch.Tensor, me: int,
                  num_local: int) -> None:
        self._to_blocks(idx, in_rank, cumsum, me, num_local, self.finish_table, 0, self.table, 0, 2, False)

    def _rows_out(self, idx: torch.Tensor, got: torch.Tensor, me: int, num_local: int) -> None:
        fmt, _, x_words, num_scales, has_weights = self.key
        k = int(idx.shape[1])
        block = block_for_bytes(x_words, self.like_words.element_size(), _MOVE_BYTES)
        counts = got[:, 0]
        with _guard(self.buffer.device):
            _FROM_BLOCKS((_ROW_PROGRAMS, -(-x_words // block)), self.finish_table[16:], counts, counts.stride(0),
                         self.like_words, self.like_f32, self.like_i64, self.like_i64, self.like_f32, me, x_words,
                         num_scales, fmt.row_bytes, _offset(fmt, "scales"), _offset(fmt, "meta"), me * num_local,
                         num_local, self.finish_table, self.world, k, _pow2(k), num_scales > 0, has_weights, block,
                         _pow2(max(num_scales, 1)), True, num_warps=_WARPS)

    def store(self, idx: torch.Tensor, in_rank: torch.Tensor, table: torch.Tensor, cumsum: torch.Tensor,
              num_local: int, replayed: bool, capture: bool) -> None:
        """:meth:`record` over the routing's outputs: as this store's graph where the routing's own was replayed
        (captured at the first such call where ``capture``), else eagerly."""
        self.graph = self._run(self.graph, replayed, capture, self.record,
                               (idx, in_rank, table, cumsum, self.rank, num_local))

    def record(self, idx: torch.Tensor, in_rank: torch.Tensor, table: torch.Tensor, cumsum: torch.Tensor, me: int,
               num_local: int) -> None:
        """The store's kernel (issued eagerly or under the routing's capture): the other ranks' rows of the
        table's tensors into :attr:`buffer`, rank ``r``'s part after the rows the count table's first column gives
        the ranks before it (this rank's left out); ``idx`` int64 ``[T, K]`` (the routing's), ``cumsum`` its
        running count of ``in_rank`` by rank."""
        self._to_blocks(idx, in_rank, cumsum, me, num_local, self.table, int(self.buffer.data_ptr()), table,
                        table.stride(0), 1, True)

    def _to_blocks(self, idx: torch.Tensor, in_rank: torch.Tensor, cumsum: torch.Tensor, me: int, num_local: int,
                   addresses: torch.Tensor, send_at: int, counts: torch.Tensor, stride: int, rows: int,
                   counted: bool) -> None:
        """``rows_to_blocks``'s kernel reading its addresses from ``addresses`` (the table): ``rows`` 1, the
        other ranks' rows into the send buffer at ``send_at`` placed by ``counts`` (``counted``); 2, this rank's own
        into the outputs."""
        fmt, _, x_words, num_scales, has_weights = self.key
        k = int(idx.shape[1])
        meta_width = fmt.widths[fmt.names.index("meta")]
        block = block_for_bytes(x_words, self.like_words.element_size(), _MOVE_BYTES)
        with _guard(self.buffer.device):
            _TO_BLOCKS((self.tokens, -(-x_words // block)), self.like_words, self.like_f32, idx, self.like_f32,
                       in_rank.view(torch.uint8), cumsum, cumsum, self.like_words, self.like_f32, self.like_i64,
                       self.like_i64, self.like_f32, 0, me, me * num_local, num_local, self.tokens, x_words,
                       num_scales, max(num_scales, 1), 1, fmt.row_bytes, _offset(fmt, "scales"), _offset(fmt, "meta"),
                       addresses, send_at, counts, stride, self.world, k, _pow2(k), meta_width, _pow2(meta_width),
                       num_scales > 0, has_weights, block, _pow2(max(num_scales, 1)), True, rows, counted,
                       num_warps=_WARPS)


_GROWN_BYTES = 1 << 30  # a buffer grows to twice its size only up to this (a shape that needs more gets its size)
_BUFFERS: weakref.WeakKeyDictionary[Any, dict[str, torch.Tensor]] = weakref.WeakKeyDictionary()


def peer_store(owner: Any, key: tuple[Any, ...], tokens: int, topk: int, world: int, rank: int,
               device: torch.device) -> PeerStore:
    """A :class:`PeerStore` for ``key`` (:func:`peer_key`) over the send buffer of ``owner`` (the process group)
    on ``device``, grown to at least twice its size when this shape needs more."""
    nbytes = tokens * min(topk, world - 1) * key[0].row_bytes
    held = _BUFFERS.setdefault(owner, {})
    buffer = held.get(str(device))
    if buffer is None or int(buffer.shape[0]) < nbytes:
        size = max(nbytes, 0 if buffer is None else min(2 * int(buffer.shape[0]), _GROWN_BYTES))
        buffer = held[str(device)] = torch.empty(size, dtype=torch.uint8, device=device)
    return PeerStore(key, tokens, world, rank, buffer)
