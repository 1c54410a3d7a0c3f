"""The element-wise bound of the FP8 GEMMs (dense and M-grouped) against their float64 definition, the
accumulator model it is derived from, and that model as code.

The bound. For one output element, with ``kb`` the 128-wide K blocks (``nb = ceil(K / 128)`` of them),

    D = C + sum_kb s_kb * P_kb,    s_kb = SFA[m, kb] * SFB[n_blk, kb],    P_kb = sum_{k in kb} A[m, k] * B[n, k]

(A, B the e4m3 values, exact), a backend's output must satisfy

    |got - D| <= u_out * |D| + gamma(K) * S,    S = |C| + sum_k |SFA * SFB * A * B|,

    gamma(K) = C_BLOCK * u_acc + (nb + 2) * u_32,    u_acc = 2**-13,  u_32 = 2**-24,  C_BLOCK = 16,

``u_out`` the unit roundoff of the output (``2**-8`` bf16, ``2**-24`` float32: the tolerance table's
``rtol``). ``D`` and ``S`` come from the float64 oracle (``S`` is the same GEMM on the magnitudes: one
more product of the reference's cost). The bound is per element: an output whose terms are large but
cancel may err by more than one whose terms are small.

Derivation (the SM90 scheme of DeepGEMM and of cuBLAS's block-scaled FP8 GEMM; other hardware
accumulating at least as precisely is covered):

1. Inside a block. The FP8 tensor core adds the 32 exact products of each WGMMA k-step (4 per 128-K
   block) to its accumulator after aligning all 33 addends to the largest exponent among them and
   truncating what falls below 13 fraction bits (the "around 14 bits" of accumulation precision
   DeepSeek-V3's report measured on Hopper). Each addend loses less than ``2**-13`` of the largest one,
   so the block's partial sum satisfies ``|P~_kb - P_kb| <= eps * S_kb`` (``S_kb`` its terms'
   magnitudes) with a worst case ``eps`` of about ``4 * 33 * 2**-13``, 1.6%: true but useless. The
   truncation errors of products of random sign cancel like a random walk, and what remains is largest
   when one product dominates the block (the others are truncated against its exponent). ``eps`` is
   therefore taken from the model itself: emulating it (:func:`emulate_sm90`) on the suite's data (bf16
   normal values, outliers up to x16 and x64, K 128 .. 7168, 12k outputs per point) the largest
   ``|P~ - P| / S`` over a whole GEMM is 8.3 * 2**-13 (K = 128, an outlier-dominated output), 4-5 *
   2**-13 for K 256 .. 2048 with x64 outliers, 1.6 * 2**-13 (K = 128) down to 0.1 * 2**-13 (K = 7168)
   without outliers.
   ``C_BLOCK = 16`` is twice the largest emulated value.
2. Promotion. After each block the kernel adds ``s_kb * P~_kb`` into a float32 accumulator (one FFMA,
   or a product and a sum), and finally C: by the usual recursive-summation bound at most
   ``(nb + 2) * u_32 * S``.
3. Output. One rounding to the output dtype: ``u_out * |D~|``; its share of the accumulated error,
   ``u_out * gamma * S``, is below 0.4% of ``gamma * S`` and falls within C_BLOCK's margin.

The evidence it must cover: on the H200, cuBLAS's block-scaled GEMM reached 1.61x the previous bound
``1.01 * 2**-8 * |D| + 2**-9 * rms(D)`` on 23 of 100M outputs of the dense full tier, and 1.13x on one
masked grouped output: errors of at most ~3e-3 * rms(D) where ``|D|`` is small. With ``S`` about
``0.64 * sqrt(K) * rms(D)`` (13 rms at K = 512, 46 at 7168), ``gamma * S`` is 2.5% (K = 512) to 9%
(K = 7168) of the output's rms: 8x to 30x those errors.

What it gives up: at large K without outliers the element-wise term is loose (9% of the rms at K =
7168, where Hopper's errors stay below 0.3%). The global check stays tight (``calc_diff <= 2e-5`` for
bf16 outputs, an error energy below ~0.6% of the output's), so widespread errors still fail; the
element-wise bound catches local ones (a wrong tile, a missing K block, garbage in one row). Zeros and
5% noise fail both checks (calibration verifies it per case).
"""

from __future__ import annotations

import math

import numpy as np

