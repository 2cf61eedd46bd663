"""Exact re-ranking of ADC candidates (the "reorder" stage).

For query q and its candidate ids ``cand[q, :]``, the exact distance to
each candidate's raw vector x (squared L2, or minus the inner product) is
computed and the best ``n_neighbors`` kept in a bounded heap, sorted by
(distance, id).  The naive version, kept as the test oracle, is
``pqsk._naive.exact_rerank``::

    for q, c:  d[q, c] = ||Q[q] - x_c||^2  or  -<Q[q], x_c>
    out[q] = the n_neighbors smallest (d, id) pairs

Only the candidate rows are read, one after another, the next rows being
prefetched while a row is scored: a query costs about ``n_candidates``
row reads (cache misses when the rows are in DRAM, page reads when they
are memory-mapped and cold), not a gathered copy of them.

The raw vectors are held in parts (the chunks of a
:class:`pqsk._store.RowStore`): part p holds rows ``part_start[p]:
part_start[p + 1]`` at address ``part_ptr[p]`` (C-contiguous, the
queries' dtype; the caller keeps them alive).  With ``unit_norm``
(cosine) a row is scaled to unit norm as ``sklearn.preprocessing.
normalize`` does (a norm below ``10 * eps`` counts as 1) before the
distance.  Ids outside ``[0, n_rows)`` (empty slots) are scored +inf.

``compact_rerank`` does the same from a compact re-ranking tier (see
:mod:`pqsk._reorder`): rows of float16 values (their bits, uint16) or of
uint8 codes, decoded on the fly, element j of an int8 row being
``offset[j] + scale[j] * code[j]``; the scalar path computes the distance
in double exactly as for raw rows, the AVX2 path (``TIER_ISA``, float32
queries; C in ``_rerank_impl.h``) sums in float32 lanes.  The naive version
is ``pqsk._naive.compact_rerank``.
"""

cimport cython
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from libc.math cimport sqrt, ldexp, INFINITY
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uintptr_t
from libc.string cimport memcpy

from ._heap cimport heap_init, heap_push, heap_sort, pair_greater

from ._prefetch cimport pqsk_prefetch

cdef extern from "_rerank_impl.h" nogil:
    int pqsk_rr_cpu_has_avx2_f16c()
    void pqsk_rr_sums_int8_avx2(const float* q, const uint8_t* c, const float* off,
                                const float* sc, Py_ssize_t d, int mode, double* out)
    void pqsk_rr_sums_f16_avx2(const float* q, const uint16_t* h, Py_ssize_t d, int mode,
                               double* out)

# 1: compact_rerank sums float32 queries with AVX2+FMA+F16C (see TIER_ISA).
cdef int _tier_simd = 0

# Candidates ahead whose rows are prefetched.
DEF LOOKAHEAD = 8


cdef inline const floating* row_address(int64_t i,
                                        const uintptr_t[::1] part_ptr,
                                        const int64_t[::1] part_start,
                                        Py_ssize_t d,
                                        const floating* type_hint) noexcept nogil:
    """Address of row i (0 <= i < n_rows): a binary search over the parts."""
    cdef Py_ssize_t lo = 0, hi = part_ptr.shape[0] - 1, mid
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if part_start[mid] <= i:
            lo = mid
        else:
            hi = mid - 1
    return (<const floating*> part_ptr[lo]) + (i - part_start[lo]) * d


cdef inline void prefetch_row(const floating* x, Py_ssize_t d) noexcept nogil:
    """Every cache line of a row (a row of 50 float32 spans 4)."""
    prefetch_bytes(<const char*> x, d * <Py_ssize_t> sizeof(floating))


cdef inline void prefetch_bytes(const char* p, Py_ssize_t n) noexcept nogil:
    """Every cache line of the n > 0 bytes at p."""
    cdef Py_ssize_t b
    for b in range(0, n, 64):
        pqsk_prefetch(p + b)
    pqsk_prefetch(p + n - 1)


cdef inline const char* part_row(int64_t i,
                                 const uintptr_t[::1] part_ptr,
                                 const int64_t[::1] part_start,
                                 Py_ssize_t row_bytes) noexcept nogil:
    """Address of row i (0 <= i < n_rows) of rows of ``row_bytes`` bytes."""
    cdef Py_ssize_t lo = 0, hi = part_ptr.shape[0] - 1, mid
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if part_start[mid] <= i:
            lo = mid
        else:
            hi = mid - 1
    return (<const char*> part_ptr[lo]) + (i - part_start[lo]) * row_bytes


