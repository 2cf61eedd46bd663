"""Anisotropic encoding kernel: coordinate descent over the sub-spaces,
parallel over rows (see :mod:`pqsk._anisotropic` for the loss and
:func:`pqsk._naive.anisotropic_encode_chunk` for the NumPy oracle)."""

cimport cython
from cython.parallel cimport prange, parallel, threadid

from ._kernels cimport code_t


ctypedef struct block_sums:
    double ru      # r . u
    double rr      # ||r||^2


cdef inline block_sums block_residual(const double* x, const double* u, const double* cw,
                                      Py_ssize_t ds, Py_ssize_t k) noexcept nogil:
    """r . u and ||r||^2 of one block, r = x - the codeword at cw (a column
    of the transposed codebook: stride k).  Returned by value: the caller's
    variable stays private to its prange thread."""
    cdef Py_ssize_t d
    cdef double r
    cdef block_sums out
    out.ru = 0
    out.rr = 0
    for d in range(ds):
        r = x[d] - cw[d * k]
        out.ru = out.ru + r * u[d]
        out.rr = out.rr + r * r
    return out


def anisotropic_encode_rows(const double[:, ::1] X,             # IN  (n, m * ds) padded rows
                            const double[:, ::1] U,             # IN  (n, m * ds) unit directions
                            const double[::1] w,                # IN  (n,) eta - 1
                            const double[:, :, ::1] cb_t,       # IN  (m, ds, k) transposed codebooks
                            const double[:, ::1] c_norms,       # IN  (m, k) ||cb[j, c]||^2
                            code_t[:, ::1] codes,               # INOUT (n, m)
                            int n_sweeps,
                            double[:, ::1] work,                # scratch (n_threads, >= 2 m k + 2 m + k)
                            int n_threads):
    """Lower each row's loss ``||r||^2 + w (r . u)^2`` (``r = x -
    decode(codes)``) by at most ``n_sweeps`` sweeps of coordinate descent
    over the m sub-spaces, starting from ``codes``.  ``cb_t[j, d, c]`` is
    dimension d of codeword c of sub-space j (the layout of
    :func:`pqsk._quantizer.transposed`).

    In a sweep, sub-space j takes the codeword c of least loss given the
    other blocks (the first one on ties), but only when that loss is
    strictly below the current code's; a row stops after a sweep in which
    none of its codes changed.  Per row, the tables ``xc[j, c] = x_j .
    cb[j, c]`` and ``uc[j, c] = u_j . cb[j, c]`` are built once; a sweep
    then costs O(m k).  The arithmetic of each candidate's loss is the
    oracle's: ``((-2 xc + |c|^2) + n_o) + ((p_o - uc)^2) w``.

    ``work`` must have at least ``n_threads`` rows.  No validation: the
    caller checks shapes, codes < k and finiteness.
    """
    cdef Py_ssize_t n = X.shape[0]
    cdef Py_ssize_t m = cb_t.shape[0]
    cdef Py_ssize_t ds = cb_t.shape[1]
    cdef Py_ssize_t k = cb_t.shape[2]
    cdef Py_ssize_t i, j, c, d, cur, best, sweep
    cdef double p, nrm, po, no, diff, wi, bl, r, s, xd, ud
    cdef bint moved
    cdef block_sums bs
    cdef double* xc
    cdef double* uc
    cdef double* xx
    cdef double* xu
    cdef double* txc
    cdef double* tuc
    cdef double* loss
    cdef const double* tcn
    cdef const double* x
    cdef const double* u
    cdef const double* row
    cdef const double* cw
    if n == 0:
        return
    xc = NULL
    uc = NULL
    xx = NULL
    xu = NULL
    loss = NULL
    with nogil, parallel(num_threads=n_threads):
        xc = &work[threadid(), 0]
        uc = xc + m * k
        xx = uc + m * k
        xu = xx + m
        loss = xu + m
        for i in prange(n, schedule="static"):
            x = &X[i, 0]
            u = &U[i, 0]
            wi = w[i]
            # Tables that no sweep changes, and the row's r . u and ||r||^2.
            p = 0
            nrm = 0
            for j in range(m):
                txc = xc + j * k
                tuc = uc + j * k
                for c in range(k):
                    txc[c] = 0
                    tuc[c] = 0
                for d in range(ds):
                    row = &cb_t[j, d, 0]
                    xd = x[j * ds + d]
                    ud = u[j * ds + d]
                    for c in range(k):
                        txc[c] = txc[c] + xd * row[c]
                        tuc[c] = tuc[c] + ud * row[c]
                s = 0
                for d in range(ds):
                    s = s + x[j * ds + d] * x[j * ds + d]
                xx[j] = s
                s = 0
                for d in range(ds):
                    s = s + x[j * ds + d] * u[j * ds + d]
                xu[j] = s
            for j in range(m):
                cw = &cb_t[j, 0, codes[i, j]]
                for d in range(ds):
                    r = x[j * ds + d] - cw[d * k]
                    p = p + r * u[j * ds + d]
                    nrm = nrm + r * r
            for sweep in range(n_sweeps):
                moved = False
                for j in range(m):
                    cur = codes[i, j]
                    # r . u and ||r||^2 without block j's codeword.
                    bs = block_residual(x + j * ds, u + j * ds, &cb_t[j, 0, cur], ds, k)
                    po = p - bs.ru + xu[j]
                    # n_o is the same for every candidate (it only shifts
                    # the losses); kept so the rounding is the oracle's.
                    no = nrm - bs.rr + xx[j]
                    txc = xc + j * k
                    tuc = uc + j * k
                    tcn = &c_norms[j, 0]
                    for c in range(k):
                        diff = po - tuc[c]
                        loss[c] = ((-2 * txc[c] + tcn[c]) + no) + (diff * diff) * wi
                    best = 0
                    bl = loss[0]
                    for c in range(1, k):
                        if loss[c] < bl:
                            bl = loss[c]
                            best = c
                    if not (bl < loss[cur]):
                        continue
                    moved = True
                    codes[i, j] = <code_t> best
                    bs = block_residual(x + j * ds, u + j * ds, &cb_t[j, 0, best], ds, k)
                    p = po - xu[j] + bs.ru
                    nrm = no - xx[j] + bs.rr
                if not moved:
                    break
