/* Block-scaled FP8 GEMM, NT form: D[m, n] = C[m, n] + sum_k SFA[m, k/128] SFB[n/gran_n, k/128] A[m, k] B[n, k].
 * e4m3 operands (uchar), float32 or packed UE8M0 scale factors, float32 math, bf16 or float32 out.
 * One kernel for the dense GEMM and both M-grouped layouts (MODE_*); OpenCL C 1.2, no extensions.
 *
 * Compile-time constants (-D): BM, BN (tile, multiples of 16), BK (K per step: 16 or 32, divides 128).
 * Work-group: (BM / 8) * (BN / 8) threads, each owning an 8 x 8 block of the tile (rows ty*4+i and
 * BM/2+ty*4+i, columns tx*4+j and BN/2+tx*4+j), so local reads are float4 broadcasts.
 *
 * Each step stages a BM x BK slice of A and a BN x BK slice of B in local memory as float32: every e4m3
 * byte is decoded exactly and multiplied by its scale factor (the step lies inside one 128-wide K block,
 * so one SF per row). The products then accumulate in float32 FMAs. This equals the definition's
 * per-128-K promotion up to float32 rounding: the promotion exists because FP8 tensor cores accumulate
 * with ~14 bits; here every partial sum is float32 already. The next step's global loads are issued
 * before the current step's arithmetic (register prefetch).
 *
 * Rows that the layout says are not read (m_indices == -1, rows >= masked_m[g], rows >= M) are never
 * loaded: their A and SFA bytes may be NaN. Columns >= N and K >= K are never loaded.
 */

#define MODE_DENSE 0
#define MODE_CONTIGUOUS 1
#define MODE_MASKED 2

#define TX (BN / 8)
#define TY (BM / 8)
#define NT (TX * TY)
#define CHUNKS_A (BM * BK / 16 / NT)  /* 16-byte chunks each thread stages per step */
#define CHUNKS_B (BN * BK / 16 / NT)

inline float load_sf(__global const uint *sf, long row, int cols, int kb, int ue8m0) {
    if (ue8m0) {
        return ue8m0_packed_sf((__global const int *)(sf + row * cols), kb);
    }
    return as_float(sf[row * cols + kb]);
}

/* 16 bytes of one row starting at k (zeros where k >= K); `aligned` promises K % 16 == 0 and a
 * 16-byte aligned buffer, so one vector load can be used. */
inline uint4 load_chunk(__global const uchar *row, int k, int K, int aligned) {
    if (k >= K) {
        return (uint4)(0u);
    }
    if (aligned) {
        return *(__global const uint4 *)(row + k);
    }
    uint w[4] = {0u, 0u, 0u, 0u};
    for (int i = 0; i < 16; ++i) {
        if (k + i < K) w[i >> 2] |= (uint)row[k + i] << (8 * (i & 3));
    }
    return (uint4)(w[0], w[1], w[2], w[3]);
}

/* Decode 16 e4m3 bytes, multiply by `scale`, store at dst[i * stride] (i = 0..15). */
inline void stage_chunk(uint4 raw, float scale, __local float *dst, int stride) {
    const uint w[4] = {raw.s0, raw.s1, raw.s2, raw.s3};
    for (int i = 0; i < 16; ++i) {
        dst[i * stride] = e4m3_to_float((uchar)(w[i >> 2] >> (8 * (i & 3)))) * scale;
    }
}

