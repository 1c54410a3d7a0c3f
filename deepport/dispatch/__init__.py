"""Run-time backend selection: registry, capabilities as data, settings, selection and explain."""

from deepport.dispatch.backend import Backend
from deepport.dispatch.capability import (
    Determinism,
    OpSupport,
    Requirement,
    at_most,
    device_arch,
    multiple_of,
    not_reproducible,
    one_of,
    reproducible,
)
from deepport.dispatch.device import DeviceInfo, device_info, visible_devices
from deepport.dispatch.explain import Explanation, explain_signature
from deepport.dispatch.ops import declare_ops, known_ops
from deepport.dispatch.registry import add_builtin_modules, all_backends, get, register, registered, unregister
from deepport.dispatch.selection import Verdict, choose, verdicts
from deepport.dispatch.settings import use_backend

__all__ = [
    "Backend", "Determinism", "DeviceInfo", "Explanation", "OpSupport", "Requirement", "Verdict",
    "add_builtin_modules", "all_backends", "at_most", "choose", "declare_ops", "device_arch", "device_info",
    "explain_signature", "get", "known_ops", "multiple_of", "not_reproducible", "one_of", "register", "registered",
    "reproducible", "unregister", "use_backend", "verdicts", "visible_devices",
]
