/* 4-bit fast-scan block kernels (see pqsk/_fastscan.pyx).
 *
 * Layout: vectors in blocks of 32; for block b and sub-quantizer pair p
 * (sub-quantizers 2p and 2p+1), 32 bytes, byte i = code[32b+i][2p] |
 * (code[32b+i][2p+1] << 4).  A block is npairs * 32 bytes.
 *
 * lut: (2 * npairs, 16) uint8, the per-query quantized tables; row 2p is
 * read with the low nibbles, row 2p+1 with the high ones.
 *
 * Every kernel has the same contract (the scalar one reads a table of
 * pair sums in place of lut, see pqsk_fs_pair_table):
 *
 *   Py_ssize_t scan(packed, b, nb, npairs, lut, thr, &mask, sums)
 *
 * scans blocks b, b+1, ... < nb and returns the first block in which some
 * vector's sum S = sum_j lut[j, code_j] (exact, uint16) is <= thr, with
 * bit i of *mask set for each such vector i of the block; returns nb (mask
 * untouched) when none is.  When ``sums`` is not NULL, the returned
 * block's 32 sums are stored there, even vectors first: vector i's sum is
 * sums[(i & 1) * 16 + (i >> 1)] (the SIMD kernels' lane order).  The caller re-checks the candidates with the
 * float tables, tightens thr and calls again from the next block.  The
 * scalar and SIMD kernels compute the same sums, hence the same masks.
 *
 * The x86 SIMD kernels are compiled with __attribute__((target(...))):
 * the module builds with plain compiler flags and runs on any x86-64; the
 * caller picks one at import with pqsk_fs_cpu_has_*() (pqsk/_cpuid.h:
 * __builtin_cpu_supports, or CPUID/XGETBV under clang-cl).  MSVC proper
 * (no target attributes) builds the scalar kernel alone.  On arm64 the NEON
 * kernel (Advanced SIMD, part of every AArch64 CPU: no target attribute
 * and no run-time check needed) reads the same nibble tables with
 * vqtbl1q_u8.  Defining PQSK_FS_NO_SIMD builds the scalar kernel alone
 * (as on other CPUs).
 */
#ifndef PQSK_FASTSCAN_IMPL_H
#define PQSK_FASTSCAN_IMPL_H

#ifdef PQSK_NO_PYTHON_H
/* The C test harness (tests/c/simd_harness.c), cross-compiled without
 * Python's headers. */
#include <stddef.h>
typedef ptrdiff_t Py_ssize_t;
#else
#include <Python.h>
#endif
#include <stdint.h>
#include <string.h>

typedef Py_ssize_t (*pqsk_fs_scan_fn)(const uint8_t *packed, Py_ssize_t b,
                                      Py_ssize_t nb, Py_ssize_t npairs,
                                      const uint8_t *lut, uint16_t thr,
                                      uint32_t *mask, uint16_t *sums);

static inline int pqsk_fs_ctz32(uint32_t x)
{
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_ctz(x);
#else
    int n = 0;
    while (!(x & 1u)) { x >>= 1; n++; }
    return n;
#endif
}

/* ---- portable scalar kernel ------------------------------------------- */

/* The scalar kernel reads a byte of two codes at once from a per-query
 * table of pair sums: pt[p][byte] = lut[2p][byte & 15] + lut[2p+1][byte >> 4]
 * (npairs x 256 uint16, built by pqsk_fs_pair_table), passed in place of
 * lut.  Same sums as the SIMD kernels, one lookup per byte. */
static void pqsk_fs_pair_table(const uint8_t *lut, Py_ssize_t npairs, uint16_t *pt)
{
    Py_ssize_t p;
    int lo, hi;
    for (p = 0; p < npairs; p++) {
        const uint8_t *t0 = lut + 32 * p;
        const uint8_t *t1 = t0 + 16;
        uint16_t *row = pt + 256 * p;
        for (hi = 0; hi < 16; hi++)
            for (lo = 0; lo < 16; lo++)
                row[(hi << 4) | lo] = (uint16_t)(t0[lo] + t1[hi]);
    }
}

