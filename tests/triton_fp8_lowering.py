"""Compile the Triton FP8 GEMM kernels for sm_90a without a GPU and report the Hopper instructions found.

Run as a program (``python tests/triton_fp8_lowering.py VARIANT [...]``, with ``TRITON_INTERPRET`` unset:
the interpreter replaces compilation) it prints one JSON line per variant:
``{"variant", "precise", "wgmma_e4m3", "wgmma_bf16", "qgmma", "hgmma", "tma", "seconds"}``: which
``wgmma.mma_async`` operand types the PTX has, whether the SASS has ``QGMMA`` (e4m3) / ``HGMMA`` (bf16)
instructions (``null`` when the cuobjdump that Triton's wheel carries is missing) and bulk tensor copies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

FP8 = "*fp8e4nv"


def _desc(rows: int) -> str:
    return f"tensordesc<fp8e4nv[{rows}, 128]>"


def _dense(tma: bool, *, bm: int, bn: int, out: str = "*bf16", ue8m0: bool = False, gran_n: int = 128,
           has_c: bool = False, even_k: bool = True, split: int = 1, split_n: int = 1, precise: bool = False,
           unit_stride: str = "s_ak", tail_split: int = 1) -> tuple[str, dict[str, str], dict[str, Any]]:
    sf = "*i32" if ue8m0 else "*fp32"
    sig = {"a": _desc(bm) if tma else FP8, "b": _desc(bn // split_n) if tma else FP8, "sfa": sf, "sfb": sf,
           "c": "*fp32" if has_c or split > 1 else out, "out": "*fp32" if split > 1 else out,
           "ws": "*fp32" if split > 1 or tail_split > 1 else out,
           **{name: "i32" for name in ("M", "N", "K", "full", "s_am", "s_ak", "s_bn", "s_bk", "s_sfam", "s_sfak",
                                       "s_sfbn", "s_sfbk", "s_cm", "s_cn", "s_os", "s_om", "s_on")}}
    const = dict(GRAN_N=gran_n, UE8M0=ue8m0, HAS_C=has_c, USE_TMA=tma, EVEN_K=even_k,
                 SFB_SCALAR=gran_n % bn == 0, PRECISE=precise, SPLIT_K=split, SPLIT_N=split_n, BLOCK_M=bm,
                 BLOCK_N=bn, GROUP_M=8, TAIL_SPLIT=tail_split)
    if not tma:  # a unit stride is a constant at launch (Triton specialises ints equal to 1)
        del sig[unit_stride]
        const[unit_stride] = 1
    return "fp8_gemm_nt_kernel", sig, const


def _contiguous(tma: bool, *, bm: int, bn: int) -> tuple[str, dict[str, str], dict[str, Any]]:
    sig = {"a": _desc(bm) if tma else FP8, "b": _desc(bn) if tma else FP8, "sfa": "*fp32", "sfb": "*fp32",
           "m_indices": "*i32", "out": "*bf16",
           **{name: "i32" for name in ("M", "N", "K", "s_am", "s_ak", "s_bg", "s_bn", "s_bk", "s_sfam", "s_sfak",
                                       "s_sfbg", "s_sfbn", "s_sfbk", "s_om", "s_on")}}
    const = dict(GRAN_N=128, UE8M0=False, USE_TMA=tma, EVEN_K=True, SFB_SCALAR=True, SPLIT_N=1, BLOCK_M=bm,
                 BLOCK_N=bn, GROUP_M=8)
    return "m_grouped_fp8_gemm_nt_contiguous_kernel", sig, const


def _masked(tma: bool, *, bm: int, bn: int) -> tuple[str, dict[str, str], dict[str, Any]]:
    sig = {"a": _desc(bm) if tma else FP8, "b": _desc(bn) if tma else FP8, "sfa": "*fp32", "sfb": "*fp32",
           "masked_m": "*i32", "out": "*bf16",
           **{name: "i32" for name in ("G", "M_MAX", "N", "K", "s_ag", "s_am", "s_ak", "s_bg", "s_bn", "s_bk",
                                       "s_sfag", "s_sfam", "s_sfak", "s_sfbg", "s_sfbn", "s_sfbk", "s_og", "s_om",
                                       "s_on")}}
    const = dict(GRAN_N=128, UE8M0=False, USE_TMA=tma, EVEN_K=True, SFB_SCALAR=True, SPLIT_N=1, BLOCK_M=bm,
                 BLOCK_N=bn)
    return "m_grouped_fp8_gemm_nt_masked_kernel", sig, const


VARIANTS: dict[str, tuple[tuple[str, dict[str, str], dict[str, Any]], int, int]] = {
    # name: ((kernel, signature, constexprs), num_warps, num_stages); "tma" in a name: operands via descriptors
    "dense_tma_128x128": (_dense(True, bm=128, bn=128), 8, 4),
    "dense_tma_64x256_vector_sfb": (_dense(True, bm=64, bn=256), 8, 3),
    "dense_ptr_ue8m0_c_fp32_k_tail": (_dense(False, bm=64, bn=128, out="*fp32", ue8m0=True, gran_n=1, has_c=True,
                                             even_k=False), 4, 3),
    "dense_tma_fp32_out_precise": (_dense(True, bm=64, bn=128, out="*fp32", precise=True), 4, 3),
    "dense_tma_two_halves": (_dense(True, bm=128, bn=128, split_n=2), 8, 3),
    "dense_ptr_two_halves_vector_sfb": (_dense(False, bm=64, bn=256, split_n=2, gran_n=1), 4, 3),
    "dense_tma_split_k": (_dense(True, bm=64, bn=128, split=4), 4, 4),
    # tail split: whole tiles and K-range pieces of the last wave's tiles in one launch
    "dense_tma_128x128_tail_split": (_dense(True, bm=128, bn=128, tail_split=8), 8, 4),
    "dense_tma_two_halves_tail_split": (_dense(True, bm=128, bn=128, split_n=2, tail_split=3), 8, 3),
    "dense_ptr_c_k_tail_tail_split": (_dense(False, bm=64, bn=128, has_c=True, out="*fp32", even_k=False,
                                             tail_split=4), 4, 3),
    # tn/tt/nn layouts: A (or B) stored MN-major, its unit stride specialised as Triton does at launch
    "dense_ptr_a_m_major": (_dense(False, bm=64, bn=128, unit_stride="s_am"), 4, 3),
    "dense_ptr_b_n_major": (_dense(False, bm=128, bn=128, unit_stride="s_bn"), 8, 3),
    "contiguous_tma": (_contiguous(True, bm=128, bn=128), 8, 4),
    "masked_tma": (_masked(True, bm=128, bn=128), 8, 4),
    "masked_ptr": (_masked(False, bm=64, bn=128), 4, 3),
}


def _cuobjdump() -> str | None:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def compile_variant(name: str) -> dict[str, Any]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from deepport.backends.triton import fp8_gemm_kernels

    (kernel_name, sig, const), warps, stages = VARIANTS[name]
    fn = getattr(fp8_gemm_kernels, kernel_name)
    types = {**sig, **{k: "constexpr" for k in const}}
    signature = {name: types[name] for name in fn.arg_names}  # in the kernel's argument order
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    sass = None
    tool = _cuobjdump()
    if tool is not None:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([tool, "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
    return {"variant": name, "precise": bool(const.get("PRECISE", False)),
            "wgmma_e4m3": "wgmma.mma_async" in ptx and ".e4m3.e4m3" in ptx,
            "wgmma_bf16": "wgmma.mma_async" in ptx and ".bf16.bf16" in ptx,
            "qgmma": None if sass is None else "QGMMA" in sass, "hgmma": None if sass is None else "HGMMA" in sass,
            "tma": "cp.async.bulk.tensor" in ptx, "seconds": round(time.perf_counter() - start, 2)}

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter does not compile")
    for variant in sys.argv[1:] or list(VARIANTS):
        print(json.dumps(compile_variant(variant)), flush=True)
