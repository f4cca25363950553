/* Prefill-sized linear y[m, n] = sum_k x[m, k] * w[n, k] (M = tens to thousands of rows) on CPUs
 * whose widest vector unit is AVX2.
 *
 * Prefill is compute-bound: each weight is used once per row of x. torch's fp32 GEMM (MKL) ran
 * 60-90 GFLOP/s on the 0.3B projections here (AVX2 Zen3, 2 cores, 156 GFLOP/s of FMA), and bf16 or
 * quantized weights had to be widened to fp32 in memory first, a whole extra pass over the
 * weights. Here x is packed once per call, transposed in panels of 16 rows ([k][16]). Each thread
 * takes blocks of about NB weight rows; a block is widened (bf16) or dequantized (wint8/wint4: the
 * reference's q * s, rounded to bf16 for a bf16 model) KC columns at a time into an L2 buffer.
 * The micro-kernel multiplies one x panel's KC columns (in L1) by NR weight rows as outer
 * products: 2 x 6 vector accumulators in registers, each weight broadcast, 8 loads per 12 FMAs;
 * the block's rows run against one panel before the next. Accumulation is fp32, every output
 * summed along k in the same order whatever its tile (so a fused [gate; up] gives the unfused
 * values); bf16 outputs round to nearest even once.
 */
#include "cpu_common.h"

#define PM 16          /* rows of x per packed panel: two 8-lane vectors */
#define NR 6           /* weight rows per micro-tile: 2 x NR accumulators + 2 x + 1 broadcast <= 16 ymm */
#define KC 256         /* columns per pass: an x panel's slice (PM * KC * 4 = 16 KiB) stays in L1 */
#define NB 240         /* weight rows per block, widened KC columns at a time: 240 KiB in L2 */
#define MC 128         /* rows of x per pass over the weights (bounds the fp32 sums) */

enum { W_F32 = 0, W_BF16 = 1, W_INT4 = 4, W_INT8 = 8 };

/* weight rows [n, n + nr) columns [k0, k0 + kc) as fp32 into buf [nr][KC]; round: dequantized
 * values rounded to bf16 (a bf16 model's weights, as the reference casts them) */
static void load_tile(int kind, const void *w, const float *s, int64_t G, int64_t K, int64_t n, int nr,
                      int64_t k0, int64_t kc, int round, float *buf) {
    int64_t gs = G ? K / G : K;
    for (int j = 0; j < nr; j++) {
        float *dst = buf + j * KC;
        if (kind == W_BF16) {
            const uint16_t *src = (const uint16_t *)w + (n + j) * K + k0;
            for (int64_t k = 0; k < kc; k++) dst[k] = bf16_to_f32(src[k]);
        } else if (kind == W_F32) {
            memcpy(dst, (const float *)w + (n + j) * K + k0, (size_t)kc * 4);
        } else {
            const float *sn = s + (n + j) * G;
            for (int64_t g0 = k0; g0 < k0 + kc;) {            /* runs of one scale */
                int64_t g1 = (g0 / gs + 1) * gs;
                if (g1 > k0 + kc) g1 = k0 + kc;
                const void *q = kind == W_INT8 ? (const void *)((const int8_t *)w + (n + j) * K + g0)
                                               : (const void *)((const uint8_t *)w + (n + j) * (K / 2) + g0 / 2);
                dequant_run(kind, q, g1 - g0, sn[g0 / gs], round, dst + (g0 - k0));
                g0 = g1;
            }
        }
    }
}