/* AVX-512 wide tables: see pqsk_fs_scan_avx512bw. */
#define PQSK_FS_MAX_PAIRS 129 /* (MAX_SUBSPACES + 1) / 2 */
static void pqsk_fs_wide_table(const uint8_t *lut, Py_ssize_t npairs, uint8_t *out)
{
    Py_ssize_t q, nq = npairs / 2;
    int half, rep;
    if (npairs > PQSK_FS_MAX_PAIRS) {
        memcpy(out, lut, (size_t)npairs * 32);
        return;
    }
    for (q = 0; q < nq; q++)
        for (half = 0; half < 2; half++)
            for (rep = 0; rep < 2; rep++) {
                memcpy(out + (2 * q + half) * 64 + 16 * rep, lut + 64 * q + 16 * half, 16);
                memcpy(out + (2 * q + half) * 64 + 32 + 16 * rep, lut + 64 * q + 32 + 16 * half, 16);
            }
    if (npairs & 1)
        for (half = 0; half < 2; half++)
            for (rep = 0; rep < 2; rep++)
                memcpy(out + nq * 128 + 32 * half + 16 * rep, lut + 32 * (npairs - 1) + 16 * half, 16);
}

/* The table a kernel reads, from the nibble tables lut (m2 x 16):
 * prep 0 lut itself (AVX2), 1 pair sums (scalar), 2 wide tables
 * (AVX-512, 64-byte aligned), the last two written to work (npairs * 256
 * uint16). */
/* Where pqsk_fs_prep_table puts (put) the table for prep, without
 * writing it (a table prepared once and read again). */
static inline const uint8_t *pqsk_fs_prepared(int prep, const uint8_t *lut, uint16_t *work)
{
    if (prep == 1)
        return (const uint8_t *)work;
    if (prep == 2)
        return (const uint8_t *)(((uintptr_t)(void *)work + 63) & ~(uintptr_t)63);
    return lut;
}

static inline const uint8_t *pqsk_fs_prep_table(int prep, const uint8_t *lut,
                                                Py_ssize_t npairs, uint16_t *work)
{
    if (prep == 1) {
        pqsk_fs_pair_table(lut, npairs, work);
        return (const uint8_t *)work;
    }
    if (prep == 2) {
        /* on a cache-line boundary: the kernel's 64-byte loads never
         * split (work has room: npairs * 512 >= npairs * 64 + 64 + 63) */
        uint8_t *out = (uint8_t *)pqsk_fs_prepared(prep, lut, work);
        pqsk_fs_wide_table(lut, npairs, out);
        return (const uint8_t *)out;
    }
    return lut;
}

static Py_ssize_t pqsk_fs_scan_scalar(const uint8_t *packed, Py_ssize_t b,
                                      Py_ssize_t nb, Py_ssize_t npairs,
                                      const uint8_t *pair_table, uint16_t thr,
                                      uint32_t *mask, uint16_t *sums)
{
    const uint16_t *pt = (const uint16_t *)(const void *)pair_table;
    uint16_t s[32];
    Py_ssize_t p;
    int i;
    for (; b < nb; b++) {
        const uint8_t *blk = packed + b * npairs * 32;
        uint32_t msk = 0;
        for (i = 0; i < 32; i++)
            s[i] = pt[blk[i]];
        for (p = 1; p < npairs; p++) {
            const uint8_t *c = blk + 32 * p;
            const uint16_t *row = pt + 256 * p;
            for (i = 0; i < 32; i++)
                s[i] = (uint16_t)(s[i] + row[c[i]]);
        }
        for (i = 0; i < 32; i++)
            msk |= (uint32_t)(s[i] <= thr) << i;
        if (msk) {
            *mask = msk;
            if (sums)
                for (i = 0; i < 32; i++)
                    sums[(i & 1) * 16 + (i >> 1)] = s[i];
            return b;
        }
    }
    return nb;
}

