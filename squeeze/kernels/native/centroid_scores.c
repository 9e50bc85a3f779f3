/* Centroid log-scores over runs of clusters, for CPU decode lookup (C with GNU vector extensions;
 * ctypes). The PyTorch reference is squeeze/kernels/centroid_scores/reference.py.
 *
 * q        [BH, G*M, D] fp32 query rows (row g*M + m), not scaled: each (b, h) copies its rows
 *                       times `scale` into scratch, zero rows up to Rp (a multiple of RB), and
 *                       with a spread one more column, |q|^2 * scale^2 (Dq = D + 1; else D)
 * cp       [Hkv, Kp/VL, D, VL] centroids packed VL to a block, centroid k in lane k % VL of
 *                       block k / VL (Kp = K rounded up to VL; padding lanes are never read
 *                       back): one vector FMA scores VL centroids, no horizontal sums. Element
 *                       type c_dtype: DT_F32, or DT_BF16 (uint16 lanes, widened to fp32 on
 *                       load); the products and sums are fp32 either way
 * sp       [Hkv, Kp]    fp32 per-cluster spread (sigma^2/2, zero padding), or NULL: each logit
 *                       gains q[D] * sp[k] = scale^2 * |q|^2 * spread
 * lc       [Hkv, K]     fp32 log cluster sizes (-inf: empty, adds nothing, scores -inf)
 * run_ptr  [BH + 1]     CSR offsets into run_start / run_end: the cluster ranges scored for bh
 * extra    [BH, G*M]    fp32 log mass added to each row's denominator, or NULL
 * out      [BH, K]      fp32: per cluster, the mean over the M rows (log of the mean weight) of
 *                       each head's log weight estimate, reduced over the G heads (max, or log
 *                       of the mean); -inf for clusters outside the runs
 * rows     [BH, M, K]   fp32 or NULL: each row's own scores, reduced over the G heads but not
 *                       over the M rows (the caller fills it with -inf first; only the scored,
 *                       non-empty clusters are written)
 * scratch  at least threads * ((Rp + G) * Kp + Rp * Dq) floats
 *
 * Only the clusters inside the runs are read: with a hierarchical index the runs are the
 * level-2 children of the kept level-1 clusters, so pruned centroids are never touched.
 * Any D (the SIMD lanes run over centroids, not dimensions). The bounds it relies on are checked once per call, O(BH + runs):
 * run_ptr rising from 0 to n_runs, 0 <= run_start <= run_end <= K, 1 <= G*M <= MAX_ROWS (den[]
 * is on the stack). Returns 0, -1 for a bad size or element type, -2 for runs out of bounds, or
 * the scratch floats needed when too few were given.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

#define RB 4          /* query rows per register block */
#define MAX_ROWS 4096 /* most packed query rows per (batch row, KV head) */

/* 1 when every run stays inside the K clusters and the CSR inside the run arrays. */
static int runs_in_bounds(const int64_t *ptr, const int64_t *rs, const int64_t *re, int64_t BH,
                          int64_t n_runs, int64_t K) {
    if (BH < 0 || n_runs < 0 || ptr[0] != 0 || ptr[BH] != n_runs) return 0;
    for (int64_t i = 0; i < BH; i++)
        if (ptr[i + 1] < ptr[i]) return 0;
    for (int64_t s = 0; s < n_runs; s++)
        if (rs[s] < 0 || re[s] < rs[s] || re[s] > K) return 0;
    return 1;
}

/* lane by lane, in order (not a tree: this kernel's sums keep their order) */
static inline float hsum(vf x) {
    float s = 0.f;
    for (int l = 0; l < VL; l++) s += x[l];
    return s;
}

/* log(exp(a) + exp(b)) with -inf handled */
static inline float logaddexpf_(float a, float b) {
    if (a == -INFINITY) return b;
    if (b == -INFINITY) return a;
    const float m = a > b ? a : b;
    return m + log1pf(expf(-fabsf(a - b)));
}

