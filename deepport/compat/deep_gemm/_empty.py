"""DeepGEMM's answers for an empty reduction or output: ``K == 0`` gives ``D = C`` (or 0), ``N == 0`` does nothing.

deepport's FP8 GEMM ops reject ``N == 0`` and ``K == 0`` (their contract needs a non-empty product), so
the dense shims answer these two cases here, after checking the shapes agree; every other call goes to
deepport. DeepGEMM's layouts: ``nt`` A ``[M, K]`` B ``[N, K]``, ``nn`` A ``[M, K]`` B ``[K, N]``, ``tn``
A ``[K, M]`` B ``[K, N]``, ``tt`` A ``[K, M]`` B ``[N, K]``; D ``[M, N]``.
"""

from __future__ import annotations

import torch

from deepport.errors import ArgumentTypeError, InvalidArgumentError
from deepport.kernels import _checks as chk


def _data(name: str, pair: object) -> torch.Tensor:
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise ArgumentTypeError(name, f"expected a pair (data, scale factors), got {type(pair).__name__}")
    data = chk.expect_tensor(f"{name}[0]", pair[0])
    chk.expect_ndim(f"{name}[0]", data, 2, "a matrix")
    return data


def answer_empty(layout: str, a: object, b: object, d: object, c: object) -> bool:
    """Write DeepGEMM's result and return True when ``N == 0`` or ``K == 0``; else return False (untouched)."""
    if not isinstance(d, torch.Tensor) or d.dim() != 2 or not isinstance(a, (tuple, list)) or \
            not isinstance(b, (tuple, list)):
        return False  # deepport's checks report it
    a_data, b_data = _data("a", a), _data("b", b)
    m_a, k_a = (a_data.shape[0], a_data.shape[1]) if layout[0] == "n" else (a_data.shape[1], a_data.shape[0])
    n_b, k_b = (b_data.shape[0], b_data.shape[1]) if layout[1] == "t" else (b_data.shape[1], b_data.shape[0])
    m, n, k = int(d.shape[0]), int(d.shape[1]), int(k_a)
    if n != 0 and k != 0:
        return False
    chk.expect_dtype("d", d, (torch.bfloat16, torch.float32))
    for name, t in (("a[0]", a_data), ("b[0]", b_data)):
        chk.expect_dtype(name, t, (torch.float8_e4m3fn,))
    if (int(m_a), int(n_b), int(k_b)) != (m, n, k):
        raise InvalidArgumentError("d", f"expected A, B and D to agree on M, N, K ({layout} layout), got M = {m_a}, "
                                   f"N = {n_b}, K = {k_a} / {k_b} from A and B and D of shape {tuple(d.shape)}")
    acc = None if c is None else chk.expect_tensor("c", c)
    if acc is not None:
        chk.expect_shape("c", acc, (m, n), "[M, N], d's shape")
    if k == 0 and n != 0 and m != 0:
        if acc is None:
            d.zero_()
        elif acc is not d:
            d.copy_(acc)
    return True
