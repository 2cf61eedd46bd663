# Shared declarations for pqsk's kernels: the code dtypes and the
# inline distance-table helper used by every search kernel.

from cython cimport floating
from libc.stdint cimport uint8_t, uint16_t

ctypedef fused code_t:
    uint8_t
    uint16_t


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
