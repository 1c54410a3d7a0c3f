"""How the reference MoE backend sees the other ranks: it gathers everything (``all_gather``).

The reference computes each rank's result from the whole world's inputs (the definition), so its
only collective is a padded ``all_gather`` of raw bytes, on the call's device (NCCL needs CUDA
tensors, gloo CPU ones). A world of one (``group=None``) gathers nothing.
"""

from __future__ import annotations

import torch

from deepport.kernels.moe_args import MoEGroup, dense


def _row_bytes(t: torch.Tensor) -> int:
    n = t.element_size()
    for d in t.shape[1:]:
        n *= int(d)
    return n


def gather_rows(t: torch.Tensor, grp: MoEGroup) -> list[torch.Tensor]:
    """Every rank's ``t`` (rows may differ per rank; the other dimensions and dtype may not), as CPU
    tensors indexed by rank."""
    if grp.group is None:
        return [dense(t.detach().cpu())]
    import torch.distributed as dist

    device = t.device
    rows = torch.tensor([int(t.shape[0])], dtype=torch.int64, device=device)
    all_rows = [torch.empty_like(rows) for _ in range(grp.world_size)]
    dist.all_gather(all_rows, rows, group=grp.group)
    counts = [int(r.item()) for r in all_rows]
    width = _row_bytes(t)
    padded = torch.zeros((max(counts), width), dtype=torch.uint8, device=device)
    if t.shape[0]:  # (an empty tensor may carry strides no byte view accepts: nothing to copy anyway)
        padded[: t.shape[0]] = dense(t.detach()).view(torch.uint8).reshape(int(t.shape[0]), width)
    parts = [torch.empty_like(padded) for _ in range(grp.world_size)]
    dist.all_gather(parts, padded, group=grp.group)
    out = []
    for part, n in zip(parts, counts, strict=True):
        raw = part[:n].cpu().contiguous()
        out.append(raw.view(t.dtype).reshape(n, *t.shape[1:]))
    return out
