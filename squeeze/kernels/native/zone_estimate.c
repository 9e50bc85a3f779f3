/* The estimated zone on CPU (C with GNU vector extensions; ctypes): per (batch row, KV head),
 * choose the best-scoring clusters the lookup skipped, attend them through their centroids and
 * mean values, and merge that into the sparse attention's (out, lse) in place. The PyTorch
 * reference is squeeze/kernels/zone_estimate/reference.py (the zone, its estimate, the merge).
 *
 * q        [BH, R, D] fp32 query rows (R = G*M, not scaled)
 * c        [Hkv, K, D] centroids, element type c_dtype (DT_F32 or DT_BF16, widened to fp32)
 * sp       [Hkv, K]    fp32 spread (sigma^2/2), or NULL: each logit gains scale^2 * |q|^2 * sp
 * lc       [Hkv, K]    fp32 log cluster sizes (-inf: empty)
 * vm       [Hkv, K, D] mean values, element type c_dtype
 * key      [BH, K]     fp32 ranking scores of the clusters (-inf: not scored, never chosen)
 * mask     [BH, Kc]    uint8 selected clusters (Kc >= K; the columns past K are not read)
 * multiple            the zone holds ceilf(multiple * max(1, selected)) clusters at most (fp32
 *                     product, as the reference), the best by key among the unselected
 * out      [BH, R, D]  fp32, in/out: the sparse attention, merged with the zone's estimate
 * lse      [BH, R]     fp32, in/out: its log-sum-exp (-inf: no keys), merged
 * counts   [BH]        int64 out: the clusters estimated
 * scratch  at least threads * per_thread floats (the size check returns the total needed)
 *
 * Each estimated cluster j weighs N_j * exp(l_j), l_j = scale * q.c_j (+ the spread term), with
 * the value vm_j: lse_e = log sum_j N_j exp(l_j), out_e = sum_j softmax_j(l_j + log N_j) vm_j.
 * Returns 0, -1 for a bad size or element type, or the scratch floats needed when too few.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "simd.h"

#define RB 4 /* query rows per register block */
#define PREFETCH 8 /* the zone's rows are scattered: rows this many clusters ahead are requested */

static inline void prefetch_row(const char *p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(p + o, 0, 3);
}

/* pairwise: the lanes halved until one is left */
static inline float hsum(vf x) {
    float t[VL];
    memcpy(t, &x, sizeof t);
    for (int w = VL / 2; w > 0; w /= 2)
        for (int l = 0; l < w; l++) t[l] += t[l + w];
    return t[0];
}

/* A float's bits as an unsigned integer in the float's order (-inf lowest, then up) */
static inline uint32_t order_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

/* The zone of one (b, h) into id, ascending; returns its size. The want-th best key among the
 * candidates (unselected, scored) is found by bisection over the keys' ordered bits: 32
 * branch-free counting passes, no data-dependent branches to mispredict; ties at it are taken
 * lowest index first. ob: K scratch words. */
static int64_t choose_zone(const float *key, const uint8_t *mask, int64_t K, float multiple,
                           uint32_t *ob, int64_t *id) {
    int64_t n_sel = 0, n = 0;
    for (int64_t k = 0; k < K; k++) {
        const int cand = !mask[k] && key[k] != -INFINITY;
        n_sel += mask[k] != 0;
        n += cand;
        ob[k] = cand ? order_bits(key[k]) : 0; /* 0: below every candidate (-inf is 0x007fffff) */
    }
    const float want_f = ceilf(multiple * (float)(n_sel > 0 ? n_sel : 1));
    const int64_t want = want_f < (float)n ? (int64_t)want_f : n;
    if (want <= 0) return 0;
    uint32_t lo = 1, hi = 0xffffffffu; /* the largest t with count(ob >= t) >= want is in [lo, hi] */
    while (lo < hi) {
        const uint32_t mid = lo + (hi - lo) / 2 + 1;
        uint32_t c = 0; /* K < 2^32: a 32-bit count keeps the pass one vector wide */
        for (int64_t k = 0; k < K; k++) c += ob[k] >= mid;
        if ((int64_t)c >= want) lo = mid;
        else hi = mid - 1;
    }
    int64_t z = 0, ties = want;
    for (int64_t k = 0; k < K; k++) ties -= ob[k] > lo;
    for (int64_t k = 0; k < K && z < want; k++)
        if (ob[k] > lo || (ob[k] == lo && ties-- > 0)) id[z++] = k;
    return z;
}

/* The zone's logits of the rows into lg [Rp, Zp]: qs [Rp, D + 1] scaled rows (zero rows past R;
 * column D the spread factor), ch / sh / lch the head's centroids, spreads and log sizes; RB
 * rows share each centroid load. */
