"""DeepEP's ``EventOverlap`` / ``EventHandle``: stream dependencies around the communication ops.

deepport runs every MoE op on the caller's current stream and returns when it is enqueued (CPU: when
it is done). So an event captured after an op is already ordered before later work on that stream;
``current_stream_wait()`` keeps DeepEP's calling pattern working (and orders other streams on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class EventHandle:
    """A point on the current stream: a recorded ``torch.cuda.Event`` on CUDA, nothing to wait for on
    other devices (their ops are synchronous). ``device`` defaults to the current CUDA device when CUDA
    is initialised, else the CPU."""

    def __init__(self, device: torch.device | None = None) -> None:
        if device is None:
            on_cuda = torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
            device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
        self.device = device
        self.event: torch.cuda.Event | None = None
        if device.type == "cuda":
            self.event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            self.event.record(torch.cuda.current_stream(device))

    def current_stream_wait(self) -> None:
        """Make the current stream wait for this point (no-op off CUDA)."""
        if self.event is not None:
            torch.cuda.current_stream(self.device).wait_event(self.event)


class EventOverlap:
    """DeepEP's event wrapper: ``event`` (an :class:`EventHandle` or ``None``) and ``extra_tensors`` kept
    alive with it. Every op returns one; ``event`` is set only when the op ran with ``async_finish=True``.

    Use: ``event.current_stream_wait()``, or ``with event: ...`` (the current stream waits on exit).
    """

    def __init__(self, event: EventHandle | None = None, extra_tensors: tuple[torch.Tensor, ...] | None = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors
        self.hook_after_wait: Callable[[], Any] | None = None
        self._release_handle_by_call = False

    def current_stream_wait(self, release_handle: bool = False) -> None:
        """The current stream waits for the event; raises if there is none (as DeepEP asserts)."""
        if self.event is None:
            raise RuntimeError("this EventOverlap holds no event: the op ran with async_finish=False, so it has "
                               "already been ordered on the current stream; there is nothing to wait for")
        self.event.current_stream_wait()
        if self.hook_after_wait is not None:
            self.hook_after_wait()
            self.hook_after_wait = None
        if release_handle:
            self.event = None

    def register_hook_after_wait(self, hook_after_wait: Callable[[], Any]) -> None:
        """Run ``hook_after_wait`` once, after the next :meth:`current_stream_wait`."""
        if self.hook_after_wait is not None:
            raise RuntimeError("a hook is already registered on this EventOverlap")
        self.hook_after_wait = hook_after_wait

    def __call__(self, release_handle: bool = False) -> EventOverlap:
        """``with event(release_handle=True): ...`` drops the event after the wait."""
        self._release_handle_by_call = release_handle
        return self

    def __enter__(self) -> EventOverlap:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.event is not None:
            self.current_stream_wait(release_handle=self._release_handle_by_call)
        self._release_handle_by_call = False
