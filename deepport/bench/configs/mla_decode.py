"""``mla_decode`` bench configs: FlashMLA's dense-decode shapes and tiny CPU ones.

Inputs (generated on the device from the seed): q and the KV cache ~ N(0, 1)/10 in bf16, every request
of length ``s_k`` (a multiple of the page), its pages a random permutation of the cache's blocks, and the
plan from ``get_mla_metadata`` (computed once, as a serving loop does per step).
"""

from __future__ import annotations

from typing import Any

import torch

import deepport
from deepport.bench import counting
from deepport.bench.configs import BenchConfig, Workload, bound_runner
from deepport.kernels import mla_decode as mla

OP = "mla_decode"
D_QK, D_V, PAGE = 576, 512, 64  # the core profile (DeepSeek-V3's MLA)


def _random(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    return (torch.randn(shape, generator=generator, device=device) / 10).clamp_(-1, 1).to(torch.bfloat16)


def ragged_lengths(b: int, lo: int, hi: int) -> list[int]:
    """``b`` lengths uniform in ``[lo, hi]``, the same in every run (a fixed generator, not the run seed:
    the config's FLOP and byte counts depend on them)."""
    g = torch.Generator().manual_seed(20261201)
    return [int(x) for x in torch.randint(lo, hi + 1, (b,), generator=g)]


def _builder(b: int, s_q: int, h_q: int, h_kv: int, lengths: list[int], causal: bool) -> Any:
    def build(device: torch.device, seed: int) -> Workload:
        g = torch.Generator(device=device).manual_seed(seed)
        pages = -(-max(lengths) // PAGE)
        q = _random((b, s_q, h_q, D_QK), g, device)
        k_cache = _random((b * pages, PAGE, h_kv, D_QK), g, device)
        block_table = torch.randperm(b * pages, generator=g, device=device).to(torch.int32).view(b, pages)
        seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
        plan = deepport.get_mla_metadata(seqlens, s_q * h_q // h_kv, h_kv)
        out = torch.empty((b, s_q, h_q, D_V), dtype=torch.bfloat16, device=device)
        lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=device)

        def call(backend: str) -> Any:
            def run() -> None:
                deepport.mla_decode(q, k_cache, block_table, seqlens, D_V, causal=causal, metadata=plan,
                                    backend=backend, out=out, lse=lse)
            return run

        bound_call = bound_runner(OP, lambda: mla.bind(q, k_cache, block_table, seqlens, D_V, causal=causal,
                                                       metadata=plan, out=out, lse=lse), out, lse)
        footprint = sum(t.numel() * t.element_size() for t in (q, k_cache, block_table, seqlens, out, lse))
        return Workload(call, bound_call, {"out": out, "lse": lse}, footprint)

    return build


def config(b: int, s_q: int, h_q: int, s_k: int, *, check_case: str, causal: bool = False, h_kv: int = 1,
           cpu: bool = False, prefix: str = "", s_k_min: int | None = None) -> BenchConfig:
    """One MLA decode config (bf16, d_qk/d_v 576/512, page 64): every request ``s_k`` tokens long, or
    with ``s_k_min`` ragged lengths in ``[s_k_min, s_k]`` (counted at their mean)."""
    lengths = [s_k] * b if s_k_min is None else ragged_lengths(b, s_k_min, s_k)
    mean = sum(lengths) / b
    sk_name = f"{s_k}" if s_k_min is None else f"{s_k_min}-{s_k}"
    name = f"{prefix}b{b}_sq{s_q}_hq{h_q}_sk{sk_name}{'_causal' if causal else ''}"
    params: dict[str, object] = dict(b=b, s_q=s_q, h_q=h_q, h_kv=h_kv, s_k=s_k if s_k_min is None else mean,
                                     d_qk=D_QK, d_v=D_V, page=PAGE, causal=causal, dtype="bfloat16")
    if s_k_min is not None:
        params["s_k_min"] = s_k_min
    compute = counting.mla_decode_compute_bound(s_q, h_q, h_kv)
    return BenchConfig(
        name=name, op=OP, params=params, build=_builder(b, s_q, h_q, h_kv, lengths, causal),
        flops=counting.mla_decode_flops(b, s_q, h_q, mean, D_QK, D_V),
        bytes=counting.mla_decode_bytes(b, s_q, h_q, h_kv, mean, D_QK, D_V),
        ceiling="bf16_matmul" if compute else "memory", check_case=f"{OP}/{check_case}", cpu=cpu,
        agreement=1e-5,
    )


_HQ16 = "b3_sq1_hq16_hkv1_d576v512_p64_sk100_bfloat16"
CONFIGS: tuple[BenchConfig, ...] = (
    # FlashMLA's shapes, measured on an H200 in benchmarks/README.md ("Ceilings and peers")
    config(128, 1, 16, 4096, check_case=_HQ16),
    config(128, 1, 16, 16384, check_case=_HQ16),
    config(64, 1, 16, 32768, check_case=_HQ16),
    config(128, 1, 16, 32768, s_k_min=4096, check_case=_HQ16),  # ragged: the split-KV plan balances the SMs
    config(128, 1, 64, 8192, check_case="b8_sq1_hq64_hkv1_d576v512_p64_sk1024_bfloat16"),
    config(128, 1, 128, 4096, check_case="b8_sq1_hq128_hkv1_d576v512_p64_sk1024_bfloat16"),
    config(128, 2, 128, 4096, causal=True, check_case="b8_sq2_hq128_hkv1_d576v512_p64_sk1024_causal_bfloat16"),
    # tiny, for CPUs (CI): one memory-bound, one compute-bound (s_q * h_q / h_kv = 128)
    config(2, 1, 16, 256, check_case=_HQ16, cpu=True, prefix="tiny_"),
    config(1, 2, 64, 128, causal=True, check_case="b3_sq2_hq16_hkv1_d576v512_p64_sk100_causal_bfloat16", cpu=True,
           prefix="tiny_"),
)
