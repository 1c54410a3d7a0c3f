"""The hopper MLA decode kernels compile for sm_90a with NVRTC on a machine without a GPU, and their
machine code is what the design needs: bf16/fp16 wgmma (HGMMA: m64n64 for Q K^T, m64n256 for P V),
TMA loads (UTMALDG, 3-D for q, 4-D for the cache), setmaxnreg, no local-memory traffic, and wgmma
not serialised by ptxas (C7510-C7520 "Potential Performance Loss" warnings). The host's parameter
block agrees with the kernel's (the kernel ``static_assert``s the sizes the host passes).

Needs cuda-bindings with NVRTC (the ``hopper`` extra); the SASS checks need triton's bundled cuobjdump.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("cuda.bindings.nvrtc")

import torch

from deepport.backends.hopper import mla_decode, nvrtc
from deepport.backends.hopper.sources import mla_combine_source, mla_decode_source

try:
    nvrtc.version()
except Exception as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"NVRTC is not loadable: {exc}", allow_module_level=True)

from tests.test_hopper_compile import _cuobjdump

VARIANTS = [(64, torch.bfloat16), (16, torch.bfloat16), (256, torch.float16)]


@functools.cache
def _compiled(page: int, dtype: torch.dtype) -> tuple[bytes, str]:
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    return nvrtc.compile_cubin(mla_decode_source(name), (*mla_decode.decode_options(page, dtype), "-Xptxas=-v"))


@pytest.mark.parametrize(("page", "dtype"), VARIANTS, ids=str)
def test_decode_compiles_without_spills_or_serialised_wgmma(page: int, dtype: torch.dtype) -> None:
    _, log = _compiled(page, dtype)
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in log, log
    assert "Potential Performance Loss" not in log, log
    assert "C7508" not in log, f"setmaxnreg ignored:\n{log}"


@pytest.mark.parametrize(("page", "dtype"), VARIANTS, ids=str)
def test_decode_sass_has_16bit_wgmma_tma_and_no_local_memory(page: int, dtype: torch.dtype, tmp_path: Path) -> None:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (install triton or nvidia-cuda-cuobjdump) for the SASS checks")
    path = tmp_path / "k.cubin"
    path.write_bytes(_compiled(page, dtype)[0])
    sass = subprocess.run([str(tool), "--dump-sass", str(path)], check=True, capture_output=True, text=True).stdout
    kind = ".BF16" if dtype == torch.bfloat16 else ""  # SASS names bf16 inputs; fp16 is the default
    assert f"HGMMA.64x64x16.F32{kind}" in sass
    assert f"HGMMA.64x256x16.F32{kind}" in sass
    assert "UTMALDG.3D" in sass and "UTMALDG.4D" in sass
    assert "USETMAXREG" in sass
    assert " LDL" not in sass and " STL" not in sass


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_combine_compiles(dtype: str) -> None:
    cubin, _ = nvrtc.compile_cubin(mla_combine_source(dtype),
                                   mla_decode.combine_options(torch.bfloat16 if dtype == "bf16" else torch.float16))
    assert cubin


def test_params_layout_is_what_the_kernel_checks() -> None:
    """The defines the compile passes are the host's sizes; the kernel static_asserts them (the compile
    above would fail otherwise), so here only the host side's arithmetic is pinned."""
    assert mla_decode.PARAMS_USED == 2 * 128 + 8 * 8 + 8 + 6 * 4 + 4
    assert mla_decode.PARAMS_SIZE % 64 == 0 and mla_decode.PARAMS_SIZE >= mla_decode.PARAMS_USED
    assert mla_decode.SMEM_BYTES <= 232448