/* ---- per-query table quantization (float32 tables) -------------------- */

/* quantize_tables (pqsk/_fastscan_common.pxd) for float32 tables, in SSE2
 * (part of every x86-64; a plain C loop elsewhere): the same operations in
 * the same precision, hence the same bytes and parameters.  Row j's
 * minimum lo_j and the largest row span give delta = span / 255; entry
 * (j, c) is (uint8)((t - lo_j) * (float)(1 / delta) + 0.5f), saturated at
 * 255; rows m..m2-1 are zero.  params: sum of lo_j, delta, float rounding
 * bound (see the .pxd). */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__SSE2__)
#include <emmintrin.h>
#define PQSK_FS_SSE2 1
#else
#define PQSK_FS_SSE2 0
#endif

/* Whether some of the 16 floats x[0..15] is <= t (a cheap test before
 * the exact ones: selections over many values most of which fail). */
static inline int pqsk_any_le16_f32(const float *x, float t)
{
#if PQSK_FS_SSE2
    __m128 tv = _mm_set1_ps(t);
    __m128 a = _mm_or_ps(_mm_cmple_ps(_mm_loadu_ps(x), tv), _mm_cmple_ps(_mm_loadu_ps(x + 4), tv));
    __m128 b = _mm_or_ps(_mm_cmple_ps(_mm_loadu_ps(x + 8), tv), _mm_cmple_ps(_mm_loadu_ps(x + 12), tv));
    return _mm_movemask_ps(_mm_or_ps(a, b)) != 0;
#else
    int i, hit = 0;
    for (i = 0; i < 16; i++)
        hit |= x[i] <= t;
    return hit;
#endif
}

