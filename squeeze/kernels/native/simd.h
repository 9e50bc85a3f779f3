/* SIMD helpers shared by the native kernels (C with GNU vector extensions).
 *
 * VL is the vector width in floats the build targets (16 with AVX-512, 8 with AVX, else 4); vf,
 * vi and vu are VL-lane float, int32 and uint32 vectors, vh VL lanes of uint16 (bf16 bits).
 * DT_* are the element types of the K/V, centroid and point arrays, the codes the Python
 * bindings pass (squeeze.kernels.native.DTYPE_CODES).
 * Loads and stores go through memcpy: no alignment is assumed. load_vf / load_1f (fp32 or bf16
 * read as fp32), scale_rows (the scaled query rows), vexp, vsplat and vmax are what the
 * attention-score kernels share.
 */
#ifndef SQUEEZE_SIMD_H
#define SQUEEZE_SIMD_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif

#ifndef __has_builtin
#define __has_builtin(x) 0
#endif

typedef float vf __attribute__((vector_size(4 * VL)));
typedef int32_t vi __attribute__((vector_size(4 * VL)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));
typedef uint16_t vh __attribute__((vector_size(2 * VL)));

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static inline vf load_f32(const float *p) {
    vf x;
    memcpy(&x, p, sizeof x);
    return x;
}

static inline void store_f32(float *p, vf x) { memcpy(p, &x, sizeof x); }

/* VL consecutive bf16 values widened to fp32: each 16-bit pattern is the top half of its float
 * (<< 16), exact. */
static inline vf load_bf16(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

/* VL elements at p + i as fp32, of type fp32 or bf16 (widened); bf16 is a constant at each call,
 * so each caller compiles to its own specialised loop */
static inline __attribute__((always_inline)) vf load_vf(const void *p, int64_t i, const int bf16) {
    return bf16 ? load_bf16((const uint16_t *)p + i) : load_f32((const float *)p + i);
}

/* One element of the same, for a tail shorter than VL */
static inline __attribute__((always_inline)) float load_1f(const void *p, int64_t i,
                                                           const int bf16) {
    if (!bf16) return ((const float *)p)[i];
    const uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* The query rows a scoring kernel reads: the R rows of D at src, times scale, into dst (row
 * stride Dq), then zero rows up to Rp; with Dq > D, column D holds |q|^2 * scale^2 (the factor
 * of the spread term). */
static inline void scale_rows(const float *src, int64_t R, int64_t Rp, int64_t D, int64_t Dq,
                              float scale, float *dst) {
    for (int64_t r = 0; r < Rp; r++, dst += Dq) {
        if (r >= R) {
            memset(dst, 0, (size_t)Dq * sizeof(float));
            continue;
        }
        const float *row = src + r * D;
        float n2 = 0.f;
        for (int64_t d = 0; d < D; d++) {
            dst[d] = row[d] * scale;
            n2 += row[d] * row[d];
        }
        if (Dq > D) dst[D] = n2 * scale * scale;
    }
}

/* exp(x) for VL lanes: Cody-Waite range reduction, degree-6 polynomial (relative error below
 * 2e-7 over the range used here), exactly 0 below -87 (-inf included). */
static inline vf vexp(vf x) {
    const vi keep = x >= -87.0f;
    const vf lo = (vf)((vi)x & keep); /* lanes below -87 (and -inf) compute exp(0), zeroed below */
    vf t = lo * 1.44269504088896341f;
    vf n = {0};
    for (int l = 0; l < VL; l++) n[l] = __builtin_nearbyintf(t[l]);
    vf r = lo - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = 1.0f / 720 + r * 0;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    vi e = ((vi)__builtin_convertvector(n, vi) + 127) << 23;
    vf scaled = p * (vf)e;
    return (vf)((vi)scaled & keep);
}

static inline vf vsplat(float x) { return (vf){0} + x; }

/* lane-wise max (no NaN here: the logits are finite, the log sizes finite or -inf) */
static inline vf vmax(vf a, vf b) {
    const vi gt = a > b;
    return (vf)(((vi)a & gt) | ((vi)b & ~gt));
}

#endif