U_ACC = 2.0**-13
"""Unit of the tensor core's in-block accumulation: 13 fraction bits kept below the largest addend."""
U_32 = 2.0**-24
C_BLOCK = 16.0
"""Multiple of ``U_ACC`` bounding a 128-K block's accumulation error relative to its terms' magnitudes."""
BLOCK_K = 128
WGMMA_K = 32  # products per k-step of an FP8 WGMMA


def gamma(k: int) -> float:
    """``gamma(K) = C_BLOCK * u_acc + (ceil(K / 128) + 2) * u_32`` (module docstring)."""
    return C_BLOCK * U_ACC + (math.ceil(k / BLOCK_K) + 2) * U_32


def elementwise_bound(k: int, magnitudes: np.ndarray) -> np.ndarray:
    """The absolute per-element term ``gamma(K) * S`` for the terms' magnitudes ``S`` (float64, any shape)."""
    bound: np.ndarray = gamma(k) * magnitudes
    return bound


def excess(got: np.ndarray, reference: np.ndarray, magnitudes: np.ndarray, k: int, u_out: float,
           roundings: int = 1) -> float:
    """The largest ``|got - D| / (roundings * u_out * |D| + gamma(K) * S)`` over the elements (``<= 1``: within
    the bound); ``roundings = 2`` when ``got`` is compared with a reference already rounded to the output dtype.
    Elements whose bound is 0 (padding rows) count when they differ at all."""
    err = np.abs(got.astype(np.float64) - reference)
    bound = roundings * u_out * np.abs(reference) + elementwise_bound(k, magnitudes)
    if err.size == 0:
        return 0.0
    return float(np.max(np.where(bound > 0, err / np.where(bound > 0, bound, 1.0), np.where(err > 0, np.inf, 0.0))))


def _truncate(x: np.ndarray, exponent: np.ndarray, fraction_bits: int) -> np.ndarray:
    """``x`` truncated toward zero to a multiple of ``2**(exponent - fraction_bits)``."""
    quantum = np.ldexp(1.0, exponent - fraction_bits)
    out: np.ndarray = np.trunc(x / quantum) * quantum
    return out


def _exponent(x: np.ndarray, axis: int | None = None) -> np.ndarray:
    mag = np.abs(x) if axis is None else np.abs(x).max(axis=axis)
    return np.floor(np.log2(np.where(mag > 0, mag, 1.0))).astype(np.int64)


def emulate_sm90(a: np.ndarray, b: np.ndarray, sfa: np.ndarray, sfb: np.ndarray,
                 fraction_bits: int = 13) -> np.ndarray:
    """The accumulator model of the module docstring, in float64 arithmetic: float32 ``[M, N]`` results
    (before the output rounding) of ``a`` ``[M, K]`` and ``b`` ``[N, K]`` (float64 holding e4m3 values)
    with float64 scales ``sfa`` ``[M, nb]`` and ``sfb`` ``[N, nb]`` (per row of B, already expanded).

    Per 32-wide k-step: the accumulator and the step's exact products are aligned to the largest
    exponent among them and truncated to ``fraction_bits`` bits below it, summed, and the sum truncated
    likewise; per 128-K block: ``final = float32(final + float32(s * partial))``. Slow (numpy over
    ``M * N * 33`` values per step): for tests and for deriving the constants, at smoke sizes."""
    m, k = a.shape
    n = b.shape[0]
    final = np.zeros((m, n), dtype=np.float32)
    for start in range(0, k, BLOCK_K):
        stop = min(start + BLOCK_K, k)
        partial = np.zeros((m, n))
        for step in range(start, stop, WGMMA_K):
            end = min(step + WGMMA_K, stop)
            addends = np.concatenate([partial[:, :, None], a[:, None, step:end] * b[None, :, step:end]], axis=2)
            summed = _truncate(addends, _exponent(addends, axis=2)[:, :, None], fraction_bits).sum(axis=2)
            partial = _truncate(summed, _exponent(summed), fraction_bits)
        scale = (sfa[:, start // BLOCK_K][:, None] * sfb[:, start // BLOCK_K][None, :]).astype(np.float32)
        product = (scale.astype(np.float64) * partial.astype(np.float32).astype(np.float64)).astype(np.float32)
        final = (final.astype(np.float64) + product.astype(np.float64)).astype(np.float32)
    return final
