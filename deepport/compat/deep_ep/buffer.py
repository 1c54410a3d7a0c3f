"""DeepEP's ``Buffer`` on deepport's MoE ops: layout, normal dispatch/combine, low-latency dispatch/combine.

Each method validates and runs through deepport (:func:`deepport.moe_layout`, :func:`deepport.moe_dispatch`,
:func:`deepport.moe_combine`, :func:`deepport.moe_low_latency_dispatch`,
:func:`deepport.moe_low_latency_combine`), collectively over the Buffer's ``torch.distributed`` group
(NCCL with CUDA tensors, gloo with CPU tensors, ...) or in one process (``group=None``, a deepport
extension: every expert is local). Return tuples are DeepEP's, in DeepEP's order.

What DeepEP's arguments mean here:

- Buffer sizes (``num_nvl_bytes``, ``num_rdma_bytes``), ``low_latency_mode``, ``num_qps_per_rank``,
  ``allow_nvlink_for_low_latency_mode``, ``allow_mnnvl``, ``Config``, ``Buffer.num_sms``: recorded,
  never needed (deepport allocates outputs per call and has no registered buffers); normal and
  low-latency methods both work whatever the mode.
- ``previous_event``: the current stream waits for it before the op. ``async_finish``: the returned
  :class:`EventOverlap` holds an event recorded after the op (deepport runs on the current stream).
  ``allocate_on_comm_stream``: accepted; outputs belong to the current stream.
- ``return_recv_hook``: the data has arrived when the call returns; the hook is a no-op.
- Differences: the handles are :class:`DispatchHandle` / :class:`LowLatencyHandle` (DeepEP's tuple
  entries plus deepport's routes); handles from DeepEP itself are rejected. A token naming one expert
  in two top-k slots counts once per expert (``num_tokens_per_expert``, received counts); DeepEP counts
  slots (routers never repeat an expert, so this only matters for synthetic inputs). ``bias`` in
  :meth:`Buffer.combine` is added in float32 to the combined bf16 rows (one more bf16 rounding than
  DeepEP's in-kernel add). ``use_logfmt`` is accepted and transports bf16 exactly (DeepEP's LogFMT is
  lossy). Wait-time statistics tensors are accepted and left unchanged (deepport does not measure).
- ``get_comm_stream()``: the current stream (the one deepport communicates on).
- Shrink mode's mask methods: no rank is ever masked, so querying gives zeros, cleaning and unmasking
  are no-ops, and masking a rank raises ``NotImplementedError``.
- Not provided: shrink mode (``enable_shrink=True``), ``comm`` (mpi4py), ``get_local_buffer_tensor``
  (raises ``NotImplementedError``: there is no registered buffer to view), ``internode_dispatch`` /
  ``internode_combine`` (DeepEP's internal paths behind ``dispatch``/``combine``, which cover every
  group size here), the internode-specific handle layout, V2's ``ElasticBuffer`` / ``EPHandle``.
"""

from __future__ import annotations

from typing import Any

import torch

import deepport
from deepport.compat.deep_ep._collectives import all_reduce_sum, gather_counts
from deepport.compat.deep_ep._core import Payload
from deepport.compat.deep_ep._ue8m0_payload import repack_payload, unpack_payload
from deepport.compat.deep_ep.config import COMBINE_CHUNKS, DISPATCH_CHUNKS, Config, low_latency_rdma_size_hint
from deepport.compat.deep_ep.event import EventHandle, EventOverlap
from deepport.compat.deep_ep.handles import DispatchHandle, routes_of
from deepport.compat.deep_ep.low_latency import LowLatencyMethods
from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import _checks as chk


