// sm90a MLA decode over a paged KV cache, split-KV (one CTA per part of the plan and 64-row query tile).
//
//   out[b, i, h, :] = softmax(scale * q[b, i, h, :] . K[t, g, :]) over visible tokens t, times V[t, g, :]
//   K = k_cache rows (576 channels) of KV head g = h / group, V = their first 512 channels.
//
// Inputs: q packed by the host as [b * h_kv, s_q * group, 576] (query rows of one KV head; the original
// layout itself when h_kv = 1) and k_cache [blocks, PAGE, h_kv, 576], 16-bit (DTYPE 0: bf16, 1: fp16),
// read by TMA in boxes of 64 channels (128 bytes, 128-byte swizzle: the layout wgmma's descriptors read).
// The query rows r = i * group + h' of KV head g (token i, query head g * group + h'; FlashMLA's packing of
// s_q into the head dimension) are tiled by 64.
//
// Work: the host expands get_mla_metadata's schedule into pieces (request, first token, end token,
// split row, direct); CTA (part, tile, KV head) runs the pieces of its part one after the other. A `direct` piece
// (its request is not cut) writes out/lse; the others write float32 normalised partial O and their
// natural-log LSE to row `split row` of the split accumulators, merged by sm90_mla_combine.cu.
//
// Warp roles (384 threads; registers moved from the producer warpgroup to the two consumers with setmaxnreg):
//   - warpgroup 2 (thread 256 alone works): producer. Per piece, the Q tile (9 boxes of 64 x 64) into sQ; per 64-token block,
//     the K rows into one of two stages (9 boxes, in sub-blocks of min(PAGE, 64) rows, one block-table
//     lookup each, none for sub-blocks at or past the piece's end). TMA coordinates of block ids past the
//     cache read as zeros (never out of bounds).
//   - warpgroup 0 (softmax): S = Q K^T (36 wgmma m64n64k16 over the 576 channels), mask (end of piece,
//     causal), online softmax in float32 (exp2, logits scaled by scale * log2 e), P (16-bit) to shared
//     memory for warpgroup 1 and from registers into its own O[:, 0:256] += P V[:, 0:256]
//     (4 wgmma m64n256k16, A from registers). The next block's S is issued before this block's PV is
//     waited for, so the tensor cores overlap the two.
//   - warpgroup 1: O[:, 256:512] += P V[:, 256:512] with P from shared memory (after rescaling by the
//     row factors warpgroup 0 publishes with P).
// Rows of V past the piece's end (the tail of the last page, or rows never loaded) are zeroed in shared
// memory before PV, so NaN or stale data there never reach O (their P is exactly 0, but 0 * NaN = NaN).
//
// Synchronisation: mbarriers for TMA (q_full / k_full) and for releasing buffers (q_empty: WG0's warps
// after the piece's last S; k_empty: all 8 consumer warps after their PV); named barriers between the
// warpgroups, each an arrive on one side and a sync on the other (never both sides syncing from two code
// places, which compute-sanitizer's synccheck reports as divergence): P_FULL (WG0 published P and the row
// factors), P_FREE (WG1 finished reading P), FIN_A (WG0 published the final row max and sum of a piece),
// FIN_B (WG1 has read them).
#include "sm90_ptx.cuh"
#include "sm90_wgmma_16bit.cuh"

#ifndef PAGE
#error "PAGE (page_block_size) must be defined"
#endif
#ifndef DTYPE
#error "DTYPE (0 bf16, 1 fp16) must be defined"
#endif

