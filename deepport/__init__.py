"""deepport: DeepSeek's inference kernels on whatever GPU is present, and a suite that certifies ports.

    import deepport
    out, lse = deepport.mla_decode(q, k_cache, block_table, cache_seqlens, 512)
    print(deepport.explain("mla_decode", q, k_cache, block_table, cache_seqlens, 512))

Importing deepport needs only numpy and torch; each backend's toolchain is imported on first use.
"""

from deepport.dispatch import all_backends, explain, use_backend
from deepport.errors import (
    ArgumentTypeError,
    BackendNotSupportedError,
    DeepportError,
    InvalidArgumentError,
    NoBackendError,
    UnknownBackendError,
)
from deepport.kernels.mla_decode import MLAMetadata, get_mla_metadata, mla_decode

__version__ = "0.1.0"

__all__ = [
    "ArgumentTypeError", "BackendNotSupportedError", "DeepportError", "InvalidArgumentError", "MLAMetadata",
    "NoBackendError", "UnknownBackendError", "__version__", "all_backends", "explain", "get_mla_metadata",
    "mla_decode", "use_backend",
]
