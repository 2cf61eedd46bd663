"""Asymmetric distance computation (ADC): lookup tables and code scans.

For every query the kernel builds m tables of k distances (one per
sub-space), then scans the codes adding ``m`` table entries per code and
keeps the best ``n_neighbors`` in a bounded heap.  The naive meaning of the
scan, kept in ``pqsk._naive.adc_scan`` as the test oracle, is::

    for i in range(n_codes):
        dist[i] = sum(table[j, codes[i, j]] for j in range(m))
    return the n_neighbors smallest (dist, i), ties to the smaller i
"""

cimport cython
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int64_t, uint8_t

from ._heap cimport heap_init, heap_sort
from ._kernels cimport code_t, build_table, scan_codes


def adc_tables(const floating[:, ::1] Q,               # IN  (nq, D)
               const floating[:, :, ::1] codebooks_t,  # IN  (m, ds, k)
               bint inner_product,
               floating[:, :, ::1] tables,             # OUT (nq, m, k)
               int n_threads):
    """Fill ``tables[q]`` with query q's ADC tables (see ``build_table``)."""
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t m = codebooks_t.shape[0]
    cdef Py_ssize_t ds = codebooks_t.shape[1]
    cdef Py_ssize_t k = codebooks_t.shape[2]
    cdef Py_ssize_t q
    if nq == 0:
        return
    with nogil:
        for q in prange(nq, schedule="static", num_threads=n_threads):
            build_table(&Q[q, 0], &codebooks_t[0, 0, 0], m, ds, k,
                        inner_product, &tables[q, 0, 0])


def adc_scan(const floating[:, :, ::1] tables,  # IN  (nq, m, k)
             const code_t[:, ::1] codes,        # IN  (n, m)
             floating[:, ::1] out_dist,         # OUT (nq, n_neighbors)
             int64_t[:, ::1] out_idx,           # OUT (nq, n_neighbors)
             int n_threads):
    """Top-``n_neighbors`` codes for each query's precomputed tables.

    Rows come out sorted by (distance, index).  Slots left empty (fewer
    codes than neighbours) hold (+inf, INT64_MAX).
    """
    cdef Py_ssize_t nq = tables.shape[0]
    cdef Py_ssize_t m = tables.shape[1]
    cdef Py_ssize_t k = tables.shape[2]
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef Py_ssize_t q
    if nq == 0 or kn == 0:
        return
    with nogil:
        for q in prange(nq, schedule="static", num_threads=n_threads):
            heap_init(&out_dist[q, 0], &out_idx[q, 0], kn)
            if n > 0:
                scan_codes(&tables[q, 0, 0], &codes[0, 0], n, m, k, 0,
                           <const int64_t*> NULL, NULL,
                           &out_dist[q, 0], &out_idx[q, 0], kn)
            heap_sort(&out_dist[q, 0], &out_idx[q, 0], kn)


def adc_search(const floating[:, ::1] Q,               # IN  (nq, D)
               const floating[:, :, ::1] codebooks_t,  # IN  (m, ds, k)
               const code_t[:, ::1] codes,             # IN  (n, m)
               bint inner_product,
               floating[:, ::1] out_dist,              # OUT (nq, n_neighbors)
               int64_t[:, ::1] out_idx,                # OUT (nq, n_neighbors)
               floating[:, ::1] work,                  # scratch (n_threads, >= m * k)
               floating[:, ::1] heap_d,                # scratch (n_threads, >= n_neighbors)
               int64_t[:, ::1] heap_i,                 # scratch (n_threads, >= n_neighbors)
               int n_threads,
               const uint8_t[::1] blocked=None,        # IN  (nq * stride or n,) or None
               Py_ssize_t blocked_stride=0):
    """Exhaustive ADC search: build each query's tables, scan every code.

    ``blocked`` (filtered search): codes whose row is marked are skipped,
    read as tombstones are (only for a code that would enter the heap);
    query q reads ``blocked[q * blocked_stride:]`` (stride 0: one mask for
    every query, of length >= n).  The caller checks the length.

    Parallel over queries; each thread builds its tables and keeps its heap
    in its own scratch rows (padded by the caller to whole cache lines, so
    that threads never write to a line another one reads), then copies the
    sorted heap to the output row.  Rows are sorted by (distance, index).
    """
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t m = codebooks_t.shape[0]
    cdef Py_ssize_t ds = codebooks_t.shape[1]
    cdef Py_ssize_t k = codebooks_t.shape[2]
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef Py_ssize_t q, r
    cdef int tid
    cdef floating* t = NULL
    cdef floating* hd = NULL
    cdef int64_t* hi = NULL
    cdef const uint8_t* blk = NULL
    cdef const uint8_t* bq = NULL
    if blocked is not None and blocked.shape[0] > 0:
        blk = &blocked[0]
    if nq == 0 or kn == 0:
        return
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        t = &work[tid, 0]
        hd = &heap_d[tid, 0]
        hi = &heap_i[tid, 0]
        for q in prange(nq, schedule="dynamic"):
            build_table(&Q[q, 0], &codebooks_t[0, 0, 0], m, ds, k,
                        inner_product, t)
            heap_init(hd, hi, kn)
            bq = blk + q * blocked_stride if blk != NULL else NULL
            if n > 0:
                scan_codes(t, &codes[0, 0], n, m, k, 0, <const int64_t*> NULL, bq,
                           hd, hi, kn)
            heap_sort(hd, hi, kn)
            for r in range(kn):
                out_dist[q, r] = hd[r]
                out_idx[q, r] = hi[r]
