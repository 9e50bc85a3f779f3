/* Sparse attention over token segments, for CPU decode (C with GNU vector extensions; ctypes).
 *
 * q       [B*Hkv, R, D] fp32, already multiplied by the softmax scale
 * k, v    [Hkv, N, D]   fp32, bf16 or fp16 (DT_* in simd.h), contiguous, read in place
 * seg_ptr [B*Hkv + 1]   CSR offsets into seg_start / seg_end ([start, end) token ranges of k[h])
 * out     [B*Hkv, R, D] fp32;  lse [B*Hkv, R] fp32 (natural log; -inf where a head has no keys)
 * prior_out [B*Hkv, R, D], prior_lse [B*Hkv, R] fp32, or both NULL: a partial attention of the
 *         same rows over other keys (lse -inf: none; its out is then not read), merged into
 *         out and lse (a decode step's context part, merged as its tail is attended). They
 *         must not alias out / lse.
 * D must be a multiple of VL (16 floats with AVX-512, 8 with AVX, else 4).
 *
 * Flash-decoding split: each (b, h)'s selected tokens are cut into chunks of about equal token
 * count; the chunks run in parallel (OpenMP, dynamic schedule), each with an online softmax over
 * tiles of TILE keys (scores of all R rows, then exp, then V accumulated in registers), and a
 * second pass merges the chunks of each (b, h) by their log-sum-exp. The bounds it relies on
 * are checked once per call, O(B*Hkv + S): seg_ptr rising from 0 to S (n_seg), and
 * 0 <= start <= end <= N for every segment (the caller checks them too).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

/* DT_BF16P: bf16 read as pairs, one 32-bit load giving the even elements (<< 16) and the odd
 * ones (& 0xffff0000) of 2 * VL columns; q and the accumulators then hold each 2 * VL block
 * in that order (evens, then odds), and the final merge restores the natural order. */
enum { DT_BF16P = 3 };
#define TILE 16
#define RB 4 /* query rows per register block */
#define ALIGN16(n) (((n) + 15) & ~(int64_t)15)

typedef struct {
    int64_t bh, seg, off, ntok; /* the chunk starts `off` tokens into segment `seg` */
} chunk_t;

/* VL consecutive K/V elements as fp32. fp32 and bf16 are one vector load (bf16: widened by a
 * shift); a copy through a stack array instead kept every load waiting on a store (7x slower on
 * an fp32 call). */
static inline vf load_kv(const void *base, int dt, int64_t i) {
    if (dt == DT_F32) return load_f32((const float *)base + i);
    if (dt == DT_BF16) return load_bf16((const uint16_t *)base + i);
    float t[VL];
#ifdef __FLT16_MAX__
    const _Float16 *p = (const _Float16 *)base + i;
    for (int l = 0; l < VL; l++) t[l] = (float)p[l];
#else
    memset(t, 0, sizeof t); /* unreachable: fp16 is refused without _Float16 (info bits) */
#endif
    vf x;
    memcpy(&x, t, sizeof x);
    return x;
}

static inline void load_bf16_pairs(const void *base, int64_t i, vf *even, vf *odd) {
    vu x;
    memcpy(&x, (const uint16_t *)base + i, sizeof x);
    *even = (vf)(x << 16);
    *odd = (vf)(x & 0xffff0000u);
}

static inline float hsum(vf x) {
#if __has_builtin(__builtin_shufflevector) && VL == 16
    typedef float vf8 __attribute__((vector_size(32)));
    typedef float vf4 __attribute__((vector_size(16)));
    const vf8 a = __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7) +
                  __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15);
    const vf4 b =
        __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
#else
    float t[VL];
    memcpy(t, &x, sizeof t);
    for (int w = VL / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) t[l] += t[l + w];
    return t[0];
#endif
}

