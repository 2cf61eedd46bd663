"""Shared declarations of the 4-bit fast-scan kernels: the block kernels of
``_fastscan_impl.h`` and the per-query table quantization and threshold,
cimported by ``pqsk._fastscan`` (exhaustive search) and ``pqsk._ivf``
(IVF lists of packed segments).  See ``pqsk/_fastscan.pyx`` for the maths."""

from cython cimport floating
from libc.math cimport INFINITY, fabs, floor
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "_fastscan_impl.h" nogil:
    ctypedef Py_ssize_t (*pqsk_fs_scan_fn)(const uint8_t*, Py_ssize_t, Py_ssize_t,
                                           Py_ssize_t, const uint8_t*, uint16_t,
                                           uint32_t*) noexcept nogil
    Py_ssize_t pqsk_fs_scan_scalar(const uint8_t*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                   const uint8_t*, uint16_t, uint32_t*)
    Py_ssize_t pqsk_fs_scan_avx2(const uint8_t*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                 const uint8_t*, uint16_t, uint32_t*)
    Py_ssize_t pqsk_fs_scan_avx512bw(const uint8_t*, Py_ssize_t, Py_ssize_t, Py_ssize_t,
                                     const uint8_t*, uint16_t, uint32_t*)
    void pqsk_fs_pair_table(const uint8_t*, Py_ssize_t, uint16_t*)
    int pqsk_fs_cpu_has_avx2()
    int pqsk_fs_cpu_has_avx512bw()
    int pqsk_fs_ctz32(uint32_t)
    uint64_t pqsk_fs_read_bytes(const uint8_t*, Py_ssize_t, int)


cdef inline void quantize_tables(const floating* t,    # IN  (m, 16)
                          Py_ssize_t m,
                          Py_ssize_t m2,
                          uint8_t* lut,         # OUT (m2, 16)
                          double* params) noexcept nogil:  # OUT sum_bias, delta, eps
    """uint8 tables of one query (see the module docstring)."""
    cdef Py_ssize_t j, c
    cdef double lo, hi, v, span = 0, sum_b = 0, a = 0, delta, x, u
    for j in range(m):
        lo = t[j * 16]
        hi = lo
        for c in range(1, 16):
            v = t[j * 16 + c]
            if v < lo:
                lo = v
            if v > hi:
                hi = v
        sum_b += lo
        if hi - lo > span:
            span = hi - lo
        a += fabs(lo) if fabs(lo) > fabs(hi) else fabs(hi)
    delta = span / 255.0
    if not delta > 0:
        delta = 1.0
    for j in range(m):
        lo = t[j * 16]
        for c in range(1, 16):
            if t[j * 16 + c] < lo:
                lo = t[j * 16 + c]
        for c in range(16):
            x = floor((t[j * 16 + c] - lo) / delta + 0.5)
            if x < 0:
                x = 0
            if x > 255:
                x = 255
            lut[j * 16 + c] = <uint8_t> x
    for j in range(m * 16, m2 * 16):
        lut[j] = 0
    # Float rounding of a summed distance (m additions of terms of at most
    # a) and of the double arithmetic here: generous bound, 4 units of the
    # storage type's rounding per addition.
    u = 2.384185791015625e-07 if sizeof(floating) == 4 else 4.440892098500626e-16  # 2**-22, 2**-51
    params[0] = sum_b
    params[1] = delta
    params[2] = (m + 2) * a * u


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
    return <uint16_t> floor(s)
