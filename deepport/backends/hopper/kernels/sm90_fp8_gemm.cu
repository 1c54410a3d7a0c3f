// sm_90a block-scaled FP8 GEMM, NT: D[m, n] = sum_kb SFA[m, kb] * SFB[n / 128, kb] * sum_{k in kb} A[m, k] B[n, k]
// A float8_e4m3fn [rows, K] (K-major), B float8_e4m3fn [N, K] (K-major), SFA float32 per row and
// 128-wide K block, SFB float32 per 128x128 block of B (recipe (1, 128, 128)), D bfloat16.
//
// Compile-time configuration (NVRTC -D defines, chosen per shape on the host):
//   BLOCK_M     64, 128 or 256: rows per tile; one consumer warpgroup per 64 rows up to two, and with 256
//               rows each of the two takes two 64-row waves (rows 128 i + 64 w of wave i, warpgroup w)
//   BLOCK_N     multiple of 8 in [8, 256]: columns per tile (wgmma m64nBLOCK_Nk32)
//   NUM_STAGES  depth of the shared-memory ring
//   VARIANT     0 dense, 1 M-grouped contiguous (group per row from m_indices, -1 rows written as +0.0),
//               2 M-grouped masked (rows >= masked_m[g] of group g never written)
//   GROUP_M     m-blocks per rasterisation group of the persistent tile order
//   CLUSTER_N   1 (default) or 2: CTAs per thread-block cluster (__cluster_dims__(2, 1, 1)), see below
//
// Structure (one CTA per SM, persistent over tiles):
//   - a producer warpgroup (registers lowered with setmaxnreg); its first warp waits for a free stage,
//     issues the TMA copies of the A and B tiles (128-byte swizzle) and cp.async copies of the tile's
//     SFA column and SFB values into the stage, all completing on the stage's `full` mbarrier;
//   - one or two consumer warpgroups (registers raised): per 128-K block they wait on `full`, and per
//     64-row wave issue four wgmma.m64nNk32 e4m3 into a fresh fp32 accumulator, wait for them and
//     promote: total[wave] += block_acc * SFA[row] * SFB[col block] (DeepGEMM's promotion); after the
//     last wave they free the stage (`empty` mbarrier);
//   - the epilogue rounds to bf16 and stores bf16 pairs straight from registers, masking the M and N
//     edges and applying the variant's row rules.
//
// CLUSTER_N = 2 (TMA multicast of the A tile; off unless the host config asks for it):
//   - the grid is made of 2-CTA clusters; the scheduler hands out pairs of tiles, (m block, n blocks
//     2u and 2u + 1), one pair per cluster at a time, so both CTAs of a cluster walk the same m blocks
//     (and groups) in the same order and share every A tile. A pair whose second n block is past N
//     (odd number of n blocks) still runs on both CTAs: the second one loads a B box clamped to start
//     at row N - 1, multiplies, and stores nothing (all its columns are >= N);
//   - per K block, the producer of CTA r loads rows [r BLOCK_M / 2, (r + 1) BLOCK_M / 2) of the A tile
//     with a multicast TMA into both CTAs' stage (same offset) and its own B tile; each CTA's `full`
//     barrier expects the whole A tile plus its B tile (half of A comes from the partner's copy);
//     a half that would start past the last row starts at the last row instead (its rows are never
//     stored) so that no TMA box is entirely out of bounds;
//   - a stage is refilled only after the consumers of BOTH CTAs freed it (the partner's multicast
//     writes into it): each consumer warp arrives on the `empty` barrier of both CTAs (mapa +
//     mbarrier.arrive.shared::cluster, after wgmma.wait_group retired the reads of the stage) and
//     `empty` counts both CTAs' consumer warps;
//   - barrier initialisation is published cluster-wide (fence.mbarrier_init.release.cluster, then a
//     cluster barrier) before any CTA issues a multicast or a remote arrival; before exit the producer
//     waits until both CTAs' consumers freed every stage (no remote arrival still in flight to this
//     CTA) and a cluster barrier keeps each CTA alive until its partner is done too.
#include "sm90_ptx.cuh"
#include "sm90_cluster.cuh"
#include "sm90_wgmma.cuh"

