"""DeepEP's ``deep_ep.utils``: the event types and, in :mod:`.math`, the helpers DeepEP's tests import.

Upstream test code ports with its import lines changed only
(``from deepport.compat.deep_ep.utils.math import calc_diff, per_token_cast_to_fp8, ...``). Not
provided: ``deep_ep.utils.envs`` (``init_dist``, ...: torch.distributed set-up of DeepEP's test
launcher), ``deep_ep.utils.testing`` (``bench_kineto`` filters CUPTI records by DeepEP kernel names),
``deep_ep.utils.refs`` and ``gate`` (V2 ``ElasticBuffer`` test references).
"""

from __future__ import annotations

from deepport.compat._absent import module_getattr
from deepport.compat.deep_ep.event import EventHandle, EventOverlap
from deepport.compat.deep_ep.utils import math

__getattr__ = module_getattr(__name__, {
    "envs": "torch.distributed set-up of DeepEP's test launcher (init_dist, ...)",
    "testing": "DeepEP's benchmarking helpers (bench_kineto filters CUPTI records by DeepEP kernel names)",
    "refs": "the V2 ElasticBuffer test references (V2 is not emulated)",
    "gate": "the V2 test routing generators (V2 is not emulated)",
})

__all__ = ["EventHandle", "EventOverlap", "math"]