/* exp(x) for x <= 0 (Cephes polynomial, ~1 ulp), branch-free so that loops over it vectorize. */
static inline float exp_le0(float x) {
    const float xc = x < -87.0f ? -87.0f : x;
    const float t = xc * 1.44269504088896341f + 12582912.0f; /* round to nearest via 1.5 * 2^23 */
    const float n = t - 12582912.0f;
    const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23;
    float pow2n;
    memcpy(&pow2n, &bits, sizeof pow2n);
    return x < -87.0f ? 0.0f : p * pow2n;
}

/* Next tile of up to TILE element offsets (row * D into k / v), advancing the cursor. */
static inline int fill_tile(const int64_t *ss, const int64_t *se, int64_t hN, int64_t D,
                            int64_t *seg, int64_t *off, int64_t *left, int64_t *rows) {
    int nt = 0;
    while (nt < TILE && *left > 0) {
        const int64_t len = se[*seg] - ss[*seg] - *off;
        if (len <= 0) {
            (*seg)++;
            *off = 0;
            continue;
        }
        int64_t take = TILE - nt;
        if (take > len) take = len;
        if (take > *left) take = *left;
        const int64_t t0 = (hN + ss[*seg] + *off) * D;
        for (int64_t i = 0; i < take; i++) rows[nt + i] = t0 + i * D;
        nt += (int)take;
        *off += take;
        *left -= take;
    }
    return nt;
}

/* Scores s[r, j] = q_r . k_j for rows [r0, r0 + NB) and the tile's keys. */
static inline __attribute__((always_inline)) void tile_scores(
    const float *restrict q, const void *k, int dt, const int64_t *rows, int nt, int64_t r0,
    const int NB, const int64_t D, float *restrict s) {
    for (int j = 0; j < nt; j++) {
        vf a[RB];
        for (int b = 0; b < NB; b++) a[b] = (vf){0};
        if (dt == DT_BF16P) {
            for (int64_t c = 0; c < D; c += 2 * VL) {
                vf ke, ko;
                load_bf16_pairs(k, rows[j] + c, &ke, &ko);
                for (int b = 0; b < NB; b++) {
                    const float *qb = q + (r0 + b) * D + c;
                    a[b] += load_f32(qb) * ke + load_f32(qb + VL) * ko;
                }
            }
        } else {
            for (int64_t c = 0; c < D; c += VL) {
                const vf kv = load_kv(k, dt, rows[j] + c);
                for (int b = 0; b < NB; b++) a[b] += load_f32(q + (r0 + b) * D + c) * kv;
            }
        }
        for (int b = 0; b < NB; b++) s[(r0 + b) * TILE + j] = hsum(a[b]);
    }
}

/* acc[r] += sum_j p[r, j] v_j for rows [r0, r0 + NB), accumulating VL columns in registers. */
static inline __attribute__((always_inline)) void tile_values(
    const void *v, int dt, const int64_t *rows, int nt, int64_t r0, const int NB, const int64_t D,
    const float *restrict p, float *restrict acc) {
    if (dt == DT_BF16P) {
        for (int64_t c = 0; c < D; c += 2 * VL) {
            vf ae[RB], ao[RB];
            for (int b = 0; b < NB; b++) {
                ae[b] = load_f32(acc + (r0 + b) * D + c);
                ao[b] = load_f32(acc + (r0 + b) * D + c + VL);
            }
            for (int j = 0; j < nt; j++) {
                vf ve, vo;
                load_bf16_pairs(v, rows[j] + c, &ve, &vo);
                for (int b = 0; b < NB; b++) {
                    const float pj = p[(r0 + b) * TILE + j];
                    ae[b] += pj * ve;
                    ao[b] += pj * vo;
                }
            }
            for (int b = 0; b < NB; b++) {
                store_f32(acc + (r0 + b) * D + c, ae[b]);
                store_f32(acc + (r0 + b) * D + c + VL, ao[b]);
            }
        }
        return;
    }
    for (int64_t c = 0; c < D; c += VL) {
        vf a[RB];
        for (int b = 0; b < NB; b++) a[b] = load_f32(acc + (r0 + b) * D + c);
        for (int j = 0; j < nt; j++) {
            const vf vv = load_kv(v, dt, rows[j] + c);
            for (int b = 0; b < NB; b++) a[b] += p[(r0 + b) * TILE + j] * vv;
        }
        for (int b = 0; b < NB; b++) store_f32(acc + (r0 + b) * D + c, a[b]);
    }
}

