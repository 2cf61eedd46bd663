"""Encoding kernel: nearest codeword per sub-space, parallel over rows."""

cimport cython
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid

from ._kernels cimport code_t, build_table


def encode(const floating[:, ::1] X,            # IN  (n, D)
           const floating[:, :, ::1] codebooks_t,  # IN  (m, ds, k)
           code_t[:, ::1] codes,                # OUT (n, m)
           floating[:, ::1] work,               # scratch (n_threads, m * k)
           int n_threads):
    """Write into ``codes[i, j]`` the index of the codeword of sub-space j
    nearest (squared L2, ties to the smaller index) to row i's j-th block.

    ``codebooks_t[j, d, c]`` is dimension d of codeword c of sub-space j.
    ``work`` must have at least ``n_threads`` rows.
    """
    cdef Py_ssize_t n = X.shape[0]
    cdef Py_ssize_t m = codebooks_t.shape[0]
    cdef Py_ssize_t ds = codebooks_t.shape[1]
    cdef Py_ssize_t k = codebooks_t.shape[2]
    cdef Py_ssize_t i, j, c, best
    cdef floating bd
    cdef floating* t
    if n == 0:
        return
    t = NULL
    with nogil, parallel(num_threads=n_threads):
        t = &work[threadid(), 0]
        for i in prange(n, schedule="static"):
            build_table(&X[i, 0], &codebooks_t[0, 0, 0], m, ds, k, False, t)
            for j in range(m):
                best = 0
                bd = t[j * k]
                for c in range(1, k):
                    if t[j * k + c] < bd:
                        bd = t[j * k + c]
                        best = c
                codes[i, j] = <code_t> best