static void pqsk_fs_quantize_f32(const float *t, Py_ssize_t m, Py_ssize_t m2,
                                 uint8_t *lut, double *params)
{
    double span = 0, sum_b = 0, a = 0, delta;
    float inv;
    Py_ssize_t j;
#if !PQSK_FS_SSE2
    int c;
#endif
    for (j = 0; j < m; j++) {
        const float *row = t + 16 * j;
        float lo = row[0], hi = row[0], alo, ahi;
#if PQSK_FS_SSE2
        __m128 v0 = _mm_loadu_ps(row), v1 = _mm_loadu_ps(row + 4);
        __m128 v2 = _mm_loadu_ps(row + 8), v3 = _mm_loadu_ps(row + 12);
        __m128 mn = _mm_min_ps(_mm_min_ps(v0, v1), _mm_min_ps(v2, v3));
        __m128 mx = _mm_max_ps(_mm_max_ps(v0, v1), _mm_max_ps(v2, v3));
        mn = _mm_min_ps(mn, _mm_shuffle_ps(mn, mn, _MM_SHUFFLE(1, 0, 3, 2)));
        mn = _mm_min_ps(mn, _mm_shuffle_ps(mn, mn, _MM_SHUFFLE(2, 3, 0, 1)));
        mx = _mm_max_ps(mx, _mm_shuffle_ps(mx, mx, _MM_SHUFFLE(1, 0, 3, 2)));
        mx = _mm_max_ps(mx, _mm_shuffle_ps(mx, mx, _MM_SHUFFLE(2, 3, 0, 1)));
        lo = _mm_cvtss_f32(mn);
        hi = _mm_cvtss_f32(mx);
#else
        for (c = 1; c < 16; c++) {
            lo = row[c] < lo ? row[c] : lo;
            hi = row[c] > hi ? row[c] : hi;
        }
#endif
        sum_b += lo;
        if ((double)hi - (double)lo > span)
            span = (double)hi - (double)lo;
        alo = lo < 0 ? -lo : lo;
        ahi = hi < 0 ? -hi : hi;
        a += alo > ahi ? alo : ahi;
    }
    delta = span / 255.0;
    if (!(delta > 0))
        delta = 1.0;
    inv = (float)(1.0 / delta);
    for (j = 0; j < m; j++) {
        const float *row = t + 16 * j;
        uint8_t *out = lut + 16 * j;
#if PQSK_FS_SSE2
        __m128 v0 = _mm_loadu_ps(row), v1 = _mm_loadu_ps(row + 4);
        __m128 v2 = _mm_loadu_ps(row + 8), v3 = _mm_loadu_ps(row + 12);
        __m128 mn = _mm_min_ps(_mm_min_ps(v0, v1), _mm_min_ps(v2, v3));
        __m128 vi = _mm_set1_ps(inv), half = _mm_set1_ps(0.5f);
        __m128i i0, i1, i2, i3;
        mn = _mm_min_ps(mn, _mm_shuffle_ps(mn, mn, _MM_SHUFFLE(1, 0, 3, 2)));
        mn = _mm_min_ps(mn, _mm_shuffle_ps(mn, mn, _MM_SHUFFLE(2, 3, 0, 1)));
        i0 = _mm_cvttps_epi32(_mm_add_ps(_mm_mul_ps(_mm_sub_ps(v0, mn), vi), half));
        i1 = _mm_cvttps_epi32(_mm_add_ps(_mm_mul_ps(_mm_sub_ps(v1, mn), vi), half));
        i2 = _mm_cvttps_epi32(_mm_add_ps(_mm_mul_ps(_mm_sub_ps(v2, mn), vi), half));
        i3 = _mm_cvttps_epi32(_mm_add_ps(_mm_mul_ps(_mm_sub_ps(v3, mn), vi), half));
        /* (values in [0, 256): the signed 16-bit pack is exact, the
         * unsigned 8-bit pack saturates at 255) */
        _mm_storeu_si128((__m128i *)(void *)out,
                         _mm_packus_epi16(_mm_packs_epi32(i0, i1), _mm_packs_epi32(i2, i3)));
#else
        float lo = row[0], x;
        for (c = 1; c < 16; c++)
            lo = row[c] < lo ? row[c] : lo;
        for (c = 0; c < 16; c++) {
            x = (row[c] - lo) * inv + 0.5f;
            out[c] = (uint8_t)(x < 255.0f ? x : 255.0f);
        }
#endif
    }
    memset(lut + 16 * m, 0, (size_t)(16 * (m2 - m)));
    params[0] = sum_b;
    params[1] = delta;
    params[2] = (double)(m + 2) * a * 2.384185791015625e-07;
}

/* ---- x86 SIMD kernels ------------------------------------------------- */

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) \
    && !defined(PQSK_FS_NO_SIMD)
#define PQSK_FS_X86 1
#include <immintrin.h>
#include "_cpuid.h"

static int pqsk_fs_cpu_has_avx2(void)
{
    return pqsk_cpu_has(PQSK_CPU_AVX2);
}

static int pqsk_fs_cpu_has_avx512bw(void)
{
    return pqsk_cpu_has(PQSK_CPU_AVX512F) && pqsk_cpu_has(PQSK_CPU_AVX512BW);
}

/* One block per 256-bit register.  The 32 uint8 partials of a pair are
 * added into 16-bit lanes without masking (acc0 lane l gets even + 256 *
 * odd, modulo 2^16) and the odd bytes alone into acc1; at the end even =
 * acc0 - (acc1 << 8).  Exact while every sum is < 65536 (m <= 257). */
/* Adds one pair's partials (r0: low nibbles' table, r1: high nibbles')
 * into the two accumulators. */
__attribute__((target("avx2")))
static inline void pqsk_fs_add_pair_avx2(__m256i r0, __m256i r1, __m256i *acc0,
                                         __m256i *acc1)
{
    *acc0 = _mm256_add_epi16(*acc0, r0);
    *acc1 = _mm256_add_epi16(*acc1, _mm256_srli_epi16(r0, 8));
    *acc0 = _mm256_add_epi16(*acc0, r1);
    *acc1 = _mm256_add_epi16(*acc1, _mm256_srli_epi16(r1, 8));
}

