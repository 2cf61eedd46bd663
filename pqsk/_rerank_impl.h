/* pqsk/_rerank_impl.h -- AVX2+FMA(+F16C) sums for compact_rerank (pqsk/_rerank.pyx).
 *
 * pqsk_rr_sums_{int8,f16}_avx2(q, row, off, sc, d, mode, out) fill out[0..2]
 * with <q, x>, ||x||^2 and sum (q - x)^2 over the d elements of one compact
 * row (x_j = off[j] + sc[j] * code[j] for int8, half(row[j]) for float16),
 * computing only what mode needs: 0 L2 (out[2]), 1 inner product (out[0]),
 * 2 unit_norm (out[0], out[1]).  Lanes accumulate in float32 and are reduced
 * to double at the end (float32 rounding; the scalar kernel sums in double).
 * The caller picks them at import with pqsk_rr_cpu_has_avx2_f16c(); without
 * GCC/clang on x86, or with PQSK_FS_NO_SIMD, they are stubs never called.
 */
#ifndef PQSK_RERANK_IMPL_H
#define PQSK_RERANK_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) \
    && !defined(PQSK_FS_NO_SIMD)
#define PQSK_RR_X86 1
#include <immintrin.h>

static int pqsk_rr_cpu_has_avx2_f16c(void)
{
    __builtin_cpu_init();
    return (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("f16c")) ? 1 : 0;
}

__attribute__((target("avx2,fma")))
static inline double pqsk_rr_hsum(__m256 v)
{
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    __m256d a = _mm256_add_pd(_mm256_cvtps_pd(lo), _mm256_cvtps_pd(hi));
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(s) + _mm_cvtsd_f64(_mm_unpackhi_pd(s, s));
}

/* Accumulate one block of 8 decoded values x against q. */
#define PQSK_RR_ACC(qv, x)                                              \
    do {                                                                \
        if (mode == 0) {                                                \
            __m256 t_ = _mm256_sub_ps((qv), (x));                       \
            acc = _mm256_fmadd_ps(t_, t_, acc);                         \
        } else {                                                        \
            dot = _mm256_fmadd_ps((qv), (x), dot);                      \
            if (mode == 2) nrm = _mm256_fmadd_ps((x), (x), nrm);        \
        }                                                               \
    } while (0)

#define PQSK_RR_TAIL(qj, xj)                                            \
    do {                                                                \
        if (mode == 0) { float t_ = (qj) - (xj); sacc += t_ * t_; }     \
        else { sdot += (qj) * (xj); if (mode == 2) snrm += (xj) * (xj); } \
    } while (0)

__attribute__((target("avx2,fma")))
static void pqsk_rr_sums_int8_avx2(const float *q, const uint8_t *c, const float *off,
                                   const float *sc, ptrdiff_t d, int mode, double *out)
{
    __m256 dot = _mm256_setzero_ps(), nrm = _mm256_setzero_ps(), acc = _mm256_setzero_ps();
    float sdot = 0, snrm = 0, sacc = 0;
    ptrdiff_t j = 0;
    for (; j + 8 <= d; j += 8) {
        __m128i b = _mm_loadl_epi64((const __m128i *)(c + j));
        __m256 code = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
        __m256 x = _mm256_fmadd_ps(_mm256_loadu_ps(sc + j), code, _mm256_loadu_ps(off + j));
        __m256 qv = _mm256_loadu_ps(q + j);
        PQSK_RR_ACC(qv, x);
    }
    for (; j < d; j++) {
        float x = fmaf(sc[j], (float)c[j], off[j]);
        PQSK_RR_TAIL(q[j], x);
    }
    out[0] = pqsk_rr_hsum(dot) + sdot;
    out[1] = pqsk_rr_hsum(nrm) + snrm;
    out[2] = pqsk_rr_hsum(acc) + sacc;
}

__attribute__((target("avx2,fma,f16c")))
static void pqsk_rr_sums_f16_avx2(const float *q, const uint16_t *h, ptrdiff_t d, int mode,
                                  double *out)
{
    __m256 dot = _mm256_setzero_ps(), nrm = _mm256_setzero_ps(), acc = _mm256_setzero_ps();
    float sdot = 0, snrm = 0, sacc = 0;
    ptrdiff_t j = 0;
    for (; j + 8 <= d; j += 8) {
        __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + j)));
        __m256 qv = _mm256_loadu_ps(q + j);
        PQSK_RR_ACC(qv, x);
    }
    if (j < d) {  /* the tail, through a zero-padded block of 8 */
        uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        float xs[8];
        ptrdiff_t k;
        for (k = 0; k < d - j; k++) tmp[k] = h[j + k];
        _mm256_storeu_ps(xs, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tmp)));
        for (k = 0; j < d; j++, k++) PQSK_RR_TAIL(q[j], xs[k]);
    }
    out[0] = pqsk_rr_hsum(dot) + sdot;
    out[1] = pqsk_rr_hsum(nrm) + snrm;
    out[2] = pqsk_rr_hsum(acc) + sacc;
}

#else
#define PQSK_RR_X86 0
static int pqsk_rr_cpu_has_avx2_f16c(void) { return 0; }
static void pqsk_rr_sums_int8_avx2(const float *q, const uint8_t *c, const float *off,
                                   const float *sc, ptrdiff_t d, int mode, double *out)
{ (void)q; (void)c; (void)off; (void)sc; (void)d; (void)mode; out[0] = out[1] = out[2] = 0; }
static void pqsk_rr_sums_f16_avx2(const float *q, const uint16_t *h, ptrdiff_t d, int mode,
                                  double *out)
{ (void)q; (void)h; (void)d; (void)mode; out[0] = out[1] = out[2] = 0; }
#endif

#endif /* PQSK_RERANK_IMPL_H */
