"""Built-in backends. A backend is one folder here whose ``__init__`` exports ``BACKEND``;
registering it is one line in ``BUILTIN``. The package root hands ``BUILTIN`` to the dispatch registry
(``deepport/__init__.py``), which imports each module on first use, as it does plug-ins. Third-party
backends use the ``deepport.backends`` entry-point group instead and touch nothing here. To start one,
copy ``_template/`` (not registered) and follow its walk-through."""

BUILTIN: tuple[str, ...] = (
    "deepport.backends.reference",
    "deepport.backends.torch",
    "deepport.backends.triton",
    "deepport.backends.hopper",
    "deepport.backends.triton",
    "deepport.backends.opencl",
)