namespace dp {

constexpr u32 kDimQK = 576;
constexpr u32 kDimV = 512;
constexpr u32 kBlockRows = 64;      // query rows per tile (one wgmma M)
constexpr u32 kBlockN = 64;         // tokens per block
constexpr u32 kBoxCols = 64;        // channels per TMA box: 128 bytes of 16-bit values
constexpr u32 kBoxes = kDimQK / kBoxCols;  // 9
constexpr u32 kBoxBytes = kBlockN * 128;   // 8 KiB: 64 rows of 128 bytes
constexpr u32 kTileBytes = kBoxes * kBoxBytes;
constexpr u32 kPage = PAGE;
constexpr u32 kSubRows = kPage < kBlockN ? kPage : kBlockN;  // rows per TMA box of K
constexpr u32 kSubBlocks = kBlockN / kSubRows;
constexpr u32 kStages = 2;
constexpr u32 kThreads = 384;

static_assert(kPage >= 8 && (kPage % kBlockN == 0 || kBlockN % kPage == 0), "PAGE must divide 64 or be a multiple of 64");

// Shared memory (offsets from a 1024-byte aligned base).
constexpr u32 kOffQ = 0;
constexpr u32 kOffK = kOffQ + kTileBytes;
constexpr u32 kOffP = kOffK + kStages * kTileBytes;
constexpr u32 kOffAlpha = kOffP + kBlockRows * 128;
constexpr u32 kOffRowMax = kOffAlpha + kBlockRows * 4;
constexpr u32 kOffRowSum = kOffRowMax + kBlockRows * 4;
constexpr u32 kOffBar = kOffRowSum + kBlockRows * 4;
constexpr u32 kBarQFull = kOffBar;
constexpr u32 kBarQEmpty = kOffBar + 8;
constexpr u32 kBarKFull = kOffBar + 16;             // + 8 * stage
constexpr u32 kBarKEmpty = kBarKFull + 8 * kStages;  // + 8 * stage
constexpr u32 kSmemBytes = kBarKEmpty + 8 * kStages;
static_assert(kSmemBytes + 1024 <= 232448, "shared memory (with 1 KiB of alignment slack) exceeds sm_90's 227 KiB");
#ifdef DP_SMEM_BYTES
static_assert(kSmemBytes + 1024 == DP_SMEM_BYTES, "host and device disagree on the shared memory size");
#endif

// Named barriers (0 is __syncthreads).
constexpr u32 kBarPFull = 1;
constexpr u32 kBarPFree = 2;
constexpr u32 kBarFinA = 3;
constexpr u32 kBarFinB = 4;
constexpr u32 kBarWG0 = 5;
constexpr u32 kBarWG1 = 6;

constexpr u32 kPieceFields = 5;
#define DP_INF __int_as_float(0x7f800000)

struct alignas(64) Params {
    CUtensorMap tmap_q;      // packed q: dims {576, q_rows, b * h_kv}, box {64, 64, 1}
    CUtensorMap tmap_k;      // k_cache: dims {576, h_kv, PAGE, blocks}, box {64, 1, min(PAGE, 64), 1}
    const i32* block_table;  // [b, max_blocks] with row stride bt_stride
    const i32* seqlens;      // [b]
    const i32* pieces;       // [num_pieces, 5]
    const i32* part_ptr;     // [num_parts + 1]
    u16* out;                // [b, s_q, h_q, 512] contiguous
    float* lse;              // [b, h_q, s_q] contiguous
    float* o_acc;            // [split rows, h_kv, q_rows, 512]
    float* lse_acc;          // [split rows, h_kv, q_rows]
    i64 bt_stride;
    i32 q_rows;              // query rows per KV head: s_q * group
    i32 h_q;
    i32 s_q;
    i32 causal;
    i32 h_kv;
    i32 group;               // h_q / h_kv
    float scale_log2;        // softmax_scale * log2(e)
};

#ifdef DP_PARAMS_SIZE
static_assert(sizeof(Params) == DP_PARAMS_SIZE, "host and device disagree on the Params size");
static_assert(2 * sizeof(CUtensorMap) + 8 * sizeof(void*) + sizeof(i64) + 6 * sizeof(i32) + sizeof(float) ==
              DP_PARAMS_USED, "host and device disagree on the Params fields");
#endif

// Named barriers count warps: every lane of a warp must reach one together (compute-sanitizer's synccheck
// flags a warp that arrives diverged, e.g. after an `if (lane == 0)` the compiler did not reconverge).
__device__ __forceinline__ void named_sync(u32 id, u32 count) {
    __syncwarp();
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(count) : "memory");
}

