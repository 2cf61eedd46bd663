"""4-bit fast-scan ADC search (n_codewords = 16).

Codes are packed two per byte in blocks of 32 vectors (see
``pqsk._scorers.pack_codes4``).  Per query:

1. the float ADC tables ``t[j, c]`` (m x 16) are built as ``build_table``
   builds them;
2. they are quantized to uint8: ``bias_j = min_c t[j, c]``, ``delta =
   max_j (max_c t[j, c] - bias_j) / 255`` (1 if 0), ``q[j, c] =
   round((t[j, c] - bias_j) / delta)``, so that a code's float distance d
   and its sum ``S = sum_j q[j, code_j]`` (< 65536 for m <= 257) satisfy
   ``|d - (sum_j bias_j + delta * S)| <= m * delta / 2`` (plus float
   rounding, bounded by ``eps`` below);
3. a block kernel (``_fastscan_impl.h``: scalar, AVX2 vpshufb, AVX-512BW,
   arm64 NEON vqtbl1q_u8)
   computes S for 32 vectors at a time and flags those with S <= T, where
   T is the largest S a vector can have and still beat the worst of the
   current top-k heap of exact float distances;
4. each flagged vector gets its exact float ADC distance, summed from the
   float tables in the order ``scan_codes`` sums (so the distances are
   bit-identical to ``adc_search``'s) and is offered to the heap, ties by
   (distance, id).

A vector is skipped only when it provably cannot enter the heap, so the
result is exactly the float-ADC top-k, whichever kernel runs.

The kernel is chosen at import: AVX-512BW, else AVX2 when the CPU has it
(``__builtin_cpu_supports``), NEON on arm64 (every AArch64 CPU has it),
else scalar; the environment variable
``PQSK_SIMD=scalar|avx2|avx512bw|neon`` read at import overrides it (the
re-ranking levels ``avx512`` and ``avx512vnni`` mean avx512bw here; an
unknown value or one the CPU lacks is ignored with a warning, see
``pqsk._simd``), and ``set_isa(name)`` (for tests) changes it; both refuse
an instruction set the CPU lacks.  ``isa()`` names the active one.
"""

import numpy as np

cimport cython
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from ._heap cimport heap_init, heap_sort
from ._kernels cimport build_table


from ._fastscan_common cimport (
    pqsk_fs_scan_fn, pqsk_fs_scan_scalar, pqsk_fs_scan_avx2, pqsk_fs_scan_avx512bw,
    pqsk_fs_scan_neon, pqsk_fs_prep_table, pqsk_fs_cpu_has_avx2, pqsk_fs_cpu_has_avx512bw,
    pqsk_fs_cpu_has_neon,
    pqsk_fs_read_bytes, quantize_tables, scan_packed)


# The most sub-quantizers a 4-bit code may have: sums of m uint8 entries
# stay below 65536.
MAX_SUBSPACES = 257

cdef pqsk_fs_scan_fn _scan = pqsk_fs_scan_scalar
cdef str _isa = "scalar"
# The table layout the kernel reads (pqsk_fs_prep_table): 0 the nibble
# tables (AVX2, NEON), 1 pair sums (scalar), 2 wide tables (AVX-512).
cdef int _prep = 1


def available_isas():
    """The kernels this CPU can run, best last."""
    out = ["scalar"]
    if pqsk_fs_cpu_has_neon():
        out.append("neon")
    if pqsk_fs_cpu_has_avx2():
        out.append("avx2")
        if pqsk_fs_cpu_has_avx512bw():
            out.append("avx512bw")
    return out


def set_isa(name):
    """Select the block kernel: "scalar", "avx2", "avx512bw" or "neon"
    (private, for tests and benchmarks).  Raises ValueError for one the CPU
    lacks."""
    global _scan, _isa, _prep
    if name not in ("scalar", "avx2", "avx512bw", "neon"):
        raise ValueError(f"unknown instruction set {name!r}; use scalar, avx2, avx512bw "
                         "or neon")
    if name not in available_isas():
        raise ValueError(f"this CPU cannot run the {name} kernel")
    if name == "avx512bw":
        _scan = pqsk_fs_scan_avx512bw
    elif name == "avx2":
        _scan = pqsk_fs_scan_avx2
    elif name == "neon":
        _scan = pqsk_fs_scan_neon
    else:
        _scan = pqsk_fs_scan_scalar
    _isa = name
    _prep = 2 if name == "avx512bw" else (1 if name == "scalar" else 0)


def isa():
    """The active block kernel's name."""
    return _isa


def _kernel():
    """(address of the active block kernel, the table layout it reads, for
    ``pqsk_fs_prep_table``): the one selection, passed to ``pqsk._ivf``
    (private)."""
    return <size_t> _scan, int(_prep)


