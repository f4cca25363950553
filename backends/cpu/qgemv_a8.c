/* Quantized decode GEMV with int8 activations (opt-in: load(..., int8_activations=True)):
 *     y[m, n] = sum_b d[m, b] * (sum_{k in block b} xq[m, k] * q[n, k]) * s[n, group of b]
 * The activation rows are quantized per block of 32 columns (d = amax / 127, xq = round(x / d),
 * half to even), the dot products of one block are summed exactly in int32, then scaled in fp32.
 * This is the scheme llama.cpp's Q4_0 / Q8_0 run on CPU: integer multiply-adds do 32 products
 * per instruction where the exact kernels (qgemv.c) decode each weight to fp32 and FMA it, so
 * decode is bound by memory again instead of by decoding. kernels/reference/int8_activations.py
 * computes the same values with torch (the test oracle); the price is the activations' rounding
 * (relative error ~3e-3 of a projection's output, measured in tests/unit/test_cpu_qgemv_a8.py).
 *
 * Weights are read as core/quant/format.py stores them (wint8: int8 [N, K]; wint4: uint8 [N, K/2],
 * q + 8, low nibble = even column; scales fp32 [N, G]):
 *   wint8  |w| (unsigned) times x signed by w (vpsignb), vpmaddubsw + vpmaddwd: 32 products
 *   wint4  a 32-byte load holds 64 columns; its low nibbles are the even columns and its high
 *          ones the odd, so the activations of each 64 columns are stored evens then odds. The
 *          stored q + 8 (0..15) multiplies directly, so nothing is sign-extended: the 8 * sum(x)
 *          this adds is known from the quantization, per weight group, and taken off once per
 *          row. After vpmaddwd, 32-bit lane j holds columns 8j..8j+7: lanes 0-3 are one block of
 *          32, lanes 4-7 the next, so a vector of per-lane d scales a 64-column block.
 * At batch 1, wint4 reads four weight rows per step (w4a8_rows4_avx2). The activations are
 * quantized with AVX2 too (prepare_row_avx2: the scalar loop's fp32 operations, the same bytes).
 * No sum can saturate: a 16-bit lane adds at most 4 products of 15 * 127 (wint4) or 2 of 128 * 127
 * (wint8). The AVX2 kernels are compiled wherever the compiler targets AVX2 + FMA (AVX-512 hosts
 * included); elsewhere portable C loops give the same integer sums.
 */
#include <math.h>

#include "cpu_common.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_A8_AVX2 1
#endif

#define A8_MAX_ROWS 8
#define A8_ROW_BLOCK 16
#define A8_ROWS4 4           /* weight rows per step of the batch-1 wint4 kernel; divides A8_ROW_BLOCK */
/* bytes ahead of the weight stream: in a decode step's sequence of projections (each a few MiB),
 * prefetching this far ran 10-17% faster than 512 bytes ahead, measured in one process alternating;
 * for wint4 at batch 1 (four rows read as one run) 4096 ran 4% faster than 2048 and 12% faster than 1024 */
#ifndef A8_PREFETCH_W4
#define A8_PREFETCH_W4 4096
#endif
#ifndef A8_PREFETCH_W8
#define A8_PREFETCH_W8 4096
#endif

/* Scratch layout per activation row (xstride bytes of xq, dstride floats of d, G floats of corr):
 *   wint8  xq in column order; d[K / 32]
 *   wint4  xq per 64 columns: 32 even columns, then 32 odd; d per 64 columns as 8 lane scales (d
 *          of the first block x4, of the second x4); corr[g] = sum over group g's blocks of
 *          8 * d * sum(xq), what the unsigned nibbles add to the group's sum */
typedef struct {
    int8_t *xq;
    float *d, *corr;
    int64_t xstride, dstride, G;
} A8Rows;

#if defined(HAVE_A8_AVX2)
/* 8 activations from column i on, as fp32 */
INLINE __m256 load8_f32(const char *x, int bf16, int64_t i) {
    if (!bf16) return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* prepare_a8's scalar loop, 32 columns at a time: the same fp32 operations (max of |x|, d =
 * amax / 127, one multiply by 1 / d, round half to even), so the same bytes */
