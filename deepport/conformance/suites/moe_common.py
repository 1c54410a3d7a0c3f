"""What the MoE conformance suites share: parameters, the per-rank input generator, multi-rank runs.

Generator (version 2: version 1 plus ``cold_ranks``; every version-1 case's inputs are unchanged). Rank
``r`` of a case draws its inputs from
``numpy.random.Generator(PCG64(SeedSequence([seed, r])))``, so every rank of a multi-process run and
the harness (which regenerates the whole world to compute the reference) get the same bits:

- routing: ``topk`` distinct experts per token (the largest of uniform scores; a ``hot`` expert is
  forced into every token's top-k; the experts of the ``cold_ranks`` are never chosen, so those ranks
  receive no row; experts are owned in contiguous blocks of ``experts / max(world, num_ranks)``), then a
  fraction ``drop`` of slots set to -1, a fraction
  ``nowhere`` of tokens routed nowhere (all -1), a fraction ``dup`` of tokens naming their first
  expert twice (slot 1 := slot 0);
- weights: float32 uniform in [0.5, 1.5);
- payload ``x``: bf16 N(0, 1), or with ``fp8`` e4m3 of 4 N(0, 1) plus float32 scales in [0.5, 1.5)
  (column-major when ``colmajor_scales``); columns 0..2 encode provenance exactly: ``rank + 1``,
  ``token % 16 + 1``, ``token // 16 % 16 + 1`` (small integers, exact in bf16 and e4m3);
- ``x2``: a second payload of the same kind (for cached re-dispatch).

A case of ``world`` > 1 runs every rank in its own process (:mod:`deepport.conformance.rank_group`,
gloo on CPU, NCCL on CUDA with one GPU per rank); each rank loads the run's plugins
(:mod:`~deepport.conformance.plugins`), generates its own inputs, calls the op with the harness's
backend, checks it left its inputs unchanged, and returns its outputs, which the harness concatenates
along dimension 0 in rank order and judges against the float64 reference of the whole world. Every
output tensor the op allocates comes from a poisoning ``alloc`` (NaN, or the integer minimum), and
must be one the op returned.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch

from deepport.conformance.call import poisoned, synchronize
from deepport.conformance.case import Case, make_case
from deepport.conformance.plugins import load_plugins, loaded_specs
from deepport.conformance.rank_group import pack, rank_group, unpack
from deepport.errors import BackendNotSupportedError

GENERATOR_VERSION = 2
FP8 = torch.float8_e4m3fn

DEFAULTS: dict[str, Any] = dict(
    world=1, tokens=(24,), hidden=256, experts=16, topk=4, drop=0.1, nowhere=0.1, dup=0.0, hot=None,
    fp8=False, colmajor_scales=False, alignment=1, idx_dtype="int64", t_max=None, use_fp8=False, num_ranks=1,
    cold_ranks=(),
)


def case(op: str, tier: str, name: str, **overrides: Any) -> Case:
    """A case of ``op``; multi-rank cases are ``extension`` (they need ``world`` devices of a kind)."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown MoE case parameters {sorted(unknown)}")
    p = {**DEFAULTS, **overrides}
    p["tokens"] = tuple(p["tokens"])
    p["cold_ranks"] = tuple(p["cold_ranks"])
    ranks = max(p["world"], p["num_ranks"])
    cold = len(p["cold_ranks"]) * (p["experts"] // ranks)
    if any(not 0 <= r < ranks for r in p["cold_ranks"]) or p["topk"] > p["experts"] - cold or (
            p["hot"] is not None and p["hot"] // (p["experts"] // ranks) in p["cold_ranks"]):
        raise ValueError(f"{name}: cold_ranks {p['cold_ranks']} must be ranks of {ranks}, leave topk experts "
                         f"and not hold the hot expert")
    p["dtype"] = "float8_e4m3fn" if p["fp8"] or p["use_fp8"] else "bfloat16"  # the payload: tolerance key
    if len(p["tokens"]) != p["world"]:
        raise ValueError(f"{name}: tokens {p['tokens']} must give one count per rank of world {p['world']}")
    features = [f"world_{p['world']}", "fp8" if p["fp8"] or p["use_fp8"] else "bfloat16"]
    features += [f for f, on in (("tokens_routed_nowhere", p["nowhere"] > 0), ("duplicate_experts", p["dup"] > 0),
                                 ("hot_expert", p["hot"] is not None), ("empty_rank", 0 in p["tokens"]),
                                 ("rank_receives_nothing", bool(p["cold_ranks"])),
                                 ("nothing_routed", p["nowhere"] >= 1.0),
                                 ("uneven_ranks", len(set(p["tokens"])) > 1), ("colmajor_scales",
                                                                               p["colmajor_scales"]))
                 if on]
    profile = "core" if p["world"] == 1 else "extension"
    return make_case(op, name, tier, profile, tuple(features), p)


@dataclass
class Inputs:
    """Pristine inputs of every rank (``"name@rank"`` CPU tensors) and the case's parameters."""

    tensors: dict[str, torch.Tensor]
    op: str
    params: dict[str, Any]
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)

    def rank(self, r: int) -> dict[str, torch.Tensor]:
        suffix = f"@{r}"
        return {n.removesuffix(suffix): t for n, t in self.tensors.items() if n.endswith(suffix)}

    @property
    def world(self) -> int:
        return int(self.params["world"])


def _tensor(a: np.ndarray) -> torch.Tensor:
    """A fresh tensor with standard strides (``from_numpy`` keeps numpy's, which may be 0 on empty arrays)."""
    src = torch.from_numpy(np.ascontiguousarray(a))
    out = torch.empty(tuple(a.shape), dtype=src.dtype)
    return out.copy_(src) if a.size else out


def _routing(p: Mapping[str, Any], rng: np.random.Generator, t: int) -> np.ndarray:
    experts, k = p["experts"], p["topk"]
    scores = rng.random((t, experts))
    if p["hot"] is not None:
        scores[:, p["hot"]] = 2.0
    per_rank = experts // max(p["world"], p["num_ranks"])
    for r in p["cold_ranks"]:
        scores[:, r * per_rank:(r + 1) * per_rank] = -1.0
    idx = np.argsort(-scores, axis=1, kind="stable")[:, :k].astype(np.int64)
    idx[rng.random((t, k)) < p["drop"]] = -1
    idx[rng.random(t) < p["nowhere"]] = -1
    if k > 1:
        dup = rng.random(t) < p["dup"]
        idx[dup, 1] = idx[dup, 0]
    return idx


def _payload(p: Mapping[str, Any], rng: np.random.Generator, r: int, t: int) -> dict[str, torch.Tensor]:
    h = p["hidden"]
    tokens = np.arange(t)
    marks = np.stack([np.full(t, r + 1), tokens % 16 + 1, tokens // 16 % 16 + 1], axis=1).astype(np.float32)
    if not p["fp8"]:
        x = rng.standard_normal((t, h), dtype=np.float32)
        x[:, :3] = marks
        return {"x": _tensor(x).to(torch.bfloat16)}
    x = np.clip(4 * rng.standard_normal((t, h), dtype=np.float32), -448, 448)
    x[:, :3] = marks
    scales = (0.5 + rng.random((h // 128, t), dtype=np.float32))
    s = _tensor(scales)
    return {"x": _tensor(x).to(FP8), "x_scales": s.t() if p["colmajor_scales"] else s.t().contiguous()}


def rank_inputs(p: Mapping[str, Any], seed: int, r: int) -> dict[str, torch.Tensor]:
    """Rank ``r``'s inputs (CPU tensors), a pure function of (params, seed, rank)."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, r])))
    t = p["tokens"][r]
    idx = _routing(p, rng, t)
    weights = (0.5 + rng.random(idx.shape, dtype=np.float32))
    out = {"topk_idx": _tensor(idx).to(getattr(torch, p["idx_dtype"])),
           "topk_weights": _tensor(weights)}
    out.update(_payload(p, rng, r, t))
    out.update({n.replace("x", "x2", 1): v for n, v in _payload(p, rng, r, t).items()})
    return out


def generate(case_: Case, seed: int) -> Inputs:
    p = dict(case_.params)
    tensors = {f"{n}@{r}": t for r in range(p["world"]) for n, t in rank_inputs(p, seed, r).items()}
    return Inputs(tensors, case_.op, p, seed)


def payload(inputs: Mapping[str, torch.Tensor], name: str = "x") -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The op's ``x`` argument: the bf16 tensor, or the FP8 tuple."""
    if f"{name}_scales" in inputs:
        return inputs[name], inputs[f"{name}_scales"]
    return inputs[name]


def dtype_name(inputs: Inputs) -> str:
    return str(inputs.params["dtype"])


# --- the call side ------------------------------------------------------------------------------------


class RankCall:
    """What one rank's op runner gets: its device inputs, a poisoning allocator, the group and backend."""

    def __init__(self, inputs: dict[str, torch.Tensor], params: Mapping[str, Any], backend: str, group: Any,
                 device: torch.device) -> None:
        self.inputs, self.params, self.backend, self.group, self.device = inputs, params, backend, group, device
        self._allocated: list[torch.Tensor] = []

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = poisoned(tuple(shape), dtype, self.device)
        self._allocated.append(t)
        return t

    def owned(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t`` must live in memory the op obtained from ``alloc`` (else unwritten elements could hide)."""
        if t.numel() == 0:
            return t
        ptr = t.untyped_storage().data_ptr()
        if not any(a.untyped_storage().data_ptr() == ptr for a in self._allocated):
            raise RuntimeError(f"output `{name}` was not obtained from the call's `alloc`")
        return t


NOT_SUPPORTED = "__not_supported__"
"""The key of a rank's answer when the backend refused the call: ``(op, reasons)`` instead of outputs."""


def run_rank(rank: int, group: Any, device: torch.device, op: str, params: dict[str, Any], seed: int,
             backend: str, plugins: tuple[str, ...] = ()) -> dict[str, Any]:
    """One rank's half of a case: load the run's plugins (the backend may be one), generate, call, check
    the inputs are unchanged, pack the outputs. A backend that declares it cannot run the call
    (:class:`BackendNotSupportedError`, raised by dispatch before any collective) is answered as data,
    ``{NOT_SUPPORTED: (op, reasons)}``, so the case is ``not_supported`` as in a world of one."""
    load_plugins(plugins)
    suite = _suite(op)
    mine = {n: t.to(device, copy=True) for n, t in rank_inputs(params, seed, rank).items()}
    try:
        outs = suite.run(RankCall(mine, params, backend, group, device))
    except BackendNotSupportedError as exc:
        if group is None:
            raise
        return {NOT_SUPPORTED: (exc.op, exc.reasons)}
    synchronize(device)
    for n, t in rank_inputs(params, seed, rank).items():
        if not torch.equal(mine[n].cpu().view(torch.uint8) if t.dtype == FP8 else mine[n].cpu(),
                           t.view(torch.uint8) if t.dtype == FP8 else t):
            raise RuntimeError(f"input `{n}` was modified by the call")
    return {n: pack(t) for n, t in outs.items()}


def _suite(op: str) -> ModuleType:
    return importlib.import_module(f"deepport.conformance.suites.{op}")


def invoke(inputs: Inputs, tensors: Mapping[str, torch.Tensor], backend: str,
           outputs: Mapping[str, torch.Tensor]) -> None:
    """Run the case's ranks (in this process for a world of one) and write their outputs, concatenated
    in rank order, into the harness's ``outputs``."""
    device = next(iter(tensors.values())).device
    world = inputs.world
    if world == 1:
        results = [run_rank(0, None, device, inputs.op, inputs.params, inputs.seed, backend)]
    else:
        _check_world_supported(inputs.op, backend, world, device)
        results = rank_group(world, device.type).run(
            "deepport.conformance.suites.moe_common:run_rank", world, label=f"{inputs.op} on {backend}",
            op=inputs.op, params=inputs.params, seed=inputs.seed, backend=backend, plugins=loaded_specs())
        refused = [r[NOT_SUPPORTED] for r in results if NOT_SUPPORTED in r]
        if refused:
            op, reasons = refused[0]
            raise BackendNotSupportedError(op, backend, "the backend= argument", reasons)
    for name, out in outputs.items():
        parts = [unpack(r[name]) for r in results]
        wrong = [f"rank {i}: {p.dtype}" for i, p in enumerate(parts) if p.dtype != out.dtype]
        if wrong:
            raise RuntimeError(f"output `{name}`: expected dtype {out.dtype}, got {', '.join(wrong)}")
        joined = torch.cat([p.view(torch.uint8) if p.dtype == FP8 else p for p in parts])
        target = out.view(torch.uint8) if out.dtype == FP8 else out
        target.copy_(joined.reshape(target.shape).to(out.device))


def _check_world_supported(op: str, backend: str, world: int, device: torch.device) -> None:
    if device.type == "cuda":
        have = torch.cuda.device_count()
        if have < world:
            raise BackendNotSupportedError(op, backend, "the conformance suite", [
                f"a {world}-rank NCCL case needs {world} CUDA devices (one per rank), this machine has {have}"])
    elif device.type != "cpu":
        raise BackendNotSupportedError(op, backend, "the conformance suite", [
            f"multi-rank cases run on cpu (gloo) or cuda (NCCL), got {device.type}"])


# --- the judging side ---------------------------------------------------------------------------------


Specs = dict[str, tuple[tuple[int, ...], torch.dtype]]


def world_specs(inputs: Inputs, rank_specs: Callable[[Inputs, int], Specs]) -> Specs:
    """Per-rank output specs joined along dimension 0."""
    per_rank = [rank_specs(inputs, r) for r in range(inputs.world)]
    joined: Specs = {}
    for name, (shape, dtype) in per_rank[0].items():
        rows = sum(spec[name][0][0] for spec in per_rank)
        joined[name] = ((rows, *shape[1:]), dtype)
    return joined


def world_reference(inputs: Inputs, rank_reference: Callable[[Inputs, int], dict[str, np.ndarray]]
                    ) -> dict[str, np.ndarray]:
    per_rank = [rank_reference(inputs, r) for r in range(inputs.world)]
    return {n: np.concatenate([ref[n] for ref in per_rank], axis=0) for n in per_rank[0]}


def f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy()


def i64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.int64).numpy()


def world_topk(inputs: Inputs) -> list[np.ndarray]:
    return [i64(inputs.rank(r)["topk_idx"]) for r in range(inputs.world)]


def world_weights(inputs: Inputs) -> list[np.ndarray]:
    return [f64(inputs.rank(r)["topk_weights"]) for r in range(inputs.world)]