def _select_at_import():
    # PQSK_SIMD (see pqsk._simd): the re-ranking levels "avx512" and
    # "avx512vnni" mean AVX-512BW here; a path the CPU lacks is never chosen.
    from pqsk._simd import choose
    set_isa(choose(available_isas(), {"avx512": "avx512bw", "avx512vnni": "avx512bw"}))


_select_at_import()


def _quantize_tables(const floating[:, ::1] t):
    """(lut, params) of ``quantize_tables`` for a (m, 16) table (tests):
    lut (m, 16) uint8, params (sum of row minima, delta, rounding bound)."""
    cdef Py_ssize_t m = t.shape[0]
    if t.shape[1] != 16 or m == 0:
        raise ValueError("t must be (m, 16), m >= 1")
    lut = np.zeros((m, 16), dtype=np.uint8)
    params = np.zeros(3, dtype=np.float64)
    cdef uint8_t[:, ::1] lv = lut
    cdef double[::1] pv = params
    with nogil:
        quantize_tables(&t[0, 0], m, m, &lv[0, 0], &pv[0])
    return lut, params


def _read_bytes(const uint8_t[::1] data):
    """XOR of the 8-byte words of ``data`` (its length a multiple of 32),
    read with the widest loads the CPU has: the benchmark's measure of the
    memory-read limit of a flat scan (private)."""
    cdef Py_ssize_t nbytes = data.shape[0]
    cdef uint64_t r
    if nbytes % 32:
        raise ValueError("length must be a multiple of 32")
    if nbytes == 0:
        return 0
    with nogil:
        r = pqsk_fs_read_bytes(&data[0], nbytes, pqsk_fs_cpu_has_avx2())
    return r


def fastscan_search(const floating[:, ::1] Q,               # IN  (nq, D)
                    const floating[:, :, ::1] codebooks_t,  # IN  (m, ds, 16)
                    const uint8_t[:, :, ::1] packed,        # IN  (nb, m2 / 2, 32)
                    Py_ssize_t n,
                    bint inner_product,
                    floating[:, ::1] out_dist,              # OUT (nq, n_neighbors)
                    int64_t[:, ::1] out_idx,                # OUT (nq, n_neighbors)
                    floating[:, ::1] work,                  # scratch (n_threads, >= m * 16)
                    uint8_t[:, ::1] lut_work,               # scratch (n_threads, >= m2 * 16)
                    floating[:, ::1] heap_d,                # scratch (n_threads, >= n_neighbors)
                    int64_t[:, ::1] heap_i,                 # scratch (n_threads, >= n_neighbors)
                    double[:, ::1] param_work,              # scratch (n_threads, >= 3)
                    uint16_t[:, ::1] pair_work,             # scratch (n_threads, >= m2 / 2 * 256)
                    int n_threads,
                    double margin=-1,
                    const uint8_t[::1] blocked=None,        # IN  filter mask or None
                    Py_ssize_t blocked_stride=0):
    """Exhaustive 4-bit ADC search; rows sorted by (distance, index), empty
    slots (+inf, INT64_MAX).  The caller checks the shapes.

    ``margin`` (units of the quantized tables) decides which codes are
    re-checked with the float tables: a negative value means the
    worst-case rounding bound, 0.5 * m + 1, and the result is exactly the
    float ADC top-k; a small one (1-2) re-checks only codes whose estimate
    is within that many units of the current k-th distance: far fewer
    float re-checks, and a code is missed only when its rounding error
    exceeds the margin while its distance is within it of the k-th
    (near-ties).

    ``blocked``: rows to skip, as in ``pqsk._adc.adc_search`` (query q
    reads ``blocked[q * blocked_stride:]``)."""
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t m = codebooks_t.shape[0]
    cdef Py_ssize_t ds = codebooks_t.shape[1]
    cdef Py_ssize_t npairs = packed.shape[1]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef Py_ssize_t q, r
    cdef int tid
    cdef floating* t = NULL
    cdef uint8_t* lut = NULL
    cdef floating* hd = NULL
    cdef int64_t* hi = NULL
    cdef double* params = NULL
    cdef pqsk_fs_scan_fn scan = _scan
    cdef int prep = _prep
    cdef uint16_t* pt = NULL
    cdef const uint8_t* tab = NULL
    cdef const uint8_t* blk = NULL
    cdef const uint8_t* bq = NULL
    if blocked is not None and blocked.shape[0] > 0:
        blk = &blocked[0]
    if codebooks_t.shape[2] != 16 or npairs != (m + 1) // 2 or packed.shape[2] != 32:
        raise ValueError("fastscan_search needs 16 codewords and matching packed codes")
    if packed.shape[0] != (n + 31) // 32:
        raise ValueError("packed codes do not hold n vectors")
    if prep != 0 and pair_work.shape[1] < npairs * 256:
        raise ValueError("pair_work is too small")
    if nq == 0 or kn == 0:
        return
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        t = &work[tid, 0]
        lut = &lut_work[tid, 0]
        hd = &heap_d[tid, 0]
        hi = &heap_i[tid, 0]
        params = &param_work[tid, 0]
        pt = &pair_work[tid, 0]
        for q in prange(nq, schedule="dynamic"):
            build_table(&Q[q, 0], &codebooks_t[0, 0, 0], m, ds, 16, inner_product, t)
            quantize_tables(t, m, 2 * npairs, lut, params)
            heap_init(hd, hi, kn)
            tab = lut
            if n > 0:
                tab = pqsk_fs_prep_table(prep, lut, npairs, pt)
            bq = blk + q * blocked_stride if blk != NULL else NULL
            if n > 0:
                scan_packed(t, tab, params, &packed[0, 0, 0], n, m, npairs, 0,
                            <const int64_t*> NULL, bq, hd, hi, kn, scan,
                            margin if margin >= 0 else 0.5 * m + 1.0)
            heap_sort(hd, hi, kn)
            for r in range(kn):
                out_dist[q, r] = hd[r]
                out_idx[q, r] = hi[r]


