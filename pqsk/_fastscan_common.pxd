"""Shared declarations of the 4-bit fast-scan kernels: the block kernels of
``_fastscan_impl.h`` and the per-query table quantization and threshold,
cimported by ``pqsk._fastscan`` (exhaustive search) and ``pqsk._ivf``
(IVF lists of packed segments).  See ``pqsk/_fastscan.pyx`` for the maths."""

from cython cimport floating
from libc.math cimport INFINITY, fabs
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, INT64_MAX, UINT64_MAX
from libc.string cimport memcpy

from ._heap cimport heap_push
from ._kernels cimport index_t


cdef extern from "_fastscan_impl.h" nogil:
    ctypedef Py_ssize_t (*pqsk_fs_scan_fn)(const uint8_t*, Py_ssize_t, Py_ssize_t,
                                           Py_ssize_t, const uint8_t*, uint16_t,
                                           uint32_t*, uint16_t*) noexcept nogil
    Py_ssize_t pqsk_fs_scan_scalar(const uint8_t*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                   const uint8_t*, uint16_t, uint32_t*, uint16_t*)
    Py_ssize_t pqsk_fs_scan_avx2(const uint8_t*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                 const uint8_t*, uint16_t, uint32_t*, uint16_t*)
    Py_ssize_t pqsk_fs_scan_avx512bw(const uint8_t*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                     const uint8_t*, uint16_t, uint32_t*, uint16_t*)
    Py_ssize_t pqsk_fs_scan_neon(const uint8_t*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                 const uint8_t*, uint16_t, uint32_t*, uint16_t*)
    void pqsk_fs_pair_table(const uint8_t*, Py_ssize_t, uint16_t*)
    const uint8_t* pqsk_fs_prep_table(int, const uint8_t*, Py_ssize_t, uint16_t*)
    const uint8_t* pqsk_fs_prepared(int, const uint8_t*, uint16_t*)
    void pqsk_fs_quantize_f32(const float*, Py_ssize_t, Py_ssize_t, uint8_t*, double*)
    bint pqsk_any_le16_f32(const float*, float)
    int pqsk_fs_cpu_has_avx2()
    int pqsk_fs_cpu_has_avx512bw()
    int pqsk_fs_cpu_has_neon()
    int pqsk_fs_ctz32(uint32_t)
    uint64_t pqsk_fs_read_bytes(const uint8_t*, Py_ssize_t, int)


cdef inline void quantize_tables(const floating* t,    # IN  (m, 16)
                          Py_ssize_t m,
                          Py_ssize_t m2,
                          uint8_t* lut,         # OUT (m2, 16)
                          double* params) noexcept nogil:  # OUT sum_bias, delta, eps
    """uint8 tables of one query (see the module docstring).

    Entry (j, c) is round((t[j, c] - min_c t[j, c]) / delta), computed in
    the table's precision as ``(t - lo) * (1 / delta) + 0.5`` with a
    truncating conversion (the operand is >= 0.5): no division and no libm
    call per entry, a loop the compiler vectorises.  Against the exact
    rounding its error is at most three roundings of a value <= 255.5,
    below 5e-5 units per entry in single precision, so below 0.02 for the
    m <= 257 entries of a sum: the +1 of the worst-case margin
    (0.5 * m + 1) covers it."""
    cdef Py_ssize_t j, c
    cdef double span = 0, sum_b = 0, a = 0, delta, u
    cdef floating lo, hi, v, inv, x
    if floating is float:   # the same, in SSE2 (see _fastscan_impl.h)
        pqsk_fs_quantize_f32(t, m, m2, lut, params)
        return
    for j in range(m):
        lo = t[j * 16]
        hi = lo
        for c in range(1, 16):
            v = t[j * 16 + c]
            lo = v if v < lo else lo
            hi = v if v > hi else hi
        sum_b += lo
        if <double> hi - <double> lo > span:
            span = <double> hi - <double> lo
        a += fabs(lo) if fabs(lo) > fabs(hi) else fabs(hi)
    delta = span / 255.0
    if not delta > 0:
        delta = 1.0
    inv = <floating> (1.0 / delta)
    for j in range(m):
        lo = t[j * 16]
        for c in range(1, 16):
            v = t[j * 16 + c]
            lo = v if v < lo else lo
        for c in range(16):
            x = (t[j * 16 + c] - lo) * inv + <floating> 0.5
            lut[j * 16 + c] = <uint8_t> (x if x < 255 else 255)
    for j in range(m * 16, m2 * 16):
        lut[j] = 0
    # Float rounding of a summed distance (m additions of terms of at most
    # a) and of the double arithmetic here: generous bound, 4 units of the
    # storage type's rounding per addition.
    u = 2.384185791015625e-07 if sizeof(floating) == 4 else 4.440892098500626e-16  # 2**-22, 2**-51
    params[0] = sum_b
    params[1] = delta
    params[2] = (m + 2) * a * u


