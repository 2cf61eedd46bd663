/* pqsk/_rerank_impl.h -- AVX2+FMA(+F16C) sums for compact_rerank (pqsk/_rerank.pyx).
 *
 * pqsk_rr_sums_{int8,f16}_avx2(q, row, off, sc, d, mode, out) fill out[0..2]
 * with <q, x>, ||x||^2 and sum (q - x)^2 over the d elements of one compact
 * row (x_j = off[j] + sc[j] * code[j] for int8, half(row[j]) for float16),
 * computing only what mode needs: 0 L2 (out[2]), 1 inner product (out[0]),
 * 2 unit_norm (out[0], out[1]).  Lanes accumulate in float32 and are reduced
 * to double at the end (float32 rounding; the scalar kernel sums in double).
 * The caller picks them at import with pqsk_rr_cpu_has_avx2_f16c() (see
 * pqsk/_cpuid.h); without GCC/clang on x86 (MSVC proper: no target
 * attributes), or with PQSK_FS_NO_SIMD, they are stubs never called.
 *
 * On arm64, pqsk_rr_isums_neon computes the integer sums of the int8 tier
 * (the pqsk_rr_isums_* contract below) with NEON; the float paths stay
 * scalar there.
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
#include "_cpuid.h"

static int pqsk_rr_cpu_has_avx2_f16c(void)
{
    return pqsk_cpu_has(PQSK_CPU_AVX2) && pqsk_cpu_has(PQSK_CPU_FMA)
           && pqsk_cpu_has(PQSK_CPU_F16C);
}

/* The best re-ranking level this CPU (and OS) runs: 0 none, 1 AVX2+FMA+F16C,
 * 2 and AVX-512F/BW/VL, 3 and AVX-512 VNNI (pqsk/_cpuid.h). */
static int pqsk_rr_cpu_level(void)
{
    if (!pqsk_rr_cpu_has_avx2_f16c())
        return 0;
    if (!(pqsk_cpu_has(PQSK_CPU_AVX512F) && pqsk_cpu_has(PQSK_CPU_AVX512BW)
          && pqsk_cpu_has(PQSK_CPU_AVX512VL)))
        return 1;
    return pqsk_cpu_has(PQSK_CPU_AVX512VNNI) ? 3 : 2;
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


/* ---- int8 tier in integers -------------------------------------------------
 * pqsk_rr_isums_{avx2,avx512bw,avx512vnni}(c, w, f, gh, gl, d, mode, out)
 * fill out[0..2] with the exact integer sums, over the d codes c[j] of one
 * row (uint8), of
 *     out[0] = sum_j w[j] c[j]                (mode 0, 1, 2)
 *     out[1] = sum_j f[j] c[j]                (mode 2 only)
 *     out[2] = sum_j (128 gh[j] + gl[j]) c[j]^2   (modes 0 and 2)
 * with int16 weights |w|, |f| <= 32767 and 0 <= gh, gl <= 127 (the caller's
 * quantized query / tier terms, see _rerank.pyx).  The weight arrays are
 * readable (zero-padded) up to d rounded up to 32; the codes are read only
 * up to d.  Codes are widened to 16 bits and multiplied pairwise into 32-bit
 * lanes (vpmaddwd, or vpdpwssd with VNNI; gh c and gl c fit int16): a block
 * of at most 256 codes sums to less than 2^31 in every lane and in total
 * (255 * 32767 * 256 < 2^31), so each block is reduced to int64 exactly. */

__attribute__((target("avx2")))
static inline int32_t pqsk_rr_hsum_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* The sums of the 8 lanes of each of a, b, c, e, at once (hadd tree). */
__attribute__((target("avx2")))
static inline void pqsk_rr_hsum4_epi32(__m256i a, __m256i b, __m256i c, __m256i e,
                                       int64_t *sa, int64_t *sb, int64_t *sc, int64_t *se)
{
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, e));
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
    *sa += _mm_cvtsi128_si32(s);
    *sb += _mm_extract_epi32(s, 1);
    *sc += _mm_extract_epi32(s, 2);
    *se += _mm_extract_epi32(s, 3);
}

