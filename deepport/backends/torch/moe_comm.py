"""The only transport of the torch MoE backend: torch.distributed ``all_to_all_single``.

Rows travel as raw bytes (``uint8`` views), so bf16, e4m3, int64 and float32 payloads move bit-exactly
on every torch.distributed backend (gloo and NCCL alike). A world of one (``group=None``) copies.
"""

from __future__ import annotations

import torch

from deepport.kernels.moe_args import MoEGroup, dense


def exchange_counts(send_counts: torch.Tensor, grp: MoEGroup) -> list[int]:
    """``send_counts[r]`` rows go to rank ``r``; returns how many rows arrive from each rank (host ints)."""
    if grp.group is None:
        return [int(v) for v in send_counts.tolist()]
    import torch.distributed as dist

    send = send_counts.to(torch.int64).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=grp.group)
    return [int(v) for v in recv.tolist()]


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    row_bytes = t.element_size()
    for d in t.shape[1:]:
        row_bytes *= int(d)
    return dense(t).view(torch.uint8).reshape(int(t.shape[0]), row_bytes)


def all_to_all_rows(send: torch.Tensor, send_counts: list[int], recv_counts: list[int], grp: MoEGroup,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Rows ``send[sum(send_counts[:r]) : ...]`` go to rank ``r``; the result holds the rows from rank 0,
    then rank 1, ... (``sum(recv_counts)`` rows shaped like ``send``'s rows), written into ``out`` when
    given (contiguous, right shape and dtype)."""
    shape = (sum(recv_counts), *send.shape[1:])
    if out is None:
        out = torch.empty(shape, dtype=send.dtype, device=send.device)
    if grp.group is None:
        out.copy_(send)
        return out
    import torch.distributed as dist

    target = dense(out)  # a fresh buffer only if `out` has odd strides on size-1 dimensions
    src, dst = _as_bytes(send), _as_bytes(target)
    if src.shape[1] != dst.shape[1]:
        raise RuntimeError(f"all_to_all_rows: row sizes differ ({src.shape[1]} vs {dst.shape[1]} bytes)")
    dist.all_to_all_single(dst, src, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                           group=grp.group)
    if target is not out:
        out.copy_(target)
    return out
