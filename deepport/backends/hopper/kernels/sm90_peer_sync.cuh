// System-scope synchronisation between GPUs of one host, shared by the peer transport's kernels
// (sm90_peer_flags.cu, sm90_peer_exchange.cu): flags that peers raise and await over NVLink mappings, and
// the bounded wait.
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

// Spins (backing off from 32 ns up to max_sleep_ns) until *flag >= target. Past timeout_ns the first
// waiter of the grid writes {1, which, flag seen, target} into the host-mapped record err and every
// waiter traps: the stream stops with an error instead of hanging or moving stale data on.
__device__ __forceinline__ void wait_at_least(const long long* flag, long long target, long long timeout_ns,
                                              long long* err, long long which, unsigned max_sleep_ns) {
    const unsigned long long start = global_ns();
    unsigned sleep_ns = 32;
    for (;;) {
        const long long seen = load_acquire_sys(flag);
        if (seen >= target) return;
        if (static_cast<long long>(global_ns() - start) > timeout_ns) {
            if (atomicCAS(reinterpret_cast<unsigned long long*>(err), 0ull, 1ull) == 0ull) {
                err[1] = which;
                err[2] = seen;
                err[3] = target;
                __threadfence_system();
            }
            __trap();
        }
        __nanosleep(sleep_ns);
        if (sleep_ns < max_sleep_ns) sleep_ns *= 2;
    }
}

}  // namespace dp
