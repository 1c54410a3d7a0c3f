"""Conformance cases, input generator and reference hook for ``mla_decode``.

Generator (version 1), from ``numpy.random.Generator(PCG64(seed))`` so every backend and every
machine gets the same bits:

- lengths: ``s_k`` each, or with ``varlen`` ~ N(s_k, s_k/2) clamped to [min_len, 2*s_k] (min_len =
  s_q for causal cases, so only ``short_causal`` cases hold fully masked queries); a fraction
  ``zero_frac`` of requests set to 0; or the explicit ``lengths`` list.
- pages: each request's pages drawn from a random permutation of all blocks, with ``extra_pages``
  spare blocks that no request uses.
- poison (``poison="nan"``, the default): every cache token past a request's length (rest of its last
  page) and every spare block is NaN; every ``block_table`` slot past a request's last page holds an
  out-of-range id (2147480000, -1, num_blocks or -2**31). A backend that reads any of them fails.
- poison ``"garbage"``: the same places hold *finite* values 4x larger than the data, and unused table
  slots hold valid ids of other pages, so a backend that reads past a length and drops only NaN, or
  clamps ids instead of honouring the length, gets a different (not a NaN) answer.
- values: q and cache ~ N(0, 1)/10 clamped to [-1, 1] (FlashMLA's test data) or N(0, 1) (``unit``:
  peaky softmax), rounded to the input dtype.
- ``noncontig_q``: q is a transposed view (last dimension contiguous, other strides not).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import deepport
from deepport.conformance.case import Case, make_case
from deepport.kernels.f64.mla_decode import mla_decode_f64, mla_decode_p_rounding_bound

OP = "mla_decode"
GENERATOR_VERSION = 1
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_BAD_IDS = (2147480000, -1, None, -(2**31))  # None: num_blocks (one past the end)
_CORE = (576, 512, 64)

_DEFAULTS: dict[str, Any] = dict(
    b=3, s_q=1, h_q=16, h_kv=1, d_qk=576, d_v=512, page=64, s_k=100, varlen=True, zero_frac=0.0,
    lengths=None, causal=False, dtype="bfloat16", noncontig_q=False, scale_pow=None, values="small",
    metadata=False, extra_pages=3, table_pad=2, poison="nan",
)


def _features(p: Mapping[str, Any]) -> tuple[str, ...]:
    f = []
    if p["varlen"] or p["lengths"] is not None:
        f.append("varlen")
    if p["zero_frac"] > 0 or (p["lengths"] is not None and 0 in p["lengths"]):
        f.append("zero_length")
    if p["s_q"] > 1:
        f.append("multi_token_query")
    if p["causal"] and p["s_q"] > 1:
        f.append("causal")
    if p["h_kv"] > 1:
        f.append("gqa")
    if p["noncontig_q"]:
        f.append("noncontig_q")
    if p["metadata"]:
        f.append("metadata")
    if p["scale_pow"] is not None:
        f.append("softmax_scale")
    if p["poison"] != "nan":
        f.append(f"poison_{p['poison']}")
    if p["page"] != 64:
        f.append(f"page_{p['page']}")
    if (p["d_qk"], p["d_v"]) != (576, 512):
        f.append(f"head_dim_{p['d_qk']}_{p['d_v']}")
    f.append(p["dtype"])
    return tuple(f)


def _case(tier: str, name: str | None = None, **overrides: Any) -> Case:
    p = {**_DEFAULTS, **overrides}
    unknown = set(overrides) - set(_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown mla_decode case parameters {sorted(unknown)}")
    if name is None:
        name = (f"b{p['b']}_sq{p['s_q']}_hq{p['h_q']}_hkv{p['h_kv']}_d{p['d_qk']}v{p['d_v']}_p{p['page']}"
                f"_sk{p['s_k']}{'_causal' if p['causal'] else ''}_{p['dtype']}")
    profile = "core" if (p["d_qk"], p["d_v"], p["page"]) == _CORE else "extension"
    return make_case(OP, name, tier, profile, _features(p), p)


def _head_grid(heads: list[tuple[int, int]], tier: str, **common: Any) -> list[Case]:
    cases = []
    for s_q in (1, 2, 4):
        for h_q, h_kv in heads:
            for causal in ((False,) if s_q == 1 else (False, True)):
                cases.append(_case(tier, s_q=s_q, h_q=h_q, h_kv=h_kv, causal=causal,
                                   noncontig_q=(h_q + s_q) % 2 == 1, **common))
    return cases


def cases() -> list[Case]:
    """Every mla_decode case: the ``smoke`` tier (CPU-sized, every edge), then the ``full`` tier."""
    smoke = _head_grid([(1, 1), (3, 1), (16, 1), (16, 2)], "smoke", b=3, s_k=100)
    smoke += [
        _case("smoke", "half_empty_b4_sq2_causal", b=4, s_q=2, causal=True, zero_frac=0.5, s_k=150),
        _case("smoke", "all_empty_b3", lengths=[0, 0, 0]),
        _case("smoke", "short_causal_sq4", b=6, s_q=4, causal=True, lengths=[0, 1, 2, 3, 4, 5]),
        _case("smoke", "page_edges", b=6, lengths=[1, 63, 64, 65, 128, 129], table_pad=0),
        _case("smoke", "float16_sq2_causal_gqa", s_q=2, h_kv=2, causal=True, dtype="float16"),
        _case("smoke", "float16_hq3", h_q=3, dtype="float16", noncontig_q=True),
        _case("smoke", "metadata_b5", b=5, s_k=200, zero_frac=0.2, metadata=True),
        # unit values: logits of order 1, so a backend that ignores the scale is far off
        _case("smoke", "softmax_scale_pow_0.55", scale_pow=-0.55, values="unit"),
        _case("smoke", "finite_poison_b4_sq2_causal_gqa", b=4, s_q=2, h_kv=2, causal=True, zero_frac=0.25,
              poison="garbage"),
        _case("smoke", "unit_values_peaky", values="unit", s_q=2, causal=True),
        _case("smoke", "long_b1_sk700", b=1, s_k=700, varlen=False, h_q=16),
        # work split across chunks and waves: one long request makes the torch backend's working set per
        # request ~24 MB, so its 256 MB CPU budget takes 11 requests per chunk and the 12th starts a new one
        # (short ones on both sides of the boundary); 140 short requests are more than one wave of 132 SMs
        _case("smoke", "chunks_b12_one_long", b=12, lengths=[3, 64, 0, 4000, 65, 1, 128, 7, 63, 129, 2, 40]),
        _case("smoke", "waves_b140_short_metadata", b=140, s_k=20, metadata=True, extra_pages=0),
        _case("smoke", "softmax_scale_pow_0.4_sq2_causal_gqa", s_q=2, h_kv=2, causal=True, scale_pow=-0.4,
              values="unit"),
        # extensions beyond FlashMLA's shapes: other page sizes and head dims
        _case("smoke", "ext_page1", page=1, s_k=40, extra_pages=5),
        _case("smoke", "ext_page16_causal", page=16, s_q=2, causal=True, h_kv=2),
        _case("smoke", "ext_head_dim_512_512", d_qk=512, d_v=512),
        _case("smoke", "ext_head_dim_64_32_page32", d_qk=64, d_v=32, page=32, s_q=2, causal=True),
        _case("smoke", "ext_gqa_hq24_hkv8", h_q=24, h_kv=8, d_qk=128, d_v=128),
        _case("smoke", "ext_page16_finite_poison", page=16, s_k=60, poison="garbage"),
    ]
    full = _head_grid([(1, 1), (3, 1), (16, 1), (16, 2), (64, 1), (64, 2), (128, 1), (128, 2)], "full",
                      b=8, s_k=1024)
    full += [
        _case("full", "deepseek_b128_sq1_hq128_sk4096", b=128, h_q=128, s_k=4096),
        _case("full", "deepseek_b128_sq2_hq128_sk4096_causal_half_empty", b=128, s_q=2, h_q=128, s_k=4096,
              causal=True, zero_frac=0.5),
        _case("full", "deepseek_b64_sq1_hq16_sk16384", b=64, h_q=16, s_k=16384, noncontig_q=True),
        _case("full", "deepseek_b32_sq4_hq64_sk4096_causal", b=32, s_q=4, h_q=64, s_k=4096, causal=True),
        _case("full", "deepseek_b32_sq2_hq128_hkv2_sk2048_causal", b=32, s_q=2, h_q=128, h_kv=2, s_k=2048,
              causal=True),
        _case("full", "deepseek_b64_hq128_sk4096_metadata", b=64, h_q=128, s_k=4096, metadata=True),
        _case("full", "deepseek_float16_b64_sq2_hq128_sk4096_causal", b=64, s_q=2, h_q=128, s_k=4096,
              causal=True, dtype="float16"),
        _case("full", "deepseek_unit_values_b16_hq128_sk8192", b=16, h_q=128, s_k=8192, values="unit"),
        _case("full", "deepseek_b64_sq2_hq128_sk4096_causal_finite_poison", b=64, s_q=2, h_q=128, s_k=4096,
              causal=True, zero_frac=0.1, poison="garbage"),
        _case("full", "ext_page16_b16_hq64_sk2048", b=16, h_q=64, s_k=2048, page=16),
        _case("full", "ext_head_dim_512_512_b16_hq64_sk2048", b=16, h_q=64, d_qk=512, d_v=512, s_k=2048),
    ]
    return smoke + full


@dataclass
class Inputs:
    """Pristine generated inputs (CPU tensors) and the call's other arguments."""

    tensors: dict[str, torch.Tensor]
    head_dim_v: int
    softmax_scale: float | None
    causal: bool
    metadata: bool


