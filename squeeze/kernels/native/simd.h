/* SIMD helpers shared by the native kernels (C with GNU vector extensions).
 *
 * VL is the vector width in floats the build targets (16 with AVX-512, 8 with AVX, else 4); vf,
 * vi and vu are VL-lane float, int32 and uint32 vectors, vh VL lanes of uint16 (bf16 bits).
 * DT_* are the element types of the K/V, centroid and point arrays, the codes the Python
 * bindings pass (squeeze.kernels.native.DTYPE_CODES).
 * Loads and stores go through memcpy: no alignment is assumed. vexp, vsplat and vmax are the
 * lane-wise exp, broadcast and max the attention-score kernels share.
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
