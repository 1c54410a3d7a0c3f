/* MLA decode over a paged KV cache (bf16 or fp16 in, fp32 math), split-KV + log-sum-exp combine.
 * OpenCL C 1.2; no subgroups, no half arithmetic; reductions through local memory and barriers.
 *
 * Compile-time constants (-D):
 *   D_QK, D_V   head dims (K uses all D_QK channels, V the first D_V)
 *   ROWS        query rows per work-group (a multiple of 8); a row is (query token j, head in group)
 *   TN          KV tokens per tile; TS = TN / 2 token slots, each thread takes tokens ts and ts + TS
 *   IS_HALF     1: float16 inputs/outputs (vload_half / vstore_half_rte); 0: bfloat16 (ushort bits)
 *   COMBINE_THREADS  work-group size of mla_decode_combine
 *
 * mla_decode_split: one work-group per (piece, KV head, row tile); a piece is a token range
 * [tok_begin, tok_end) of one request (from the split-KV plan). Work-group of RG * TS threads,
 * RG = ROWS / 8. QK: thread (rg, ts) computes 8 rows x 2 tokens against Q^T staged in local memory;
 * online softmax in base 2 (Q is pre-scaled by softmax_scale * log2(e)); PV: thread (rg, dg) owns
 * 8 rows x DV_T dims of the output. Writes the piece's normalised output and natural-log LSE
 * (-inf and zeros when no token of the piece is visible to the row).
 * Tokens at or past tok_end are never read, so neither are cache slots past the sequence length
 * nor block-table slots past the request's last page.
 */

#define RPT 8
#define TPT 2
#define RG (ROWS / RPT)
#define TS (TN / TPT)
#define NTHREADS (RG * TS)
#define DV_T ((D_V + TS - 1) / TS)
#define RED_PARTS (NTHREADS / ROWS)
#define RED_SPAN (TN / RED_PARTS)
#define LN2 0.693147180559945309f

#if IS_HALF
#define LOAD1(p, i) vload_half(0, (__global const half *)((p) + (i)))
#define LOAD8(p, i) vload_half8(0, (__global const half *)((p) + (i)))
#else
#define LOAD1(p, i) bf16_to_float((p)[i])
#if D_QK % 8 == 0
/* 8 bf16 at a 16-byte aligned address (every K/V row starts at a multiple of D_QK elements and the
 * offsets used are multiples of 8): one 128-bit load, then shifts. Little-endian: element 2j is the
 * low half of word j. */
inline float8 bf16x8_load(__global const ushort *p) {
    const uint4 w = *(__global const uint4 *)p;
    return (float8)(as_float(w.s0 << 16), as_float(w.s0 & 0xffff0000u), as_float(w.s1 << 16),
                    as_float(w.s1 & 0xffff0000u), as_float(w.s2 << 16), as_float(w.s2 & 0xffff0000u),
                    as_float(w.s3 << 16), as_float(w.s3 & 0xffff0000u));
}
#else
inline float8 bf16x8_load(__global const ushort *p) {
    return as_float8(convert_uint8(vload8(0, p)) << (uint8)(16u));
}
#endif
#define LOAD8(p, i) bf16x8_load((p) + (i))
#endif

/* 8 consecutive floats of a float4-typed local array (x a multiple of 4): two 128-bit local loads. */
#define LOCAL8(arr4, x) ((float8)((arr4)[(x) / 4], (arr4)[(x) / 4 + 1]))