class Buffer(LowLatencyMethods):
    """DeepEP's expert-parallel communication object (the V1 ``deep_ep.Buffer`` API).

    Args (DeepEP's; see the module docstring for what each means on deepport):
        group: a ``torch.distributed`` process group, or ``None`` for one process.
        num_nvl_bytes, num_rdma_bytes, low_latency_mode, num_qps_per_rank,
            allow_nvlink_for_low_latency_mode, allow_mnnvl, explicitly_destroy: recorded.
        enable_shrink, comm: not supported (raise when set).
        backend: deepport backend every op of this Buffer runs on (default: deepport's choice).
    """

    num_sms: int = 20

    # ---- configuration (static, as DeepEP's) ----------------------------------------------------------

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """Set ``Buffer.num_sms`` (even, as DeepEP requires); recorded, no deepport backend reads it."""
        if chk.expect_int("new_num_sms", new_num_sms, minimum=0) % 2 != 0:
            raise InvalidArgumentError("new_num_sms", f"expected an even SM count, got {new_num_sms}")
        Buffer.num_sms = new_num_sms

    @staticmethod
    def is_sm90_compiled() -> bool:
        """True: deepport's MoE ops move FP8 payloads on every backend (DeepEP: FP8 needs an SM90 build)."""
        return True

    @staticmethod
    def capture() -> EventOverlap:
        """An :class:`EventOverlap` on the current stream (of the current CUDA device, if CUDA is in use)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """DeepEP's low-latency buffer size in bytes (deepport needs none; for callers that size with it)."""
        return low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank, hidden, num_ranks, num_experts)

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        """DeepEP's tuned dispatch :class:`Config` for ``num_ranks`` (a default Config for EP sizes DeepEP
        has no entry for); performance data only."""
        chunks = DISPATCH_CHUNKS.get(chk.expect_int("num_ranks", num_ranks, minimum=1))
        return Config(Buffer.num_sms, *chunks) if chunks else Config(Buffer.num_sms)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        """DeepEP's tuned combine :class:`Config` for ``num_ranks`` (as :meth:`get_dispatch_config`)."""
        chunks = COMBINE_CHUNKS.get(chk.expect_int("num_ranks", num_ranks, minimum=1))
        return Config(Buffer.num_sms, *chunks) if chunks else Config(Buffer.num_sms)

    # ---- layout and normal dispatch / combine ---------------------------------------------------------

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int, previous_event: EventOverlap | None = None,
                            async_finish: bool = False, allocate_on_comm_stream: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, EventOverlap]:
        """``(num_tokens_per_rank int32 [R], num_tokens_per_rdma_rank, num_tokens_per_expert int32 [E],
        is_token_in_rank bool [T, R], event)`` from :func:`deepport.moe_layout` (local, no communication).
        ``num_tokens_per_rdma_rank`` is ``None`` within 8 ranks (DeepEP's intranode case), else int32
        ``[ceil(R / 8)]`` per node of 8 ranks."""
        self._before(previous_event)
        layout = deepport.moe_layout(topk_idx, num_experts, self.group_size, backend=self.backend)
        per_node = None
        if self.group_size > 8:
            tokens = int(layout.is_token_in_rank.shape[0])
            nodes = -(-self.group_size // 8)
            padded = torch.zeros((tokens, nodes * 8), dtype=torch.bool, device=topk_idx.device)
            padded[:, : self.group_size] = layout.is_token_in_rank
            per_node = padded.view(tokens, nodes, 8).any(dim=2).sum(dim=0).to(torch.int32)
        return (layout.num_tokens_per_rank, per_node, layout.num_tokens_per_expert, layout.is_token_in_rank,
                self._after(async_finish, topk_idx.device))

    def dispatch(self, x: Payload, handle: DispatchHandle | None = None,
                 num_tokens_per_rank: torch.Tensor | None = None, num_tokens_per_rdma_rank: torch.Tensor | None = None,
                 is_token_in_rank: torch.Tensor | None = None,
                 num_tokens_per_expert: torch.Tensor | None = None, topk_idx: torch.Tensor | None = None,
                 topk_weights: torch.Tensor | None = None, expert_alignment: int = 1, num_worst_tokens: int = 0,
                 config: Config | None = None, previous_event: EventOverlap | None = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False
                 ) -> tuple[Payload, torch.Tensor | None, torch.Tensor | None, list[int] | None, DispatchHandle | None,
                            EventOverlap]:
        """Send each token to every rank holding one of its experts (collective), via :func:`deepport.moe_dispatch`.

        Returns ``(recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle,
        event)``: ``recv_x`` of ``x``'s type (bf16 tensor, ``(e4m3, fp32 scales [T, hidden / 128])`` or
        ``(e4m3, packed UE8M0 int32 scales [T, hidden / 512])``, see :mod:`._ue8m0_payload`) with one row per
        (source rank, token) received, ordered by source rank then token; ``recv_topk_idx`` local expert
        ids or -1; ``recv_topk_weights`` the weight where the expert is local, else 0; the list holds per
        local expert the received tokens rounded up to ``expert_alignment``.

        Modes (DeepEP's): with ``topk_idx`` (``is_token_in_rank`` and ``num_tokens_per_rank`` from
        :meth:`get_dispatch_layout`, checked against ``topk_idx``; ``None`` lets deepport derive them);
        without ``topk_idx``, a data-only dispatch routed by ``is_token_in_rank`` (then
        ``recv_topk_idx``/``recv_topk_weights`` are ``None`` and the list comes from the summed
        ``num_tokens_per_expert``, which is required); cached, with ``handle`` (``x`` only; returns
        ``(recv_x, None, None, None, None, event)``). ``num_worst_tokens > 0`` pads every output to that
        many rows (``recv_topk_idx`` -1, weights and data 0 past the received rows) and returns an empty
        list. ``config`` and ``num_tokens_per_rdma_rank`` are not needed.
        """
        self._before(previous_event)
        data = x[0] if isinstance(x, tuple) else x
        device = data.device if isinstance(data, torch.Tensor) else torch.device("cpu")
        x, packed = unpack_payload(x)
        if handle is not None:
            routes = routes_of(handle).routes
            for name, value in (("topk_idx", topk_idx), ("topk_weights", topk_weights)):
                if value is not None:
                    raise InvalidArgumentError(name, "expected None for a cached dispatch (the routes come from "
                                               f"`handle`), got {type(value).__name__}")
            cached = deepport.moe_dispatch(x, handle=routes, backend=self.backend)
            return repack_payload(cached.recv_x, packed), None, None, None, None, self._after(async_finish, device)
        worst = chk.expect_int("num_worst_tokens", num_worst_tokens, minimum=0)
        if topk_idx is None:
            result, counts = self._dispatch_by_rank(x, is_token_in_rank, num_tokens_per_expert, topk_weights,
                                                    expert_alignment)
            recv_idx, recv_w = None, None
        else:
            num_experts = self._check_layout(topk_idx, num_tokens_per_expert, is_token_in_rank, num_tokens_per_rank)
            result = deepport.moe_dispatch(x, topk_idx, topk_weights, num_experts, group=self.group,
                                           expert_alignment=expert_alignment, backend=self.backend)
            recv_idx, recv_w = result.recv_topk_idx, result.recv_topk_weights
            counts = list(result.num_recv_tokens_per_expert or ())
        routes = result.handle
        prefix = torch.cumsum(gather_counts(routes.recv_counts, self.group, device).t(), dim=0).to(torch.int32)
        recv_x = repack_payload(result.recv_x, packed)
        if worst:
            if worst < routes.num_recv:
                raise InvalidArgumentError("num_worst_tokens", f"expected at least the {routes.num_recv} tokens "
                                           f"this rank received, got {worst}")
            recv_x, recv_idx, recv_w, counts = _pad(recv_x, worst), _pad(recv_idx, worst, -1), _pad(recv_w, worst), []
        event = self._after(async_finish, device)
        return recv_x, recv_idx, recv_w, counts, DispatchHandle(routes, prefix, worst), event

    def combine(self, x: torch.Tensor, handle: DispatchHandle, topk_weights: torch.Tensor | None = None,
                bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None = None, config: Config | None = None,
                previous_event: EventOverlap | None = None, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, EventOverlap]:
        """Return received rows to their tokens and sum them, unweighted (collective), via :func:`deepport.moe_combine`.

        ``x`` bf16 ``[num_recv, hidden]`` in the dispatch's row order (or ``[num_worst_tokens, hidden]``
        after a padded dispatch: the padding rows are ignored). Returns ``(combined_x bf16 [num_tokens,
        hidden], combined_topk_weights float32 [num_tokens, num_topk] or None, event)``; ``bias`` (one
        bf16 ``[num_tokens, hidden]`` tensor or two) is added once.
        """
        self._before(previous_event)
        h = routes_of(handle)
        combined, weights = deepport.moe_combine(_unpad(x, h), h.routes, _unpad(topk_weights, h), backend=self.backend)
        if bias is not None:
            combined = _add_bias(combined, bias)
        return combined, weights, self._after(async_finish, combined.device)

    # ---- helpers ----------------------------------------------------------------------------------------

    def _check_layout(self, topk_idx: torch.Tensor, num_tokens_per_expert: torch.Tensor | None,
                      is_token_in_rank: torch.Tensor | None, num_tokens_per_rank: torch.Tensor | None) -> int:
        """The number of experts (from ``num_tokens_per_expert``, required as in DeepEP), after checking that
        the given layout is the one ``topk_idx`` routes to (deepport routes by ``topk_idx``)."""
        per_expert = chk.expect_tensor("num_tokens_per_expert", num_tokens_per_expert)
        chk.expect_ndim("num_tokens_per_expert", per_expert, 1, "[num_experts]")
        num_experts = int(per_expert.shape[0])
        layout = deepport.moe_layout(topk_idx, num_experts, self.group_size, backend=self.backend)
        for name, given, derived in (("is_token_in_rank", is_token_in_rank, layout.is_token_in_rank),
                                     ("num_tokens_per_rank", num_tokens_per_rank, layout.num_tokens_per_rank)):
            if given is None:
                continue
            t = chk.expect_tensor(name, given)
            chk.expect_shape(name, t, tuple(derived.shape), "(from get_dispatch_layout)")
            if not torch.equal(t.to(derived.device, derived.dtype), derived):
                raise InvalidArgumentError(name, "expected get_dispatch_layout(topk_idx, num_experts)'s value for "
                                           "this topk_idx (deepport routes by topk_idx), got a different layout")
        return num_experts

    def _dispatch_by_rank(self, x: Payload, is_token_in_rank: torch.Tensor | None,
                          num_tokens_per_expert: torch.Tensor | None, topk_weights: torch.Tensor | None,
                          expert_alignment: int) -> tuple[Any, list[int]]:
        """DeepEP's data-only dispatch: routes from ``is_token_in_rank`` (one stand-in expert per rank), the
        per-expert counts from the group-wide sum of ``num_tokens_per_expert``."""
        if topk_weights is not None:
            raise InvalidArgumentError("topk_weights", "expected None without topk_idx, got a tensor")
        in_rank = chk.expect_tensor("is_token_in_rank", is_token_in_rank)
        chk.expect_dtype("is_token_in_rank", in_rank, (torch.bool,))
        chk.expect_ndim("is_token_in_rank", in_rank, 2, "[num_tokens, num_ranks]")
        chk.expect_dim("is_token_in_rank", in_rank, 1, self.group_size, "num_ranks, the Buffer's group size")
        per_expert = chk.expect_tensor("num_tokens_per_expert", num_tokens_per_expert)
        chk.expect_ndim("num_tokens_per_expert", per_expert, 1, "[num_experts]")
        num_experts = int(per_expert.shape[0])
        if num_experts % self.group_size != 0:
            raise InvalidArgumentError("num_tokens_per_expert", f"expected a multiple of {self.group_size} experts "
                                       f"(the group size), got {num_experts}")
        ranks = torch.arange(self.group_size, device=in_rank.device, dtype=torch.int64)
        stand_in = torch.where(in_rank, ranks[None, :], -1).contiguous()
        result = deepport.moe_dispatch(x, stand_in, None, self.group_size, group=self.group,
                                       expert_alignment=expert_alignment, backend=self.backend)
        local = num_experts // self.group_size
        total = all_reduce_sum(per_expert.to(torch.int64), self.group)[self.rank * local:(self.rank + 1) * local]
        align = chk.expect_int("expert_alignment", expert_alignment, minimum=1)
        return result, [-(-int(c) // align) * align for c in total.tolist()]


def _pad(value: Any, rows: int, fill: float = 0) -> Any:
    """``value`` (a tensor, an FP8 tuple or None) with its rows padded to ``rows`` with ``fill``."""
    if value is None:
        return None
    if isinstance(value, tuple):
        return tuple(_pad(v, rows) for v in value)
    padded = torch.zeros((rows, *value.shape[1:]), dtype=value.dtype, device=value.device)
    if fill:
        padded.fill_(fill)
    padded[: value.shape[0]] = value
    return padded


def _unpad(value: Any, handle: DispatchHandle) -> Any:
    """Rows of a padded dispatch's shape (``num_worst_tokens``) cut back to the received rows."""
    if value is None or not handle.num_worst_tokens or not isinstance(value, torch.Tensor) or value.dim() < 1:
        return value
    if int(value.shape[0]) == handle.num_worst_tokens:
        return value[: handle.routes.num_recv]
    return value


def _add_bias(combined: torch.Tensor, bias: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    biases = bias if isinstance(bias, tuple) else (bias,)
    if len(biases) not in (1, 2):
        raise ArgumentTypeError("bias", f"expected a tensor or a tuple of two, got a tuple of {len(biases)}")
    total = combined.float()
    for i, b in enumerate(biases):
        name = f"bias[{i}]" if isinstance(bias, tuple) else "bias"
        t = chk.expect_tensor(name, b)
        chk.expect_dtype(name, t, (torch.bfloat16,))
        chk.expect_shape(name, t, tuple(combined.shape), "[num_tokens, hidden]")
        chk.expect_same_device(name, t, combined.device, "x")
        total = total + t.float()
    return total.to(torch.bfloat16)
