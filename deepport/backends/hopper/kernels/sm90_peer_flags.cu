// Flags of the peer transport (deepport/backends/hopper/peer_transport.py) over NVLink peer mappings.
//
// One launch handles up to DP_PEER_MAX_OPS flags, one thread each (block of 32 * k threads, grid 1):
//
//   mode 0, signal: one more chunk for the flag's owner. A release fence at system scope orders the
//           kernels before it on this stream (the copies into peer memory) before the flag's increment,
//           which is a relaxed atomic add at system scope (red.release.sys): readers that see the new
//           count see the data.
//   mode 1, wait:   target = ++counter (a counter in this GPU's memory, so a captured CUDA graph waits
//           for the next chunk at each replay, not for a value frozen at capture time); spin with
//           ld.acquire.sys until the flag reaches target.
//   mode 2, wait without advancing: target = counter (the acknowledgements of chunks already sent).
//   mode 3 | (n << 8), signal then wait: the first n ops signal (mode 0), the others wait for their next
//           chunk (mode 1); one launch where a round raises its data flags and awaits its sources'.
//
// A wait is bounded: past timeout_ns (the %globaltimer clock), the first thread that gives up writes
// {1, op index, flag value seen, target} into the error record (host-mapped pinned memory, read by the
// host without a sync) and traps, so the stream stops with an error instead of hanging or moving
// stale data on; the host turns the record into MoECommTimeout.
//
// Compiled with NVRTC (no C library headers).

#ifndef DP_PEER_MAX_OPS
#define DP_PEER_MAX_OPS 64
#endif

#include "sm90_peer_sync.cuh"

typedef unsigned long long u64;
typedef long long i64;

namespace dp {

struct PeerOp {
    u64 flag;     // address of the int64 flag (a peer mapping for signals, this GPU's area for waits)
    u64 counter;  // address of this GPU's int64 counter for the pair (signals: chunks sent)
};

struct PeerFlagParams {
    PeerOp ops[DP_PEER_MAX_OPS];
    u64 error;        // i64[4] host-mapped: {failed, op index, seen, target}
    i64 timeout_ns;
    int num_ops;
    int mode;         // 0 signal, 1 wait for the next chunk, 2 wait for the counter's value, 3 | (n << 8) both
};

// The host packs this struct (peer_memory_cuda.pack_params): 16 bytes per op, then 24 bytes, no gaps.
static_assert(sizeof(PeerFlagParams) == DP_PEER_MAX_OPS * 16 + 24, "PeerFlagParams layout differs from the host's");

}  // namespace dp

extern "C" __global__ void __launch_bounds__(DP_PEER_MAX_OPS)
dp_peer_flags_kernel(const __grid_constant__ dp::PeerFlagParams p) {
    const int i = threadIdx.x;
    if (i >= p.num_ops) return;
    i64* flag = reinterpret_cast<i64*>(p.ops[i].flag);
    i64* counter = reinterpret_cast<i64*>(p.ops[i].counter);
    int mode = p.mode & 0xff;
    if (mode == 3) mode = i < (p.mode >> 8) ? 0 : 1;
    if (mode == 0) {
        asm volatile("fence.acq_rel.sys;" ::: "memory");
        dp::add_release_sys(flag, 1);
        *counter += 1;
        return;
    }
    const i64 target = mode == 1 ? (*counter += 1) : *counter;
    dp::wait_at_least(flag, target, p.timeout_ns, reinterpret_cast<i64*>(p.error), i, 1024);
}