# --- packing 4-bit codes list by list --------------------------------------
#
# The writers' side of the packed layout (see pqsk._scorers.pack_lists4):
# an index's appends, merges and compactions pack and unpack whole segments,
# and a NumPy version holds the GIL for milliseconds per segment, while
# queries wait for it.  These loops run without the GIL.  The NumPy
# versions are the oracles (pqsk._naive.pack_lists4 / unpack_lists4).

def pack_lists4_into(const uint8_t[:, ::1] codes,     # IN  (n, m) codes < 16
                     const int64_t[::1] order,        # IN  (n,) or (0,): source row of entry j
                     const int64_t[::1] offsets,      # IN  (L + 1,) list l: entries offsets[l]:offsets[l+1]
                     const int64_t[::1] blocks,       # IN  (L + 1,) list l: blocks blocks[l]:blocks[l+1]
                     uint8_t[:, :, ::1] out):         # OUT (nb, (m + 1) // 2, 32), zero-filled
    """Entry j of list l (code row ``order[j]``, or j without ``order``)
    goes to row ``j - offsets[l]`` of the list's first block
    ``blocks[l]``: byte ``out[b, p, i]`` holds sub-spaces 2p (low nibble)
    and 2p + 1 (high).  The caller has checked the offsets and blocks
    (rising, each list's blocks holding its entries, within ``out``),
    ``order`` (a permutation of the rows) and zero-filled ``out``."""
    cdef Py_ssize_t m = codes.shape[1], half = out.shape[1], n_lists = offsets.shape[0] - 1
    cdef Py_ssize_t l, j, p, src, r, b, i
    cdef bint ordered = order.shape[0] > 0
    with nogil:
        for l in range(n_lists):
            for j in range(offsets[l], offsets[l + 1]):
                src = order[j] if ordered else j
                r = blocks[l] * 32 + (j - offsets[l])
                b = r >> 5
                i = r & 31
                for p in range(m // 2):
                    out[b, p, i] = codes[src, 2 * p] | (codes[src, 2 * p + 1] << 4)
                if m & 1:
                    out[b, half - 1, i] = codes[src, m - 1]


def unpack_lists4_into(const uint8_t[:, :, ::1] packed,  # IN  (nb, (m + 1) // 2, 32)
                       const int64_t[::1] offsets,       # IN  (L + 1,) as pack_lists4_into
                       const int64_t[::1] blocks,        # IN  (L + 1,)
                       uint8_t[:, ::1] out):             # OUT (offsets[L], m) codes, entry order
    """The inverse of :func:`pack_lists4_into` (without ``order``).  The
    caller has checked the offsets and blocks against ``packed``."""
    cdef Py_ssize_t m = out.shape[1], half = packed.shape[1], n_lists = offsets.shape[0] - 1
    cdef Py_ssize_t l, j, p, r, b, i
    cdef uint8_t v
    with nogil:
        for l in range(n_lists):
            for j in range(offsets[l], offsets[l + 1]):
                r = blocks[l] * 32 + (j - offsets[l])
                b = r >> 5
                i = r & 31
                for p in range(m // 2):
                    v = packed[b, p, i]
                    out[j, 2 * p] = v & 15
                    out[j, 2 * p + 1] = v >> 4
                if m & 1:
                    out[j, m - 1] = packed[b, half - 1, i] & 15
