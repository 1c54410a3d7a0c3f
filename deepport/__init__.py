"""deepport: DeepSeek's inference kernels on whatever GPU is present, and a suite that certifies ports.

    import deepport
    out, lse = deepport.mla_decode(q, k_cache, block_table, cache_seqlens, 512)
    print(deepport.explain("mla_decode", q, k_cache, block_table, cache_seqlens, 512))

Importing deepport needs only numpy and torch; each backend's toolchain is imported on first use. It also
registers the ops as torch custom ops (``torch.ops.deepport.mla_decode(...)``, for ``torch.compile`` and
CUDA graphs; see :mod:`deepport.kernels.torch_ops`).
"""

from deepport.backends import BUILTIN as _BUILTIN_BACKENDS
from deepport.dispatch import all_backends, use_backend
from deepport.dispatch.registry import add_builtin_modules as _add_builtin_modules
from deepport.errors import (
    ArgumentTypeError,
    BackendNotSupportedError,
    DeepportError,
    InvalidArgumentError,
    NoBackendError,
    UnknownBackendError,
)
from deepport.kernels.explain import explain
from deepport.kernels.fp8_gemm import fp8_gemm_nn, fp8_gemm_nt, fp8_gemm_tn, fp8_gemm_tt
from deepport.kernels.fp8_grouped_gemm import m_grouped_fp8_gemm_nt_contiguous, m_grouped_fp8_gemm_nt_masked
from deepport.kernels.fp8_layout import (
    ceil_to_ue8m0,
    get_mk_alignment_for_contiguous_layout,
    get_mn_major_tma_aligned_packed_ue8m0_tensor,
    get_mn_major_tma_aligned_tensor,
    pack_ue8m0,
    per_block_cast_to_fp8,
    per_token_cast_to_fp8,
    unpack_ue8m0,
)
from deepport.kernels.mla_decode import MLAMetadata, get_mla_metadata, mla_decode
from deepport.kernels.moe_combine import moe_combine
from deepport.kernels.moe_combine_expanded import moe_combine_expanded
from deepport.kernels.moe_dispatch import moe_dispatch
from deepport.kernels.moe_dispatch_expanded import moe_dispatch_expanded
from deepport.kernels.moe_handle import MoEExpandedHandle, MoEHandle, MoELowLatencyHandle
from deepport.kernels.moe_layout import moe_layout
from deepport.kernels.moe_low_latency_combine import moe_low_latency_combine
from deepport.kernels.moe_low_latency_dispatch import moe_low_latency_dispatch
from deepport.kernels.torch_ops import register_torch_ops

__version__ = "0.1.0"

# The package root wires the layers: dispatch imports no backend, so the root hands it the built-in
# backends' module names (imported on the registry's first use, like entry-point plug-ins).
_add_builtin_modules(_BUILTIN_BACKENDS)
register_torch_ops()  # torch.ops.deepport.* (about 3 ms per op)

__all__ = [
    "ArgumentTypeError",
    "BackendNotSupportedError",
    "DeepportError",
    "InvalidArgumentError",
    "MLAMetadata",
    "MoEExpandedHandle",
    "MoEHandle",
    "MoELowLatencyHandle",
    "NoBackendError",
    "UnknownBackendError",
    "__version__",
    "all_backends",
    "ceil_to_ue8m0",
    "explain",
    "fp8_gemm_nn",
    "fp8_gemm_nt",
    "fp8_gemm_tn",
    "fp8_gemm_tt",
    "get_mk_alignment_for_contiguous_layout",
    "get_mla_metadata",
    "get_mn_major_tma_aligned_packed_ue8m0_tensor",
    "get_mn_major_tma_aligned_tensor",
    "m_grouped_fp8_gemm_nt_contiguous",
    "m_grouped_fp8_gemm_nt_masked",
    "mla_decode",
    "moe_combine",
    "moe_combine_expanded",
    "moe_dispatch",
    "moe_dispatch_expanded",
    "moe_layout",
    "moe_low_latency_combine",
    "moe_low_latency_dispatch",
    "pack_ue8m0",
    "per_block_cast_to_fp8",
    "per_token_cast_to_fp8",
    "register_torch_ops",
    "unpack_ue8m0",
    "use_backend",
]
