"""Ahead-of-time compilation of the Triton kernels for a GPU target, without a GPU (lowering tests).

Run in a process where ``TRITON_INTERPRET`` is unset (the interpreter replaces compilation). Arguments
are specialised the way triton's launcher does: pointers 16-byte aligned, integers divisible by 16
marked so, integers equal to 1 folded into constants.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

HOPPER = GPUTarget("cuda", 90, 32)


@dataclass(frozen=True)
class Ptr:
    """A pointer argument of element type ``dtype`` (triton's names: bf16, fp16, fp32, i32 ...)."""

    dtype: str


def compile_for(fn: Any, args: Mapping[str, Any], *, target: GPUTarget = HOPPER, num_warps: int = 4,
                num_stages: int = 3) -> Any:
    """Compile ``fn`` with ``args`` (name -> :class:`Ptr`, int, float, or bool / int constexpr for
    ``tl.constexpr`` parameters) for ``target``; returns triton's compiled kernel (``.asm``)."""
    signature: dict[str, str] = {}
    constexprs: dict[tuple[int, ...], Any] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    params = fn.arg_names
    missing = set(params) - set(args)
    if missing:
        raise ValueError(f"missing arguments {sorted(missing)}")
    for i, name in enumerate(params):
        value = args[name]
        if i in fn.constexprs:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, Ptr):
            signature[name] = "*" + value.dtype
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name] = "constexpr"
            constexprs[(i,)] = 1
        else:
            signature[name] = "i64" if abs(value) >= 1 << 31 else "i32"  # as triton types a Python int
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def mla_lowering_report() -> dict[str, dict[str, int]]:
    """Compile the MLA decode kernels for sm_90a with each Hopper configuration of ``configs.py`` on the
    DeepSeek shape of its bucket (576/512, page 64, bf16), and one split-V, TMA-loaded variant, through
    the real launcher (its launches recorded on CPU tensors, ``deepport.backends.triton.aot``); count
    tensor-core instructions, bulk tensor copies and shared memory."""
    import torch

    import deepport
    from deepport.backends.triton import aot, configs
    from deepport.backends.triton import mla_decode as tm
    from deepport.backends.triton.mla_decode_kernels import mla_decode_combine_kernel, mla_decode_split_kernel
    from deepport.kernels import mla_decode as mla

    rows_of_bucket = {"rows<=16": 16, "rows<=32": 32, "rows>32": 128}
    wanted = [(f"split {bucket}", rows_of_bucket[bucket], cfg) for bucket, cfg in configs.MLA_TUNED["H200"]]
    wanted.append(("split rows>32 v_split=2 k_tma", 128,
                   configs.MLAConfig(block_h=64, block_n=32, num_warps=4, num_stages=2, v_split=2, k_tma=True)))
    report: dict[str, dict[str, int]] = {}
    for name, h_q, cfg in wanted:
        lens = torch.tensor([4096, 64], dtype=torch.int32)
        q = torch.zeros(2, 1, h_q, 576, dtype=torch.bfloat16)
        k = torch.zeros(65, 64, 1, 576, dtype=torch.bfloat16)
        table = torch.arange(2 * 64, dtype=torch.int32).reshape(2, 64) % 65
        md = deepport.get_mla_metadata(lens, h_q, 1)
        call = mla.bind(q, k, table, lens, 512, metadata=md)
        out = torch.empty(2, 1, h_q, 512, dtype=torch.bfloat16)
        lse = torch.empty(2, h_q, 1)
        with aot.recorded_launches([mla_decode_split_kernel, mla_decode_combine_kernel]) as launches:
            tm.run(call, out, lse, config=cfg)
        report[name] = _counts(aot.compile_launch(launches[0]))
    combine = compile_for(mla_decode_combine_kernel, dict(
        o_acc_ptr=Ptr("fp32"), lse_acc_ptr=Ptr("fp32"), out_ptr=Ptr("bf16"), lse_ptr=Ptr("fp32"), cut_ptr=Ptr("i32"),
        splits_ptr=Ptr("i32"), group=16, s_q=1, q_rows=16, h_q=16, acc_rows=16, D_V=512, BLOCK_DV=512), num_warps=4)
    report["combine"] = _counts(combine)
    return report


