"""Backends that other processes can import by module path: for tests/test_isolation.py
(``isolation_backends:BACKENDS``: one kills its process, one hangs; ``isolation_backends:RENDEZVOUS``: two
that each wait for the other's call to start, so they pass only when run at the same time), the exploit corpus's
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


def _meet(me: str, other: str, call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Marks this call as started in ``$DEEPPORT_TEST_RENDEZVOUS``, waits (at most 60 s) for the other
    backend's mark, then answers honestly with the torch backend."""
    folder = os.environ["DEEPPORT_TEST_RENDEZVOUS"]
    open(os.path.join(folder, me), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(folder, other)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{other} never started while {me} ran: the calls were not concurrent")
        time.sleep(0.01)
    from deepport.backends.torch.mla_decode import run
    run(call, out, lse)


def meet_a(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    _meet("a", "b", call, out, lse)


def meet_b(call: MLADecodeCall, out: torch.Tensor, lse: torch.Tensor) -> None:
    _meet("b", "a", call, out, lse)


BACKENDS = (
    _backend("test_crash", "isolation_backends:crash"),
    _backend("test_hang", "isolation_backends:hang"),
)

RENDEZVOUS = (
    _backend("test_meet_a", "isolation_backends:meet_a"),
    _backend("test_meet_b", "isolation_backends:meet_b"),
)

REBINDS = (exploit("rebinds_outputs"), exploit("fp8_rebinds_output"))
PLUGIN_MOE = Backend(name="test_plugin_moe", summary="the torch MoE ops, loaded as a plugin", version="0",
                     ops=tuple(s for s in TORCH.ops if s.op.startswith("moe_")), priority={})
PLUGIN_MOE_LAYOUT = Backend(name="test_plugin_moe_layout", summary="only the torch moe_layout, loaded as a plugin",
                            version="0", ops=tuple(s for s in TORCH.ops if s.op == "moe_layout"), priority={})
