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
in double exactly as for raw rows, the SIMD paths (float32 queries; C in
``_rerank_impl.h``) sum float16 rows in float32 lanes, and int8 rows in
float32 lanes or by integer dot products of the codes with 16-bit query
weights (``TIER_INT8``; error bound in ``compact_rerank``).  The naive
versions are ``pqsk._naive.compact_rerank`` and, for the integer sums,
``pqsk._naive.compact_rerank_int8``.

Paths (``TIER_ISA``, chosen at import: the best the CPU runs, or
``PQSK_SIMD=scalar|avx2|avx512bw|avx512vnni|avx512|neon``, an unknown value
or one the CPU lacks ignored with a warning, see ``pqsk._simd``;
``set_tier_isa`` for tests): "scalar" (portable, double), "avx2" (AVX2+FMA+F16C),
"avx512bw" (and AVX-512F/BW/VL), "avx512vnni" (and VNNI: vpdpwssd), "neon"
(arm64: the int8 tier's integer sums in NEON, everything else as
"scalar", in double; the integer sums being exact, an int8 tier's
distances are those of the x86 integer path).  Each
SIMD function carries its own target attribute and is called only when
``__builtin_cpu_supports`` says the CPU has it: no ``-march`` flag.  On
the SIMD paths ``exact_rerank`` sums in double lanes (4 or 8; float32
rows widened exactly): only the summation order differs from the scalar
loop (float32 distances equal but for ties at the last bit of rounding).
"""

import numpy as np

cimport cython
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from libc.math cimport sqrt, ldexp, rint, fabs, INFINITY
from libc.stdint cimport int16_t, int64_t, uint8_t, uint16_t, uint32_t, uintptr_t
from libc.string cimport memcpy

from ._heap cimport heap_init, heap_push, heap_sort, pair_greater

from ._prefetch cimport pqsk_prefetch

ctypedef void (*isums_fn)(const uint8_t* c, const int16_t* w, const int16_t* f,
                         const int16_t* gh, const int16_t* gl, Py_ssize_t d, int mode,
                         int64_t* out) noexcept nogil

cdef extern from "_rerank_impl.h" nogil:
    int pqsk_rr_cpu_has_avx2_f16c()
    int pqsk_rr_cpu_level()
    int pqsk_rr_cpu_has_neon()
    void pqsk_rr_isums_neon(const uint8_t* c, const int16_t* w, const int16_t* f,
                            const int16_t* gh, const int16_t* gl, Py_ssize_t d, int mode,
                            int64_t* out)
    void pqsk_rr_isums_avx2(const uint8_t* c, const int16_t* w, const int16_t* f,
                            const int16_t* gh, const int16_t* gl, Py_ssize_t d, int mode,
                            int64_t* out)
    void pqsk_rr_isums_avx512bw(const uint8_t* c, const int16_t* w, const int16_t* f,
                                const int16_t* gh, const int16_t* gl, Py_ssize_t d, int mode,
                                int64_t* out)
    void pqsk_rr_isums_avx512vnni(const uint8_t* c, const int16_t* w, const int16_t* f,
                                  const int16_t* gh, const int16_t* gl, Py_ssize_t d,
                                  int mode, int64_t* out)
    void pqsk_rr_xsums_f32_avx2(const float* q, const float* x, Py_ssize_t d, int mode,
                                double* out)
    void pqsk_rr_xsums_f64_avx2(const double* q, const double* x, Py_ssize_t d, int mode,
                                double* out)
    void pqsk_rr_xsums_f32_avx512(const float* q, const float* x, Py_ssize_t d, int mode,
                                  double* out)
    void pqsk_rr_xsums_f64_avx512(const double* q, const double* x, Py_ssize_t d, int mode,
                                  double* out)
    void pqsk_rr_sums_int8_avx2(const float* q, const uint8_t* c, const float* off,
                                const float* sc, Py_ssize_t d, int mode, double* out)
    void pqsk_rr_sums_f16_avx2(const float* q, const uint16_t* h, Py_ssize_t d, int mode,
                               double* out)

# The instruction set in use (TIER_ISA): an index into ISAS (the x86-64
# levels), or NEON (arm64; _level 0: its float sums are the scalar ones).
ISAS = ("scalar", "avx2", "avx512bw", "avx512vnni")
NEON = "neon"
cdef int _level = 0
cdef bint _neon = 0
# 1: compact_rerank sums float32 queries with AVX2+FMA+F16C (_level >= 1).
cdef int _tier_simd = 0
# How an int8 tier's float32 queries are scored on a SIMD path (TIER_INT8):
# 0 float32 lanes, 1 integer sums when d >= INT8_MIN_D of the metric
# ("auto"), 2 integer sums.
cdef int _int8_integer = 0
# "auto": the smallest d at which the integer sums are faster than the
# float32 lanes, measured (benchmarks/results/rerank.md): L2, inner
# product, unit norm.
INT8_MIN_D = (96, 32, 96)
cdef Py_ssize_t _int8_min_d[3]
_int8_min_d[0], _int8_min_d[1], _int8_min_d[2] = INT8_MIN_D

# The weights' integer ranges: |w| <= W_MAX (int16), the tier's squared
# scales in 14 bits (two 7-bit halves, see _rerank_impl.h).
DEF W_MAX = 32767
DEF G_MAX = 16383

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
                                  double eps10,
                                  int lvl) noexcept nogil:
    """One pass over the row, in double: <q, x>, ||x||^2 (and, for L2
    without scaling, the squared differences).  With ``unit_norm`` the row
    counts as x / ||x|| (||x|| < eps10: as x):

        L2: ||q||^2 - 2 <q, x> / n + ||x||^2 / n^2,    IP: -<q, x> / n

    ``lvl`` (``_level``) >= 1: the same sums in AVX2 (4) or AVX-512 (8)
    double lanes (``pqsk_rr_xsums_*``: another summation order)."""
    cdef Py_ssize_t j
    cdef double dot = 0, nrm = 0, acc = 0, t, n
    cdef double sums[3]
    cdef int mode
    if lvl:
        mode = 2 if unit_norm else (1 if inner_product else 0)
        if floating is float:
            if lvl >= 2:
                pqsk_rr_xsums_f32_avx512(q, x, d, mode, sums)
            else:
                pqsk_rr_xsums_f32_avx2(q, x, d, mode, sums)
        else:
            if lvl >= 2:
                pqsk_rr_xsums_f64_avx512(q, x, d, mode, sums)
            else:
                pqsk_rr_xsums_f64_avx2(q, x, d, mode, sums)
        return <floating> finish_distance(sums[0], sums[1], sums[2], q_norm2, unit_norm,
                                          inner_product, eps10)
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
                 int n_threads,
                 bint release_gil=True):
    """Re-rank each query's candidates by exact distance (see the module
    docstring); rows of the output sorted by (distance, id), slots no
    valid candidate fills (+inf, INT64_MAX).  The caller checks shapes.
    On a SIMD ``TIER_ISA`` the row sums run in double lanes (see the
    module docstring).  With ``n_threads == 1`` and not ``release_gil``
    the work runs holding the GIL (for work shorter than a GIL hand-over
    to a busy thread: see ``pqsk._utils.GIL_WORK``)."""
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t d = Q.shape[1]
    cdef Py_ssize_t n_cand = cand.shape[1]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef int64_t n_rows = part_start[part_start.shape[0] - 1]
    cdef Py_ssize_t q
    cdef floating* hd = NULL
    cdef int64_t* hi = NULL
    cdef double eps10 = 10 * (1.1920928955078125e-07 if sizeof(floating) == 4
                              else 2.220446049250313e-16)
    cdef int tid
    cdef int lvl = _level
    if nq == 0 or kn == 0:
        return
    if n_threads == 1 and not release_gil:
        for q in range(nq):
            _exact_one(q, Q, part_ptr, part_start, cand, unit_norm, inner_product,
                       out_dist, out_idx, &heap_d[0, 0], &heap_i[0, 0], n_rows, eps10, lvl)
        return
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        hd = &heap_d[tid, 0]
        hi = &heap_i[tid, 0]
        for q in prange(nq, schedule="static"):
            _exact_one(q, Q, part_ptr, part_start, cand, unit_norm, inner_product,
                       out_dist, out_idx, hd, hi, n_rows, eps10, lvl)


cdef void _exact_one(Py_ssize_t q,
                     const floating[:, ::1] Q,
                     const uintptr_t[::1] part_ptr,
                     const int64_t[::1] part_start,
                     const int64_t[:, ::1] cand,
                     bint unit_norm,
                     bint inner_product,
                     floating[:, ::1] out_dist,
                     int64_t[:, ::1] out_idx,
                     floating* hd,
                     int64_t* hi,
                     int64_t n_rows,
                     double eps10,
                     int lvl) noexcept nogil:
    """``exact_rerank`` of query q, with the heap (hd, hi)."""
    cdef Py_ssize_t d = Q.shape[1]
    cdef Py_ssize_t n_cand = cand.shape[1]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef Py_ssize_t c, r, j
    cdef int64_t i, a
    cdef double qn = 0
    cdef floating dist
    cdef const floating* hint = NULL
    heap_init(hd, hi, kn)
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
                                d, qn, unit_norm, inner_product, eps10, lvl)
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


cdef inline void int8_query(const floating* q,
                            const float* off,
                            const float* sc,
                            Py_ssize_t d,
                            int mode,
                            int16_t* w,          # OUT (d,) the query's weights
                            double* par) noexcept nogil:  # OUT (2,) s_w, C
    """The query side of the integer path: u_j = (q_j - off_j) sc_j (L2,
    ``mode`` 0) or q_j sc_j (inner product, unit norm), as int16 weights
    w_j = rint(u_j * (1 / s_w)), s_w = max_j |u_j| / W_MAX (1 if 0); and C =
    sum_j (q_j - off_j)^2 (L2) or sum_j q_j off_j, in double."""
    cdef Py_ssize_t j
    cdef double u, mx = 0, cq = 0, sw, v, inv
    for j in range(d):
        if mode == 0:
            u = <double> q[j] - <double> off[j]
            cq += u * u
            u = u * <double> sc[j]
        else:
            u = <double> q[j] * <double> sc[j]
            cq += <double> q[j] * <double> off[j]
        if fabs(u) > mx:
            mx = fabs(u)
    sw = mx / W_MAX if mx > 0 else 1.0
    inv = 1.0 / sw
    for j in range(d):
        if mode == 0:
            u = (<double> q[j] - <double> off[j]) * <double> sc[j]
        else:
            u = <double> q[j] * <double> sc[j]
        v = rint(u * inv)
        if not v >= -W_MAX:  # (also NaN: never an undefined conversion)
            v = -W_MAX
        elif v > W_MAX:
            v = W_MAX
        w[j] = <int16_t> v
    par[0] = sw
    par[1] = cq


cdef inline double int8_distance(isums_fn isums,
                                 const uint8_t* c,
                                 Py_ssize_t d,
                                 int mode,
                                 const int16_t* w,
                                 const double* par,
                                 const int16_t* f,
                                 const int16_t* gh,
                                 const int16_t* gl,
                                 const double* tpar,
                                 double q_norm2,
                                 bint inner_product,
                                 double eps10) noexcept nogil:
    """The distance of an int8 row (codes c) from its integer sums
    S0 = sum w c, S1 = sum f c, S2 = sum g c^2 (``isums``): with par =
    (s_w, C) of the query, tpar = (s_f, s_g, sum_j off_j^2) of the tier,

        L2 (mode 0):  C - 2 s_w S0 + s_g S2           (clipped at 0)
        IP (mode 1):  -(C + s_w S0)
        unit norm:    <q, x> = C + s_w S0,  ||x||^2 = sum off^2 + s_f S1 + s_g S2
                      then as ``finish_distance``."""
    cdef int64_t sums[3]
    cdef double acc
    isums(c, w, f, gh, gl, d, mode, sums)
    if mode == 1:
        return -(par[1] + par[0] * <double> sums[0])
    if mode == 0:
        acc = par[1] - 2 * par[0] * <double> sums[0] + tpar[1] * <double> sums[2]
        return acc if acc > 0 else 0
    return finish_distance(par[1] + par[0] * <double> sums[0],
                           tpar[2] + tpar[0] * <double> sums[1] + tpar[1] * <double> sums[2],
                           0, q_norm2, True, inner_product, eps10)


cdef void int8_terms(const float* offset,
                     const float* scale,
                     Py_ssize_t d,
                     int16_t* f,          # OUT (d,)
                     int16_t* gh,         # OUT (d,)
                     int16_t* gl,         # OUT (d,)
                     double* tpar) noexcept nogil:  # OUT (3,) s_f, s_g, sum off^2
    """The tier side of the integer path (see ``compact_rerank``): f_j =
    rint(2 off_j sc_j * (1 / s_f)), s_f = max |2 off sc| / W_MAX; g_j =
    rint(sc_j^2 * (1 / s_g)) = 128 gh_j + gl_j, s_g = max sc^2 / G_MAX (each
    scale 1 if its maximum is 0)."""
    cdef Py_ssize_t j
    cdef double mf = 0, mg = 0, o2 = 0, lin, sq, s_f, s_g, v
    for j in range(d):
        lin = fabs(2 * <double> offset[j] * <double> scale[j])
        sq = <double> scale[j] * <double> scale[j]
        o2 += <double> offset[j] * <double> offset[j]
        if lin > mf:
            mf = lin
        if sq > mg:
            mg = sq
    s_f = mf / W_MAX if mf > 0 else 1.0
    s_g = mg / G_MAX if mg > 0 else 1.0
    for j in range(d):
        v = rint(2 * <double> offset[j] * <double> scale[j] * (1.0 / s_f))
        f[j] = <int16_t> (v if -W_MAX <= v <= W_MAX else (W_MAX if v > 0 else -W_MAX))
        v = rint(<double> scale[j] * <double> scale[j] * (1.0 / s_g))
        v = v if 0 <= v <= G_MAX else (G_MAX if v > 0 else 0)
        gh[j] = <int16_t> ((<int> v) >> 7)
        gl[j] = <int16_t> ((<int> v) & 127)
    tpar[0] = s_f
    tpar[1] = s_g
    tpar[2] = o2


def _int8_terms(const float[::1] offset, const float[::1] scale):
    """(g, s_f, s_g, sum off^2) and f of ``int8_terms`` (tests): f and g =
    128 gh + gl as int64 arrays."""
    cdef Py_ssize_t d = offset.shape[0]
    buf = np.zeros((3, max(d, 1)), dtype=np.int16)
    tpar = np.zeros(3)
    cdef int16_t[:, ::1] bv = buf
    cdef double[::1] tv = tpar
    if d:
        int8_terms(&offset[0], &scale[0], d, &bv[0, 0], &bv[1, 0], &bv[2, 0], &tv[0])
    b64 = buf[:, :d].astype(np.int64)
    return b64[0], 128 * b64[1] + b64[2], tpar


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
                   int n_threads,
                   bint release_gil=True):
    """``exact_rerank`` from a compact tier (see the module docstring):
    each candidate row is decoded on the fly.  The caller checks shapes
    (offset and scale of length D for int8).  ``release_gil`` as in
    ``exact_rerank``.

    With float32 queries and ``TIER_ISA`` other than "scalar" (chosen at
    import from the CPU; ``PQSK_SIMD`` overrides it) a float16 row's sums,
    and an int8 row's on the float32 path, are accumulated in
    AVX2 float32 lanes (int8 decoded with FMA; on "neon" these are the
    scalar path's double sums) and reduced to double at the end: distances then differ from the double scalar path by float32
    rounding, |err| <~ 1e-6 * d * (||q||^2 + ||x||^2) (relative ~1e-5 for
    d <= 1000); ids are the same except near-ties.

    With ``TIER_INT8 == "integer"`` (or "auto", the default, when d >=
    ``INT8_MIN_D`` of the metric: 96 for L2 and unit norm, 32 for inner
    products, where it is faster) an int8 row is scored by integer dot
    products of its codes c (AVX2 vpmaddwd, AVX-512BW, AVX-512 VNNI
    vpdpwssd, or NEON vmlal_s16 on arm64: the same exact sums): per query, the weights u_j (``int8_query``) are rounded to
    int16 w_j = rint(u_j / s_w); per tier, 2 off_j sc_j and sc_j^2 are
    rounded likewise (``int8_terms``, 16 and 14 bits); the offsets' terms
    are summed in double, the integer sums are exact.  The rounding of the
    weights bounds the error (against the scalar path, before float32
    rounding) of an int8 row by

        inner product: (s_w / 2) sum_j c_j  <=  s_w * 255 d / 2
        L2:            s_w sum_j c_j + (s_g / 2) sum_j c_j^2
        unit norm:     <q, x> off by at most e_d = (s_w / 2) sum c_j and
                       ||x||^2 by e_n = (s_f / 2) sum c_j + (s_g / 2) sum c_j^2

    with s_w = max_j |u_j| / 32767, s_f = max_j |2 off_j sc_j| / 32767,
    s_g = max_j sc_j^2 / 16383: relative to the terms' scale, <= 255 d /
    65534 ~ 0.004 d of one weight step; in practice (rounding errors of
    both signs) far below the tier's own quantization error (sc_j / 2 per
    element).  ``pqsk._naive.compact_rerank_int8`` computes the same sums
    in NumPy.  float64 queries always take the scalar path."""
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t d = Q.shape[1]
    cdef Py_ssize_t n_cand = cand.shape[1]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef Py_ssize_t row_bytes = d * (1 if is_int8 else 2)
    cdef int64_t n_rows = part_start[part_start.shape[0] - 1]
    cdef Py_ssize_t q
    cdef floating* hd = NULL
    cdef int64_t* hi = NULL
    cdef const float* off = &offset[0] if offset.shape[0] else NULL
    cdef const float* sc = &scale[0] if scale.shape[0] else NULL
    cdef double eps10 = 10 * (1.1920928955078125e-07 if sizeof(floating) == 4
                              else 2.220446049250313e-16)
    cdef int tid
    # The integer path (see above): its tier terms, per-thread weights.
    cdef int mode = 2 if unit_norm else (1 if inner_product else 0)
    cdef bint use_int = (is_int8 and (_level >= 1 or _neon) and d > 0
                         and (_int8_integer == 2
                              or (_int8_integer == 1 and d >= _int8_min_d[mode])))
    cdef isums_fn isums = (pqsk_rr_isums_neon if _neon else
                           pqsk_rr_isums_avx512vnni if _level >= 3 else
                           (pqsk_rr_isums_avx512bw if _level == 2 else pqsk_rr_isums_avx2))
    cdef Py_ssize_t d_pad = (d + 31) // 32 * 32 if d else 32
    cdef int16_t[:, ::1] w_v           # rows 0-2: f, gh, gl; 3 + tid: weights
    cdef double[:, ::1] par_v          # row 0: the tier's, 1 + tid: the query's
    cdef int16_t* wq = NULL
    cdef double* par = NULL
    if nq == 0 or kn == 0:
        return
    if d == 0:
        row_bytes = 1
    if floating is double:
        use_int = False
    if use_int:
        w_v = np.zeros((3 + max(1, n_threads), d_pad), dtype=np.int16)
        par_v = np.zeros((1 + max(1, n_threads), 3), dtype=np.float64)
        int8_terms(off, sc, d, &w_v[0, 0], &w_v[1, 0], &w_v[2, 0], &par_v[0, 0])
    if n_threads == 1 and not release_gil:
        for q in range(nq):
            _compact_one(q, Q, part_ptr, part_start, row_bytes, is_int8, off, sc, cand,
                         unit_norm, inner_product, out_dist, out_idx, &heap_d[0, 0],
                         &heap_i[0, 0], n_rows, eps10, use_int, isums, mode,
                         &w_v[3, 0] if use_int else NULL, &par_v[1, 0] if use_int else NULL,
                         &w_v[0, 0] if use_int else NULL, &par_v[0, 0] if use_int else NULL,
                         d_pad)
        return
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        hd = &heap_d[tid, 0]
        hi = &heap_i[tid, 0]
        if use_int:
            wq = &w_v[3 + tid, 0]
            par = &par_v[1 + tid, 0]
        for q in prange(nq, schedule="static"):
            _compact_one(q, Q, part_ptr, part_start, row_bytes, is_int8, off, sc, cand,
                         unit_norm, inner_product, out_dist, out_idx, hd, hi, n_rows,
                         eps10, use_int, isums, mode, wq, par,
                         &w_v[0, 0] if use_int else NULL, &par_v[0, 0] if use_int else NULL,
                         d_pad)


cdef void _compact_one(Py_ssize_t q,
                       const floating[:, ::1] Q,
                       const uintptr_t[::1] part_ptr,
                       const int64_t[::1] part_start,
                       Py_ssize_t row_bytes,
                       bint is_int8,
                       const float* off,
                       const float* sc,
                       const int64_t[:, ::1] cand,
                       bint unit_norm,
                       bint inner_product,
                       floating[:, ::1] out_dist,
                       int64_t[:, ::1] out_idx,
                       floating* hd,
                       int64_t* hi,
                       int64_t n_rows,
                       double eps10,
                       bint use_int,
                       isums_fn isums,
                       int mode,
                       int16_t* wq,
                       double* par,
                       const int16_t* w_tier,
                       const double* par_tier,
                       Py_ssize_t d_pad) noexcept nogil:
    """``compact_rerank`` of query q, with the heap (hd, hi) and, on the
    integer path, the query's weights ``wq`` / ``par`` and the tier's terms
    (rows 0-2 of ``w_tier``, each ``d_pad`` long, and ``par_tier``)."""
    cdef Py_ssize_t d = Q.shape[1]
    cdef Py_ssize_t n_cand = cand.shape[1]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef Py_ssize_t c, r, j
    cdef int64_t i, a
    cdef double qn = 0
    cdef floating dist
    heap_init(hd, hi, kn)
    for j in range(d):
        qn = qn + <double> Q[q, j] * Q[q, j]
    if use_int:
        int8_query(&Q[q, 0], off, sc, d, mode, wq, par)
    for c in range(min(LOOKAHEAD, n_cand)):
        a = cand[q, c]
        if 0 <= a < n_rows:
            prefetch_bytes(part_row(a, part_ptr, part_start, row_bytes), row_bytes)
    for c in range(n_cand):
        if c + LOOKAHEAD < n_cand:
            a = cand[q, c + LOOKAHEAD]
            if 0 <= a < n_rows:
                prefetch_bytes(part_row(a, part_ptr, part_start, row_bytes), row_bytes)
        i = cand[q, c]
        if 0 <= i < n_rows and use_int:
            dist = <floating> int8_distance(
                isums, <const uint8_t*> part_row(i, part_ptr, part_start, row_bytes),
                d, mode, wq, par, w_tier, w_tier + d_pad, w_tier + 2 * d_pad, par_tier, qn,
                inner_product, eps10)
        elif 0 <= i < n_rows:
            dist = compact_distance(&Q[q, 0], part_row(i, part_ptr, part_start, row_bytes),
                                    d, is_int8, off, sc, qn, unit_norm, inner_product, eps10)
        else:
            dist = INFINITY
        if pair_greater(hd[0], hi[0], dist, i):
            heap_push(hd, hi, kn, dist, i)
    heap_sort(hd, hi, kn)
    for r in range(kn):
        out_dist[q, r] = hd[r]
        out_idx[q, r] = hi[r]


def tier_isas():
    """The re-ranking paths this CPU can run (names of ``ISAS``, or "scalar"
    and "neon" on arm64), best last."""
    if pqsk_rr_cpu_has_neon():
        return ["scalar", NEON]
    return list(ISAS[:pqsk_rr_cpu_level() + 1])


def set_tier_isa(name, int8="auto"):
    """Select the re-ranking path (private, for tests and benchmarks):
    ``name`` one of ``ISAS`` or "neon" the CPU runs (see ``tier_isas``); ``int8``
    how an int8 tier is scored on a SIMD path: "float" (float32 lanes),
    "integer" (integer sums) or "auto" (integer when d >= ``INT8_MIN_D``
    of the metric, the default).  The scalar path is always double.
    Raises ValueError for an unknown name or one the CPU lacks."""
    global _level, _neon, _tier_simd, _int8_integer, TIER_ISA, TIER_INT8
    if name not in ISAS and name != NEON:
        raise ValueError(f"unknown instruction set {name!r}; use one of "
                         f"{', '.join(ISAS + (NEON,))}")
    if name not in tier_isas():
        raise ValueError(f"this CPU cannot run the {name} re-ranking kernel")
    modes = ("float", "auto", "integer")
    if int8 not in modes:
        raise ValueError(f"int8 must be 'float', 'auto' or 'integer', got {int8!r}")
    _neon = name == NEON
    _level = 0 if _neon else ISAS.index(name)
    _tier_simd = 1 if _level >= 1 else 0
    _int8_integer = modes.index(int8) if (_level >= 1 or _neon) else 0
    TIER_ISA = name
    TIER_INT8 = modes[_int8_integer]


def _select_tier_at_import():
    # PQSK_SIMD (see pqsk._simd), shared with the fast-scan: "avx512" is the
    # best AVX-512 level the CPU runs; a path the CPU lacks is never chosen.
    from pqsk._simd import choose
    isas = tier_isas()
    best = isas[len(isas) - 1]
    set_tier_isa(choose(isas, {"avx512": best if best.startswith("avx512") else "avx512bw"}))


# The re-ranking path in use (raw float rows and compact tiers): "scalar"
# (double), "avx2" (AVX2+FMA+F16C), "avx512bw" or "avx512vnni" (AVX-512
# F/BW/VL, with VNNI), "neon" (arm64: int8 integer sums); TIER_INT8: "auto", "integer" or "float", how an int8
# tier's float32 queries are scored on that path (see compact_rerank).
TIER_ISA = "scalar"
TIER_INT8 = "float"
_select_tier_at_import()
