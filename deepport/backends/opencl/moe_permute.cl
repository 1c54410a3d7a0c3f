/* The local steps of the MoE ops: routing layout counts, row permutation (gather), the per-token FP8 cast
 * and the weighted un-permute (segmented row sums). OpenCL C 1.2: 32-bit global atomics (core since
 * 1.1) for the counts; float sums in a fixed order (deterministic); no subgroups.
 *
 * Compile-time constant (-D): CAST_THREADS, the work-group of moe_cast_fp8 (128: one work-item per
 * channel of a 128-channel block).
 */

/* One work-item per token: is_token_in_rank[t, r] (0/1 bytes, every element written), and +1 on
 * num_tokens_per_expert[e] / num_tokens_per_rank[r] for each distinct expert / rank the token selects
 * (the counters start at zero). Expert e lives on rank e / experts_per_rank; ids < 0 select nothing. */
__kernel void moe_layout(__global const int *topk_idx, int num_topk, int num_ranks, int experts_per_rank,
                         __global uchar *in_rank, __global int *per_expert, __global int *per_rank) {
    const int t = (int)get_global_id(0);
    __global const int *ids = topk_idx + (long)t * num_topk;
    for (int r = 0; r < num_ranks; ++r) in_rank[(long)t * num_ranks + r] = 0;
    for (int k = 0; k < num_topk; ++k) {
        const int e = ids[k];
        if (e < 0) continue;
        const int r = e / experts_per_rank;
        int new_expert = 1, new_rank = 1;
        for (int j = 0; j < k; ++j) {
            if (ids[j] == e) new_expert = 0;
            if (ids[j] >= 0 && ids[j] / experts_per_rank == r) new_rank = 0;
        }
        if (new_expert) atomic_inc(per_expert + e);
        if (new_rank) {
            atomic_inc(per_rank + r);
            in_rank[(long)t * num_ranks + r] = 1;
        }
    }
}

/* dst[i] = src[index[i]] for rows of `row_words` words of TYPE; where index[i] < 0 the row is zeroed
 * (zero_missing) or left as it is. Global size (row_words, rows). moe_gather_rows16 moves 16-byte words
 * (rows a multiple of 16 bytes), moe_gather_rows1 single bytes (any row length). */
#define GATHER_ROWS(name, TYPE, ZERO)                                                                    \
    __kernel void name(__global const TYPE *src, __global const long *index, __global TYPE *dst,         \
                       int row_words, int zero_missing) {                                                \
        const int w = (int)get_global_id(0);                                                             \
        const long i = (long)get_global_id(1);                                                           \
        const long s = index[i];                                                                         \
        if (s >= 0) {                                                                                    \
            dst[i * row_words + w] = src[s * row_words + w];                                             \
        } else if (zero_missing) {                                                                       \
            dst[i * row_words + w] = ZERO;                                                               \
        }                                                                                                \
    }

GATHER_ROWS(moe_gather_rows16, uint4, (uint4)(0u))
GATHER_ROWS(moe_gather_rows1, uchar, (uchar)0)

/* Per token and 128-channel block (one work-group each, CAST_THREADS = 128 work-items):
 * amax = max(max |x|, 1e-4), scale = amax * float32(1/448) (one rounding), q = e4m3(x * (448 / amax)), the
 * quotient correctly rounded (div_rn), the product rounded once, the e4m3 conversion round-to-nearest-even: bit for bit
 * what torch computes in float32. x bf16 [T, H]; q e4m3 [T, H]; scales float32 [T, H / 128]. */
__kernel __attribute__((reqd_work_group_size(CAST_THREADS, 1, 1)))
void moe_cast_fp8(__global const ushort *x, __global uchar *q, __global float *scales, int hidden) {
    __local float red[CAST_THREADS];
    const int lid = (int)get_local_id(0);
    const int blocks = hidden / 128;
    const long t = (long)get_group_id(0) / blocks;
    const int blk = (int)get_group_id(0) % blocks;
    const long at = t * hidden + blk * 128 + lid;
    const float v = bf16_to_float(x[at]);
    red[lid] = fabs(v);
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int span = CAST_THREADS / 2; span > 0; span >>= 1) {
        if (lid < span) red[lid] = fmax(red[lid], red[lid + span]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float amax = fmax(red[0], 1e-4f);
    q[at] = float_to_e4m3(v * div_rn(448.0f, amax));
    if (lid == 0) scales[t * blocks + blk] = amax * 0x1.24924ap-9f;  /* float32(1/448), DeepEP's multiplier */
}

/* Segmented weighted row sums: out[d, c] = sum_{e in [offsets[d], offsets[d+1])} w_e * src[rows[e], c]
 * in float32, entries in order (w_e = weights[e], or 1 without weights); src is bf16 (src_bf16 = 1) or
 * float32. An empty segment gives zeros. Global size (hidden, num_dst). */
__kernel void moe_reduce_rows(__global const uchar *src, __global const long *offsets, __global const long *rows,
                              __global const float *weights, __global float *out, int hidden, int src_bf16,
                              int has_weights) {
    const int c = (int)get_global_id(0);
    const long d = (long)get_global_id(1);
    float acc = 0.0f;
    for (long e = offsets[d]; e < offsets[d + 1]; ++e) {
        const long at = rows[e] * hidden + c;
        const float v = src_bf16 ? bf16_to_float(((__global const ushort *)src)[at])
                                 : ((__global const float *)src)[at];
        acc += has_weights ? weights[e] * v : v;
    }
    out[d * hidden + c] = acc;
}
