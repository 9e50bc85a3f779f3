/* Flash k-means kernels for the CPU (C with GNU vector extensions; ctypes).
 *
 * squeeze_kmeans_assign: fused GEMM + argmax. For every point x of every group, the index and value
 * of the best score s_k = x·c_k − half_k (fp32 FMAs, sequential over D; ties go to the lowest k).
 * The N×K score matrix is never stored: a register block holds the scores of PV·VL points (in
 * the vector lanes) against NC centroids, and is reduced into a running (best, index) pair per
 * point right after its D loop.
 *   x       fp32 points of group g at x + g·x_gs, rows of D floats
 *   cpack   [G, KB, D, NC] fp32 centroids in panels of NC (padding centroids are zero)
 *   half    [G, KB·NC] fp32 offsets (+inf for padding centroids, so they never win)
 *   labels  int64, best fp32: group g at + g·out_gs
 * A block of PB points is packed transposed ([D][PV·VL] per register block, a VL x VL shuffle
 * transpose) once, then every centroid panel streams past it. Parallel tasks are TB consecutive
 * blocks of one group, so each block prefetches the next while it computes. A pair's score is
 * the same whatever else is in the call (reassign in kernels/assign/ relies on it).
 *
 * squeeze_kmeans_sums: per-cluster fp32 sums of the (weighted) points, their weight totals and
 * counts, in point order (the order of a stable sort by label), parallel over (group, column
 * slice) so that no two threads touch one sum.
 *
 * squeeze_kmeans_pp_keys: one k-means++ round's elementwise work (D² refresh, Gumbel keys).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

#if VL == 16
#define NC 12 /* centroids per register panel */
#else
#define NC 6
#endif
#define PV 2         /* point vectors per register block */
#define MP (PV * VL) /* points per register block */
#define PB 256       /* points per block (a multiple of MP) */
#define TB 8         /* blocks per parallel task (the next one is prefetched) */
#define SW 16        /* columns per task of the sums kernel */

int32_t squeeze_kmeans_info(void) {
    int32_t bits = (1 << DT_F32) | (1 << DT_BF16) | (NC << 8) | (VL << 16);
#ifdef __FLT16_MAX__
    bits |= 1 << DT_F16;
#endif
#ifdef _OPENMP
    bits |= 1 << 24;
#endif
    return bits;
}

