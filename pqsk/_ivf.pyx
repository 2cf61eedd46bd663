"""Inverted-file ADC search (IVFADC, Jégou et al. 2011).

The index keeps, per list l, the PQ codes of the residuals ``x - c_l`` of
the vectors assigned to centroid c_l, stored back to back: list l owns rows
``offsets[l]:offsets[l + 1]`` of ``codes`` and ``ids``.

For a query q and a list l, with r_hat the decoded residual::

    L2:  ||q - c_l - r_hat||^2 = ||q - c_l||^2                  (coarse term)
                               + ||r_hat||^2 + 2 <c_l, r_hat>    (list_terms[l], precomputed)
                               - 2 <q, r_hat>                    (per query, all lists)
    IP:  -<q, c_l + r_hat>     = -<q, c_l> - <q, r_hat>

so a list's table costs m * k additions, not k * D multiply-adds.  The
precomputed table holds n_lists * m * k floats; when the index does not
keep it (``list_terms`` with 0 rows, for very many lists), an L2 list's
table is built from the residual query ``q - c_l`` directly (k * D
multiply-adds per probed list, the distances being the same).

The lists are split across sealed segments (``pqsk._segments``): segment
s holds its own lists, list l being rows ``seg_offsets[s, l]:seg_offsets[s,
l + 1]`` of its codes and ids; a probed list is scanned in every segment
with the same table, into one heap.  Segments are passed as tables of
addresses (``seg_codes[s]``, ``seg_ids[s]``: the data pointers of C-contiguous
arrays of the growing part's dtypes, kept alive by the caller).

4-bit packed segments (n_codewords = 16): ``seg_packed[s]`` (non-zero) is
the address of the segment's codes in the fast-scan layout (see
``pqsk._fastscan``), each list starting on a block boundary, list l being
blocks ``seg_blocks[s, l]:seg_blocks[s, l + 1]`` (its entries still rows
``seg_offsets[s, l]:seg_offsets[s, l + 1]`` of the ids).  A probed list's
float table is quantized to uint8 once (m * 16 values) and its blocks are
scanned with the block kernel ``_fastscan`` selected (passed as an
address): the codes whose estimate is within ``fs_margin`` table units of
the heap's worst distance (coarse term included) are re-checked with the
float table plus the coarse term, summed in ``scan_codes``'s order (same
distances as an unpacked segment), and offered under their ids, tombstones
read as ``scan_codes`` does.

Appends go to a growing part (codes, ids and list labels in arrival
order) that the search scans too: per query, the growing entries whose
list is probed are picked out in one pass over the labels and scored with
that list's table, into the same heap, so the answers are those of one
sorted index holding every entry.  Removed ids are tombstones, read only
for entries that would enter the heap.
"""

import numpy as np

cimport cython
from cython cimport floating
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport (int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t,
                          INT64_MAX)

from ._heap cimport heap_init, heap_push, heap_sort, pair_greater
from ._kernels cimport code_t, index_t, build_table, scan_codes, scan_some
from ._fastscan_common cimport (pqsk_fs_scan_fn, pqsk_fs_prep_table, pqsk_fs_prepared,
                                scan_packed, scan_packed_estimate, quantize_tables, any_le16,
                                reservoir_t, res_init, res_push, res_shrink, res_accepts,
                                res_sorted, res_value)
from ._prefetch cimport pqsk_prefetch
from libc.math cimport INFINITY

# Estimate mode: an entry scored by its quantized estimate is held in a
# reservoir (``pqsk._fastscan_common``) under a handle, (probe slot << 40) |
# (row in the concatenated segments); EST_MAX_PROBE and EST_MAX_ROWS keep
# handles unique and below INT64_MAX.
cdef extern from *:
    """
    #define PQSK_EST_ROW_BITS 40
    #define PQSK_EST_MAX_PROBE ((int64_t)1 << 21)
    #define PQSK_EST_MAX_ROWS ((int64_t)1 << 40)
    """
    const int EST_ROW_BITS "PQSK_EST_ROW_BITS"
    const int64_t EST_MAX_PROBE "PQSK_EST_MAX_PROBE"
    const int64_t EST_MAX_ROWS "PQSK_EST_MAX_ROWS"


