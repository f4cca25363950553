/* AVX2 + FMA row kernels for gemv.c (the build's path where AVX-512 is missing: Zen2/3, most of
 * Intel before Ice Lake). Each weight row is read once and FMA'd into all M activation rows, so
 * the weights stream once per call whatever M is; the activations stay in L1.
 *
 * bf16: a 32-byte load holds 16 bf16 weights, two per 32-bit lane. `v << 16` is the even column
 * of each lane as fp32 and `v & 0xffff0000` the odd one (exact: bf16 is fp32's top half), so two
 * integer ops give 16 fp32 weights. The activations are converted to fp32 and split into even and
 * odd columns once per call to match (prepare_bf16). fp32: plain loads.
 * Each output is one row's sum in a fixed order, whatever N is, so fused weights give the unfused
 * values exactly.
 */
#include <immintrin.h>

#define GEMV_CHAINS(M) ((M) == 1 ? 4 : (M) <= 4 ? 2 : 1)   /* 16 ymm registers at M = 8 */
#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 512                                  /* bytes ahead of the weight stream */
#endif

/* x [M, K] bf16 -> [M, Kp] fp32 (Kp = K rounded up to 16, plus 16; zero padded), each 16 columns as
 * x[0], x[2], .., x[14], x[1], x[3], .., x[15]: the order bf16_pair yields the weights in. */
static int64_t prepare_bf16(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, float **out) {
    int64_t Kp = ((K + 15) & ~(int64_t)15) + 16;   /* + 64 bytes: rows 4 KiB apart would share L1 sets */
    float *buf = scratch((size_t)(M * Kp) * sizeof(float));
    *out = buf;
    if (!buf) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < Kp; k++) {
            int64_t c = k & 15, at = (k & ~(int64_t)15) + (c & 1) * 8 + c / 2;
            buf[m * Kp + at] = k < K ? bf16_to_f32(x[m * ldx + k]) : 0.0f;
        }
    return Kp;
}

INLINE void bf16_pair(__m256i v, __m256 *even, __m256 *odd) {
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u)));
}

INLINE void bf16_row_avx2(const uint16_t *w, int64_t K, const float *xf, int64_t Kp, const int M, float *out) {
    const int ch = GEMV_CHAINS(M);
    __m256 acc[8][4];
    for (int m = 0; m < M; m++)
        for (int c = 0; c < 4; c++) acc[m][c] = _mm256_setzero_ps();
    int64_t k = 0;
    /* two lines an iteration: 7% faster over a decode step's projections than one (measured
     * alternating in one process); chain j % 4 as below, so the sums are the same */
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(w + k) + GEMV_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + k) + GEMV_PREFETCH + 64, _MM_HINT_T0);
        __m256 wv[8];
        for (int h = 0; h < 4; h++)
            bf16_pair(_mm256_loadu_si256((const __m256i *)(w + k + 16 * h)), &wv[2 * h], &wv[2 * h + 1]);
        for (int m = 0; m < M; m++)
            for (int j = 0; j < 8; j++)
                acc[m][(j & 3) % ch] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xf + m * Kp + k + 8 * j), acc[m][(j & 3) % ch]);
    }
    for (; k + 32 <= K; k += 32) {                 /* one 64-byte line: 32 weights */
        _mm_prefetch((const char *)(w + k) + GEMV_PREFETCH, _MM_HINT_T0);
        __m256 wv[4];
        bf16_pair(_mm256_loadu_si256((const __m256i *)(w + k)), &wv[0], &wv[1]);
        bf16_pair(_mm256_loadu_si256((const __m256i *)(w + k + 16)), &wv[2], &wv[3]);
        for (int m = 0; m < M; m++)
            for (int j = 0; j < 4; j++)
                acc[m][j % ch] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(xf + m * Kp + k + 8 * j), acc[m][j % ch]);
    }
    for (; k < K; k += 16) {                       /* the row's tail, zero padded */
        __m256i v;
        if (K - k >= 16) v = _mm256_loadu_si256((const __m256i *)(w + k));
        else {
            uint16_t tmp[16] = {0};
            memcpy(tmp, w + k, (size_t)(K - k) * 2);
            v = _mm256_loadu_si256((const __m256i *)tmp);
        }
        __m256 we, wo;
        bf16_pair(v, &we, &wo);
        for (int m = 0; m < M; m++) {
            acc[m][0] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xf + m * Kp + k), acc[m][0]);
            acc[m][ch > 1] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xf + m * Kp + k + 8), acc[m][ch > 1]);
        }
    }
    for (int m = 0; m < M; m++)
        out[m] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
}

INLINE __m256i tail_mask(int64_t left) {            /* lanes [0, left) of 8 */
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

INLINE void f32_row_avx2(const float *w, int64_t K, const float *x, int64_t ldx, const int M, float *out) {
    const int ch = GEMV_CHAINS(M);
    __m256 acc[8][4];
    for (int m = 0; m < M; m++)
        for (int c = 0; c < 4; c++) acc[m][c] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {                 /* two 64-byte lines */
        _mm_prefetch((const char *)(w + k) + GEMV_PREFETCH, _MM_HINT_T0);
        _mm_prefetch((const char *)(w + k) + GEMV_PREFETCH + 64, _MM_HINT_T0);
        __m256 wv[4];
        for (int j = 0; j < 4; j++) wv[j] = _mm256_loadu_ps(w + k + 8 * j);
        for (int m = 0; m < M; m++)
            for (int j = 0; j < 4; j++)
                acc[m][j % ch] = _mm256_fmadd_ps(wv[j], _mm256_loadu_ps(x + m * ldx + k + 8 * j), acc[m][j % ch]);
    }
    for (int c = 0; k < K; k += 8, c ^= 1) {       /* the tail, 8 then masked */
        __m256i mk = tail_mask(K - k);
        __m256 wv = _mm256_maskload_ps(w + k, mk);
        for (int m = 0; m < M; m++)
            acc[m][c & (ch > 1)] = _mm256_fmadd_ps(wv, _mm256_maskload_ps(x + m * ldx + k, mk), acc[m][c & (ch > 1)]);
    }
    for (int m = 0; m < M; m++)
        out[m] = hsum256(_mm256_add_ps(_mm256_add_ps(acc[m][0], acc[m][1]), _mm256_add_ps(acc[m][2], acc[m][3])));
}