static void prepare_row_avx2(int bits, const char *xm, int bf16, int64_t nb, int64_t gs, int8_t *qm, float *dm,
                             float *cm, int64_t G) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    /* within each 16 bytes: the 8 even columns, then the 8 odd */
    const __m256i evens_odds = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t g = 0; g < G; g++) cm[g] = 0.0f;
    for (int64_t b = 0; b < nb; b++) {
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = load8_f32(xm, bf16, 32 * b + 8 * j);
            amax = _mm256_max_ps(_mm256_and_ps(v[j], absmask), amax);   /* a NaN lane keeps amax, as a > amax does */
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float d = _mm_cvtss_f32(m4) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int j = 0; j < 4; j++) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], vid));   /* MXCSR: half to even */
        __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        int32_t sum = _mm_cvtsi128_si32(s4);
        __m256i bytes = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])), order);
        if (bits == 8) {
            _mm256_storeu_si256((__m256i *)(qm + 32 * b), bytes);
            dm[b] = d;
            continue;
        }
        int64_t blk = b / 2, half = b % 2;
        __m256i eo = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(bytes, evens_odds), 0xd8);   /* evens, odds */
        _mm_storeu_si128((__m128i *)(qm + 64 * blk + 16 * half), _mm256_castsi256_si128(eo));
        _mm_storeu_si128((__m128i *)(qm + 64 * blk + 32 + 16 * half), _mm256_extracti128_si256(eo, 1));
        for (int j = 0; j < 4; j++) dm[8 * blk + 4 * half + j] = d;
        cm[(32 * b) / gs] += 8.0f * d * (float)sum;
    }
}
#endif

/* The quantization kernels/reference/int8_activations.py does: fp32 division, multiply, round
 * half to even (nearbyintf in the default rounding mode). */
static int prepare_a8(int bits, const void *x, int bf16, int64_t ldx, int64_t M, int64_t K, int64_t G, A8Rows *r) {
    int64_t nb = K / 32, gs = K / G;
    r->xstride = K + 64;                           /* rows 4 KiB apart would share L1 sets */
    r->dstride = bits == 4 ? (K / 64) * 8 : nb;
    r->G = G;
    size_t dbytes = (size_t)(M * r->dstride) * 4, cbytes = ((size_t)(M * G) * 4 + 63) & ~(size_t)63;
    char *buf = scratch(dbytes + cbytes + (size_t)(M * r->xstride));
    if (!buf) return -1;
    r->d = (float *)buf;
    r->corr = (float *)(buf + dbytes);
    r->xq = (int8_t *)(buf + dbytes + cbytes);
    for (int64_t m = 0; m < M; m++) {
        const char *xm = (const char *)x + m * ldx * (bf16 ? 2 : 4);
        int8_t *qm = r->xq + m * r->xstride;
        float *dm = r->d + m * r->dstride, *cm = r->corr + m * G;
#if defined(HAVE_A8_AVX2)
        prepare_row_avx2(bits, xm, bf16, nb, gs, qm, dm, cm, G);
        continue;
#endif
        for (int64_t g = 0; g < G; g++) cm[g] = 0.0f;
        for (int64_t b = 0; b < nb; b++) {
            float v[32], amax = 0.0f;
            for (int i = 0; i < 32; i++) {
                v[i] = x_at(xm, bf16, 32 * b + i);
                float a = v[i] < 0 ? -v[i] : v[i];
                amax = a > amax ? a : amax;
            }
            float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
            int8_t q[32];
            int32_t sum = 0;
            for (int i = 0; i < 32; i++) {
                q[i] = (int8_t)nearbyintf(v[i] * id);
                sum += q[i];
            }
            if (bits == 8) {
                memcpy(qm + 32 * b, q, 32);
                dm[b] = d;
                continue;
            }
            int64_t blk = b / 2, half = b % 2;         /* 64-column block, which 32 of it */
            int8_t *q64 = qm + 64 * blk;
            for (int i = 0; i < 32; i++) {
                int64_t col = 32 * half + i;           /* column within the 64 */
                q64[(col % 2) * 32 + col / 2] = q[i];
            }
            for (int j = 0; j < 4; j++) dm[8 * blk + 4 * half + j] = d;
            cm[(32 * b) / gs] += 8.0f * d * (float)sum;
        }
    }
    return 0;
}

#if defined(HAVE_A8_AVX2)
/* Two accumulators per row where few rows share a weight load, to hide the FMA latency. Their
 * index must be a compile-time constant (STEP's c): a runtime one would keep them in memory. */
