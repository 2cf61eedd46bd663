# Shared declarations for pqsk's kernels: the code dtypes and the
# inline distance-table helper used by every search kernel.

from cython cimport floating
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t

from ._heap cimport heap_push

ctypedef fused code_t:
    uint8_t
    uint16_t

# Stored ids: int32 while the index holds fewer than 2**31 vectors.
ctypedef fused index_t:
    int32_t
    int64_t


cdef inline void build_table(const floating* q,     # IN  (D,) query
                             const floating* cbt,   # IN  (m, ds, k) transposed codebooks
                             Py_ssize_t m,
                             Py_ssize_t ds,
                             Py_ssize_t k,
                             bint inner_product,
                             floating* table) noexcept nogil:  # OUT (m, k)
    """One query's ADC lookup tables.

    ``table[j, c]`` is the squared L2 distance between the query's j-th
    sub-vector and codeword c of sub-space j, or, for the inner product,
    minus their dot product (smaller is always better).
    """
    cdef Py_ssize_t j, d, c
    cdef floating qd, diff
    cdef floating* t
    cdef const floating* row
    for j in range(m):
        t = table + j * k
        for c in range(k):
            t[c] = 0
        for d in range(ds):
            qd = q[j * ds + d]
            row = cbt + (j * ds + d) * k
            if inner_product:
                for c in range(k):
                    t[c] -= qd * row[c]
            else:
                for c in range(k):
                    diff = qd - row[c]
                    t[c] += diff * diff


cdef inline void scan_codes(const floating* table,   # IN  (m, k)
                            const code_t* codes,     # IN  (n, m)
                            Py_ssize_t n,
                            Py_ssize_t m,
                            Py_ssize_t k,
                            floating bias,
                            const index_t* ids,      # IN  (n,) or NULL
                            const uint8_t* deleted,  # IN  (n_ids,) tombstones or NULL
                            floating* heap_dist,     # INOUT (n_neighbors,)
                            int64_t* heap_idx,       # INOUT (n_neighbors,)
                            Py_ssize_t n_neighbors) noexcept nogil:
    """Offer each code's ADC distance ``bias + sum_j table[j, codes[i, j]]``
    to the heap, under id ``ids[i]`` (or ``i`` when ids is NULL), unless
    that id is marked in ``deleted``.

    Four codes are summed per iteration, each in its own accumulator, so
    the additions of different codes do not wait on each other; the heap
    is touched only when one of the four beats its worst entry, and the
    tombstones are read only then (a removed entry costs nothing more
    unless it would have entered the heap).
    """
    cdef Py_ssize_t i = 0, j, r
    cdef const floating* t
    cdef const code_t* c0
    cdef const code_t* c1
    cdef const code_t* c2
    cdef const code_t* c3
    cdef floating d0, d1, d2, d3, worst
    cdef floating dd[4]
    cdef int64_t e
    while i + 4 <= n:
        c0 = codes + i * m
        c1 = c0 + m
        c2 = c1 + m
        c3 = c2 + m
        d0 = bias
        d1 = bias
        d2 = bias
        d3 = bias
        t = table
        for j in range(m):
            d0 = d0 + t[c0[j]]
            d1 = d1 + t[c1[j]]
            d2 = d2 + t[c2[j]]
            d3 = d3 + t[c3[j]]
            t = t + k
        worst = heap_dist[0]
        if d0 <= worst or d1 <= worst or d2 <= worst or d3 <= worst:
            dd[0] = d0
            dd[1] = d1
            dd[2] = d2
            dd[3] = d3
            for r in range(4):
                e = ids[i + r] if ids != NULL else i + r
                if deleted == NULL or not deleted[e]:
                    heap_push(heap_dist, heap_idx, n_neighbors, dd[r], e)
        i += 4
    while i < n:
        c0 = codes + i * m
        d0 = bias
        t = table
        for j in range(m):
            d0 = d0 + t[c0[j]]
            t = t + k
        e = ids[i] if ids != NULL else i
        if d0 <= heap_dist[0] and (deleted == NULL or not deleted[e]):
            heap_push(heap_dist, heap_idx, n_neighbors, d0, e)
        i += 1


cdef inline void scan_some(const floating* table,   # IN  (m, k)
                           const code_t* codes,     # IN  (n, m)
                           const int64_t* rows,     # IN  (n_rows,) rows of codes to scan
                           Py_ssize_t n_rows,
                           Py_ssize_t m,
                           Py_ssize_t k,
                           floating bias,
                           const index_t* ids,      # IN  (n,)
                           const uint8_t* deleted,  # IN  (n_ids,) tombstones or NULL
                           floating* heap_dist,     # INOUT (n_neighbors,)
                           int64_t* heap_idx,       # INOUT (n_neighbors,)
                           Py_ssize_t n_neighbors) noexcept nogil:
    """``scan_codes`` over the listed rows only (same sums, in the same
    order, so a code scored here or there gets the same distance)."""
    cdef Py_ssize_t a, j
    cdef const floating* t
    cdef const code_t* c0
    cdef floating d0
    cdef int64_t e
    for a in range(n_rows):
        c0 = codes + rows[a] * m
        d0 = bias
        t = table
        for j in range(m):
            d0 = d0 + t[c0[j]]
            t = t + k
        e = ids[rows[a]]
        if d0 <= heap_dist[0] and (deleted == NULL or not deleted[e]):
            heap_push(heap_dist, heap_idx, n_neighbors, d0, e)
