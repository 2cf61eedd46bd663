/* pqsk/_tierwalk.h -- distances from a float32 query to the compact-tier rows
 * of graph nodes, for the HNSW tier walk (pqsk/_hnsw.pyx, Dist kind TIER).
 *
 * A node's row: id = ids[node] (node itself when ids is NULL), found in the
 * tier's parts (part p holds ids part_start[p] .. part_start[p + 1] - 1 at
 * address part_ptr[p], rows of row_bytes bytes: d uint8 codes decoding as
 * off[j] + sc[j] * code[j], or d float16 bit patterns).
 *
 * pqsk_tw_dist is the distance compact_rerank (pqsk/_rerank.pyx) gives the
 * row: squared L2 or minus the inner product, the row scaled to unit norm
 * first with unit_norm (a norm below eps10 counting as 1).  With simd (AVX2
 * + FMA + F16C, the caller checks the CPU) the sums come from
 * _rerank_impl.h, in float32 lanes; else they are summed here in double,
 * element by element, as the scalar compact_rerank does.  The result is
 * rounded to float32 (the graph walk's distances).
 */
#ifndef PQSK_TIERWALK_H
#define PQSK_TIERWALK_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include "_rerank_impl.h"

typedef struct {
    const uintptr_t *part_ptr;   /* (n_parts,) */
    const int64_t *part_start;   /* (n_parts + 1,) */
    ptrdiff_t n_parts;           /* >= 1 */
    const int64_t *ids;          /* (n_nodes,) or NULL */
    ptrdiff_t d;                 /* features */
    ptrdiff_t row_bytes;         /* d (int8) or 2 * d (float16) */
    int is_int8;
    const float *off, *sc;       /* (d,) each, int8 only */
    int unit_norm, inner_product, simd;
    double eps10;                /* 10 * float32 eps */
} pqsk_tw_tier;

/* Address of node's row. */
static inline const char *pqsk_tw_row(const pqsk_tw_tier *t, int64_t node)
{
    int64_t i = t->ids ? t->ids[node] : node;
    ptrdiff_t lo = 0, hi = t->n_parts - 1, mid;
    while (lo < hi) {
        mid = (lo + hi + 1) / 2;
        if (t->part_start[mid] <= i) lo = mid; else hi = mid - 1;
    }
    return (const char *)t->part_ptr[lo] + (i - t->part_start[lo]) * t->row_bytes;
}

static inline void pqsk_tw_prefetch(const pqsk_tw_tier *t, int64_t node)
{
#if defined(__GNUC__) || defined(__clang__)
    const char *p = pqsk_tw_row(t, node);
    ptrdiff_t b;
    for (b = 0; b < t->row_bytes; b += 64) __builtin_prefetch(p + b);
    __builtin_prefetch(p + t->row_bytes - 1);
#else
    (void)t; (void)node;
#endif
}

/* The IEEE binary16 value of the bits h. */
static inline double pqsk_tw_half(uint16_t h)
{
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, mant = h & 0x3ffu, bits;
    float f;
    if (e == 0) {
        f = (float)ldexp((double)mant, -24);
        return sign ? -f : f;
    }
    bits = e == 31 ? (sign | 0x7f800000u | (mant << 13)) : (sign | ((e + 112) << 23) | (mant << 13));
    memcpy(&f, &bits, 4);
    return f;
}

/* Row j's decoded value. */
static inline double pqsk_tw_value(const pqsk_tw_tier *t, const char *row, ptrdiff_t j)
{
    if (t->is_int8)
        return (double)t->off[j] + (double)t->sc[j] * ((const uint8_t *)row)[j];
    return pqsk_tw_half(((const uint16_t *)row)[j]);
}

/* Node's decoded row as float32, written to out (d,). */
static inline void pqsk_tw_decode(const pqsk_tw_tier *t, int64_t node, float *out)
{
    const char *row = pqsk_tw_row(t, node);
    ptrdiff_t j;
    for (j = 0; j < t->d; j++) out[j] = (float)pqsk_tw_value(t, row, j);
}

/* Distance between the query q (d,) float32, of squared norm qn, and node's row. */
static inline float pqsk_tw_dist(const pqsk_tw_tier *t, const float *q, double qn, int64_t node)
{
    const char *row = pqsk_tw_row(t, node);
    double dot = 0, nrm = 0, acc = 0, x, n, r;
    ptrdiff_t j;
    int mode = t->unit_norm ? 2 : (t->inner_product ? 1 : 0);
    if (t->simd) {
        double s[3];
        if (t->is_int8)
            pqsk_rr_sums_int8_avx2(q, (const uint8_t *)row, t->off, t->sc, t->d, mode, s);
        else
            pqsk_rr_sums_f16_avx2(q, (const uint16_t *)row, t->d, mode, s);
        dot = s[0]; nrm = s[1]; acc = s[2];
    } else if (mode == 0) {
        for (j = 0; j < t->d; j++) {
            x = (double)q[j] - pqsk_tw_value(t, row, j);
            acc += x * x;
        }
    } else {
        for (j = 0; j < t->d; j++) {
            x = pqsk_tw_value(t, row, j);
            dot += (double)q[j] * x;
            if (mode == 2) nrm += x * x;
        }
    }
    if (!t->unit_norm)
        return (float)(t->inner_product ? -dot : acc);
    n = sqrt(nrm);
    if (!(n >= t->eps10)) n = 1.0;
    if (t->inner_product) return (float)(-dot / n);
    r = qn - 2 * dot / n + nrm / (n * n);
    return (float)(r > 0 ? r : 0);
}

#endif /* PQSK_TIERWALK_H */
