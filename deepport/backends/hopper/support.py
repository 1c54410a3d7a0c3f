"""What the Hopper backend can run, as data with reasons, and its availability probe.

MLA decode (``MLA_REQUIREMENTS``): sm_90, DeepSeek's 576/512 channels, page sizes that
64-token blocks tile (8, 16, 32 or multiples of 64); bf16 or fp16; any s_q, h_q, h_kv, causal or not.

The FP8 GEMM kernels implement DeepSeek-V3's inference recipe only; each requirement below is one
reason dispatch and ``deepport explain`` give when a call falls outside it (another backend then runs
it):

- an NVIDIA sm_90 device (wgmma, TMA and setmaxnreg are sm_90a instructions);
- recipe (1, 128, 128) with float32 SFs (the kernel promotes with one SFA per row and one SFB per
  128x128 block of B; UE8M0 / per-row SFB recipes are not implemented);
- bfloat16 output without ``c`` (the epilogue writes bf16; no float32 accumulation).

Any M, N and K are accepted (TMA reads zeros past the edges; operands whose strides TMA cannot use are
copied into padded rows by the host code).
"""

from __future__ import annotations

from typing import Any

from deepport.dispatch.capability import Requirement, device_arch
from deepport.kernels._fp8_checks import RECIPE_1D2D, SF_FLOAT32


def _recipe(sig: Any) -> str | None:
    if (sig.recipe, sig.sf_format) == (RECIPE_1D2D, SF_FLOAT32):
        return None
    return f"recipe {sig.recipe} with {sig.sf_format} SFs"


def _bf16_out(sig: Any) -> str | None:
    import torch

    if sig.out_dtype == torch.bfloat16 and not sig.accumulate:
        return None
    return f"out {str(sig.out_dtype).removeprefix('torch.')}{' with c' if sig.accumulate else ''}"


_SM90 = device_arch("sm_90")
_RECIPE = Requirement("recipe (1, 128, 128) with float32 SFs (per-token SFA, 128x128-block SFB)", _recipe)

DENSE_REQUIREMENTS: tuple[Requirement, ...] = (
    _SM90, _RECIPE, Requirement("bfloat16 out without c (the epilogue writes bf16)", _bf16_out))
GROUPED_REQUIREMENTS: tuple[Requirement, ...] = (_SM90, _RECIPE)


def _mla_dims(sig: Any) -> str | None:
    return None if (sig.d_qk, sig.d_v) == (576, 512) else f"d_qk={sig.d_qk}, d_v={sig.d_v}"


def _page(sig: Any) -> str | None:
    p = sig.page_block_size
    return None if p >= 8 and (p % 64 == 0 or 64 % p == 0) else f"page_block_size={p}"


MLA_REQUIREMENTS: tuple[Requirement, ...] = (
    _SM90,
    Requirement("576 query/key and 512 value channels (DeepSeek's MLA; the kernel's tiles are fixed)", _mla_dims),
    Requirement("page_block_size a multiple of 64, or 8, 16 or 32 (64-token blocks of whole TMA boxes)", _page),
)


def probe() -> str | None:
    """``None`` when an sm_90 GPU and the toolchain (cuda-bindings with NVRTC, CuPy) are usable here."""
    import torch

    if getattr(torch.version, "hip", None):
        return "needs an NVIDIA GPU (this torch is a ROCm build)"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    if (9, 0) not in capabilities:
        got = ", ".join(f"{a}.{b}" for a, b in sorted(capabilities))
        return f"compute capability 9.0 (Hopper: H100/H200) required, got {got}"
    for module, package in (("cuda.bindings.nvrtc", "cuda-bindings"), ("cuda.bindings.driver", "cuda-bindings"),
                            ("cupy", "cupy-cuda13x")):
        try:
            __import__(module)
        except ImportError as exc:
            return f"{package} is not installed ({exc}); pip install 'deepport[hopper]'"
    from deepport.backends.hopper import nvrtc

    try:
        nvrtc.version()
    except Exception as exc:  # the bindings import without the NVRTC library; it is loaded on first use
        return f"NVRTC is not loadable ({type(exc).__name__}: {exc}); pip install 'nvidia-cuda-nvrtc==13.0.*'"
    return None


def _multi_rank_nccl(sig: Any) -> str | None:
    return None if sig.world_size >= 2 and sig.comm == "nccl" else f"{sig.world_size} rank(s) over {sig.comm}"


def _opted_in(sig: Any) -> str | None:
    import os

    value = os.environ.get("DEEPPORT_HOPPER_EP", "")
    return None if value.strip() == "1" else f"DEEPPORT_HOPPER_EP={value!r}"


EP_REQUIREMENTS: tuple[Requirement, ...] = (
    _SM90,
    Requirement("a group of 2 or more ranks over NCCL, one GPU each, on one host (NVLink peers)", _multi_rank_nccl),
    Requirement("DEEPPORT_HOPPER_EP=1: the NVLink peer transport is opt-in until it has run on GPUs (its algorithm "
                "is tested on CPU ranks over shared memory)", _opted_in),
)
