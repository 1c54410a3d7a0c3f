"""The registry of backends: built-in modules, then entry points, then run-time registrations.

Dispatch imports no backend by name. The package root hands it the built-in modules
(``deepport/__init__.py`` calls :func:`add_builtin_modules` with ``deepport.backends.BUILTIN``); they are
imported on the registry's first use, like plug-ins. Third-party backends register through the
entry-point group ``deepport.backends`` (each entry names a module or object exposing a
:class:`Backend`), or at run time with :func:`register`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import threading
from collections.abc import Iterable, Iterator
from importlib.metadata import entry_points

from deepport.dispatch.backend import Backend
from deepport.errors import UnknownBackendError

_log = logging.getLogger("deepport.dispatch")
_lock = threading.RLock()
_backends: dict[str, Backend] = {}
_loaded = False
_builtin_modules: list[str] = []  # handed over by the package root, imported on first use
_generation = 0  # bumped on every change, so cached selections are invalidated


def _as_backend(obj: object, origin: str) -> Backend:
    backend = getattr(obj, "BACKEND", obj)
    if not isinstance(backend, Backend):
        raise TypeError(f"{origin} does not provide a deepport Backend (got {type(backend).__name__})")
    return backend


def _load() -> None:
    global _loaded
    with _lock:
        if _loaded:
            return
        # Import every built-in first: a failing import leaves the registry empty, not half loaded.
        # (Built-in modules import with numpy and torch alone; their probes report missing toolchains.)
        builtin = [_as_backend(importlib.import_module(name), name) for name in _builtin_modules]
        for backend in builtin:
            _add(backend)
        for ep in entry_points(group="deepport.backends"):
            try:
                _add(_as_backend(ep.load(), f"entry point {ep.name!r}"))
            except Exception as exc:  # a broken plug-in must not break deepport
                _log.warning("deepport: skipping backend entry point %r: %s", ep.name, exc)
        _loaded = True


def add_builtin_modules(modules: Iterable[str]) -> None:
    """Name modules exporting ``BACKEND`` to import on the registry's first use (the package root passes
    ``deepport.backends.BUILTIN``). Registration order is the order given; a name given twice counts once.
    Raises once the registry has loaded: built-ins cannot arrive late (use :func:`register`)."""
    with _lock:
        if _loaded:
            raise RuntimeError("the backend registry is already loaded; register late backends with register()")
        for module in modules:
            if module not in _builtin_modules:
                _builtin_modules.append(module)


def _add(backend: Backend) -> None:
    global _generation
    if backend.name in _backends:
        raise ValueError(f"a backend named {backend.name!r} is already registered")
    _backends[backend.name] = backend
    _generation += 1


def register(backend: Backend) -> None:
    """Add a backend at run time (raises if the name is taken)."""
    _load()
    with _lock:
        _add(backend)


def unregister(name: str) -> None:
    global _generation
    _load()
    with _lock:
        if _backends.pop(name, None) is None:
            raise UnknownBackendError(name, list(_backends))
        _generation += 1


@contextlib.contextmanager
def registered(backend: Backend) -> Iterator[Backend]:
    """Register ``backend`` for the duration of a ``with`` block (tests, exploit corpus)."""
    register(backend)
    try:
        yield backend
    finally:
        unregister(backend.name)


def get(name: str) -> Backend:
    _load()
    try:
        return _backends[name]
    except KeyError:
        raise UnknownBackendError(name, list(_backends)) from None


def all_backends() -> list[Backend]:
    """Every registered backend, in registration order."""
    _load()
    return list(_backends.values())


def generation() -> int:
    _load()
    return _generation
