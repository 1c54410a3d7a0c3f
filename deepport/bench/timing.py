"""Timing: median of samples after warm-up, by the method that measures the kernels and not the host.

- CUDA, calls that can be captured: a CUDA graph of several calls (about 2 ms of them, at least
  ``GRAPH_MIN_CALLS``), replayed; one sample = one replay timed with CUDA events, divided by the calls in it
  (launch overhead excluded). Capture runs on torch's side stream (``torch.cuda.graph``). Every capturable
  call is timed this way, whatever its length, so the backends of one config share a method: single
  calls between host synchronisations (the method for long calls until 2026-12-02) leave the GPU idle
  between calls (most likely its clocks drop) and read up to 15% slower on an H200 for the same 1 ms
  kernel, which made a ratio between a graph-timed and an events-timed backend near the bound unfair.
- CUDA, calls that cannot be captured (a call synchronises, reads a value on the host ...; the reason is
  recorded): estimated by the fastest of three rounds of events around the calls; under
  ``GRAPH_BELOW_US`` (1 ms) timed with events around a loop of calls (host overhead included), longer
  ones with CUDA events around each call, L2 flushed (a write of twice its size) before each.
- Inputs smaller than twice the L2 are rotated: several copies (different seeds), called in turn.
- CPU (and other devices): ``time.perf_counter`` around each call (after a device synchronisation).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deepport.conformance.call import synchronize

GRAPH_BELOW_US = 1000.0
GRAPH_MIN_CALLS = 3  # a graph of long calls still holds a few, so the GPU never idles between two of them
DEFAULT_L2_BYTES = 60 << 20  # the H200's, when the device does not say


@dataclass
class Timing:
    """How one (config, backend) was timed and what came out (per-call times in microseconds)."""

    method: str  # "cuda_graph", "cuda_events", "cpu_perf_counter"
    samples_us: list[float]
    calls_per_sample: int = 1
    input_copies: int = 1
    l2_flush: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples_us)
        return {
            "method": self.method, "calls_per_sample": self.calls_per_sample, "input_copies": self.input_copies,
            "l2_flush": self.l2_flush, "notes": self.notes,
            "samples": {"n": len(s), "median_us": statistics.median(s), "min_us": s[0], "max_us": s[-1],
                        "mean_us": statistics.fmean(s), "stdev_us": statistics.stdev(s) if len(s) > 1 else 0.0,
                        "p10_us": _quantile(s, 0.1), "p90_us": _quantile(s, 0.9)},
            "samples_us": list(self.samples_us),  # in the order taken
        }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _event() -> torch.cuda.Event:
    return torch.cuda.Event(enable_timing=True)  # type: ignore[no-untyped-call]


def l2_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        size = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0)
        return size or DEFAULT_L2_BYTES
    return DEFAULT_L2_BYTES


def copies_for_rotation(footprint_bytes: int, device: torch.device, most: int = 16) -> int:
    """How many input copies make the rotation larger than twice the L2 (1 when one copy already is)."""
    if device.type != "cuda":
        return 1
    return max(1, min(most, math.ceil(2 * l2_bytes(device) / max(footprint_bytes, 1))))


@contextlib.contextmanager
def environment_var(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def time_calls(calls: Sequence[Callable[[], None]], device: torch.device, *, samples: int = 20,
               warmup: int = 3, graph_long_calls: bool = True) -> Timing:
    """Time ``calls`` (one closure per input copy, called in turn): see the module docstring.

    ``graph_long_calls=False`` keeps the method the ceilings were defined with: calls of 1 ms or more as
    single calls between CUDA events (L2 flushed), even when they could be captured. The ceilings need it:
    a device-to-device ``copy_`` captured in a graph becomes a memcpy node that the copy engines run, not
    the SMs (2767 against 4199 GB/s for the same 4 GiB copy on an H200, 2026-12-02)."""
    if not calls:
        raise ValueError("time_calls needs at least one call")
    for i in range(max(warmup, len(calls))):
        calls[i % len(calls)]()
    synchronize(device)
    if device.type != "cuda":
        return _time_host(calls, device, samples)
    estimate = min(_events_loop(calls, device, len(calls), 3))
    why_not = _synchronizes(calls[0])  # a call that syncs cannot be captured: do not even try
    if why_not is None and not graph_long_calls and estimate >= GRAPH_BELOW_US:
        why_not = "a ceiling's long call (single calls, as the ceilings are defined)"
    if why_not is None:
        if estimate >= GRAPH_BELOW_US:
            # events around calls include host time: a short kernel behind a slow host (hundreds of small
            # launches) estimates long. Ask the device: one replay of a graph of the calls.
            estimate = _graph_probe_us(calls, device) or estimate
        per_sample = max(GRAPH_MIN_CALLS, min(1000, math.ceil(2000.0 / max(estimate, 0.5))))
        if estimate < GRAPH_BELOW_US:
            per_sample = max(10, per_sample)
        try:
            return _time_graph(calls, device, samples, per_sample)
        except Exception as exc:  # capture failed: record why, time with events instead
            _recover(device)
            why_not = f"CUDA graph capture failed ({type(exc).__name__}: {str(exc)[:200]})"
    if estimate < GRAPH_BELOW_US:
        per_sample = max(10, min(1000, math.ceil(2000.0 / max(estimate, 0.5))))
        loop = _events_loop(calls, device, per_sample, samples)
        return Timing("cuda_events", loop, per_sample, len(calls),
                      notes=[f"{why_not}; events around a loop of calls include host launch overhead"])
    flushed = _time_events_flushed(calls, device, samples)
    flushed.notes.append(f"{why_not}; single calls, L2 flushed before each")
    return flushed


def _graph_probe_us(calls: Sequence[Callable[[], None]], device: torch.device) -> float | None:
    """Device time per call from the fastest of three replays of one graph of ``calls``, or ``None``
    when they cannot be captured (a call synchronises or fails under capture)."""
    if _synchronizes(calls[0]) is not None:
        return None
    try:
        return min(_time_graph(calls, device, 3, len(calls)).samples_us)
    except Exception:  # not capturable: the events estimate stands
        _recover(device)
        return None


def _synchronizes(call: Callable[[], None]) -> str | None:
    """Why ``call`` cannot be captured because it synchronises with the host (torch's sync debug mode
    catches ``.item()``, ``.cpu()``, ``nonzero`` ...), or ``None``."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
    except RuntimeError as exc:
        return f"the call synchronises with the host ({str(exc)[:200]})"
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    torch.cuda.synchronize()
    return None


