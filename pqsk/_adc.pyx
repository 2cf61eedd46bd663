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
from libc.stdint cimport int64_t

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
                scan_codes(&tables[q, 0, 0], &codes[0, 0], n, m, k, 0, <const int64_t*> NULL,
                           &out_dist[q, 0], &out_idx[q, 0], kn)
            heap_sort(&out_dist[q, 0], &out_idx[q, 0], kn)


def adc_search(const floating[:, ::1] Q,               # IN  (nq, D)
               const floating[:, :, ::1] codebooks_t,  # IN  (m, ds, k)
               const code_t[:, ::1] codes,             # IN  (n, m)
               bint inner_product,
               floating[:, ::1] out_dist,              # OUT (nq, n_neighbors)
               int64_t[:, ::1] out_idx,                # OUT (nq, n_neighbors)
               floating[:, ::1] work,                  # scratch (n_threads, m * k)
               int n_threads):
    """Exhaustive ADC search: build each query's tables, scan every code.

    Parallel over queries; each thread builds its tables in its own row of
    ``work``.  Output rows are sorted by (distance, index).
    """
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t m = codebooks_t.shape[0]
    cdef Py_ssize_t ds = codebooks_t.shape[1]
    cdef Py_ssize_t k = codebooks_t.shape[2]
    cdef Py_ssize_t n = codes.shape[0]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef Py_ssize_t q
    cdef floating* t
    if nq == 0 or kn == 0:
        return
    t = NULL
    with nogil, parallel(num_threads=n_threads):
        t = &work[threadid(), 0]
        for q in prange(nq, schedule="dynamic"):
            build_table(&Q[q, 0], &codebooks_t[0, 0, 0], m, ds, k,
                        inner_product, t)
            heap_init(&out_dist[q, 0], &out_idx[q, 0], kn)
            if n > 0:
                scan_codes(t, &codes[0, 0], n, m, k, 0, <const int64_t*> NULL,
                           &out_dist[q, 0], &out_idx[q, 0], kn)
            heap_sort(&out_dist[q, 0], &out_idx[q, 0], kn)