/* One chunk: online softmax over its tokens into (m, l, acc) for all R rows. */
static inline __attribute__((always_inline)) void run_chunk_impl(
    const chunk_t *c, const float *restrict q, const void *k, const void *v, const int dt,
    const int64_t *ss, const int64_t *se, int64_t hN, int64_t R, const int64_t D,
    float *restrict m_out, float *restrict l_out, float *restrict acc, float *restrict s) {
    /* running max / sum live in this thread's scratch (partials of neighbouring chunks share cache
       lines with other threads), the accumulator in the chunk's own partial */
    float *restrict m = s + R * TILE, *restrict l = m + R;
    int64_t rows[TILE];
    int64_t seg = c->seg, off = c->off, left = c->ntok;
    for (int64_t r = 0; r < R; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, (size_t)(R * D) * sizeof(float));

    /* a second cursor runs one tile ahead and prefetches every line of its K/V rows: selected
       segments are short, so the hardware prefetchers alone keep too few misses in flight */
    int64_t prow[TILE], pseg = seg, poff = off, pleft = left;
    const int64_t row_bytes = D * (dt == DT_F32 ? 4 : 2), esz = row_bytes / D;
    fill_tile(ss, se, hN, D, &pseg, &poff, &pleft, prow);
    int nt;
    while ((nt = fill_tile(ss, se, hN, D, &seg, &off, &left, rows)) > 0) {
        const int np = fill_tile(ss, se, hN, D, &pseg, &poff, &pleft, prow);
        for (int j = 0; j < np; j++) {
            const char *pk = (const char *)k + prow[j] * esz, *pv = (const char *)v + prow[j] * esz;
            for (int64_t b = 0; b < row_bytes; b += 64) {
                __builtin_prefetch(pk + b, 0, 3);
                __builtin_prefetch(pv + b, 0, 3);
            }
        }
        int64_t r0 = 0;
        for (; r0 + RB <= R; r0 += RB) tile_scores(q, k, dt, rows, nt, r0, RB, D, s);
        for (; r0 < R; r0++) tile_scores(q, k, dt, rows, nt, r0, 1, D, s);

        for (int64_t r = 0; r < R; r++) { /* online softmax: s becomes p = exp(s - m) */
            float *restrict sr = s + r * TILE;
            for (int j = nt; j < TILE; j++) sr[j] = -INFINITY;
            float mt = -INFINITY;
            for (int j = 0; j < TILE; j++) mt = sr[j] > mt ? sr[j] : mt;
            if (mt > m[r]) { /* new running max: rescale what was accumulated so far */
                const float alpha = exp_le0(m[r] - mt);
                l[r] *= alpha;
                float *restrict ar = acc + r * D;
                for (int64_t d = 0; d < D; d++) ar[d] *= alpha;
                m[r] = mt;
            }
            const float mr = m[r];
            if (mr == -INFINITY) { /* every score so far is -inf: no mass */
                for (int j = 0; j < TILE; j++) sr[j] = 0.0f;
                continue;
            }
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < TILE; j++) {
                const float pj = exp_le0(sr[j] - mr);
                sr[j] = pj;
                sum += pj;
            }
            l[r] += sum;
        }

        r0 = 0;
        for (; r0 + RB <= R; r0 += RB) tile_values(v, dt, rows, nt, r0, RB, D, s, acc);
        for (; r0 < R; r0++) tile_values(v, dt, rows, nt, r0, 1, D, s, acc);
    }
    memcpy(m_out, m, (size_t)R * sizeof(float));
    memcpy(l_out, l, (size_t)R * sizeof(float));
}