cdef inline bint any_le16(const floating* x, double t) noexcept nogil:
    """Whether some of x[0..15] is <= t (SSE2 for float32)."""
    cdef int i
    cdef bint hit = False
    if floating is float:
        return pqsk_any_le16_f32(x, <float> t)
    for i in range(16):
        hit |= x[i] <= t
    return hit


cdef inline uint16_t threshold(double worst, const double* params,
                               double margin) noexcept nogil:
    """Largest S a vector whose float distance is <= ``worst`` can have,
    ``margin`` units of rounding allowed (0.5 * m + 1 covers the worst
    case: exact), clamped to [0, 65535]."""
    cdef double s
    if not worst < INFINITY:
        return 65535
    s = (worst - params[0] + params[2]) / params[1] + margin
    if s >= 65535.0:
        return 65535
    if not s >= 0:
        return 0
    return <uint16_t> s   # (s >= 0: truncation is floor, without a libm call)


cdef inline void scan_packed(const floating* t,     # IN  (m, 16) float table
                             const uint8_t* tab,    # IN  quantized table (or pair sums)
                             const double* params,  # IN  its quantization
                             const uint8_t* packed,  # IN  (nb, npairs, 32) the list's blocks
                             Py_ssize_t n,
                             Py_ssize_t m,
                             Py_ssize_t npairs,
                             floating bias,
                             const index_t* ids,    # IN  (n,), or NULL: row numbers
                             const uint8_t* deleted,
                             floating* hd,
                             int64_t* hi,
                             Py_ssize_t kn,
                             pqsk_fs_scan_fn scan,
                             double margin) noexcept nogil:
    """Offer the ``n`` packed codes (an IVF list, or a whole flat index)
    whose quantized estimate is within ``margin`` units of the heap's
    worst distance (bias included), with their exact distances ``bias +
    sum_j t[j, code_j]`` (every code that may enter the heap when
    ``margin`` is the worst-case rounding, 0.5 * m + 1); ids from ``ids``,
    or the row numbers when it is NULL; ``deleted`` (tombstones by id) may
    be NULL."""
    cdef Py_ssize_t nb = (n + 31) // 32
    cdef Py_ssize_t b = 0, j, i, base
    cdef uint32_t mask = 0, tail
    cdef const uint8_t* blk
    cdef uint8_t byte
    cdef floating d
    cdef int64_t e
    # The bias enters every partial sum: its rounding (as quantize_tables
    # bounds the tables', 4 units per addition) widens the threshold.
    cdef double u = 2.384185791015625e-07 if sizeof(floating) == 4 else 4.440892098500626e-16
    cdef double slack = (m + 2) * fabs(<double> bias) * u
    cdef uint16_t thr = threshold(<double> hd[0] - <double> bias + slack, params, margin)
    tail = 0xFFFFFFFF if n % 32 == 0 else ((<uint32_t> 1 << (n % 32)) - 1)
    while b < nb:
        b = scan(packed, b, nb, npairs, tab, thr, &mask, NULL)
        if b >= nb:
            break
        if b == nb - 1:
            mask &= tail
        base = b * 32
        blk = packed + b * npairs * 32
        while mask:
            i = pqsk_fs_ctz32(mask)
            mask &= mask - 1
            # Same additions in the same order as scan_codes: same value.
            d = bias
            for j in range(m):
                byte = blk[(j >> 1) * 32 + i]
                d = d + t[j * 16 + ((byte >> 4) if (j & 1) else (byte & 15))]
            e = base + i if ids == NULL else ids[base + i]
            if d <= hd[0] and (deleted == NULL or not deleted[e]):
                heap_push(hd, hi, kn, d, e)
        thr = threshold(<double> hd[0] - <double> bias + slack, params, margin)
        b += 1