cdef inline double half_to_double(uint16_t h) noexcept nogil:
    """The IEEE binary16 value of the bits h (exact in double)."""
    cdef uint32_t sign = (<uint32_t> h & 0x8000) << 16
    cdef uint32_t e = (h >> 10) & 0x1f
    cdef uint32_t mant = h & 0x3ff
    cdef uint32_t bits
    cdef float f
    if e == 0:  # zero or subnormal: mant * 2^-24
        f = <float> ldexp(<double> mant, -24)
        return -f if sign else f
    if e == 31:  # infinity or NaN
        bits = sign | 0x7f800000 | (mant << 13)
    else:
        bits = sign | ((e + 112) << 23) | (mant << 13)
    memcpy(&f, &bits, 4)
    return f


cdef inline floating row_distance(const floating* q,
                                  const floating* x,
                                  Py_ssize_t d,
                                  double q_norm2,
                                  bint unit_norm,
                                  bint inner_product,
                                  double eps10) noexcept nogil:
    """One pass over the row, in double: <q, x>, ||x||^2 (and, for L2
    without scaling, the squared differences).  With ``unit_norm`` the row
    counts as x / ||x|| (||x|| < eps10: as x):

        L2: ||q||^2 - 2 <q, x> / n + ||x||^2 / n^2,    IP: -<q, x> / n
    """
    cdef Py_ssize_t j
    cdef double dot = 0, nrm = 0, acc = 0, t, n
    if not unit_norm:
        if inner_product:
            for j in range(d):
                dot += <double> q[j] * x[j]
            return <floating> -dot
        for j in range(d):
            t = <double> q[j] - <double> x[j]
            acc += t * t
        return <floating> acc
    for j in range(d):
        dot += <double> q[j] * x[j]
        nrm += <double> x[j] * x[j]
    n = sqrt(nrm)
    if not n >= eps10:
        n = 1.0
    if inner_product:
        return <floating> (-dot / n)
    acc = q_norm2 - 2 * dot / n + nrm / (n * n)
    return <floating> (acc if acc > 0 else 0)


@cython.boundscheck(False)
@cython.wraparound(False)
def exact_rerank(const floating[:, ::1] Q,        # IN  (nq, D) prepared queries
                 const uintptr_t[::1] part_ptr,   # IN  (P,) row parts (P >= 1)
                 const int64_t[::1] part_start,   # IN  (P + 1,) their first rows
                 const int64_t[:, ::1] cand,      # IN  (nq, n_cand) candidate ids
                 bint unit_norm,
                 bint inner_product,
                 floating[:, ::1] out_dist,       # OUT (nq, n_neighbors)
                 int64_t[:, ::1] out_idx,         # OUT (nq, n_neighbors)
                 floating[:, ::1] heap_d,         # scratch (n_threads, >= n_neighbors)
                 int64_t[:, ::1] heap_i,          # scratch (n_threads, >= n_neighbors)
                 int n_threads):
    """Re-rank each query's candidates by exact distance (see the module
    docstring); rows of the output sorted by (distance, id), slots no
    valid candidate fills (+inf, INT64_MAX).  The caller checks shapes."""
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t d = Q.shape[1]
    cdef Py_ssize_t n_cand = cand.shape[1]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef int64_t n_rows = part_start[part_start.shape[0] - 1]
    cdef Py_ssize_t q, c, r, j
    cdef int64_t i, a
    cdef double qn
    cdef floating dist
    cdef floating* hd = NULL
    cdef int64_t* hi = NULL
    cdef const floating* hint = NULL
    cdef double eps10 = 10 * (1.1920928955078125e-07 if sizeof(floating) == 4
                              else 2.220446049250313e-16)
    cdef int tid
    if nq == 0 or kn == 0:
        return
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        hd = &heap_d[tid, 0]
        hi = &heap_i[tid, 0]
        for q in prange(nq, schedule="static"):
            heap_init(hd, hi, kn)
            qn = 0
            for j in range(d):
                qn = qn + <double> Q[q, j] * Q[q, j]
            for c in range(min(LOOKAHEAD, n_cand)):
                a = cand[q, c]
                if 0 <= a < n_rows:
                    prefetch_row(row_address(a, part_ptr, part_start, d, hint), d)
            for c in range(n_cand):
                if c + LOOKAHEAD < n_cand:
                    a = cand[q, c + LOOKAHEAD]
                    if 0 <= a < n_rows:
                        prefetch_row(row_address(a, part_ptr, part_start, d, hint), d)
                i = cand[q, c]
                if 0 <= i < n_rows:
                    dist = row_distance(&Q[q, 0], row_address(i, part_ptr, part_start, d, hint),
                                        d, qn, unit_norm, inner_product, eps10)
                else:
                    dist = INFINITY
                if pair_greater(hd[0], hi[0], dist, i):
                    heap_push(hd, hi, kn, dist, i)
            heap_sort(hd, hi, kn)
            for r in range(kn):
                out_dist[q, r] = hd[r]
                out_idx[q, r] = hi[r]


