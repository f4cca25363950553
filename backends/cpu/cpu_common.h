/* Helpers shared by the CPU kernels (gemv.c, qgemv.c): bf16 <-> fp32 as torch converts, scratch,
 * the M specialization. */
#ifndef ERNIE_HAL_CPU_COMMON_H
#define ERNIE_HAL_CPU_COMMON_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {   /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Per-thread scratch for prepared activations (a few KiB; grown, never freed). NULL when out of
 * memory. */
static inline void *scratch(size_t bytes) {
    static __thread void *buf;
    static __thread size_t cap;
    if (bytes > cap) {
        free(buf);
        cap = (bytes + 4095) & ~(size_t)4095;
        buf = aligned_alloc(64, cap);
        if (!buf) cap = 0;
    }
    return buf;
}

#define INLINE static inline __attribute__((always_inline))

/* element i of activations stored as bf16 or fp32 */
static inline float x_at(const void *x, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

#if defined(__AVX2__)
#include <immintrin.h>
/* the sum of a vector's 8 lanes (the AVX2 kernels' row totals) */
INLINE float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* a row kernel specialized on the activation row count M (1..8): the compiler keeps every
 * accumulator in registers */
#define SPECIALIZE(name, ...)                                                                      \
    switch (M) {                                                                                  \
    case 1: name(__VA_ARGS__, 1, out); break;                                                     \
    case 2: name(__VA_ARGS__, 2, out); break;                                                     \
    case 3: name(__VA_ARGS__, 3, out); break;                                                     \
    case 4: name(__VA_ARGS__, 4, out); break;                                                     \
    case 5: name(__VA_ARGS__, 5, out); break;                                                     \
    case 6: name(__VA_ARGS__, 6, out); break;                                                     \
    case 7: name(__VA_ARGS__, 7, out); break;                                                     \
    default: name(__VA_ARGS__, 8, out); break;                                                    \
    }

#endif