#ifndef BLOCK_M
#error "BLOCK_M must be defined"
#endif
#ifndef BLOCK_N
#error "BLOCK_N must be defined"
#endif
#ifndef NUM_STAGES
#error "NUM_STAGES must be defined"
#endif
#ifndef VARIANT
#error "VARIANT must be defined"
#endif
#ifndef GROUP_M
#define GROUP_M 16
#endif
#ifndef CLUSTER_N
#define CLUSTER_N 1
#endif

namespace dp {

constexpr u32 kBlockM = BLOCK_M;
constexpr u32 kBlockN = BLOCK_N;
constexpr u32 kBlockK = 128;  // one scale block; 128 fp8 bytes = one 128-byte swizzle row
constexpr u32 kStages = NUM_STAGES;
constexpr u32 kMathWarpgroups = kBlockM == 64 ? 1 : 2;
constexpr u32 kWaves = kBlockM / (64 * kMathWarpgroups);  // 64-row waves per consumer warpgroup
constexpr u32 kMathThreads = kMathWarpgroups * 128;
constexpr u32 kThreads = kMathThreads + 128;
constexpr u32 kAccum = kBlockN / 2;  // fp32 accumulators per thread of an m64nN wgmma
// Distinct 128-column SFB blocks a tile can touch (tile starts are multiples of 8 columns).
constexpr u32 kNumSfb = (kBlockN + 120 + 127) / 128;
constexpr bool kUniformSfb = (128 % kBlockN) == 0;  // tiles never straddle a 128-column block

constexpr u32 kVariantDense = 0;
constexpr u32 kVariantContiguous = 1;
constexpr u32 kVariantMasked = 2;
constexpr u32 kVariant = VARIANT;
constexpr u32 kClusterN = CLUSTER_N;  // CTAs per cluster, sharing the A tile (multicast) when 2

static_assert(kBlockM == 64 || kBlockM == 128 || kBlockM == 256, "BLOCK_M must be 64, 128 or 256");
static_assert(kVariant != 1 || kBlockM <= 128, "contiguous tiles must not span two 128-row group blocks");
static_assert(kBlockN % 8 == 0 && kBlockN >= 8 && kBlockN <= 256, "BLOCK_N must be a multiple of 8 in [8, 256]");
static_assert(kNumSfb <= 3, "at most three SFB blocks per tile");
static_assert(kVariant <= 2, "VARIANT must be 0, 1 or 2");
static_assert(kClusterN == 1 || kClusterN == 2, "CLUSTER_N must be 1 or 2");

// Shared memory layout (offsets from a 1024-byte aligned base).
constexpr u32 kTileABytes = kBlockM * kBlockK;
constexpr u32 kTileBBytes = kBlockN * kBlockK;
constexpr u32 kOffA = 0;
constexpr u32 kOffB = kOffA + kStages * kTileABytes;
constexpr u32 kOffSfa = kOffB + kStages * kTileBBytes;
constexpr u32 kOffSfb = kOffSfa + kStages * kBlockM * 4;
constexpr u32 kSfbStride = 4;  // floats per stage (16 bytes)
constexpr u32 kOffFull = kOffSfb + kStages * kSfbStride * 4;
constexpr u32 kOffEmpty = kOffFull + kStages * 8;
// Each CTA of a cluster loads a slice of kSliceM rows of the A tile (all of it without a cluster).
constexpr u32 kSliceM = kBlockM / kClusterN;
constexpr u32 kSliceABytes = kSliceM * kBlockK;
static_assert(kTileABytes % 1024 == 0 && kTileBBytes % 1024 == 0, "swizzled tiles must stay 1024-byte aligned");
static_assert(kSliceABytes % 1024 == 0, "multicast slices of A must start on a 1024-byte swizzle atom");
static_assert(kOffFull % 8 == 0, "mbarriers need 8-byte alignment");

// Barrier arrivals: `full` gets the TMA lane's expect_tx arrival plus one cp.async arrival per
// producer lane; `empty` gets one arrival per consumer warp of every CTA of the cluster.
constexpr u32 kFullArrivals = 1 + 32;
constexpr u32 kEmptyArrivals = kClusterN * kMathThreads / 32;

// The kernel's single parameter. Its layout is mirrored on the host (deepport/backends/hopper/params.py);
// the host passes the expected size and offsets as defines, checked below.
struct alignas(64) Params {
    CUtensorMap tmap_a;       // A: dims {K, rows, groups}, box {128, BLOCK_M, 1}, 128-byte swizzle
    CUtensorMap tmap_b;       // B: dims {K, N, groups}, box {128, BLOCK_N, 1}, 128-byte swizzle
    const float* sfa;         // SFA element (g, row, kb) at g*sfa_sg + row*sfa_sm + kb*sfa_sk
    const float* sfb;         // SFB element (g, nb, kb) at g*sfb_sg + nb*sfb_sn + kb*sfb_sk
    const i32* groups;        // contiguous: m_indices [rows]; masked: masked_m [groups]; dense: unused
    u16* out;                 // D element (g, row, n) at g*out_sg + row*out_sm + n (bf16 bits)
    i64 sfa_sg, sfa_sm, sfa_sk;
    i64 sfb_sg, sfb_sn, sfb_sk;
    i64 out_sg, out_sm;
    i32 rows;                 // dense: M; contiguous: M_sum; masked: M_max (rows per group)
    i32 n;
    i32 k;
    i32 num_groups;
};

#ifdef DP_PARAMS_SIZE
// NVRTC has no offsetof: check the total and the packed size of the fields, which the host lays out in
// this order with no gaps (128-byte maps, then 8-byte, then 4-byte fields).
static_assert(sizeof(Params) == DP_PARAMS_SIZE, "host and device disagree on the Params size");
static_assert(2 * sizeof(CUtensorMap) + 4 * sizeof(void*) + 8 * sizeof(i64) + 4 * sizeof(i32) == DP_PARAMS_USED,
              "host and device disagree on the Params fields");
#endif

__device__ __forceinline__ i32 ceil_div(i32 a, i32 b) { return (a + b - 1) / b; }

// The persistent tile order, walked identically by the producer and the consumers.
// Tiles are grouped GROUP_M m-blocks at a time: consecutive tiles (run by neighbouring CTAs at the
// same moment) share a B tile and cover GROUP_M A tiles, which keeps both in L2.
// With clusters the unit handed out is a cluster's pair of tiles (n blocks CLUSTER_N u + rank): the
// order walks units exactly as it walks tiles without clusters, one unit per cluster.
struct Scheduler {
    i32 iter;
    i32 num_n_blocks;
    i32 num_m_blocks;     // of the current group (masked) or of the whole problem
    i32 group;            // masked: current group; others: 0
    i32 tiles_before;     // masked: units of the groups before `group`