cdef inline floating compact_distance(const floating* q,
                                      const char* row,
                                      Py_ssize_t d,
                                      bint is_int8,
                                      const float* offset,
                                      const float* scale,
                                      double q_norm2,
                                      bint unit_norm,
                                      bint inner_product,
                                      double eps10) noexcept nogil:
    """``row_distance`` of a compact row, decoded element by element:
    x_j = half(row[j]) (float16), or offset[j] + scale[j] * row[j] (int8)."""
    cdef Py_ssize_t j
    cdef double dot = 0, nrm = 0, acc = 0, t, n, x
    cdef const uint16_t* h = <const uint16_t*> row
    cdef const uint8_t* c = <const uint8_t*> row
    # One loop per row type and per needed sum (the tests are out of the
    # loops): plain L2 needs only acc, plain inner product only dot, unit_norm
    # dot and nrm.  Each sum is accumulated as before (same bits).
    cdef double sums[3]
    cdef int mode
    if floating is float:
        if _tier_simd:
            mode = 2 if unit_norm else (1 if inner_product else 0)
            if is_int8:
                pqsk_rr_sums_int8_avx2(q, c, offset, scale, d, mode, sums)
            else:
                pqsk_rr_sums_f16_avx2(q, h, d, mode, sums)
            dot = sums[0]
            nrm = sums[1]
            acc = sums[2]
            return finish_distance(dot, nrm, acc, q_norm2, unit_norm, inner_product, eps10)
    if is_int8:
        if unit_norm:
            for j in range(d):
                x = <double> offset[j] + <double> scale[j] * c[j]
                dot += <double> q[j] * x
                nrm += x * x
        elif inner_product:
            for j in range(d):
                x = <double> offset[j] + <double> scale[j] * c[j]
                dot += <double> q[j] * x
        else:
            for j in range(d):
                t = <double> q[j] - (<double> offset[j] + <double> scale[j] * c[j])
                acc += t * t
    else:
        if unit_norm:
            for j in range(d):
                x = half_to_double(h[j])
                dot += <double> q[j] * x
                nrm += x * x
        elif inner_product:
            for j in range(d):
                dot += <double> q[j] * half_to_double(h[j])
        else:
            for j in range(d):
                t = <double> q[j] - half_to_double(h[j])
                acc += t * t
    return finish_distance(dot, nrm, acc, q_norm2, unit_norm, inner_product, eps10)


cdef inline double finish_distance(double dot, double nrm, double acc, double q_norm2,
                                   bint unit_norm, bint inner_product,
                                   double eps10) noexcept nogil:
    """The distance of ``row_distance`` from the row's sums (see there)."""
    cdef double n
    if not unit_norm:
        return -dot if inner_product else acc
    n = sqrt(nrm)
    if not n >= eps10:
        n = 1.0
    if inner_product:
        return -dot / n
    acc = q_norm2 - 2 * dot / n + nrm / (n * n)
    return acc if acc > 0 else 0


