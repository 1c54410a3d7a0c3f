"""The state every DeepEP ``Buffer`` method shares: the group, the backend, liveness and events."""

from __future__ import annotations

from typing import Any

import torch

from deepport.compat.deep_ep.event import EventHandle, EventOverlap
from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import _checks as chk

Payload = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class BufferCore:
    """Constructor and shared helpers of :class:`deepport.compat.deep_ep.Buffer` (see its docstring)."""

    def __init__(self, group: Any, num_nvl_bytes: int = 0, num_rdma_bytes: int = 0, low_latency_mode: bool = False,
                 num_qps_per_rank: int = 24, allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm: Any = None, *,
                 backend: str | None = None) -> None:
        if comm is not None:
            raise InvalidArgumentError("comm", "mpi4py communicators are not supported; pass a torch.distributed "
                                       "group (or None for one process)")
        if chk.expect_bool("enable_shrink", enable_shrink):
            raise InvalidArgumentError("enable_shrink", "shrink mode (masking failed ranks) is not part of deepport; "
                                       "expected False, got True")
        self.num_nvl_bytes = chk.expect_int("num_nvl_bytes", num_nvl_bytes, minimum=0)
        self.num_rdma_bytes = chk.expect_int("num_rdma_bytes", num_rdma_bytes, minimum=0)
        self.low_latency_mode = chk.expect_bool("low_latency_mode", low_latency_mode)
        self.num_qps_per_rank = chk.expect_int("num_qps_per_rank", num_qps_per_rank, minimum=1)
        self.allow_nvlink_for_low_latency_mode = chk.expect_bool("allow_nvlink_for_low_latency_mode",
                                                                 allow_nvlink_for_low_latency_mode)
        self.allow_mnnvl = chk.expect_bool("allow_mnnvl", allow_mnnvl)
        self.explicitly_destroy = chk.expect_bool("explicitly_destroy", explicitly_destroy)
        self.enable_shrink = False
        self.backend = backend
        self.group = group
        if group is None:
            self.rank, self.group_size = 0, 1
        else:
            import torch.distributed as dist

            if not isinstance(group, dist.ProcessGroup):
                raise ArgumentTypeError("group", f"expected a torch.distributed.ProcessGroup or None, got "
                                        f"{type(group).__name__}")
            self.rank, self.group_size = dist.get_rank(group), dist.get_world_size(group)
        self._alive = True
        self._combine_buffer: torch.Tensor | None = None

    def destroy(self) -> None:
        """Release the Buffer (needs ``explicitly_destroy=True``, as DeepEP); later calls raise."""
        if not self.explicitly_destroy:
            raise InvalidArgumentError("explicitly_destroy", "destroy() needs Buffer(..., explicitly_destroy=True)")
        self._alive = False
        self._combine_buffer = None

    def get_comm_stream(self) -> Any:
        """The stream the communication runs on: deepport runs every op on the caller's current stream, so
        this is the current CUDA stream when CUDA is in use (waiting on it, or recording on it, is then
        exactly the ordering DeepEP's comm stream gives), else ``torch.cpu.current_stream()``, a stream
        object with nothing to wait for (ops off CUDA are synchronous)."""
        self._check_alive()
        if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            return torch.cuda.current_stream()
        return torch.cpu.current_stream()

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: torch.Size | None = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        """Not supported: DeepEP returns a view of its registered NVLink/RDMA buffer, which callers write
        into for zero-copy transfers; deepport allocates per call and has no such buffer, so any tensor
        returned here would silently not be what the next op reads. Always raises ``NotImplementedError``
        (for the low-latency combine, :meth:`get_next_low_latency_combine_buffer` works)."""
        raise NotImplementedError("Buffer.get_local_buffer_tensor: deepport has no registered communication "
                                  "buffer (outputs are allocated per call), so a view of one cannot be given; "
                                  "pass tensors to the ops instead (low-latency combine: use "
                                  "get_next_low_latency_combine_buffer with zero_copy=True)")

    def _check_alive(self) -> None:
        if not self._alive:
            raise RuntimeError("this Buffer was destroyed")

    def _before(self, previous_event: EventOverlap | None) -> None:
        self._check_alive()
        if previous_event is not None:
            if not isinstance(previous_event, EventOverlap):
                raise ArgumentTypeError("previous_event", f"expected an EventOverlap or None, got "
                                        f"{type(previous_event).__name__}")
            if previous_event.event is not None:
                previous_event.event.current_stream_wait()

    @staticmethod
    def _after(async_finish: bool, device: torch.device) -> EventOverlap:
        return EventOverlap(EventHandle(device)) if chk.expect_bool("async_finish", async_finish) else EventOverlap()
