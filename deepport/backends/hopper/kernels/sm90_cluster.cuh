// sm_90a PTX wrappers for thread-block clusters: the CTA's rank and its cluster's place in the grid,
// cluster-wide barriers, shared-memory addresses of another CTA of the cluster (mapa), mbarrier
// arrivals and waits at cluster scope, and the multicast form of the TMA tile load.
//
// Include after sm90_ptx.cuh (integer types, CUtensorMap). Used only by kernels compiled with
// __cluster_dims__; in a kernel launched without a cluster every CTA is a cluster of one.
#pragma once

namespace dp {

// ---- where this CTA is ---------------------------------------------------------------------------

// This CTA's rank inside its cluster (0 .. cluster size - 1).
__device__ __forceinline__ u32 cluster_cta_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}

// The cluster's index along x in the grid of clusters, and the number of clusters along x.
__device__ __forceinline__ u32 cluster_id_x() {
    u32 r;
    asm volatile("mov.u32 %0, %%clusterid.x;" : "=r"(r));
    return r;
}

__device__ __forceinline__ u32 cluster_count_x() {
    u32 r;
    asm volatile("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
    return r;
}

// ---- cluster barrier -----------------------------------------------------------------------------

// Every thread of every CTA of the cluster arrives, then waits for all of them. The arrival releases
// and the wait acquires at cluster scope: what a thread wrote before (shared memory of its own or of
// another CTA, mbarrier initialisation published by fence_barrier_init, remote mbarrier arrivals) is
// visible to every thread of the cluster after the wait. Not `.aligned`: callable from diverged code.
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\n"
                 "barrier.cluster.wait.acquire;" ::: "memory");
}

// ---- another CTA's shared memory -----------------------------------------------------------------

// The shared::cluster address of the variable at shared::cta address `addr` in the CTA of rank
// `rank` (the same offset in that CTA's shared memory).
__device__ __forceinline__ u32 map_shared_rank(u32 addr, u32 rank) {
    u32 r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(addr), "r"(rank));
    return r;
}

// One arrival on the mbarrier at shared::cluster address `cluster_bar` (this or another CTA's, from
// map_shared_rank). The consumers use it to free a stage in every CTA whose producer multicasts into
// theirs, after wgmma.wait_group has retired the wgmmas that read the stage: the reads are complete,
// so the arrival needs no fence. Default semantics (release at CTA scope), as CUTLASS's and DeepGEMM's
// cluster pipelines do: `.release.cluster` would put MEMBAR.ALL.GPU before every arrival in the
// mainloop, and the matching `try_wait.acquire.cluster` a CCTL.IVALL (L1 invalidation) after every wait.
__device__ __forceinline__ void mbar_arrive_cluster(u32 cluster_bar) {
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" ::"r"(cluster_bar) : "memory");
}

// ---- multicast TMA -------------------------------------------------------------------------------

// A 3-D tile {c0 (innermost), c1, c2} of `map` written into the shared memory of every CTA of the
// cluster whose bit is set in `cta_mask`, at the same CTA-relative offset `dst`; each destination
// CTA's mbarrier at offset `bar` receives the tile's bytes as complete_tx (so every destination
// expects them in its own barrier's transaction count). Out-of-bounds elements are zeros.
__device__ __forceinline__ void tma_load_3d_multicast(u32 dst, const CUtensorMap* map, u32 bar, i32 c0, i32 c1,
                                                      i32 c2, u16 cta_mask) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%3, %4, %5}], [%2], %6;"
        ::"r"(dst), "l"(reinterpret_cast<u64>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "h"(cta_mask)
        : "memory");
}

}  // namespace dp