static inline __attribute__((always_inline)) void zone_logits(
    const float *qs, int64_t Rp, int64_t D, const void *ch, const void *vh, const float *sh,
    const float *lch, const int64_t *id, int64_t Z, int64_t Zp, const int bf16, float *lg) {
    const int64_t Dq = D + 1, Dv = D / VL * VL, esize = bf16 ? 2 : 4;
    for (int64_t z = 0; z < Z; z++) {
        const int64_t row = id[z] * D;
        if (z + PREFETCH < Z) {
            prefetch_row((const char *)ch + id[z + PREFETCH] * D * esize, D * esize);
            prefetch_row((const char *)vh + id[z + PREFETCH] * D * esize, D * esize);
        }
        const float bias = lch[id[z]], spread = sh ? sh[id[z]] : 0.f;
        for (int64_t r0 = 0; r0 < Rp; r0 += RB) {
            const float *q0 = qs + r0 * Dq;
            vf acc[RB] = {{0}};
            for (int64_t d = 0; d < Dv; d += VL) {
                const vf cv = load_vf(ch, row + d, bf16);
                for (int r = 0; r < RB; r++) acc[r] += load_f32(q0 + r * Dq + d) * cv;
            }
            for (int r = 0; r < RB; r++) {
                float dot = hsum(acc[r]);
                for (int64_t d = Dv; d < D; d++) dot += q0[r * Dq + d] * load_1f(ch, row + d, bf16);
                lg[(r0 + r) * Zp + z] = dot + q0[r * Dq + D] * spread + bias;
            }
        }
    }
}

/* acc [Rp, D] += the NV vectors at d0 of sum_z w[r, z] * vm[id[z]], RB rows at r0, held in
 * registers over the whole zone (NV a constant at each call) */
static inline __attribute__((always_inline)) void values_block(const float *w, int64_t Zp,
                                                               int64_t D, const void *vh,
                                                               const int64_t *id, int64_t Z,
                                                               int64_t r0, int64_t d0,
                                                               const int NV, const int bf16,
                                                               float *acc) {
    vf a[RB][4] = {{{0}}};
    for (int64_t z = 0; z < Z; z++) {
        const int64_t row = id[z] * D + d0;
        vf v[4];
        for (int j = 0; j < NV; j++) v[j] = load_vf(vh, row + j * VL, bf16);
        for (int r = 0; r < RB; r++) {
            const float wz = w[(r0 + r) * Zp + z];
            for (int j = 0; j < NV; j++) a[r][j] += wz * v[j];
        }
    }
    for (int r = 0; r < RB; r++)
        for (int j = 0; j < NV; j++) store_f32(acc + (r0 + r) * D + d0 + j * VL, a[r][j]);
}

/* acc [Rp, D] = sum_z w[r, z] * vm[id[z]], w [Rp, Zp] (rows past R zero) */
static inline __attribute__((always_inline)) void zone_values(const float *w, int64_t Rp,
                                                              int64_t Zp, int64_t D,
                                                              const void *vh, const int64_t *id,
                                                              int64_t Z, const int bf16,
                                                              float *acc) {
    const int64_t Dv = D / VL * VL;
    for (int64_t r0 = 0; r0 < Rp; r0 += RB) {
        int64_t d0 = 0;
        for (; d0 + 4 * VL <= Dv; d0 += 4 * VL) values_block(w, Zp, D, vh, id, Z, r0, d0, 4, bf16, acc);
        for (; d0 < Dv; d0 += VL) values_block(w, Zp, D, vh, id, Z, r0, d0, 1, bf16, acc);
        for (int64_t r = r0; r < r0 + RB; r++)
            for (int64_t d = Dv; d < D; d++) {
                float t = 0.f;
                for (int64_t z = 0; z < Z; z++) t += w[r * Zp + z] * load_1f(vh, id[z] * D + d, bf16);
                acc[r * D + d] = t;
            }
    }
}

/* Row r's weights in place, exp(l - max) / sum over the Zp logits (-inf padding: weight 0);
 * returns their log-sum-exp, -inf when every zone cluster is empty (the weights then 0). */
static float softmax_row(float *lr, int64_t Zp) {
    vf vmx = vsplat(-INFINITY);
    for (int64_t z = 0; z < Zp; z += VL) vmx = vmax(vmx, load_f32(lr + z));
    float mx = -INFINITY;
    for (int l = 0; l < VL; l++) mx = vmx[l] > mx ? vmx[l] : mx;
    if (mx == -INFINITY) {
        memset(lr, 0, (size_t)Zp * sizeof(float));
        return -INFINITY;
    }
    vf vs = {0};
    for (int64_t z = 0; z < Zp; z += VL) {
        const vf e = vexp(load_f32(lr + z) - mx);
        store_f32(lr + z, e);
        vs += e;
    }
    const float sum = hsum(vs), inv = 1.0f / sum;
    for (int64_t z = 0; z < Zp; z += VL) store_f32(lr + z, load_f32(lr + z) * inv);
    return mx + logf(sum);
}