#define A8_CHAINS(M) ((M) <= 2 ? 2 : 1)

INLINE void w8a8_row_avx2(const int8_t *w, const float *s, int64_t gs, int64_t G,
                          const A8Rows *r, const int M, float *out) {
    const int ch = A8_CHAINS(M);
    const __m256i ones = _mm256_set1_epi16(1);
    const int64_t per = gs / 32;
    const int8_t *xq = r->xq;
    const float *xd = r->d;
    const int64_t xs = r->xstride, ds = r->dstride;
    __m256 tot[A8_MAX_ROWS];
    for (int m = 0; m < M; m++) tot[m] = _mm256_setzero_ps();
    for (int64_t g = 0, b = 0; g < G; g++) {
        __m256 acc[A8_MAX_ROWS][2];
        for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
#define W8A8_STEP(bb, c)                                                                            \
        {                                                                                           \
            _mm_prefetch((const char *)(w + 32 * (bb)) + A8_PREFETCH_W8, _MM_HINT_T0);              \
            __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 32 * (bb)));                      \
            __m256i aw = _mm256_abs_epi8(wv);          /* -128 -> 0x80: 128 read unsigned */        \
            for (int m = 0; m < M; m++) {                                                           \
                __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + m * xs + 32 * (bb)));        \
                __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv)), ones); \
                acc[m][(c) & (ch - 1)] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p),                     \
                    _mm256_broadcast_ss(xd + m * ds + (bb)), acc[m][(c) & (ch - 1)]);               \
            }                                                                                       \
        }
        int64_t e = b + per;
        for (; b + 2 <= e; b += 2) { W8A8_STEP(b, 0) W8A8_STEP(b + 1, 1) }
        if (b < e) { W8A8_STEP(b, 0) b++; }
#undef W8A8_STEP
        __m256 sg = _mm256_set1_ps(s[g]);
        for (int m = 0; m < M; m++) tot[m] = _mm256_fmadd_ps(_mm256_add_ps(acc[m][0], acc[m][1]), sg, tot[m]);
    }
    for (int m = 0; m < M; m++) out[m] = hsum256(tot[m]);
}

INLINE void w4a8_row_avx2(const uint8_t *w, const float *s, int64_t K, int64_t gs, int64_t G,
                          const A8Rows *r, const int M, float *out) {
    const int ch = A8_CHAINS(M);
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const int lane_groups = G > 1 && gs == 32;     /* two groups per 64 columns: per-lane scales */
    const int64_t blocks = K / 64, per = lane_groups ? 1 : G == 1 ? blocks : gs / 64;
    const int8_t *xq = r->xq;
    const float *xd = r->d;
    const int64_t xs = r->xstride, ds = r->dstride;
    __m256 tot[A8_MAX_ROWS];
    for (int m = 0; m < M; m++) tot[m] = _mm256_setzero_ps();
#define W4A8_STEP(bb, c)                                                                            \
    {                                                                                               \
        _mm_prefetch((const char *)(w + 32 * (bb)) + A8_PREFETCH_W4, _MM_HINT_T0);                  \
        __m256i v = _mm256_loadu_si256((const __m256i *)(w + 32 * (bb)));                           \
        __m256i even = _mm256_and_si256(v, low), odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), low); \
        for (int m = 0; m < M; m++) {                                                               \
            const int8_t *xm = xq + m * xs + 64 * (bb);                                             \
            __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(even, _mm256_loadu_si256((const __m256i *)xm)), \
                                         _mm256_maddubs_epi16(odd, _mm256_loadu_si256((const __m256i *)(xm + 32)))); \
            acc[m][(c) & (ch - 1)] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), \
                _mm256_loadu_ps(xd + m * ds + 8 * (bb)), acc[m][(c) & (ch - 1)]);                   \
        }                                                                                           \
    }
    for (int64_t g = 0, b = 0; b < blocks; g++) {
        __m256 acc[A8_MAX_ROWS][2];
        for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
        int64_t e = b + per;
        for (; b + 2 <= e; b += 2) { W4A8_STEP(b, 0) W4A8_STEP(b + 1, 1) }
        if (b < e) { W4A8_STEP(b, 0) b++; }
        __m256 sw = lane_groups ? _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(s[2 * g])),
                                                       _mm_set1_ps(s[2 * g + 1]), 1)
                                : _mm256_set1_ps(s[g]);
        for (int m = 0; m < M; m++) tot[m] = _mm256_fmadd_ps(_mm256_add_ps(acc[m][0], acc[m][1]), sw, tot[m]);
    }
