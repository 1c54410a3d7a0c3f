"""Run-time backend selection: registry, capabilities as data, settings, selection and explain."""

from deepport.dispatch.backend import Backend
from deepport.dispatch.capability import OpSupport, Requirement, at_most, device_arch, multiple_of, one_of
from deepport.dispatch.device import DeviceInfo, device_info, visible_devices
from deepport.dispatch.explain import Explanation, explain
from deepport.dispatch.registry import all_backends, get, register, registered, unregister
from deepport.dispatch.selection import Verdict, choose, verdicts
from deepport.dispatch.settings import use_backend

__all__ = [
    "Backend", "DeviceInfo", "Explanation", "OpSupport", "Requirement", "Verdict", "all_backends", "at_most",
    "choose", "device_arch", "device_info", "explain", "get", "multiple_of", "one_of", "register", "registered",
    "unregister", "use_backend", "verdicts", "visible_devices",
]