__attribute__((target("avx2")))
static void pqsk_rr_isums_avx2(const uint8_t *c, const int16_t *w, const int16_t *f,
                               const int16_t *gh, const int16_t *gl, ptrdiff_t d, int mode,
                               int64_t *out)
{
    int64_t s0 = 0, s1 = 0, sh = 0, sl = 0;
    ptrdiff_t j = 0;
    while (j < d) {
        ptrdiff_t end = (d - j > 256) ? j + 256 : d;
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, ah = a0, al = a0;
        for (; j + 16 <= end; j += 16) {
            __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(c + j)));
            a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(
                x, _mm256_loadu_si256((const __m256i *)(w + j))));
            if (mode != 1) {
                ah = _mm256_add_epi32(ah, _mm256_madd_epi16(x, _mm256_mullo_epi16(
                    x, _mm256_loadu_si256((const __m256i *)(gh + j)))));
                al = _mm256_add_epi32(al, _mm256_madd_epi16(x, _mm256_mullo_epi16(
                    x, _mm256_loadu_si256((const __m256i *)(gl + j)))));
                if (mode == 2)
                    a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(
                        x, _mm256_loadu_si256((const __m256i *)(f + j))));
            }
        }
        for (; j < end; j++) {  /* the row's last codes (< 16) */
            int64_t cj = c[j];
            s0 += w[j] * cj;
            if (mode != 1) {
                sh += gh[j] * cj * cj;
                sl += gl[j] * cj * cj;
                if (mode == 2) s1 += f[j] * cj;
            }
        }
        if (mode == 1)
            s0 += pqsk_rr_hsum_epi32(a0);
        else
            pqsk_rr_hsum4_epi32(a0, a1, ah, al, &s0, &s1, &sh, &sl);
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = 128 * sh + sl;
}

/* The AVX-512 body, 32 codes a step; DP(acc, x, y) adds the pairwise
 * products of x and y (int16) into the 32-bit lanes of acc. */
#define PQSK_RR_I512_BODY(DP)                                                   \
    int64_t s0 = 0, s1 = 0, sh = 0, sl = 0;                                     \
    ptrdiff_t j = 0;                                                            \
    while (j < d) {                                                             \
        ptrdiff_t end = (d - j > 256) ? j + 256 : d;                            \
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, ah = a0, al = a0;         \
        for (; j < end; j += 32) {                                              \
            ptrdiff_t left = end - j;                                           \
            __m256i b = left >= 32                                              \
                ? _mm256_loadu_si256((const __m256i *)(c + j))                  \
                : _mm256_maskz_loadu_epi8((__mmask32)((1u << left) - 1u), c + j); \
            __m512i x = _mm512_cvtepu8_epi16(b);                                \
            a0 = DP(a0, x, _mm512_loadu_si512((const void *)(w + j)));          \
            if (mode != 1) {                                                    \
                ah = DP(ah, x, _mm512_mullo_epi16(                              \
                    x, _mm512_loadu_si512((const void *)(gh + j))));            \
                al = DP(al, x, _mm512_mullo_epi16(                              \
                    x, _mm512_loadu_si512((const void *)(gl + j))));            \
                if (mode == 2)                                                  \
                    a1 = DP(a1, x, _mm512_loadu_si512((const void *)(f + j)));  \
            }                                                                   \
        }                                                                       \
        if (mode == 1)                                                          \
            s0 += _mm512_reduce_add_epi32(a0);                                  \
        else                                                                    \
            pqsk_rr_hsum4_epi32(PQSK_RR_FOLD(a0), PQSK_RR_FOLD(a1),             \
                                PQSK_RR_FOLD(ah), PQSK_RR_FOLD(al),             \
                                &s0, &s1, &sh, &sl);                            \
    }                                                                           \
    out[0] = s0;                                                                \
    out[1] = s1;                                                                \
    out[2] = 128 * sh + sl;

#define PQSK_RR_FOLD(v) \
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64((v), 1))
#define PQSK_RR_DP_BW(a, x, y) _mm512_add_epi32((a), _mm512_madd_epi16((x), (y)))
#define PQSK_RR_DP_VNNI(a, x, y) _mm512_dpwssd_epi32((a), (x), (y))

