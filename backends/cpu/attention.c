/* Rotary embedding + paged-KV write, and one-query-per-sequence (decode) GQA attention, on CPU.
 *
 * At decode sizes the reference ops are a dozen torch dispatches and temporaries per layer
 * (~0.35 ms each op on this machine) for a few KiB of work; one call each here.
 *
 * ernie_rope_kv_write: the reference's exact values (kernels/reference/rope.py). cos/sin come
 * from a table torch computed with the reference's own expression (positions * inv_freq, then
 * cos/sin), x0*cos - x1*sin and x1*cos + x0*sin in fp32 with no contraction (-std=c11 keeps
 * a*b - c*d as three roundings, as torch's separate ops), rounded to the dtype as .to() does;
 * the rotated k and v go to their flat cache slots as stored.
 *
 * ernie_decode_attention: scores, softmax and the value sum in fp32, cast to the dtype, as the
 * reference's decode path (softmax(q k^T * scale) v); the summation order differs from its bmm
 * (fp32 round-off). The query heads of one kv head are done together so each cached key/value
 * row is read once; (sequence, kv head) pairs are split across the OpenMP threads.
 */
/* The clamp in exp_neg is a compare; without this GCC will not vectorize it (a NaN compare could
 * trap). No value changes: only floating-point exception flags, which nothing here reads. */
#pragma GCC optimize("no-trapping-math")
#include <math.h>
#include <stdlib.h>
#include "cpu_common.h"

