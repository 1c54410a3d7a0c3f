"""DeepEP's ``Config`` and buffer-size hints: tuning data deepport accepts and does not need.

deepport's MoE ops allocate their outputs per call and need no registered communication buffers or
chunk sizes, so a :class:`Config` never changes a result. The hint functions still return DeepEP's
sizes (the same formulas), so callers that size or log their buffers with them behave as before.
"""

from __future__ import annotations

from deepport.errors import InvalidArgumentError
from deepport.kernels import _checks as chk

NUM_MAX_NVL_PEERS = 8  # DeepEP's ranks per NVLink domain (node)
_TOPK_BYTES, _WEIGHT_BYTES, _SCALE_BYTES, _SOURCE_META_BYTES, _INT_BYTES = 8, 4, 4, 8, 4
_MAX_TOPK = _MAX_SCALES = 128
_ALIGNMENT = 128


def _align_up(x: int, alignment: int) -> int:
    return -(-x // alignment) * alignment


class Config:
    """DeepEP's performance config (SMs and chunk sizes of the normal kernels); validated as DeepEP does."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        self.num_sms = chk.expect_int("num_sms", num_sms, minimum=0)
        self.num_max_nvl_chunked_send_tokens = chk.expect_int("num_max_nvl_chunked_send_tokens",
                                                              num_max_nvl_chunked_send_tokens, minimum=1)
        self.num_max_nvl_chunked_recv_tokens = chk.expect_int("num_max_nvl_chunked_recv_tokens",
                                                              num_max_nvl_chunked_recv_tokens, minimum=1)
        if num_max_nvl_chunked_send_tokens >= num_max_nvl_chunked_recv_tokens:
            raise InvalidArgumentError("num_max_nvl_chunked_send_tokens", "expected fewer than "
                                       f"num_max_nvl_chunked_recv_tokens={num_max_nvl_chunked_recv_tokens}, got "
                                       f"{num_max_nvl_chunked_send_tokens}")
        send = chk.expect_int("num_max_rdma_chunked_send_tokens", num_max_rdma_chunked_send_tokens, minimum=1)
        recv = _align_up(chk.expect_int("num_max_rdma_chunked_recv_tokens", num_max_rdma_chunked_recv_tokens,
                                        minimum=1), send)
        if send > recv // 2:
            raise InvalidArgumentError("num_max_rdma_chunked_send_tokens", "expected at most half of "
                                       f"num_max_rdma_chunked_recv_tokens (aligned up to it: {recv}), got {send}")
        self.num_max_rdma_chunked_send_tokens, self.num_max_rdma_chunked_recv_tokens = send, recv

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, num_max_nvl_chunked_send_tokens="
                f"{self.num_max_nvl_chunked_send_tokens}, num_max_nvl_chunked_recv_tokens="
                f"{self.num_max_nvl_chunked_recv_tokens}, num_max_rdma_chunked_send_tokens="
                f"{self.num_max_rdma_chunked_send_tokens}, num_max_rdma_chunked_recv_tokens="
                f"{self.num_max_rdma_chunked_recv_tokens})")

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """DeepEP's NVLink buffer size for this config (bytes, a multiple of 128)."""
        rdma_ranks, nvl_ranks = max(num_ranks // NUM_MAX_NVL_PEERS, 1), min(num_ranks, NUM_MAX_NVL_PEERS)
        per_token = hidden_bytes + _SOURCE_META_BYTES + _MAX_TOPK * (_TOPK_BYTES + _WEIGHT_BYTES) + \
            _MAX_SCALES * _SCALE_BYTES
        channels = self.num_sms // 2
        total = channels * nvl_ranks * ((2 * rdma_ranks + 3) * _INT_BYTES +
                                        self.num_max_nvl_chunked_recv_tokens * per_token)
        return _align_up(total, _ALIGNMENT)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """DeepEP's RDMA buffer size for this config: 0 within one NVLink domain (<= 8 ranks)."""
        if num_ranks <= NUM_MAX_NVL_PEERS:
            return 0
        rdma_ranks, channels = num_ranks // NUM_MAX_NVL_PEERS, self.num_sms // 2
        per_token = hidden_bytes + _SOURCE_META_BYTES + _MAX_TOPK * (_TOPK_BYTES + _WEIGHT_BYTES) + \
            _MAX_SCALES * _SCALE_BYTES + 16
        total = channels * rdma_ranks * 2 * ((NUM_MAX_NVL_PEERS * 2 + 2) * _INT_BYTES +
                                             self.num_max_rdma_chunked_recv_tokens * per_token)
        return _align_up(total, _ALIGNMENT)


# DeepEP's tuned (num_max_nvl_chunked_send, nvl_recv, rdma_send, rdma_recv) per EP size.
DISPATCH_CHUNKS = {2: (24, 256, 6, 128), 4: (6, 256, 6, 128), 8: (6, 256, 6, 128), 16: (36, 288, 20, 128),
                   24: (32, 288, 8, 128), 32: (32, 288, 8, 128), 48: (32, 288, 8, 128), 64: (32, 288, 8, 128),
                   96: (20, 480, 12, 128), 128: (20, 560, 12, 128), 144: (32, 720, 12, 128), 160: (28, 720, 12, 128)}
COMBINE_CHUNKS = {2: (10, 256, 6, 128), 4: (9, 256, 6, 128), 8: (4, 256, 6, 128), 16: (4, 288, 12, 128),
                  24: (1, 288, 8, 128), 32: (1, 288, 8, 128), 48: (1, 288, 8, 128), 64: (1, 288, 8, 128),
                  96: (1, 480, 8, 128), 128: (1, 560, 8, 128), 144: (2, 720, 8, 128), 160: (2, 720, 8, 128)}


def low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                               num_experts: int) -> int:
    """DeepEP's low-latency buffer size: two sets of send, receive and signal buffers (bytes)."""
    tokens = chk.expect_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank, minimum=1)
    hidden = chk.expect_int("hidden", hidden, minimum=128)
    chk.expect_int("num_ranks", num_ranks, minimum=1)
    experts = chk.expect_int("num_experts", num_experts, minimum=1)
    scales = hidden // 128
    dispatch_msg = 16 + max(hidden * 2, hidden + scales * 4)
    combine_msg = scales * 4 + hidden * 2
    send = max(tokens * dispatch_msg, experts * tokens * combine_msg)
    recv = max(experts * tokens * dispatch_msg, experts * tokens * combine_msg)
    signal = _align_up(experts * _INT_BYTES, _ALIGNMENT)
    total = 2 * (send + recv + signal)
    return (total + _ALIGNMENT) // _ALIGNMENT * _ALIGNMENT
