"""``deepport.explain``: bind an op's arguments like the op does, then ask dispatch for every backend's verdict."""

from __future__ import annotations

from typing import Any

from deepport.dispatch.explain import Explanation, explain_signature
from deepport.kernels import bind_call


def explain(op: str, *args: Any, **kwargs: Any) -> Explanation:
    """Every backend's verdict on ``op(*args, **kwargs)``, without running it.

    Takes exactly the arguments of the op (``backend=`` included); validates them like the op does,
    so an invalid call raises the same :class:`~deepport.errors.InvalidArgumentError`.
    """
    backend = kwargs.pop("backend", None)
    return explain_signature(op, bind_call(op, *args, **kwargs), backend)
