"""The score stage: encode rows for a scorer, and score codes for queries.

Plain functions on arrays, no estimator state:

* encoding: the dispatch between the plain nearest-codeword codes
  (:func:`pqsk._quantizer.encode`) and the anisotropic codes
  (:mod:`pqsk._anisotropic`), row chunk by row chunk, and the IVF
  assignment + residual encoding in one pass;
* the exhaustive 8-bit ADC search (:func:`adc_search`);
* the IVF scan over the probed lists of sealed segments and the growing
  part (:func:`ivf_search`, kernel ``pqsk._ivf``);
* 4-bit codes: their packed fast-scan layout (:func:`pack_codes4`,
  :func:`pack_lists4`), whether an index stores them packed
  (:func:`packs4`) and the exhaustive fast-scan search
  (:func:`fastscan_search`, kernel ``pqsk._fastscan``).

Reads queries, codebooks and codes (plain or packed), lists, tombstones
and filter masks; writes codes and (distance, id) arrays, rows sorted by
(distance, id).
"""

import weakref

import numpy as np

from . import _adc, _fastscan, _ivf
from ._anisotropic import anisotropic_encode
from ._partition import assign, chunk_rows, spill_lists
from ._runtime import yield_to_queries
from ._quantizer import code_dtype, padded_rows, scratch, transposed
from ._quantizer import encode as plain_encode
from ._segments import NO_ID, NO_TOMBSTONES
from ._store import chunk_slices, rows_per_chunk
from ._utils import release_gil, release_memory


def row_chunks(X):
    """(slice, C-contiguous rows) pairs covering the rows of X in order: a
    :class:`~pqsk._store.FitRows` hands out its prepared chunks, an array
    is cut into chunks of ``rows_per_chunk`` rows."""
    if hasattr(X, "chunks"):
        yield from X.chunks()
        return
    step = rows_per_chunk(X.shape[1] * X.dtype.itemsize)
    for sl in chunk_slices(X.shape[0], step):
        yield sl, np.ascontiguousarray(X[sl])


def encode_rows(X, codebooks, n_threads=1, threshold=None):
    """PQ codes of the rows of X, an array or a :class:`~pqsk._store.FitRows`,
    encoded chunk by chunk (see :func:`row_chunks`)."""
    m, k, _ = codebooks.shape
    codes = np.empty((X.shape[0], m), dtype=code_dtype(k))
    for sl, chunk in row_chunks(X):
        codes[sl] = encode(chunk, codebooks, n_threads, threshold)
    return codes


def encode(X, codebooks, n_threads=1, threshold=None, directions=None):
    """PQ codes of the rows of X: (n, m) array of ``code_dtype(k)``.

    With ``threshold`` (the anisotropic threshold T) the codes minimise
    the anisotropic loss of :mod:`pqsk._anisotropic`, whose directions are
    the rows of ``directions`` (default X); otherwise the nearest codeword
    of each sub-vector (:func:`pqsk._quantizer.encode`).
    """
    if threshold is None:
        return plain_encode(X, codebooks, n_threads)
    X = np.ascontiguousarray(X, dtype=codebooks.dtype)
    return anisotropic_encode(X, codebooks, threshold, directions, n_threads=n_threads)