# -- sorting (estimate, id) pairs --------------------------------------------

cdef inline bint pair_less(double d1, int64_t h1, double d2, int64_t h2) noexcept nogil:
    return d1 < d2 or (d1 == d2 and h1 < h2)


cdef inline Py_ssize_t partition_pairs(double* d, int64_t* h, double* td, int64_t* th,
                                       Py_ssize_t lo, Py_ssize_t hi) noexcept nogil:
    """Partition pairs [lo, hi) (hi - lo >= 3, distinct pairs) around the
    median of the first, middle and last: returns j with [lo, j) the pairs
    below that pivot and [j, hi) the others, lo < j < hi - 1.  Branchless:
    each pair is written both to the next front and to the next back slot
    of (td, th), and only the side it belongs to advances (no mispredicted
    comparison per pair); the result is copied back."""
    cdef Py_ssize_t mid = lo + (hi - lo) // 2, i, j = lo, t = hi, a, b, c, tmp
    cdef double pd, x
    cdef int64_t ph, y
    cdef bint less
    # the median of three, by position
    a = lo
    b = mid
    c = hi - 1
    if pair_less(d[b], h[b], d[a], h[a]):
        tmp = a; a = b; b = tmp
    if pair_less(d[c], h[c], d[b], h[b]):
        b = c
        if pair_less(d[b], h[b], d[a], h[a]):
            b = a
    pd = d[b]
    ph = h[b]
    for i in range(lo, hi):
        x = d[i]
        y = h[i]
        less = (x < pd) | ((x == pd) & (y < ph))
        td[j] = x
        th[j] = y
        td[t - 1] = x
        th[t - 1] = y
        j += less
        t -= 1 - less
    for i in range(lo, hi):
        d[i] = td[i]
        h[i] = th[i]
    return j


cdef inline void insertion_sort_pairs(double* d, int64_t* h, Py_ssize_t lo,
                                      Py_ssize_t hi) noexcept nogil:
    """Sort pairs [lo, hi) ascending."""
    cdef Py_ssize_t i, j
    cdef double pd
    cdef int64_t ph
    for i in range(lo + 1, hi):
        pd = d[i]
        ph = h[i]
        j = i - 1
        while j >= lo and pair_less(pd, ph, d[j], h[j]):
            d[j + 1] = d[j]
            h[j + 1] = h[j]
            j -= 1
        d[j + 1] = pd
        h[j + 1] = ph


cdef inline void sort_pairs(double* d, int64_t* h, Py_ssize_t n,
                            double* td, int64_t* th) noexcept nogil:
    """Sort the n distinct pairs ascending: quicksort with the branchless
    partitions of ``partition_pairs`` (td, th: n pairs of scratch), the
    smaller side first (at most log2(n) ranges wait), insertion sort
    below 17 pairs."""
    cdef Py_ssize_t stack[128]
    cdef Py_ssize_t top, lo, hi, j
    stack[0] = 0
    stack[1] = n
    top = 2
    while top > 0:
        top -= 2
        lo = stack[top]
        hi = stack[top + 1]
        while hi - lo > 16:
            j = partition_pairs(d, h, td, th, lo, hi)
            if j - lo < hi - j:
                stack[top] = j
                stack[top + 1] = hi
                hi = j
            else:
                stack[top] = lo
                stack[top + 1] = j
                lo = j
            top += 2
        insertion_sort_pairs(d, h, lo, hi)


# -- a reservoir of (estimate, handle) pairs ---------------------------------
#
# The estimators' IVF scan ranks packed entries by their quantized
# estimates alone (and picks the probed lists by their coarse terms).  A
# bounded heap pays a sift-down per entry taken; the reservoir appends
# entries below its threshold to a buffer of ``cap`` and, when it is full,
# keeps the ``keep`` smallest (a selection in O(cap)) and lowers the
# threshold to the largest kept: O(1) amortized per entry.
#
# Entries must arrive in increasing handle order (the scans offer them so:
# probe slot, then row).  Then the order (estimate, handle) is the order
# (estimate, arrival): the buffer keeps arrival order (its compactions are
# stable), an estimate is held as a uint64 key with the same order as the
# double (``res_key``), and a selection needs no handle comparisons: it
# finds the keep-th smallest key T and keeps every key < T and the first
# arrivals equal to T.  A new entry enters only below the threshold
# (strictly: an equal estimate arrived later).

