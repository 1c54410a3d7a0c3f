"""DeepEP's normal dispatch also moves FP8 payloads whose scales are packed UE8M0 (int32
``[num_tokens, hidden / 512]``, four exponent bytes per word, as DeepGEMM's SM100 kernels take them).

deepport's :func:`deepport.moe_dispatch` moves float32 ``[num_tokens, hidden / 128]`` scales, so the
compat layer decodes packed scales to their float32 powers of two before the dispatch and packs the
received ones again after it. Both steps are exact for every exponent byte a real scale has (1..254),
so the received words are bit-identical to the sent ones; a word holding byte 0 or 255 (not a scale)
is rejected by the re-packing with the position named.
"""

from __future__ import annotations

from typing import Any

import torch

from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk
from deepport.kernels.fp8_layout import BLOCK_K, UE8M0_PER_INT32, pack_ue8m0, unpack_ue8m0


def unpack_payload(x: Any) -> tuple[Any, bool]:
    """``(payload with float32 scales, whether the scales were packed UE8M0)``; other payloads unchanged."""
    if not (isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], torch.Tensor) and x[1].dtype == torch.int32):
        return x, False
    data, words = x
    if not isinstance(data, torch.Tensor) or data.dim() != 2:
        return x, False  # deepport's checks report it
    hidden = int(data.shape[1])
    if hidden % (BLOCK_K * UE8M0_PER_INT32) != 0:
        raise InvalidArgumentError("x[1]", f"expected hidden to be a multiple of {BLOCK_K * UE8M0_PER_INT32} with "
                                   f"packed UE8M0 scales (four 128-channel blocks per int32), got {hidden}")
    chk.expect_ndim("x[1]", words, 2, "[num_tokens, hidden / 512]")
    chk.expect_shape("x[1]", words, (int(data.shape[0]), hidden // (BLOCK_K * UE8M0_PER_INT32)),
                     "[num_tokens, hidden / 512] packed UE8M0")
    return (data, unpack_ue8m0(words, hidden // BLOCK_K)), True


def repack_payload(recv_x: Any, packed: bool) -> Any:
    """The received payload with its float32 scales packed back to UE8M0 words when the sent ones were."""
    if not packed:
        return recv_x
    data, scales = recv_x
    if int(scales.shape[0]) == 0:
        return data, torch.zeros((0, int(scales.shape[1]) // UE8M0_PER_INT32), dtype=torch.int32,
                                 device=scales.device)
    return data, pack_ue8m0(scales)
