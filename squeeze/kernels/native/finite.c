/* Whether an array of floats holds only finite values (C; ctypes): the input check of the
 * decode step (squeeze/validation.py), one pass over the bits, no temporary.
 *
 * p      n contiguous elements of `width` bytes (2: fp16 / bf16, 4: fp32, 8: fp64)
 * mask   the exponent bits of the format: all of them set means inf or NaN
 *
 * Returns 1 when every element is finite, 0 when one is not, -1 for an unknown width.
 */
#include <stdint.h>

#define ALL_FINITE(T)                                                                              \
    do {                                                                                           \
        const T *x = (const T *)p, m = (T)mask;                                                    \
        T bad = 0;                                                                                 \
        for (int64_t i = 0; i < n; i++) bad |= (T)((x[i] & m) == m);                               \
        return bad == 0;                                                                           \
    } while (0)

int32_t squeeze_all_finite(const void *p, int64_t n, int32_t width, uint64_t mask) {
    switch (width) {
    case 2: ALL_FINITE(uint16_t);
    case 4: ALL_FINITE(uint32_t);
    case 8: ALL_FINITE(uint64_t);
    default: return -1;
    }
}

/* No element types or SIMD width to report (the other libraries' info layout, all zero). */
int32_t squeeze_finite_info(void) { return 0; }
