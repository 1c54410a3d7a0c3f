"""Drop-in modules for code written against DeepSeek's FlashMLA, DeepGEMM and DeepEP.

Switching a caller to deepport costs one import line::

    from deepport.compat import flash_mla                     # was: import flash_mla
    from deepport.compat import deep_gemm                     # was: import deep_gemm
    from deepport.compat import deep_ep                       # was: import deep_ep

Each module keeps the upstream names, signatures and return conventions across the API generations
callers still use (FlashMLA 2025-02 .. 2026-04, DeepGEMM v1 .. 2.6, DeepEP's ``Buffer``), and routes
every call to deepport's op layer (:func:`deepport.mla_decode`, :func:`deepport.fp8_gemm_nt`, the MoE
ops, ...). So arguments are validated once by deepport (errors say expected versus got), and the call
runs on whatever backend deepport picks: ``deepport.use_backend("torch")`` around a call, the
``DEEPPORT_BACKEND`` environment variable, or the ``backend=`` keyword every shim adds. Where deepport
differs from upstream (an extension, a feature it lacks, a performance knob it ignores) the shim's
docstring says so; nothing upstream would give a different meaning is accepted silently. Upstream
names deepport leaves out raise ``AttributeError`` with the reason (:mod:`deepport.compat._absent`).
docs/COMPAT.md tabulates every upstream name with its shim and status (supported,
accepted-and-ignored, not supported), and ``tests/test_compat_table.py`` keeps the table true.
"""