def assign_encode(X, centroids, codebooks, n_threads=1, threshold=None, spill=None):
    """Coarse list and residual PQ code of each row of X, in one pass.

    X is an array or a :class:`~pqsk._store.FitRows` (a memmap's rows are
    read once, chunk by chunk).  Per chunk: the nearest centroid of each
    row (:func:`~pqsk._partition.assign`), then the PQ codes of the residuals.  Working
    memory: a few chunks, whatever the number of rows.

    With ``threshold`` the residuals are encoded for the anisotropic loss
    whose directions are the rows themselves (the score is ``<q, x>``).

    With ``spill`` (a float, the SOAR lambda, and at least 2 centroids)
    each row gives two entries, 2 i its own list and 2 i + 1 its second
    list (:func:`~pqsk._partition.spill_lists`), each the code of the row's
    residual to its list's centroid, encoded as any entry of that list.

    Returns
    -------
    labels : ndarray of shape (n * copies,), int32
        Index of each row's L2-nearest centroid (its list), and with
        ``spill`` its second list (copies = 2).
    codes : ndarray of shape (n * copies, m), ``code_dtype(k)``
        PQ codes of ``row - centroids[label]``.
    """
    m, k, _ = codebooks.shape
    n = X.shape[0]
    copies = 2 if spill is not None and centroids.shape[0] > 1 else 1
    labels = np.empty(n * copies, dtype=np.int32 if centroids.shape[0] < 2**31 else np.int64)
    codes = np.empty((n * copies, m), dtype=code_dtype(k))
    # Buffers reused chunk after chunk: a pass allocates them once.
    c_norms = np.einsum("ij,ij->i", centroids, centroids)
    block = np.empty((min(n, chunk_rows(centroids.shape[0])), centroids.shape[0]),
                     dtype=centroids.dtype)
    lab = residuals = None
    for sl, chunk in row_chunks(X):
        rows = sl.stop - sl.start
        if residuals is None:
            lab = np.empty(rows, dtype=np.intp)
            residuals = np.empty((rows, centroids.shape[1]), dtype=centroids.dtype)
        assign(chunk, centroids, out=lab[:rows], c_norms=c_norms, block=block)
        yield_to_queries()
        entries = slice(copies * sl.start, copies * sl.stop, copies)
        labels[entries] = lab[:rows]
        np.take(centroids, lab[:rows], axis=0, out=residuals[:rows])
        np.subtract(chunk, residuals[:rows], out=residuals[:rows])
        codes[entries] = encode(residuals[:rows], codebooks, n_threads, threshold, chunk)
        yield_to_queries()
        if copies == 2:  # the second list: same codec, its own residual
            lab[:rows] = spill_lists(chunk, centroids, lab[:rows], spill, c_norms, block)
            entries = slice(2 * sl.start + 1, 2 * sl.stop, 2)
            labels[entries] = lab[:rows]
            np.take(centroids, lab[:rows], axis=0, out=residuals[:rows])
            np.subtract(chunk, residuals[:rows], out=residuals[:rows])
            codes[entries] = encode(residuals[:rows], codebooks, n_threads, threshold, chunk)
    if n > rows_per_chunk(X.shape[1] * codebooks.dtype.itemsize):
        release_memory()  # the chunks' temporaries, before the caller's next step
    return labels, codes


def _blocked_args(blocked, nq, n):
    """(mask, stride) for the kernels from a :class:`pqsk._filter.Blocked`
    (or None), its length checked against nq queries over n rows."""
    if blocked is None:
        return None, 0
    mask, stride = blocked.mask, int(blocked.stride)
    if not (mask.dtype == np.uint8 and mask.ndim == 1 and mask.flags.c_contiguous
            and (mask.shape[0] >= n if stride == 0
                 else stride >= n and mask.shape[0] >= nq * stride)):
        raise ValueError("the filter mask does not cover the queries and rows")
    return mask, stride


def adc_search(Q, codebooks, codes, n_neighbors, inner_product=False, n_threads=1,
               blocked=None):
    """Exhaustive ADC search over every code.

    ``blocked`` (filtered search, a :class:`pqsk._filter.Blocked` over the
    rows of ``codes``): rows never returned.

    Returns
    -------
    dist : ndarray of shape (nq, n_neighbors), codebooks' dtype
        Sum of table entries (squared L2, or minus the inner product).
    idx : ndarray of shape (nq, n_neighbors), int64
        Row numbers into ``codes``, sorted by (dist, idx).
    """
    m, k, _ = codebooks.shape
    Q = padded_rows(np.ascontiguousarray(Q, dtype=codebooks.dtype), codebooks)
    nq = Q.shape[0]
    dist = np.empty((nq, n_neighbors), dtype=codebooks.dtype)
    idx = np.empty((nq, n_neighbors), dtype=np.int64)
    mask, stride = _blocked_args(blocked, nq, codes.shape[0])
    _adc.adc_search(
        Q, transposed(codebooks), np.ascontiguousarray(codes), bool(inner_product),
        dist, idx, scratch(n_threads, m * k, codebooks.dtype),
        scratch(n_threads, n_neighbors, codebooks.dtype),
        scratch(n_threads, n_neighbors, np.int64), n_threads, mask, stride,
    )
    return dist, idx