__device__ __forceinline__ void named_arrive(u32 id, u32 count) {
    __syncwarp();
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(count) : "memory");
}

// Orders this thread's generic-proxy shared-memory writes before later async-proxy (wgmma, TMA) accesses.
__device__ __forceinline__ void fence_proxy_async() {
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Shared-memory descriptor of an N-major (MN-major) B operand written by TMA with 128-byte swizzling:
// 64 N-values per 128-byte row, 8-row swizzle atoms along K (stride byte offset 1024 B) and 64-value
// column blocks along N `box_stride` bytes apart (leading byte offset).
__device__ __forceinline__ u64 smem_desc_mn128(u32 addr, u32 box_stride) {
    const u64 start = (addr & 0x3FFFF) >> 4;
    const u64 lbo = box_stride >> 4;
    const u64 sbo = 1024 >> 4;
    return start | (lbo << 16) | (sbo << 32) | (1ull << 62);
}

struct Piece {
    i32 req, lo, hi, split_row, direct;
};

__device__ __forceinline__ Piece load_piece(const Params& p, i32 index) {
    const i32* f = p.pieces + index * kPieceFields;
    return Piece{__ldg(f), __ldg(f + 1), __ldg(f + 2), __ldg(f + 3), __ldg(f + 4)};
}

__device__ __forceinline__ i32 num_blocks(const Piece& pc) {
    return pc.hi > pc.lo ? (pc.hi - pc.lo + static_cast<i32>(kBlockN) - 1) / static_cast<i32>(kBlockN) : 0;
}

// ---- producer --------------------------------------------------------------------------------------

__device__ __forceinline__ void produce(const Params& p, u32 base, i32 tile, i32 head) {
    const i32 first = __ldg(p.part_ptr + blockIdx.x);
    const i32 last = __ldg(p.part_ptr + blockIdx.x + 1);
    u32 stage = 0, phase = 0, q_phase = 0;
    for (i32 index = first; index < last; ++index) {
        const Piece pc = load_piece(p, index);
        const i32 blocks = num_blocks(pc);
        if (blocks == 0) continue;
        mbar_wait(base + kBarQEmpty, q_phase ^ 1);
        q_phase ^= 1;
        mbar_arrive_expect_tx(base + kBarQFull, kTileBytes);
#pragma unroll 1
        for (u32 box = 0; box < kBoxes; ++box) {
            tma_load_3d(base + kOffQ + box * kBoxBytes, &p.tmap_q, base + kBarQFull, static_cast<i32>(box * kBoxCols),
                        tile * static_cast<i32>(kBlockRows), pc.req * p.h_kv + head);
        }
        const i32* table = p.block_table + pc.req * p.bt_stride;
        for (i32 j = 0; j < blocks; ++j) {
            const i32 start = pc.lo + j * static_cast<i32>(kBlockN);
            const u32 full = base + kBarKFull + 8 * stage;
            mbar_wait(base + kBarKEmpty + 8 * stage, phase ^ 1);
            const i32 sub_rows = static_cast<i32>(kSubRows);
            const i32 subs = min(static_cast<i32>(kSubBlocks), (pc.hi - start + sub_rows - 1) / sub_rows);
            mbar_arrive_expect_tx(full, static_cast<u32>(subs) * kBoxes * kSubRows * 128);
#pragma unroll 1
            for (i32 s = 0; s < subs; ++s) {
                const i32 token = start + s * static_cast<i32>(kSubRows);
                const i32 page = __ldg(table + token / static_cast<i32>(kPage));
                const i32 row = token % static_cast<i32>(kPage);
                const u32 dst = base + kOffK + stage * kTileBytes + s * kSubRows * 128;
#pragma unroll 1
                for (u32 box = 0; box < kBoxes; ++box) {
                    tma_load_4d(dst + box * kBoxBytes, &p.tmap_k, full, static_cast<i32>(box * kBoxCols), head, row, page);
                }
            }
            stage ^= 1;
            phase ^= (stage == 0);
        }
    }
}

// ---- consumers -------------------------------------------------------------------------------------

// Zeroes rows [valid, 64) of the 4 V boxes [4 * wg, 4 * wg + 4) of a K stage (whole 128-byte rows: the
// swizzle permutes 16-byte chunks inside a row only), then makes the zeros visible to wgmma.
__device__ __forceinline__ void zero_v_tail(u8* stage_tile, u32 wg, i32 valid, u32 tid, u32 barrier) {
    const u32 rows = kBlockN - static_cast<u32>(valid);
    const u32 chunks = 4 * rows * 8;  // 16-byte chunks
    for (u32 c = tid; c < chunks; c += 128) {
        const u32 box = 4 * wg + c / (rows * 8);
        const u32 rest = c % (rows * 8);
        const u32 row = static_cast<u32>(valid) + rest / 8;
        uint4* dst = reinterpret_cast<uint4*>(stage_tile + box * kBoxBytes + row * 128 + (rest % 8) * 16);
        *dst = make_uint4(0, 0, 0, 0);
    }
    fence_proxy_async();
    named_sync(barrier, 128);
}

__device__ __forceinline__ void issue_s(float* s, u32 base, u32 stage) {
    const u32 q = base + kOffQ;
    const u32 k = base + kOffK + stage * kTileBytes;
#pragma unroll
    for (u32 box = 0; box < kBoxes; ++box) {
        const u64 dq = smem_desc_k128(q + box * kBoxBytes);
        const u64 dk = smem_desc_k128(k + box * kBoxBytes);
#pragma unroll
        for (u32 kk = 0; kk < 4; ++kk) {  // 16 channels = 32 bytes = 2 descriptor units per step
            wgmma_m64n64k16_ss(s, dq + 2 * kk, dk + 2 * kk, (box | kk) ? 1u : 0u);
        }
    }
}

// Writes the piece's results for rows r0 and r0 + 8 and channels [256 wg, 256 wg + 256).
__device__ __forceinline__ void store_rows(const Params& p, const Piece& pc, i32 tile, i32 kv_head, u32 r0, u32 lane, u32 wg,
                                           const float* o, const float* row_max, const float* row_sum) {
#pragma unroll
    for (u32 h = 0; h < 2; ++h) {
        const i32 r = tile * static_cast<i32>(kBlockRows) + static_cast<i32>(r0 + 8 * h);
        if (r >= p.q_rows) continue;
        const float sum = row_sum[h];
        const float inv = sum > 0.0f ? 1.0f / sum : 0.0f;
        const float lse2 = row_max[h] + __log2f(sum);
        const i32 i = r / p.group;
        const i32 head = kv_head * p.group + r % p.group;
        const i64 acc_row = (static_cast<i64>(pc.split_row) * p.h_kv + kv_head) * p.q_rows + r;
        const u32 col0 = 256 * wg + 2 * (lane % 4);
        if (pc.direct) {
            u16* row = p.out + ((static_cast<i64>(pc.req) * p.s_q + i) * p.h_q + head) * kDimV;
#pragma unroll
            for (u32 c = 0; c < 32; ++c) {
                *reinterpret_cast<u32*>(row + col0 + 8 * c) = pack_16x2(o[4 * c + 2 * h] * inv, o[4 * c + 2 * h + 1] * inv);
            }
            if (wg == 0 && (lane % 4) == 0) {
                p.lse[(static_cast<i64>(pc.req) * p.h_q + head) * p.s_q + i] =
                    sum > 0.0f ? lse2 * 0.69314718055994531f : __int_as_float(0x7f800000);
            }
        } else {
            float* row = p.o_acc + acc_row * kDimV;
#pragma unroll
            for (u32 c = 0; c < 32; ++c) {
                *reinterpret_cast<float2*>(row + col0 + 8 * c) = make_float2(o[4 * c + 2 * h] * inv, o[4 * c + 2 * h + 1] * inv);
            }
            if (wg == 0 && (lane % 4) == 0) {
                p.lse_acc[acc_row] =
                    sum > 0.0f ? lse2 * 0.69314718055994531f : __int_as_float(0xff800000);
            }
        }
    }
}

// Per-row softmax state of warpgroup 0's rows r0 and r0 + 8 over one piece (row_max in log2 units).
struct RowState {
    float row_max[2];
    float row_sum[2];  // this thread's partial sums (quad-reduced at the end of the piece)
    i32 limit[2];      // tokens visible to the row (exclusive)
};

// One 64-token block of warpgroup 0 (S of this block is in `s`): online softmax, P to shared memory,
// O[:, 0:256] += P V[:, 0:256]; with kHasNext, the next block's S is issued before this PV is waited for.
// (Two instantiations instead of a run-time branch: a wgmma under a branch ptxas cannot prove uniform
// makes it serialise every wgmma of the kernel.)
template <bool kHasNext>
__device__ __forceinline__ void softmax_block(const Params& p, u8* smem, u32 base, u32 tid, const Piece& pc, i32 j,
                                              bool next_is_last, u32& stage, u32& phase, bool& p_published,
                                              float (&s)[32], float (&o)[128], RowState& st) {
    const u32 lane = tid % 32;
    const u32 r0 = (tid / 32) * 16 + lane / 4;
    float* s_alpha = reinterpret_cast<float*>(smem + kOffAlpha);
        const i32 start = pc.lo + j * static_cast<i32>(kBlockN);
        const u32 cur = stage;
        // ---- online softmax of S (block j) ----
        float blk_max[2] = {-DP_INF, -DP_INF};
#pragma unroll
        for (u32 c = 0; c < 8; ++c) {
#pragma unroll
            for (u32 e = 0; e < 4; ++e) {
                const u32 h = e >> 1;
                const i32 col = start + static_cast<i32>(8 * c + 2 * (lane % 4) + (e & 1));
                const float x = col < st.limit[h] ? s[4 * c + e] * p.scale_log2 : -DP_INF;
                s[4 * c + e] = x;
                blk_max[h] = fmaxf(blk_max[h], x);
            }
        }
        float alpha[2];
#pragma unroll
        for (u32 h = 0; h < 2; ++h) {
            blk_max[h] = fmaxf(blk_max[h], __shfl_xor_sync(0xffffffff, blk_max[h], 1));
            blk_max[h] = fmaxf(blk_max[h], __shfl_xor_sync(0xffffffff, blk_max[h], 2));
            const float new_max = fmaxf(st.row_max[h], blk_max[h]);
            const float use = new_max == -DP_INF ? 0.0f : new_max;
            alpha[h] = exp2f(st.row_max[h] - use);
            st.row_max[h] = new_max;
            blk_max[h] = use;
        }
        float part[2] = {0.0f, 0.0f};
#pragma unroll
        for (u32 c = 0; c < 8; ++c) {
#pragma unroll
            for (u32 e = 0; e < 4; ++e) {
                const float v = exp2f(s[4 * c + e] - blk_max[e >> 1]);
                s[4 * c + e] = v;
                part[e >> 1] += v;
            }
        }
        st.row_sum[0] = st.row_sum[0] * alpha[0] + part[0];
        st.row_sum[1] = st.row_sum[1] * alpha[1] + part[1];
        u32 a[16];
#pragma unroll
        for (u32 i = 0; i < 16; ++i) a[i] = pack_16x2(s[2 * i], s[2 * i + 1]);

        // ---- publish P and the row factors to warpgroup 1 ----
        if (p_published) named_sync(kBarPFree, 256);
        u8* s_p = smem + kOffP;
#pragma unroll
        for (u32 h = 0; h < 2; ++h) {
            const u32 r = r0 + 8 * h;
#pragma unroll
            for (u32 c = 0; c < 8; ++c) {
                const u32 off = r * 128 + ((c ^ (r & 7)) * 16) + (lane % 4) * 4;
                *reinterpret_cast<u32*>(s_p + off) = a[2 * c + h];
            }
            if ((lane % 4) == 0) s_alpha[r] = alpha[h];
        }
        fence_proxy_async();
        named_arrive(kBarPFull, 256);
        p_published = true;

        // ---- O[:, 0:256] = alpha O + P V[:, 0:256] ----
        if (start + static_cast<i32>(kBlockN) > pc.hi) {
            zero_v_tail(smem + kOffK + cur * kTileBytes, 0, pc.hi - start, tid, kBarWG0);
        }
#pragma unroll
        for (u32 c = 0; c < 32; ++c) {
            o[4 * c + 0] *= alpha[0];
            o[4 * c + 1] *= alpha[0];
            o[4 * c + 2] *= alpha[1];
            o[4 * c + 3] *= alpha[1];
        }
#pragma unroll
        for (u32 i = 0; i < 128; ++i) fence_operand(o[i]);
        wgmma_fence();
        const u32 v = base + kOffK + cur * kTileBytes;
#pragma unroll
        for (u32 kk = 0; kk < 4; ++kk) {  // 16 tokens = 16 rows of 128 bytes per step
            const u64 dv = smem_desc_mn128(v + kk * 2048, kBoxBytes);
            // accumulator chunks 2kk and 2kk+1 hold tokens 16kk .. 16kk + 15: A registers of step kk
            wgmma_m64n256k16_rs(o, a[4 * kk + 0], a[4 * kk + 1], a[4 * kk + 2], a[4 * kk + 3], dv, 1u);
        }
        wgmma_commit();
        stage ^= 1;
        phase ^= (stage == 0);
        if constexpr (kHasNext) {
            mbar_wait(base + kBarKFull + 8 * stage, phase);
#pragma unroll
            for (u32 i = 0; i < 32; ++i) fence_operand(s[i]);
            wgmma_fence();
            issue_s(s, base, stage);
            wgmma_commit();
            wgmma_wait<1>();  // PV of block j done (groups complete in order)
        } else {
            wgmma_wait<0>();
        }
        // the A registers and accumulators stay live (unspilled, unreused) until the PV has completed
#pragma unroll
        for (u32 i = 0; i < 16; ++i) fence_operand_u32(a[i]);
#pragma unroll
        for (u32 i = 0; i < 128; ++i) fence_operand(o[i]);
        __syncwarp();
        if (lane == 0) mbar_arrive(base + kBarKEmpty + 8 * cur);
        if constexpr (kHasNext) {
            wgmma_wait<0>();
#pragma unroll
            for (u32 i = 0; i < 32; ++i) fence_operand(s[i]);
            if (next_is_last) {  // the piece's last S is done: Q may be replaced
                __syncwarp();
                if (lane == 0) mbar_arrive(base + kBarQEmpty);
            }
        }
}

__device__ __forceinline__ void softmax_warpgroup(const Params& p, u8* smem, u32 base, i32 tile, i32 kv_head) {
    const u32 tid = threadIdx.x;  // 0..127
    const u32 warp = tid / 32, lane = tid % 32;
    const u32 r0 = warp * 16 + lane / 4;
    const i32 first = __ldg(p.part_ptr + blockIdx.x);
    const i32 last = __ldg(p.part_ptr + blockIdx.x + 1);
    float* s_max = reinterpret_cast<float*>(smem + kOffRowMax);
    float* s_sum = reinterpret_cast<float*>(smem + kOffRowSum);
    u32 stage = 0, phase = 0, q_phase = 0;
    bool p_published = false;
    float s[32];
    float o[128];
#pragma unroll
    for (u32 i = 0; i < 32; ++i) s[i] = 0.0f;
    for (i32 index = first; index < last; ++index) {
        const Piece pc = load_piece(p, index);
        const i32 blocks = num_blocks(pc);
        const i32 length = __ldg(p.seqlens + pc.req);
        RowState st;
#pragma unroll
        for (u32 h = 0; h < 2; ++h) {
            const i32 r = tile * static_cast<i32>(kBlockRows) + static_cast<i32>(r0 + 8 * h);
            st.limit[h] = pc.hi;
            if (p.causal && r < p.q_rows) st.limit[h] = min(pc.hi, length - p.s_q + 1 + r / p.group);
            st.row_max[h] = -DP_INF;
            st.row_sum[h] = 0.0f;
        }
#pragma unroll
        for (u32 i = 0; i < 128; ++i) o[i] = 0.0f;

        if (blocks > 0) {
            mbar_wait(base + kBarQFull, q_phase);
            q_phase ^= 1;
            mbar_wait(base + kBarKFull + 8 * stage, phase);
#pragma unroll
            for (u32 i = 0; i < 32; ++i) fence_operand(s[i]);
            wgmma_fence();
            issue_s(s, base, stage);
            wgmma_commit();
            wgmma_wait<0>();
#pragma unroll
            for (u32 i = 0; i < 32; ++i) fence_operand(s[i]);
            if (blocks == 1) {
                __syncwarp();
                if (lane == 0) mbar_arrive(base + kBarQEmpty);
            }
        }
        for (i32 j = 0; j + 1 < blocks; ++j) {
            softmax_block<true>(p, smem, base, tid, pc, j, j + 2 == blocks, stage, phase, p_published, s, o, st);
        }
        if (blocks > 0) {
            softmax_block<false>(p, smem, base, tid, pc, blocks - 1, false, stage, phase, p_published, s, o, st);
        }
        // ---- end of piece: hand the row max and sum to warpgroup 1, store ----
#pragma unroll
        for (u32 h = 0; h < 2; ++h) {
            st.row_sum[h] += __shfl_xor_sync(0xffffffff, st.row_sum[h], 1);
            st.row_sum[h] += __shfl_xor_sync(0xffffffff, st.row_sum[h], 2);
            if ((lane % 4) == 0) {
                s_max[r0 + 8 * h] = st.row_max[h];
                s_sum[r0 + 8 * h] = st.row_sum[h];
            }
        }
        named_arrive(kBarFinA, 256);  // the row max and sum are published
        store_rows(p, pc, tile, kv_head, r0, lane, 0, o, st.row_max, st.row_sum);
        named_sync(kBarFinB, 256);    // warpgroup 1 has read them: they may be overwritten
    }
    if (p_published) named_sync(kBarPFree, 256);  // matches warpgroup 1's last release of P
}

__device__ __forceinline__ void output_warpgroup(const Params& p, u8* smem, u32 base, i32 tile, i32 kv_head) {
    const u32 tid = threadIdx.x - 128;  // 0..127
    const u32 warp = tid / 32, lane = tid % 32;
    const u32 r0 = warp * 16 + lane / 4;
    const i32 first = __ldg(p.part_ptr + blockIdx.x);
    const i32 last = __ldg(p.part_ptr + blockIdx.x + 1);
    const float* s_alpha = reinterpret_cast<const float*>(smem + kOffAlpha);
    const float* s_max = reinterpret_cast<const float*>(smem + kOffRowMax);
    const float* s_sum = reinterpret_cast<const float*>(smem + kOffRowSum);
    u32 stage = 0, phase = 0;
    float o[128];
    for (i32 index = first; index < last; ++index) {
        const Piece pc = load_piece(p, index);
        const i32 blocks = num_blocks(pc);
#pragma unroll
        for (u32 i = 0; i < 128; ++i) o[i] = 0.0f;
        for (i32 j = 0; j < blocks; ++j) {
            const i32 start = pc.lo + j * static_cast<i32>(kBlockN);
            mbar_wait(base + kBarKFull + 8 * stage, phase);
            named_sync(kBarPFull, 256);
            if (start + static_cast<i32>(kBlockN) > pc.hi) {
                zero_v_tail(smem + kOffK + stage * kTileBytes, 1, pc.hi - start, tid, kBarWG1);
            }
            const float alpha0 = s_alpha[r0];
            const float alpha1 = s_alpha[r0 + 8];
#pragma unroll
            for (u32 c = 0; c < 32; ++c) {
                o[4 * c + 0] *= alpha0;
                o[4 * c + 1] *= alpha0;
                o[4 * c + 2] *= alpha1;
                o[4 * c + 3] *= alpha1;
            }
#pragma unroll
            for (u32 i = 0; i < 128; ++i) fence_operand(o[i]);
            wgmma_fence();
            const u64 dp = smem_desc_k128(base + kOffP);
            const u32 v = base + kOffK + stage * kTileBytes + 4 * kBoxBytes;
#pragma unroll
            for (u32 kk = 0; kk < 4; ++kk) {
                wgmma_m64n256k16_ss_tb(o, dp + 2 * kk, smem_desc_mn128(v + kk * 2048, kBoxBytes), 1u);
            }
            wgmma_commit();
            wgmma_wait<0>();
#pragma unroll
            for (u32 i = 0; i < 128; ++i) fence_operand(o[i]);
            named_arrive(kBarPFree, 256);
            __syncwarp();
            if (lane == 0) mbar_arrive(base + kBarKEmpty + 8 * stage);
            stage ^= 1;
            phase ^= (stage == 0);
        }
        named_sync(kBarFinA, 256);
        const float row_max[2] = {s_max[r0], s_max[r0 + 8]};
        const float row_sum[2] = {s_sum[r0], s_sum[r0 + 8]};
        named_arrive(kBarFinB, 256);
        store_rows(p, pc, tile, kv_head, r0, lane, 1, o, row_max, row_sum);
    }
}

}  // namespace dp

