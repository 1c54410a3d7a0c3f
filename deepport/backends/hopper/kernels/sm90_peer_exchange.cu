// One-launch equal-split all-to-all over NVLink peer mappings: the peer transport's fixed exchange
// (deepport/backends/hopper/peer_transport.py, the low-latency MoE layouts).
//
// Every rank of the group launches this kernel with the same grid (DP_FX_CTAS blocks) on the same
// sequence of exchanges. send and out are [world][pair_bytes] in this GPU's memory. Each rank owns, in its
// peer buffer, two areas (parities) of `world` slots of `slot_bytes`; slot s of an area holds what rank s
// sent here. Exchange number `seq` (a per-CTA counter in device memory, so a captured CUDA graph moves
// on at every replay) uses area seq & 1. CTA c of rank `me`:
//
//   1. writes its share (a 16-byte aligned cut of pair_bytes) of send[r] into slot `me` of rank r's
//      area, for every r != me, and of send[me] straight into out[me];
//   2. meets its block at a barrier; one thread per peer then fences (system scope) and raises
//      fixed_flag[me] of that peer by one (red.release.sys): a peer's flag for this rank reaches
//      (seq + 1) * DP_FX_CTAS once all of this rank's CTAs have written;
//   3. waits (ld.acquire.sys spins, one thread per source, __nanosleep backoff, bounded by timeout_ns on
//      %globaltimer) until its own fixed_flag[s] has reached (seq + 1) * DP_FX_CTAS for every s != me;
//   4. copies its share of every source's slot into out[s] (L2 loads: the slots are written by peers),
//      then stores seq + 1 into its counter.
//
// With out == 0 step 4 is skipped: the parts stay in this rank's slots of area seq & 1, where the kernels
// after this one on the stream read them (valid until this rank's next exchange: a peer writes that area
// again only in the exchange after it, once it has seen this rank's flags of the next one).
//
// With send == 0 the bytes are already in place: the kernels before this one on the stream wrote each
// rank's part straight into slot `me` of its area of parity seq & 1, this rank's own part included (the
// "written" exchange: a sender that stores its rows straight into the peers' memory, reading the parity
// from counters[0]). Step 1 is skipped and step 4 also copies this rank's own slot into out[me]. The fence
// of step 2 orders those earlier kernels' stores (finished before this grid started, on this stream)
// before the flag.
//
// No acknowledgement is needed before writing: a rank writes area p again two exchanges later, after it
// has seen (step 3 of the exchange in between) every peer's writes of that exchange, which each peer's
// stream issued only after finishing the kernel that copied area p out. All CTAs wait on peers, never on
// each other, so the grid needs no co-residency; a peer that never launches makes every CTA give up after
// timeout_ns: the first records {1, -1 - source, flag seen, flag expected} in host-mapped memory and traps, so
// the stream stops with an error instead of hanging or copying stale bytes.
//
// Compiled with NVRTC (no C library headers).

#ifndef DP_FX_MAX_RANKS
#define DP_FX_MAX_RANKS 64
#endif
#ifndef DP_FX_CTAS
#define DP_FX_CTAS 64
#endif
#ifndef DP_FX_FENCE_EVERY_THREAD
#define DP_FX_FENCE_EVERY_THREAD 0
#endif
#ifndef DP_FX_THREADS
#define DP_FX_THREADS 512
#endif

#include "sm90_peer_sync.cuh"

typedef unsigned long long u64;
typedef long long i64;
typedef unsigned int u32;

