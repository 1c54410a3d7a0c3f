// System-scope synchronisation between GPUs of one host, shared by the peer transport's kernels
// (sm90_peer_flags.cu, sm90_peer_exchange.cu): flags that peers raise and await over NVLink mappings.
#pragma once

namespace dp {

// A flag's value as this GPU sees it, ordered before every later load (acquire, system scope).
__device__ __forceinline__ long long load_acquire_sys(const long long* p) {
    long long v;
    asm volatile("ld.acquire.sys.global.s64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

// Adds v to a flag, after every earlier store of this thread (release, system scope).
__device__ __forceinline__ void add_release_sys(long long* p, long long v) {
    asm volatile("red.release.sys.global.add.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// The global nanosecond timer (the same clock on every SM): bounds the waits.
__device__ __forceinline__ unsigned long long global_ns() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

}  // namespace dp