cdef inline void scan_list(Py_ssize_t l,
                           floating coarse_term,
                           const floating* query_table,  # IN (m, k): -<q_j, r_c>
                           const floating[:, :, ::1] list_terms,
                           const floating* q,            # IN (D,) the query
                           const floating[:, ::1] centroids,  # IN (n_lists, D)
                           const floating* cbt,          # IN (m, ds, k) codebooks
                           Py_ssize_t ds,
                           floating* rq,                 # scratch (D,)
                           const uintptr_t[::1] seg_codes,   # IN (S,) code arrays
                           const uintptr_t[::1] seg_ids,     # IN (S,) id arrays
                           const int64_t[:, ::1] seg_offsets,  # IN (S, n_lists + 1)
                           const uintptr_t[::1] seg_packed,    # IN (S,) packed codes or 0
                           const int64_t[:, ::1] seg_blocks,   # IN (S, n_lists + 1) or (0, .)
                           pqsk_fs_scan_fn fs_scan,
                           int fs_prep,
                           double fs_margin,
                           reservoir_t* res,             # packed lists' estimates, or NULL
                           int64_t handle,               # slot << 40
                           const int64_t* seg_base,      # IN  (S + 1,) first row of each segment
                           uint8_t* lut,                 # scratch (m2, 16)
                           uint16_t* pair_tab,           # scratch (m2 / 2, 256)
                           double* params,               # scratch (4,)
                           const code_t* g_codes,        # IN (g, m) growing part
                           const index_t* g_ids,         # IN (g,)
                           const int64_t* g_rows,        # IN rows of list l in it
                           Py_ssize_t n_g,
                           const uint8_t* deleted,
                           bint inner_product,
                           Py_ssize_t m,
                           Py_ssize_t k,
                           floating* list_table,         # scratch (m, k)
                           floating* heap_dist,
                           int64_t* heap_idx,
                           Py_ssize_t n_neighbors) noexcept nogil:
    """Scan list l (its block in each sealed segment, then its ``n_g``
    growing entries) into the heap.  With a reservoir ``res``, a packed
    segment's entries enter it instead, under their quantized estimate and
    a handle (``handle`` + their row in the concatenated segments), scored
    by ``resolve_reservoir``; other entries always enter the heap under
    their exact distance and id."""
    cdef Py_ssize_t n_seg = seg_offsets.shape[0]
    cdef Py_ssize_t start, n_l, s
    cdef Py_ssize_t n_all = n_g
    cdef Py_ssize_t i
    cdef const floating* table = query_table
    cdef const floating* terms
    cdef floating bias = coarse_term
    cdef Py_ssize_t npairs = (m + 1) // 2
    # Inner products share the query's table across lists: quantized once
    # per query (params[3] says the lut holds it; the caller clears it).
    cdef bint quantized = inner_product and params[3] != 0
    cdef const uint8_t* tab = pqsk_fs_prepared(fs_prep, lut, pair_tab)  # (once quantized)
    cdef floating two = 2
    for s in range(n_seg):
        n_all = n_all + seg_offsets[s, l + 1] - seg_offsets[s, l]
    if n_all == 0:
        return
    if not inner_product and list_terms.shape[0] > 0:
        terms = &list_terms[l, 0, 0]
        for i in range(m * k):
            list_table[i] = terms[i] + two * query_table[i]   # (in floating: vectorised)
        table = list_table
    elif not inner_product:  # no precomputed terms: the residual query's table
        for i in range(m * ds):
            rq[i] = q[i] - centroids[l, i]
        build_table(rq, cbt, m, ds, k, False, list_table)
        table = list_table
        bias = 0
    for s in range(n_seg):
        start = seg_offsets[s, l]
        n_l = seg_offsets[s, l + 1] - start
        if n_l > 0 and seg_packed[s] != 0:
            if not quantized:
                quantize_tables(table, m, 2 * npairs, lut, params)
                tab = pqsk_fs_prep_table(fs_prep, lut, npairs, pair_tab)
                quantized = True
                params[3] = inner_product
            if res != NULL:
                scan_packed_estimate(
                    tab, params,
                    (<const uint8_t*> seg_packed[s]) + seg_blocks[s, l] * npairs * 32,
                    n_l, npairs, bias, (<const index_t*> seg_ids[s]) + start, deleted,
                    handle + seg_base[s] + start, res, fs_scan)
            else:
                scan_packed(table, tab, params,
                            (<const uint8_t*> seg_packed[s]) + seg_blocks[s, l] * npairs * 32,
                            n_l, m, npairs, bias, (<const index_t*> seg_ids[s]) + start,
                            deleted, heap_dist, heap_idx, n_neighbors, fs_scan, fs_margin)
        elif n_l > 0:
            scan_codes(table, (<const code_t*> seg_codes[s]) + start * m, n_l, m, k,
                       bias, (<const index_t*> seg_ids[s]) + start,
                       deleted, heap_dist, heap_idx, n_neighbors)
    if n_g > 0:
        scan_some(table, g_codes, g_rows, n_g, m, k, bias, g_ids,
                  deleted, heap_dist, heap_idx, n_neighbors)