/* logits of the RB rows at q0 (row stride Dq) against the VL centroids of each of the NB (1 or 2,
 * a constant at every call) adjacent packed blocks at cb (and their spreads sb, or NULL), into l0
 * (row stride Kp). Two blocks give eight independent accumulators, which keep both FMA pipes
 * busy where four leave them waiting on each other's latency (a question block's lookup scores
 * dozens of rows per head). */
static inline __attribute__((always_inline)) void block_logits(const float *q0, int64_t Dq,
                                                               const void *cb, const float *sb,
                                                               int64_t D, const int bf16,
                                                               const int NB, float *l0,
                                                               int64_t Kp) {
    vf a[2][RB] = {{{0}}};
    for (int64_t d = 0; d < D; d++)
        for (int j = 0; j < NB; j++) {
            const vf v = load_vf(cb, j * D * VL + d * VL, bf16);
            for (int r = 0; r < RB; r++) a[j][r] += q0[r * Dq + d] * v;
        }
    if (sb)
        for (int j = 0; j < NB; j++) {
            const vf v = load_f32(sb + j * VL);
            for (int r = 0; r < RB; r++) a[j][r] += q0[r * Dq + D] * v;
        }
    for (int j = 0; j < NB; j++)
        for (int r = 0; r < RB; r++) store_f32(l0 + r * Kp + j * VL, a[j][r]);
}

/* Bits 0-2: centroid element types read (DT_*); bits 16+: VL. */
int32_t squeeze_centroid_scores_info(void) { return (1 << DT_F32) | (1 << DT_BF16) | (VL << 16); }

