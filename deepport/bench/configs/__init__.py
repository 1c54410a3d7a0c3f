"""Benchmark configurations as data: one module per op, ``deepport/bench/configs/<op>.py``.

Protocol (how to add an op's configs)
-------------------------------------
1. Write ``deepport/bench/configs/<op>.py`` exposing ``CONFIGS: tuple[BenchConfig, ...]``. Each
   :class:`BenchConfig` carries:

   - ``name`` (unique within the op, used by ``--config PATTERN``) and ``op`` (a name in
     ``deepport.kernels.OPS``, or the op family's name for multi-op configs such as MoE);
   - ``params``: the shape, as plain JSON-ready data (recorded in the results file);
   - ``build(device, seed) -> Workload``: allocates random inputs (never zeros) *on the device* from
     ``seed`` and preallocated outputs, and returns the closures the runner times (see :class:`Workload`);
     the same seed gives the same inputs, so every backend of a run sees identical data;
   - ``flops`` and ``bytes``: counted with :mod:`deepport.bench.counting` (the rules: ``benchmarks/README.md``);
   - ``ceiling``: the logical ceiling that bounds it: ``"memory"`` (memory-bound), ``"bf16_matmul"`` or
     ``"fp8_matmul"`` (compute-bound), or a name added to :data:`deepport.bench.ceilings.CEILINGS`
     (e.g. the MoE op's ``"nvlink_all_to_all"``); :func:`deepport.bench.ceilings.resolve` maps it to the
     microbenchmark measured on the device of the run (on a CPU: memcpy / fp32 matmul);
   - ``check_case``: the id of a case of the op's conformance suite (``deepport/conformance/suites``)
     with the same head/operand layout, small enough for the float64 reference; every backend must
     pass it (full conformance check: poisoned outputs, tolerances of the suite) before it is timed.
     Instead (or as well), the workload may carry ``reference_check``: a float64 reference of part of
     the config's own call (e.g. sampled output rows of a GEMM, which are independent), judged by the
     conformance checker; at least one of the two must exist;
   - ``agreement``: bound on DeepGEMM's ``calc_diff`` between a backend's output and the baseline
     backend's output on the config's own (full-size) inputs: the second half of the check. Take
     ``(sqrt(c1) + sqrt(c2))**2`` for backends each within ``c`` of the float64 answer;
   - ``cpu``: ``True`` for tiny configs meant for CPUs (CI); a CPU run takes only these, a GPU run
     only the others;
   - ``world_size`` and ``distributed``: see below.
2. Name the module in the op's descriptor (``bench=`` in ``deepport.kernels.DESCRIPTORS``); ops of a
   family may share one module, which is read once.

Multi-process configs (``world_size > 1``)
------------------------------------------
A config with ``world_size > 1`` is not timed by the single-process runner: it must set
``distributed``, a callable ``(config, request) -> list[BenchResult]`` (``request`` is a
:class:`deepport.bench.runner.Request`: backends, baseline, device type, quick, seed). It spawns
``world_size`` processes itself (``torch.multiprocessing.spawn``, NCCL on GPUs / gloo on CPUs),
checks each backend against the reference and the baseline, times with
:mod:`deepport.bench.timing` on every rank behind a barrier, and returns rank 0's results (one per
backend, plus a raw collective measured in the same run, e.g. NCCL ``all_to_all_single``, reported
as its own backend name such as ``"nccl_all_to_all"``). Each result carries its ``check`` and
``timing`` (:meth:`deepport.bench.timing.Timing.summary`) and has ``set_time(median_us)`` applied; the
runner then records them like any other result, resolves the ``ceiling`` and computes the ratio to
the run's baseline backend. A run skips such configs (recorded as
``skipped`` with the reason) when fewer devices than ``world_size`` are visible.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deepport.kernels import descriptors

BackendCall = Callable[[], None]


@dataclass
class Workload:
    """One set of inputs and outputs of a config, on one device.

    - ``call(backend)``: returns a closure that calls the *public* op with ``backend=`` explicit,
      writing into ``outputs`` (the closure is what is timed; it must not allocate what it can reuse);
    - ``bound_call(backend)``: validates the arguments once (the op's ``bind``) and returns a closure that
      runs the backend's implementation on that already-bound call (host overhead = public - bound);
    - ``outputs``: the preallocated outputs the calls write, by name;
    - ``footprint_bytes``: bytes of inputs and outputs one call touches (decides L2 rotation);
    - ``reference_check``: optional; judges the current ``outputs`` against a float64 reference of (part
      of) this workload's call and returns ``{"passed": bool, "message": str, ...}`` (JSON-ready);
    - ``agreement_masks``: optional, by output name, a boolean tensor broadcastable to that output: the
      elements the op specifies, the only ones the agreement with the baseline compares (outputs with
      unspecified parts, such as rows past each expert's count in a fixed-capacity layout).
    """

    call: Callable[[str], BackendCall]
    bound_call: Callable[[str], BackendCall]
    outputs: Mapping[str, torch.Tensor]
    footprint_bytes: int
    reference_check: Callable[[], dict[str, Any]] | None = None
    agreement_masks: Mapping[str, torch.Tensor] | None = None


def bound_runner(op: str, bind: Callable[[], Any], *outputs: torch.Tensor) -> Callable[[str], BackendCall]:
    """A :attr:`Workload.bound_call`: per backend, the op's arguments validated once (``bind()``, the op's
    ``bind``; its checked allocator remembers what it handed out, so calls never alias each other's
    outputs), then a closure that runs the backend's implementation on that bound call (and ``outputs``,
    for ops whose implementations take them)."""
    def bound_call(backend: str) -> BackendCall:
        from deepport.dispatch import registry

        impl = registry.get(backend).implementation(op)
        bound = bind()

        def run() -> None:
            impl(bound, *outputs)

        return run

    return bound_call


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark configuration (see the module docstring for every field's contract)."""

    name: str
    op: str
    params: Mapping[str, Any]
    build: Callable[[torch.device, int], Workload]
    flops: float
    bytes: float
    ceiling: str
    check_case: str | None
    cpu: bool = False
    agreement: float = 1e-5
    world_size: int = 1
    distributed: Callable[..., list[Any]] | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        return f"{self.op}/{self.name}"

    @property
    def bound(self) -> str:
        """``"memory"`` or ``"compute"``: which figure is compared with the ceiling."""
        return "memory" if self.ceiling == "memory" else "compute"