def adc_search_allowed(Q, codebooks, parts, n_neighbors, inner_product=False, n_threads=1):
    """Exhaustive ADC over the allowed entries of several code arrays only
    (a filtered search that allows few ids).

    ``parts``: (codes (n_p, m), ids (n_p,) or None for 0..n_p - 1, rows),
    ``rows`` uint8 (1 or nq, n_p), 0 where an entry may be returned (one
    row: the same for every query).  Returns (dist, ids) as
    :func:`adc_search`, (nq, n_neighbors), rows sorted by (distance, id),
    empty slots (+inf, INT64_MAX).
    """
    nq = Q.shape[0]
    cb = codebooks.astype(np.float32)
    dist = np.full((nq, n_neighbors), np.inf, dtype=np.float32)
    ind = np.full((nq, n_neighbors), NO_ID, dtype=np.int64)
    shared = all(rows.shape[0] == 1 for _, _, rows in parts)
    for q in range(1 if shared else nq):
        codes, owners = [], []
        for p_codes, ids, rows in parts:
            nodes = np.flatnonzero(rows[0 if shared else q] == 0)
            codes.append(p_codes[nodes])
            owners.append(nodes if ids is None else ids[nodes])
        if not codes:
            continue
        codes = np.concatenate(codes)
        owners = np.concatenate(owners)
        kn = min(n_neighbors, codes.shape[0])
        if kn == 0:
            continue
        sel = slice(None) if shared else slice(q, q + 1)
        d, i = adc_search(Q[sel], cb, codes, kn, inner_product, n_threads)
        dist[sel, :kn], ind[sel, :kn] = d, owners[i]
    return dist, ind


