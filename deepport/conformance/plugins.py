"""Out-of-tree backends named on the command line (``--plugin module[:attribute]``), in every process
of a run.

A plugin spec names a module and an attribute (default ``BACKEND``) holding a
:class:`~deepport.dispatch.Backend` or an iterable of them. :func:`load_plugins` registers them in this
process and remembers the spec, so the processes a run starts (isolation workers, rank processes of
multi-rank cases) load the same specs before they call anything (:func:`loaded_specs`). Entry-point
backends (group ``deepport.backends``) need nothing here: each process's registry loads them, and the
child processes get this process's ``sys.path``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from typing import Any

from deepport.dispatch import Backend, registry

_loaded: list[str] = []


def load_plugins(specs: Sequence[str]) -> list[str]:
    """Import each ``"module[:attribute]"`` (attribute default ``BACKEND``) and register the Backend(s) it
    names, unless a backend of that name is registered already. Returns the names it provides."""
    names = []
    for spec in specs:
        module_name, _, attr = spec.partition(":")
        obj: Any = getattr(importlib.import_module(module_name), attr or "BACKEND")
        found: Iterable[Any] = [obj] if isinstance(obj, Backend) else obj
        for backend in found:
            if not isinstance(backend, Backend):
                raise TypeError(f"plugin {spec!r} provides {type(backend).__name__}, not a deepport Backend")
            if backend.name not in {b.name for b in registry.all_backends()}:
                registry.register(backend)
            names.append(backend.name)
        if spec not in _loaded:
            _loaded.append(spec)
    return names


def loaded_specs() -> tuple[str, ...]:
    """Every plugin spec loaded in this process so far, in order (for the processes it starts)."""
    return tuple(_loaded)