def config_modules() -> list[str]:
    """The modules exposing ``CONFIGS``: each op descriptor's ``bench``, once each, in descriptor order."""
    return list(dict.fromkeys(d.bench for d in descriptors() if d.bench is not None))


def all_configs() -> list[BenchConfig]:
    """Every registered config, in registration order (module order, then each module's order)."""
    import importlib

    found: list[BenchConfig] = []
    seen: set[str] = set()
    for name in config_modules():
        for config in importlib.import_module(name).CONFIGS:
            if config.id in seen:
                raise ValueError(f"duplicate bench config {config.id!r} (in {name})")
            seen.add(config.id)
            found.append(config)
    return found


def select(device_type: str, ops: Sequence[str] | None = None, pattern: str | None = None) -> list[BenchConfig]:
    """The configs for a device type (CPU: the ``cpu`` ones; otherwise the others), by op and by
    ``pattern`` (a glob or substring of ``op/name``)."""
    configs = all_configs()
    known = {c.op for c in configs}
    unknown = set(ops or ()) - known
    if unknown:
        raise ValueError(f"no bench configs for {sorted(unknown)}; ops with configs: {sorted(known)}")
    return [c for c in configs
            if c.cpu == (device_type == "cpu")
            and (not ops or c.op in ops)
            and (not pattern or fnmatch.fnmatch(c.id, pattern) or fnmatch.fnmatch(c.name, pattern)
                 or pattern in c.id)]
