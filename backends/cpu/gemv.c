/* Small-batch linear y[m, n] = sum_k x[m, k] * w[n, k] for decode on CPU (M = a few rows).
 *
 * Decode is a GEMV over every weight: memory-bound, so the job is to stream each weight row once
 * at full bandwidth. torch's bf16 GEMV converts to fp32 in its inner loop and reads ~8 GB/s a
 * core here; AVX512-BF16's vdpbf16ps does 32 bf16 multiply-adds per instruction into fp32
 * accumulators, enough to keep up with memory. Rows are split across the OpenMP threads (the
 * libgomp torch already loaded, so one thread pool); each output is one row's dot product, so a
 * fused [q;k;v] or [gate;up] weight gives exactly the values of the unfused ones.
 * Without AVX-512, AVX2 + FMA (gemv_avx2.h) reads each weight row once for all M rows.
 * Accumulation is fp32; bf16 outputs round to nearest even, as torch's cast does.
 */
#include "cpu_common.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define HAVE_GEMV_AVX2 1
#include "gemv_avx2.h"
#endif

#define ROW_BLOCK 16

#if defined(__AVX512BF16__)
static float dot_bf16(const uint16_t *x, const uint16_t *w, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(x + k), (__m512bh)_mm512_loadu_si512(w + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(x + k + 32),
                              (__m512bh)_mm512_loadu_si512(w + k + 32));
    }
    for (; k < K; k += 32) {
        int64_t left = K - k;
        __mmask32 m = left >= 32 ? 0xffffffffu : ((1u << left) - 1u);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(m, x + k),
                              (__m512bh)_mm512_maskz_loadu_epi16(m, w + k));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#else
static float dot_bf16(const uint16_t *x, const uint16_t *w, int64_t K) {
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
        for (int j = 0; j < 16; j++) acc[j] += bf16_to_f32(x[k + j]) * bf16_to_f32(w[k + j]);
    float s = 0;
    for (; k < K; k++) s += bf16_to_f32(x[k]) * bf16_to_f32(w[k]);
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}
#endif

#if defined(__AVX512F__)
static float dot_f32(const float *x, const float *w, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), a1);
    }
    for (; k < K; k += 16) {
        int64_t left = K - k;
        __mmask16 m = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1u);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), _mm512_maskz_loadu_ps(m, w + k), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#else
static float dot_f32(const float *x, const float *w, int64_t K) {
    float acc[16] = {0};
    int64_t k = 0;
    for (; k + 16 <= K; k += 16)
        for (int j = 0; j < 16; j++) acc[j] += x[k + j] * w[k + j];
    float s = 0;
    for (; k < K; k++) s += x[k] * w[k];
    for (int j = 0; j < 16; j++) s += acc[j];
    return s;
}
#endif

/* x [M, K] (row stride ldx), w [N, K] contiguous rows, y [M, N] (row stride ldy). `threads` is
 * passed per call (torch.get_num_threads()): OpenMP's thread count is per calling thread, and the
 * server calls from its engine thread. */
void ernie_gemv_bf16(const uint16_t *x, int64_t ldx, const uint16_t *w, uint16_t *y, int64_t ldy,
                     int64_t M, int64_t N, int64_t K, int threads) {
    if (M <= 0) return;                            /* an empty batch: SPECIALIZE has no 0 case */
    int64_t blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
#if defined(HAVE_GEMV_AVX2)
    float *xf;
    int64_t Kp = M <= 8 ? prepare_bf16(x, ldx, M, K, &xf) : -1;
    if (Kp > 0) {                                  /* else (no scratch, M > 8): the plain loop */
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int64_t b = 0; b < blocks; b++) {
            int64_t end = (b + 1) * ROW_BLOCK < N ? (b + 1) * ROW_BLOCK : N;
            for (int64_t n = b * ROW_BLOCK; n < end; n++) {
                float out[8];
                SPECIALIZE(bf16_row_avx2, w + n * K, K, xf, Kp)
                for (int64_t m = 0; m < M; m++) y[m * ldy + n] = f32_to_bf16(out[m]);
            }
        }
        return;
    }
#endif
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t end = (b + 1) * ROW_BLOCK < N ? (b + 1) * ROW_BLOCK : N;
        for (int64_t n = b * ROW_BLOCK; n < end; n++)
            for (int64_t m = 0; m < M; m++)
                y[m * ldy + n] = f32_to_bf16(dot_bf16(x + m * ldx, w + n * K, K));
    }
}

void ernie_gemv_f32(const float *x, int64_t ldx, const float *w, float *y, int64_t ldy,
                    int64_t M, int64_t N, int64_t K, int threads) {
    if (M <= 0) return;                            /* an empty batch: SPECIALIZE has no 0 case */
    int64_t blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t end = (b + 1) * ROW_BLOCK < N ? (b + 1) * ROW_BLOCK : N;
#if defined(HAVE_GEMV_AVX2)
        if (M <= 8) {                              /* callers pass M <= 8; more: the plain loop */
            for (int64_t n = b * ROW_BLOCK; n < end; n++) {
                float out[8];
                SPECIALIZE(f32_row_avx2, w + n * K, K, x, ldx)
                for (int64_t m = 0; m < M; m++) y[m * ldy + n] = out[m];
            }
            continue;
        }
#endif
        for (int64_t n = b * ROW_BLOCK; n < end; n++)
            for (int64_t m = 0; m < M; m++)
                y[m * ldy + n] = dot_f32(x + m * ldx, w + n * K, K);
    }
}

/* Which inner loops this build has, for reports. */
int ernie_gemv_isa(void) {   /* 0 portable C, 1 AVX2, 2 AVX-512, 3 AVX-512 with AVX512-BF16 */
#if defined(__AVX512BF16__)
    return 3;
#elif defined(__AVX512F__)
    return 2;
#elif defined(HAVE_GEMV_AVX2)
    return 1;
#else
    return 0;
#endif
}