/* x rows [m0, m0 + PM) as the panel [K][PM] (rows past M are zeros) */
static void pack_panel(const void *x, int xbf16, int64_t ldx, int64_t M, int64_t m0, int64_t K, float *panel) {
    for (int i = 0; i < PM; i++) {
        int64_t m = m0 + i;
        if (m >= M) {
            for (int64_t k = 0; k < K; k++) panel[k * PM + i] = 0.0f;
        } else if (xbf16) {
            const uint16_t *row = (const uint16_t *)x + m * ldx;
            for (int64_t k = 0; k < K; k++) panel[k * PM + i] = bf16_to_f32(row[k]);
        } else {
            const float *row = (const float *)x + m * ldx;
            for (int64_t k = 0; k < K; k++) panel[k * PM + i] = row[k];
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#define HAVE_GEMM_AVX2 1
/* acc [NR][PM] += panel [kc][PM] x tile rows [nr][KC] (the first kc columns), nr known at compile time */
INLINE void micro(const float *panel, const float *t, int64_t kc, const int nr, float *acc) {
    __m256 c0[NR], c1[NR];
    for (int j = 0; j < nr; j++) {
        c0[j] = _mm256_load_ps(acc + j * PM);
        c1[j] = _mm256_load_ps(acc + j * PM + 8);
    }
    /* unrolled 4: +8% over the plain loop (in-process A/B over the 0.3B projections) */
#pragma GCC unroll 4
    for (int64_t k = 0; k < kc; k++) {
        __m256 a0 = _mm256_load_ps(panel + k * PM), a1 = _mm256_load_ps(panel + k * PM + 8);
        for (int j = 0; j < nr; j++) {
            __m256 b = _mm256_broadcast_ss(t + j * KC + k);   /* constant row offsets: one address register */
            c0[j] = _mm256_fmadd_ps(a0, b, c0[j]);
            c1[j] = _mm256_fmadd_ps(a1, b, c1[j]);
        }
    }
    for (int j = 0; j < nr; j++) {
        _mm256_store_ps(acc + j * PM, c0[j]);
        _mm256_store_ps(acc + j * PM + 8, c1[j]);
    }
}
#else
INLINE void micro(const float *panel, const float *t, int64_t kc, const int nr, float *acc) {
    for (int64_t k = 0; k < kc; k++)
        for (int j = 0; j < nr; j++)
            for (int i = 0; i < PM; i++) acc[j * PM + i] += panel[k * PM + i] * t[j * KC + k];
}
#endif

static void micro_any(const float *panel, const float *t, int64_t kc, int nr, float *acc) {
    switch (nr) {   /* every edge width specialized: its accumulators stay in registers */
    case 1: micro(panel, t, kc, 1, acc); break;
    case 2: micro(panel, t, kc, 2, acc); break;
    case 3: micro(panel, t, kc, 3, acc); break;
    case 4: micro(panel, t, kc, 4, acc); break;
    case 5: micro(panel, t, kc, 5, acc); break;
    default: micro(panel, t, kc, NR, acc); break;
    }
}

/* x [M, K] bf16 or fp32 (row stride ldx); w [N, K] by kind: fp32, bf16, wint8 (int8 q) or wint4 (two
 * columns a byte, low nibble first, q + 8), with s [N, G] fp32 scales; round: dequantized weights
 * rounded to bf16 (a bf16 model). y [M, N] (row stride ldy) fp32 or bf16. Returns 0, or -1 when out
 * of memory for the packed x (nothing written then). */
int ernie_gemm(int kind, const void *x, int xbf16, int64_t ldx, const void *w, const float *s, int64_t G,
               int round, void *y, int ybf16, int64_t ldy, int64_t M, int64_t N, int64_t K, int threads) {
    int64_t panels = (M + PM - 1) / PM;
    /* weight blocks of nb rows (a multiple of NR, about NB), as many as a multiple of the threads */
    int64_t blocks = (N + NB - 1) / NB;
    blocks = (blocks + threads - 1) / threads * threads;
    int64_t nb = ((N + blocks - 1) / blocks + NR - 1) / NR * NR;
    blocks = (N + nb - 1) / nb;
    float *xp = (float *)aligned_alloc(64, (size_t)(panels * PM * K * 4 + 63) & ~(size_t)63);
    if (!xp) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) pack_panel(x, xbf16, ldx, M, p * PM, K, xp + p * PM * K);
        float *wb = (float *)scratch((size_t)nb * KC * 4 + (size_t)MC * nb * 4);
        if (!wb) {
#pragma omp atomic write
            failed = 1;
        }
        float *part = wb + nb * KC;     /* [MC / PM][nb / NR][NR][PM]: the block's fp32 sums */
        for (int64_t m0 = 0; m0 < panels * PM; m0 += MC) {
            int64_t mc = panels * PM - m0 < MC ? panels * PM - m0 : MC;
#pragma omp for schedule(static) nowait
            for (int64_t blk = 0; blk < blocks; blk++) {
                if (!wb) continue;
                int64_t n0 = blk * nb, rows = N - n0 < nb ? N - n0 : nb;
                int64_t tiles = (rows + NR - 1) / NR;
                memset(part, 0, (size_t)mc * tiles * NR * 4);
                for (int64_t k0 = 0; k0 < K; k0 += KC) {
                    int64_t kc = K - k0 < KC ? K - k0 : KC;
                    for (int64_t t = 0; t < tiles; t++) {
                        int nr = rows - t * NR < NR ? (int)(rows - t * NR) : NR;
                        load_tile(kind, w, s, G, K, n0 + t * NR, nr, k0, kc, round, wb + t * NR * KC);
                    }
                    for (int64_t i = 0; i < mc; i += PM) {   /* one x panel in L1, the block's tiles from L2 */
                        const float *panel = xp + (m0 + i) * K + k0 * PM;
                        for (int64_t t = 0; t < tiles; t++) {
                            int nr = rows - t * NR < NR ? (int)(rows - t * NR) : NR;
                            micro_any(panel, wb + t * NR * KC, kc, nr, part + ((i / PM) * tiles + t) * NR * PM);
                        }
                    }
                }
                for (int64_t i = 0; i < mc && m0 + i < M; i++) {
                    for (int64_t t = 0; t < tiles; t++) {
                        const float *src = part + ((i / PM) * tiles + t) * NR * PM + i % PM;
                        int nr = rows - t * NR < NR ? (int)(rows - t * NR) : NR;
                        for (int j = 0; j < nr; j++) {
                            float v = src[j * PM];
                            int64_t at = (m0 + i) * ldy + n0 + t * NR + j;
                            if (ybf16) ((uint16_t *)y)[at] = f32_to_bf16(v);
                            else ((float *)y)[at] = v;
                        }
                    }
                }
            }
        }
    }
    free(xp);
    return failed ? -1 : 0;
}

int ernie_gemm_isa(void) {
#if defined(HAVE_GEMM_AVX2)
    return 1;
#else
    return 0;
#endif
}