    __device__ __forceinline__ explicit Scheduler(const Params& p) {
        iter = 0;
        num_n_blocks = ceil_div(p.n, kBlockN);
        group = 0;
        tiles_before = 0;
        num_m_blocks = (kVariant == kVariantMasked) ? 0 : ceil_div(p.rows, kBlockM);
    }

    // The units of one m block: n blocks / CLUSTER_N, rounded up (recomputed from the parameters, not
    // kept in a register: the producer runs in 40).
    __device__ __forceinline__ i32 num_n_units(const Params& p) const {
        return (kClusterN == 1) ? num_n_blocks : ceil_div(p.n, static_cast<i32>(kBlockN * kClusterN));
    }

    // This CTA's rank in its cluster (0 without clusters).
    __device__ __forceinline__ static i32 rank() {
        return (kClusterN == 1) ? 0 : static_cast<i32>(cluster_cta_rank());
    }

    __device__ __forceinline__ static void raster(i32 t, i32 m_blocks, i32 n_blocks, i32& mb, i32& nb) {
        const i32 per_group = GROUP_M * n_blocks;
        const i32 first_m = (t / per_group) * GROUP_M;
        const i32 in_group = t % per_group;
        const i32 count = min(GROUP_M, m_blocks - first_m);
        mb = first_m + in_group % count;
        nb = in_group / count;
    }

