/* SIMD helpers shared by the native kernels (C with GNU vector extensions).
 *
 * VL is the vector width in floats the build targets (16 with AVX-512, 8 with AVX, else 4); vf,
 * vi and vu are VL-lane float, int32 and uint32 vectors, vh VL lanes of uint16 (bf16 bits).
 * DT_* are the element types of the K/V, centroid and point arrays, the codes the Python
 * bindings pass (squeeze.kernels.native.DTYPE_CODES).
 * Loads and stores go through memcpy: no alignment is assumed.
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

#endif