ctypedef struct reservoir_t:
    uint64_t* key        # (cap,) estimates as keys, in arrival order
    int64_t* h           # (cap,) their handles
    uint64_t* work       # (2 * cap,) selection scratch
    Py_ssize_t n         # entries held
    Py_ssize_t cap       # >= 2 * keep
    Py_ssize_t keep
    uint64_t thr_key     # an entry enters when its key is < thr_key
    double thr_d         # the estimate of thr_key (INFINITY: any)


cdef inline uint64_t res_key(double d) noexcept nogil:
    """A uint64 in the order of the doubles (not NaN; -0.0 as +0.0)."""
    cdef uint64_t u
    d = d + 0.0
    memcpy(&u, &d, 8)
    if u >> 63:
        return ~u
    return u | (<uint64_t> 1 << 63)


cdef inline double res_value(uint64_t key) noexcept nogil:
    """The double of a ``res_key``."""
    cdef uint64_t u = (key & ~(<uint64_t> 1 << 63)) if key >> 63 else ~key
    cdef double d
    memcpy(&d, &u, 8)
    return d


cdef inline void res_init(reservoir_t* r, uint64_t* key, int64_t* h, uint64_t* work,
                          Py_ssize_t cap, Py_ssize_t keep) noexcept nogil:
    """An empty reservoir over caller memory: key and h of ``cap``, work of
    ``2 * cap``; 1 <= keep, 2 * keep <= cap."""
    r.key = key
    r.h = h
    r.work = work
    r.n = 0
    r.cap = cap
    r.keep = keep
    r.thr_key = UINT64_MAX
    r.thr_d = INFINITY


cdef inline Py_ssize_t partition_keys(const uint64_t* a, uint64_t* t, Py_ssize_t lo,
                                      Py_ssize_t hi, uint64_t pivot,
                                      bint or_equal) noexcept nogil:
    """Write a[lo:hi] to t[lo:hi] partitioned into the keys < pivot (<= with
    ``or_equal``) and the others; returns where the others start.
    Branchless: each key is written to the next front and the next back
    slot of t, only its side advances."""
    cdef Py_ssize_t i, j = lo, e = hi
    cdef uint64_t x
    cdef bint front
    for i in range(lo, hi):
        x = a[i]
        front = (x < pivot) | (or_equal & (x == pivot))
        t[j] = x
        t[e - 1] = x
        j += front
        e -= 1 - front
    return j