__kernel __attribute__((reqd_work_group_size(NTHREADS, 1, 1)))
void mla_decode_split(__global const ushort *q,         /* [b, s_q, h_q, D_QK] contiguous */
                      __global const ushort *kv,        /* [num_blocks, page, h_kv, D_QK] contiguous */
                      __global const int *block_table,  /* [b, max_blocks] */
                      __global const int *seqlens,      /* [b] */
                      __global const int4 *pieces,      /* (request, tok_begin, tok_end, acc_row) */
                      __global float *o_acc,            /* [acc_rows, h_q * s_q, D_V] */
                      __global float *lse_acc,          /* [acc_rows, h_q * s_q] */
                      int s_q, int h_q, int h_kv, int page, int max_blocks, int causal, int row_tiles,
                      float scale_log2) {
    /* float4-typed where rows of 8 are read as vectors (16-byte alignment the compiler can see) */
    __local float4 q_t4[D_QK * ROWS / 4];  /* Q^T: q_t[d * ROWS + r], pre-scaled */
    __local float4 p_s4[TN * ROWS / 4];    /* logits, then probabilities: p_s[t * ROWS + r] */
    __local float4 alpha4[ROWS / 4];
    __local long tok_off[TN];              /* element offset of each tile token's K row */
    __local float red[RED_PARTS * ROWS];
    __local float m_s[ROWS], l_s[ROWS], msub_s[ROWS];
    __local float *q_t = (__local float *)q_t4;
    __local float *p_s = (__local float *)p_s4;
    __local float *alpha_s = (__local float *)alpha4;

    const int lid = (int)get_local_id(0);
    const int4 piece = pieces[get_group_id(0)];
    const int req = piece.x, tok_begin = piece.y, tok_end = piece.z, acc_row = piece.w;
    const int kvh = (int)get_group_id(1) / row_tiles;
    const int row0 = ((int)get_group_id(1) % row_tiles) * ROWS;
    const int group = h_q / h_kv;
    const int rows_total = s_q * group;
    const int len = seqlens[req];
    const long kv_stride_tok = (long)h_kv * D_QK;

    for (int i = lid; i < ROWS * D_QK; i += NTHREADS) {
        const int r = i / D_QK, d = i % D_QK, row = row0 + r;
        float v = 0.0f;
        if (row < rows_total) {
            const int j = row / group, head = kvh * group + row % group;
            v = LOAD1(q, ((long)(req * s_q + j) * h_q + head) * D_QK + d) * scale_log2;
        }
        q_t[d * ROWS + r] = v;
    }
    if (lid < ROWS) {
        m_s[lid] = -INFINITY;
        l_s[lid] = 0.0f;
    }

    const int rg = lid / TS, ts = lid % TS;
    /* causal: row r (query token j) sees tokens t <= len - s_q + j */
    int last_visible[RPT];
    for (int r = 0; r < RPT; ++r) {
        const int row = row0 + rg * RPT + r;
        last_visible[r] = row >= rows_total ? -1 : (causal ? len - s_q + row / group : len - 1);
    }
    float8 o[DV_T];
    for (int dd = 0; dd < DV_T; ++dd) o[dd] = (float8)(0.0f);

    for (int tile = tok_begin; tile < tok_end; tile += TN) {
        const int n_valid = min(TN, tok_end - tile);
        for (int t = lid; t < TN; t += NTHREADS) {
            long off = 0;
            if (t < n_valid) {
                const int tok = tile + t;
                const int blk = block_table[(long)req * max_blocks + tok / page];
                off = ((long)blk * page + tok % page) * kv_stride_tok + (long)kvh * D_QK;
            }
            tok_off[t] = off;
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        /* ---- QK: 8 rows x 2 tokens per thread ---- */
        float8 s[TPT];
        bool valid[TPT];
        __global const ushort *krow[TPT];
        for (int u = 0; u < TPT; ++u) {
            s[u] = (float8)(0.0f);
            valid[u] = ts + u * TS < n_valid;
            krow[u] = kv + tok_off[ts + u * TS];
        }
        int d = 0;
        for (; d + 8 <= D_QK; d += 8) {
            float8 k[TPT];
            for (int u = 0; u < TPT; ++u) k[u] = valid[u] ? LOAD8(krow[u], d) : (float8)(0.0f);
            const int qd = d * ROWS + rg * RPT;
            float8 qv;
            qv = LOCAL8(q_t4, qd + 0 * ROWS); for (int u = 0; u < TPT; ++u) s[u] = mad(qv, (float8)(k[u].s0), s[u]);
            qv = LOCAL8(q_t4, qd + 1 * ROWS); for (int u = 0; u < TPT; ++u) s[u] = mad(qv, (float8)(k[u].s1), s[u]);
            qv = LOCAL8(q_t4, qd + 2 * ROWS); for (int u = 0; u < TPT; ++u) s[u] = mad(qv, (float8)(k[u].s2), s[u]);
            qv = LOCAL8(q_t4, qd + 3 * ROWS); for (int u = 0; u < TPT; ++u) s[u] = mad(qv, (float8)(k[u].s3), s[u]);
            qv = LOCAL8(q_t4, qd + 4 * ROWS); for (int u = 0; u < TPT; ++u) s[u] = mad(qv, (float8)(k[u].s4), s[u]);
            qv = LOCAL8(q_t4, qd + 5 * ROWS); for (int u = 0; u < TPT; ++u) s[u] = mad(qv, (float8)(k[u].s5), s[u]);
            qv = LOCAL8(q_t4, qd + 6 * ROWS); for (int u = 0; u < TPT; ++u) s[u] = mad(qv, (float8)(k[u].s6), s[u]);
            qv = LOCAL8(q_t4, qd + 7 * ROWS); for (int u = 0; u < TPT; ++u) s[u] = mad(qv, (float8)(k[u].s7), s[u]);
        }
        for (; d < D_QK; ++d) {
            const float8 qv = LOCAL8(q_t4, d * ROWS + rg * RPT);
            for (int u = 0; u < TPT; ++u) {
                const float k1 = valid[u] ? LOAD1(krow[u], d) : 0.0f;
                s[u] = mad(qv, (float8)(k1), s[u]);
            }
        }
        for (int u = 0; u < TPT; ++u) {
            const int t = ts + u * TS, tok = tile + t;
            float sv[RPT];
            vstore8(s[u], 0, sv);
            for (int r = 0; r < RPT; ++r) {
                sv[r] = (valid[u] && tok <= last_visible[r]) ? sv[r] : -INFINITY;
            }
            p_s4[(t * ROWS + rg * RPT) / 4] = vload4(0, sv);
            p_s4[(t * ROWS + rg * RPT) / 4 + 1] = vload4(1, sv);
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        /* ---- online softmax: tile max, rescale factor, probabilities and their sums ---- */
        const int part = lid / ROWS, pr = lid % ROWS;
        float mx = -INFINITY;
        for (int t = part * RED_SPAN; t < (part + 1) * RED_SPAN; ++t) mx = fmax(mx, p_s[t * ROWS + pr]);
        red[part * ROWS + pr] = mx;
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid < ROWS) {
            float m_new = m_s[lid];
            for (int p = 0; p < RED_PARTS; ++p) m_new = fmax(m_new, red[p * ROWS + lid]);
            const float m_use = m_new == -INFINITY ? 0.0f : m_new;  /* nothing visible yet: exp2(-inf) = 0 */
            alpha_s[lid] = exp2(m_s[lid] - m_use);
            msub_s[lid] = m_use;
            m_s[lid] = m_new;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        float sum = 0.0f;
        const float msub = msub_s[pr];
        for (int t = part * RED_SPAN; t < (part + 1) * RED_SPAN; ++t) {
            const float pv = exp2(p_s[t * ROWS + pr] - msub);
            p_s[t * ROWS + pr] = pv;
            sum += pv;
        }
        red[part * ROWS + pr] = sum;
        barrier(CLK_LOCAL_MEM_FENCE);
        if (lid < ROWS) {
            float total = 0.0f;
            for (int p = 0; p < RED_PARTS; ++p) total += red[p * ROWS + lid];
            l_s[lid] = l_s[lid] * alpha_s[lid] + total;
        }

        /* ---- PV: 8 rows x DV_T dims per thread (dims dg * DV_T ...) ---- */
        const float8 alpha = LOCAL8(alpha4, rg * RPT);
        for (int dd = 0; dd < DV_T; ++dd) o[dd] *= alpha;
        const int dv0 = ts * DV_T;
        if (dv0 < D_V) {
            for (int t = 0; t < n_valid; ++t) {
                const float8 pv = LOCAL8(p_s4, t * ROWS + rg * RPT);
                __global const ushort *vrow = kv + tok_off[t] + dv0;
#if DV_T == 8 && D_V % 8 == 0
                const float8 v = LOAD8(vrow, 0);
                o[0] = mad(pv, (float8)(v.s0), o[0]);
                o[1] = mad(pv, (float8)(v.s1), o[1]);
                o[2] = mad(pv, (float8)(v.s2), o[2]);
                o[3] = mad(pv, (float8)(v.s3), o[3]);
                o[4] = mad(pv, (float8)(v.s4), o[4]);
                o[5] = mad(pv, (float8)(v.s5), o[5]);
                o[6] = mad(pv, (float8)(v.s6), o[6]);
                o[7] = mad(pv, (float8)(v.s7), o[7]);
#else
                for (int dd = 0; dd < DV_T; ++dd) {
                    if (dv0 + dd < D_V) o[dd] = mad(pv, (float8)(LOAD1(vrow, dd)), o[dd]);
                }
#endif
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    /* ---- this piece's normalised output and LSE (natural log) ---- */
    const int dv0 = ts * DV_T;
    for (int r = 0; r < RPT; ++r) {
        const int row = row0 + rg * RPT + r;
        if (row >= rows_total) break;
        const int j = row / group, head = kvh * group + row % group;
        const long slot = (long)acc_row * h_q * s_q + (long)head * s_q + j;
        const float l = l_s[rg * RPT + r];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        float ov[RPT];
        for (int dd = 0; dd < DV_T; ++dd) {
            if (dv0 + dd < D_V) {
                vstore8(o[dd], 0, ov);
                o_acc[slot * D_V + dv0 + dd] = ov[r] * inv;
            }
        }
        if (ts == 0) {
            lse_acc[slot] = l > 0.0f ? (m_s[rg * RPT + r] + log2(l)) * LN2 : -INFINITY;
        }
    }
}

/* One work-group per (request, query head, query token): merge the request's pieces by their LSEs.
 * out = sum_p w_p o_p / sum_p w_p with w_p = exp(lse_p - max lse); lse = max + log(sum w_p).
 * A row no piece saw (all lse_p = -inf) gets out = 0 and lse = +inf. */
__kernel __attribute__((reqd_work_group_size(COMBINE_THREADS, 1, 1)))
void mla_decode_combine(__global const float *o_acc, __global const float *lse_acc,
                        __global const int *num_splits,  /* [b + 1] first acc row of each request */
                        __global ushort *out,            /* [b, s_q, h_q, D_V] */
                        __global float *lse,             /* [b, h_q, s_q] */
                        int s_q, int h_q) {
    const int hs = h_q * s_q;
    const int req = (int)get_group_id(0) / hs, hj = (int)get_group_id(0) % hs;
    const int head = hj / s_q, j = hj % s_q;
    const int first = num_splits[req], count = num_splits[req + 1] - first;
    float lmax = -INFINITY;
    for (int p = 0; p < count; ++p) lmax = fmax(lmax, lse_acc[(long)(first + p) * hs + hj]);
    float wsum = 0.0f;
    if (lmax != -INFINITY) {
        for (int p = 0; p < count; ++p) wsum += exp(lse_acc[(long)(first + p) * hs + hj] - lmax);
    }
    const long out_row = ((long)(req * s_q + j) * h_q + head) * D_V;
    for (int d = (int)get_local_id(0); d < D_V; d += COMBINE_THREADS) {
        float acc = 0.0f;
        if (lmax != -INFINITY) {
            for (int p = 0; p < count; ++p) {
                const long slot = (long)(first + p) * hs + hj;
                const float w = exp(lse_acc[slot] - lmax);
                if (w > 0.0f) acc += w * o_acc[slot * D_V + d];
            }
            acc /= wsum;
        }
#if IS_HALF
        vstore_half_rte(acc, 0, (__global half *)(out + out_row + d));
#else
        out[out_row + d] = float_to_bf16(acc);
#endif
    }
    if (get_local_id(0) == 0) {
        lse[(long)req * hs + hj] = lmax == -INFINITY ? INFINITY : lmax + log(wsum);
    }
}
