/* AVX2 + FMA row kernels for qgemv.c (the build's path where AVX-512 is missing). The weights are
 * decoded exactly in registers and FMA'd with fp32 activations (bf16 ones converted once per call
 * in prepare_x), accumulated per group in fp32 and scaled once per group, as the AVX-512 kernels do.
 *   wint8  8 int8 -> fp32 per vpmovsxbd + vcvtdq2ps
 *   wint4  a 32-byte load holds 64 weights; 32-bit lane j holds columns 8j..8j+7 in its nibbles
 *          (nibble t = column 8j + t). XOR 0x8 turns each stored q + 8 into q's 4-bit two's
 *          complement, so `(v << (28 - 4t)) >> 28` (arithmetic) is q exactly: two shifts and a
 *          convert give 8 weights, with the -8 folded in at no cost. The activations are permuted
 *          once per call to match (x[64 b + 8 j + t] at [b][t][j]). A group of 32 columns is lanes
 *          0-3 or 4-7, so groups of 32 take one vector of per-lane scales per load.
 */
#include <immintrin.h>

#define QCHAINS(M) ((M) == 1 ? 4 : (M) <= 4 ? 2 : 1)   /* 16 ymm registers at M = 8 */

INLINE __m256 int8x8_ps(const int8_t *w) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)w)));
}

/* ---- wint8: fp32 activations xf [M, Kp] (zero padded) ---------------------------------------- */
INLINE void w8_row_avx2(const int8_t *w, const float *s, int64_t gs, int64_t G,
                        const float *xf, int64_t Kp, const int M, float *out) {
    const int ch = QCHAINS(M);
    __m256 tot[QGEMV_MAX_ROWS];
    for (int m = 0; m < M; m++) tot[m] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        int64_t k = g * gs, k1 = k + gs;
        __m256 acc[QGEMV_MAX_ROWS][4];
        for (int m = 0; m < M; m++)
            for (int c = 0; c < 4; c++) acc[m][c] = _mm256_setzero_ps();
        for (; k + 32 <= k1; k += 32) {            /* 32 weights: half a line */
            _mm_prefetch((const char *)(w + k) + PREFETCH, _MM_HINT_T0);
            for (int j = 0; j < 4; j++) {
                __m256 wv = int8x8_ps(w + k + 8 * j);
                for (int m = 0; m < M; m++)
                    acc[m][j % ch] = _mm256_fmadd_ps(wv, _mm256_load_ps(xf + m * Kp + k + 8 * j), acc[m][j % ch]);
            }
        }
        for (int c = 1; k < k1; k += 8, c ^= 1) {   /* a group's or a row's tail */
            __m256 wv;
            if (k1 - k >= 8) wv = int8x8_ps(w + k);
            else {
                int8_t tmp[8] = {0};
                memcpy(tmp, w + k, (size_t)(k1 - k));
                wv = int8x8_ps(tmp);
            }
            for (int m = 0; m < M; m++)
                acc[m][c & (ch > 1)] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xf + m * Kp + k), acc[m][c & (ch > 1)]);
        }
        __m256 sg = _mm256_set1_ps(s[g]);
        for (int m = 0; m < M; m++) {
            __m256 a = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
            tot[m] = _mm256_fmadd_ps(a, sg, tot[m]);
        }
    }
    for (int m = 0; m < M; m++) out[m] = hsum256(tot[m]);
}

/* ---- wint4: xf4 [M][blocks][8][8] fp32, xf4[m][b][t][j] = x[m][64 b + 8 j + t] (zero padded) -- */
INLINE __m256i w4_load_avx2(const uint8_t *w, int64_t bytes_left) {
    _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
    __m256i v;
    if (bytes_left >= 32) v = _mm256_loadu_si256((const __m256i *)w);
    else {                                          /* zero bytes decode to -8, times x = 0 */
        uint8_t tmp[32] = {0};
        memcpy(tmp, w, (size_t)bytes_left);
        v = _mm256_loadu_si256((const __m256i *)tmp);
    }
    return _mm256_xor_si256(v, _mm256_set1_epi8((char)0x88));
}

#define W4_NIBBLE(v, t) _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32((v), 28 - 4 * (t)), 28))

/* scales of block b's two groups of 32 columns, lanes 0-3 and 4-7 (0 past the last group) */
INLINE __m256 w4_scales32(const float *s, int64_t b, int64_t G) {
    float hi = 2 * b + 1 < G ? s[2 * b + 1] : 0.0f;
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s[2 * b])), _mm_set1_ps(hi), 1);
}

INLINE void w4_row_avx2(const uint8_t *w, const float *s, int64_t K, int64_t gs, int64_t G,
                        const float *xf4, int64_t xstride, const int M, float *out) {
    const int ch = QCHAINS(M);
    const int64_t rowbytes = K / 2, blocks = (K + 63) / 64;
    const int lane_groups = G > 1 && gs == 32;      /* else a group is whole blocks (or the row) */
    const int64_t per = lane_groups ? 1 : G == 1 ? blocks : gs / 64;
    __m256 tot[QGEMV_MAX_ROWS];
    for (int m = 0; m < M; m++) tot[m] = _mm256_setzero_ps();
    for (int64_t g = 0, b = 0; b < blocks; g++) {
        __m256 acc[QGEMV_MAX_ROWS][4];
        for (int m = 0; m < M; m++)
            for (int c = 0; c < 4; c++) acc[m][c] = _mm256_setzero_ps();
        for (int64_t e = b + per; b < e; b++) {
            __m256i v = w4_load_avx2(w + 32 * b, rowbytes - 32 * b);
            const float *xb = xf4 + b * 64;
#define W4_STEP(t)                                                                                  \
            {                                                                                       \
                __m256 wq = W4_NIBBLE(v, t);                                                        \
                for (int m = 0; m < M; m++)                                                         \
                    acc[m][(t) % ch] = _mm256_fmadd_ps(wq, _mm256_load_ps(xb + m * xstride + 8 * (t)), acc[m][(t) % ch]); \
            }
            W4_STEP(0) W4_STEP(1) W4_STEP(2) W4_STEP(3) W4_STEP(4) W4_STEP(5) W4_STEP(6) W4_STEP(7)
#undef W4_STEP
        }
        __m256 sv = lane_groups ? w4_scales32(s, b - 1, G) : _mm256_set1_ps(s[g]);
        for (int m = 0; m < M; m++) {
            __m256 a = _mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3]));
            tot[m] = _mm256_fmadd_ps(a, sv, tot[m]);
        }
    }
    for (int m = 0; m < M; m++) out[m] = hsum256(tot[m]);
}