int64_t squeeze_centroid_scores(const float *q, float scale, const void *cp, int32_t c_dtype,
                                const float *sp,
                                const float *lc, const int64_t *run_ptr, const int64_t *run_start,
                                const int64_t *run_end, const float *extra, int64_t BH,
                                int64_t Hkv, int64_t K, int64_t G, int64_t M, int64_t D,
                                int32_t reduce_mean, float *out, float *rows, float *scratch,
                                int64_t scratch_floats, int32_t threads, int64_t n_runs) {
    if (D <= 0 || G < 1 || M < 1 || G * M > MAX_ROWS || K < 0 || Hkv < 1)
        return -1;
    if (c_dtype != DT_F32 && c_dtype != DT_BF16) return -1;
    if (!runs_in_bounds(run_ptr, run_start, run_end, BH, n_runs, K)) return -2;
    const int64_t R = G * M, Rp = (R + RB - 1) / RB * RB, Kp = (K + VL - 1) / VL * VL;
    const int64_t Dq = D + (sp != NULL), esize = c_dtype == DT_BF16 ? 2 : 4;
    const int64_t per_thread = (Rp + G) * Kp + Rp * Dq;
    if (threads < 1) threads = 1;
    if (threads > BH) threads = (int32_t)(BH > 0 ? BH : 1);
    if (scratch_floats < (int64_t)threads * per_thread) return (int64_t)threads * per_thread;
    const float neg_inf = -INFINITY;
    const float log_m = logf((float)M), log_g = logf((float)G);

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t bh = 0; bh < BH; bh++) {
#ifdef _OPENMP
        float *lg = scratch + (int64_t)omp_get_thread_num() * per_thread; /* [Rp, Kp] logits */
#else
        float *lg = scratch;
#endif
        float *gsum = lg + Rp * Kp; /* [G, Kp]: Σ_m exp(score) per head, for M > 1 */
        const int64_t h = bh % Hkv;
        float *qb = gsum + G * Kp; /* [Rp, Dq]: the scaled rows, the spread column, zero rows */
        scale_rows(q + bh * R * D, R, Rp, D, Dq, scale, qb);
        const char *ch = (const char *)cp + h * Kp * D * esize;
        const float *sh = sp ? sp + h * Kp : NULL;
        const float *lch = lc + h * K;
        float *o = out + bh * K;
        for (int64_t k = 0; k < K; k++) o[k] = neg_inf;

        /* logits of the blocks that hold scored clusters (a block shared by two runs is scored
         * twice, with the same result); RB rows at a time, VL centroids per vector */
        for (int64_t s = run_ptr[bh]; s < run_ptr[bh + 1]; s++) {
            for (int64_t blk = run_start[s] / VL; blk * VL < run_end[s];) {
                const int two = (blk + 1) * VL < run_end[s]; /* the next block is in the run too */
                const void *cb = ch + blk * D * VL * esize;
                const float *sb = sh ? sh + blk * VL : NULL;
                for (int64_t r0 = 0; r0 < Rp; r0 += RB) {
                    const float *q0 = qb + r0 * Dq;
                    float *l0 = lg + r0 * Kp + blk * VL;
                    if (two && c_dtype == DT_BF16) block_logits(q0, Dq, cb, sb, D, 1, 2, l0, Kp);
                    else if (two) block_logits(q0, Dq, cb, sb, D, 0, 2, l0, Kp);
                    else if (c_dtype == DT_BF16) block_logits(q0, Dq, cb, sb, D, 1, 1, l0, Kp);
                    else block_logits(q0, Dq, cb, sb, D, 0, 1, l0, Kp);
                }
                blk += two ? 2 : 1;
            }
        }
        float den[R > 0 ? R : 1];
        for (int64_t r = 0; r < R; r++) den[r] = extra ? extra[bh * R + r] : neg_inf;
        /* log Σ_k exp(x_k), x = logit + log size: max first, then a vectorised sum of exp(x - max);
         * the -inf of empty clusters gives exp = 0 */
        for (int64_t r = 0; r < R; r++) {
            float *row = lg + r * Kp;
            float mx = den[r];
            vf vmx = vsplat(neg_inf);
            for (int64_t s = run_ptr[bh]; s < run_ptr[bh + 1]; s++) {
                int64_t k = run_start[s];
                for (; k + VL <= run_end[s]; k += VL)
                    vmx = vmax(vmx, load_f32(row + k) + load_f32(lch + k));
                for (; k < run_end[s]; k++)
                    if (row[k] + lch[k] > mx) mx = row[k] + lch[k];
            }
            for (int l = 0; l < VL; l++) mx = vmx[l] > mx ? vmx[l] : mx;
            if (mx == neg_inf) continue; /* nothing scored: den stays -inf */
            float sum = den[r] == neg_inf ? 0.f : expf(den[r] - mx);
            vf vsum = {0};
            for (int64_t s = run_ptr[bh]; s < run_ptr[bh + 1]; s++) {
                int64_t k = run_start[s];
                for (; k + VL <= run_end[s]; k += VL)
                    vsum += vexp(load_f32(row + k) + load_f32(lch + k) - mx);
                for (; k < run_end[s]; k++)
                    if (lch[k] != neg_inf) sum += expf(row[k] + lch[k] - mx);
            }
            den[r] = mx + logf(sum + hsum(vsum));
        }
        if (M > 1) {
            /* log Σ_m exp(logit - den) per head, vectorised over the blocks holding scored
             * clusters (runs are ascending: a block shared by two runs is done once); the max
             * over the rows is taken out first, so tiny scores stay finite as in logsumexp */
            for (int64_t g = 0; g < G; g++) {
                float *gs = gsum + g * Kp;
                int64_t last = -1;
                for (int64_t s = run_ptr[bh]; s < run_ptr[bh + 1]; s++) {
                    for (int64_t blk = run_start[s] / VL; blk * VL < run_end[s]; blk++) {
                        if (blk <= last) continue;
                        last = blk;
                        vf mx = load_f32(lg + g * M * Kp + blk * VL) - den[g * M];
                        for (int64_t m = 1; m < M; m++) {
                            const int64_t r = g * M + m;
                            mx = vmax(mx, load_f32(lg + r * Kp + blk * VL) - den[r]);
                        }
                        vf acc = {0};
                        for (int64_t m = 0; m < M; m++) {
                            const int64_t r = g * M + m;
                            acc += vexp(load_f32(lg + r * Kp + blk * VL) - den[r] - mx);
                        }
                        float lse[VL];
                        for (int l = 0; l < VL; l++) lse[l] = mx[l] + logf(acc[l]);
                        memcpy(gs + blk * VL, lse, sizeof lse);
                    }
                }
            }
        }
        /* per cluster: mean over the M rows, then reduce over the G heads */
        for (int64_t s = run_ptr[bh]; s < run_ptr[bh + 1]; s++) {
            for (int64_t k = run_start[s]; k < run_end[s]; k++) {
                if (lch[k] == neg_inf) continue;
                float acc = neg_inf;
                for (int64_t g = 0; g < G; g++) {
                    const float sg = M == 1 ? lg[g * Kp + k] - den[g] : gsum[g * Kp + k] - log_m;
                    if (reduce_mean) acc = logaddexpf_(acc, sg);
                    else if (sg > acc) acc = sg;
                }
                o[k] = reduce_mean ? acc - log_g : acc;
            }
        }
        if (rows) /* each row's own scores, reduced over the heads, one row at a time */
            for (int64_t m = 0; m < M; m++) {
                float *dst = rows + (bh * M + m) * K;
                for (int64_t s = run_ptr[bh]; s < run_ptr[bh + 1]; s++) {
                    int64_t k = run_start[s];
                    if (!reduce_mean) /* max over the heads, VL clusters at a time */
                        for (; k + VL <= run_end[s]; k += VL) {
                            vf racc = vsplat(neg_inf);
                            for (int64_t g = 0; g < G; g++)
                                racc = vmax(racc, load_f32(lg + (g * M + m) * Kp + k) -
                                                      den[g * M + m]);
                            const vi empty = load_f32(lch + k) == vsplat(neg_inf);
                            racc = (vf)(((vi)vsplat(neg_inf) & empty) | ((vi)racc & ~empty));
                            store_f32(dst + k, racc);
                        }
                    for (; k < run_end[s]; k++) {
                        if (lch[k] == neg_inf) continue;
                        float racc = neg_inf;
                        for (int64_t g = 0; g < G; g++) {
                            const int64_t r = g * M + m;
                            const float sr = lg[r * Kp + k] - den[r];
                            if (reduce_mean) racc = logaddexpf_(racc, sr);
                            else if (sr > racc) racc = sr;
                        }
                        dst[k] = reduce_mean ? racc - log_g : racc;
                    }
                }
            }
    }
    return 0;
}