    // Next tile of this CTA: (m block, n block, group); false when none is left. With clusters, n block
    // may be num_n_blocks (the missing half of the last pair: computed, never stored).
    __device__ __forceinline__ bool next(const Params& p, i32& mb, i32& nb, i32& g) {
        i32 t;
        if constexpr (kClusterN == 1) {
            t = static_cast<i32>(blockIdx.x) + iter * static_cast<i32>(gridDim.x);
        } else {
            t = static_cast<i32>(cluster_id_x()) + iter * static_cast<i32>(cluster_count_x());
        }
        ++iter;
        if constexpr (kVariant == kVariantMasked) {
            while (true) {
                if (group >= p.num_groups) return false;
                num_m_blocks = ceil_div(__ldg(p.groups + group), kBlockM);
                const i32 tiles = num_m_blocks * num_n_units(p);
                if (t < tiles_before + tiles) break;
                tiles_before += tiles;
                ++group;
            }
            raster(t - tiles_before, num_m_blocks, num_n_units(p), mb, nb);
            g = group;
        } else {
            if (t >= num_m_blocks * num_n_units(p)) return false;
            raster(t, num_m_blocks, num_n_units(p), mb, nb);
            // contiguous: the tile's group is that of its first row (-1: a tile of padding rows only)
            g = (kVariant == kVariantContiguous) ? __ldg(p.groups + mb * kBlockM) : 0;
        }
        if constexpr (kClusterN > 1) nb = nb * static_cast<i32>(kClusterN) + rank();
        return true;
    }
};

// ---- producer ------------------------------------------------------------------------------------

__device__ __forceinline__ void produce(const Params& p, u8* smem) {
    const u32 lane = lane_id();
    const u32 base = smem_addr(smem);
    const i32 k_blocks = ceil_div(p.k, kBlockK);
    const i32 sfb_rows = ceil_div(p.n, 128);
    Scheduler sched(p);
    u32 stage = 0, phase = 0;
    i32 mb, nb, g;
    while (sched.next(p, mb, nb, g)) {
        if (kVariant == kVariantContiguous && g < 0) continue;  // padding tile: the consumers write zeros
        const i32 row0 = mb * kBlockM;
        const i32 col0 = nb * kBlockN;
        const i32 a_group = (kVariant == kVariantMasked) ? g : 0;   // A (and SFA) grouped only when masked
        const i32 b_group = (kVariant == kVariantDense) ? 0 : g;    // B (and SFB) grouped in both grouped variants
        const float* sfa = p.sfa + a_group * p.sfa_sg;
        const float* sfb = p.sfb + b_group * p.sfb_sg;
        for (i32 kb = 0; kb < k_blocks; ++kb) {
            const u32 full = base + kOffFull + stage * 8;
            mbar_wait(base + kOffEmpty + stage * 8, phase ^ 1);  // clusters: both CTAs' consumers freed it
            if (lane == 0) {
                if constexpr (kClusterN == 1) {
                    tma_load_3d(base + kOffA + stage * kTileABytes, &p.tmap_a, full, kb * kBlockK, row0, a_group);
                    tma_load_3d(base + kOffB + stage * kTileBBytes, &p.tmap_b, full, kb * kBlockK, col0, b_group);
                } else {
                    // this CTA's slice of A into both CTAs and its B tile; a box that would lie wholly past the
                    // last row (a slice past M, the missing half of the last pair past N) starts at the last row
                    // instead: its rows are never stored, and no TMA box is entirely out of bounds
                    const i32 rank = Scheduler::rank();
                    const i32 a_row = min(row0 + rank * static_cast<i32>(kSliceM), p.rows - 1);
                    tma_load_3d_multicast(base + kOffA + stage * kTileABytes + rank * kSliceABytes, &p.tmap_a, full,
                                          kb * kBlockK, a_row, a_group, static_cast<u16>((1u << kClusterN) - 1));
                    tma_load_3d(base + kOffB + stage * kTileBBytes, &p.tmap_b, full, kb * kBlockK, min(col0, p.n - 1),
                                b_group);
                }
                // the whole A tile (every CTA's slice lands here) plus this CTA's B tile
                mbar_arrive_expect_tx(full, kTileABytes + kTileBBytes);
            }
            // SFA of the tile's rows (clamped into the tensor: rows past the end feed only rows never stored)
            if constexpr (kClusterN == 1) {
#pragma unroll
                for (u32 r = lane; r < kBlockM; r += 32) {
                    const i32 row = min(row0 + static_cast<i32>(r), p.rows - 1);
                    cp_async_4(base + kOffSfa + (stage * kBlockM + r) * 4, sfa + row * p.sfa_sm + kb * p.sfa_sk);
                }
            } else {
                // the same, not unrolled: with the cluster state, eight hoisted row addresses (256-row tiles)
                // would not fit the producer's 40 registers
#pragma unroll 1
                for (u32 r = lane; r < kBlockM; r += 32) {
                    const i32 row = min(row0 + static_cast<i32>(r), p.rows - 1);
                    cp_async_4(base + kOffSfa + (stage * kBlockM + r) * 4, sfa + row * p.sfa_sm + kb * p.sfa_sk);
                }
            }
            if (lane < kNumSfb) {
                const i32 blk = min(col0 / 128 + static_cast<i32>(lane), sfb_rows - 1);
                cp_async_4(base + kOffSfb + (stage * kSfbStride + lane) * 4, sfb + blk * p.sfb_sn + kb * p.sfb_sk);
            }
            cp_async_arrive_noinc(full);
            stage = (stage + 1 == kStages) ? 0 : stage + 1;
            phase ^= (stage == 0);
        }
    }
    if constexpr (kClusterN > 1) {
        // wait until every stage's last fill was freed by the consumers of both CTAs: after this no
        // arrival from the partner can still be on its way to this CTA's `empty` barriers
#pragma unroll 1
        for (u32 i = 0; i < kStages; ++i) {
            mbar_wait(base + kOffEmpty + stage * 8, phase ^ 1);
            stage = (stage + 1 == kStages) ? 0 : stage + 1;
            phase ^= (stage == 0);
        }
    }
}

// ---- consumers -----------------------------------------------------------------------------------

__device__ __forceinline__ void store_row_pair(const Params& p, u16* row_ptr, i32 col, float v0, float v1) {
    if (col + 1 < p.n) {
        *reinterpret_cast<u32*>(row_ptr + col) = pack_bf16x2(v0, v1);
    } else if (col < p.n) {
        row_ptr[col] = static_cast<u16>(pack_bf16x2(v0, v0) & 0xFFFF);
    }
}

__device__ __forceinline__ void consume(const Params& p, u8* smem) {
    const u32 tid = threadIdx.x;
    const u32 wg = tid / 128;            // consumer warpgroup: rows 128 i + 64 wg + [0, 64) in wave i
    const u32 warp = (tid % 128) / 32;
    const u32 lane = tid % 32;
    const u32 base = smem_addr(smem);
    const i32 k_blocks = ceil_div(p.k, kBlockK);
    const u32 r0 = wg * 64 + warp * 16 + lane / 4;  // this thread's rows in wave i: 128 i + r0 and + 8
    const u32 desc_a0 = base + kOffA + wg * 64 * kBlockK;
    const u32 desc_b0 = base + kOffB;
    const float* sfa_smem = reinterpret_cast<const float*>(smem + kOffSfa);
    const float* sfb_smem = reinterpret_cast<const float*>(smem + kOffSfb);

    Scheduler sched(p);
    u32 stage = 0, phase = 0;
    i32 mb, nb, g;
    float acc[kAccum];
    float total[kWaves][kAccum];
    while (sched.next(p, mb, nb, g)) {
        const i32 row0 = mb * kBlockM;
        const i32 col0 = nb * kBlockN;
        const bool padding_tile = (kVariant == kVariantContiguous) && g < 0;
        // columns of the tile before the first and second 128-column SFB boundary
        const i32 split1 = 128 - (col0 % 128);
        const i32 split2 = split1 + 128;
#pragma unroll
        for (u32 w = 0; w < kWaves; ++w) {
#pragma unroll
            for (u32 i = 0; i < kAccum; ++i) total[w][i] = 0.0f;
        }

        if (!padding_tile) {
            for (i32 kb = 0; kb < k_blocks; ++kb) {
                mbar_wait(base + kOffFull + stage * 8, phase);
                float sb[kNumSfb];
#pragma unroll
                for (u32 i = 0; i < kNumSfb; ++i) sb[i] = sfb_smem[stage * kSfbStride + i];
                const u64 db = smem_desc_k128(desc_b0 + stage * kTileBBytes);
#pragma unroll
                for (u32 w = 0; w < kWaves; ++w) {
                    const float sa0 = sfa_smem[stage * kBlockM + w * 128 + r0];
                    const float sa1 = sfa_smem[stage * kBlockM + w * 128 + r0 + 8];
                    const u64 da = smem_desc_k128(desc_a0 + stage * kTileABytes + w * 128 * kBlockK);
#pragma unroll
                    for (u32 i = 0; i < kAccum; ++i) fence_operand(acc[i]);
                    wgmma_fence();
#pragma unroll
                    for (u32 kk = 0; kk < kBlockK / 32; ++kk) {
                        // +32 bytes of K per step: +2 in the descriptor's 16-byte address units
                        wgmma_m64k32_e4m3(acc, da + 2 * kk, db + 2 * kk, kk > 0 ? 1u : 0u);
                    }
                    wgmma_commit();
                    wgmma_wait_all();
                    // the accumulators are read only after the wait (the fences order them after it)
#pragma unroll
                    for (u32 i = 0; i < kAccum; ++i) fence_operand(acc[i]);

                    if (w + 1 == kWaves) {
                        // the stage's smem (tiles and scales) is no longer read by this warp
                        __syncwarp();
                        if constexpr (kClusterN == 1) {
                            if (lane == 0) mbar_arrive(base + kOffEmpty + stage * 8);
                        } else if (lane < kClusterN) {
                            // lane r frees the stage in CTA r: its producer multicasts into this CTA too
                            mbar_arrive_cluster(map_shared_rank(base + kOffEmpty + stage * 8, lane));
                        }
                        stage = (stage + 1 == kStages) ? 0 : stage + 1;
                        phase ^= (stage == 0);
                    }

                    // promotion: accumulator i of chunk c = i / 4 covers columns 8c + 2 (lane % 4) + {0, 1}
#pragma unroll
                    for (u32 c = 0; c < kAccum / 4; ++c) {
                        float sb_c = sb[0];
                        if constexpr (!kUniformSfb) {
                            const i32 col = static_cast<i32>(c * 8);
                            if constexpr (kNumSfb == 2) {
                                sb_c = col < split1 ? sb[0] : sb[1];
                            } else {
                                sb_c = col < split1 ? sb[0] : (col < split2 ? sb[1] : sb[kNumSfb - 1]);
                            }
                        }
                        const float s0 = sa0 * sb_c;
                        const float s1 = sa1 * sb_c;
                        total[w][4 * c + 0] += s0 * acc[4 * c + 0];
                        total[w][4 * c + 1] += s0 * acc[4 * c + 1];
                        total[w][4 * c + 2] += s1 * acc[4 * c + 2];
                        total[w][4 * c + 3] += s1 * acc[4 * c + 3];
                    }
                }
            }
        }

        // epilogue: rows row0 + 128 w + r0 and + 8, columns col0 + 8c + 2 (lane % 4) + {0, 1}
        const i32 col_lane = col0 + static_cast<i32>(2 * (lane % 4));
        const i32 masked_rows = (kVariant == kVariantMasked) ? __ldg(p.groups + g) : 0;
#pragma unroll
        for (u32 w = 0; w < kWaves; ++w) {
            bool store[2];
            bool zero[2];
            u16* out_rows[2];
#pragma unroll
            for (u32 h = 0; h < 2; ++h) {
                const i32 row = row0 + static_cast<i32>(w * 128 + r0 + 8 * h);
                if constexpr (kVariant == kVariantMasked) {
                    store[h] = row < masked_rows;
                    zero[h] = false;
                } else {
                    store[h] = row < p.rows;
                    zero[h] = (kVariant == kVariantContiguous) && store[h] &&
                              (padding_tile || __ldg(p.groups + row) < 0);
                }
                const i32 g_out = (kVariant == kVariantMasked) ? g : 0;
                out_rows[h] = p.out + g_out * p.out_sg + static_cast<i64>(store[h] ? row : 0) * p.out_sm;
            }
#pragma unroll
            for (u32 c = 0; c < kAccum / 4; ++c) {
                const i32 col = col_lane + static_cast<i32>(8 * c);
#pragma unroll
                for (u32 h = 0; h < 2; ++h) {
                    if (store[h]) {
                        const float v0 = zero[h] ? 0.0f : total[w][4 * c + 2 * h + 0];
                        const float v1 = zero[h] ? 0.0f : total[w][4 * c + 2 * h + 1];
                        store_row_pair(p, out_rows[h], col, v0, v1);
                    }
                }
            }
        }
    }
}

}  // namespace dp

