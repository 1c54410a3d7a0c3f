"""The MoE ops' support records, shared by every backend that implements all of them.

Any torch device; a process group of any torch.distributed backend whose collectives take the
device's tensors (gloo with CPU tensors, NCCL with CUDA tensors; checked by the op layer).
"""

import torch

from deepport.dispatch import OpSupport

_PAYLOAD = frozenset({torch.bfloat16, torch.float8_e4m3fn})
_BF16 = frozenset({torch.bfloat16})


def moe_op_support(normal: str, layouts: str) -> tuple[OpSupport, ...]:
    """Records for the seven MoE ops: ``normal`` is the module with ``layout``, ``dispatch`` and
    ``combine``; ``layouts`` the module with the expanded and low-latency entry points."""
    return (
        OpSupport(op="moe_layout", entry=f"{normal}:layout", dtypes=frozenset({torch.int64, torch.int32})),
        OpSupport(op="moe_dispatch", entry=f"{normal}:dispatch", dtypes=_PAYLOAD),
        OpSupport(op="moe_combine", entry=f"{normal}:combine", dtypes=_BF16),
        OpSupport(op="moe_dispatch_expanded", entry=f"{layouts}:dispatch_expanded", dtypes=_PAYLOAD),
        OpSupport(op="moe_combine_expanded", entry=f"{layouts}:combine_expanded", dtypes=_BF16),
        OpSupport(op="moe_low_latency_dispatch", entry=f"{layouts}:dispatch_low_latency", dtypes=_PAYLOAD),
        OpSupport(op="moe_low_latency_combine", entry=f"{layouts}:combine_low_latency", dtypes=_BF16),
    )