def _time_host(calls: Sequence[Callable[[], None]], device: torch.device, samples: int) -> Timing:
    found = []
    for i in range(samples):
        synchronize(device)
        start = time.perf_counter()
        calls[i % len(calls)]()
        synchronize(device)
        found.append((time.perf_counter() - start) * 1e6)
    return Timing("cpu_perf_counter" if device.type == "cpu" else "host_perf_counter", found, 1, len(calls))


def _events_loop(calls: Sequence[Callable[[], None]], device: torch.device, per_sample: int,
                 samples: int) -> list[float]:
    found = []
    for _ in range(samples):
        start, end = _event(), _event()
        start.record()
        for i in range(per_sample):
            calls[i % len(calls)]()
        end.record()
        end.synchronize()
        found.append(start.elapsed_time(end) * 1e3 / per_sample)
    return found


def _time_graph(calls: Sequence[Callable[[], None]], device: torch.device, samples: int,
                per_sample: int) -> Timing:
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up on the capture stream (library handles, workspaces)
        for call in calls:
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    with torch.cuda.graph(graph, stream=side):  # raises if a call cannot be captured (a sync, a host read)
        for i in range(per_sample):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize(device)
    found = []
    for _ in range(samples):
        start, end = _event(), _event()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        found.append(start.elapsed_time(end) * 1e3 / per_sample)
    del graph
    return Timing("cuda_graph", found, per_sample, len(calls))


def _time_events_flushed(calls: Sequence[Callable[[], None]], device: torch.device, samples: int) -> Timing:
    flush = torch.empty(2 * l2_bytes(device), dtype=torch.uint8, device=device)
    found = []
    for i in range(samples):
        flush.zero_()
        start, end = _event(), _event()
        start.record()
        calls[i % len(calls)]()
        end.record()
        end.synchronize()
        found.append(start.elapsed_time(end) * 1e3)
    return Timing("cuda_events", found, 1, len(calls), l2_flush=True)


def _recover(device: torch.device) -> None:
    """After a failed capture (``torch.cuda.graph`` has ended it): check the context still works; raises
    if it does not, so the run stops instead of timing on a broken context."""
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("a CUDA graph capture is still open after a failed capture")
    torch.cuda.synchronize(device)
    torch.empty(1, device=device).add_(1)  # raises if the context is broken
    torch.cuda.synchronize(device)


def host_time_us(call: Callable[[], None], device: torch.device, reps: int = 30) -> float:
    """Median host time of one call, the device idle before each (what the caller's thread spends)."""
    found = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        call()
        found.append((time.perf_counter() - start) * 1e6)
    synchronize(device)
    return statistics.median(found)