/* Specialise the common head sizes and each dtype, so that the inner loops are straight-line. */
typedef void (*chunk_fn)(const chunk_t *, const float *, const void *, const void *,
                         const int64_t *, const int64_t *, int64_t, int64_t, int64_t, float *,
                         float *, float *, float *);
#define RUN_CHUNK(NAME, DC, DT)                                                                    \
    static void NAME(const chunk_t *c, const float *q, const void *k, const void *v,              \
                     const int64_t *ss, const int64_t *se, int64_t hN, int64_t R, int64_t D,      \
                     float *m, float *l, float *acc, float *s) {                                  \
        run_chunk_impl(c, q, k, v, DT, ss, se, hN, R, (DC) ? (DC) : D, m, l, acc, s);             \
    }
RUN_CHUNK(run_f32_d64, 64, DT_F32)
RUN_CHUNK(run_f32_d128, 128, DT_F32)
RUN_CHUNK(run_f32_dn, 0, DT_F32)
RUN_CHUNK(run_bf16_d64, 64, DT_BF16)
RUN_CHUNK(run_bf16_d128, 128, DT_BF16)
RUN_CHUNK(run_bf16_dn, 0, DT_BF16)
RUN_CHUNK(run_bf16p_d64, 64, DT_BF16P)
RUN_CHUNK(run_bf16p_d128, 128, DT_BF16P)
RUN_CHUNK(run_bf16p_dn, 0, DT_BF16P)
#ifdef __FLT16_MAX__
RUN_CHUNK(run_f16_d64, 64, DT_F16)
RUN_CHUNK(run_f16_d128, 128, DT_F16)
RUN_CHUNK(run_f16_dn, 0, DT_F16)
#endif

static chunk_fn pick_chunk_fn(int dt, int64_t D) {
    static const chunk_fn f32[3] = {run_f32_d64, run_f32_d128, run_f32_dn};
    static const chunk_fn bf16[3] = {run_bf16_d64, run_bf16_d128, run_bf16_dn};
    static const chunk_fn bf16p[3] = {run_bf16p_d64, run_bf16p_d128, run_bf16p_dn};
#ifdef __FLT16_MAX__
    static const chunk_fn f16[3] = {run_f16_d64, run_f16_d128, run_f16_dn};
#endif
    const int di = D == 64 ? 0 : D == 128 ? 1 : 2;
    switch (dt) {
    case DT_F32: return f32[di];
    case DT_BF16: return bf16[di];
    case DT_BF16P: return bf16p[di];
#ifdef __FLT16_MAX__
    case DT_F16: return f16[di];
#endif
    default: return 0;
    }
}

/* 1 when the segments stay inside k[h] / v[h] and the CSR inside the segment arrays. */
static int segments_in_bounds(const int64_t *ptr, const int64_t *ss, const int64_t *se,
                              int64_t BH, int64_t S, int64_t N) {
    if (BH < 0 || S < 0 || N < 0 || ptr[0] != 0 || ptr[BH] != S) return 0;
    for (int64_t i = 0; i < BH; i++)
        if (ptr[i + 1] < ptr[i]) return 0;
    for (int64_t s = 0; s < S; s++)
        if (ss[s] < 0 || se[s] < ss[s] || se[s] > N) return 0;
    return 1;
}

static int64_t seg_tokens(const int64_t *ss, const int64_t *se, int64_t a, int64_t b) {
    int64_t t = 0;
    for (int64_t i = a; i < b; i++) t += se[i] - ss[i];
    return t;
}

/* Bits 0-2: KV dtypes supported (DT_*); bit 8: built with OpenMP; bits 16+: VL (D % VL == 0). */
int32_t squeeze_sparse_attention_info(void) {
    int32_t bits = (1 << DT_F32) | (1 << DT_BF16) | (VL << 16);
#ifdef __FLT16_MAX__
    bits |= 1 << DT_F16;
#endif
#ifdef _OPENMP
    bits |= 1 << 8;
#endif
    return bits;
}

