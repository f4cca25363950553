/* Weight-only quantized small-batch linear for decode on CPU (M <= QGEMV_MAX_ROWS rows):
 *     y[m, n] = sum_k x[m, k] * q[n, k] * s[n, k / group]      fp32 accumulation
 * read from the packed weight exactly as core/quant/format.py stores it (wint8: int8 [N, K];
 * wint4: uint8 [N, K/2], q + 8, low nibble = even column; scales fp32 [N, G]). Reading the stored
 * layout means load copies nothing: one copy per weight, and a tied embedding table and LM head
 * share it (the lookup reads the same rows).
 *
 * Decode reads every weight once, so each kernel's job is to turn bytes into multiply-adds faster
 * than memory delivers them. Activations are never quantized: the weights are decoded exactly.
 *   wint8        16 int8 -> fp32 per vpmovsxbd + vcvtdq2ps, FMA with fp32 activations
 *   wint4, bf16  a 64-byte line holds 128 weights; lane i of its 32 16-bit lanes holds columns
 *                4i..4i+3 in its four nibbles. vpermw looks each nibble up in a table of the 16
 *                values (q - 8 as bf16, exact), so one shift + one permute gives 32 bf16 weights,
 *                and vdpbf16ps does 32 multiply-adds. The activations are permuted once per call
 *                to match (x[4i + j] beside nibble j).
 *   wint4, fp32  the same with 16 32-bit lanes (8 nibbles each), vpermps and fp32 FMA
 * In both wint4 layouts fp32 lane j of a line covers columns 8j..8j+7, so a group of 32 or 64
 * columns is a fixed set of lanes: one vector of per-lane scales per line applies them.
 * Without AVX-512, AVX2 + FMA kernels (qgemv_avx2.h) decode the same layouts exactly.
 * Rows are split across the OpenMP threads; each output is one row's sum, so a fused weight gives
 * exactly the unfused values. bf16 outputs round to nearest even, as torch's cast does.
 *
 * ernie_qdequant writes rows of q * s (fp32, or rounded to bf16 as torch's .to does): prefill runs
 * a GEMM on them, a row chunk at a time.
 */
#include "cpu_common.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define QGEMV_MAX_ROWS 8
#define ROW_BLOCK 16
#ifndef PREFETCH
#define PREFETCH 1024   /* bytes ahead of the weight stream: the hardware prefetcher alone lags */
#endif

static inline void store_y(void *y, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define HAVE_AVX512 1

/* chains of independent accumulators per activation row: enough to hide FMA latency at M = 1
 * without running out of the 32 vector registers at M = 8 */
#define CHAINS(M) ((M) == 1 ? 4 : (M) == 2 ? 2 : 1)

/* ---- wint8: fp32 activations xf [M, Kp] (zero padded) ---------------------------------------- */
INLINE void w8_row(const int8_t *w, const float *s, int64_t gs, int64_t G,
                   const float *xf, int64_t Kp, const int M, float *out) {
    enum { C = 4 };
    const int ch = CHAINS(M);
    __m512 tot[QGEMV_MAX_ROWS];
    for (int m = 0; m < M; m++) tot[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        int64_t k = g * gs, k1 = k + gs;
        __m512 acc[QGEMV_MAX_ROWS][C];
        for (int m = 0; m < M; m++)
            for (int c = 0; c < C; c++) acc[m][c] = _mm512_setzero_ps();
        for (; k + 64 <= k1; k += 64) {
            _mm_prefetch((const char *)(w + k) + PREFETCH, _MM_HINT_T0);
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k))));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 16))));
            __m512 w2 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 32))));
            __m512 w3 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(w + k + 48))));
            for (int m = 0; m < M; m++) {
                const float *xm = xf + m * Kp + k;
                acc[m][0 % ch] = _mm512_fmadd_ps(w0, _mm512_load_ps(xm), acc[m][0 % ch]);
                acc[m][1 % ch] = _mm512_fmadd_ps(w1, _mm512_load_ps(xm + 16), acc[m][1 % ch]);
                acc[m][2 % ch] = _mm512_fmadd_ps(w2, _mm512_load_ps(xm + 32), acc[m][2 % ch]);
                acc[m][3 % ch] = _mm512_fmadd_ps(w3, _mm512_load_ps(xm + 48), acc[m][3 % ch]);
            }
        }
        for (int c = 1; k < k1; k += 16, c ^= 1) {      /* groups of 32, or a row's tail */
            int64_t left = k1 - k;
            __mmask16 mk = left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1u);
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, w + k)));
            for (int m = 0; m < M; m++) {
                if (c && ch > 1)
                    acc[m][1] = _mm512_fmadd_ps(wv, _mm512_load_ps(xf + m * Kp + k), acc[m][1]);
                else
                    acc[m][0] = _mm512_fmadd_ps(wv, _mm512_load_ps(xf + m * Kp + k), acc[m][0]);
            }
        }
        __m512 sg = _mm512_set1_ps(s[g]);
        for (int m = 0; m < M; m++) {
            __m512 a = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
            tot[m] = _mm512_fmadd_ps(a, sg, tot[m]);
        }
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(tot[m]);
}