/* (out, lse) of row r merged with the zone's (e, lb) by log-sum-exp (the merge reference's
 * rule: a side of lse -inf weighs 0) */
static void merge_row(float *o, float *la, const float *e, float lb, int64_t D) {
    if (lb == -INFINITY) return;
    if (*la == -INFINITY) {
        memcpy(o, e, (size_t)D * sizeof(float));
        *la = lb;
        return;
    }
    const float m = *la > lb ? *la : lb;
    const float wa = expf(*la - m), wb = expf(lb - m), total = wa + wb;
    const float fa = wa / total, fb = wb / total;
    for (int64_t d = 0; d < D; d++) o[d] = o[d] * fa + e[d] * fb;
    *la = m + logf(total);
}

/* Bits 0-2: element types read (DT_*); bits 16+: VL. */
int32_t squeeze_zone_estimate_info(void) { return (1 << DT_F32) | (1 << DT_BF16) | (VL << 16); }

int64_t squeeze_zone_estimate(const float *q, float scale, const void *c, int32_t c_dtype,
                              const float *sp, const float *lc, const void *vm, const float *key,
                              const uint8_t *mask, int64_t Kc, float multiple, int64_t BH,
                              int64_t Hkv, int64_t K, int64_t R, int64_t D, float *out,
                              float *lse, int64_t *counts, float *scratch, int64_t scratch_floats,
                              int32_t threads) {
    if (D <= 0 || R < 1 || K < 0 || Hkv < 1 || Kc < K || BH < 0) return -1;
    if (c_dtype != DT_F32 && c_dtype != DT_BF16) return -1;
    const int64_t Rp = (R + RB - 1) / RB * RB, Kp = (K + VL - 1) / VL * VL;
    /* ids (2 floats each), ordered bits, logits [Rp, Kp], rows [Rp, D + 1], acc [Rp, D], lse [R] */
    const int64_t per_thread = 2 * K + K + Rp * Kp + Rp * (D + 1) + Rp * D + R;
    if (threads < 1) threads = 1;
    if (threads > BH) threads = (int32_t)(BH > 0 ? BH : 1);
    if (scratch_floats < (int64_t)threads * per_thread) return (int64_t)threads * per_thread;
    const int64_t esize = c_dtype == DT_BF16 ? 2 : 4;

#pragma omp parallel for num_threads(threads) schedule(dynamic, 1)
    for (int64_t bh = 0; bh < BH; bh++) {
#ifdef _OPENMP
        float *base = scratch + (int64_t)omp_get_thread_num() * per_thread;
#else
        float *base = scratch;
#endif
        int64_t *id = (int64_t *)base;
        uint32_t *ob = (uint32_t *)(base + 2 * K);
        float *lg = base + 3 * K;
        float *qs = lg + Rp * Kp;
        float *acc = qs + Rp * (D + 1);
        float *lse_e = acc + Rp * D;
        const int64_t h = bh % Hkv;
        const int64_t Z = choose_zone(key + bh * K, mask + bh * Kc, K, multiple, ob, id);
        counts[bh] = Z;
        if (Z == 0) continue;
        const int64_t Zp = (Z + VL - 1) / VL * VL;
        scale_rows(q + bh * R * D, R, Rp, D, D + 1, scale, qs);
        const char *ch = (const char *)c + h * K * D * esize;
        const char *vh = (const char *)vm + h * K * D * esize;
        const float *sh = sp ? sp + h * K : NULL;
        for (int64_t r = 0; r < Rp; r++)
            for (int64_t z = Z; z < Zp; z++) lg[r * Zp + z] = -INFINITY;
        if (c_dtype == DT_BF16) zone_logits(qs, Rp, D, ch, vh, sh, lc + h * K, id, Z, Zp, 1, lg);
        else zone_logits(qs, Rp, D, ch, vh, sh, lc + h * K, id, Z, Zp, 0, lg);
        for (int64_t r = 0; r < R; r++) lse_e[r] = softmax_row(lg + r * Zp, Zp);
        for (int64_t r = R; r < Rp; r++) memset(lg + r * Zp, 0, (size_t)Zp * sizeof(float));
        if (c_dtype == DT_BF16) zone_values(lg, Rp, Zp, D, vh, id, Z, 1, acc);
        else zone_values(lg, Rp, Zp, D, vh, id, Z, 0, acc);
        for (int64_t r = 0; r < R; r++)
            merge_row(out + (bh * R + r) * D, lse + bh * R + r, acc + r * D, lse_e[r], D);
    }
    return 0;
}
