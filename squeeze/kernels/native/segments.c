/* Selected clusters -> merged row segments, for CPU decode (C; ctypes), and the gather of the
 * rows they cover (the PyTorch sparse-attention backend's). The PyTorch reference is
 * squeeze/kernels/segments/reference.py; the output is the same compact CSR.
 *
 * mask     [B*Hkv, C]  uint8 (torch.bool): the selected clusters of each (b, h)
 * offsets  [Hkv, C + 1] int64 CSR row offsets of the clusters of each KV head
 * seg_ptr  [B*Hkv + 1]  CSR offsets into seg_start / seg_end
 * seg_start, seg_end [cap]: the [start, end) row ranges; a run of adjacent clusters that are
 *                       selected or empty (an empty cluster costs nothing and must not break
 *                       a run) is one segment; runs covering no rows are dropped
 * lengths  [B*Hkv]      rows covered by the segments of each (b, h)
 *
 * Returns S, the segments written, or -1 when more than cap would be (cap = B*Hkv*ceil(C/2)
 * always suffices: runs are separated by at least one cluster). Reads only the arrays above.
 */
#include <stdint.h>
#include <string.h>

int64_t squeeze_segments(const uint8_t *mask, const int64_t *offsets, int64_t B, int64_t Hkv,
                         int64_t C, int64_t *seg_ptr, int64_t *seg_start, int64_t *seg_end,
                         int64_t *lengths, int64_t cap) {
    int64_t s = 0;
    seg_ptr[0] = 0;
    for (int64_t bh = 0; bh < B * Hkv; bh++) {
        const uint8_t *m = mask + bh * C;
        const int64_t *off = offsets + (bh % Hkv) * (C + 1);
        int64_t rows = 0, c = 0;
        while (c < C) {
            const int64_t c0 = c;
            while (c < C && (m[c] || off[c + 1] == off[c])) c++;
            if (c == c0) { /* not in a run */
                c++;
                continue;
            }
            if (off[c] > off[c0]) {
                if (s >= cap) return -1;
                seg_start[s] = off[c0];
                seg_end[s] = off[c];
                rows += off[c] - off[c0];
                s++;
            }
        }
        lengths[bh] = rows;
        seg_ptr[bh + 1] = s;
    }
    return s;
}

/* The rows of every (b, h)'s segments copied out of src [Hkv, N] (rows of row_bytes bytes; group
 * bh reads head bh % Hkv) into dst, group after group in segment order, group bh from row
 * first[bh] of dst: one memcpy per segment, the groups in parallel. The segments' bounds are
 * the caller's (checked before). */
void squeeze_gather_segments(const char *src, int64_t row_bytes, int64_t Hkv, int64_t N,
                             const int64_t *seg_ptr, const int64_t *seg_start,
                             const int64_t *seg_end, int64_t BH, const int64_t *first, char *dst,
                             int32_t threads) {
#pragma omp parallel for num_threads(threads > 0 ? threads : 1) schedule(dynamic, 1)
    for (int64_t bh = 0; bh < BH; bh++) {
        const char *base = src + (bh % Hkv) * N * row_bytes;
        char *o = dst + first[bh] * row_bytes;
        for (int64_t s = seg_ptr[bh]; s < seg_ptr[bh + 1]; s++) {
            const int64_t n = (seg_end[s] - seg_start[s]) * row_bytes;
            memcpy(o, base + seg_start[s] * row_bytes, (size_t)n);
            o += n;
        }
    }
}

/* No element types or SIMD width to report (the other libraries' info layout, all zero). */
int32_t squeeze_segments_info(void) { return 0; }
