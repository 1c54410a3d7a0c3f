// sm90 MLA decode, split-KV combine: merges the partial results of the requests the plan cut into
// several pieces (sm90_mla_decode.cu writes them), one CTA of 128 threads per (cut request, accumulator
// row R = g * q_rows + r: KV head g, its query row r = i * group + h', query head g * group + h').
//
//   lse = log(sum_j exp(lse_j)),  out = sum_j exp(lse_j - lse) O_j   (O_j already normalised)
//
// A row that saw no token in any piece (every lse_j = -inf: an empty request is never cut, but a causal
// row can see nothing) gets out = 0 and lse = +inf. DTYPE 0 stores bf16, 1 fp16.
#include "sm90_ptx.cuh"
#include "sm90_wgmma_16bit.cuh"

namespace dp {

constexpr u32 kDimV = 512;

struct alignas(16) CombineParams {
    const float* o_acc;      // [split rows, h_kv * q_rows, 512]
    const float* lse_acc;    // [split rows, h_kv * q_rows]
    const i32* cut;          // [num_cut] requests with several pieces
    const i32* num_splits;   // [b + 1] exclusive prefix sum of pieces per request
    u16* out;                // [b, s_q, h_q, 512] contiguous
    float* lse;              // [b, h_q, s_q] contiguous
    i32 q_rows;              // query rows per KV head (s_q * group)
    i32 h_q;
    i32 s_q;
    i32 group;               // h_q / h_kv
};

}  // namespace dp

extern "C" __global__ void __launch_bounds__(128)
sm90_mla_combine_kernel(const __grid_constant__ dp::CombineParams p) {
    using namespace dp;
    const i32 req = __ldg(p.cut + blockIdx.x);
    const i32 row = static_cast<i32>(blockIdx.y);  // accumulator row
    const i64 acc_rows = gridDim.y;
    const i32 first = __ldg(p.num_splits + req);
    const i32 last = __ldg(p.num_splits + req + 1);
    float top = __int_as_float(0xff800000);
    for (i32 j = first; j < last; ++j) top = fmaxf(top, __ldg(p.lse_acc + j * acc_rows + row));
    const i32 r = row % p.q_rows;
    const i32 i = r / p.group;
    const i32 head = (row / p.q_rows) * p.group + r % p.group;
    u16* out = p.out + ((static_cast<i64>(req) * p.s_q + i) * p.h_q + head) * kDimV + 4 * threadIdx.x;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    float lse = __int_as_float(0x7f800000);
    if (top != __int_as_float(0xff800000)) {
        float total = 0.0f;
        for (i32 j = first; j < last; ++j) total += expf(__ldg(p.lse_acc + j * acc_rows + row) - top);
        lse = top + logf(total);
        for (i32 j = first; j < last; ++j) {
            const float w = expf(__ldg(p.lse_acc + j * acc_rows + row) - lse);
            const float4 v = __ldg(reinterpret_cast<const float4*>(p.o_acc + (j * acc_rows + row) * kDimV) + threadIdx.x);
            acc[0] += w * v.x;
            acc[1] += w * v.y;
            acc[2] += w * v.z;
            acc[3] += w * v.w;
        }
    }
    *reinterpret_cast<uint2*>(out) = make_uint2(pack_16x2(acc[0], acc[1]), pack_16x2(acc[2], acc[3]));
    if (threadIdx.x == 0) p.lse[(static_cast<i64>(req) * p.h_q + head) * p.s_q + i] = lse;
}