def fp8_tail_split_report() -> dict[str, dict[str, int]]:
    """Compile the dense FP8 GEMM's tail split for sm_90a through the real launcher (``fp8_gemm.launch`` on CPU
    tensors, launches recorded): M = 4096, N x K = 2112 x 7168 on 132 SMs (544 tiles of 128 x 128: 528 whole,
    16 split 8 ways), with the 8-warp 128 x 128 tiles and with two 64-wide halves capped at 128 registers
    (two programs per SM: 264 slots, 16 tiles split 8 ways); the GEMM kernel and the tail reduce of each."""
    import torch

    from deepport.backends.triton import aot, fp8_configs
    from deepport.backends.triton import fp8_gemm as dense
    from deepport.backends.triton.fp8_gemm_kernels import fp8_gemm_nt_kernel, tail_reduce_kernel
    from deepport.kernels import fp8_gemm

    m, n, k = 4096, 2112, 7168
    a, b = torch.empty((m, k), dtype=torch.float8_e4m3fn), torch.empty((n, k), dtype=torch.float8_e4m3fn)
    sfa, sfb = torch.empty((m, k // 128)), torch.empty((-(-n // 128), k // 128))
    out = torch.empty((m, n), dtype=torch.bfloat16)
    call = fp8_gemm.bind("nt", (a, sfa), (b, sfb), out)
    report: dict[str, dict[str, int]] = {}
    for name, cfg in (("128x128", fp8_configs.GemmConfig(128, 128, 8, 4, tail_split=0)),
                      ("halves", fp8_configs.GemmConfig(128, 128, 8, 3, split_n=2, maxnreg=128, tail_split=0))):
        with aot.recorded_launches([fp8_gemm_nt_kernel, tail_reduce_kernel]) as launches:
            dense.launch(call, out, cfg, slots=132 * fp8_configs.resident_programs(cfg))
        for launch in launches:
            counts = _counts(aot.compile_launch(launch))
            counts["programs"] = launch.grid[0]
            report[f"{name} {launch.name}"] = counts
    return report


def _counts(kernel: Any) -> dict[str, int]:
    ptx = kernel.asm["ptx"]
    return {"wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync.aligned"),
            "tma": ptx.count("cp.async.bulk.tensor"), "shared": int(kernel.metadata.shared),
            "sm_90a": int(".target sm_90a" in ptx)}


def moe_lowering_report() -> dict[str, dict[str, int]]:
    """Compile the MoE kernels for sm_90a; count the e4m3 conversions of the FP8 cast and the atomic
    instructions of the fused dispatch's count and layout kernels."""
    from deepport.backends.triton import moe_expanded_dispatch_kernels as x
    from deepport.backends.triton import moe_permute_kernels as k
    from deepport.backends.triton import moe_sum_graph_kernels as g

    # the low-latency sender's arguments, but for its buffers (send rows or the peers' slots)
    send_rows = dict(
        x_ptr=Ptr("bf16"), stride_x=7168, idx_ptr=Ptr("i64"), stride_idx=8, num_tokens=128, num_local=128, num_ranks=2,
        t_max=128, in_rank_ptr=Ptr("u8"), send_slot_ptr=Ptr("i64"), target_ptr=Ptr("i64"), hidden=7168, fp8_max=448.0,
        fp8_max_inv=1 / 448, amax_floor=1e-4, win_ptr=Ptr("i64"), seq_ptr=Ptr("i64"), idx_copy_ptr=Ptr("i64"), K=8,
        KP=8, RP=2, BLOCK_T=128, CAST=True, STORE_FP32=False, META_ALIGN=16, Q_ALIGN=16, S_ALIGN=16)
    pair = dict(  # the pair scatter of the low-latency dispatch's payload (int64 words) and scales (transposed)
        a_src_ptr=Ptr("i64"), a_dst_ptr=Ptr("i64"), a_cols=896, a_stride_src=930, a_dg=229376, a_dr=896, a_dc=1,
        a_blocks=4, b_src_ptr=Ptr("fp32"), b_dst_ptr=Ptr("fp32"), b_cols=56, b_stride_src=1860, b_dg=14336, b_dr=1,
        b_dc=256, targets_ptr=Ptr("i64"), rows_per_group=256, received_ptr=Ptr("i64"), seq_ptr=Ptr("i64"),
        num_sources=2, t_max=128, row_bytes=7440, a_off=0, b_off=7168, Q=8, BLOCK_A=256, BLOCK_B=64)
    kernels = {
        "layout": compile_for(k.moe_layout_count_kernel, dict(
            idx_ptr=Ptr("i64"), per_rank_ptr=Ptr("i32"), per_expert_ptr=Ptr("i32"), in_rank_ptr=Ptr("u8"),
            num_tokens=4096, num_topk=8, experts_per_rank=32, num_ranks=8, BLOCK_T=64, BLOCK_K=8, TABLE=False,
            RANKS_P=8)),
        # the normal dispatch's count table straight from the kernel
        "layout_table": compile_for(k.moe_layout_count_kernel, dict(
            idx_ptr=Ptr("i64"), per_rank_ptr=Ptr("i64"), per_expert_ptr=Ptr("i64"), in_rank_ptr=Ptr("u8"),
            num_tokens=4096, num_topk=8, experts_per_rank=128, num_ranks=2, BLOCK_T=64, BLOCK_K=8, TABLE=True,
            RANKS_P=2)),
        "place_rows": compile_for(k.moe_place_rows_kernel, dict(
            src_ptr=Ptr("i16"), index_ptr=Ptr("i64"), dst_ptr=Ptr("i16"), rows_per_group=4096, num_cols=7168,
            stride_src=7168, stride_dg=0, stride_dr=7168, stride_dc=1, ZERO_MISSING=True, BLOCK_C=4096)),
        "weighted_rows": compile_for(k.moe_weighted_rows_kernel, dict(
            y_ptr=Ptr("bf16"), src_pos_ptr=Ptr("i64"), weight_ptr=Ptr("fp32"), seg_ptr=Ptr("i64"),
            out_ptr=Ptr("fp32"), num_cols=7168, stride_y=7168, BLOCK_C=4096, PREFETCH=False)),
        "weighted_rows_prefetch": compile_for(k.moe_weighted_rows_kernel, dict(
            y_ptr=Ptr("bf16"), src_pos_ptr=Ptr("i64"), weight_ptr=Ptr("fp32"), seg_ptr=Ptr("i64"),
            out_ptr=Ptr("bf16"), num_cols=7168, stride_y=7168, BLOCK_C=2048, PREFETCH=True)),
        "token_rows": compile_for(k.moe_token_rows_kernel, dict(
            y_ptr=Ptr("bf16"), table_ptr=Ptr("i64"), weight_ptr=Ptr("fp32"), out_ptr=Ptr("bf16"), num_cols=7168,
            stride_y=7168, win_ptr=Ptr("i64"), seq_ptr=Ptr("i64"), num_ranks=2, rows_per_rank=128, K=8, BLOCK_C=2048,
            DIRECT=False, ADDRESSED=False, LANDED=False)),
        # the low-latency combine's final sum of the float32 partial sums where the exchange left them
        "token_rows_landed": compile_for(k.moe_token_rows_kernel, dict(
            y_ptr=Ptr("fp32"), table_ptr=Ptr("i64"), weight_ptr=Ptr("fp32"), out_ptr=Ptr("bf16"), num_cols=7168,
            stride_y=7168, win_ptr=Ptr("i64"), seq_ptr=Ptr("i64"), num_ranks=2, rows_per_rank=128, K=2, BLOCK_C=1024,
            DIRECT=False, ADDRESSED=False, LANDED=True)),
        # the normal combine's sums of rows read where they landed (each term's row by its address)
        "token_rows_at": compile_for(k.moe_token_rows_kernel, dict(
            y_ptr=Ptr("bf16"), table_ptr=Ptr("i64"), weight_ptr=Ptr("fp32"), out_ptr=Ptr("bf16"), num_cols=7168,
            stride_y=7168, win_ptr=Ptr("i64"), seq_ptr=Ptr("i64"), num_ranks=2, rows_per_rank=128, K=8, BLOCK_C=2048,
            DIRECT=False, ADDRESSED=True, LANDED=False)),
        # the same sums with the addresses made in the kernel from in_rank (2 ranks: 2 terms)
        "rank_rows_at": compile_for(k.moe_rank_rows_kernel, dict(
            like_ptr=Ptr("bf16"), in_rank_ptr=Ptr("u8"), cumsum_ptr=Ptr("i64"), base_ptr=Ptr("i64"), own=1 << 40,
            me=0, out_ptr=Ptr("bf16"), num_cols=7168, num_tokens=4096, table_ptr=Ptr("i64"), WORLD=2, BLOCK_C=2048,
            FROM_TABLE=False)),
        # the combine replayed as a CUDA graph: the same sums with own rows and output from the table, the
        # table kernel (eager) and the parts into the sources' blocks (table-driven, rows strided per program)
        "rank_rows_table": compile_for(k.moe_rank_rows_kernel, dict(
            like_ptr=Ptr("bf16"), in_rank_ptr=Ptr("u8"), cumsum_ptr=Ptr("i64"), base_ptr=Ptr("i64"), own=0,
            me=0, out_ptr=Ptr("bf16"), num_cols=7168, num_tokens=4096, table_ptr=Ptr("i64"), WORLD=2, BLOCK_C=2048,
            FROM_TABLE=True)),
        "sum_table": compile_for(g.moe_sum_table_kernel, dict(
            table_ptr=Ptr("i64"), rows_ptr=Ptr("bf16"), out_ptr=Ptr("bf16"), own_address=1 << 40,
            in_rank_ptr=Ptr("u8"), flags_ptr=Ptr("u8"), cumsum_ptr=Ptr("i64"), num_tokens=4096, s0=0, s1=1, s2=0,
            s3=0, s4=0, s5=0, s6=0, s7=0, c0=4000, c1=1, c2=0, c3=0, c4=0, c5=0, c6=0, c7=0, WORLD=2, BLOCK_T=1024)),
        "parts_to_blocks": compile_for(g.moe_parts_to_blocks_kernel, dict(
            table_ptr=Ptr("i64"), base_ptr=Ptr("i64"), like_ptr=Ptr("i64"), me=0, num_words=1792, WORLD=2,
            BLOCK_C=256), num_warps=2),
        # the normal dispatch's received routes from its metadata rows
        "receive_meta": compile_for(k.moe_receive_meta_kernel, dict(
            meta_ptr=Ptr("i32"), stride_meta=3604, num_rows=8192, src_ptr=Ptr("i64"), local_ptr=Ptr("i64"),
            weight_ptr=Ptr("fp32"), first_local=128, num_local=128, K=8, KP=8, HAS_WEIGHTS=True, BLOCK_R=128)),
        # the normal dispatch over peer blocks: every row into its destinations' blocks, every row out of them
        "rows_to_blocks": compile_for(k.moe_rows_to_blocks_kernel, dict(
            x_ptr=Ptr("i64"), scale_ptr=Ptr("fp32"), idx_ptr=Ptr("i64"), weight_ptr=Ptr("fp32"), in_rank_ptr=Ptr("u8"),
            cumsum_ptr=Ptr("i64"), base_ptr=Ptr("i64"), x_out_ptr=Ptr("i64"), scale_out_ptr=Ptr("fp32"),
            src_out_ptr=Ptr("i64"), local_out_ptr=Ptr("i64"), weight_out_ptr=Ptr("fp32"), own_start=4096, me=0,
            first_local=0, num_local=128, num_tokens=4096, x_words=1792, num_scales=0, stride_st=8, stride_sc=1,
            row_bytes=14416, scale_at=0, meta_at=14336, table_ptr=Ptr("i64"), send_at=0, count_ptr=Ptr("i64"),
            stride_count=129, WORLD=2, K=8, KP=8, META=17, MP=32,
            HAS_SCALES=False, HAS_WEIGHTS=True, BLOCK_C=256, BLOCK_S=2, FROM_TABLE=False, ROWS=0, COUNTED=False),
            num_warps=2),
        # the others' rows into one send buffer before the host knows the counts (the early send, FP8 with scales)
        "rows_to_blocks_counted": compile_for(k.moe_rows_to_blocks_kernel, dict(
            x_ptr=Ptr("i64"), scale_ptr=Ptr("fp32"), idx_ptr=Ptr("i64"), weight_ptr=Ptr("fp32"), in_rank_ptr=Ptr("u8"),
            cumsum_ptr=Ptr("i64"), base_ptr=Ptr("i64"), x_out_ptr=Ptr("i64"), scale_out_ptr=Ptr("fp32"),
            src_out_ptr=Ptr("i64"), local_out_ptr=Ptr("i64"), weight_out_ptr=Ptr("fp32"), own_start=0, me=1,
            first_local=32, num_local=32, num_tokens=4096, x_words=896, num_scales=56, stride_st=56, stride_sc=1,
            row_bytes=7472, scale_at=7168, meta_at=7392, table_ptr=Ptr("i64"), send_at=1 << 40,
            count_ptr=Ptr("i64"), stride_count=33, WORLD=8, K=8, KP=8, META=17, MP=32, HAS_SCALES=True,
            HAS_WEIGHTS=True, BLOCK_C=256, BLOCK_S=64, FROM_TABLE=False, ROWS=1, COUNTED=True), num_warps=2),
        "blocks_to_rows": compile_for(k.moe_blocks_to_rows_kernel, dict(
            base_ptr=Ptr("i64"), count_ptr=Ptr("i64"), stride_count=129, x_out_ptr=Ptr("i64"),
            scale_out_ptr=Ptr("fp32"), src_ptr=Ptr("i64"), local_ptr=Ptr("i64"), weight_out_ptr=Ptr("fp32"), me=0,
            x_words=1792, num_scales=0, row_bytes=14416, scale_at=0, meta_at=14336, first_local=0, num_local=128,
            table_ptr=Ptr("i64"), WORLD=2, K=8, KP=8, HAS_SCALES=False, HAS_WEIGHTS=True, BLOCK_C=256, BLOCK_S=2,
            FROM_TABLE=False), num_warps=2),
        # the same two with the addresses from the table (the dispatch's exchange replayed as a CUDA graph)
        "rows_to_blocks_table": compile_for(k.moe_rows_to_blocks_kernel, dict(
            x_ptr=Ptr("i64"), scale_ptr=Ptr("fp32"), idx_ptr=Ptr("i64"), weight_ptr=Ptr("fp32"), in_rank_ptr=Ptr("u8"),
            cumsum_ptr=Ptr("i64"), base_ptr=Ptr("i64"), x_out_ptr=Ptr("i64"), scale_out_ptr=Ptr("fp32"),
            src_out_ptr=Ptr("i64"), local_out_ptr=Ptr("i64"), weight_out_ptr=Ptr("fp32"), own_start=0, me=0,
            first_local=0, num_local=128, num_tokens=4096, x_words=1792, num_scales=0, stride_st=8, stride_sc=1,
            row_bytes=14416, scale_at=0, meta_at=14336, table_ptr=Ptr("i64"), send_at=0, count_ptr=Ptr("i64"),
            stride_count=129, WORLD=2, K=8, KP=8, META=17, MP=32,
            HAS_SCALES=False, HAS_WEIGHTS=True, BLOCK_C=256, BLOCK_S=2, FROM_TABLE=True, ROWS=0, COUNTED=False),
            num_warps=2),
        "blocks_to_rows_table": compile_for(k.moe_blocks_to_rows_kernel, dict(
            base_ptr=Ptr("i64"), count_ptr=Ptr("i64"), stride_count=129, x_out_ptr=Ptr("i64"),
            scale_out_ptr=Ptr("fp32"), src_ptr=Ptr("i64"), local_ptr=Ptr("i64"), weight_out_ptr=Ptr("fp32"), me=0,
            x_words=1792, num_scales=0, row_bytes=14416, scale_at=0, meta_at=14336, first_local=0, num_local=128,
            table_ptr=Ptr("i64"), WORLD=2, K=8, KP=8, HAS_SCALES=False, HAS_WEIGHTS=True, BLOCK_C=256, BLOCK_S=2,
            FROM_TABLE=True), num_warps=2),
        # the low-latency combine's float32 partial sums stored straight into the source ranks' slots
        "token_rows_window": compile_for(k.moe_token_rows_kernel, dict(
            y_ptr=Ptr("bf16"), table_ptr=Ptr("i64"), weight_ptr=Ptr("fp32"), out_ptr=Ptr("fp32"), num_cols=7168,
            stride_y=7168, win_ptr=Ptr("i64"), seq_ptr=Ptr("i64"), num_ranks=2, rows_per_rank=128, K=8, BLOCK_C=2048,
            DIRECT=True, ADDRESSED=False, LANDED=False)),
        "token_table": compile_for(k.moe_token_table_kernel, dict(
            src_row_ptr=Ptr("i64"), expert_ptr=Ptr("i32"), token_of_ptr=Ptr("i64"), topk_ptr=Ptr("i64"),
            row_weight_ptr=Ptr("fp32"), table_ptr=Ptr("i64"), table_weight_ptr=Ptr("fp32"), num_rows=65536,
            stride_topk=8, K=8, KP=8, BLOCK_R=128)),
        "ll_layout": compile_for(k.moe_ll_layout_kernel, dict(
            idx_ptr=Ptr("i64"), stride_idx=8, src_ptr=Ptr("i64"), packed_ptr=Ptr("i64"), count_ptr=Ptr("i32"),
            num_tokens=128, capacity=128, K=8, KP=8, BLOCK_T=64)),
        "ll_positions": compile_for(k.moe_ll_positions_kernel, dict(
            idx_ptr=Ptr("i32"), stride_idx=8, src_pos_ptr=Ptr("i64"), capacity=128, K=8, KP=8, BLOCK_T=64)),
        "cast_fp8": compile_for(k.moe_cast_fp8_kernel, dict(
            x_ptr=Ptr("bf16"), q_ptr=Ptr("fp8e4nv"), scale_ptr=Ptr("fp32"), hidden=7168, fp8_max=448.0,
            fp8_max_inv=1 / 448, amax_floor=1e-4, STORE_FP32=False)),
        "ll_send_rows": compile_for(k.moe_ll_send_rows_kernel, {**send_rows, **dict(
            meta_ptr=Ptr("i32"), stride_meta=1857, q_ptr=Ptr("fp8e4nv"), stride_q=7428, scale_ptr=Ptr("fp32"),
            stride_s=1857, blocks_per_program=4, row_bytes=0, meta_off=0, q_off=0, scale_off=0, DIRECT=False,
            DIRECT_Q=False, COPY_IDX=False, BPP=4)}),
        # the same sender storing straight into the peers' slots (rows of 7168 + 224 + 36 bytes, padded to 7440)
        "ll_send_window": compile_for(k.moe_ll_send_rows_kernel, {**send_rows, **dict(
            meta_ptr=Ptr("bf16"), stride_meta=7168, q_ptr=Ptr("bf16"), stride_q=7168, scale_ptr=Ptr("bf16"),
            stride_s=7168, blocks_per_program=8, row_bytes=7440, meta_off=7392, q_off=0, scale_off=7168, DIRECT=True,
            DIRECT_Q=True, COPY_IDX=True, BPP=8)}),
        # the receiver's placement of payload (int64 words of packed rows) and scales (transposed) in one launch
        "scatter_row_pair": compile_for(k.moe_scatter_row_pair_kernel, {**pair, "LANDED": False}),
        # the same, the rows read where the written exchange left them in this rank's slots
        "scatter_row_pair_landed": compile_for(k.moe_scatter_row_pair_kernel, {**pair, "LANDED": True}),
        # the low-latency receiver's routes from the meta of the rows where they landed
        "ll_receive_landed": compile_for(k.moe_ll_receive_kernel, dict(
            meta_ptr=Ptr("i32"), stride_meta=0, first_local=0, num_local=128, slots=256, recv_token_ptr=Ptr("i64"),
            recv_local_ptr=Ptr("i64"), valid_ptr=Ptr("i8"), position_ptr=Ptr("i64"), target_ptr=Ptr("i64"),
            count_ptr=Ptr("i64"), count32_ptr=Ptr("i32"), packed_ptr=Ptr("i64"), count_copy_ptr=Ptr("i32"),
            received_ptr=Ptr("i64"), seq_ptr=Ptr("i64"), num_sources=2, t_max=128, row_bytes=7440, meta_off=7392,
            K=8, KP=8, BLOCK_S=256, COPY_COUNT=True, LANDED=True)),
        "ll_window_rows": compile_for(k.moe_ll_window_rows_kernel, dict(
            src_ptr=Ptr("u8"), stride_src=7168, target_ptr=Ptr("i64"), win_ptr=Ptr("i64"), seq_ptr=Ptr("i64"),
            num_ranks=2, t_max=128, row_bytes=7440, part_off=0, width=7168, BLOCK=4096)),
        "ll_return": compile_for(k.moe_ll_return_kernel, dict(
            idx_ptr=Ptr("i64"), stride_idx=8, weight_ptr=Ptr("fp32"), stride_w=8, send_slot_ptr=Ptr("i64"), num_ranks=2,
            num_local=128, t_max=128, table_ptr=Ptr("i64"), table_w_ptr=Ptr("fp32"), w_send_ptr=Ptr("fp32"),
            win_ptr=Ptr("i64"), seq_ptr=Ptr("i64"), K=8, KP=8, Q=2, QP=2, PER_RANK=True, SINGLE=False,
            SEND_WEIGHTS=True, DIRECT_W=False)),
        # the weights stored straight into the receivers' slots (the combine's written weights exchange)
        "ll_return_window": compile_for(k.moe_ll_return_kernel, dict(
            idx_ptr=Ptr("i64"), stride_idx=8, weight_ptr=Ptr("fp32"), stride_w=8, send_slot_ptr=Ptr("i64"), num_ranks=2,
            num_local=128, t_max=128, table_ptr=Ptr("i64"), table_w_ptr=Ptr("fp32"), w_send_ptr=Ptr("fp32"),
            win_ptr=Ptr("i64"), seq_ptr=Ptr("i64"), K=8, KP=8, Q=2, QP=2, PER_RANK=True, SINGLE=False,
            SEND_WEIGHTS=True, DIRECT_W=True)),
        "ll_return_slots": compile_for(k.moe_ll_return_kernel, dict(
            idx_ptr=Ptr("i64"), stride_idx=2, weight_ptr=Ptr("fp32"), stride_w=2, send_slot_ptr=Ptr("i64"),
            num_ranks=16, num_local=16, t_max=128, table_ptr=Ptr("i64"), table_w_ptr=Ptr("fp32"),
            w_send_ptr=Ptr("fp32"), win_ptr=Ptr("i64"), seq_ptr=Ptr("i64"), K=2, KP=2, Q=2, QP=2, PER_RANK=False,
            SINGLE=True, SEND_WEIGHTS=False, DIRECT_W=False)),
        "ll_pairs": compile_for(k.moe_ll_pairs_kernel, dict(
            recv_local_ptr=Ptr("i64"), valid_ptr=Ptr("i8"), position_ptr=Ptr("i64"), w_ptr=Ptr("fp32"),
            table_ptr=Ptr("i64"), pair_w_ptr=Ptr("fp32"), slots=256, received_ptr=Ptr("i64"), seq_ptr=Ptr("i64"),
            t_max=128, num_sources=2, K=8, KP=8, BLOCK_S=64, HAS_W=True, LANDED=False)),
        # the receiver reading the weights where the written exchange left them
        "ll_pairs_landed": compile_for(k.moe_ll_pairs_kernel, dict(
            recv_local_ptr=Ptr("i64"), valid_ptr=Ptr("i8"), position_ptr=Ptr("i64"), w_ptr=Ptr("fp32"),
            table_ptr=Ptr("i64"), pair_w_ptr=Ptr("fp32"), slots=256, received_ptr=Ptr("i64"), seq_ptr=Ptr("i64"),
            t_max=128, num_sources=2, K=8, KP=8, BLOCK_S=64, HAS_W=True, LANDED=True)),
        "expanded_count": compile_for(x.moe_expanded_count_kernel, dict(
            idx_ptr=Ptr("i64"), counts_ptr=Ptr("i32"), hist_ptr=Ptr("i32"), flags_ptr=Ptr("u8"), num_tokens=4096,
            num_topk=8, num_experts=256, BLOCK_T=64, BLOCK_K=8, BLOCK_E=64)),
        "expanded_layout": compile_for(x.moe_expanded_layout_kernel, dict(
            idx_ptr=Ptr("i64"), sums_ptr=Ptr("fp32"), counts_ptr=Ptr("i32"), hist_ptr=Ptr("i32"),
            token_of_ptr=Ptr("i64"), src_row_ptr=Ptr("i64"), m_idx_ptr=Ptr("i32"), expert_of_ptr=Ptr("i32"),
            recv_w_ptr=Ptr("fp32"), weight_of_ptr=Ptr("fp32"), recv_src_ptr=Ptr("i64"), recv_topk_ptr=Ptr("i64"),
            idx64_ptr=Ptr("i64"), dest_ptr=Ptr("i64"), num_tokens=4096, num_topk=8, num_experts=256, alignment=128,
            BLOCK_T=64, BLOCK_K=8, BLOCK_E=64, BLOCK_B=64, BLOCK_A=256, BLOCK_P=128, WRITE_DEST=True)),
        "expanded_rows": compile_for(x.moe_expanded_rows_kernel, dict(
            x_ptr=Ptr("u8"), token_of_ptr=Ptr("i64"), out_ptr=Ptr("u8"), num_cols=7168, stride_x=7168,
            s_ptr=Ptr("i32"), s_out_ptr=Ptr("i32"), num_scale_cols=56, stride_s_row=1, stride_s_col=4096,
            HAS_SCALES=True, BLOCK_C=4096, BLOCK_S=64)),
        "expanded_scatter": compile_for(x.moe_expanded_scatter_kernel, dict(
            x_ptr=Ptr("i64"), dest_ptr=Ptr("i64"), out_ptr=Ptr("i64"), num_cols=1792, stride_x=1792, num_topk=8,
            s_ptr=Ptr("i32"), s_out_ptr=Ptr("i32"), num_scale_cols=56, stride_s_row=1, stride_s_col=4096,
            HAS_SCALES=True, BLOCK_C=2048, BLOCK_S=64)),
        "expanded_pad_rows": compile_for(x.moe_expanded_pad_rows_kernel, dict(
            token_of_ptr=Ptr("i64"), out_ptr=Ptr("i64"), num_cols=1792, s_out_ptr=Ptr("i32"), num_scale_cols=56,
            HAS_SCALES=True, BLOCK_C=2048, BLOCK_S=64)),
    }
    report = {name: _counts(kernel) for name, kernel in kernels.items()}
    for name in ("cast_fp8", "ll_send_rows", "ll_send_window"):
        report[name]["e4m3_cvt"] = kernels[name].asm["ptx"].count("e4m3x2.f32")
    for name in ("ll_send_rows", "ll_send_window", "token_rows_window", "rows_to_blocks", "blocks_to_rows",
                 "rows_to_blocks_table", "blocks_to_rows_table", "parts_to_blocks",
                 "rows_to_blocks_counted", "scatter_row_pair", "scatter_row_pair_landed"):  # stores: >= 4 B, bytes
        ptx = kernels[name].asm["ptx"]
        report[name]["wide_stores"] = sum(ptx.count(f"st.global.{w}") for w in ("b32", "v2.b32", "v4.b32"))
        report[name]["byte_stores"] = ptx.count("st.global.b8")
        report[name]["stores_16B"] = ptx.count("st.global.v2.b64") + ptx.count("st.global.v4.b32")
    for name in ("token_rows", "token_rows_at", "rank_rows_at", "rank_rows_table",
                 "token_rows_landed", "scatter_row_pair", "scatter_row_pair_landed"):  # 16-byte loads per thread
        ptx = kernels[name].asm["ptx"]
        report[name]["v4_loads"] = ptx.count("ld.global.v4.b32") + ptx.count("ld.global.v2.b64")  # 16 bytes
    for name in ("expanded_count", "expanded_layout", "expanded_scatter", "expanded_pad_rows", "token_rows",
                 "token_rows_window", "token_rows_landed", "token_rows_at", "rank_rows_at", "rank_rows_table",
                 "sum_table",
                 "parts_to_blocks", "rows_to_blocks_table", "blocks_to_rows_table", "receive_meta",
                 "rows_to_blocks", "rows_to_blocks_counted", "blocks_to_rows", "token_table", "ll_layout",
                 "ll_positions", "ll_send_rows", "ll_send_window", "ll_return", "ll_return_slots", "ll_pairs",
                 "ll_return_window", "ll_pairs_landed", "scatter_row_pair", "scatter_row_pair_landed",
                 "ll_receive_landed"):
        ptx = kernels[name].asm["ptx"]
        report[name]["atomics"] = ptx.count("atom.") + ptx.count("red.global")
    return report


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] == ["mla"]:
        print(json.dumps(mla_lowering_report()))
    elif sys.argv[1:] == ["moe"]:
        print(json.dumps(moe_lowering_report()))
    elif sys.argv[1:] == ["fp8_tail"]:
        print(json.dumps(fp8_tail_split_report()))