/* Bit i set for each vector i of the block whose sum S <= thr (t holds
 * thr in every 16-bit lane); unsigned compare: min(S, thr) == S.  When
 * some bit is set and sums is not NULL, the 32 sums are stored there
 * (even vectors, then odd ones). */
__attribute__((target("avx2")))
static inline uint32_t pqsk_fs_block_mask_avx2(__m256i acc0, __m256i acc1, __m256i t,
                                               uint16_t *sums)
{
    __m256i even = _mm256_sub_epi16(acc0, _mm256_slli_epi16(acc1, 8));
    __m256i pe = _mm256_cmpeq_epi16(_mm256_min_epu16(even, t), even);
    __m256i po = _mm256_cmpeq_epi16(_mm256_min_epu16(acc1, t), acc1);
    uint32_t msk = ((uint32_t)_mm256_movemask_epi8(pe) & 0x55555555u) |
                   ((uint32_t)_mm256_movemask_epi8(po) & 0xAAAAAAAAu);
    if (msk && sums) {
        _mm256_storeu_si256((__m256i *)(void *)sums, even);
        _mm256_storeu_si256((__m256i *)(void *)(sums + 16), acc1);
    }
    return msk;
}

__attribute__((target("avx2")))
static Py_ssize_t pqsk_fs_scan_avx2(const uint8_t *packed, Py_ssize_t b,
                                    Py_ssize_t nb, Py_ssize_t npairs,
                                    const uint8_t *lut, uint16_t thr,
                                    uint32_t *mask, uint16_t *sums)
{
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i t = _mm256_set1_epi16((short)thr);
    Py_ssize_t p;
    for (; b < nb; b++) {
        const uint8_t *blk = packed + b * npairs * 32;
        __m256i acc0 = _mm256_setzero_si256();
        __m256i acc1 = _mm256_setzero_si256();
        uint32_t msk;
        for (p = 0; p < npairs; p++) {
            __m256i c = _mm256_loadu_si256((const __m256i *)(blk + 32 * p));
            __m256i lo = _mm256_and_si256(c, low4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low4);
            __m256i l0 = _mm256_broadcastsi128_si256(
                _mm_loadu_si128((const __m128i *)(lut + 32 * p)));
            __m256i l1 = _mm256_broadcastsi128_si256(
                _mm_loadu_si128((const __m128i *)(lut + 32 * p + 16)));
            pqsk_fs_add_pair_avx2(_mm256_shuffle_epi8(l0, lo), _mm256_shuffle_epi8(l1, hi),
                                  &acc0, &acc1);
        }
        msk = pqsk_fs_block_mask_avx2(acc0, acc1, t, sums);
        if (msk) {
            *mask = msk;
            return b;
        }
    }
    return nb;
}

/* One block per 512-bit register, two pairs at a time: 64 contiguous bytes
 * of a block (pairs p and p+1) against tables holding pair p's in the low
 * 256 bits and pair p+1's in the high ones; the two halves of the
 * accumulators are added at the end of the block, an odd last pair done in
 * 256 bits.  Same sums as the AVX2 kernel.
 *
 * The kernel reads "wide" tables, laid out once per quantized table by
 * pqsk_fs_wide_table (not per call: the caller calls once per block with
 * survivors, and building them in registers takes the shuffle port the
 * lookups need): for q < npairs / 2, row 2q (64 bytes) holds the low
 * nibbles' tables of pairs 2q and 2q+1, each 16-byte table twice, row
 * 2q+1 their high nibbles' tables; for an odd npairs, two 32-byte rows
 * follow with the last pair's two tables, each twice.  npairs * 64 + 64
 * bytes at most.  Beyond PQSK_FS_MAX_PAIRS pairs the wide buffer holds the
 * plain nibble tables and the AVX2 kernel scans. */
