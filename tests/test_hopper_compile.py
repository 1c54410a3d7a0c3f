"""The hopper kernels compile for sm_90a with NVRTC on a machine without a GPU, and their machine code
is what the design needs: FP8 wgmma (QGMMA) and TMA loads (UTMALDG), no local-memory traffic (no
spills, no LDL/STL), setmaxnreg honoured. Plus the JIT cache's safety rules (private directory,
verified and atomic entries, recovery from corruption, 8 processes compiling at once, DEEPPORT_JIT=0).

Needs cuda-bindings with NVRTC (the ``hopper`` extra); the SASS checks need triton's bundled cuobjdump.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("cuda.bindings.nvrtc")

from deepport.backends.hopper import cache, configs, jit, nvrtc
from deepport.backends.hopper.fp8_gemm import kernel_options
from deepport.backends.hopper.sources import fp8_gemm_source

try:
    nvrtc.version()
except Exception as exc:  # pragma: no cover - depends on the machine
    pytest.skip(f"NVRTC is not loadable: {exc}", allow_module_level=True)

DEEPSEEK_SHAPES = ((2112, 7168), (576, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048))


def _configs() -> list[configs.GemmConfig]:
    """Every tile the dense choice makes on the DeepSeek-V3 shapes, the grouped ones, and the extremes."""
    found = {configs.choose(m, n, k, configs.VARIANT_DENSE, 132) for m in (64, 128, 4096) for n, k in DEEPSEEK_SHAPES}
    found |= {configs.choose(m, n, k, configs.VARIANT_CONTIGUOUS, 132, 8) for m in (128, 4096)
              for n, k in ((4096, 7168), (7168, 2048))}
    found |= {configs.choose(m, n, k, configs.VARIANT_MASKED, 132, g) for g, m in ((1, 1024), (4, 256), (8, 64))
              for n, k in ((4096, 7168), (7168, 2048))}
    for variant in configs.VARIANT_NAMES:
        for bm, bn in ((64, 16), (128, 160), (64, 160), (128, 96), (256, 128), (256, 64)):
            if bm == 256 and variant == configs.VARIANT_CONTIGUOUS:
                continue
            found.add(configs.GemmConfig(bm, bn, configs.max_stages(bm, bn), variant))
    return sorted(found, key=str)


CONFIGS = _configs()


def _cuobjdump() -> Path | None:
    """A cuobjdump: triton's bundled one, the nvidia-cuda-cuobjdump wheel's, or one on PATH."""
    places: list[Path] = []
    try:
        import triton

        places.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    try:
        import nvidia

        places += [Path(p) / sub / "bin" / "cuobjdump" for p in nvidia.__path__ for sub in ("cu13", "cuda_cuobjdump")]
    except ImportError:
        pass
    found = shutil.which("cuobjdump")
    places += [Path(found)] if found else []
    return next((p for p in places if p.exists()), None)


@functools.cache
def _compiled(config: configs.GemmConfig) -> tuple[bytes, str]:
    return nvrtc.compile_cubin(fp8_gemm_source(config.block_n), (*kernel_options(config), "-Xptxas=-v"))


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_kernel_compiles_for_sm90a_without_spills(config: configs.GemmConfig) -> None:
    _, log = _compiled(config)
    assert "0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads" in log, log
    assert "C7508" not in log, f"setmaxnreg ignored:\n{log}"


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_sass_has_fp8_wgmma_tma_and_no_local_memory(config: configs.GemmConfig, tmp_path: Path) -> None:
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (install triton or nvidia-cuda-cuobjdump) for the SASS checks")
    path = tmp_path / "k.cubin"
    path.write_bytes(_compiled(config)[0])
    sass = subprocess.run([str(tool), "--dump-sass", str(path)], check=True, capture_output=True, text=True).stdout
    assert f"QGMMA.64x{config.block_n}x32.F32.E4M3.E4M3" in sass
    assert "UTMALDG.3D" in sass
    assert "USETMAXREG" in sass
    assert " LDL" not in sass and " STL" not in sass


def test_configs_outside_the_kernel_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="stages"):
        configs.GemmConfig(128, 160, configs.max_stages(128, 160) + 1, configs.VARIANT_DENSE)
    with pytest.raises(ValueError, match="256-row tiles"):
        configs.GemmConfig(256, 160, 3, configs.VARIANT_DENSE)
    with pytest.raises(ValueError, match="256-row tiles"):
        configs.GemmConfig(256, 128, 3, configs.VARIANT_CONTIGUOUS)


# ---- the JIT cache ---------------------------------------------------------------------------------

SMALL = configs.GemmConfig(64, 16, 3, configs.VARIANT_DENSE)


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "deep" / "kernels"
    monkeypatch.setenv("DEEPPORT_CACHE_DIR", str(directory))
    monkeypatch.delenv("DEEPPORT_JIT", raising=False)
    jit.clear_memory()
    yield directory
    jit.clear_memory()


def _get(config: configs.GemmConfig = SMALL) -> tuple[str, bytes]:
    return jit.get_cubin(fp8_gemm_source(config.block_n), kernel_options(config))


def test_cache_directory_is_created_private(cache_dir: Path) -> None:
    _get()
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700


def test_cache_directory_writable_by_others_is_refused(cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True)
    cache_dir.chmod(0o777)
    with pytest.raises(cache.CacheSecurityError, match="writable by group or others"):
        _get()


def test_entries_are_written_whole_and_verified(cache_dir: Path) -> None:
    key, cubin = _get()
    entry = cache.entry_path(cache_dir, key)
    assert cache.decode(entry.read_bytes()) == cubin
    assert [p.name for p in cache_dir.iterdir() if p.suffix == ".tmp"] == []
    jit.clear_memory()
    assert _get() == (key, cubin)  # a new process would load it: same key, same bytes


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_a_corrupted_entry_is_recompiled(cache_dir: Path, damage: str) -> None:
    key, cubin = _get()
    entry = cache.entry_path(cache_dir, key)
    data = entry.read_bytes()
    if damage == "truncate":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        entry.write_bytes(data[:-10] + bytes([data[-10] ^ 0xFF]) + data[-9:])
    else:
        entry.write_bytes(b"")
    assert cache.load(cache_dir, key) is None
    jit.clear_memory()
    assert _get() == (key, cubin)
    assert cache.decode(entry.read_bytes()) == cubin


def test_jit_disabled_refuses_to_compile_but_loads_a_prebuilt_cache(cache_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPPORT_JIT", "0")
    with pytest.raises(jit.JitDisabledError, match="DEEPPORT_JIT=0 forbids compiling"):
        _get()
    monkeypatch.setenv("DEEPPORT_JIT", "1")
    key, cubin = _get()
    jit.clear_memory()
    monkeypatch.setenv("DEEPPORT_JIT", "0")
    assert _get() == (key, cubin)


def test_the_key_covers_source_options_and_versions(cache_dir: Path) -> None:
    source = fp8_gemm_source(16)
    base = jit.cache_key(source, kernel_options(SMALL))
    assert jit.cache_key(source, kernel_options(configs.GemmConfig(64, 16, 4, 0))) != base
    changed = type(source)(source.name, source.text + "\n// edit\n", source.headers, source.entry)
    assert jit.cache_key(changed, kernel_options(SMALL)) != base


def _compile_in_child(directory: str) -> tuple[str, bytes]:
    os.environ["DEEPPORT_CACHE_DIR"] = directory
    from deepport.backends.hopper import jit as child_jit

    return _get_in(child_jit)


def _get_in(module: object) -> tuple[str, bytes]:
    get = module.get_cubin  # type: ignore[attr-defined]
    result: tuple[str, bytes] = get(fp8_gemm_source(SMALL.block_n), kernel_options(SMALL))
    return result


def test_eight_processes_compiling_the_same_kernel_agree(cache_dir: Path) -> None:
    cache_dir.mkdir(parents=True, mode=0o700)
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        results = pool.map(_compile_in_child, [str(cache_dir)] * 8)
    assert len({key for key, _ in results}) == 1
    assert len({cubin for _, cubin in results}) == 1
    entries = [p for p in cache_dir.iterdir() if p.suffix == ".cubin"]
    assert len(entries) == 1 and cache.decode(entries[0].read_bytes()) == results[0][1]
    assert [p for p in cache_dir.iterdir() if p.suffix == ".tmp"] == []
