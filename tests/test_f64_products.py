"""The float64 products behind the FP8 GEMM oracles: NumPy by default, a CUDA device's DGEMM inside
``products_on(cuda)``, the same numbers either way (to float64 rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepport.kernels.f64.products import matmul_nt, products_on


def _operands(m: int, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return rng.standard_normal((m, k)), rng.standard_normal((n, k))[:, ::1]


def test_host_products_are_numpy_products() -> None:
    x, y = _operands(64, 48, 256)
    assert np.array_equal(matmul_nt(x, y), x @ y.T)
    with products_on("cpu"):
        assert np.array_equal(matmul_nt(x, y), x @ y.T)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_products_agree_with_numpy_to_float64_rounding() -> None:
    x, y = _operands(1024, 768, 512)
    y = y[:, :]  # strided views are accepted
    with products_on("cuda"):
        got = matmul_nt(x[::2], y)
    want = x[::2] @ y.T
    assert got.dtype == np.float64 and got.shape == want.shape
    assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want))