__attribute__((target("avx512f,avx512bw,avx2")))
static Py_ssize_t pqsk_fs_scan_avx512bw(const uint8_t *packed, Py_ssize_t b,
                                        Py_ssize_t nb, Py_ssize_t npairs,
                                        const uint8_t *wide, uint16_t thr,
                                        uint32_t *mask, uint16_t *sums)
{
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m256i low4y = _mm256_set1_epi8(0x0F);
    const __m256i t = _mm256_set1_epi16((short)thr);
    const Py_ssize_t nq = npairs / 2;
    Py_ssize_t q;
    __m256i last0 = _mm256_setzero_si256(), last1 = last0;
    if (npairs > PQSK_FS_MAX_PAIRS)
        return pqsk_fs_scan_avx2(packed, b, nb, npairs, wide, thr, mask, sums);
    if (npairs & 1) {
        last0 = _mm256_loadu_si256((const __m256i *)(wide + nq * 128));
        last1 = _mm256_loadu_si256((const __m256i *)(wide + nq * 128 + 32));
    }
    for (; b < nb; b++) {
        const uint8_t *blk = packed + b * npairs * 32;
        __m512i acc0 = _mm512_setzero_si512();
        __m512i acc1 = _mm512_setzero_si512();
        __m256i a0, a1;
        uint32_t msk;
        for (q = 0; q < nq; q++) {
            __m512i c = _mm512_loadu_si512((const void *)(blk + 64 * q));
            __m512i lo = _mm512_and_si512(c, low4);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low4);
            __m512i r0 = _mm512_shuffle_epi8(
                _mm512_loadu_si512((const void *)(wide + 128 * q)), lo);
            __m512i r1 = _mm512_shuffle_epi8(
                _mm512_loadu_si512((const void *)(wide + 128 * q + 64)), hi);
            acc0 = _mm512_add_epi16(acc0, r0);
            acc1 = _mm512_add_epi16(acc1, _mm512_srli_epi16(r0, 8));
            acc0 = _mm512_add_epi16(acc0, r1);
            acc1 = _mm512_add_epi16(acc1, _mm512_srli_epi16(r1, 8));
        }
        a0 = _mm256_add_epi16(_mm512_castsi512_si256(acc0), _mm512_extracti64x4_epi64(acc0, 1));
        a1 = _mm256_add_epi16(_mm512_castsi512_si256(acc1), _mm512_extracti64x4_epi64(acc1, 1));
        if (npairs & 1) {
            __m256i c = _mm256_loadu_si256((const __m256i *)(blk + 32 * (npairs - 1)));
            pqsk_fs_add_pair_avx2(
                _mm256_shuffle_epi8(last0, _mm256_and_si256(c, low4y)),
                _mm256_shuffle_epi8(last1, _mm256_and_si256(_mm256_srli_epi16(c, 4), low4y)),
                &a0, &a1);
        }
        msk = pqsk_fs_block_mask_avx2(a0, a1, t, sums);
        if (msk) {
            *mask = msk;
            return b;
        }
    }
    return nb;
}

/* XOR of every 32-byte row, four independent accumulators. */
__attribute__((target("avx2")))
static uint64_t pqsk_fs_read_avx2(const uint8_t *data, Py_ssize_t nbytes)
{
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    uint64_t out[4];
    Py_ssize_t i = 0;
    for (; i + 128 <= nbytes; i += 128) {
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(data + i)));
        a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(data + i + 32)));
        a2 = _mm256_xor_si256(a2, _mm256_loadu_si256((const __m256i *)(data + i + 64)));
        a3 = _mm256_xor_si256(a3, _mm256_loadu_si256((const __m256i *)(data + i + 96)));
    }
    for (; i + 32 <= nbytes; i += 32)
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(data + i)));
    a0 = _mm256_xor_si256(_mm256_xor_si256(a0, a1), _mm256_xor_si256(a2, a3));
    _mm256_storeu_si256((__m256i *)out, a0);
    return out[0] ^ out[1] ^ out[2] ^ out[3];
}

