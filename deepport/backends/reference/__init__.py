"""The reference backend: NumPy float64, the executable definition of every op (the oracle).

Runs on any torch device by copying what it reads to the host. Slow by design; automatic selection
picks it only when nothing else can run a call, and says so.
"""

import torch

from deepport.dispatch import Backend, OpSupport

BACKEND = Backend(
    name="reference",
    summary="NumPy float64 oracle (any device, through host copies)",
    version="1",
    ops=(
        OpSupport(op="mla_decode", entry="deepport.backends.reference.mla_decode:run",
                  dtypes=frozenset({torch.bfloat16, torch.float16})),
    ),
    priority={"*": 0},
)