def ivf_search(Q, coarse, codebooks, terms, segments, n_neighbors,
               n_probe, inner_product=False, n_threads=1, growing=None, deleted=None,
               centroids=None, fastscan_margin=None, fastscan_estimate=False,
               fastscan_rescore=True, deleted_stride=0, coarse_bias=None, copies=1):
    """Search ``n_probe`` lists per query (see ``pqsk._ivf``).

    ``segments``: a list of (codes, ids, offsets), each sorted list after
    list (codes C-contiguous (n_s, m), ids (n_s,), offsets (n_lists + 1,)
    int64), all with the same code and id dtypes; or, for 4-bit codes
    (``packs4(m, k)``), (packed, ids, offsets, blocks): the codes in the
    fast-scan layout, list l in blocks ``blocks[l]:blocks[l + 1]`` (see
    :func:`pack_lists4`), scanned with the block kernel ``_fastscan``
    selected; ``fastscan_margin`` as in :func:`fastscan_search` (None:
    exact); ``fastscan_estimate``: rank the packed entries by their
    quantized estimates and re-score only the ``n_neighbors`` kept (see
    ``pqsk._ivf.ivf_search``; the margin is then unused for those lists);
    with ``fastscan_rescore=False`` the packed entries' distances are those
    estimates (for a caller that re-ranks).  ``growing``: (codes, ids,
    lists) of entries in arrival order (lists int32), scanned with the
    lists they belong to; ``deleted``: uint8 tombstones by id, or None;
    with ``deleted_stride`` > 0, one row of them per query (filtered
    search: query q reads ``deleted[q * deleted_stride:]``).
    ``centroids`` (n_lists, D) are needed for L2 when ``terms`` is empty
    (see :func:`pqsk._partition.list_terms`).  ``coarse_bias`` (nq,
    n_lists), or None: the terms added to each list's entries when
    ``coarse`` only orders the lists (see
    :func:`pqsk._partition.coarse_terms_l2_ip`).

    ``copies`` (2 with spilling): the most entries an id has (each in
    another list).  The kernel then keeps the best ``copies *
    n_neighbors`` entries, which hold the ``n_neighbors`` best distinct
    ids (each id has at most ``copies`` of them), and probes further lists
    until it has seen that many; :func:`unique_top_k` keeps each id once,
    at its best distance.  So no id is returned twice and duplicates take
    no candidate slot of a re-ranking caller.

    Returns (dist, idx): (nq, n_neighbors) arrays, rows sorted by
    (distance, id); ``dist`` as in :func:`adc_search` (squared L2 or minus
    the inner product, coarse term included).  Slots never filled (fewer
    live indexed vectors than n_neighbors) hold (+inf, INT64_MAX).
    """
    if copies > 1:
        dist, idx = ivf_search(Q, coarse, codebooks, terms, segments, copies * n_neighbors,
                               n_probe, inner_product, n_threads, growing, deleted,
                               centroids, fastscan_margin, fastscan_estimate,
                               fastscan_rescore, deleted_stride, coarse_bias)
        return unique_top_k(dist, idx, n_neighbors, n_threads)
    m, k, _ = codebooks.shape
    nq, n_lists = Q.shape[0], coarse.shape[1]
    dtype = codebooks.dtype
    # The kernel reads the queries in the padded layout (a copy only when
    # m does not divide D).
    Q = padded_rows(np.ascontiguousarray(Q, dtype=dtype), codebooks)
    centroids = _list_centroids(centroids, terms, n_lists, inner_product, codebooks)
    if deleted is not None and deleted_stride:
        if not (deleted.dtype == np.uint8 and deleted.ndim == 1
                and deleted.flags.c_contiguous and deleted.shape[0] >= nq * deleted_stride):
            raise ValueError("per-query tombstones do not cover the queries")
    g_codes, g_ids, g_lists = _growing_part(growing, segments, m, k)
    table = _segment_table(segments, m, k, n_lists, g_codes.dtype, g_ids.dtype)
    packs = any(len(seg) == 4 for seg in segments)
    fs = _fastscan_prep(packs, n_neighbors, fastscan_margin, fastscan_estimate,
                        fastscan_rescore)
    work = _ivf_scratch(max(n_threads, 1), Q.shape[1], m, k, n_lists, n_probe, n_neighbors,
                        g_codes.shape[0], fs["extra"], packs, dtype)
    args = {"inner_product": bool(inner_product), "n_probe": n_probe,
            "deleted_stride": int(deleted_stride) if deleted is not None else 0,
            "n_threads": n_threads}
    dist = np.empty((nq, n_neighbors), dtype=dtype)
    idx = np.empty((nq, n_neighbors), dtype=np.int64)
    _ivf.ivf_search(
        Q, np.ascontiguousarray(coarse, dtype=dtype), transposed(codebooks), terms, centroids,
        table, g_codes, g_ids, g_lists, NO_TOMBSTONES if deleted is None else deleted,
        args, fs, dist, idx, work,
        None if coarse_bias is None else np.ascontiguousarray(coarse_bias, dtype=dtype),
        release_gil(nq * m * (n_lists + n_probe * (int(table[5][-1]) + g_codes.shape[0])
                              // max(n_lists, 1))),
    )
    return dist, idx


def unique_top_k(dist, idx, n_neighbors, n_threads=1):
    """Rows of (dist, idx), sorted by (distance, id), with each id kept
    at its first (best) place only, cut to ``n_neighbors`` columns; empty
    slots (+inf, ``NO_ID``) are kept (kernel ``pqsk._ivf.unique_top_k``:
    a hash set of the ids kept per row, O(width) per row).  The caller
    guarantees enough distinct entries (``copies * n_neighbors`` columns,
    each id at most ``copies`` times); rows short of them are padded."""
    nq, w = idx.shape
    dist = np.ascontiguousarray(dist)
    idx = np.ascontiguousarray(idx, dtype=np.int64)
    out_d = np.empty((nq, n_neighbors), dtype=dist.dtype)
    out_i = np.empty((nq, n_neighbors), dtype=np.int64)
    size = 1 << max(1, int(2 * w - 1).bit_length())
    n_threads = max(1, min(n_threads, nq))
    _ivf.unique_top_k(dist, idx, out_d, out_i, np.empty((n_threads, size), np.int64),
                      n_threads)
    return out_d, out_i


def _list_centroids(centroids, terms, n_lists, inner_product, codebooks):
    """The centroids :func:`ivf_search`'s kernel reads, C-contiguous in the
    padded layout: the (n_lists, m * ds) centroids for L2 without list
    terms (each probed list's table is then built from the residual
    query), else none (0 rows).  ValueError when L2 has neither."""
    m, _, ds = codebooks.shape
    dtype = codebooks.dtype
    if centroids is not None and not inner_product and terms.shape[0] == 0:
        centroids = padded_rows(np.ascontiguousarray(centroids, dtype=dtype), codebooks)
    else:
        centroids = np.empty((0, m * ds), dtype=dtype)
    centroids = np.ascontiguousarray(centroids, dtype=dtype)
    if not inner_product and terms.shape[0] != n_lists and (
            terms.shape[0] != 0 or centroids.shape != (n_lists, m * ds)):
        raise ValueError("L2 search needs the list terms or the centroids")
    return centroids


def _growing_part(growing, segments, m, k):
    """(codes, ids, lists) of the growing part; without one, empty arrays
    of the dtypes of the first segment (codes of ``code_dtype(k)`` for a
    packed one)."""
    if growing is not None:
        return growing
    codes, ids = segments[0][:2]
    if len(segments[0]) == 4:
        codes = np.empty((0, m), dtype=code_dtype(k))
    return codes[:0], ids[:0], np.empty(0, np.int32)


# The tables of the segments searched lately, by the identity of their
# arrays (checked with weak references, so a table never outlives them and
# an id reused by a new array misses): a query of an unchanged index
# skips the per-segment checks.  Segment arrays are never modified in place.
_SEGMENT_TABLES = {}
_SEGMENT_TABLES_MAX = 32


def _segment_table(segments, m, k, n_lists, code_dtype, id_dtype):
    """:func:`_build_segment_table`, cached by the identity of the arrays."""
    arrays = [a for seg in segments for a in seg]
    key = (m, k, n_lists, np.dtype(code_dtype).str, np.dtype(id_dtype).str,
           tuple(map(id, arrays)))
    hit = _SEGMENT_TABLES.get(key)
    if hit is not None and all(r() is a for r, a in zip(hit[0], arrays)):
        return hit[1]
    table = _build_segment_table(segments, m, k, n_lists, code_dtype, id_dtype)
    try:
        refs = tuple(weakref.ref(a) for a in arrays)
    except TypeError:  # an array type without weak references: not cached
        return table
    if len(_SEGMENT_TABLES) >= _SEGMENT_TABLES_MAX:
        for old in [k for k, (rs, _) in list(_SEGMENT_TABLES.items())
                    if any(r() is None for r in rs)] or list(_SEGMENT_TABLES)[:1]:
            _SEGMENT_TABLES.pop(old, None)
    _SEGMENT_TABLES[key] = (refs, table)
    return table


def _build_segment_table(segments, m, k, n_lists, code_dtype, id_dtype):
    """The sealed segments as the kernel reads them, a tuple of arrays with
    one row per segment: addresses of the codes, ids and packed codes
    (uintp, 0 where absent), list offsets and list blocks ((S, n_lists + 1)
    int64) and the first row of each segment in their concatenation
    ((S + 1,) int64).  The kernel
    trusts the arrays behind the addresses: their dtypes, contiguity and
    sizes are checked here (ValueError).  The caller keeps the segments
    alive while the kernel runs."""
    n_seg = len(segments)
    seg_codes = np.empty(n_seg, dtype=np.uintp)
    seg_ids = np.empty(n_seg, dtype=np.uintp)
    seg_offsets = np.empty((n_seg, n_lists + 1), dtype=np.int64)
    seg_packed = np.zeros(n_seg, dtype=np.uintp)
    seg_blocks = np.zeros((n_seg, n_lists + 1), dtype=np.int64)
    seg_base = np.zeros(n_seg + 1, dtype=np.int64)
    for s, seg in enumerate(segments):
        seg_base[s + 1] = seg_base[s] + seg[1].shape[0]
        if len(seg) == 4:
            packed, ids, offsets, blocks = seg
            n_l = np.diff(offsets) if offsets.shape == (n_lists + 1,) else None
            if not (packs4(m, k) and packed.dtype == np.uint8
                    and ids.dtype == id_dtype and packed.flags.c_contiguous
                    and ids.flags.c_contiguous and n_l is not None
                    and offsets[0] == 0 and offsets[-1] == ids.shape[0]
                    and blocks.shape == (n_lists + 1,) and blocks[0] == 0
                    and packed.shape == (blocks[-1], (m + 1) // 2, FASTSCAN_BLOCK)
                    and bool(np.all(np.diff(blocks) == -(-n_l // FASTSCAN_BLOCK)))):
                raise ValueError("packed segment arrays do not match")
            seg_packed[s] = packed.ctypes.data if packed.size else 0
            seg_ids[s] = ids.ctypes.data
            seg_offsets[s] = offsets
            seg_blocks[s] = blocks
            continue
        codes, ids, offsets = seg
        if not (codes.dtype == code_dtype and ids.dtype == id_dtype
                and codes.flags.c_contiguous and ids.flags.c_contiguous
                and codes.shape == (ids.shape[0], m) and offsets.shape == (n_lists + 1,)
                and offsets[-1] == ids.shape[0]):
            raise ValueError("segment arrays do not match the growing part")
        seg_codes[s] = codes.ctypes.data
        seg_ids[s] = ids.ctypes.data
        seg_offsets[s] = offsets
    return seg_codes, seg_ids, seg_offsets, seg_packed, seg_blocks, seg_base


def _fastscan_prep(packs, n_neighbors, margin, estimate, rescore):
    """The kernel's ``FastScanArgs`` (a dict): the address of the block
    kernel ``_fastscan`` selected and the table layout it reads (both 0
    without packed segments), the re-check margin (-1: exact), estimate
    mode, the entries ranked by estimate beyond ``n_neighbors``
    (``FASTSCAN_EXTRA`` when the estimates are re-scored, else 0) and
    re-score."""
    kernel, prep = _fastscan._kernel() if packs else (0, 0)
    return {"kernel": kernel, "prep": prep,
            "margin": -1.0 if margin is None else float(margin),
            "estimate": bool(estimate),
            "extra": FASTSCAN_EXTRA(n_neighbors) if estimate and rescore else 0,
            "rescore": bool(rescore)}


def _ivf_scratch(nt, width, m, k, n_lists, n_probe, n_neighbors, g, extra, packs, dtype):
    """Per-thread scratch of the kernel (rows padded to cache lines, see
    :func:`pqsk._quantizer.scratch`), a tuple in the kernel's order: the
    tables and heaps (``slot_of`` filled with -1, as the kernel requires),
    then the reservoirs, which hold twice the entries kept (probes, then
    estimates)."""
    slot_of = scratch(nt, n_lists, np.int32)
    slot_of.fill(-1)
    half = (m + 1) // 2
    tables = (scratch(nt, 2 * m * k + width, dtype), scratch(nt, 2 * n_probe, dtype),
              scratch(nt, n_probe, np.int64), scratch(nt, n_neighbors, dtype),
              scratch(nt, n_neighbors, np.int64), slot_of, scratch(nt, g, np.int64),
              scratch(nt, g, np.int64), scratch(nt, n_probe + 1, np.int64),
              scratch(nt, half * 32 if packs else 1, np.uint8),
              scratch(nt, half * 256 if packs else 1, np.uint16), scratch(nt, 4, np.float64))
    res_cap = 2 * max(n_probe, n_neighbors + extra)
    reservoirs = (scratch(nt, 2 * res_cap, np.float64), scratch(nt, 4 * res_cap, np.int64),
                  scratch(nt, 8, np.int64))
    return tables + reservoirs


# --- 4-bit codes: packed layout and fast-scan search ---------------------------
#
# n_codewords = 16: two codes per byte, in blocks of 32 vectors laid out for
# in-register table lookups (see pqsk._fastscan).  For block b and pair p of
# sub-spaces (2p, 2p + 1), 32 bytes: byte i = code[32b + i, 2p] |
# (code[32b + i, 2p + 1] << 4).  m is padded to an even m2 with code 0 and
# the last block to 32 vectors with code 0: packed is (n_blocks, m2 / 2, 32)
# uint8, m / 2 bytes per vector (rounded up).

FASTSCAN_BLOCK = 32
# The most sub-spaces of an exhaustive index (PQNeighbors) that stores its
# 4-bit codes packed; beyond it the index keeps plain codes and searches
# them with adc_search.  The IVF segments pack up to the kernels' limit,
# _fastscan.MAX_SUBSPACES (257, one more).  Each bound decides what an
# index stores and saves, so each is kept.
EXHAUSTIVE_MAX_PACKED = 256


def packs4(m, k, exhaustive=False):
    """Whether codes of m sub-spaces of k codewords are stored packed for
    the 4-bit fast-scan kernels: n_codewords = 16 and m at most
    ``_fastscan.MAX_SUBSPACES`` (the IVF segments and their scan), or at
    most ``EXHAUSTIVE_MAX_PACKED`` with ``exhaustive`` (PQNeighbors)."""
    limit = EXHAUSTIVE_MAX_PACKED if exhaustive else _fastscan.MAX_SUBSPACES
    return k == 16 and m <= limit


def n_blocks4(n):
    """Blocks of 32 vectors that hold ``n`` vectors."""
    return -(-int(n) // FASTSCAN_BLOCK)


def _lists4(offsets, blocks, n, nb):
    """``offsets`` and ``blocks`` as int64 arrays, checked for the packing
    kernels: list l holds entries ``offsets[l]:offsets[l + 1]`` (rising
    from 0 to n) in blocks ``blocks[l]:blocks[l + 1]`` (rising from 0 to
    nb, enough for its entries)."""
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    blocks = np.ascontiguousarray(blocks, dtype=np.int64)
    n_l = np.diff(offsets)
    if not (offsets.ndim == 1 and blocks.shape == offsets.shape and offsets.size >= 2
            and offsets[0] == 0 and offsets[-1] == n and blocks[0] == 0
            and blocks[-1] == nb and bool(np.all(n_l >= 0))
            and bool(np.all(np.diff(blocks) >= -(-n_l // FASTSCAN_BLOCK)))):
        raise ValueError(f"list offsets and blocks do not describe {n} codes in {nb} "
                         f"blocks")
    return offsets, blocks


def _pack4(codes, order, offsets, blocks, nb):
    """``_fastscan.pack_lists4_into`` on checked arguments (codes < 16
    already checked): (nb, m2 / 2, 32) uint8."""
    n, m = codes.shape
    out = np.zeros((nb, (m + 1) // 2, FASTSCAN_BLOCK), dtype=np.uint8)
    if n:
        _fastscan.pack_lists4_into(np.ascontiguousarray(codes, dtype=np.uint8), order,
                                   offsets, blocks, out)
    return out


def _unpack4(packed, offsets, blocks, n, m):
    out = np.empty((n, m), dtype=np.uint8)
    if n:
        _fastscan.unpack_lists4_into(np.ascontiguousarray(packed), offsets, blocks, out)
    return out


_NO_ORDER = np.empty(0, dtype=np.int64)


def _check_codes4(codes):
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError("codes must be a 2-d array")
    if codes.size and (codes.min() < 0 or codes.max() >= 16):
        raise ValueError("4-bit codes must lie in [0, 16)")
    return codes


def pack_codes4(codes):
    """Pack (n, m) codes < 16 into the fast-scan layout, (n_blocks, m2 / 2, 32)
    uint8 (padding codes 0)."""
    codes = _check_codes4(codes)
    n, nb = codes.shape[0], n_blocks4(codes.shape[0])
    offsets, blocks = _lists4([0, n], [0, nb], n, nb)
    return _pack4(codes, _NO_ORDER, offsets, blocks, nb)


def unpack_codes4(packed, n, m):
    """The (n, m) uint8 codes of ``pack_codes4``'s layout."""
    nb, half = packed.shape[:2]
    if packed.shape != (nb, (m + 1) // 2, FASTSCAN_BLOCK) or nb != n_blocks4(n):
        raise ValueError(f"packed codes of shape {packed.shape} do not hold {n} codes of "
                         f"{m} sub-spaces")
    offsets, blocks = _lists4([0, n], [0, nb], n, nb)
    return _unpack4(packed, offsets, blocks, n, m)


def lists4_blocks(offsets):
    """The ``blocks`` of :func:`pack_lists4` for list ``offsets``: each
    list starts on a block boundary."""
    offsets = np.asarray(offsets, dtype=np.int64)
    blocks = np.zeros(offsets.shape[0], dtype=np.int64)
    np.cumsum(-(-np.diff(offsets) // FASTSCAN_BLOCK), out=blocks[1:])
    return blocks


def pack_lists4(codes, offsets, order=None):
    """Pack (n, m) codes < 16 sorted by list (list l rows ``offsets[l]:
    offsets[l + 1]``) list by list, each list starting on a block boundary
    (padding codes 0): (packed (n_blocks, m2 / 2, 32) uint8, blocks
    (n_lists + 1,) int64), list l in blocks ``blocks[l]:blocks[l + 1]``.
    With ``order`` (a permutation of the rows), entry j is code row
    ``order[j]`` (the codes need not be sorted).  Runs without the GIL."""
    codes = _check_codes4(codes)
    blocks = lists4_blocks(offsets)
    nb = int(blocks[-1])
    offsets, blocks = _lists4(offsets, blocks, codes.shape[0], nb)
    if order is None:
        order = _NO_ORDER
    else:
        order = np.ascontiguousarray(order, dtype=np.int64)
        if order.shape != (codes.shape[0],) or (
                order.size and (order.min() < 0 or order.max() >= codes.shape[0])):
            raise ValueError("order must give one row of the codes per code")
    yield_to_queries()
    return _pack4(codes, order, offsets, blocks, nb), blocks


def list_rows4(offsets, blocks):
    """Row of each entry (in entry order) in the padded layout of
    :func:`pack_lists4`."""
    n_l = np.diff(offsets)
    lists = np.repeat(np.arange(n_l.shape[0]), n_l)
    return (blocks[:-1][lists] * FASTSCAN_BLOCK + np.arange(int(offsets[-1]))
            - offsets[:-1][lists])


def unpack_lists4(packed, offsets, blocks, m):
    """The (n, m) uint8 codes, in entry order, of :func:`pack_lists4`'s
    layout.  Runs without the GIL."""
    nb = int(np.asarray(blocks)[-1])
    if packed.shape != (nb, (m + 1) // 2, FASTSCAN_BLOCK):
        raise ValueError(f"packed codes of shape {packed.shape} do not hold {nb} blocks "
                         f"of {m} sub-spaces")
    n = int(np.asarray(offsets)[-1])
    offsets, blocks = _lists4(offsets, blocks, n, nb)
    return _unpack4(packed, offsets, blocks, n, m)


# Codes re-checked with the float tables by the estimators' 4-bit scans:
# those whose quantized estimate is within this many table units of the
# current k-th distance (the worst-case rounding bound is 0.5 * m + 1):
# nearly every id of the exact float-ADC top list, at a fraction of the
# re-checks of the exact bound (figures: the message of commit 2e5a13a).
FASTSCAN_MARGIN = 2.0


def FASTSCAN_EXTRA(n_neighbors):
    """Entries the estimators' IVF 4-bit scan ranks by quantized estimate
    beyond the ``n_neighbors`` it re-scores and returns (see
    ``pqsk._ivf.ivf_search``, ``fs_estimate``)."""
    return n_neighbors + 8


def fastscan_search(Q, codebooks, packed, n, n_neighbors, inner_product=False,
                    n_threads=1, margin=None, blocked=None):
    """Exhaustive ADC search over ``n`` packed 4-bit codes (n_codewords = 16,
    m <= ``_fastscan.MAX_SUBSPACES``).  With ``margin=None``, the same
    (dist, idx) as :func:`adc_search` on the unpacked codes, distances
    included (see ``pqsk._fastscan``); with a margin (table units, e.g.
    ``FASTSCAN_MARGIN``) only codes whose quantized estimate is within it
    of the running k-th distance are re-checked: the returned distances are
    still exact float ADC, and a code is missed only in a near-tie.  Every
    instruction set gives the same result either way.  Slots beyond ``n``
    hold (+inf, INT64_MAX).  ``blocked``: rows never returned, as in
    :func:`adc_search`."""
    m, k, _ = codebooks.shape
    if k != 16:
        raise ValueError(f"fast-scan search needs n_codewords=16, got {k}")
    if m > _fastscan.MAX_SUBSPACES:
        raise ValueError(f"fast-scan search takes at most {_fastscan.MAX_SUBSPACES} "
                         f"sub-spaces (uint16 sums), got {m}")
    Q = padded_rows(np.ascontiguousarray(Q, dtype=codebooks.dtype), codebooks)
    nq = Q.shape[0]
    dist = np.empty((nq, n_neighbors), dtype=codebooks.dtype)
    idx = np.empty((nq, n_neighbors), dtype=np.int64)
    nt = max(int(n_threads), 1)
    _fastscan.fastscan_search(
        Q, transposed(codebooks), np.ascontiguousarray(packed, dtype=np.uint8), int(n),
        bool(inner_product), dist, idx, scratch(nt, m * 16, codebooks.dtype),
        scratch(nt, (m + 1) // 2 * 32, np.uint8), scratch(nt, n_neighbors, codebooks.dtype),
        scratch(nt, n_neighbors, np.int64), scratch(nt, 3, np.float64),
        scratch(nt, (m + 1) // 2 * 256, np.uint16), nt,
        -1.0 if margin is None else float(margin), *_blocked_args(blocked, nq, int(n)),
    )
    return dist, idx