#else
#define PQSK_FS_X86 0
/* The same sums from the nibble tables (the SIMD kernels' input), for
 * builds without the x86 kernels (never selected there). */
static Py_ssize_t pqsk_fs_scan_nibbles(const uint8_t *packed, Py_ssize_t b,
                                       Py_ssize_t nb, Py_ssize_t npairs,
                                       const uint8_t *lut, uint16_t thr,
                                       uint32_t *mask, uint16_t *sums)
{
    uint16_t s[32];
    Py_ssize_t p;
    int i;
    for (; b < nb; b++) {
        const uint8_t *blk = packed + b * npairs * 32;
        uint32_t msk = 0;
        for (i = 0; i < 32; i++)
            s[i] = 0;
        for (p = 0; p < npairs; p++) {
            const uint8_t *c = blk + 32 * p;
            const uint8_t *t0 = lut + 32 * p;
            const uint8_t *t1 = t0 + 16;
            for (i = 0; i < 32; i++)
                s[i] = (uint16_t)(s[i] + t0[c[i] & 15] + t1[c[i] >> 4]);
        }
        for (i = 0; i < 32; i++)
            msk |= (uint32_t)(s[i] <= thr) << i;
        if (msk) {
            *mask = msk;
            if (sums)
                for (i = 0; i < 32; i++)
                    sums[(i & 1) * 16 + (i >> 1)] = s[i];
            return b;
        }
    }
    return nb;
}

static int pqsk_fs_cpu_has_avx2(void) { return 0; }
static int pqsk_fs_cpu_has_avx512bw(void) { return 0; }
/* Never selected (the CPU check says no); present so that the module links. */
static Py_ssize_t pqsk_fs_scan_avx2(const uint8_t *packed, Py_ssize_t b, Py_ssize_t nb,
                                    Py_ssize_t npairs, const uint8_t *lut, uint16_t thr,
                                    uint32_t *mask, uint16_t *sums)
{
    return pqsk_fs_scan_nibbles(packed, b, nb, npairs, lut, thr, mask, sums);
}
static Py_ssize_t pqsk_fs_scan_avx512bw(const uint8_t *packed, Py_ssize_t b, Py_ssize_t nb,
                                        Py_ssize_t npairs, const uint8_t *lut, uint16_t thr,
                                        uint32_t *mask, uint16_t *sums)
{
    return pqsk_fs_scan_nibbles(packed, b, nb, npairs, lut, thr, mask, sums);
}
#endif

/* ---- arm64 NEON kernel ------------------------------------------------ */

#if defined(__aarch64__) && !defined(PQSK_FS_NO_SIMD)
#define PQSK_FS_NEON 1
#include <arm_neon.h>

static int pqsk_fs_cpu_has_neon(void) { return 1; }

/* One block as two 16-byte halves (vectors 0-15, 16-31).  Per pair and
 * half, the low nibbles index the pair's first table and the high ones its
 * second (vqtbl1q_u8: one 16-entry table lookup per byte), and the two
 * uint8 partials are added, widened, into 16-bit lanes: acc[k] holds the
 * sums of vectors 8k .. 8k+7 in order.  Every addition is modulo 2^16 like
 * the scalar and x86 kernels' (exact while S < 65536, m <= 257), and the
 * comparison S <= thr unsigned: the same sums, the same masks. */