/* ---- wint4 ----------------------------------------------------------------------------------- */
/* lane j of a 128-column line -> its group, for groups of 32 and 64 columns */
static const int32_t LANE_GROUP32[16] = {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3};
static const int32_t LANE_GROUP64[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};

INLINE __m512i line_load(const uint8_t *w, int64_t bytes_left) {
    _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
    if (bytes_left >= 64) return _mm512_loadu_si512(w);
    return _mm512_maskz_loadu_epi8((__mmask64)((1ull << bytes_left) - 1ull), w);
}

/* per-lane scales of line b (groups of 32 or 64) */
INLINE __m512 line_scales(const float *s, int64_t b, int64_t gs, int64_t G) {
    int64_t per = 128 / gs, g0 = b * per, left = G - g0;
    __mmask16 mk = (__mmask16)(left >= per ? (1u << per) - 1u : (1u << left) - 1u);
    __m512i idx = _mm512_loadu_si512(gs == 32 ? LANE_GROUP32 : LANE_GROUP64);
    return _mm512_permutexvar_ps(idx, _mm512_maskz_loadu_ps(mk, s + g0));
}

#if defined(__AVX512BF16__)
#define HAVE_W4_BF16 1
/* xb: [M][lines][4][32] bf16, xb[m][b][j][i] = x[m][128 b + 4 i + j] (zero padded) */
INLINE void w4_bf16_line(__m512i v, __m512i tab, __m512bh wq[4]) {
    wq[0] = (__m512bh)_mm512_permutexvar_epi16(v, tab);
    wq[1] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tab);
    wq[2] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 8), tab);
    wq[3] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 12), tab);
}

INLINE void w4_bf16_row(const uint8_t *w, const float *s, int64_t K, int64_t gs, int64_t G,
                        const uint16_t *xb, int64_t lines, const int M, float *out) {
    const int ch = CHAINS(M);
    const int64_t rowbytes = K / 2, xstride = lines * 128;
    const __m512i tab = _mm512_set_epi16(          /* entry e: bf16(e % 16 - 8) */
        0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000,
        0xbf80, 0xc000, 0xc040, 0xc080, 0xc0a0, 0xc0c0, 0xc0e0, 0xc100,
        0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000, 0x3f80, 0x0000,
        0xbf80, 0xc000, 0xc040, 0xc080, 0xc0a0, 0xc0c0, 0xc0e0, 0xc100);
    __m512 tot[QGEMV_MAX_ROWS];
    for (int m = 0; m < M; m++) tot[m] = _mm512_setzero_ps();
    __m512bh wq[4];
    if (G > 1 && gs <= 64) {                       /* several groups per line: per-lane scales */
        for (int64_t b = 0; b < lines; b++) {
            w4_bf16_line(line_load(w + 64 * b, rowbytes - 64 * b), tab, wq);
            __m512 sv = line_scales(s, b, gs, G);
            for (int m = 0; m < M; m++) {
                const __m512bh *xv = (const __m512bh *)(xb + m * xstride + b * 128);
                __m512 a = _mm512_dpbf16_ps(_mm512_setzero_ps(), wq[0], xv[0]);
                __m512 c = _mm512_dpbf16_ps(_mm512_setzero_ps(), wq[1], xv[1]);
                a = _mm512_dpbf16_ps(a, wq[2], xv[2]);
                c = _mm512_dpbf16_ps(c, wq[3], xv[3]);
                tot[m] = _mm512_fmadd_ps(_mm512_add_ps(a, c), sv, tot[m]);
            }
        }
    } else {                                       /* a group spans whole lines */
        int64_t per = G == 1 ? lines : gs / 128;
        for (int64_t g = 0, b = 0; g < G; g++) {
            __m512 acc[QGEMV_MAX_ROWS][4];
            for (int m = 0; m < M; m++)
                for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();
            for (int64_t e = b + per; b < e; b++) {
                w4_bf16_line(line_load(w + 64 * b, rowbytes - 64 * b), tab, wq);
                for (int m = 0; m < M; m++) {
                    const __m512bh *xv = (const __m512bh *)(xb + m * xstride + b * 128);
                    for (int j = 0; j < 4; j++) acc[m][j % ch] = _mm512_dpbf16_ps(acc[m][j % ch], wq[j], xv[j]);
                }
            }
            __m512 sg = _mm512_set1_ps(s[g]);
            for (int m = 0; m < M; m++) {
                __m512 a = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
                tot[m] = _mm512_fmadd_ps(a, sg, tot[m]);
            }
        }
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(tot[m]);
}
#endif

/* xf4: [M][lines][8][16] fp32, xf4[m][b][j][i] = x[m][128 b + 8 i + j] (zero padded) */
INLINE void w4_f32_line(__m512i v, __m512 tab, __m512 wq[8]) {
    for (int j = 0; j < 8; j++) wq[j] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * j), tab);
}