/* Each query row's log mass on the sink keys, log sum_s exp(scale * q . k_s): the extra_log_den
 * of the sinks' mass (squeeze/kernels/centroid_scores/__init__.py, sink_log_mass, is the
 * reference: the product summed, then scaled, as there).
 *
 * q   [BH, R, D] fp32 query rows (not scaled)
 * sk  [Hkv, S, D] fp32 sink keys (those of KV head bh % Hkv)
 * out [BH, R] fp32
 *
 * Serial, scalar: a decode step's few thousand products cost less than waking a thread, and
 * torch's exp / log on a few floats would wake MKL's pool (about 75 us with passive waiting). */
void squeeze_sink_log_mass(const float *q, float scale, const float *sk, int64_t BH, int64_t Hkv,
                           int64_t R, int64_t S, int64_t D, float *out) {
    for (int64_t bh = 0; bh < BH; bh++) {
        const float *keys = sk + (bh % Hkv) * S * D;
        for (int64_t r = 0; r < R; r++) {
            const float *qr = q + (bh * R + r) * D;
            float mx = -INFINITY, sum = 0.0f; /* online: sum of exp(dot - mx) so far */
            for (int64_t s = 0; s < S; s++) {
                float dot = 0.0f;
                for (int64_t d = 0; d < D; d++) dot += qr[d] * keys[s * D + d];
                dot *= scale;
                if (dot > mx) {
                    sum = sum * expf(mx - dot) + 1.0f;
                    mx = dot;
                } else {
                    sum += expf(dot - mx);
                }
            }
            out[bh * R + r] = mx + logf(sum);
        }
    }
}
