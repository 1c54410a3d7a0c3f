"""The upstream ``flash_mla`` names deepport leaves out, each with the reason (see :mod:`deepport.compat._absent`)."""

from __future__ import annotations

_PREFILL = "FlashMLA's SM100 dense MHA prefill (forward and backward) is not a deepport op"

REASONS = {
    "flash_mla_sparse_fwd": "DeepSeek-V3.2 sparse attention prefill is not a deepport op (deepport has the dense "
                            "MLA decode only)",
    "flash_attn_varlen_func": _PREFILL,
    "flash_attn_varlen_qkvpacked_func": _PREFILL,
    "flash_attn_varlen_kvpacked_func": _PREFILL,
}
