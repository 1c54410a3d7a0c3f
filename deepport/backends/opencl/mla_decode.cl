/* MLA decode over a paged KV cache (bf16 or fp16 in, fp32 math), split-KV + log-sum-exp combine.
 * OpenCL C 1.2; no subgroups, no half arithmetic; reductions through local memory and barriers.
 *
 * Two split kernels (one is compiled per program: MLA_STAGED selects), one combine kernel. Both split
 * kernels run one work-group per (piece, KV head, row tile); a piece is a token range
 * [tok_begin, tok_end) of one request (from the split-KV plan); a row is (query token j, head in group).
 * Both do the online softmax in base 2 (Q is pre-scaled by softmax_scale * log2(e)), write the piece's
 * normalised output and natural-log LSE (-inf and zeros when no token of the piece is visible to the
 * row), and never read tokens at or past tok_end, so neither cache slots past the sequence length nor
 * block-table slots past the request's last page.
 *
 * Compile-time constants (-D), common:
 *   D_QK, D_V   head dims (K uses all D_QK channels, V the first D_V)
 *   IS_HALF     1: float16 inputs/outputs (vload_half / vstore_half_rte); 0: bfloat16 (ushort bits)
 *   COMBINE_THREADS  work-group size of mla_decode_combine
 *
 * mla_decode_split (row-wise; MLA_STAGED undefined), -D ROWS (a multiple of 8), TN (tokens per tile):
 * work-group of RG * TS threads, RG = ROWS / 8, TS = TN / 2. QK: thread (rg, ts) computes 8 rows x 2
 * tokens (ts and ts + TS), walking each token's whole K row from global memory against Q^T staged in
 * local memory (one warp's load touches 32 rows: uncoalesced); PV: thread (rg, dg) owns 8 rows x DV_T
 * dims of the output. Any D_QK, D_V.
 *
 * mla_decode_split_staged (MLA_STAGED=1), -D ROWS, NTHREADS, DC, RPT, TPT, PRPT: built for coalesced,
 * wide, many-in-flight KV reads. Envelope: D_QK % 8 == 0 (16-byte K loads), D_V % 4 == 0 (8-byte V
 * loads); the host picks the row-wise kernel outside it. Per tile of TN = (NTHREADS / (ROWS / RPT)) * TPT
 * tokens:
 *   QK, DC channels at a time: the chunk's TN x DC K elements are loaded as 16-byte pieces, consecutive
 *     work-items taking consecutive pieces of the same token row (DC * 2 contiguous bytes per row),
 *     LPT pieces per work-item, all issued before any is used; the next chunk's pieces are issued
 *     before the current chunk's FMAs (register prefetch). Pieces are staged raw in local memory (rows
 *     padded by 16 bytes: no bank conflicts when lanes read different tokens) next to the chunk of Q^T
 *     (converted, pre-scaled). Work-item (rg, tl) accumulates RPT rows x TPT tokens (tl + u * TL) of
 *     logits in registers across all chunks: per 8 channels, TPT 16-byte local loads of K (converted
 *     once per work-item that reads them) and RPT / 4 broadcast float4 loads of Q per channel.
 *   Softmax: the logits go to local memory (reusing the K staging buffer), shared with the row-wise
 *     kernel (online_softmax_tile).
 *   PV: work-item (pg, dl) owns PRPT rows x DVT dims (dl * DVT ...) of the output, reading each token's
 *     V slice from global memory (consecutive work-items read consecutive 8-byte pieces of the row,
 *     which the QK phase has just brought into the caches) and the probabilities from local memory.
 * Two barriers per chunk and four per tile.
 */

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

/* The parameters of both split kernels (the host passes the same arguments to either). */
#define SPLIT_PARAMS                                                                              \
    __global const ushort *q,         /* [b, s_q, h_q, D_QK] contiguous */                        \
    __global const ushort *kv,        /* [num_blocks, page, h_kv, D_QK] contiguous */             \
    __global const int *block_table,  /* [b, max_blocks] */                                      \
    __global const int *seqlens,      /* [b] */                                                   \
    __global const int4 *pieces,      /* (request, tok_begin, tok_end, acc_row) */                \
    __global float *o_acc,            /* [acc_rows, h_q * s_q, D_V] */                            \
    __global float *lse_acc,          /* [acc_rows, h_q * s_q] */                                 \
    int s_q, int h_q, int h_kv, int page, int max_blocks, int causal, int row_tiles, float scale_log2