/* Masks of the log2(VL) block-swap stages of a VL x VL transpose (__builtin_shuffle indices). */
#if VL == 16
#define LOG2VL 4
static const int32_t TMASK[4][2][16] = {
    {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
     {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
    {{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
     {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}},
    {{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
     {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}},
    {{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
     {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}}};
#elif VL == 8
#define LOG2VL 3
static const int32_t TMASK[3][2][8] = {{{0, 1, 2, 3, 8, 9, 10, 11}, {4, 5, 6, 7, 12, 13, 14, 15}},
                                       {{0, 1, 8, 9, 4, 5, 12, 13}, {2, 3, 10, 11, 6, 7, 14, 15}},
                                       {{0, 8, 2, 10, 4, 12, 6, 14}, {1, 9, 3, 11, 5, 13, 7, 15}}};
#else
#define LOG2VL 2
static const int32_t TMASK[2][2][4] = {{{0, 1, 4, 5}, {2, 3, 6, 7}}, {{0, 4, 2, 6}, {1, 5, 3, 7}}};
#endif

/* dst[j * MP + i] = src[i * ld + j] for a VL x VL block: VL loads, log2(VL)·VL shuffles, VL stores.
 * Stage h swaps the off-diagonal h x h blocks of every 2h x 2h diagonal block. */
static inline void transpose_block(const float *src, int64_t ld, float *dst) {
    vf r[VL];
#pragma GCC unroll 16
    for (int i = 0; i < VL; i++) memcpy(&r[i], src + i * ld, sizeof(vf));
#pragma GCC unroll 4
    for (int s = 0; s < LOG2VL; s++) {
        const int h = VL >> (s + 1);
        vi lo, hi;
        memcpy(&lo, TMASK[s][0], sizeof lo);
        memcpy(&hi, TMASK[s][1], sizeof hi);
#pragma GCC unroll 16
        for (int i = 0; i < VL; i++) {
            if (i & h) continue;
            const vf a = r[i], b = r[i + h];
            r[i] = __builtin_shuffle(a, b, lo);
            r[i + h] = __builtin_shuffle(a, b, hi);
        }
    }
#pragma GCC unroll 16
    for (int j = 0; j < VL; j++) memcpy(dst + j * MP, &r[j], sizeof(vf));
}

/* One micro block transposed: xt[d * MP + i] = x[i * D + d] for the first np points (rows of D
 * floats), zero for the points past np. */
static void pack(const float *x, int64_t np, int64_t D, float *xt) {
    if (np >= MP) {
        const int64_t dv = D - D % VL;
        for (int p = 0; p < PV; p++) {
            for (int64_t d = 0; d < dv; d += VL)
                transpose_block(x + p * VL * D + d, D, xt + d * MP + p * VL);
            for (int64_t i = p * VL; i < (p + 1) * VL; i++)
                for (int64_t d = dv; d < D; d++) xt[d * MP + i] = x[i * D + d];
        }
        return;
    }
    for (int64_t i = 0; i < MP; i++)
        for (int64_t d = 0; d < D; d++) xt[d * MP + i] = i < np ? x[i * D + d] : 0.0f;
}

/* Scores of MP points (xt: [D][MP]) against the first ncx centroids of one panel (cp: [D][NC]),
 * merged into the running best / index of those points. While it runs it prefetches npf lines
 * from pf (the next block of points). Always inlined with a constant ncx (NC, 2NC/3 or NC/3). */
static inline __attribute__((always_inline)) void micro(const float *restrict xt,
                                                        const float *restrict cp, int64_t D,
                                                        const float *restrict half, int32_t k0,
                                                        vf *restrict best, vi *restrict idx,
                                                        const char *pf, int64_t npf,
                                                        const int ncx) {
    vf acc[NC][PV];
    for (int j = 0; j < ncx; j++)
        for (int p = 0; p < PV; p++) acc[j][p] = (vf){0};
    for (int64_t d = 0; d < D; d++) {
        vf xv[PV];
        for (int p = 0; p < PV; p++) xv[p] = *(const vf *)(xt + d * MP + p * VL);
        if (d < npf) __builtin_prefetch(pf + 64 * d, 0, 2);
        for (int j = 0; j < ncx; j++) {
            const float cj = cp[d * NC + j];
            for (int p = 0; p < PV; p++) acc[j][p] += xv[p] * cj;
        }
    }
    for (int p = 0; p < PV; p++) {
        vf b = best[p];
        vi ix = idx[p];
        for (int j = 0; j < ncx; j++) {
            const vf s = acc[j][p] - half[j];
            const vi m = s > b; /* strict: a tie keeps the lower index */
            b = (vf)(((vi)s & m) | ((vi)b & ~m));
            ix = ((k0 + j) & m) | (ix & ~m);
        }
        best[p] = b;
        idx[p] = ix;
    }
}

/* One block of np <= PB points (rows of D floats at xg) against every centroid panel of a group;
 * labels / best of the block written at lab / bst. pf..pf_end: lines to prefetch meanwhile. */
static void assign_block(const float *xg, int64_t np, int64_t D, const float *cg,
                         const float *hg, int64_t KB, int64_t klast, float *xt, vf *best,
                         vi *idx, int64_t *lab, float *bst, const char *pf, const char *pf_end) {
    const int64_t nmb = (np + MP - 1) / MP;
    for (int64_t mb = 0; mb < nmb; mb++)
        pack(xg + mb * MP * D, np - mb * MP, D, xt + mb * D * MP);
    for (int64_t v = 0; v < nmb * PV; v++) {
        best[v] = (vf){0} - INFINITY;
        idx[v] = (vi){0};
    }
    const int64_t calls = KB * nmb;
    const int64_t per = ((pf_end - pf) / 64 + calls - 1) / calls;
    for (int64_t kb = 0; kb < KB; kb++) {
        /* the last panel computes only as many thirds of it as hold real centroids */
        const int64_t cols = kb + 1 < KB ? NC : klast;
        for (int64_t mb = 0; mb < nmb; mb++) {
            const int64_t npf = (pf_end - pf) / 64 < per ? (pf_end - pf) / 64 : per;
            const float *x_mb = xt + mb * D * MP, *cp = cg + kb * D * NC, *h = hg + kb * NC;
            const int32_t k0 = (int32_t)(kb * NC);
            if (cols > 2 * (NC / 3))
                micro(x_mb, cp, D, h, k0, best + mb * PV, idx + mb * PV, pf, npf, NC);
            else if (cols > NC / 3)
                micro(x_mb, cp, D, h, k0, best + mb * PV, idx + mb * PV, pf, npf, 2 * (NC / 3));
            else
                micro(x_mb, cp, D, h, k0, best + mb * PV, idx + mb * PV, pf, npf, NC / 3);
            pf += 64 * npf;
        }
    }
    const float *bf = (const float *)best;
    const int32_t *bi = (const int32_t *)idx;
    for (int64_t i = 0; i < np; i++) {
        lab[i] = bi[i];
        bst[i] = bf[i];
    }
}

/* klast: real centroids in the last panel (1..NC). Returns 0, or -1 when scratch memory could not
 * be allocated. */
int64_t squeeze_kmeans_assign(const float *x, int64_t G, int64_t N, int64_t D, int64_t x_gs,
                              const float *cpack, const float *half, int64_t KB,
                              int64_t klast, int64_t *labels, float *best_out, int64_t out_gs,
                              int32_t num_threads) {
    const int64_t nblk = (N + PB - 1) / PB;
    const int64_t tpg = (nblk + TB - 1) / TB; /* tasks per group */
    const int64_t tasks = G * tpg;
    int nth = num_threads > 0 ? num_threads : 1;
    if (tasks < nth) nth = tasks > 0 ? (int)tasks : 1;
    int failed = 0;
#pragma omp parallel num_threads(nth) reduction(| : failed)
    {
        float *xt = aligned_alloc(64, (size_t)(PB * D * sizeof(float) + 64));
        vf *best = aligned_alloc(64, (PB / VL) * sizeof(vf));
        vi *idx = aligned_alloc(64, (PB / VL) * sizeof(vi));
        if (!xt || !best || !idx) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (!xt || !best || !idx) continue;
            const int64_t g = t / tpg;
            const int64_t b1 = (t % tpg + 1) * TB < nblk ? (t % tpg + 1) * TB : nblk;
            for (int64_t b = (t % tpg) * TB; b < b1; b++) {
                const int64_t n0 = b * PB, np = N - n0 < PB ? N - n0 : PB;
                const float *xg = x + g * x_gs + n0 * D;
                /* prefetch the task's next block into L2 while this one computes */
                const char *pf = (const char *)(xg + np * D), *pf_end = pf;
                if (b + 1 < b1)
                    pf_end = (const char *)(xg + (N - n0 < 2 * PB ? N - n0 : 2 * PB) * D);
                assign_block(xg, np, D, cpack + g * KB * D * NC, half + g * KB * NC, KB, klast,
                             xt, best, idx, labels + g * out_gs + n0, best_out + g * out_gs + n0,
                             pf, pf_end);
            }
        }
        free(xt);
        free(best);
        free(idx);
    }
    return failed ? -1 : 0;
}

static inline float load_elem(const void *base, int dt, int64_t i) {
    if (dt == DT_F32) return ((const float *)base)[i];
    if (dt == DT_BF16) {
        const uint32_t u = (uint32_t)((const uint16_t *)base)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
#ifdef __FLT16_MAX__
    return (float)((const _Float16 *)base)[i];
#else
    return NAN;
#endif
}

/* sums [G, K, D] fp32 = Σ w'·x over each cluster's members, in point order, where w' = w, or 1 for
 * every member of a cluster whose weights sum to 0 (and for all points when w is NULL);
 * totals [G, K] = Σ w' (the counts when w is NULL); counts [G, K] int64.
 * Returns 0, -1 for an unsupported dtype or no memory, -2 for a label outside [0, K). */
int64_t squeeze_kmeans_sums(const void *x, int32_t dtype, int64_t G, int64_t N, int64_t D,
                            const int64_t *labels, const float *w, int64_t K, float *sums,
                            float *totals, int64_t *counts, int32_t num_threads) {
#ifndef __FLT16_MAX__
    if (dtype == DT_F16) return -1;
#endif
    if (dtype < DT_F32 || dtype > DT_F16) return -1;
    for (int64_t i = 0; i < G * N; i++)
        if (labels[i] < 0 || labels[i] >= K) return -2;
    const int64_t ns = (D + SW - 1) / SW;
    const int64_t tasks = G * ns;
    int nth = num_threads > 0 ? num_threads : 1;
    if (tasks < nth) nth = (int)tasks;
    int failed = 0;
#pragma omp parallel num_threads(nth) reduction(| : failed)
    {
        float *tot = w ? malloc((size_t)K * sizeof(float)) : NULL;
        if (w && !tot) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < tasks; t++) {
            if (w && !tot) continue;
            const int64_t g = t / ns, d0 = (t % ns) * SW;
            const int64_t d1 = d0 + SW < D ? d0 + SW : D;
            const int64_t *lab = labels + g * N;
            const float *wg = w ? w + g * N : NULL;
            float *sg = sums + g * K * D;
            for (int64_t k = 0; k < K; k++)
                for (int64_t d = d0; d < d1; d++) sg[k * D + d] = 0.0f;
            if (wg) {
                for (int64_t k = 0; k < K; k++) tot[k] = 0.0f;
                for (int64_t n = 0; n < N; n++) tot[lab[n]] += wg[n];
            }
            for (int64_t n = 0; n < N; n++) {
                const int64_t k = lab[n];
                float *s = sg + k * D;
                const int64_t base = (g * N + n) * D;
                if (wg && tot[k] > 0.0f) {
                    const float wn = wg[n];
                    if (dtype == DT_F32) {
                        const float *xr = (const float *)x + base;
                        for (int64_t d = d0; d < d1; d++) s[d] += xr[d] * wn;
                    } else {
                        for (int64_t d = d0; d < d1; d++) s[d] += load_elem(x, dtype, base + d) * wn;
                    }
                } else if (dtype == DT_F32) {
                    const float *xr = (const float *)x + base;
                    for (int64_t d = d0; d < d1; d++) s[d] += xr[d];
                } else {
                    for (int64_t d = d0; d < d1; d++) s[d] += load_elem(x, dtype, base + d);
                }
            }
            if (d0 == 0) { /* one task per group writes the counts and totals */
                int64_t *cg = counts + g * K;
                float *tg = totals + g * K;
                for (int64_t k = 0; k < K; k++) cg[k] = 0;
                for (int64_t n = 0; n < N; n++) cg[lab[n]]++;
                for (int64_t k = 0; k < K; k++)
                    tg[k] = (wg && tot[k] > 0.0f) ? tot[k] : (float)cg[k];
            }
        }
        free(tot);
    }
    return failed ? -1 : 0;
}

/* One k-means++ round, elementwise over n = G·N points (the torch reference's ops, fused):
 *   when best != NULL:  near = max((−2·best + x_sq) + off, 0);  d2 = first ? near : min(d2, near)
 *   keys = (best ? log(d2) : 0) + (logw ? logw : 0) − log(−log(u))   (Gumbel keys for the draw) */
void squeeze_kmeans_pp_keys(const float *best, const float *x_sq, float off, float *d2,
                            int32_t first, const float *u, const float *logw, float *keys,
                            int64_t n, int32_t num_threads) {
    int nth = num_threads > 0 ? num_threads : 1;
    if (n < 65536) nth = 1;
#pragma omp parallel for num_threads(nth) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float key = 0.0f;
        if (best) {
            float t = -2.0f * best[i];
            t = t + x_sq[i];
            t = t + off;
            const float near = t < 0.0f ? 0.0f : t;
            d2[i] = first ? near : (d2[i] < near ? d2[i] : near);
            key = logf(d2[i]);
        }
        if (logw) key = key + logw[i];
        keys[i] = key - logf(-logf(u[i]));
    }
}
