/* Residual add + RMSNorm for decode rows on CPU, one pass over H per step instead of the
 * reference's half-dozen torch ops (each a dispatch and a temporary: most of a decode norm's
 * time at H = 1024). The reference's roundings, in its order (kernels/reference/norm.py):
 *   summed = x + residual          rounded to x's dtype (bf16: nearest even), written out
 *   r      = 1 / sqrt(mean(summed^2) + eps)      in fp32 (the sum of squares in double)
 *   y      = summed * r            rounded to x's dtype
 *   out    = weight * y            rounded to x's dtype
 * residual NULL: plain rms_norm of x. Single-threaded: a row is a few KiB.
 */
#include <math.h>
#include "cpu_common.h"

static inline float rnd(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

static inline float load(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* x, residual, out, summed [T, H] contiguous, weight [H]; all of one dtype (bf16 or fp32). */
void ernie_add_rms_norm(const void *x, const void *residual, const void *weight, void *out, void *summed,
                        int64_t T, int64_t H, float eps, int bf16) {
    for (int64_t t = 0; t < T; t++) {
        int64_t o = t * H;
        const void *src = x;
        if (residual) {
            for (int64_t i = 0; i < H; i++)
                store(summed, bf16, o + i, rnd(load(x, bf16, o + i) + load(residual, bf16, o + i), bf16));
            src = summed;
        }
        double ss = 0;
        for (int64_t i = 0; i < H; i++) {
            double v = load(src, bf16, o + i);
            ss += v * v;
        }
        float r = 1.0f / sqrtf((float)(ss / (double)H) + eps);
        for (int64_t i = 0; i < H; i++) {
            float y = rnd(load(src, bf16, o + i) * r, bf16);
            store(out, bf16, o + i, load(weight, bf16, i) * y);
        }
    }
}