namespace dp {

struct FixedExchangeParams {
    u64 area[DP_FX_MAX_RANKS];  // rank r's parity-0 area, mapped here (slots, then the parity-1 area)
    u64 flag[DP_FX_MAX_RANKS];  // rank r's fixed_flag[world] (int64), mapped here
    u64 send;                   // [world][pair_bytes], this GPU; 0: already written into the slots
    u64 out;                    // [world][pair_bytes], this GPU
    u64 counters;               // i64[DP_FX_CTAS], this GPU: exchanges completed, per CTA
    u64 error;                  // i64[4] host-mapped: {failed, source, seen, target}
    i64 pair_bytes;
    i64 slot_bytes;             // bytes per source slot; an area is world * slot_bytes
    i64 timeout_ns;
    int world;
    int rank;
};

// The host packs this struct (peer_exchange_kernel.pack_params): 16 bytes per rank, then 64 bytes, no gaps.
static_assert(sizeof(FixedExchangeParams) == DP_FX_MAX_RANKS * 16 + 64, "FixedExchangeParams layout differs from the host's");

// Bytes [lo, hi) of src to dst, by this block's threads: 16-byte vectors where both ends allow it, else
// 4-byte words, else bytes. peer_src: the source was written by another GPU (bypass L1).
__device__ __forceinline__ void copy_range(char* dst, const char* src, i64 lo, i64 hi, bool peer_src) {
    if (hi <= lo) return;
    dst += lo;
    src += lo;
    const i64 n = hi - lo;
    const u64 both = reinterpret_cast<u64>(dst) | reinterpret_cast<u64>(src);
    if ((both & 15) == 0) {
        const i64 vecs = n >> 4;
        uint4* d = reinterpret_cast<uint4*>(dst);
        const uint4* s = reinterpret_cast<const uint4*>(src);
        // four vectors in flight per thread, then the rest one at a time
        const i64 step = blockDim.x, body = vecs / (4 * step) * (4 * step);
        for (i64 i = threadIdx.x; i < body; i += 4 * step) {
            uint4 v[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) v[u] = peer_src ? __ldcg(s + i + u * step) : s[i + u * step];
#pragma unroll
            for (int u = 0; u < 4; ++u) d[i + u * step] = v[u];
        }
        for (i64 i = body + threadIdx.x; i < vecs; i += step) d[i] = peer_src ? __ldcg(s + i) : s[i];
        for (i64 i = (vecs << 4) + threadIdx.x; i < n; i += step) dst[i] = src[i];
    } else if ((both & 3) == 0) {
        const i64 words = n >> 2;
        u32* d = reinterpret_cast<u32*>(dst);
        const u32* s = reinterpret_cast<const u32*>(src);
        for (i64 i = threadIdx.x; i < words; i += blockDim.x) d[i] = peer_src ? __ldcg(s + i) : s[i];
        for (i64 i = (words << 2) + threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    } else {
        for (i64 i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
    }
}

}  // namespace dp

extern "C" __global__ void __launch_bounds__(DP_FX_THREADS, 1)
dp_fixed_exchange_kernel(const __grid_constant__ dp::FixedExchangeParams p) {
    __shared__ i64 seq_shared;
    const int c = blockIdx.x;
    i64* counters = reinterpret_cast<i64*>(p.counters);
    if (threadIdx.x == 0) seq_shared = counters[c];
    __syncthreads();
    const i64 seq = seq_shared;
    const i64 parity_offset = (seq & 1) * p.world * p.slot_bytes;
    // this CTA's cut of a pair's bytes: 16-byte multiples, so vectors stay aligned across cuts
    const i64 per = ((p.pair_bytes + DP_FX_CTAS - 1) / DP_FX_CTAS + 15) / 16 * 16;
    const i64 lo = min(p.pair_bytes, per * c), hi = min(p.pair_bytes, lo + per);
    const char* send = reinterpret_cast<const char*>(p.send);
    char* out = reinterpret_cast<char*>(p.out);
    const bool written = p.send == 0;  // every part already stored in its slot

    // 1. into the peers' slots, and this rank's own pair straight to out
    for (int r = 0; r < p.world && !written; ++r) {
        char* dst = r == p.rank ? out + r * p.pair_bytes
                                : reinterpret_cast<char*>(p.area[r]) + parity_offset + p.rank * p.slot_bytes;
        dp::copy_range(dst, send + r * p.pair_bytes, lo, hi, false);
    }
    // 2. written: one more CTA's share at every peer. The barrier orders the block's writes before the
    // signalling thread's system-scope fence and release (cumulative over what the barrier ordered before
    // it, and over the earlier kernels' stores of a written exchange), so no other thread fences
    // (-DDP_FX_FENCE_EVERY_THREAD=1: every thread fences first, as before 2026-12-03, for A/B timings).
#if DP_FX_FENCE_EVERY_THREAD
    __threadfence_system();
#endif
    __syncthreads();
    if (threadIdx.x < p.world && threadIdx.x != p.rank) {
        asm volatile("fence.acq_rel.sys;" ::: "memory");
        dp::add_release_sys(reinterpret_cast<i64*>(p.flag[threadIdx.x]) + p.rank, 1);
    }
    // 3. until every source's CTAs have all written here
    if (threadIdx.x < p.world && threadIdx.x != p.rank) {
        const i64* flag = reinterpret_cast<const i64*>(p.flag[p.rank]) + threadIdx.x;
        const i64 target = (seq + 1) * DP_FX_CTAS;
        // the record names the source as -1 - rank (negative: not a flag op of sm90_peer_flags.cu); a short
        // backoff cap, as the latency of a low-latency op is this wait
        dp::wait_at_least(flag, target, p.timeout_ns, reinterpret_cast<i64*>(p.error),
                          -1 - static_cast<i64>(threadIdx.x), 256);
    }
    __syncthreads();
    // 4. out of this rank's slots (out == 0: left where they landed, for the kernels after this one to read)
    const char* mine = reinterpret_cast<const char*>(p.area[p.rank]) + parity_offset;
    for (int s = 0; s < p.world && p.out != 0; ++s) {
        if (s == p.rank && !written) continue;
        dp::copy_range(out + s * p.pair_bytes, mine + s * p.slot_bytes, lo, hi, s != p.rank);
    }
    __syncthreads();
    if (threadIdx.x == 0) counters[c] = seq + 1;
}
