"""The triton weighted-rows kernel (the combines' per-token sums) with its next-row prefetch on: the same
sum in the same order, so the same bits as without it, on segments of every length (empty ones included),
with NaN in rows no segment reads. Runs under the interpreter on CPU, on the GPU where one is present."""

from __future__ import annotations

import pytest
import torch

from deepport.backends.triton import _runtime


def _device() -> torch.device:
    pytest.importorskip("triton", reason="needs triton")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if not _runtime.interpreting():
        pytest.skip("triton needs TRITON_INTERPRET=1 or a CUDA device")
    return torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("seed", [0, 1])
def test_prefetch_gives_the_same_bits(dtype: torch.dtype, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepport.backends.triton import moe_permute

    dev = _device()
    g = torch.Generator().manual_seed(seed)
    n, rows, cols = 37, 11, 300  # 300 columns: a ragged last column block
    y = (torch.randn(n, cols, generator=g) * 4).to(torch.bfloat16)
    y[torch.arange(n) % 7 == 3] = float("nan")  # rows nobody reads
    readable = torch.tensor([i for i in range(n) if i % 7 != 3])
    per_row = torch.tensor([0, 1, 2, 3, 0, 5, 8, 1, 0, 4, 2])  # empty, single and long segments
    dst_row = torch.repeat_interleave(torch.arange(rows), per_row)
    src_pos = readable[torch.randint(0, len(readable), (int(per_row.sum()),), generator=g)]
    weights = torch.rand(len(src_pos), generator=g) * 2 - 0.5
    args = [t.to(dev) for t in (y, src_pos, dst_row[torch.randperm(len(dst_row), generator=g)], weights)]
    outs = {}
    for prefetch in (False, True):
        monkeypatch.setattr(moe_permute, "_PREFETCH", prefetch)
        out = torch.full((rows, cols), float("nan"), dtype=dtype, device=dev)
        moe_permute._weighted_rows(*args, out)
        outs[prefetch] = out
    assert not outs[True].isnan().any()
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    assert torch.equal(outs[True].view(bits), outs[False].view(bits))
    assert bool((outs[True][per_row == 0] == 0).all())  # empty segments sum to zero