/* Both split kernels: the work-group's piece (request, token range, accumulator row), KV head and first
 * query row, from the group id (piece, KV head * row_tiles + row tile). */
#define SPLIT_PROLOGUE                                                                            \
    const int lid = (int)get_local_id(0);                                                         \
    const int4 piece = pieces[get_group_id(0)];                                                   \
    const int req = piece.x, tok_begin = piece.y, tok_end = piece.z, acc_row = piece.w;           \
    const int kvh = (int)get_group_id(1) / row_tiles;                                             \
    const int row0 = ((int)get_group_id(1) % row_tiles) * ROWS;                                   \
    const int group = h_q / h_kv;                                                                 \
    const int rows_total = s_q * group;                                                           \
    const int len = seqlens[req];                                                                 \
    const long kv_stride_tok = (long)h_kv * D_QK;

/* tok_off[t] = element offset of the K row of token tile + t (one KV head's slice: head_off) through the
 * request's block table, for t < n_valid; 0 for t in [n_valid, tn) (never dereferenced). Every work-item
 * of the group calls it: it ends with the barrier that publishes tok_off. */
inline void tile_offsets(__local long *tok_off, int lid, int nthreads, int tn, int tile, int n_valid,
                         __global const int *table_row, int page, long kv_stride_tok, long head_off) {
    for (int t = lid; t < tn; t += nthreads) {
        long off = 0;
        if (t < n_valid) {
            const int tok = tile + t;
            off = ((long)table_row[tok / page] * page + tok % page) * kv_stride_tok + head_off;
        }
        tok_off[t] = off;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
}

/* One tile's online-softmax step, for every row at once (all work-items of the group call it; it holds
 * barriers). p_s[t * rows + r] holds the tile's base-2 logits (-inf where not visible) and becomes
 * exp2(logit - m), m the running max including this tile (0 while nothing is visible, so exp2(-inf) = 0);
 * alpha_s[r] = exp2(m_old - m) rescales what came before; l_s[r] = l_s[r] * alpha_s[r] + sum of the
 * tile's probabilities. Work-item lid reduces tokens [part * span, (part + 1) * span) of row
 * lid % rows (part = lid / rows < parts, parts * span = the tile's tokens). Ends after the barrier
 * that publishes alpha_s and p_s; l_s is written after it (read only after a later barrier). */
inline void online_softmax_tile(__local float *p_s, __local float *red, __local float *m_s, __local float *l_s,
                                __local float *alpha_s, __local float *msub_s, int lid, int rows, int parts,
                                int span) {
    const int part = lid / rows, pr = lid % rows;
    float mx = -INFINITY;
    for (int t = part * span; t < (part + 1) * span; ++t) mx = fmax(mx, p_s[t * rows + pr]);
    red[part * rows + pr] = mx;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid < rows) {
        float m_new = m_s[lid];
        for (int p = 0; p < parts; ++p) m_new = fmax(m_new, red[p * rows + lid]);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;  /* nothing visible yet: exp2(-inf) = 0 */
        alpha_s[lid] = exp2(m_s[lid] - m_use);
        msub_s[lid] = m_use;
        m_s[lid] = m_new;
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    float sum = 0.0f;
    const float msub = msub_s[pr];
    for (int t = part * span; t < (part + 1) * span; ++t) {
        const float pv = exp2(p_s[t * rows + pr] - msub);
        p_s[t * rows + pr] = pv;
        sum += pv;
    }
    red[part * rows + pr] = sum;
    barrier(CLK_LOCAL_MEM_FENCE);
    if (lid < rows) {
        float total = 0.0f;
        for (int p = 0; p < parts; ++p) total += red[p * rows + lid];
        l_s[lid] = l_s[lid] * alpha_s[lid] + total;
    }
}

#ifndef MLA_STAGED
#define RPT 8
#define TPT 2
#define RG (ROWS / RPT)
#define TS (TN / TPT)
#define NTHREADS (RG * TS)
#define DV_T ((D_V + TS - 1) / TS)
#define RED_PARTS (NTHREADS / ROWS)
#define RED_SPAN (TN / RED_PARTS)

__kernel __attribute__((reqd_work_group_size(NTHREADS, 1, 1)))
void mla_decode_split(SPLIT_PARAMS) {
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

    SPLIT_PROLOGUE

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
        tile_offsets(tok_off, lid, NTHREADS, TN, tile, n_valid, block_table + (long)req * max_blocks, page,
                     kv_stride_tok, (long)kvh * D_QK);

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
        online_softmax_tile(p_s, red, m_s, l_s, alpha_s, msub_s, lid, ROWS, RED_PARTS, RED_SPAN);

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
    /* An empty piece ran no tile: without this barrier, work-items of other warps could read m_s / l_s
     * before work-items 0 .. ROWS - 1 initialised them. */
    barrier(CLK_LOCAL_MEM_FENCE);
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
#else /* MLA_STAGED */
#define RG (ROWS / RPT)                 /* QK row groups */
#define TL (NTHREADS / RG)              /* QK token lanes */
#define TN (TL * TPT)                   /* tokens per tile */
#define PG (ROWS / PRPT)                /* PV row groups */
#define DL (NTHREADS / PG)              /* PV dim lanes */
#define DVT ((((D_V + DL - 1) / DL) + 3) / 4 * 4)  /* PV dims per work-item, a multiple of 4 */
#define DV4 (DVT / 4)
#define RPT4 (RPT / 4)
#define PRPT4 (PRPT / 4)
#define CP (DC / 8)                     /* 16-byte pieces of one token's chunk */
#define KROW (CP + 1)                   /* uint4 per staged token row: the chunk and 16 bytes of padding */
#define NCHUNK ((D_QK + DC - 1) / DC)
#define NPIECE (TN * CP)
#define LPT ((NPIECE + NTHREADS - 1) / NTHREADS)  /* 16-byte loads per work-item per chunk */
#define KBUF4 (TN * KROW)
#define PBUF4 (TN * ROWS / 4)
#define BUF4 (KBUF4 > PBUF4 ? KBUF4 : PBUF4)
#define RED_PARTS (NTHREADS / ROWS)
#define RED_SPAN (TN / RED_PARTS)

#if IS_HALF
inline float8 kv8_local(__local const uint4 *p) {
    return vload_half8(0, (__local const half *)p);
}
inline float4 kv4_global(__global const ushort *p) {
    return vload_half4(0, (__global const half *)p);
}
#else
/* 8 bf16 (little-endian: element 2j is the low half of word j) from 16 staged bytes */
inline float8 kv8_local(__local const uint4 *p) {
    const uint4 w = *p;
    return (float8)(as_float(w.s0 << 16), as_float(w.s0 & 0xffff0000u), as_float(w.s1 << 16),
                    as_float(w.s1 & 0xffff0000u), as_float(w.s2 << 16), as_float(w.s2 & 0xffff0000u),
                    as_float(w.s3 << 16), as_float(w.s3 & 0xffff0000u));
}
/* 4 bf16 at an 8-byte aligned address: one 64-bit load */
inline float4 kv4_global(__global const ushort *p) {
    const uint2 w = *(__global const uint2 *)p;
    return (float4)(as_float(w.s0 << 16), as_float(w.s0 & 0xffff0000u), as_float(w.s1 << 16),
                    as_float(w.s1 & 0xffff0000u));
}
#endif

/* chunk d0 of the tile's K rows into pf: piece i = lid + l * NTHREADS is token i / CP, bytes
 * 16 * (i % CP) of the chunk; zeros past the piece's tokens and past D_QK */
#define LOAD_CHUNK(d0)                                                                            \
    for (int l = 0; l < LPT; ++l) {                                                               \
        const int i = lid + l * NTHREADS, t = i / CP, pc = i % CP;                                \
        pf[l] = (i < NPIECE && t < n_valid && (d0) + pc * 8 < D_QK)                               \
                    ? *(__global const uint4 *)(kv + tok_off[t] + (d0) + pc * 8) : (uint4)(0u);   \
    }

/* channel e of the 8 in the current 16-byte piece: RPT rows of Q (broadcast) x TPT tokens */
#define QK_STEP(e, comp)                                                                          \
    {                                                                                             \
        float4 qv[RPT4];                                                                          \
        for (int i4 = 0; i4 < RPT4; ++i4) qv[i4] = q_c4[(qd + (e) * ROWS) / 4 + i4];              \
        for (int u = 0; u < TPT; ++u)                                                             \
            for (int i4 = 0; i4 < RPT4; ++i4) s[u][i4] = mad(qv[i4], (float4)(k[u].comp), s[u][i4]); \
    }

/* PV: token t's V slice (dims dv0 ... dv0 + DVT) from global memory, then its FMAs into o */
#define PV_LOAD(v, t)                                                                             \
    {                                                                                             \
        __global const ushort *vrow = kv + tok_off[t] + dv0;                                      \
        for (int j = 0; j < DV4; ++j) v[j] = dv0 + 4 * j < D_V ? kv4_global(vrow + 4 * j) : (float4)(0.0f); \
    }
#define PV_FMA(v, t)                                                                              \
    for (int i4 = 0; i4 < PRPT4; ++i4) {                                                          \
        const float4 p = p_s4[((t) * ROWS + pg * PRPT) / 4 + i4];                                 \
        for (int j = 0; j < DV4; ++j) {                                                           \
            o[4 * i4 + 0][j] = mad((float4)(p.x), v[j], o[4 * i4 + 0][j]);                        \
            o[4 * i4 + 1][j] = mad((float4)(p.y), v[j], o[4 * i4 + 1][j]);                        \
            o[4 * i4 + 2][j] = mad((float4)(p.z), v[j], o[4 * i4 + 2][j]);                        \
            o[4 * i4 + 3][j] = mad((float4)(p.w), v[j], o[4 * i4 + 3][j]);                        \
        }                                                                                         \
    }

__kernel __attribute__((reqd_work_group_size(NTHREADS, 1, 1)))
void mla_decode_split_staged(SPLIT_PARAMS) {
    __local uint4 buf[BUF4];              /* K chunk k[t * KROW + piece] during QK; then p_s[t * ROWS + r] */
    __local float4 q_c4[DC * ROWS / 4];   /* Q chunk transposed, pre-scaled: q_c[d * ROWS + r] */
    __local long tok_off[TN];             /* element offset of each tile token's K row */
    __local float red[RED_PARTS * ROWS];
    __local float4 alpha4[ROWS / 4];
    __local float m_s[ROWS], l_s[ROWS], msub_s[ROWS];
    __local int last_s[ROWS];             /* last visible token of each row (-1: padding row) */
    __local long q_off[ROWS];             /* element offset of each row's Q vector (-1: padding row) */
    __local float *q_c = (__local float *)q_c4;
    __local float4 *p_s4 = (__local float4 *)buf;
    __local float *p_s = (__local float *)buf;
    __local float *alpha_s = (__local float *)alpha4;

    SPLIT_PROLOGUE

    if (lid < ROWS) {
        const int row = row0 + lid;
        m_s[lid] = -INFINITY;
        l_s[lid] = 0.0f;
        /* causal: row r (query token j) sees tokens t <= len - s_q + j */
        last_s[lid] = row >= rows_total ? -1 : (causal ? len - s_q + row / group : len - 1);
        q_off[lid] = row >= rows_total ? -1 : ((long)(req * s_q + row / group) * h_q + kvh * group + row % group) * D_QK;
    }
    const int rg = lid / TL, tl = lid % TL;  /* QK: rows rg * RPT + i, tokens tl + u * TL */
    const int pg = lid / DL, dl = lid % DL;  /* PV: rows pg * PRPT + i, dims dv0 + d */
    const int dv0 = dl * DVT;
    float4 o[PRPT][DV4];
    for (int i = 0; i < PRPT; ++i)
        for (int j = 0; j < DV4; ++j) o[i][j] = (float4)(0.0f);

    for (int tile = tok_begin; tile < tok_end; tile += TN) {
        const int n_valid = min(TN, tok_end - tile);
        tile_offsets(tok_off, lid, NTHREADS, TN, tile, n_valid, block_table + (long)req * max_blocks, page,
                     kv_stride_tok, (long)kvh * D_QK);

        /* ---- QK: chunk by chunk of DC channels, logits accumulated in registers ---- */
        uint4 pf[LPT];
        LOAD_CHUNK(0)
        float4 s[TPT][RPT4];
        for (int u = 0; u < TPT; ++u)
            for (int i4 = 0; i4 < RPT4; ++i4) s[u][i4] = (float4)(0.0f);
        for (int c = 0; c < NCHUNK; ++c) {
            const int d0 = c * DC;
            for (int l = 0; l < LPT; ++l) {
                const int i = lid + l * NTHREADS;
                if (i < NPIECE) buf[(i / CP) * KROW + i % CP] = pf[l];
            }
            for (int i = lid; i < ROWS * DC; i += NTHREADS) {
                const int d = i / ROWS, r = i % ROWS;  /* consecutive work-items: consecutive rows (banks) */
                const long qo = q_off[r];
                q_c[d * ROWS + r] = (qo >= 0 && d0 + d < D_QK) ? LOAD1(q, qo + d0 + d) * scale_log2 : 0.0f;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            if (c + 1 < NCHUNK) {
                LOAD_CHUNK(d0 + DC)  /* in flight while this chunk's FMAs run */
            }
            for (int pc = 0; pc < CP; ++pc) {
                float8 k[TPT];
                for (int u = 0; u < TPT; ++u) k[u] = kv8_local(&buf[(tl + u * TL) * KROW + pc]);
                const int qd = pc * 8 * ROWS + rg * RPT;
                QK_STEP(0, s0) QK_STEP(1, s1) QK_STEP(2, s2) QK_STEP(3, s3)
                QK_STEP(4, s4) QK_STEP(5, s5) QK_STEP(6, s6) QK_STEP(7, s7)
            }
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        /* the staged chunk is dead: its memory now holds the tile's logits */
        for (int u = 0; u < TPT; ++u) {
            const int t = tl + u * TL, tok = tile + t;
            const bool valid = t < n_valid;
            for (int i4 = 0; i4 < RPT4; ++i4) {
                const int r = rg * RPT + 4 * i4;
                float4 v = s[u][i4];
                v.x = (valid && tok <= last_s[r + 0]) ? v.x : -INFINITY;
                v.y = (valid && tok <= last_s[r + 1]) ? v.y : -INFINITY;
                v.z = (valid && tok <= last_s[r + 2]) ? v.z : -INFINITY;
                v.w = (valid && tok <= last_s[r + 3]) ? v.w : -INFINITY;
                p_s4[(t * ROWS + r) / 4] = v;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);

        /* ---- online softmax: tile max, rescale factor, probabilities and their sums ---- */
        online_softmax_tile(p_s, red, m_s, l_s, alpha_s, msub_s, lid, ROWS, RED_PARTS, RED_SPAN);

        /* ---- PV: PRPT rows x DVT dims per work-item; V rows read from global, coalesced along d ---- */
        for (int i = 0; i < PRPT; ++i) {
            const float a = alpha_s[pg * PRPT + i];
            for (int j = 0; j < DV4; ++j) o[i][j] *= a;
        }
        if (dv0 < D_V) {
            int t = 0;
            for (; t + 4 <= n_valid; t += 4) {  /* four tokens' V loads in flight before their FMAs */
                float4 v0[DV4], v1[DV4], v2[DV4], v3[DV4];
                PV_LOAD(v0, t) PV_LOAD(v1, t + 1) PV_LOAD(v2, t + 2) PV_LOAD(v3, t + 3)
                PV_FMA(v0, t) PV_FMA(v1, t + 1) PV_FMA(v2, t + 2) PV_FMA(v3, t + 3)
            }
            for (; t < n_valid; ++t) {
                float4 v0[DV4];
                PV_LOAD(v0, t)
                PV_FMA(v0, t)
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }

    /* ---- this piece's normalised output and LSE (natural log) ---- */
    /* An empty piece ran no tile: without this barrier, work-items of other warps could read m_s / l_s
     * before work-items 0 .. ROWS - 1 initialised them. */
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int i = 0; i < PRPT; ++i) {
        const int r = pg * PRPT + i, row = row0 + r;
        if (row >= rows_total) break;
        const int j = row / group, head = kvh * group + row % group;
        const long slot = (long)acc_row * h_q * s_q + (long)head * s_q + j;
        const float l = l_s[r];
        const float inv = l > 0.0f ? 1.0f / l : 0.0f;
        for (int jj = 0; jj < DV4; ++jj) {
            if (dv0 + 4 * jj < D_V) vstore4(o[i][jj] * inv, 0, o_acc + slot * D_V + dv0 + 4 * jj);
        }
        if (dl == 0) {
            lse_acc[slot] = l > 0.0f ? (m_s[r] + log2(l)) * LN2 : -INFINITY;
        }
    }
}
#endif /* MLA_STAGED */

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