__kernel __attribute__((reqd_work_group_size(NT, 1, 1)))
void fp8_gemm(__global const uchar *a,      /* [groups?, rows, K] */
              __global const uint *sfa,     /* [groups?, rows, sf_cols] float32 or packed UE8M0 bits */
              __global const uchar *b,      /* [groups, N, K] */
              __global const uint *sfb,     /* [groups, sfb_rows, sf_cols] */
              __global const int *m_index,  /* contiguous: group of each row; masked: rows per group */
              __global const float *c,      /* [M, N] when has_c */
              __global uchar *out,          /* [groups?, rows, N] bf16 or float32 */
              int mode, int M, int N, int K, int sf_cols, int ue8m0, int gran_n, int sfb_rows,
              int out_f32, int has_c, int aligned) {
    __local float4 as4[BK * BM / 4];  /* as[k * BM + m], float4-typed for aligned vector reads */
    __local float4 bs4[BK * BN / 4];  /* bs[k * BN + n] */
    __local float *as = (__local float *)as4;
    __local float *bs = (__local float *)bs4;

    const int lid = (int)get_local_id(0);
    const int n0 = (int)get_group_id(0) * BN, m0 = (int)get_group_id(1) * BM;
    int g = 0, rows_valid = M;  /* rows [0, rows_valid) of this group exist */
    if (mode == MODE_MASKED) {
        g = (int)get_group_id(2);
        rows_valid = m_index[g];
        if (m0 >= rows_valid) return;  /* uniform over the work-group, before any barrier */
    } else if (mode == MODE_CONTIGUOUS) {
        g = m_index[m0];  /* a tile lies inside one 128-row block: one group, then padding (-1) */
    }
    const long row_base = mode == MODE_MASKED ? (long)g * M : 0;  /* first row of this group in A / out */

    /* ---- what this thread stages: CHUNKS_A rows of A, CHUNKS_B rows of B (16 bytes each) ---- */
    __global const uchar *a_row[CHUNKS_A];
    long a_sf_row[CHUNKS_A];
    int a_ok[CHUNKS_A], a_k[CHUNKS_A], a_dst[CHUNKS_A];
    for (int i = 0; i < CHUNKS_A; ++i) {
        const int chunk = lid + i * NT, r = chunk % BM, row = m0 + r;
        int ok = g >= 0 && row < rows_valid;
        if (ok && mode == MODE_CONTIGUOUS) ok = m_index[row] >= 0;
        a_ok[i] = ok;
        a_sf_row[i] = row_base + (ok ? row : 0);
        a_row[i] = a + a_sf_row[i] * (long)K;
        a_k[i] = (chunk / BM) * 16;
        a_dst[i] = a_k[i] * BM + r;
    }
    __global const uchar *b_row[CHUNKS_B];
    long b_sf_row[CHUNKS_B];
    int b_ok[CHUNKS_B], b_k[CHUNKS_B], b_dst[CHUNKS_B];
    const int gb = g >= 0 ? g : 0;
    for (int i = 0; i < CHUNKS_B; ++i) {
        const int chunk = lid + i * NT, r = chunk % BN, n = n0 + r;
        b_ok[i] = g >= 0 && n < N;
        b_row[i] = b + ((long)gb * N + (b_ok[i] ? n : 0)) * (long)K;
        b_sf_row[i] = (long)gb * sfb_rows + (b_ok[i] ? n : 0) / gran_n;
        b_k[i] = (chunk / BN) * 16;
        b_dst[i] = b_k[i] * BN + r;
    }

    uint4 a_raw[CHUNKS_A], b_raw[CHUNKS_B];
    float a_sc[CHUNKS_A], b_sc[CHUNKS_B];
#define FETCH(k0)                                                                                         \
    for (int i = 0; i < CHUNKS_A; ++i) {                                                                  \
        a_raw[i] = a_ok[i] ? load_chunk(a_row[i], (k0) + a_k[i], K, aligned) : (uint4)(0u);               \
        a_sc[i] = a_ok[i] ? load_sf(sfa, a_sf_row[i], sf_cols, (k0) / 128, ue8m0) : 0.0f;                 \
    }                                                                                                     \
    for (int i = 0; i < CHUNKS_B; ++i) {                                                                  \
        b_raw[i] = b_ok[i] ? load_chunk(b_row[i], (k0) + b_k[i], K, aligned) : (uint4)(0u);               \
        b_sc[i] = b_ok[i] ? load_sf(sfb, b_sf_row[i], sf_cols, (k0) / 128, ue8m0) : 0.0f;                 \
    }
#define STAGE()                                                                                           \
    for (int i = 0; i < CHUNKS_A; ++i) stage_chunk(a_raw[i], a_sc[i], as + a_dst[i], BM);                 \
    for (int i = 0; i < CHUNKS_B; ++i) stage_chunk(b_raw[i], b_sc[i], bs + b_dst[i], BN);

    const int tx = lid % TX, ty = lid / TX;
    float8 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = (float8)(0.0f);

    FETCH(0)
    STAGE()
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int k0 = 0; k0 < K; k0 += BK) {
        const int more = k0 + BK < K;
        if (more) {
            FETCH(k0 + BK)
        }
        for (int kk = 0; kk < BK; ++kk) {
            const float4 a0 = as4[(kk * BM) / 4 + ty];
            const float4 a1 = as4[(kk * BM + BM / 2) / 4 + ty];
            const float8 bv = (float8)(bs4[(kk * BN) / 4 + tx], bs4[(kk * BN + BN / 2) / 4 + tx]);
            acc[0] = mad((float8)(a0.s0), bv, acc[0]);
            acc[1] = mad((float8)(a0.s1), bv, acc[1]);
            acc[2] = mad((float8)(a0.s2), bv, acc[2]);
            acc[3] = mad((float8)(a0.s3), bv, acc[3]);
            acc[4] = mad((float8)(a1.s0), bv, acc[4]);
            acc[5] = mad((float8)(a1.s1), bv, acc[5]);
            acc[6] = mad((float8)(a1.s2), bv, acc[6]);
            acc[7] = mad((float8)(a1.s3), bv, acc[7]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (more) {
            STAGE()
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    /* ---- epilogue: + C, one rounding to the output dtype; padding rows (-1) get +0.0 ---- */
    for (int i = 0; i < 8; ++i) {
        const int row = m0 + (i < 4 ? ty * 4 + i : BM / 2 + ty * 4 + (i - 4));
        if (row >= rows_valid) continue;
        const int pad = mode == MODE_CONTIGUOUS && (g < 0 || m_index[row] < 0);
        float v[8];
        vstore8(acc[i], 0, v);
        for (int j = 0; j < 8; ++j) {
            const int n = n0 + (j < 4 ? tx * 4 + j : BN / 2 + tx * 4 + (j - 4));
            if (n >= N) continue;
            const long idx = (row_base + row) * (long)N + n;
            float x = pad ? 0.0f : v[j];
            if (has_c) x += c[idx];
            if (out_f32) {
                ((__global float *)out)[idx] = x;
            } else {
                ((__global ushort *)out)[idx] = float_to_bf16(x);
            }
        }
    }
}