@cython.boundscheck(False)
@cython.wraparound(False)
def compact_rerank(const floating[:, ::1] Q,        # IN  (nq, D) prepared queries
                   const uintptr_t[::1] part_ptr,   # IN  (P,) tier row parts (P >= 1)
                   const int64_t[::1] part_start,   # IN  (P + 1,) their first rows
                   bint is_int8,                    # IN  uint8 codes, else float16 bits
                   const float[::1] offset,         # IN  (D,) int8: x = offset + scale * code
                   const float[::1] scale,          # IN  (D,) (float16: unread, any length)
                   const int64_t[:, ::1] cand,      # IN  (nq, n_cand) candidate ids
                   bint unit_norm,
                   bint inner_product,
                   floating[:, ::1] out_dist,       # OUT (nq, n_neighbors)
                   int64_t[:, ::1] out_idx,         # OUT (nq, n_neighbors)
                   floating[:, ::1] heap_d,         # scratch (n_threads, >= n_neighbors)
                   int64_t[:, ::1] heap_i,          # scratch (n_threads, >= n_neighbors)
                   int n_threads):
    """``exact_rerank`` from a compact tier (see the module docstring):
    each candidate row is decoded on the fly.  The caller checks shapes
    (offset and scale of length D for int8).

    With float32 queries and ``TIER_ISA == "avx2"`` (chosen at import from
    the CPU, ``PQSK_SIMD=scalar`` forces the scalar path) a row's sums are
    accumulated in float32 lanes (int8 decoded with FMA) and reduced to
    double at the end: distances then differ from the double scalar path
    by float32 rounding, |err| <~ 1e-6 * d * (||q||^2 + ||x||^2)
    (relative ~1e-5 for d <= 1000); ids are the same except near-ties.
    float64 queries always take the scalar path."""
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t d = Q.shape[1]
    cdef Py_ssize_t n_cand = cand.shape[1]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef Py_ssize_t row_bytes = d * (1 if is_int8 else 2)
    cdef int64_t n_rows = part_start[part_start.shape[0] - 1]
    cdef Py_ssize_t q, c, r, j
    cdef int64_t i, a
    cdef double qn
    cdef floating dist
    cdef floating* hd = NULL
    cdef int64_t* hi = NULL
    cdef const float* off = &offset[0] if offset.shape[0] else NULL
    cdef const float* sc = &scale[0] if scale.shape[0] else NULL
    cdef double eps10 = 10 * (1.1920928955078125e-07 if sizeof(floating) == 4
                              else 2.220446049250313e-16)
    cdef int tid
    if nq == 0 or kn == 0:
        return
    if d == 0:
        row_bytes = 1
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        hd = &heap_d[tid, 0]
        hi = &heap_i[tid, 0]
        for q in prange(nq, schedule="static"):
            heap_init(hd, hi, kn)
            qn = 0
            for j in range(d):
                qn = qn + <double> Q[q, j] * Q[q, j]
            for c in range(min(LOOKAHEAD, n_cand)):
                a = cand[q, c]
                if 0 <= a < n_rows:
                    prefetch_bytes(part_row(a, part_ptr, part_start, row_bytes), row_bytes)
            for c in range(n_cand):
                if c + LOOKAHEAD < n_cand:
                    a = cand[q, c + LOOKAHEAD]
                    if 0 <= a < n_rows:
                        prefetch_bytes(part_row(a, part_ptr, part_start, row_bytes),
                                       row_bytes)
                i = cand[q, c]
                if 0 <= i < n_rows:
                    dist = compact_distance(&Q[q, 0],
                                            part_row(i, part_ptr, part_start, row_bytes),
                                            d, is_int8, off, sc, qn, unit_norm,
                                            inner_product, eps10)
                else:
                    dist = INFINITY
                if pair_greater(hd[0], hi[0], dist, i):
                    heap_push(hd, hi, kn, dist, i)
            heap_sort(hd, hi, kn)
            for r in range(kn):
                out_dist[q, r] = hd[r]
                out_idx[q, r] = hi[r]


def tier_isas():
    """The ``compact_rerank`` paths this CPU can run, best last."""
    return ["scalar", "avx2"] if pqsk_rr_cpu_has_avx2_f16c() else ["scalar"]


def set_tier_isa(name):
    """Select the ``compact_rerank`` path, "scalar" or "avx2" (private, for
    tests and benchmarks).  Raises ValueError for one the CPU lacks."""
    global _tier_simd, TIER_ISA
    if name not in ("scalar", "avx2"):
        raise ValueError(f"unknown instruction set {name!r}; use scalar or avx2")
    if name not in tier_isas():
        raise ValueError(f"this CPU cannot run the {name} re-ranking kernel")
    _tier_simd = 1 if name == "avx2" else 0
    TIER_ISA = name


def _select_tier_at_import():
    import os
    import warnings
    isas = tier_isas()
    best = isas[len(isas) - 1]
    wanted = os.environ.get("PQSK_SIMD", "").strip().lower()
    if wanted:
        # PQSK_SIMD names fast-scan paths too: avx512bw implies avx2 here.
        if wanted == "avx512bw":
            wanted = "avx2"
        try:
            set_tier_isa(wanted)
            return
        except ValueError as e:
            warnings.warn(f"PQSK_SIMD={wanted!r} ignored for re-ranking: {e}; using {best}",
                          RuntimeWarning)
    set_tier_isa(best)


# The compact_rerank path in use: "avx2" (AVX2+FMA+F16C, float32 queries) or "scalar".
TIER_ISA = "scalar"
_select_tier_at_import()