extern "C" __global__ void __launch_bounds__(dp::kThreads, 1)
sm90_mla_decode_kernel(const __grid_constant__ dp::Params params) {
    using namespace dp;
    extern __shared__ u8 smem_raw[];
    u8* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const u32 base = smem_addr(smem);
    const i32 tile = static_cast<i32>(blockIdx.y);
    const i32 kv_head = static_cast<i32>(blockIdx.z);
    if (threadIdx.x == 256) {
        tma_prefetch_descriptor(&params.tmap_q);
        tma_prefetch_descriptor(&params.tmap_k);
        mbar_init(base + kBarQFull, 1);
        mbar_init(base + kBarQEmpty, 4);
#pragma unroll 1
        for (u32 s = 0; s < kStages; ++s) {
            mbar_init(base + kBarKFull + 8 * s, 1);
            mbar_init(base + kBarKEmpty + 8 * s, 8);
        }
        fence_barrier_init();
    }
    __syncthreads();
    if (threadIdx.x >= 256) {
        warpgroup_reg_dealloc<40>();
        if (threadIdx.x == 256) produce(params, base, tile, kv_head);
    } else {
        warpgroup_reg_alloc<232>();
        if (threadIdx.x < 128) {
            softmax_warpgroup(params, smem, base, tile, kv_head);
        } else {
            output_warpgroup(params, smem, base, tile, kv_head);
        }
    }
}