INLINE void w4_f32_row(const uint8_t *w, const float *s, int64_t K, int64_t gs, int64_t G,
                       const float *xf4, int64_t lines, const int M, float *out) {
    const int ch = CHAINS(M);
    const int64_t rowbytes = K / 2, xstride = lines * 128;
    const __m512 tab = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8);
    __m512 tot[QGEMV_MAX_ROWS];
    for (int m = 0; m < M; m++) tot[m] = _mm512_setzero_ps();
    __m512 wq[8];
    int64_t per = (G > 1 && gs <= 64) ? 1 : (G == 1 ? lines : gs / 128);
    for (int64_t g = 0, b = 0; b < lines; g++) {
        __m512 acc[QGEMV_MAX_ROWS][4];
        for (int m = 0; m < M; m++)
            for (int c = 0; c < 4; c++) acc[m][c] = _mm512_setzero_ps();
        for (int64_t e = b + per; b < e; b++) {
            w4_f32_line(line_load(w + 64 * b, rowbytes - 64 * b), tab, wq);
            for (int m = 0; m < M; m++) {
                const __m512 *xv = (const __m512 *)(xf4 + m * xstride + b * 128);
                for (int j = 0; j < 8; j++) acc[m][j % ch] = _mm512_fmadd_ps(wq[j], xv[j], acc[m][j % ch]);
            }
        }
        __m512 sv = per == 1 && G > 1 && gs <= 64 ? line_scales(s, b - 1, gs, G) : _mm512_set1_ps(s[g]);
        for (int m = 0; m < M; m++) {
            __m512 a = _mm512_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]), _mm512_add_ps(acc[m][2], acc[m][3]));
            tot[m] = _mm512_fmadd_ps(a, sv, tot[m]);
        }
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(tot[m]);
}

#elif defined(__AVX2__) && defined(__FMA__)
#define HAVE_QGEMV_AVX2 1
#include "qgemv_avx2.h"
#endif

/* ---- portable C: the same sums, one weight at a time ----------------------------------------- */
static void row_portable(int bits, const uint8_t *w, const float *s, int64_t gs, int64_t G,
                         const float *xf, int64_t Kp, int M, float *out) {
    for (int m = 0; m < M; m++) {
        float tot = 0;
        for (int64_t g = 0; g < G; g++) {
            float acc[16] = {0};                       /* 16 partial sums, as the vector lanes */
            for (int64_t k = g * gs; k < (g + 1) * gs; k++) {
                int q = bits == 8 ? (int)((const int8_t *)w)[k]
                                  : (int)((w[k >> 1] >> ((k & 1) * 4)) & 15) - 8;
                acc[k & 15] += (float)q * xf[m * Kp + k];
            }
            float a = 0;
            for (int j = 0; j < 16; j++) a += acc[j];
            tot += a * s[g];
        }
        out[m] = tot;
    }
}

/* The activations in the order the row kernel reads them; returns its row stride. */
static int64_t prepare_x(int kind, const void *x, int bf16, int64_t ldx, int64_t M, int64_t K, void **out) {
    int64_t lines = (K + 127) / 128, stride = lines * 128;
    if (kind == 0 || kind == 4) stride += 16;   /* rows 4 KiB apart would share L1 sets (M rows + weights) */
    size_t elem = kind == 1 ? 2 : 4;
    char *buf = scratch((size_t)(M * stride) * elem);
    *out = buf;
    if (!buf) return -1;
    memset(buf, 0, (size_t)(M * stride) * elem);
    for (int64_t m = 0; m < M; m++) {
        const char *xm = (const char *)x + m * ldx * (bf16 ? 2 : 4);
        for (int64_t k = 0; k < K; k++) {
            int64_t b = k / 128, c = k % 128, at;
            if (kind == 1) at = b * 128 + (c % 4) * 32 + c / 4;       /* wint4 bf16: [line][j][i] */
            else if (kind == 2) at = b * 128 + (c % 8) * 16 + c / 8;  /* wint4 fp32 */
            else if (kind == 4) at = (k & ~(int64_t)63) + (k % 8) * 8 + (k % 64) / 8;   /* wint4 AVX2 */
            else at = k;                                              /* wint8 / portable: as is */
            if (kind == 1) ((uint16_t *)buf)[m * stride + at] = ((const uint16_t *)xm)[k];
            else ((float *)buf)[m * stride + at] = x_at(xm, bf16, k);
        }
    }
    return stride;
}

