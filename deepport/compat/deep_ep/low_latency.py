"""DeepEP's low-latency ``Buffer`` methods on :func:`deepport.moe_low_latency_dispatch` / ``_combine``."""

from __future__ import annotations

from collections.abc import Callable

import torch

import deepport
from deepport.compat.deep_ep._core import BufferCore, Payload
from deepport.compat.deep_ep._low_latency_cast import cast_pow2
from deepport.compat.deep_ep.event import EventOverlap
from deepport.compat.deep_ep.handles import LowLatencyHandle, low_latency_of
from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk

Hook = Callable[[], None]


def _no_op_hook() -> None:
    """The receive hook: deepport's dispatch/combine have received everything when they return."""


class LowLatencyMethods(BufferCore):
    """``low_latency_dispatch``, ``low_latency_combine`` and their buffer helpers (mixed into ``Buffer``)."""

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """No-op: deepport keeps no low-latency buffer state between calls (DeepEP must zero its buffers)."""
        self._check_alive()

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: torch.Tensor | None = None,
                             dispatch_wait_recv_cost_stats: torch.Tensor | None = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False
                             ) -> tuple[Payload, torch.Tensor, LowLatencyHandle, EventOverlap, Hook | None]:
        """Dispatch into per-expert rows of fixed capacity (collective), via :func:`deepport.moe_low_latency_dispatch`.

        Returns ``(recv_x, recv_count, handle, event, hook)``: ``recv_x`` bf16 ``[L, R * T_max, hidden]``,
        or with ``use_fp8`` ``(e4m3 [L, R * T_max, hidden], scales)`` with float32 ``[L, R * T_max,
        hidden / 128]`` scales (int32 ``[.., hidden / 512]`` with ``use_ue8m0``), column-major in the last
        two dimensions; only the first ``recv_count[e]`` rows of expert ``e`` are valid. ``round_scale``
        rounds each scale up to a power of two (cast here, see :mod:`._low_latency_cast`); ``use_ue8m0``
        needs it. ``cumulative_local_expert_recv_stats`` (int32 ``[L]``) is incremented by ``recv_count``.
        ``hook`` is a no-op callable with ``return_recv_hook`` (else ``None``).
        """
        self._check_alive()
        fp8, rounded, ue8m0 = (chk.expect_bool(n, v) for n, v in (("use_fp8", use_fp8), ("round_scale", round_scale),
                                                                    ("use_ue8m0", use_ue8m0)))
        _check_hook_flags(async_finish, return_recv_hook)
        if ue8m0 and not rounded:
            raise InvalidArgumentError("use_ue8m0", "expected round_scale=True with use_ue8m0=True (UE8M0 scales are "
                                       "powers of two), got round_scale=False")
        if rounded and not fp8:
            raise InvalidArgumentError("round_scale", "expected use_fp8=True with round_scale=True, got use_fp8=False")
        if ue8m0 and isinstance(x, torch.Tensor) and x.dim() == 2 and int(x.shape[1]) % 512 != 0:
            raise InvalidArgumentError("x", f"expected hidden to be a multiple of 512 with use_ue8m0=True (four "
                                       f"scales per int32), got {int(x.shape[1])}")
        result = deepport.moe_low_latency_dispatch(x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts,
                                                   group=self.group, use_fp8=fp8 and not rounded, backend=self.backend)
        recv_x: Payload = result.recv_x
        if rounded:
            assert isinstance(recv_x, torch.Tensor)
            recv_x = cast_pow2(recv_x, result.recv_count, ue8m0)
        if cumulative_local_expert_recv_stats is not None:
            stats = chk.expect_tensor("cumulative_local_expert_recv_stats", cumulative_local_expert_recv_stats)
            chk.expect_dtype("cumulative_local_expert_recv_stats", stats, (torch.int32,))
            chk.expect_shape("cumulative_local_expert_recv_stats", stats, tuple(result.recv_count.shape),
                             "[num_local_experts]")
            stats.add_(result.recv_count.to(stats.device))
        if dispatch_wait_recv_cost_stats is not None:
            chk.expect_tensor("dispatch_wait_recv_cost_stats", dispatch_wait_recv_cost_stats)
        handle = LowLatencyHandle(result.handle, int(x.shape[1]))
        return (recv_x, result.recv_count, handle, self._after(async_finish, x.device),
                _no_op_hook if return_recv_hook else None)

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                            handle: LowLatencyHandle, use_logfmt: bool = False, zero_copy: bool = False,
                            async_finish: bool = False, return_recv_hook: bool = False, out: torch.Tensor | None = None,
                            combine_wait_recv_cost_stats: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, EventOverlap, Hook | None]:
        """Weighted return of expert outputs to their tokens (collective), via :func:`deepport.moe_low_latency_combine`.

        ``x`` bf16 ``[L, R * T_max, hidden]`` in the dispatch's row layout (with ``zero_copy=True`` the
        rows are read from :meth:`get_next_low_latency_combine_buffer` instead); ``topk_idx``,
        ``topk_weights``: this rank's dispatched routing and weights. Returns ``(combined_x bf16
        [num_tokens, hidden], event, hook)``, ``combined_x[t] = sum_k w[t, k] * y[expert(t, k)][t]``
        (written into ``out`` when given).
        """
        self._check_alive()
        h = low_latency_of(handle)
        chk.expect_bool("use_logfmt", use_logfmt)
        _check_hook_flags(async_finish, return_recv_hook)
        if chk.expect_bool("zero_copy", zero_copy):
            x = self.get_next_low_latency_combine_buffer(h)
        combined = deepport.moe_low_latency_combine(x, topk_idx, topk_weights, h.ll, backend=self.backend)
        if out is not None:
            target = chk.expect_tensor("out", out)
            chk.expect_dtype("out", target, (torch.bfloat16,))
            chk.expect_shape("out", target, tuple(combined.shape), "[num_tokens, hidden]")
            chk.expect_same_device("out", target, combined.device, "x")
            combined = target.copy_(combined)
        if combine_wait_recv_cost_stats is not None:
            chk.expect_tensor("combine_wait_recv_cost_stats", combine_wait_recv_cost_stats)
        return combined, self._after(async_finish, combined.device), _no_op_hook if return_recv_hook else None

    # ---- shrink mode's rank mask: deepport masks no rank (enable_shrink=True is rejected) ------------

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        """Unmasking (``mask=False``) is a no-op, every rank being unmasked already; masking a rank raises:
        deepport has no shrink mode (DeepEP needs ``Buffer(..., enable_shrink=True)`` for it)."""
        self._check_alive()
        chk.expect_int("rank_to_mask", rank_to_mask, minimum=0, maximum=self.group_size - 1, why="the group's ranks")
        if chk.expect_bool("mask", mask):
            raise NotImplementedError("masking a rank is DeepEP's shrink mode, which deepport does not have: every "
                                      "rank takes part in every dispatch and combine")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        """Write each rank's mask status into ``mask_status`` (int32 ``[num_ranks]``): all 0, no rank is masked."""
        self._check_alive()
        status = chk.expect_tensor("mask_status", mask_status)
        chk.expect_dtype("mask_status", status, (torch.int32,))
        chk.expect_shape("mask_status", status, (self.group_size,), "[num_ranks]")
        status.zero_()

    def low_latency_clean_mask_buffer(self) -> None:
        """No-op: there is no mask to clean (no rank is ever masked)."""
        self._check_alive()

    def get_next_low_latency_combine_buffer(self, handle: LowLatencyHandle) -> torch.Tensor:
        """A bf16 ``[L, R * T_max, hidden]`` buffer owned by this Buffer; fill it with the expert outputs and
        call :meth:`low_latency_combine` with ``zero_copy=True`` to combine from it."""
        self._check_alive()
        h = low_latency_of(handle)
        routes = h.ll.routes
        shape = (routes.num_local_experts, routes.world_size * h.ll.max_tokens_per_rank, int(h[3]))
        buf = self._combine_buffer
        if buf is None or tuple(buf.shape) != shape or buf.device != routes.device:
            buf = self._combine_buffer = torch.zeros(shape, dtype=torch.bfloat16, device=routes.device)
        return buf


def _check_hook_flags(async_finish: object, return_recv_hook: object) -> None:
    if chk.expect_bool("async_finish", async_finish) and chk.expect_bool("return_recv_hook", return_recv_hook):
        raise InvalidArgumentError("return_recv_hook", "expected async_finish=False with return_recv_hook=True "
                                   "(DeepEP's rule), got both True")
