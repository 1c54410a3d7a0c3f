"""The opt-in 2-CTA cluster variant of the sm90 FP8 GEMM (``GemmConfig.cluster_n = 2``, TMA multicast of
the A tile) compiles for sm_90a with NVRTC on a machine without a GPU, in every configuration the tile
sweep tries (:func:`deepport.backends.hopper.configs.multicast_configs`): no spills, setmaxnreg honoured,
no ptxas warning, and its machine code has the multicast TMA load (``UTMALDG.3D.MULTICAST``), the
cluster barrier (``UCGABAR_ARV`` / ``UCGABAR_WAIT``) and the arrivals on a cluster-mapped mbarrier
(``SYNCS.ARRIVE.TRANS64.RED``), and its cubin declares the compile-time cluster
(``EIATTR_CTA_PER_CLUSTER`` 2 x 1 x 1, which the ordinary launch API honours). The configurations the
backend chooses by default (the measured table and the model on the DeepSeek-V3 shapes) have none of
these: their kernels are unchanged.

Needs cuda-bindings with NVRTC (the ``hopper`` extra); the SASS checks need triton's bundled cuobjdump.
"""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("cuda.bindings.nvrtc")

from deepport.backends.hopper import configs, nvrtc
from deepport.backends.hopper.fp8_gemm import kernel_options
from deepport.backends.hopper.sources import fp8_gemm_source

try:
    nvrtc.version()
except Exception as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"NVRTC is not loadable: {exc}", allow_module_level=True)

DEEPSEEK_SHAPES = ((2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))
MULTICAST = sorted(set(configs.multicast_configs()), key=str)
CLUSTER_SASS = ("UTMALDG.3D.MULTICAST", "UCGABAR_ARV", "UCGABAR_WAIT", "SYNCS.ARRIVE.TRANS64.RED")


def _defaults() -> list[configs.GemmConfig]:
    """What the backend chooses unasked: every measured entry and the model's choice on the bench shapes."""
    found = {configs.choose(m, n, k, configs.VARIANT_DENSE, 132) for m in (1, 64, 128, 4096)
             for n, k in DEEPSEEK_SHAPES}
    found |= {configs.choose(m, n, k, v, sms, g) for v, m, n, k, g, sms in configs.TUNED}
    found |= {configs.choose(m, n, k, configs.VARIANT_CONTIGUOUS, 132, 8) for m in (128, 4096)
              for n, k in ((4096, 7168), (7168, 2048))}
    return sorted(found, key=str)


DEFAULTS = _defaults()


def _cuobjdump() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return tool if tool.exists() else None


@functools.cache
def _compiled(config: configs.GemmConfig) -> tuple[bytes, str]:
    return nvrtc.compile_cubin(fp8_gemm_source(config.block_n), (*kernel_options(config), "-Xptxas=-v"))


def _dump(config: configs.GemmConfig, tmp_path: Path, what: str = "--dump-sass") -> str:
    """cuobjdump's ``what`` (``--dump-sass`` or ``--dump-elf``) of the config's cubin."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (install triton) for the SASS checks")
    path = tmp_path / "k.cubin"
    path.write_bytes(_compiled(config)[0])
    return subprocess.run([str(tool), what, str(path)], check=True, capture_output=True, text=True).stdout


def _cluster_dims(elf: str) -> str | None:
    """The ``EIATTR_CTA_PER_CLUSTER`` value of a cubin's ELF dump (``"0x2 0x1 0x1"``), or None."""
    found = re.search(r"EIATTR_CTA_PER_CLUSTER\s+Format:\s+\S+\s+Value:\s+([0-9a-fx ]+?)\s*\n", elf)
    return found.group(1).strip() if found else None


def test_the_sweep_tries_multicast_in_every_variant_and_the_choice_never_does() -> None:
    assert {c.variant for c in MULTICAST} == set(configs.VARIANT_NAMES)
    assert all(c.cluster_n == 2 and c.a_box_rows == c.block_m // 2 for c in MULTICAST)
    assert all(c.cluster_n == 1 for c in DEFAULTS)


@pytest.mark.parametrize("config", MULTICAST, ids=str)
def test_multicast_kernel_compiles_without_spills_or_warnings(config: configs.GemmConfig) -> None:
    _, log = _compiled(config)
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in log, log
    assert "C7508" not in log, f"setmaxnreg ignored:\n{log}"
    assert "warning" not in log.lower(), log
    assert config.smem_bytes <= configs.SMEM_CAPACITY


@pytest.mark.parametrize("config", MULTICAST, ids=str)
def test_multicast_sass_has_the_multicast_load_cluster_barrier_and_remote_arrivals(
        config: configs.GemmConfig, tmp_path: Path) -> None:
    sass = _dump(config, tmp_path)
    for spelling in CLUSTER_SASS:
        assert spelling in sass, spelling
    assert f"QGMMA.64x{config.block_n}x32.F32.E4M3.E4M3" in sass
    assert re.search(r"UTMALDG\.3D \[", sass), "the B tile stays an ordinary TMA load"
    assert "USETMAXREG" in sass
    assert " LDL" not in sass and " STL" not in sass
    # the stage is freed with plain remote arrivals: no GPU-wide fence in the mainloop
    assert sass.count("MEMBAR.ALL.GPU") <= 2, "only the two cluster barriers may fence at GPU scope"
    assert _cluster_dims(_dump(config, tmp_path, "--dump-elf")) == "0x2 0x1 0x1"


@pytest.mark.parametrize("config", DEFAULTS, ids=str)
def test_default_kernels_have_no_cluster_code(config: configs.GemmConfig, tmp_path: Path) -> None:
    assert "CLUSTER_N" not in " ".join(config.defines())
    sass = _dump(config, tmp_path)
    for spelling in CLUSTER_SASS:
        assert spelling not in sass, spelling
    assert "UTMALDG.3D" in sass
    assert _cluster_dims(_dump(config, tmp_path, "--dump-elf")) is None