static Py_ssize_t pqsk_fs_scan_neon(const uint8_t *packed, Py_ssize_t b,
                                    Py_ssize_t nb, Py_ssize_t npairs,
                                    const uint8_t *lut, uint16_t thr,
                                    uint32_t *mask, uint16_t *sums)
{
    static const uint16_t bit_values[8] = {1, 2, 4, 8, 16, 32, 64, 128};
    const uint8x16_t low4 = vdupq_n_u8(0x0F);
    const uint16x8_t t = vdupq_n_u16(thr);
    const uint16x8_t bits = vld1q_u16(bit_values);
    Py_ssize_t p;
    for (; b < nb; b++) {
        const uint8_t *blk = packed + b * npairs * 32;
        uint16x8_t a0 = vdupq_n_u16(0), a1 = a0, a2 = a0, a3 = a0;
        uint16x8_t le0, le1, le2, le3;
        uint32_t msk;
        for (p = 0; p < npairs; p++) {
            const uint8x16_t l0 = vld1q_u8(lut + 32 * p);
            const uint8x16_t l1 = vld1q_u8(lut + 32 * p + 16);
            const uint8x16_t c0 = vld1q_u8(blk + 32 * p);
            const uint8x16_t c1 = vld1q_u8(blk + 32 * p + 16);
            const uint8x16_t r0 = vqtbl1q_u8(l0, vandq_u8(c0, low4));
            const uint8x16_t h0 = vqtbl1q_u8(l1, vshrq_n_u8(c0, 4));
            const uint8x16_t r1 = vqtbl1q_u8(l0, vandq_u8(c1, low4));
            const uint8x16_t h1 = vqtbl1q_u8(l1, vshrq_n_u8(c1, 4));
            a0 = vaddq_u16(a0, vaddl_u8(vget_low_u8(r0), vget_low_u8(h0)));
            a1 = vaddq_u16(a1, vaddl_high_u8(r0, h0));
            a2 = vaddq_u16(a2, vaddl_u8(vget_low_u8(r1), vget_low_u8(h1)));
            a3 = vaddq_u16(a3, vaddl_high_u8(r1, h1));
        }
        le0 = vcleq_u16(a0, t);
        le1 = vcleq_u16(a1, t);
        le2 = vcleq_u16(a2, t);
        le3 = vcleq_u16(a3, t);
        if (!vmaxvq_u16(vorrq_u16(vorrq_u16(le0, le1), vorrq_u16(le2, le3))))
            continue;  /* (the common case: no vector of the block passes) */
        /* bit i of lane group k: the lanes' distinct powers of two, summed */
        msk = (uint32_t)vaddvq_u16(vandq_u16(le0, bits))
              | ((uint32_t)vaddvq_u16(vandq_u16(le1, bits)) << 8)
              | ((uint32_t)vaddvq_u16(vandq_u16(le2, bits)) << 16)
              | ((uint32_t)vaddvq_u16(vandq_u16(le3, bits)) << 24);
        *mask = msk;
        if (sums) {  /* even vectors, then odd ones (the x86 lane order) */
            vst1q_u16(sums, vuzp1q_u16(a0, a1));
            vst1q_u16(sums + 8, vuzp1q_u16(a2, a3));
            vst1q_u16(sums + 16, vuzp2q_u16(a0, a1));
            vst1q_u16(sums + 24, vuzp2q_u16(a2, a3));
        }
        return b;
    }
    return nb;
}

#else
#define PQSK_FS_NEON 0
static int pqsk_fs_cpu_has_neon(void) { return 0; }
/* Never selected (the CPU check says no); present so that the module links. */
static Py_ssize_t pqsk_fs_scan_neon(const uint8_t *packed, Py_ssize_t b, Py_ssize_t nb,
                                    Py_ssize_t npairs, const uint8_t *lut, uint16_t thr,
                                    uint32_t *mask, uint16_t *sums)
{
    (void)packed; (void)npairs; (void)lut; (void)thr; (void)mask; (void)sums; (void)b;
    return nb;
}
#endif

static uint64_t pqsk_fs_read_bytes(const uint8_t *data, Py_ssize_t nbytes, int simd)
{
    uint64_t r = 0, w;
    Py_ssize_t i;
#if PQSK_FS_X86
    if (simd)
        return pqsk_fs_read_avx2(data, nbytes);
#else
    (void)simd;
#endif
    for (i = 0; i + 8 <= nbytes; i += 8) {
        memcpy(&w, data + i, 8);
        r ^= w;
    }
    return r;
}

#endif /* PQSK_FASTSCAN_IMPL_H */
