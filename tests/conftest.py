"""Shared fixtures: small valid MLA decode inputs on the CPU, and backends that record their calls.

A recording backend's implementation appends ``(backend name, call)`` to :data:`RUNS` and writes
zeros, so a test can see which backend ran (or that none did) without trusting dispatch's word.

With no CUDA device, ``TRITON_INTERPRET=1`` is set here, before any test module imports a Triton
kernel (triton reads it when a kernel is decorated), so the triton backend runs through its interpreter.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from deepport.dispatch import Backend, OpSupport, Requirement, registered
from deepport.kernels.mla_decode import MLADecodeCall

RUNS: list[tuple[str, MLADecodeCall]] = []


@dataclasses.dataclass(frozen=True)
class MLAInputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    head_dim_v: int

    @property
    def args(self) -> tuple[Any, ...]:
        return self.q, self.k_cache, self.block_table, self.cache_seqlens, self.head_dim_v

    def replace(self, **changes: Any) -> MLAInputs:
        return dataclasses.replace(self, **changes)


def make_mla_inputs(*, lens: tuple[int, ...] = (5, 33), s_q: int = 2, h_q: int = 4, h_kv: int = 2, d_qk: int = 64,
                    d_v: int = 32, page: int = 16, max_blocks: int = 3, num_blocks: int = 8,
                    dtype: torch.dtype = torch.bfloat16, seed: int = 0) -> MLAInputs:
    """Random inputs; each request's pages are distinct blocks, unused table slots hold valid ids."""
    g = torch.Generator().manual_seed(seed)
    b = len(lens)
    q = torch.randn(b, s_q, h_q, d_qk, generator=g).to(dtype)
    k_cache = torch.randn(num_blocks, page, h_kv, d_qk, generator=g).to(dtype)
    table = torch.stack([torch.randperm(num_blocks, generator=g)[:max_blocks] for _ in range(b)]) if b else \
        torch.zeros(0, max_blocks, dtype=torch.int64)
    return MLAInputs(q, k_cache, table.to(torch.int32).contiguous(), torch.tensor(lens, dtype=torch.int32), d_v)


def _entry_for(name: str) -> str:
    """A ``module:function`` entry that records runs under ``name`` (one stable function per name)."""
    attr = f"_recording_run_{name}"
    module = sys.modules[__name__]
    if not hasattr(module, attr):
        def run(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
            RUNS.append((name, call))
            out.zero_()
            lse.zero_()

        setattr(module, attr, run)
    return f"{__name__}:{attr}"


def recording_backend(name: str, priority: dict[str, int] | None = None, *,
                      requirements: tuple[Requirement, ...] = (), probe: Callable[[], str | None] | None = None,
                      dtypes: frozenset[torch.dtype] = frozenset({torch.bfloat16, torch.float16})) -> Backend:
    """A backend implementing mla_decode by recording; never chosen automatically unless given a priority."""
    support = OpSupport(op="mla_decode", entry=_entry_for(name), dtypes=dtypes, requirements=requirements)
    extra: dict[str, Any] = {} if probe is None else {"probe": probe}
    return Backend(name=name, summary=f"test backend {name}", version="0", ops=(support,),
                   priority=priority or {}, **extra)


@pytest.fixture
def runs() -> Iterator[list[tuple[str, MLADecodeCall]]]:
    """The log of recording-backend runs, empty at the start of the test."""
    RUNS.clear()
    yield RUNS
    RUNS.clear()


@pytest.fixture
def spy(runs: list[tuple[str, MLADecodeCall]]) -> Iterator[list[tuple[str, MLADecodeCall]]]:
    """A registered recording backend named "spy" (never chosen automatically); yields the run log."""
    with registered(recording_backend("spy")):
        yield runs


@pytest.fixture
def make_backend() -> Callable[..., Backend]:
    return recording_backend


@pytest.fixture
def mla_inputs() -> Callable[..., MLAInputs]:
    """Factory of small valid MLA decode inputs (defaults: b=2, s_q=2, h_q=4, h_kv=2, 64/32, page 16)."""
    return make_mla_inputs


@pytest.fixture
def one_rank(tmp_path: Path) -> Iterator[Any]:
    """A gloo process group of one rank (this process) on the CPU, destroyed after the test."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``DEEPPORT_*`` setting (backend choices for any op, value checks ...) inherited from the caller's
    environment (opt in per module)."""
    for var in [v for v in os.environ if v.startswith("DEEPPORT_")]:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(autouse=True)
def _forget_plugin_specs() -> Iterator[None]:
    """A test that loads a plugin (``--plugin``/``--backend module:object``) must not make every later
    run's rank and isolation processes import it: the spec list is process-wide."""
    from deepport.conformance import plugins

    saved = plugins.loaded_specs()
    yield
    plugins._loaded[:] = list(saved)