#undef W4A8_STEP
    for (int m = 0; m < M; m++) {
        const float *cm = r->corr + m * G;
        float c = 0.0f;
        for (int64_t g = 0; g < G; g++) c += s[g] * cm[g];
        out[m] = hsum256(tot[m]) - c;
    }
}

/* sum over groups of s[g] * corr[g]: what the unsigned nibbles added to a row's total */
INLINE float a8_correction(const float *s, const float *corr, int64_t G) {
    int64_t g = 0;
    float c = 0.0f;
    if (G % 8 == 0) {
        __m256 v = _mm256_setzero_ps();
        for (; g < G; g += 8) v = _mm256_fmadd_ps(_mm256_loadu_ps(s + g), _mm256_loadu_ps(corr + g), v);
        c = hsum256(v);
    }
    for (; g < G; g++) c += s[g] * corr[g];
    return c;
}

/* wint4, one activation row (decode at batch 1) against four weight rows at once: the activation
 * loads and lane scales are shared by the four, each row has its own accumulator chain, and the
 * four rows' bytes are prefetched as the one run they are. Against one row at a time this ran
 * 1.28x on the 0.3B decode step's projections (in one process, alternating). Four rows each
 * prefetched on its own ran 0.9x (the stride looked like four streams), and wint8 read four rows
 * at a time ran 0.9x too, so wint8 keeps one row at a time. */
INLINE void w4a8_rows4_avx2(const uint8_t *w, int64_t rowbytes, const float *s, int64_t K, int64_t gs, int64_t G,
                            const A8Rows *r, float *out) {
    const __m256i low = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
    const int lane_groups = G > 1 && gs == 32;
    const int64_t blocks = K / 64, per = lane_groups ? 1 : G == 1 ? blocks : gs / 64;
    const int8_t *xq = r->xq;
    const float *xd = r->d;
    __m256 tot[A8_ROWS4];
    for (int j = 0; j < A8_ROWS4; j++) tot[j] = _mm256_setzero_ps();
    for (int64_t g = 0, b = 0; b < blocks; g++) {
        __m256 acc[A8_ROWS4];
        for (int j = 0; j < A8_ROWS4; j++) acc[j] = _mm256_setzero_ps();
        for (int64_t e = b + per; b < e; b++) {
            const __m256i xe = _mm256_loadu_si256((const __m256i *)(xq + 64 * b));
            const __m256i xo = _mm256_loadu_si256((const __m256i *)(xq + 64 * b + 32));
            const __m256 dv = _mm256_loadu_ps(xd + 8 * b);
            /* the four rows are one contiguous run of 4 * rowbytes: prefetch it in order, 128
             * bytes (what one block of the four consumes) per block */
            _mm_prefetch((const char *)w + A8_PREFETCH_W4 + 128 * b, _MM_HINT_T0);
            _mm_prefetch((const char *)w + A8_PREFETCH_W4 + 128 * b + 64, _MM_HINT_T0);
            for (int j = 0; j < A8_ROWS4; j++) {
                const uint8_t *wj = w + j * rowbytes + 32 * b;
                __m256i v = _mm256_loadu_si256((const __m256i *)wj);
                __m256i even = _mm256_and_si256(v, low), odd = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(even, xe), _mm256_maddubs_epi16(odd, xo));
                acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), dv, acc[j]);
            }
        }
        for (int j = 0; j < A8_ROWS4; j++) {
            const float *sj = s + j * G;
            __m256 sw = lane_groups ? _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_set1_ps(sj[2 * g])),
                                                           _mm_set1_ps(sj[2 * g + 1]), 1)
                                    : _mm256_set1_ps(sj[g]);
            tot[j] = _mm256_fmadd_ps(acc[j], sw, tot[j]);
        }
    }
    for (int j = 0; j < A8_ROWS4; j++) out[j] = hsum256(tot[j]) - a8_correction(s + j * G, r->corr, G);
}
#endif