cdef inline uint64_t select_key(const uint64_t* keys, uint64_t* b1, uint64_t* b2,
                                Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """The k-th smallest (0-based, k < n) of keys[0:n] (left as they are;
    b1, b2: n keys of scratch each): quickselect, median-of-three pivots,
    each partition written to the other buffer (only the range holding the
    answer is kept, so nothing is copied back), a second partition when
    the pivot's equals hold the answer (so duplicates always make
    progress), insertion sort of the last range."""
    cdef Py_ssize_t lo = 0, hi = n, j, i
    cdef uint64_t x, y, z, pivot
    cdef const uint64_t* src = keys
    cdef uint64_t* dst = b1
    cdef uint64_t* other = b2
    cdef uint64_t* a
    while hi - lo > 16:
        x = src[lo]
        y = src[lo + (hi - lo) // 2]
        z = src[hi - 1]
        if y < x:
            x, y = y, x
        if z < y:
            y = x if z < x else z
        pivot = y
        j = partition_keys(src, dst, lo, hi, pivot, False)   # [lo, j) < pivot
        src, dst, other = dst, other, dst
        if k < j:
            hi = j
            continue
        i = partition_keys(src, dst, j, hi, pivot, True)     # [j, i) == pivot
        src, dst, other = dst, other, dst
        if k < i:
            return pivot
        lo = i
    a = dst
    memcpy(a + lo, src + lo, (hi - lo) * sizeof(uint64_t))
    for i in range(lo + 1, hi):
        x = a[i]
        j = i - 1
        while j >= lo and x < a[j]:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = x
    return a[k]


cdef inline void res_shrink(reservoir_t* r) noexcept nogil:
    """Keep the ``keep`` smallest (estimate, arrival) entries, in arrival
    order; the threshold becomes the largest kept."""
    cdef Py_ssize_t i, j = 0, n_less = 0, budget
    cdef uint64_t T, x
    cdef bint take, eq
    if r.n <= r.keep:
        return
    T = select_key(r.key, r.work, r.work + r.cap, r.n, r.keep - 1)
    for i in range(r.n):
        n_less += r.key[i] < T
    budget = r.keep - n_less           # the first arrivals equal to T
    for i in range(r.n):               # stable, branchless compaction
        x = r.key[i]
        eq = x == T
        take = (x < T) | (eq & (budget > 0))
        budget -= eq & take
        r.key[j] = x
        r.h[j] = r.h[i]
        j += take
    r.n = r.keep
    r.thr_key = T
    r.thr_d = res_value(T)


cdef inline void res_sorted(reservoir_t* r, double* d, double* td) noexcept nogil:
    """The held entries as (estimate, handle) pairs sorted ascending: the
    estimates written to d, the handles sorted in r.h (td: n doubles of
    scratch; r.work is used too: the reservoir is done with)."""
    cdef Py_ssize_t i
    for i in range(r.n):
        d[i] = res_value(r.key[i])
    sort_pairs(d, r.h, r.n, td, <int64_t*> r.work)


cdef inline bint res_accepts(const reservoir_t* r, double d) noexcept nogil:
    """Whether an entry of estimate d arriving now would be kept so far."""
    return res_key(d) < r.thr_key


cdef inline void res_push(reservoir_t* r, double d, int64_t h) noexcept nogil:
    """Add (d, h), which ``res_accepts``; when the buffer is full, shrink
    first (the threshold drops) and test again."""
    cdef uint64_t key = res_key(d)
    if r.n == r.cap:
        res_shrink(r)
        if not key < r.thr_key:
            return
    r.key[r.n] = key
    r.h[r.n] = h
    r.n += 1


cdef inline void scan_packed_estimate(const uint8_t* tab,    # IN  quantized table (or pair sums)
                                      const double* params,  # IN  its quantization
                                      const uint8_t* packed,  # IN  (nb, npairs, 32) the list's blocks
                                      Py_ssize_t n,
                                      Py_ssize_t npairs,
                                      double bias,
                                      const index_t* ids,    # IN  (n,) ids of the n entries
                                      const uint8_t* deleted,
                                      int64_t handle,        # handle of entry 0
                                      reservoir_t* res,
                                      pqsk_fs_scan_fn scan) noexcept nogil:
    """Offer the ``n`` packed codes to the reservoir under their quantized
    estimate ``bias + sum_bias + delta * S`` (no float re-check), entry i
    under ``handle + i``; ``deleted`` (tombstones by id, may be NULL) is
    read only for entries that would enter it.  The caller scores what
    the reservoir keeps (see ``pqsk._ivf``)."""
    cdef Py_ssize_t nb = (n + 31) // 32
    cdef Py_ssize_t b = 0, i
    cdef uint32_t mask = 0, tail
    cdef uint16_t sums[32]
    cdef double base = bias + params[0]
    cdef double e
    cdef uint16_t thr = threshold(res.thr_d - bias, params, 0.0)
    tail = 0xFFFFFFFF if n % 32 == 0 else ((<uint32_t> 1 << (n % 32)) - 1)
    while b < nb:
        b = scan(packed, b, nb, npairs, tab, thr, &mask, sums)
        if b >= nb:
            break
        if b == nb - 1:
            mask &= tail
        while mask:
            i = pqsk_fs_ctz32(mask)
            mask &= mask - 1
            e = base + params[1] * sums[(i & 1) * 16 + (i >> 1)]
            if res_accepts(res, e) and (deleted == NULL or not deleted[ids[b * 32 + i]]):
                res_push(res, e, handle + b * 32 + i)
        thr = threshold(res.thr_d - bias, params, 0.0)
        b += 1