__attribute__((target("avx512f,avx512bw,avx512vl,avx2")))
static void pqsk_rr_isums_avx512bw(const uint8_t *c, const int16_t *w, const int16_t *f,
                                   const int16_t *gh, const int16_t *gl, ptrdiff_t d,
                                   int mode, int64_t *out)
{
    PQSK_RR_I512_BODY(PQSK_RR_DP_BW)
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2")))
static void pqsk_rr_isums_avx512vnni(const uint8_t *c, const int16_t *w, const int16_t *f,
                                     const int16_t *gh, const int16_t *gl, ptrdiff_t d,
                                     int mode, int64_t *out)
{
    PQSK_RR_I512_BODY(PQSK_RR_DP_VNNI)
}

/* ---- raw rows (exact_rerank) in double lanes ---------------------------------
 * pqsk_rr_xsums_{f32,f64}_{avx2,avx512}(q, x, d, mode, out) fill out[0..2]
 * with <q, x>, ||x||^2 and sum (q - x)^2 as the scalar row_distance does
 * (only what mode needs, as above), every product and sum in double (float32
 * values are widened exactly), in 4 (AVX2) or 8 (AVX-512) lanes with fused
 * multiply-adds: the sums differ from the sequential double loop only by
 * double rounding (a few units in the 16th digit). */
#define PQSK_RR_ACCD(FMA, SUB, qv, xv, dot, nrm, acc)                           \
    do {                                                                        \
        if (mode == 0) {                                                        \
            t_ = SUB((qv), (xv));                                               \
            acc = FMA(t_, t_, acc);                                             \
        } else {                                                                \
            dot = FMA((qv), (xv), dot);                                         \
            if (mode == 2) nrm = FMA((xv), (xv), nrm);                          \
        }                                                                       \
    } while (0)

__attribute__((target("avx2,fma")))
static inline double pqsk_rr_hsum_pd(__m256d v)
{
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(s) + _mm_cvtsd_f64(_mm_unpackhi_pd(s, s));
}

#define PQSK_RR_X256_BODY(LOAD)                                                 \
    __m256d dot0 = _mm256_setzero_pd(), dot1 = dot0, nrm0 = dot0, nrm1 = dot0;  \
    __m256d acc0 = dot0, acc1 = dot0, t_;                                       \
    double sdot = 0, snrm = 0, sacc = 0, tq, tx;                                \
    ptrdiff_t j = 0;                                                            \
    for (; j + 8 <= d; j += 8) {                                                \
        __m256d q0 = LOAD(q + j), x0 = LOAD(x + j);                             \
        __m256d q1 = LOAD(q + j + 4), x1 = LOAD(x + j + 4);                     \
        PQSK_RR_ACCD(_mm256_fmadd_pd, _mm256_sub_pd, q0, x0, dot0, nrm0, acc0); \
        PQSK_RR_ACCD(_mm256_fmadd_pd, _mm256_sub_pd, q1, x1, dot1, nrm1, acc1); \
    }                                                                           \
    if (j + 4 <= d) {                                                           \
        __m256d q0 = LOAD(q + j), x0 = LOAD(x + j);                             \
        PQSK_RR_ACCD(_mm256_fmadd_pd, _mm256_sub_pd, q0, x0, dot0, nrm0, acc0); \
        j += 4;                                                                 \
    }                                                                           \
    for (; j < d; j++) {                                                        \
        tq = q[j];                                                              \
        tx = x[j];                                                              \
        if (mode == 0) sacc += (tq - tx) * (tq - tx);                           \
        else { sdot += tq * tx; if (mode == 2) snrm += tx * tx; }               \
    }                                                                           \
    out[0] = pqsk_rr_hsum_pd(_mm256_add_pd(dot0, dot1)) + sdot;                 \
    out[1] = pqsk_rr_hsum_pd(_mm256_add_pd(nrm0, nrm1)) + snrm;                 \
    out[2] = pqsk_rr_hsum_pd(_mm256_add_pd(acc0, acc1)) + sacc;

#define PQSK_RR_LOAD_F32X4(p) _mm256_cvtps_pd(_mm_loadu_ps(p))

__attribute__((target("avx2,fma")))
static void pqsk_rr_xsums_f32_avx2(const float *q, const float *x, ptrdiff_t d, int mode,
                                   double *out)
{
    PQSK_RR_X256_BODY(PQSK_RR_LOAD_F32X4)
}

__attribute__((target("avx2,fma")))
static void pqsk_rr_xsums_f64_avx2(const double *q, const double *x, ptrdiff_t d, int mode,
                                   double *out)
{
    PQSK_RR_X256_BODY(_mm256_loadu_pd)
}

/* 8 double lanes, two accumulators; the tail through masked loads. */
#define PQSK_RR_X512_BODY(LOAD, MLOAD)                                          \
    __m512d dot0 = _mm512_setzero_pd(), dot1 = dot0, nrm0 = dot0, nrm1 = dot0;  \
    __m512d acc0 = dot0, acc1 = dot0, t_;                                       \
    ptrdiff_t j = 0;                                                            \
    for (; j + 16 <= d; j += 16) {                                              \
        __m512d q0 = LOAD(q + j), x0 = LOAD(x + j);                             \
        __m512d q1 = LOAD(q + j + 8), x1 = LOAD(x + j + 8);                     \
        PQSK_RR_ACCD(_mm512_fmadd_pd, _mm512_sub_pd, q0, x0, dot0, nrm0, acc0); \
        PQSK_RR_ACCD(_mm512_fmadd_pd, _mm512_sub_pd, q1, x1, dot1, nrm1, acc1); \
    }                                                                           \
    for (; j < d; j += 8) {                                                     \
        ptrdiff_t left = d - j;                                                 \
        __mmask8 m = left >= 8 ? (__mmask8)0xff : (__mmask8)((1u << left) - 1u); \
        __m512d q0 = MLOAD(m, q + j), x0 = MLOAD(m, x + j);                     \
        PQSK_RR_ACCD(_mm512_fmadd_pd, _mm512_sub_pd, q0, x0, dot0, nrm0, acc0); \
    }                                                                           \
    out[0] = _mm512_reduce_add_pd(_mm512_add_pd(dot0, dot1));                   \
    out[1] = _mm512_reduce_add_pd(_mm512_add_pd(nrm0, nrm1));                   \
    out[2] = _mm512_reduce_add_pd(_mm512_add_pd(acc0, acc1));

#define PQSK_RR_LOAD_F32X8(p) _mm512_cvtps_pd(_mm256_loadu_ps(p))
#define PQSK_RR_MLOAD_F32X8(m, p) _mm512_cvtps_pd(_mm256_maskz_loadu_ps((m), (p)))

__attribute__((target("avx512f,avx512vl,avx2,fma")))
static void pqsk_rr_xsums_f32_avx512(const float *q, const float *x, ptrdiff_t d, int mode,
                                     double *out)
{
    PQSK_RR_X512_BODY(PQSK_RR_LOAD_F32X8, PQSK_RR_MLOAD_F32X8)
}

__attribute__((target("avx512f,avx512vl,avx2,fma")))
static void pqsk_rr_xsums_f64_avx512(const double *q, const double *x, ptrdiff_t d, int mode,
                                     double *out)
{
    PQSK_RR_X512_BODY(_mm512_loadu_pd, _mm512_maskz_loadu_pd)
}

#else
#define PQSK_RR_X86 0
static int pqsk_rr_cpu_level(void) { return 0; }
#define PQSK_RR_ISUMS_STUB(NAME) \
static void NAME(const uint8_t *c, const int16_t *w, const int16_t *f, const int16_t *gh, \
                 const int16_t *gl, ptrdiff_t d, int mode, int64_t *out) \
{ (void)c; (void)w; (void)f; (void)gh; (void)gl; (void)d; (void)mode; \
  out[0] = out[1] = out[2] = 0; }
PQSK_RR_ISUMS_STUB(pqsk_rr_isums_avx2)
PQSK_RR_ISUMS_STUB(pqsk_rr_isums_avx512bw)
PQSK_RR_ISUMS_STUB(pqsk_rr_isums_avx512vnni)
#define PQSK_RR_XSUMS_STUB(NAME, T) \
static void NAME(const T *q, const T *x, ptrdiff_t d, int mode, double *out) \
{ (void)q; (void)x; (void)d; (void)mode; out[0] = out[1] = out[2] = 0; }
PQSK_RR_XSUMS_STUB(pqsk_rr_xsums_f32_avx2, float)
PQSK_RR_XSUMS_STUB(pqsk_rr_xsums_f64_avx2, double)
PQSK_RR_XSUMS_STUB(pqsk_rr_xsums_f32_avx512, float)
PQSK_RR_XSUMS_STUB(pqsk_rr_xsums_f64_avx512, double)
static int pqsk_rr_cpu_has_avx2_f16c(void) { return 0; }
static void pqsk_rr_sums_int8_avx2(const float *q, const uint8_t *c, const float *off,
                                   const float *sc, ptrdiff_t d, int mode, double *out)
{ (void)q; (void)c; (void)off; (void)sc; (void)d; (void)mode; out[0] = out[1] = out[2] = 0; }
static void pqsk_rr_sums_f16_avx2(const float *q, const uint16_t *h, ptrdiff_t d, int mode,
                                  double *out)
{ (void)q; (void)h; (void)d; (void)mode; out[0] = out[1] = out[2] = 0; }
#endif

/* ---- int8 tier in integers, arm64 NEON ---------------------------------------
 * pqsk_rr_isums_neon: the pqsk_rr_isums_* contract above (same exact sums).
 * Codes are widened to 16 bits (0..255 as int16) and multiplied by the int16
 * weights into 32-bit lanes with vmlal_s16 / vmlal_high_s16 (the dot-product
 * instruction sdot of __ARM_FEATURE_DOTPROD multiplies int8 by int8 and does
 * not fit the 16-bit weights); gh c and gl c fit int16 (vmulq_s16 exact).  A
 * block of at most 256 codes puts 64 products of at most 255 * 32768 in each
 * of 4 lanes (< 2^31), reduced to int64 with vaddlvq_s32: exact. */
#if defined(__aarch64__) && !defined(PQSK_FS_NO_SIMD)
#define PQSK_RR_NEON 1
#include <arm_neon.h>

static int pqsk_rr_cpu_has_neon(void) { return 1; }

#define PQSK_RR_NEON_DP(acc, x, y) \
    do { (acc) = vmlal_s16((acc), vget_low_s16(x), vget_low_s16(y)); \
         (acc) = vmlal_high_s16((acc), (x), (y)); } while (0)

static void pqsk_rr_isums_neon(const uint8_t *c, const int16_t *w, const int16_t *f,
                               const int16_t *gh, const int16_t *gl, ptrdiff_t d, int mode,
                               int64_t *out)
{
    int64_t s0 = 0, s1 = 0, sh = 0, sl = 0;
    ptrdiff_t j = 0, k;
    while (j < d) {
        ptrdiff_t end = (d - j > 256) ? j + 256 : d;
        int32x4_t a0 = vdupq_n_s32(0), a1 = a0, ah = a0, al = a0;
        for (; j + 16 <= end; j += 16) {
            const uint8x16_t b = vld1q_u8(c + j);
            int16x8_t x[2];
            x[0] = vreinterpretq_s16_u16(vmovl_u8(vget_low_u8(b)));
            x[1] = vreinterpretq_s16_u16(vmovl_high_u8(b));
            for (k = 0; k < 2; k++) {
                PQSK_RR_NEON_DP(a0, x[k], vld1q_s16(w + j + 8 * k));
                if (mode != 1) {
                    PQSK_RR_NEON_DP(ah, x[k], vmulq_s16(x[k], vld1q_s16(gh + j + 8 * k)));
                    PQSK_RR_NEON_DP(al, x[k], vmulq_s16(x[k], vld1q_s16(gl + j + 8 * k)));
                    if (mode == 2)
                        PQSK_RR_NEON_DP(a1, x[k], vld1q_s16(f + j + 8 * k));
                }
            }
        }
        for (; j < end; j++) {  /* the row's last codes (< 16) */
            int64_t cj = c[j];
            s0 += w[j] * cj;
            if (mode != 1) {
                sh += gh[j] * cj * cj;
                sl += gl[j] * cj * cj;
                if (mode == 2) s1 += f[j] * cj;
            }
        }
        s0 += vaddlvq_s32(a0);
        s1 += vaddlvq_s32(a1);
        sh += vaddlvq_s32(ah);
        sl += vaddlvq_s32(al);
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = 128 * sh + sl;
}

#else
#define PQSK_RR_NEON 0
static int pqsk_rr_cpu_has_neon(void) { return 0; }
/* Never selected (the CPU check says no); present so that the module links. */
static void pqsk_rr_isums_neon(const uint8_t *c, const int16_t *w, const int16_t *f,
                               const int16_t *gh, const int16_t *gl, ptrdiff_t d, int mode,
                               int64_t *out)
{
    (void)c; (void)w; (void)f; (void)gh; (void)gl; (void)d; (void)mode;
    out[0] = out[1] = out[2] = 0;
}
#endif

#endif /* PQSK_RERANK_IMPL_H */