static inline float ld(const void *p, int bf16, int64_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void st(void *p, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* x [n, d] at src (element offsets) -> rotated into dst; cs/sn: d/2 entries of this position */
static inline __attribute__((always_inline)) void rotate(const void *src, void *dst, const int bf16, int64_t n, int64_t d, const float *cs, const float *sn) {
    for (int64_t h = 0; h < n; h++)
        for (int64_t i = 0; i < d / 2; i++) {
            int64_t e = h * d + 2 * i;
            float x0 = ld(src, bf16, e), x1 = ld(src, bf16, e + 1);
            float a = x0 * cs[i], b = x1 * sn[i], c = x1 * cs[i], s = x0 * sn[i];
            st(dst, bf16, e, a - b);
            st(dst, bf16, e + 1, c + s);
        }
}

/* q [T, nh, d] (row stride ldq elements), k/v [T, nkv, d] (ldk, ldv); positions [T]; cos/sin
 * tables [P, d/2]; caches [slots, nkv, d]; slot_mapping [T]; q_out [T, nh, d] contiguous.
 * Returns 0, or -1 (nothing written) when a position lies outside the table: grow it, call again. */
int ernie_rope_kv_write(const void *q, int64_t ldq, const void *k, int64_t ldk, const void *v, int64_t ldv,
                        const int64_t *positions, const float *cos_t, const float *sin_t, int64_t P,
                        void *k_cache, void *v_cache, const int64_t *slots, void *q_out,
                        int64_t T, int64_t nh, int64_t nkv, int64_t d, int bf16, int threads) {
    for (int64_t t = 0; t < T; t++)
        if (positions[t] < 0 || positions[t] >= P) return -1;
    size_t es = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (T > 1)
    for (int64_t t = 0; t < T; t++) {
        const float *cs = cos_t + positions[t] * (d / 2), *sn = sin_t + positions[t] * (d / 2);
        const char *qt = (const char *)q + t * ldq * es, *kt = (const char *)k + t * ldk * es;
        char *qo = (char *)q_out + t * nh * d * es, *ko = (char *)k_cache + slots[t] * nkv * d * es;
        if (bf16) { rotate(qt, qo, 1, nh, d, cs, sn); rotate(kt, ko, 1, nkv, d, cs, sn); }
        else { rotate(qt, qo, 0, nh, d, cs, sn); rotate(kt, ko, 0, nkv, d, cs, sn); }
        memcpy((char *)v_cache + slots[t] * nkv * d * es, (const char *)v + t * ldv * es, (size_t)(nkv * d) * es);
    }
    return 0;
}

/* Per-thread scratch for scores (grown, never freed). */
static float *scores_buf(size_t n) {
    static __thread float *buf;
    static __thread size_t cap;
    if (n > cap) {
        free(buf);
        cap = (n + 1023) & ~(size_t)1023;
        buf = aligned_alloc(64, cap * sizeof(float));
        if (!buf) cap = 0;
    }
    return buf;
}

#define INLINE static inline __attribute__((always_inline))
#define LANES 16        /* partial sums per reduction: plain C the compiler vectorizes */

/* e^x for x <= 0 (scores minus their max), ~1 ulp, branch-free so the loop vectorizes (libm's
 * expf does not): 2^n * p(r), x = n ln2 + r, |r| <= ln2/2. */
INLINE float exp_neg(float x) {
    x = x > -87.0f ? x : -87.0f;
    float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f;     /* round to nearest: 1.5 * 2^23 */
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

INLINE void load_row(const void *p, const int bf16, int64_t at, int64_t d, float *out) {
    if (bf16) for (int64_t e = 0; e < d; e++) out[e] = bf16_to_f32(((const uint16_t *)p)[at + e]);
    else memcpy(out, (const float *)p + at, (size_t)d * 4);
}

INLINE float dot(const float *a, const float *b, int64_t d) {     /* d % LANES == 0 */
    float part[LANES] = {0};
    for (int64_t e = 0; e < d; e += LANES)
        for (int l = 0; l < LANES; l++) part[l] += a[e + l] * b[e + l];
    float s = 0;
    for (int l = 0; l < LANES; l++) s += part[l];
    return s;
}

/* One sequence's query heads h*g .. h*g+g-1 against kv head h. */
INLINE int attend(const void *q, void *out, const void *kc, const void *vc, const int32_t *table, int64_t ctx,
                  int64_t bs, int64_t nkv, int64_t d, int64_t g, int64_t h, float scale, const int bf16) {
    float *s = scores_buf((size_t)(g * ctx + 3 * g * d + d));
    if (!s) return -1;
    float *qf = s + g * ctx, *acc = qf + g * d, *row = acc + g * d;
    load_row(q, bf16, h * g * d, g * d, qf);
    for (int64_t p = 0; p < ctx; p++) {              /* scores: each key row once for the g queries */
        load_row(kc, bf16, (((int64_t)table[p / bs] * bs + p % bs) * nkv + h) * d, d, row);
        for (int64_t j = 0; j < g; j++) s[j * ctx + p] = dot(qf + j * d, row, d) * scale;
    }
    for (int64_t j = 0; j < g; j++) {                /* softmax, fp32 */
        float *sj = s + j * ctx, mx = -INFINITY, part[LANES] = {0}, sum = 0;
        for (int64_t p = 0; p < ctx; p++) mx = sj[p] > mx ? sj[p] : mx;
        int64_t p = 0;
        for (; p + LANES <= ctx; p += LANES)
            for (int l = 0; l < LANES; l++) { sj[p + l] = exp_neg(sj[p + l] - mx); part[l] += sj[p + l]; }
        for (; p < ctx; p++) { sj[p] = exp_neg(sj[p] - mx); sum += sj[p]; }
        for (int l = 0; l < LANES; l++) sum += part[l];
        float inv = 1.0f / sum;
        for (p = 0; p < ctx; p++) sj[p] *= inv;
    }
    for (int64_t j = 0; j < g * d; j++) acc[j] = 0;
    for (int64_t p = 0; p < ctx; p++) {              /* values: each row once for the g queries */
        load_row(vc, bf16, (((int64_t)table[p / bs] * bs + p % bs) * nkv + h) * d, d, row);
        for (int64_t j = 0; j < g; j++) {
            float w = s[j * ctx + p];
            float *aj = acc + j * d;
            for (int64_t e = 0; e < d; e++) aj[e] += w * row[e];
        }
    }
    if (bf16) for (int64_t j = 0; j < g * d; j++) ((uint16_t *)out)[h * g * d + j] = f32_to_bf16(acc[j]);
    else memcpy((float *)out + h * g * d, acc, (size_t)(g * d) * 4);
    return 0;
}

/* q [B, nh, d] (row stride ldq), caches [blocks, bs, nkv, d], block_tables [B, MB] int32,
 * context_lens [B] int32 -> out [B, nh, d] contiguous; d a multiple of 16. Returns 0, or -1
 * when scratch could not be allocated. */
int ernie_decode_attention(const void *q, int64_t ldq, const void *k_cache, const void *v_cache,
                           const int32_t *block_tables, int64_t max_blocks, const int32_t *context_lens,
                           void *out, int64_t B, int64_t nh, int64_t nkv, int64_t d, int64_t bs,
                           float scale, int bf16, int threads) {
    size_t es = bf16 ? 2 : 4;
    int64_t g = nh / nkv;
    int failed = 0;
#pragma omp parallel for schedule(dynamic) num_threads(threads) reduction(| : failed)
    for (int64_t w = 0; w < B * nkv; w++) {
        int64_t b = w / nkv, h = w % nkv;
        const char *qb = (const char *)q + b * ldq * es;
        char *ob = (char *)out + b * nh * d * es;
        const int32_t *table = block_tables + b * max_blocks;
        failed |= bf16 ? attend(qb, ob, k_cache, v_cache, table, context_lens[b], bs, nkv, d, g, h, scale, 1)
                       : attend(qb, ob, k_cache, v_cache, table, context_lens[b], bs, nkv, d, g, h, scale, 0);
    }
    return failed ? -1 : 0;
}
