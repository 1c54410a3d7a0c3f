// sm_90a PTX wrappers shared by the Hopper kernels: integer types, the CUtensorMap declaration,
// mbarriers, TMA (cp.async.bulk.tensor), cp.async with mbarrier completion, wgmma fences and
// shared-memory matrix descriptors, setmaxnreg, and bf16 packing.
//
// Compiled with NVRTC, which has no C library headers: everything here is self-contained
// (no <cuda.h>, no <cstdint>).
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

// The driver's opaque 128-byte TMA descriptor, built on the host by cuTensorMapEncodeTiled and
// passed by value inside a __grid_constant__ kernel parameter.
struct alignas(64) CUtensorMap {
    u64 opaque[16];
};

namespace dp {

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return static_cast<u32>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ u32 lane_id() {
    u32 lane;
    asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
    return lane;
}

// ---- mbarriers ---------------------------------------------------------------------------------

__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}

// Makes barrier initialisation visible to the async proxy (TMA) and to the other threads.
__device__ __forceinline__ void fence_barrier_init() {
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}

// One arrival that also raises the phase's expected transaction bytes (the TMA copies' total).
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}

// Blocks until the phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    u32 done = 0;
    do {
        asm volatile(
            "{\n"
            ".reg .pred p;\n"
            "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
            "selp.u32 %0, 1, 0, p;\n"
            "}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

// ---- TMA and cp.async --------------------------------------------------------------------------

__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* map) {
    asm volatile("prefetch.tensormap [%0];" ::"l"(reinterpret_cast<u64>(map)) : "memory");
}

// A 3-D tile {c0 (innermost), c1, c2} of `map` into shared memory; completion is counted in bytes
// on mbarrier `bar`. Out-of-bounds elements are filled with zeros.
__device__ __forceinline__ void tma_load_3d(u32 dst, const CUtensorMap* map, u32 bar, i32 c0, i32 c1, i32 c2) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], [%2];"
        ::"r"(dst), "l"(reinterpret_cast<u64>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2)
        : "memory");
}

// A 4-D tile {c0 (innermost), c1, c2, c3} of `map`, as tma_load_3d.
__device__ __forceinline__ void tma_load_4d(u32 dst, const CUtensorMap* map, u32 bar, i32 c0, i32 c1, i32 c2, i32 c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], [%2];"
        ::"r"(dst), "l"(reinterpret_cast<u64>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
        : "memory");
}

// 4-byte asynchronous copy global -> shared (LDGSTS).
__device__ __forceinline__ void cp_async_4(u32 dst, const void* src) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}

// Arrive on `bar` once every cp.async this thread issued before has completed (no pre-increment:
// the barrier's expected count includes this arrival).
__device__ __forceinline__ void cp_async_arrive_noinc(u32 bar) {
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];" ::"r"(bar) : "memory");
}

// ---- warpgroup MMA -----------------------------------------------------------------------------

__device__ __forceinline__ void wgmma_fence() {
    asm volatile("wgmma.fence.sync.aligned;" ::: "memory");
}

__device__ __forceinline__ void wgmma_commit() {
    asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}

__device__ __forceinline__ void wgmma_wait_all() {
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}

// Waits until at most `kPending` committed wgmma groups of this warp are still running (groups
// complete in commit order).
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(kPending) : "memory");
}

// Keeps the compiler from moving accesses of an accumulator register across wgmma instructions.
__device__ __forceinline__ void fence_operand(float& r) {
    asm volatile("" : "+f"(r)::"memory");
}

// The same for a register an asynchronous wgmma reads as its A operand (keeps it live and unmoved).
__device__ __forceinline__ void fence_operand_u32(u32& r) {
    asm volatile("" : "+r"(r)::"memory");
}

// Shared-memory matrix descriptor of a K-major tile written by TMA with 128-byte swizzling: rows of
// 128 bytes, 8-row (1024-byte) swizzle atoms stacked along M/N (stride byte offset 1024), one atom
// along K (leading byte offset unused). The tile base must be 1024-byte aligned; a K step of 32
// fp8 elements inside the row adds 32 bytes to the start address.
__device__ __forceinline__ u64 smem_desc_k128(u32 addr) {
    const u64 start = (addr & 0x3FFFF) >> 4;
    const u64 lbo = 1;             // 16 bytes, ignored for swizzled K-major layouts
    const u64 sbo = 1024 >> 4;     // bytes between 8-row groups
    const u64 swizzle_128b = 1;    // layout type in bits 62-63
    return start | (lbo << 16) | (sbo << 32) | (swizzle_128b << 62);
}

// ---- registers ---------------------------------------------------------------------------------

template <u32 kRegs>
__device__ __forceinline__ void warpgroup_reg_dealloc() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(kRegs));
}

template <u32 kRegs>
__device__ __forceinline__ void warpgroup_reg_alloc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(kRegs));
}

// ---- conversions -------------------------------------------------------------------------------

// Two floats rounded to nearest-even bf16, `lo` in the low half (the lower address when stored).
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

}  // namespace dp