/* x [M, K] bf16 or fp32 (row stride ldx), w the packed rows, s [N, G]; y [M, N] in x's dtype
 * (row stride ldy). Returns 0, or -1 when the scratch buffer could not be allocated. */
int ernie_qgemv(int bits, const void *x, int bf16, int64_t ldx, const uint8_t *w, const float *s, int64_t G,
                void *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    if (M <= 0) return 0;                          /* an empty batch: SPECIALIZE has no 0 case */
    int64_t gs = K / G;
    int kind = 0;
#if defined(HAVE_AVX512)
    kind = bits == 4 ? 2 : 3;
#if defined(HAVE_W4_BF16)
    if (bits == 4 && bf16) kind = 1;
#endif
#elif defined(HAVE_QGEMV_AVX2)
    if (bits == 8) kind = 5;
    else if (G == 1 || gs == 32 || gs % 64 == 0) kind = 4;   /* other group sizes: portable */
#endif
    void *xp;
    int64_t xs = prepare_x(kind == 3 || kind == 5 ? 0 : kind, x, bf16, ldx, M, K, &xp);
    if (xs < 0) return -1;
    int64_t rowbytes = bits == 8 ? K : K / 2, blocks = (N + ROW_BLOCK - 1) / ROW_BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t end = (blk + 1) * ROW_BLOCK < N ? (blk + 1) * ROW_BLOCK : N;
        for (int64_t n = blk * ROW_BLOCK; n < end; n++) {
            float out[QGEMV_MAX_ROWS] = {0};
            const uint8_t *wn = w + n * rowbytes;
            const float *sn = s + n * G;
            switch (kind) {
#if defined(HAVE_W4_BF16)
            case 1: SPECIALIZE(w4_bf16_row, wn, sn, K, gs, G, (const uint16_t *)xp, xs / 128) break;
#endif
#if defined(HAVE_AVX512)
            case 2: SPECIALIZE(w4_f32_row, wn, sn, K, gs, G, (const float *)xp, xs / 128) break;
            case 3: SPECIALIZE(w8_row, (const int8_t *)wn, sn, gs, G, (const float *)xp, xs) break;
#endif
#if defined(HAVE_QGEMV_AVX2)
            case 4: SPECIALIZE(w4_row_avx2, wn, sn, K, gs, G, (const float *)xp, xs) break;
            case 5: SPECIALIZE(w8_row_avx2, (const int8_t *)wn, sn, gs, G, (const float *)xp, xs) break;
#endif
            default: row_portable(bits, wn, sn, gs, G, (const float *)xp, xs, (int)M, out);
            }
            for (int64_t m = 0; m < M; m++) store_y(y, bf16, m * ldy + n, out[m]);
        }
    }
    return 0;
}

/* Rows [n0, n1) of the weight as q * s into out [n1 - n0, K]: the values kernels/reference/dequant.py
 * computes, for a prefill GEMM. form 0: fp32; 1: bf16 rounded to nearest even; 2: those bf16
 * values widened back to fp32 in one pass (the fp32 GEMM of a bf16 model on a CPU without bf16
 * arithmetic, prefill_gemm.py). */
void ernie_qdequant(int bits, const uint8_t *w, const float *s, int64_t G, void *out, int form,
                    int64_t n0, int64_t n1, int64_t K, int threads) {
    int64_t gs = K / G, rowbytes = bits == 8 ? K : K / 2;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *wn = w + n * rowbytes;
        const float *sn = s + n * G;
        float *of = (float *)out + (n - n0) * K;
        uint16_t *ob = (uint16_t *)out + (n - n0) * K;
        float tmp[256];
        int64_t step = gs < 256 ? gs : 256;                /* columns at a time, all in one group */
        for (int64_t k0 = 0; k0 < K; k0 += step) {
            int64_t len = K - k0 < step ? K - k0 : step;
            float sc = sn[k0 / gs];
            float *dst = form == 1 ? tmp : of + k0;
            dequant_run(bits, bits == 8 ? (const void *)(wn + k0) : (const void *)(wn + k0 / 2), len, sc, form == 2,
                        dst);
            if (form == 1)
                for (int64_t k = 0; k < len; k++) ob[k0 + k] = f32_to_bf16(tmp[k]);
        }
    }
}

/* Which inner loops this build has, for reports: 0 portable C, 1 AVX2, 2 AVX-512, 3 with AVX512-BF16. */
int ernie_qgemv_isa(void) {
#if defined(HAVE_W4_BF16)
    return 3;
#elif defined(HAVE_AVX512)
    return 2;
#elif defined(HAVE_QGEMV_AVX2)
    return 1;
#else
    return 0;
#endif
}