/* ---- portable C: the same integer block sums ------------------------------------------------- */
#if !defined(HAVE_A8_AVX2)
static void a8_row_portable(int bits, const uint8_t *w, const float *s, int64_t K, int64_t gs,
                            const A8Rows *r, int M, float *out) {
    for (int m = 0; m < M; m++) {
        const int8_t *xm = r->xq + m * r->xstride;
        float tot = 0;
        for (int64_t b = 0; b < K / 32; b++) {
            int32_t sum = 0;
            for (int i = 0; i < 32; i++) {
                int64_t k = 32 * b + i;
                int qw, qx;
                if (bits == 8) {
                    qw = ((const int8_t *)w)[k];
                    qx = xm[k];
                } else {
                    qw = (int)((w[k >> 1] >> ((k & 1) * 4)) & 15) - 8;
                    int64_t col = k % 64;
                    qx = xm[(k - col) + (col % 2) * 32 + col / 2];
                }
                sum += qw * qx;
            }
            float d = bits == 8 ? r->d[m * r->dstride + b] : r->d[m * r->dstride + 8 * (b / 2) + 4 * (b % 2)];
            tot += (float)sum * d * s[(32 * b) / gs];
        }
        out[m] = tot;
    }
}
#endif

/* Can ernie_qgemv_a8 take this shape? (whole blocks of 32 columns, 64 for wint4; groups of
 * whole blocks) */
int ernie_qgemv_a8_supported(int bits, int64_t K, int64_t G) {
    if (G <= 0 || K % G) return 0;
    int64_t gs = K / G;
    if (bits == 8) return K % 32 == 0 && gs % 32 == 0;
    if (bits == 4) return K % 64 == 0 && (G == 1 || gs == 32 || gs % 64 == 0);
    return 0;
}

/* x [M, K] bf16 or fp32 (row stride ldx), w the packed rows, s [N, G]; y [M, N] in x's dtype (row
 * stride ldy); M <= 8. Returns 0, -1 when the scratch could not be allocated, -2 for a shape
 * ernie_qgemv_a8_supported refuses. */
int ernie_qgemv_a8(int bits, const void *x, int bf16, int64_t ldx, const uint8_t *w, const float *s, int64_t G,
                   void *y, int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    if (M <= 0) return 0;
    if (M > A8_MAX_ROWS || !ernie_qgemv_a8_supported(bits, K, G)) return -2;
    A8Rows r;
    if (prepare_a8(bits, x, bf16, ldx, M, K, G, &r)) return -1;
    int64_t gs = K / G, rowbytes = bits == 8 ? K : K / 2, blocks = (N + A8_ROW_BLOCK - 1) / A8_ROW_BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t end = (blk + 1) * A8_ROW_BLOCK < N ? (blk + 1) * A8_ROW_BLOCK : N;
        int64_t n = blk * A8_ROW_BLOCK;
#if defined(HAVE_A8_AVX2)
        if (M == 1 && bits == 4)
            for (; n + A8_ROWS4 <= end; n += A8_ROWS4) {
                float out[A8_ROWS4];
                w4a8_rows4_avx2(w + n * rowbytes, rowbytes, s + n * G, K, gs, G, &r, out);
                for (int j = 0; j < A8_ROWS4; j++) {
                    if (bf16) ((uint16_t *)y)[n + j] = f32_to_bf16(out[j]);
                    else ((float *)y)[n + j] = out[j];
                }
            }
#endif
        for (; n < end; n++) {
            float out[A8_MAX_ROWS] = {0};
            const uint8_t *wn = w + n * rowbytes;
            const float *sn = s + n * G;
#if defined(HAVE_A8_AVX2)
            if (bits == 8) {
                SPECIALIZE(w8a8_row_avx2, (const int8_t *)wn, sn, gs, G, &r)
            } else {
                SPECIALIZE(w4a8_row_avx2, wn, sn, K, gs, G, &r)
            }
#else
            a8_row_portable(bits, wn, sn, K, gs, &r, (int)M, out);
#endif
            for (int64_t m = 0; m < M; m++) {
                if (bf16) ((uint16_t *)y)[m * ldy + n] = f32_to_bf16(out[m]);
                else ((float *)y)[m * ldy + n] = out[m];
            }
        }
    }
    return 0;
}

/* Which inner loops this build has: 0 portable C, 1 AVX2. */
int ernie_qgemv_a8_isa(void) {
#if defined(HAVE_A8_AVX2)
    return 1;
#else
    return 0;
#endif
}