def _lengths(p: Mapping[str, Any], rng: np.random.Generator) -> np.ndarray:
    if p["lengths"] is not None:
        explicit: np.ndarray = np.asarray(p["lengths"], dtype=np.int64)
        return explicit
    b, s_k = p["b"], p["s_k"]
    if p["varlen"]:
        min_len = p["s_q"] if p["causal"] else 1
        lens: np.ndarray = np.clip(np.rint(rng.normal(s_k, s_k / 2, size=b)), min_len, 2 * s_k).astype(np.int64)
    else:
        lens = np.full(b, s_k, dtype=np.int64)
    if p["zero_frac"] > 0:
        lens[rng.random(b) < p["zero_frac"]] = 0
    return lens


def _values(rng: np.random.Generator, shape: tuple[int, ...], kind: str, dtype: torch.dtype) -> torch.Tensor:
    x = rng.standard_normal(size=shape, dtype=np.float32)
    if kind == "small":
        x = np.clip(x / 10, -1, 1)
    return torch.from_numpy(x).to(dtype)


def generate(case: Case, seed: int) -> Inputs:
    """Build the case's inputs (see the module docstring for the recipe and the poison)."""
    p = case.params
    rng = np.random.Generator(np.random.PCG64(seed))
    dtype = _DTYPES[p["dtype"]]
    b, s_q, h_q, h_kv, d_qk, page = p["b"], p["s_q"], p["h_q"], p["h_kv"], p["d_qk"], p["page"]
    lens = _lengths(p, rng)
    pages_used = -(-lens // page)
    max_blocks = int(pages_used.max(initial=0)) + p["table_pad"]
    num_blocks = int(pages_used.sum()) + p["extra_pages"]
    order = rng.permutation(num_blocks)

    table = np.zeros((b, max(max_blocks, 1)), dtype=np.int64)
    if p["poison"] == "garbage" and num_blocks > 0:
        table[:] = rng.integers(0, num_blocks, size=table.shape)  # valid ids of pages the request does not own
    else:
        bad = np.array([num_blocks if x is None else x for x in _BAD_IDS], dtype=np.int64)
        table[:] = rng.choice(bad, size=table.shape)
    k_cache = _values(rng, (num_blocks, page, h_kv, d_qk), p["values"], dtype)
    in_use = np.zeros((num_blocks, page), dtype=bool)
    cursor = 0
    for i in range(b):
        n = int(pages_used[i])
        blocks = order[cursor: cursor + n]
        cursor += n
        table[i, :n] = blocks
        for j, blk in enumerate(blocks):
            in_use[blk, : min(page, int(lens[i]) - j * page)] = True
    unused = torch.from_numpy(~in_use)
    if p["poison"] == "garbage":
        k_cache[unused] = 4 * _values(rng, (int(unused.sum()), h_kv, d_qk), p["values"], dtype)
    else:
        k_cache[unused] = float("nan")

    if p["noncontig_q"]:
        q = _values(rng, (b, h_q, s_q, d_qk), p["values"], dtype).transpose(1, 2)
    else:
        q = _values(rng, (b, s_q, h_q, d_qk), p["values"], dtype)
    scale = None if p["scale_pow"] is None else float(d_qk) ** p["scale_pow"]
    tensors = {
        "q": q,
        "k_cache": k_cache,
        "block_table": torch.from_numpy(table.astype(np.int32)),
        "cache_seqlens": torch.from_numpy(lens.astype(np.int32)),
    }
    return Inputs(tensors, p["d_v"], scale, p["causal"], p["metadata"])


def output_specs(inputs: Inputs) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    b, s_q, h_q, _ = inputs.tensors["q"].shape
    return {
        "out": ((b, s_q, h_q, inputs.head_dim_v), inputs.tensors["q"].dtype),
        "lse": ((b, h_q, s_q), torch.float32),
    }


def dtype_name(inputs: Inputs) -> str:
    return str(inputs.tensors["q"].dtype).removeprefix("torch.")


def invoke(inputs: Inputs, tensors: Mapping[str, torch.Tensor], backend: str,
           outputs: Mapping[str, torch.Tensor]) -> None:
    """Call the public op on ``backend`` with the device copies ``tensors``, writing into ``outputs``."""
    q, k_cache = tensors["q"], tensors["k_cache"]
    metadata = None
    if inputs.metadata:
        h_q, h_kv = q.shape[2], k_cache.shape[2]
        metadata = deepport.get_mla_metadata(tensors["cache_seqlens"], q.shape[1] * h_q // h_kv, h_kv)
    deepport.mla_decode(q, k_cache, tensors["block_table"], tensors["cache_seqlens"], inputs.head_dim_v,
                        softmax_scale=inputs.softmax_scale, causal=inputs.causal, metadata=metadata,
                        backend=backend, out=outputs["out"], lse=outputs["lse"])


def _scale(inputs: Inputs) -> float:
    d_qk = int(inputs.tensors["q"].shape[-1])
    return float(d_qk) ** -0.5 if inputs.softmax_scale is None else inputs.softmax_scale


def reference(inputs: Inputs) -> dict[str, np.ndarray]:
    """The float64 answer, from the pristine inputs."""
    t = inputs.tensors
    out, lse = mla_decode_f64(t["q"], t["k_cache"], t["block_table"], t["cache_seqlens"], inputs.head_dim_v,
                              _scale(inputs), inputs.causal)
    return {"out": out, "lse": lse}


# Unit roundoff of the 16-bit input dtypes: a kernel may round P to q's dtype before P V (tensor cores take
# 16-bit operands; FlashMLA does), which the tolerance's ``p_rounding`` term admits.
_UNIT = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-12}


def elementwise_bound(inputs: Inputs) -> dict[str, np.ndarray]:
    """``out``'s per-element term for rounding the probabilities to q's dtype
    (:func:`deepport.kernels.f64.mla_decode.mla_decode_p_rounding_bound`)."""
    t = inputs.tensors
    unit = _UNIT[t["q"].dtype]
    return {"out": mla_decode_p_rounding_bound(t["q"], t["k_cache"], t["block_table"], t["cache_seqlens"],
                                               inputs.head_dim_v, _scale(inputs), inputs.causal, unit)}
