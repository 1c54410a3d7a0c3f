"""FlashMLA's ``flash_mla.flash_mla_interface`` module path, for callers that import from it directly.

The same objects as :mod:`deepport.compat.flash_mla`; the names deepport leaves out raise
``AttributeError`` with the reason here too.
"""

from __future__ import annotations

from deepport.compat._absent import module_getattr
from deepport.compat.flash_mla import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata
from deepport.compat.flash_mla._absent import REASONS as _REASONS

__getattr__ = module_getattr(__name__, _REASONS)

__all__ = ["FlashMLASchedMeta", "flash_mla_with_kvcache", "get_mla_metadata"]