#if CLUSTER_N > 1
#define DP_CLUSTER_DIMS __cluster_dims__(CLUSTER_N, 1, 1)
#else
#define DP_CLUSTER_DIMS
#endif

extern "C" __global__ void __launch_bounds__(dp::kThreads, 1) DP_CLUSTER_DIMS
sm90_fp8_gemm_kernel(const __grid_constant__ dp::Params params) {
    using namespace dp;
    extern __shared__ u8 smem_raw[];
    // 128-byte swizzled TMA tiles need a 1024-byte aligned base; the host allocates 1 KiB of slack.
    u8* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    const u32 warp = threadIdx.x / 32;
    const u32 producer_warp = kMathThreads / 32;

    if (threadIdx.x == kMathThreads) {
        tma_prefetch_descriptor(&params.tmap_a);
        tma_prefetch_descriptor(&params.tmap_b);
        const u32 base = smem_addr(smem);
#pragma unroll 1
        for (u32 s = 0; s < kStages; ++s) {
            mbar_init(base + kOffFull + s * 8, kFullArrivals);
            mbar_init(base + kOffEmpty + s * 8, kEmptyArrivals);
        }
        fence_barrier_init();
    }
    if constexpr (kClusterN == 1) {
        __syncthreads();
    } else {
        cluster_sync();  // the partner's barriers are initialised before any multicast or remote arrival
    }

    if (threadIdx.x >= kMathThreads) {
        warpgroup_reg_dealloc<40>();
        if (warp == producer_warp) produce(params, smem);
    } else {
        warpgroup_reg_alloc<kMathWarpgroups == 1 ? 248 : 232>();
        consume(params, smem);
    }
    // no CTA leaves while its partner may still arrive on its `empty` barriers
    if constexpr (kClusterN > 1) cluster_sync();
}
