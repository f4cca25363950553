/* Helpers shared by the CPU kernels (gemv.c, qgemv.c, gemm.c): bf16 <-> fp32 as torch converts, scratch,
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

/* the packed kernels' dequantization (gemm.c tiles, qgemv.c qdequant) */
/* d[0, len) = q * sc for one run of a scale (bits 8: int8 q; 4: q + 8 in nibbles, low first,
 * starting on a whole byte), rounded to bf16 and back when round: what the reference's cast gives */
static inline void dequant_run(int bits, const void *q, int64_t len, float sc, int round, float *d) {
    int64_t k = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 vs = _mm256_set1_ps(sc);
    const __m256i half = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1), top = _mm256_set1_epi32(-65536);
#define STORE8(at, ints)                                                                            \
    do {                                                                                            \
        __m256 v_ = _mm256_mul_ps(_mm256_cvtepi32_ps(ints), vs);                                    \
        if (round) { /* round to nearest even on the bits, as f32_to_bf16 does for finite values */ \
            __m256i u_ = _mm256_castps_si256(v_);                                                   \
            u_ = _mm256_add_epi32(u_, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(u_, 16), one))); \
            v_ = _mm256_castsi256_ps(_mm256_and_si256(u_, top));                                    \
        }                                                                                           \
        _mm256_storeu_ps(d + (at), v_);                                                             \
    } while (0)
    if (bits == 8) {
        for (; k + 8 <= len; k += 8)
            STORE8(k, _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)q + k))));
    } else {
        const __m128i low = _mm_set1_epi8(15), eight = _mm_set1_epi8(8);
        for (; k + 32 <= len; k += 32) {
            __m128i b = _mm_loadu_si128((const __m128i *)((const uint8_t *)q + k / 2));
            __m128i lo = _mm_sub_epi8(_mm_and_si128(b, low), eight);
            __m128i hi = _mm_sub_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), low), eight);
            __m128i c0 = _mm_unpacklo_epi8(lo, hi), c1 = _mm_unpackhi_epi8(lo, hi);   /* columns in order */
            STORE8(k, _mm256_cvtepi8_epi32(c0));
            STORE8(k + 8, _mm256_cvtepi8_epi32(_mm_srli_si128(c0, 8)));
            STORE8(k + 16, _mm256_cvtepi8_epi32(c1));
            STORE8(k + 24, _mm256_cvtepi8_epi32(_mm_srli_si128(c1, 8)));
        }
    }
#undef STORE8
#endif
    for (; k < len; k++) {
        float v = bits == 8 ? (float)((const int8_t *)q)[k] * sc
                                 : (float)((int)((((const uint8_t *)q)[k / 2] >> (4 * (k & 1))) & 15) - 8) * sc;
        d[k] = round ? bf16_to_f32(f32_to_bf16(v)) : v;
    }
}

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