/* Returns 0 on success, -1 for an unsupported dtype or head size, -2 for segments out of
 * bounds, or a positive number: the scratch size (in floats) needed; the caller then grows
 * `scratch` and calls again. */
int64_t squeeze_sparse_attention(const float *q, const void *k, const void *v, int32_t kv_dtype,
                                 const int64_t *seg_ptr, const int64_t *seg_start,
                                 const int64_t *seg_end, int64_t B, int64_t Hkv, int64_t N,
                                 int64_t R, int64_t D, float *out, float *lse, float *scratch,
                                 int64_t scratch_floats, int32_t num_threads, int64_t min_chunk,
                                 int64_t n_seg, int64_t serial_bytes, const float *prior_out,
                                 const float *prior_lse) {
    if (kv_dtype < 0 || kv_dtype > DT_F16 || D <= 0 || D % VL != 0 || R < 0) return -1;
    if (!segments_in_bounds(seg_ptr, seg_start, seg_end, B * Hkv, n_seg, N)) return -2;
    const int pairs = kv_dtype == DT_BF16 && D % (2 * VL) == 0 &&
                      __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__; /* even element = low half */
    const chunk_fn run = pick_chunk_fn(pairs ? DT_BF16P : kv_dtype, D);
    if (run == 0) return -1;
    const int64_t BH = B * Hkv;
    int nth = num_threads > 0 ? num_threads : 1;
    if (min_chunk < 1) min_chunk = 1;

    /* plan: chunks of about T / (4 * threads) tokens, never under min_chunk, cut per (b, h) */
    const int64_t total = seg_tokens(seg_start, seg_end, seg_ptr[0], seg_ptr[BH]);
    int64_t target = (total + 4 * nth - 1) / (4 * nth);
    if (target < min_chunk) target = min_chunk;
    int64_t nchunks = 0;
    for (int64_t bh = 0; bh < BH; bh++) {
        const int64_t t = seg_tokens(seg_start, seg_end, seg_ptr[bh], seg_ptr[bh + 1]);
        nchunks += (t + target - 1) / target;
    }
    if (nchunks < nth) nth = nchunks > 0 ? (int)nchunks : 1; /* don't wake idle threads */
    /* nor for a call this small: waking a sleeping OpenMP worker (passive waiting) costs about
       75 us on a 2-core VM, more than reading serial_bytes of K/V on one core */
    if (total * D * (kv_dtype == DT_F32 ? 8 : 4) < serial_bytes) nth = 1;
    const int64_t chunk_floats = ALIGN16(nchunks * (int64_t)(sizeof(chunk_t) / sizeof(float)));
    const int64_t cptr_floats = ALIGN16((BH + 1) * 2);
    const int64_t part_floats = ALIGN16(nchunks * R * (D + 2));
    const int64_t work_floats = ALIGN16(R * TILE + 2 * R + D) + 16; /* + 16: no shared lines */
    const int64_t qperm_floats = pairs ? ALIGN16(BH * R * D) : 0;
    const int64_t need =
        chunk_floats + cptr_floats + part_floats + nth * work_floats + qperm_floats;
    if (need > scratch_floats) return need;

    chunk_t *chunks = (chunk_t *)scratch;
    int64_t *cptr = (int64_t *)(scratch + chunk_floats);
    float *part_m = scratch + chunk_floats + cptr_floats;
    float *part_l = part_m + nchunks * R;
    float *part_acc = part_l + nchunks * R;
    float *work = scratch + chunk_floats + cptr_floats + part_floats;
    float *qperm = work + nth * work_floats;
    if (pairs) { /* q in pair order: each 2 * VL block as its even, then its odd columns */
        for (int64_t row = 0; row < BH * R; row++)
            for (int64_t c = 0; c < D; c += 2 * VL)
                for (int l = 0; l < VL; l++) {
                    qperm[row * D + c + l] = q[row * D + c + 2 * l];
                    qperm[row * D + c + VL + l] = q[row * D + c + 2 * l + 1];
                }
        q = qperm;
    }

    int64_t nc = 0;
    for (int64_t bh = 0; bh < BH; bh++) {
        cptr[bh] = nc;
        const int64_t t = seg_tokens(seg_start, seg_end, seg_ptr[bh], seg_ptr[bh + 1]);
        const int64_t pieces = (t + target - 1) / target;
        int64_t seg = seg_ptr[bh], off = 0, done = 0;
        for (int64_t i = 0; i < pieces; i++) {
            const int64_t upto = t * (i + 1) / pieces;
            while (seg_start[seg] + off >= seg_end[seg]) { /* skip exhausted / empty segments */
                seg++;
                off = 0;
            }
            chunks[nc++] = (chunk_t){bh, seg, off, upto - done};
            for (int64_t adv = upto - done; adv > 0;) { /* move the cursor past the chunk */
                const int64_t len = seg_end[seg] - seg_start[seg] - off;
                if (adv < len) {
                    off += adv;
                    adv = 0;
                } else {
                    adv -= len;
                    seg++;
                    off = 0;
                }
            }
            done = upto;
        }
    }
    cptr[BH] = nc;

#pragma omp parallel num_threads(nth)
    {
#ifdef _OPENMP
        float *my_work = work + (int64_t)omp_get_thread_num() * work_floats;
#else
        float *my_work = work;
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t i = 0; i < nchunks; i++) {
            const chunk_t *c = &chunks[i];
            run(c, q + c->bh * R * D, k, v, seg_start, seg_end, (c->bh % Hkv) * N, R, D,
                part_m + i * R, part_l + i * R, part_acc + i * R * D, my_work);
        }
        /* merge the chunks of each (b, h) by their log-sum-exp */
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < BH; bh++) {
            for (int64_t r = 0; r < R; r++) {
                float *dst = out + (bh * R + r) * D;
                float *o = pairs ? my_work + R * TILE + 2 * R : dst;
                const float pl = prior_lse ? prior_lse[bh * R + r] : -INFINITY;
                float mx = pl;
                for (int64_t i = cptr[bh]; i < cptr[bh + 1]; i++)
                    mx = part_m[i * R + r] > mx ? part_m[i * R + r] : mx;
                memset(o, 0, (size_t)D * sizeof(float));
                if (mx == -INFINITY) { /* no keys: out 0, lse -inf */
                    memset(dst, 0, (size_t)D * sizeof(float));
                    lse[bh * R + r] = -INFINITY;
                    continue;
                }
                float denom = 0.0f;
                for (int64_t i = cptr[bh]; i < cptr[bh + 1]; i++) {
                    const float w = exp_le0(part_m[i * R + r] - mx);
                    const float *a = part_acc + (i * R + r) * D;
                    denom += w * part_l[i * R + r];
                    for (int64_t d = 0; d < D; d++) o[d] += w * a[d];
                }
                if (pairs) /* back to natural column order */
                    for (int64_t c = 0; c < D; c += 2 * VL)
                        for (int l = 0; l < VL; l++) {
                            dst[c + 2 * l] = o[c + l];
                            dst[c + 2 * l + 1] = o[c + VL + l];
                        }
                if (pl > -INFINITY) { /* the prior's normalised output weighs exp(pl - mx) */
                    const float w = exp_le0(pl - mx);
                    const float *a = prior_out + (bh * R + r) * D;
                    denom += w;
                    for (int64_t d = 0; d < D; d++) dst[d] += w * a[d];
                }
                const float inv = 1.0f / denom;
                for (int64_t d = 0; d < D; d++) dst[d] *= inv;
                lse[bh * R + r] = mx + logf(denom);
            }
        }
    }
    return 0;
}
