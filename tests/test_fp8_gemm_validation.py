"""The dense FP8 GEMM op layer: every bad argument is rejected, by name, before any backend runs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import deepport
from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import OPS, bind_call
from deepport.kernels import fp8_gemm as op
from deepport.kernels.fp8_layout import (
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
)

FP8 = torch.float8_e4m3fn


def make_nt(m: int = 3, n: int = 192, k: int = 256, *, ue8m0: bool = False, seed: int = 0) -> dict[str, Any]:
    """Valid NT inputs: A [m, k], SFA [m, kb], B [n, k], SFB [ceil(n/128), kb] (or 1D1D packed UE8M0)."""
    g = torch.Generator().manual_seed(seed)
    a, sfa = per_token_cast_to_fp8(torch.randn(m, k, generator=g), use_ue8m0=ue8m0)
    if ue8m0:
        b, sfb = per_token_cast_to_fp8(torch.randn(n, k, generator=g), use_ue8m0=True)
        sfa, sfb = get_mn_major_tma_aligned_packed_ue8m0_tensor(sfa), get_mn_major_tma_aligned_packed_ue8m0_tensor(sfb)
    else:
        b, sfb = per_block_cast_to_fp8(torch.randn(n, k, generator=g))
    return {"a": (a, sfa), "b": (b, sfb), "out": torch.empty(m, n, dtype=torch.bfloat16)}


def as_layout(layout: str, x: dict[str, Any]) -> dict[str, Any]:
    """The NT inputs stored as ``layout`` wants them (transposed copies where the name says so)."""
    (a, sfa), (b, sfb) = x["a"], x["b"]
    if layout[0] == "t":
        a, sfa = a.t().contiguous(), sfa.t().contiguous()
    if layout[1] == "n":
        b, sfb = b.t().contiguous(), sfb.t().contiguous()
    return {**x, "a": (a, sfa), "b": (b, sfb)}


def bind(layout: str = "nt", **x: Any) -> op.FP8GemmCall:
    args = {**make_nt(), **x}
    return op.bind(layout, args.pop("a"), args.pop("b"), args.pop("out"), **args)


@pytest.mark.parametrize("layout", op.LAYOUTS)
def test_every_layout_binds_to_the_nt_form(layout: str) -> None:
    nt = make_nt(m=5, n=320, k=384)
    call = op.bind(layout, **as_layout(layout, nt))
    assert (call.m, call.n, call.k) == (5, 320, 384)
    assert torch.equal(call.a.float(), nt["a"][0].float()) and torch.equal(call.sfa, nt["a"][1])
    assert torch.equal(call.b.float(), nt["b"][0].float()) and torch.equal(call.sfb, nt["b"][1])
    assert call.recipe == (1, 128, 128) and call.sf_format == "float32" and call.signature.layout == layout


def test_ops_are_registered_and_exported() -> None:
    for layout in op.LAYOUTS:
        name = f"fp8_gemm_{layout}"
        assert name == OPS[name].OP and OPS[name].OP_VERSION == 1
        assert getattr(deepport, name) is getattr(op, name)
    sig = bind_call("fp8_gemm_nt", **make_nt())
    assert "n=192 k=256" in str(sig)


def test_mn_major_and_packed_scale_factors_are_accepted() -> None:
    x = make_nt(m=5)
    call = op.bind("nt", (x["a"][0], get_mn_major_tma_aligned_tensor(x["a"][1])), x["b"], x["out"])
    assert call.sfa.stride() == (1, 8)
    transposed_sfb = x["b"][1].t().contiguous().t()
    op.bind("nt", x["a"], (x["b"][0], transposed_sfb), x["out"])
    u = make_nt(m=5, ue8m0=True)
    call = op.bind("nt", **u)
    assert call.recipe == (1, 1, 128) and call.sf_format == "ue8m0"


def test_k_tail_and_m_zero_are_valid() -> None:
    call = op.bind("nt", **make_nt(m=0, n=130, k=200))
    assert (call.m, call.n, call.k, call.k_blocks) == (0, 130, 200, 2)


def test_float32_out_and_accumulation_into_c() -> None:
    x = make_nt()
    out = torch.empty(3, 192)
    assert op.bind("nt", x["a"], x["b"], out, c=torch.zeros(3, 192)).c is not None
    assert op.bind("nt", x["a"], x["b"], out, c=out).c is out


def _expect(exc: type[Exception], argument: str, match: str, layout: str = "nt", **x: Any) -> None:
    with pytest.raises(exc, match=match) as info:
        bind(layout, **x)
    assert getattr(info.value, "argument", None) == argument, str(info.value)


def test_pairs_and_operand_dtypes() -> None:
    x = make_nt()
    _expect(ArgumentTypeError, "a", "expected a pair", a=x["a"][0])
    _expect(ArgumentTypeError, "b", "length 3", b=(*x["b"], x["b"][1]))
    _expect(ArgumentTypeError, "a[0]", "float8_e4m3fn", a=(x["a"][0].float(), x["a"][1]))
    _expect(ArgumentTypeError, "b[0]", "float8_e4m3fn", b=(x["b"][0].to(torch.float8_e5m2), x["b"][1]))
    _expect(ArgumentTypeError, "a[1]", "float32 or torch.int32", a=(x["a"][0], x["a"][1].double()))
    _expect(ArgumentTypeError, "b[1]", "SF format of `a\\[1\\]`", b=(x["b"][0], x["b"][1].to(torch.int32)))
    _expect(ArgumentTypeError, "a[1]", "Tensor", a=(x["a"][0], [1.0]))


def test_operand_shapes_and_strides() -> None:
    x = make_nt()
    a, sfa = x["a"]
    _expect(InvalidArgumentError, "a[0]", "2 dimensions", a=(a[None], sfa))
    _expect(InvalidArgumentError, "b[0]", "size 256", b=(x["b"][0][:, :128], x["b"][1]))
    _expect(InvalidArgumentError, "a[0]", "last dimension to be contiguous", a=(a.t().contiguous().t(), sfa))
    _expect(InvalidArgumentError, "a[0]", "K >= 1", a=(a[:, :0], sfa[:, :0]))
    _expect(InvalidArgumentError, "b[0]", "N >= 1", b=(x["b"][0][:0], x["b"][1][:0]))
    # tn: A is [K, M]; its rows must be contiguous too
    t = as_layout("tn", make_nt())
    _expect(InvalidArgumentError, "a[0]", "last dimension", "tn", a=(t["a"][0].t(), t["a"][1]), b=t["b"])


def test_scale_factor_shapes_layouts_and_recipes() -> None:
    x = make_nt(m=5, n=320, k=384)
    a, sfa = x["a"]
    b, sfb = x["b"]
    _expect(InvalidArgumentError, "a[1]", r"expected shape \(5, 3\)", **{**x, "a": (a, sfa[:, :2])})
    _expect(InvalidArgumentError, "b[1]", r"expected shape \(3, 3\)", **{**x, "b": (b, sfb[:2])})
    _expect(InvalidArgumentError, "b[1]", r"expected shape \(320, 3\)", **{**x, "recipe": (1, 1, 128)})
    broadcast = sfa[:, :1].expand(5, 3)
    _expect(InvalidArgumentError, "a[1]", "row-major .* or MN-major", **{**x, "a": (a, broadcast)})
    _expect(InvalidArgumentError, "recipe", "expected one of", **{**x, "recipe": (1, 128, 64)})
    _expect(ArgumentTypeError, "recipe", "3 ints", **{**x, "recipe": "1D2D"})
    u = make_nt(m=5, n=320, k=384, ue8m0=True)
    _expect(InvalidArgumentError, "recipe", "UE8M0", **{**u, "recipe": (1, 128, 128)})
    bad_words = torch.zeros(5, 2, dtype=torch.int32)
    _expect(InvalidArgumentError, "a[1]", r"expected shape \(5, 1\)", **{**u, "a": (u["a"][0], bad_words)})
    # nn: SFB is given as [kb, rows_b]; the NT-shaped [rows_b, kb] is rejected
    nn = as_layout("nn", make_nt(n=192, k=384))
    nt_sfb = nn["b"][1].t().contiguous()
    _expect(InvalidArgumentError, "b[1]", r"\[kb, rows_b\] = \(3, 2\)", "nn", **{**nn, "b": (nn["b"][0], nt_sfb)})


def test_outputs_and_accumulator() -> None:
    _expect(ArgumentTypeError, "out", "bfloat16 or torch.float32", out=torch.empty(3, 192, dtype=torch.float16))
    _expect(InvalidArgumentError, "out", r"expected shape \(3, 192\)", out=torch.empty(3, 191, dtype=torch.bfloat16))
    _expect(InvalidArgumentError, "out", "last dimension", out=torch.empty(192, 3, dtype=torch.bfloat16).t())
    _expect(InvalidArgumentError, "out", "do not overlap",
            out=torch.empty(192, dtype=torch.bfloat16).expand(3, 192))
    _expect(InvalidArgumentError, "out", "needs out of dtype torch.float32", c=torch.zeros(3, 192))
    out32 = torch.empty(3, 192)
    _expect(ArgumentTypeError, "c", "float32", out=out32, c=torch.zeros(3, 192, dtype=torch.bfloat16))
    _expect(InvalidArgumentError, "c", "expected shape", out=out32, c=torch.zeros(3, 191))
    shifted = torch.as_strided(torch.empty(4 * 192), (3, 192), (192, 1), 0)
    _expect(InvalidArgumentError, "c", "disjoint from `out`", out=torch.as_strided(shifted, (3, 192), (192, 1), 1),
            c=shifted)


def test_outputs_must_not_overlap_inputs() -> None:
    x = make_nt()
    storage = torch.empty(4096, dtype=torch.bfloat16)
    out = storage[:3 * 192].view(3, 192)
    a8 = storage.view(torch.float8_e4m3fn)[: 3 * 256].view(3, 256)
    _expect(InvalidArgumentError, "out", "disjoint from `a\\[0\\]`", a=(a8, x["a"][1]), out=out)


def test_devices_must_match() -> None:
    x = make_nt()
    meta = torch.empty(3, 192, dtype=torch.bfloat16, device="meta")
    _expect(InvalidArgumentError, "out", "expected device cpu", out=meta)
    _expect(InvalidArgumentError, "a[1]", "expected device cpu", a=(x["a"][0], x["a"][1].to("meta")))


def test_validation_runs_before_any_backend(spy: list[Any]) -> None:
    x = make_nt()
    with pytest.raises(InvalidArgumentError):
        deepport.fp8_gemm_nt(x["a"], (x["b"][0], x["b"][1][:1]), x["out"], backend="spy")
    assert spy == []
