"""DeepEP's ``deep_ep.utils``: the event types and, in :mod:`.math`, the helpers DeepEP's tests import.

Upstream test code ports with its import lines changed only
(``from deepport.compat.deep_ep.utils.math import calc_diff, per_token_cast_to_fp8, ...``). Not
provided: ``deep_ep.utils.envs`` (``init_dist``, ...: torch.distributed set-up of DeepEP's test
launcher), ``deep_ep.utils.testing`` (``bench_kineto`` filters CUPTI records by DeepEP kernel names),
``deep_ep.utils.refs`` and ``gate`` (V2 ``ElasticBuffer`` test references).
"""

from __future__ import annotations

from deepport.compat.deep_ep.event import EventHandle, EventOverlap
from deepport.compat.deep_ep.utils import math

__all__ = ["EventHandle", "EventOverlap", "math"]
