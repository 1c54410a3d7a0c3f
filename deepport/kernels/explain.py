"""``deepport.explain``: bind an op's arguments like the op does, then ask dispatch for every backend's verdict."""

from __future__ import annotations

from typing import Any

from deepport.dispatch.explain import Explanation, explain_signature
from deepport.kernels import bind_for_dispatch


def explain(op: str, *args: Any, **kwargs: Any) -> Explanation:
    """Every backend's verdict on ``op(*args, **kwargs)``, without running it.

    Takes exactly the arguments of the op (``backend=`` included); validates them like the op does,
    so an invalid call raises the same :class:`~deepport.errors.InvalidArgumentError`. For an automatic
    choice, ``reason`` says why: the measured ranking of the call's shape bucket, or the priority order.
    """
    backend = kwargs.pop("backend", None)
    signature, shape = bind_for_dispatch(op, *args, **kwargs)
    return explain_signature(op, signature, backend, shape)
