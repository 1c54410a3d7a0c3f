"""Backends that other processes can import by module path: for tests/test_isolation.py
(``isolation_backends:BACKENDS``: one kills its process, one hangs), the exploit corpus's
output-rebinding cheats (``isolation_backends:REBINDS``) for tests/test_exploits.py, and an
out-of-tree MoE backend (``isolation_backends:PLUGIN_MOE``, the torch backend's MoE ops under another
name) for tests/test_rank_group.py."""

from __future__ import annotations

import os
import time

import torch

from deepport.backends.torch import BACKEND as TORCH
from deepport.conformance.exploits import exploit
from deepport.dispatch import Backend, OpSupport
from deepport.kernels.mla_decode import MLADecodeCall

_DTYPES = frozenset({torch.bfloat16, torch.float16})


def crash(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Dies the way a kernel fault kills a process: no exception, no cleanup."""
    os._exit(3)


def hang(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Never returns within any reasonable timeout."""
    time.sleep(3600)


def _backend(name: str, entry: str) -> Backend:
    return Backend(name=name, summary=f"test backend that {name}es", version="0",
                   ops=(OpSupport(op="mla_decode", entry=entry, dtypes=_DTYPES),), priority={})


BACKENDS = (
    _backend("test_crash", "isolation_backends:crash"),
    _backend("test_hang", "isolation_backends:hang"),
)

REBINDS = (exploit("rebinds_outputs"), exploit("fp8_rebinds_output"))
PLUGIN_MOE = Backend(name="test_plugin_moe", summary="the torch MoE ops, loaded as a plugin", version="0",
                     ops=tuple(s for s in TORCH.ops if s.op.startswith("moe_")), priority={})
PLUGIN_MOE_LAYOUT = Backend(name="test_plugin_moe_layout", summary="only the torch moe_layout, loaded as a plugin",
                            version="0", ops=tuple(s for s in TORCH.ops if s.op == "moe_layout"), priority={})