cdef inline Py_ssize_t empty_slots(const int64_t* hi, Py_ssize_t kn) noexcept nogil:
    cdef Py_ssize_t r, n = 0
    for r in range(kn):
        n += hi[r] == INT64_MAX
    return n


cdef inline Py_ssize_t segment_of(const int64_t* seg_base, int64_t row) noexcept nogil:
    """The segment holding row ``row`` of the concatenated segments."""
    cdef Py_ssize_t s = 0
    while seg_base[s + 1] <= row:
        s += 1
    return s


cdef inline bint resolve_reservoir(reservoir_t* res,
                                   bint rescore,
                                   const floating* query_table,  # IN (m, k)
                                   const floating[:, :, ::1] list_terms,
                                   bint inner_product,
                                   const floating* probe_d,     # IN coarse terms of the slots
                                   const int64_t* probe_l,      # IN lists of the slots
                                   const uintptr_t[::1] seg_ids,
                                   const int64_t[:, ::1] seg_offsets,
                                   const uintptr_t[::1] seg_packed,
                                   const int64_t[:, ::1] seg_blocks,
                                   const int64_t* seg_base,
                                   const index_t* id_type,      # read for its type alone
                                   Py_ssize_t m,
                                   Py_ssize_t k,
                                   floating* hd,                # INOUT (kn,) the heap
                                   int64_t* hi,
                                   Py_ssize_t kn,
                                   double* dbuf) noexcept nogil:    # scratch (2 * res.n,)
    """Offer the reservoir's ``keep`` best entries to the heap under their
    ids: with ``rescore``, under their float ADC distance (the same table
    values, summed in the same order, as ``scan_list`` without estimates,
    so the same distance); without, under their estimate.  Their ids are
    prefetched first, so the (random) id reads overlap.

    Returns whether the heap arrays were left sorted: without ``rescore``
    and with nothing in the heap yet (every list packed), the entries are
    written there sorted by (estimate, id) instead of pushed one by one
    (then heap-sorted)."""
    cdef Py_ssize_t r, j, s, lane, npairs = (m + 1) // 2
    cdef int64_t h, row, l, i
    cdef const uint8_t* blk
    cdef uint8_t byte
    cdef Py_ssize_t c
    cdef floating d
    cdef floating two = 2
    res_shrink(res)
    for r in range(res.n):       # prefetch the ids first: the reads then overlap
        row = res.h[r] & (EST_MAX_ROWS - 1)
        s = segment_of(seg_base, row)
        pqsk_prefetch((<const index_t*> seg_ids[s]) + row - seg_base[s])
    if not rescore and res.n <= kn and empty_slots(hi, kn) == kn:
        for r in range(res.n):
            row = res.h[r] & (EST_MAX_ROWS - 1)
            s = segment_of(seg_base, row)
            res.h[r] = (<const index_t*> seg_ids[s])[row - seg_base[s]]
        res_sorted(res, dbuf, dbuf + res.n)     # by (estimate, id)
        for r in range(res.n):
            hd[r] = <floating> dbuf[r]
            hi[r] = res.h[r]
        return True
    for r in range(res.n):
        h = res.h[r]
        i = (h >> EST_ROW_BITS) & (EST_MAX_PROBE - 1)   # the probe slot
        row = h & (EST_MAX_ROWS - 1)
        s = segment_of(seg_base, row)
        row -= seg_base[s]
        if rescore:
            l = probe_l[i]
            d = probe_d[i]
            i = row - seg_offsets[s, l]                      # entry of the list
            blk = (<const uint8_t*> seg_packed[s]) + (seg_blocks[s, l] + i // 32) * npairs * 32
            lane = i % 32
            for j in range(m):
                byte = blk[(j >> 1) * 32 + lane]
                c = (byte >> 4) if (j & 1) else (byte & 15)
                if inner_product:
                    d = d + query_table[j * k + c]
                else:
                    d = d + (list_terms[l, j, c] + two * query_table[j * k + c])
        else:
            d = <floating> res_value(res.key[r])
        heap_push(hd, hi, kn, d, (<const index_t*> seg_ids[s])[row])
    return False


cdef struct SearchArgs:           # IN  what to search
    bint inner_product            # scores are -<q, x> (else squared L2)
    Py_ssize_t n_probe            # lists probed per query, 1 <= n_probe <= n_lists
    Py_ssize_t deleted_stride     # tombstone row per query (0: one row for all)
    int n_threads                 # OpenMP threads (rows of the scratch)


cdef struct FastScanArgs:         # IN  how packed 4-bit lists are scanned
    size_t kernel                 # address of the block kernel (pqsk_fs_scan_fn)
    int prep                      # the table layout it reads
    double margin                 # re-check margin (table units), < 0: exact (0.5 * m + 1)
    bint estimate                 # rank packed lists by estimates
    Py_ssize_t extra              # ... in a heap of n_neighbors + extra
    bint rescore                  # ... then re-scored with float tables


def ivf_search(const floating[:, ::1] Q,               # IN  (nq, D)
               const floating[:, ::1] coarse,          # IN  (nq, n_lists)
               const floating[:, :, ::1] codebooks_t,  # IN  (m, ds, k) residual codebooks
               const floating[:, :, ::1] list_terms,   # IN  (n_lists, m, k) or (0, m, k)
               const floating[:, ::1] centroids,       # IN  (n_lists, D) or (0, D)
               tuple segments,                         # IN  the sealed segments, see below
               const code_t[:, ::1] g_codes,           # IN  (g, m) growing part
               const index_t[::1] g_ids,               # IN  (g,)
               const int32_t[::1] g_lists,             # IN  (g,) list of each entry
               const uint8_t[::1] deleted,             # IN  (n_ids,) tombstones, or (0,)
               SearchArgs args,                        # IN
               FastScanArgs fs,                        # IN
               floating[:, ::1] out_dist,              # OUT (nq, n_neighbors)
               int64_t[:, ::1] out_idx,                # OUT (nq, n_neighbors)
               tuple scratch,                          # scratch, see below
               const floating[:, ::1] coarse_bias=None,  # IN (nq, n_lists) or None
               bint release_gil=True):
    """Search the ``n_probe`` lists with the smallest coarse term, then,
    while the heap is not full (fewer than ``n_neighbors`` live entries
    seen), the next lists in coarse order.  Rows of the output are sorted
    by (distance, id).

    ``coarse[q, l]`` is ``||q - c_l||^2`` (L2) or ``-<q, c_l>`` (IP); it
    orders the lists and is the term added to the list's entries, unless
    ``coarse_bias`` is given: then it only orders the lists and
    ``coarse_bias[q, l]`` is added (inner-product tables on lists probed
    by L2: ``-<q, c_l>``, ``coarse`` the L2 terms).
    Requires 1 <= args.n_probe <= n_lists.  A list holds its blocks in
    the sealed segments and the growing entries labelled with it; ids
    marked in ``deleted`` are never returned; query q reads
    ``deleted[q * args.deleted_stride:]`` (0: one mask for every query; a
    filtered search passes removed-or-not-allowed per query), and the
    lists probed past ``n_probe`` count only the entries it lets through.

    ``segments`` is the table ``pqsk._scorers._segment_table`` builds and
    checks, ``scratch`` the per-thread rows of ``pqsk._scorers._ivf_scratch``
    (their shapes are on the lines that unpack them below; ``slot_of``
    rows must hold -1 and are left so).  The sorted heap is copied to the
    output row at the end.

    ``fs.estimate`` (the estimators' mode): packed lists are ranked by
    their quantized estimates alone, with no float re-check per entry, in
    a reservoir keeping the ``n_neighbors + fs.extra`` best; these are
    then re-scored with the float tables (``resolve_reservoir``) and
    offered to the heap, so the distances returned are float ADC
    distances, but an entry whose estimate ranks it outside the reservoir
    is missed even if its float distance would enter the top
    ``n_neighbors`` (the quantization error is at most 0.5 * m + 1 table
    units; ``fs.extra`` absorbs the typical one).  Without ``fs.rescore``
    the estimates themselves are returned (for callers that re-rank the
    candidates with exact distances).  Used when the lists have
    precomputed terms or the metric is an inner product (else the
    per-list tables would have to be kept), for n_probe < 2**21 and
    fewer than 2**40 sealed rows.
    """
    # The sealed segments (S of them): addresses of their codes, ids and
    # packed codes (0 where absent), list offsets and list blocks, and the
    # first row of each segment in their concatenation.
    cdef const uintptr_t[::1] seg_codes = segments[0]          # IN  (S,)
    cdef const uintptr_t[::1] seg_ids = segments[1]            # IN  (S,)
    cdef const int64_t[:, ::1] seg_offsets = segments[2]       # IN  (S, n_lists + 1)
    cdef const uintptr_t[::1] seg_packed = segments[3]         # IN  (S,)
    cdef const int64_t[:, ::1] seg_blocks = segments[4]        # IN  (S, n_lists + 1)
    cdef const int64_t[::1] seg_base = segments[5]             # IN  (S + 1,)
    # Per-thread scratch rows, padded by the caller to whole cache lines
    # (no false sharing).
    cdef floating[:, ::1] work = scratch[0]          # (n_threads, 2 * m * k + D)
    cdef floating[:, ::1] probe_dist = scratch[1]    # (n_threads, >= 2 * n_probe)
    cdef int64_t[:, ::1] probe_idx = scratch[2]      # (n_threads, >= n_probe)
    cdef floating[:, ::1] heap_d = scratch[3]        # (n_threads, >= n_neighbors)
    cdef int64_t[:, ::1] heap_i = scratch[4]         # (n_threads, >= n_neighbors)
    cdef int32_t[:, ::1] slot_of = scratch[5]        # (n_threads, n_lists), all -1
    cdef int64_t[:, ::1] g_match = scratch[6]        # (n_threads, >= g)
    cdef int64_t[:, ::1] g_sorted = scratch[7]       # (n_threads, >= g)
    cdef int64_t[:, ::1] slot_end = scratch[8]       # (n_threads, >= n_probe + 1)
    cdef uint8_t[:, ::1] lut_work = scratch[9]       # (n_threads, >= m2 * 16)
    cdef uint16_t[:, ::1] pair_work = scratch[10]    # (n_threads, >= m2 / 2 * 256)
    cdef double[:, ::1] param_work = scratch[11]     # (n_threads, >= 4)
    # The reservoirs, c = 2 * max(n_probe, n_neighbors + fs.extra):
    cdef double[:, ::1] res_d = scratch[12]          # (n_threads, >= 2 * c)
    cdef int64_t[:, ::1] res_h = scratch[13]         # (n_threads, >= 4 * c)
    cdef int64_t[:, ::1] res_state = scratch[14]     # (n_threads, 8): their state
    cdef bint inner_product = args.inner_product
    cdef Py_ssize_t n_probe = args.n_probe
    cdef Py_ssize_t deleted_stride = args.deleted_stride
    cdef int n_threads = args.n_threads
    cdef size_t fs_kernel = fs.kernel
    cdef int fs_prep = fs.prep
    cdef double fs_margin = fs.margin
    cdef bint fs_estimate = fs.estimate
    cdef Py_ssize_t fs_extra = fs.extra
    cdef bint fs_rescore = fs.rescore
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t n_lists = coarse.shape[1]
    cdef Py_ssize_t m = codebooks_t.shape[0]
    cdef Py_ssize_t ds = codebooks_t.shape[1]
    cdef Py_ssize_t k = codebooks_t.shape[2]
    cdef Py_ssize_t kn = out_dist.shape[1]
    cdef Py_ssize_t g = g_codes.shape[0]
    cdef Py_ssize_t q
    cdef floating* qt = NULL
    cdef floating* pd = NULL
    cdef floating* pb = NULL      # the probed lists' terms added (pd without coarse_bias)
    cdef bint has_bias = coarse_bias is not None
    if has_bias and (coarse_bias.shape[0] != nq or coarse_bias.shape[1] != n_lists):
        raise ValueError("coarse_bias does not match coarse")
    cdef int64_t* pi = NULL
    cdef floating* hd = NULL
    cdef int64_t* hi = NULL
    cdef int32_t* so = NULL
    cdef int64_t* gm = NULL
    cdef int64_t* gs = NULL
    cdef int64_t* se = NULL
    cdef uint8_t* lw = NULL
    cdef uint16_t* pw = NULL
    cdef double* prm = NULL
    cdef pqsk_fs_scan_fn fs_scan = <pqsk_fs_scan_fn> fs_kernel
    cdef reservoir_t* rs = NULL
    cdef const int64_t* sbase = &seg_base[0]
    cdef bint est = (fs_estimate and (inner_product or list_terms.shape[0] > 0)
                     and n_probe < EST_MAX_PROBE
                     and seg_base[seg_base.shape[0] - 1] < EST_MAX_ROWS)
    cdef Py_ssize_t keep = kn + (fs_extra if fs_rescore else 0)
    # The reservoirs' largest size: res_h rows hold the handles, the keys
    # and twice as much scratch, res_d rows the sorted estimates + scratch.
    cdef Py_ssize_t cap = min(res_d.shape[1] // 2, res_h.shape[1] // 4)
    cdef int64_t* rh = NULL
    cdef uint64_t* rkey = NULL
    cdef uint64_t* rwork = NULL
    cdef double* rd = NULL
    if (cap < 2 * n_probe or (est and cap < 2 * keep)
            or res_state.shape[1] * 8 < <Py_ssize_t> sizeof(reservoir_t)):
        raise ValueError("reservoir scratch too small")
    if fs_margin < 0:  # exact: the worst-case rounding of the quantized tables
        fs_margin = 0.5 * m + 1.0
    cdef const code_t* gc = &g_codes[0, 0] if g > 0 else NULL
    cdef const index_t* gi = &g_ids[0] if g > 0 else NULL
    cdef const uint8_t* dead = &deleted[0] if deleted.shape[0] > 0 else NULL
    cdef int tid
    if nq == 0 or kn == 0:
        return
    if n_threads == 1 and not release_gil:
        # Little work (see pqsk._utils.GIL_WORK): the GIL is kept.
        qt = &work[0, 0]
        pd = &probe_dist[0, 0]
        pb = pd + n_probe
        pi = &probe_idx[0, 0]
        hd = &heap_d[0, 0]
        hi = &heap_i[0, 0]
        rs = <reservoir_t*> &res_state[0, 0]
        rh = &res_h[0, 0]
        rkey = <uint64_t*> &res_h[0, cap]
        rwork = <uint64_t*> &res_h[0, 2 * cap]
        rd = &res_d[0, 0]
        so = &slot_of[0, 0]
        gm = &g_match[0, 0]
        gs = &g_sorted[0, 0]
        se = &slot_end[0, 0]
        lw = &lut_work[0, 0]
        pw = &pair_work[0, 0]
        prm = &param_work[0, 0]
        for q in range(nq):
            _search_query(q, Q, coarse, codebooks_t, list_terms, centroids, seg_codes, seg_ids, seg_offsets,
                          seg_packed, seg_blocks, sbase, gc, gi, g_lists, g, dead, deleted_stride,
                          inner_product, n_probe, n_lists, m, ds, k, kn, fs_scan, fs_prep,
                          fs_margin, fs_rescore, est, keep, has_bias, coarse_bias, qt, pd, pb, pi,
                          hd, hi, rs, rh, rkey, rwork, rd, so, gm, gs, se, lw, pw, prm,
                          out_dist, out_idx)
        return
    with nogil, parallel(num_threads=n_threads):
        tid = threadid()
        qt = &work[tid, 0]
        pd = &probe_dist[tid, 0]
        pb = pd + n_probe
        pi = &probe_idx[tid, 0]
        hd = &heap_d[tid, 0]
        hi = &heap_i[tid, 0]
        rs = <reservoir_t*> &res_state[tid, 0]
        rh = &res_h[tid, 0]
        rkey = <uint64_t*> &res_h[tid, cap]
        rwork = <uint64_t*> &res_h[tid, 2 * cap]
        rd = &res_d[tid, 0]
        so = &slot_of[tid, 0]
        gm = &g_match[tid, 0]
        gs = &g_sorted[tid, 0]
        se = &slot_end[tid, 0]
        lw = &lut_work[tid, 0]
        pw = &pair_work[tid, 0]
        prm = &param_work[tid, 0]
        for q in prange(nq, schedule="dynamic"):
            _search_query(q, Q, coarse, codebooks_t, list_terms, centroids, seg_codes, seg_ids, seg_offsets,
                          seg_packed, seg_blocks, sbase, gc, gi, g_lists, g, dead, deleted_stride,
                          inner_product, n_probe, n_lists, m, ds, k, kn, fs_scan, fs_prep,
                          fs_margin, fs_rescore, est, keep, has_bias, coarse_bias, qt, pd, pb, pi,
                          hd, hi, rs, rh, rkey, rwork, rd, so, gm, gs, se, lw, pw, prm,
                          out_dist, out_idx)


cdef void _search_query(Py_ssize_t q,
                        const floating[:, ::1] Q,
                        const floating[:, ::1] coarse,
                        const floating[:, :, ::1] codebooks_t,
                        const floating[:, :, ::1] list_terms,
                        const floating[:, ::1] centroids,
                        const uintptr_t[::1] seg_codes,
                        const uintptr_t[::1] seg_ids,
                        const int64_t[:, ::1] seg_offsets,
                        const uintptr_t[::1] seg_packed,
                        const int64_t[:, ::1] seg_blocks,
                        const int64_t* sbase,
                        const code_t* gc,
                        const index_t* gi,
                        const int32_t[::1] g_lists,
                        Py_ssize_t g,
                        const uint8_t* dead,
                        Py_ssize_t deleted_stride,
                        bint inner_product,
                        Py_ssize_t n_probe,
                        Py_ssize_t n_lists,
                        Py_ssize_t m,
                        Py_ssize_t ds,
                        Py_ssize_t k,
                        Py_ssize_t kn,
                        pqsk_fs_scan_fn fs_scan,
                        int fs_prep,
                        double fs_margin,
                        bint fs_rescore,
                        bint est,
                        Py_ssize_t keep,
                        bint has_bias,
                        const floating[:, ::1] coarse_bias,
                        floating* qt,
                        floating* pd,
                        floating* pb,
                        int64_t* pi,
                        floating* hd,
                        int64_t* hi,
                        reservoir_t* rs,
                        int64_t* rh,
                        uint64_t* rkey,
                        uint64_t* rwork,
                        double* rd,
                        int32_t* so,
                        int64_t* gm,
                        int64_t* gs,
                        int64_t* se,
                        uint8_t* lw,
                        uint16_t* pw,
                        double* prm,
                        floating[:, ::1] out_dist,
                        int64_t[:, ::1] out_idx) noexcept nogil:
    """Query q of ``ivf_search``, with one thread's scratch (the pointers
    the caller took from its rows)."""
    cdef Py_ssize_t l, p, r, i, a, s, best_l, n_match, n_x, lo
    cdef floating last_d, best_d
    cdef int64_t last_l
    cdef const floating* crow = NULL
    cdef const uint8_t* dq = NULL
    # The n_probe nearest lists, nearest first: a reservoir of
    # (coarse term, list) pairs (cheap appends under a threshold
    # that most lists fail), then sorted.
    res_init(rs, rkey, rh, rwork, 2 * n_probe, n_probe)
    crow = &coarse[q, 0]
    l = 0
    while l < n_lists:
        # 16 lists at a time tested at once against the threshold
        # (a superset of the exact test)
        if l + 16 > n_lists or any_le16(crow + l, rs.thr_d):
            for i in range(l, min(l + 16, n_lists)):
                if res_accepts(rs, crow[i]):
                    res_push(rs, crow[i], i)
        l = l + 16
    res_shrink(rs)
    res_sorted(rs, rd, rd + n_probe)
    for p in range(n_probe):
        pd[p] = <floating> rd[p]
        pi[p] = rs.h[p]
        pb[p] = coarse_bias[q, pi[p]] if has_bias else pd[p]

    # Growing entries of the probed lists, grouped by probe slot:
    # slot p's rows are gs[se[p - 1]:se[p]] (se[-1] meaning 0).
    for p in range(n_probe + 1):
        se[p] = 0
    if g > 0:
        for p in range(n_probe):
            so[pi[p]] = <int32_t> p
        n_match = 0
        for i in range(g):
            if so[g_lists[i]] >= 0:
                gm[n_match] = i
                n_match = n_match + 1
        for a in range(n_match):
            se[so[g_lists[gm[a]]] + 1] += 1
        for p in range(n_probe):
            se[p + 1] += se[p]
        for a in range(n_match):
            s = so[g_lists[gm[a]]]
            gs[se[s]] = gm[a]
            se[s] += 1
        for p in range(n_probe):
            so[pi[p]] = -1

    dq = dead + q * deleted_stride if dead != NULL else NULL
    build_table(&Q[q, 0], &codebooks_t[0, 0, 0], m, ds, k, True, qt)
    prm[3] = 0                       # no quantized table of this query yet
    heap_init(hd, hi, kn)
    if est:
        res_init(rs, rkey, rh, rwork, 2 * keep, keep)
    for p in range(n_probe):
        lo = se[p - 1] if p > 0 else 0
        scan_list(pi[p], pb[p], qt, list_terms, &Q[q, 0], centroids,
                  &codebooks_t[0, 0, 0], ds, qt + 2 * m * k, seg_codes, seg_ids, seg_offsets,
                  seg_packed, seg_blocks, fs_scan, fs_prep, fs_margin,
                  rs if est else NULL, <int64_t> p << EST_ROW_BITS,
                  sbase, lw, pw, prm,
                  gc, gi, gs + lo, se[p] - lo, dq, inner_product, m, k,
                  qt + m * k, hd, hi, kn)
    # Too few live entries: probe further lists in coarse order.
    last_d = pd[n_probe - 1]
    last_l = pi[n_probe - 1]
    # (fewer than kn entries: in the heap, whose root is an empty
    # slot whenever there is one, and the reservoir)
    while hi[0] == INT64_MAX and (kn - empty_slots(hi, kn)
                                  + (rs.n if est else 0)) < kn:
        best_l = -1
        best_d = 0
        for l in range(n_lists):
            if pair_greater(coarse[q, l], l, last_d, last_l) and (
                    best_l < 0 or pair_greater(best_d, best_l, coarse[q, l], l)):
                best_l = l
                best_d = coarse[q, l]
        if best_l < 0:
            break
        n_x = 0
        for i in range(g):
            if g_lists[i] == best_l:
                gm[n_x] = i
                n_x = n_x + 1
        scan_list(best_l, coarse_bias[q, best_l] if has_bias else best_d, qt,
                  list_terms, &Q[q, 0], centroids,
                  &codebooks_t[0, 0, 0], ds, qt + 2 * m * k, seg_codes, seg_ids, seg_offsets,
                  seg_packed, seg_blocks, fs_scan, fs_prep, fs_margin,
                  NULL, 0, sbase, lw, pw, prm,
                  gc, gi, gm, n_x, dq, inner_product, m, k, qt + m * k,
                  hd, hi, kn)
        last_d = best_d
        last_l = best_l
    if not (est and resolve_reservoir(rs, fs_rescore, qt, list_terms, inner_product,
                                      pb, pi, seg_ids, seg_offsets, seg_packed,
                                      seg_blocks, sbase, gi, m, k, hd, hi, kn, rd)):
        heap_sort(hd, hi, kn)
    for r in range(kn):
        out_dist[q, r] = hd[r]
        out_idx[q, r] = hi[r]


def unique_top_k(const floating[:, ::1] dist,     # IN  (nq, w) rows sorted by (dist, id)
                 const int64_t[:, ::1] idx,        # IN  (nq, w)
                 floating[:, ::1] out_dist,        # OUT (nq, kn)
                 int64_t[:, ::1] out_idx,          # OUT (nq, kn)
                 int64_t[:, ::1] seen,             # scratch (n_threads, 2**b >= 2 * w)
                 int n_threads):
    """Each row of (dist, idx) with every id kept at its first (best)
    place only, the first ``kn`` kept written out; empty slots (id
    INT64_MAX) are kept as they are, and a row with fewer than ``kn``
    kept is padded with (+inf, INT64_MAX).  Spilled IVF searches: an id
    has up to two entries, the kernel's heap keeps ``2 * kn`` of them.
    Per row, the ids kept so far are held in an open-addressing hash set
    (a row of ``seen``, cleared per row, linear probing): O(w) per row."""
    cdef Py_ssize_t nq = idx.shape[0], w = idx.shape[1], kn = out_idx.shape[1]
    cdef Py_ssize_t size = seen.shape[1]
    cdef Py_ssize_t q, j, r, h
    cdef int64_t* tab
    cdef int64_t i
    cdef uint64_t mask = <uint64_t> size - 1
    if (dist.shape[0] != nq or dist.shape[1] != w or out_dist.shape[0] != nq
            or out_idx.shape[0] != nq or out_dist.shape[1] != kn
            or size < 2 * w or size & (size - 1) or seen.shape[0] < n_threads):
        raise ValueError("unique_top_k: bad shapes")
    if nq == 0 or kn == 0:
        return
    with nogil, parallel(num_threads=n_threads):
        tab = &seen[threadid(), 0]
        for q in prange(nq, schedule="static"):
            for h in range(size):
                tab[h] = -1
            r = 0
            for j in range(w):
                if r == kn:
                    break
                i = idx[q, j]
                if i != INT64_MAX:
                    # ids are >= 0; -1 marks an empty slot of the set
                    h = <Py_ssize_t> (((<uint64_t> i) * <uint64_t> 0x9E3779B97F4A7C15) >> 32
                                      & mask)
                    while tab[h] != -1 and tab[h] != i:
                        h = <Py_ssize_t> ((h + 1) & mask)
                    if tab[h] == i:
                        continue
                    tab[h] = i
                out_dist[q, r] = dist[q, j]
                out_idx[q, r] = i
                r = r + 1
            while r < kn:
                out_dist[q, r] = INFINITY
                out_idx[q, r] = INT64_MAX
                r = r + 1


def _reservoir_keep(const double[::1] d, const int64_t[::1] h, Py_ssize_t keep,
                    Py_ssize_t cap):
    """The entries a reservoir of ``cap`` keeping ``keep`` holds after
    (d[i], h[i]) were offered in order (h increasing, as the scans offer
    them), sorted by (estimate, handle) (tests).  1 <= keep, 2 * keep <= cap."""
    cdef Py_ssize_t n = d.shape[0], i
    if h.shape[0] != n or keep < 1 or cap < 2 * keep:
        raise ValueError("bad reservoir test input")
    buf_h = np.empty(4 * cap, dtype=np.int64)
    buf_d = np.empty(2 * cap, dtype=np.float64)
    cdef int64_t[::1] bh = buf_h
    cdef double[::1] bd = buf_d
    cdef reservoir_t r
    with nogil:
        res_init(&r, <uint64_t*> &bh[cap], &bh[0], <uint64_t*> &bh[2 * cap], cap, keep)
        for i in range(n):
            if res_accepts(&r, d[i]):
                res_push(&r, d[i], h[i])
        res_shrink(&r)
        res_sorted(&r, &bd[0], &bd[cap])
    return buf_d[:r.n].copy(), buf_h[:r.n].copy()
