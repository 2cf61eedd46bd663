"""Inverted-file ADC search (IVFADC, Jégou et al. 2011).

The index keeps, per list l, the PQ codes of the residuals ``x - c_l`` of
the vectors assigned to centroid c_l, stored back to back: list l owns rows
``offsets[l]:offsets[l + 1]`` of ``codes`` and ``ids``.

For a query q and a list l, with r_hat the decoded residual::

    L2:  ||q - c_l - r_hat||^2 = ||q - c_l||^2                  (coarse term)
                               + ||r_hat||^2 + 2 <c_l, r_hat>    (list_terms[l], precomputed)
                               - 2 <q, r_hat>                    (per query, all lists)
    IP:  -<q, c_l + r_hat>     = -<q, c_l> - <q, r_hat>

so a list's table costs m * k additions, not k * D multiply-adds.
"""

cimport cython
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int64_t

from ._heap cimport heap_init, heap_push, heap_sort, pair_greater
from ._kernels cimport code_t, index_t, build_table, scan_codes


cdef inline Py_ssize_t scan_list(Py_ssize_t l,
                                 floating coarse_term,
                                 const floating* query_table,  # IN (m, k): -<q_j, r_c>
                                 const floating[:, :, ::1] list_terms,
                                 const code_t[:, ::1] codes,
                                 const index_t[::1] ids,
                                 const int64_t[::1] offsets,
                                 bint inner_product,
                                 Py_ssize_t m,
                                 Py_ssize_t k,
                                 floating* list_table,         # scratch (m, k)
                                 floating* heap_dist,
                                 int64_t* heap_idx,
                                 Py_ssize_t n_neighbors) noexcept nogil:
    """Scan list l into the heap; return how many codes it holds."""
    cdef Py_ssize_t start = offsets[l]
    cdef Py_ssize_t n_l = offsets[l + 1] - start
    cdef Py_ssize_t i
    cdef const floating* table = query_table
    cdef const floating* terms
    if n_l == 0:
        return 0
    if not inner_product:
        terms = &list_terms[l, 0, 0]
        for i in range(m * k):
            list_table[i] = terms[i] + 2 * query_table[i]
        table = list_table
    scan_codes(table, &codes[start, 0], n_l, m, k, coarse_term, &ids[start],
               heap_dist, heap_idx, n_neighbors)
    return n_l


def ivf_search(const floating[:, ::1] Q,               # IN  (nq, D)
               const floating[:, ::1] coarse,          # IN  (nq, n_lists)
               const floating[:, :, ::1] codebooks_t,  # IN  (m, ds, k) residual codebooks
               const floating[:, :, ::1] list_terms,   # IN  (n_lists, m, k) (L2 only)
               const code_t[:, ::1] codes,             # IN  (n, m), list after list
               const index_t[::1] ids,                 # IN  (n,)
               const int64_t[::1] offsets,             # IN  (n_lists + 1,)
               bint inner_product,
               Py_ssize_t n_probe,
               floating[:, ::1] out_dist,              # OUT (nq, n_neighbors)
               int64_t[:, ::1] out_idx,                # OUT (nq, n_neighbors)
               floating[:, ::1] work,                  # scratch (n_threads, 2 * m * k)
               floating[:, ::1] probe_dist,            # scratch (n_threads, >= n_probe)
               int64_t[:, ::1] probe_idx,              # scratch (n_threads, >= n_probe)
               floating[:, ::1] heap_d,                # scratch (n_threads, >= n_neighbors)
               int64_t[:, ::1] heap_i,                 # scratch (n_threads, >= n_neighbors)
               int n_threads):
    """Search the ``n_probe`` lists with the smallest coarse term, then,
    while fewer than ``n_neighbors`` codes were seen, the next lists in
    coarse order.  Rows of the output are sorted by (distance, id).

    ``coarse[q, l]`` is ``||q - c_l||^2`` (L2) or ``-<q, c_l>`` (IP).
    Requires 1 <= n_probe <= n_lists.  Scratch rows are per thread and
    padded by the caller to whole cache lines (no false sharing); the
    sorted heap is copied to the output row at the end.
    """
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t n_lists = coarse.shape[1]
    cdef Py_ssize_t m = codebooks_t.shape[0]
    cdef Py_ssize_t ds = codebooks_t.shape[1]
    cdef Py_ssize_t k = codebooks_t.shape[2]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef Py_ssize_t q, l, p, r, seen, best_l
    cdef floating last_d, best_d
    cdef int64_t last_l
    cdef floating* qt = NULL
    cdef floating* pd = NULL
    cdef int64_t* pi = NULL
    cdef floating* hd = NULL
    cdef int64_t* hi = NULL
    cdef int tid
    if nq == 0 or kn == 0:
        return
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        qt = &work[tid, 0]
        pd = &probe_dist[tid, 0]
        pi = &probe_idx[tid, 0]
        hd = &heap_d[tid, 0]
        hi = &heap_i[tid, 0]
        for q in prange(nq, schedule="dynamic"):
            # The n_probe nearest lists, nearest first.
            heap_init(pd, pi, n_probe)
            for l in range(n_lists):
                heap_push(pd, pi, n_probe, coarse[q, l], l)
            heap_sort(pd, pi, n_probe)

            build_table(&Q[q, 0], &codebooks_t[0, 0, 0], m, ds, k, True, qt)
            heap_init(hd, hi, kn)
            seen = 0
            for p in range(n_probe):
                seen = seen + scan_list(pi[p], pd[p], qt, list_terms, codes, ids,
                                        offsets, inner_product, m, k, qt + m * k,
                                        hd, hi, kn)
            # Too few candidates: probe further lists in coarse order.
            last_d = pd[n_probe - 1]
            last_l = pi[n_probe - 1]
            while seen < kn:
                best_l = -1
                best_d = 0
                for l in range(n_lists):
                    if pair_greater(coarse[q, l], l, last_d, last_l) and (
                            best_l < 0 or pair_greater(best_d, best_l, coarse[q, l], l)):
                        best_l = l
                        best_d = coarse[q, l]
                if best_l < 0:
                    break
                seen = seen + scan_list(best_l, best_d, qt, list_terms, codes, ids,
                                        offsets, inner_product, m, k, qt + m * k,
                                        hd, hi, kn)
                last_d = best_d
                last_l = best_l
            heap_sort(hd, hi, kn)
            for r in range(kn):
                out_dist[q, r] = hd[r]
                out_idx[q, r] = hi[r]
