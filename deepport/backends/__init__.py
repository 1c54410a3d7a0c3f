"""Built-in backends. A backend is one folder here whose ``__init__`` exports ``BACKEND``;
registering it is one line in ``BUILTIN``. Third-party backends use the ``deepport.backends``
entry-point group instead and touch nothing here."""

BUILTIN: tuple[str, ...] = (
    "deepport.backends.reference",
    "deepport.backends.torch",
    "deepport.backends.opencl",
)
