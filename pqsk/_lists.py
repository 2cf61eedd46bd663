"""Inverted lists in segments: how IVFPQNeighbors stores its entries.

A sealed IVF segment (:class:`~pqsk._segments.Segment`) holds entries
(code, id) sorted by list, stably (ids ascend within a list), and the
list offsets: list l is entries ``list_offsets[l]:list_offsets[l + 1]``.
Its ``meta`` is its id range {"lo", "hi"}: every id it stores lies in
[lo, hi), and the ranges of the segments of an index ascend and are
disjoint.  With 4-bit codes the codes are stored packed for the fast-scan
kernels (see :func:`list_segment`).

With spilling (``spill_lambda``, SOAR) a vector is stored as two entries
with the same id, in two different lists, each the code of its residual
to its own list's centroid: the two are appended together (the growing
part holds them side by side, primary first) and always share a
segment, so everything here that works entry by entry (sealing, merging,
compaction by id, re-encoding) keeps them; :func:`copies` says how many
entries a vector has, :func:`id_slices` never cuts a vector's entries
apart, :func:`check_stored_ids` checks the pairs of a loaded index.

Appended entries go to a growing part (codes, ids and list labels in
arrival order) that queries scan too; it is sealed into segments when it
holds more than ``GROWING_SHARE`` of the stored entries, and the newest
segments are merged (``merge_tail``).  Removal and compaction follow the
write policy of :mod:`pqsk._segments`; here is only how a list segment is
made, merged and compacted.
"""

import numpy as np

from . import _quantizer, _scorers
from ._checks import check_int_array, require
from ._runtime import yield_to_queries
from ._segments import Segment

# Appended rows go to a growing part that every query scans (the entries
# of the probed lists are picked out of it in one pass over its labels).
# It is sealed into a new segment (sorted by list) once it holds more than
# GROWING_SHARE of the stored entries and more than GROWING_MIN of them (or
# segment_size): sealing costs O(growing part), and a query scans at most
# ~1/64 of the index more than it would with every list sorted.
GROWING_SHARE = 1 / 64
GROWING_MIN = 1024
# Merge policy (size-tiered, on adjacent segments): while the newest
# segment is at least 1/MERGE_RATIO the size of the one before it, and the
# two hold at most segment_size rows, they become one.  Sizes then fall
# geometrically from old to new segments: at most log_R(n / seal size)
# + n / segment_size segments, each row rewritten O(log n) times.
MERGE_RATIO = 2


def growing_full(n_growing, n_stored, segment_size):
    """Whether a growing part of ``n_growing`` entries, in an index storing
    ``n_stored``, is to be sealed."""
    return n_growing > min(segment_size, max(GROWING_MIN, GROWING_SHARE * n_stored))


def copies(spill_lambda, n_lists):
    """Entries per stored vector: 2 with spilling (a second list exists),
    else 1."""
    return 2 if spill_lambda is not None and n_lists > 1 else 1


def entry_ids(lo, hi, id_dtype, n_copies):
    """The ids of the entries of new rows lo..hi - 1 as
    :func:`pqsk._scorers.assign_encode` orders them (each ``n_copies``
    times, side by side)."""
    return np.repeat(np.arange(lo, hi, dtype=id_dtype), n_copies)


def id_slices(ids, size):
    """Slices of at most ``size`` consecutive entries covering ``ids``
    (ascending, each id at most twice, size >= 2), never between two
    entries of one id (a spilled vector's entries share a segment)."""
    start, n = 0, ids.shape[0]
    while start < n:
        stop = min(n, start + size)
        if stop < n and ids[stop] == ids[stop - 1]:
            stop -= 1
        yield slice(start, stop)
        start = stop


def check_stored_ids(segments, growing_ids, growing_lists, removed, n, n_removed,
                     n_copies, n_lists):
    """A loaded index stores each id ``n_copies`` times (removed ids: that
    many or none, when compacted away), and with 2 copies in two
    different lists; every live id is stored.  Sizes are compared first:
    nothing is allocated per claimed id.  One sorted array of the ids
    (with 2 copies, of ``id * n_lists + list``, int64) is all the check
    allocates."""
    n_stored = sum(s["ids"].shape[0] for s in segments) + growing_ids.shape[0]
    require(n_stored + n_copies * n_removed >= n_copies * n,
            "fewer ids are stored than are live")
    if n_copies == 1:
        ids = np.concatenate([s["ids"] for s in segments] + [growing_ids])
        ids.sort()
        require(n_stored < 2 or bool(np.all(ids[1:] != ids[:-1])), "an id is stored twice")
    else:
        # One int64 key per entry, id * n_lists + list, sorted in place
        # (ids times lists past 2**62 is no index one could build).
        require(max(n, 1) * n_lists < 2**62, "too many ids and lists for spilling")
        keys = np.concatenate([s["ids"] for s in segments] + [growing_ids]).astype(np.int64)
        keys *= n_lists
        keys += np.concatenate([segment_lists(s, n_lists) for s in segments]
                               + [growing_lists])
        keys.sort()
        ids, second = keys[0::2] // n_lists, keys[1::2] // n_lists
        require(n_stored % 2 == 0 and bool(np.all(ids == second))
                and (ids.shape[0] < 2 or bool(np.all(ids[1:] != ids[:-1]))),
                "with spilling every stored id must be stored exactly twice")
        require(bool(np.all(keys[0::2] != keys[1::2])),  # same id, so other lists
                "the two entries of a spilled id must be in different lists")
    live_stored = (ids.shape[0] if removed is None
                   else ids.shape[0] - int(np.count_nonzero(removed[ids])))
    require(live_stored == n - n_removed, "a live id is not stored")


def empty_growing(m, code_dtype, id_dtype):
    """The attributes of an empty growing part."""
    # Fresh arrays, never views of a buffer: the next append allocates.
    return {"growing_codes_": np.empty((0, m), dtype=code_dtype),
            "growing_ids_": np.empty(0, dtype=id_dtype),
            "growing_lists_": np.empty(0, dtype=np.int32)}


def packs(m, k):
    """Whether sealed segments store their codes packed for the 4-bit
    fast-scan kernels (see :func:`pqsk._scorers.packs4`)."""
    return _scorers.packs4(m, k)


def list_segment(codes, ids, offsets, meta, pack, order=None):
    """A segment of entries sorted by list (list l rows ``offsets[l]:
    offsets[l + 1]``): arrays codes, ids and list_offsets; or, when
    ``pack``, the codes packed list by list in fast-scan blocks (each list
    starting on a block boundary, padding codes 0): packed (n_blocks,
    (m + 1) // 2, 32) uint8 and list_blocks (n_lists + 1,) int64 (list l
    in blocks ``list_blocks[l]:list_blocks[l + 1]``), no codes.  With
    ``order``, entry j is code row ``order[j]`` (packed without gathering
    the codes first)."""
    if not pack:
        return Segment({"codes": codes if order is None else codes[order], "ids": ids,
                        "list_offsets": offsets}, meta)
    packed, blocks = _scorers.pack_lists4(codes, offsets, order)
    return Segment({"packed": packed, "ids": ids, "list_offsets": offsets,
                    "list_blocks": blocks}, meta)


def is_packed(seg):
    return "packed" in seg.names


def segment_codes(seg, m=None):
    """The (n_s, m) codes of a segment, in entry order, packed or not."""
    if not is_packed(seg):
        return seg["codes"]
    if m is None:
        raise ValueError("unpacking needs n_subspaces")
    return _scorers.unpack_lists4(seg["packed"], seg["list_offsets"], seg["list_blocks"],
                                    m)


def decode_part(seg, est):
    """(ids, decode(positions) -> rows) of an IVF segment, or of the
    growing part of ``est`` when ``seg`` is None: centroid of the entry's
    list plus its decoded residual (see :func:`pqsk._store.decoded_chunks`).
    A packed segment is unpacked once, on the first chunk that needs it."""
    d = est.n_features_in_
    if seg is None:
        codes, lists, ids = est.growing_codes_, est.growing_lists_, est.growing_ids_
        return ids, lambda pos: (est.cluster_centers_[lists[pos]]
                                 + _quantizer.decode(codes[pos], est.codebooks_, d))
    unpacked = []

    def decode(pos):
        if not unpacked:
            unpacked.append(segment_codes(seg, est.codebooks_.shape[0]))
        lists = np.searchsorted(seg["list_offsets"], pos, side="right") - 1
        return (est.cluster_centers_[lists]
                + _quantizer.decode(unpacked[0][pos], est.codebooks_, d))
    return seg["ids"], decode


def segment_lists(seg, n_lists):
    """The list of each entry of a segment, in entry order: (n_s,) int32."""
    return np.repeat(np.arange(n_lists, dtype=np.int32), np.diff(seg["list_offsets"]))


def sealed(codes, ids, lists, n_lists, lo, hi, pack=False):
    """A segment of entries given in id order: sorted by list, stably (ids
    ascend within a list), ids in [lo, hi)."""
    order = np.argsort(lists, kind="stable")
    offsets = np.zeros(n_lists + 1, dtype=np.int64)
    np.cumsum(np.bincount(lists, minlength=n_lists), out=offsets[1:])
    yield_to_queries()
    return list_segment(codes, ids[order], offsets, {"lo": int(lo), "hi": int(hi)}, pack,
                        order)


def live(removed, ids):
    """Mask of the ids not removed (ids past ``removed`` are new rows)."""
    if removed is None:
        return np.ones(ids.shape[0], dtype=bool)
    n = removed.shape[0]
    inside = ids < n
    return ~(removed[np.where(inside, ids, 0)] & inside)


def merged(segs, removed, n_lists, m, pack=False):
    """One segment holding the live entries of adjacent segments ``segs``
    (within a list, in segment order, so ids still ascend)."""
    codes = np.concatenate([segment_codes(s, m) for s in segs])
    yield_to_queries()
    ids = np.concatenate([s["ids"] for s in segs])
    lists = np.concatenate([segment_lists(s, n_lists) for s in segs])
    keep = live(removed, ids)
    yield_to_queries()
    if not keep.all():
        codes, ids, lists = codes[keep], ids[keep], lists[keep]
        yield_to_queries()
    return sealed(codes, ids, lists, n_lists, segs[0].meta["lo"], segs[-1].meta["hi"], pack)


def merge_tail(segments, removed, n_lists, m, pack, segment_size):
    """Size-tiered merging of adjacent segments: while the newest holds at
    least ``1 / MERGE_RATIO`` of the rows of the one before it and the two
    at most ``segment_size``, they become one (removed entries dropped).
    Segment sizes then fall geometrically from the oldest to the newest:
    O(log n) segments, and a row is rewritten each time its segment grows
    by half, O(log n) times, amortized O(log n) per appended row.

    Returns (the segments, the merged segments made)."""
    segs, made = list(segments), []
    while len(segs) >= 2:
        older, newer = (s["ids"].shape[0] for s in segs[-2:])
        if older > MERGE_RATIO * newer or older + newer > segment_size:
            break
        one = merged(segs[-2:], removed, n_lists, m, pack)
        made.append(one)
        segs[-2:] = [one] if one["ids"].shape[0] else []
    return tuple(segs), made


def compacted(seg, removed, m, pack=False):
    """``seg`` without its removed entries (itself when it has none, None
    when none is left)."""
    keep = live(removed, seg["ids"])
    if keep.all():
        return seg
    if not keep.any():
        return None
    n_lists = seg["list_offsets"].shape[0] - 1
    lists = segment_lists(seg, n_lists)[keep]
    offsets = np.zeros(n_lists + 1, dtype=np.int64)
    np.cumsum(np.bincount(lists, minlength=n_lists), out=offsets[1:])
    return list_segment(segment_codes(seg, m)[keep], seg["ids"][keep], offsets, seg.meta,
                        pack)


def check_segments(segs, m, k, n_lists, n):
    """Each sealed segment of a loaded index (``n`` ids, ``m`` x ``k``
    codebooks): codes in range, offsets rising from 0 to its size, ids in
    its id range; the ranges ascending and disjoint."""
    require(isinstance(segs, tuple) and all(isinstance(s, Segment) for s in segs),
            "segments_ must be a tuple of segments")
    id_dtype = np.int32 if n < 2**31 else np.int64
    code_dtype = _quantizer.code_dtype(k)
    prev_hi = 0
    for i, s in enumerate(segs):
        where = f"segment {i}"
        packed = is_packed(s)
        require(s.names == (["ids", "list_blocks", "list_offsets", "packed"] if packed
                            else ["codes", "ids", "list_offsets"]),
                f"{where} must hold codes, ids and list_offsets, or packed, ids, "
                f"list_offsets and list_blocks")
        require(not packed or packs(m, k),
                f"{where}: packed codes need n_codewords=16 and at most "
                f"MAX_SUBSPACES sub-spaces")
        meta = s.meta
        require(set(meta) == {"lo", "hi"} and all(type(v) is int for v in meta.values()),
                f"{where}: meta must be the integers lo and hi")
        lo, hi = meta["lo"], meta["hi"]
        require(prev_hi <= lo <= hi <= n, f"{where}: id range [{lo}, {hi}) out of order")
        prev_hi = hi
        n_s = s["ids"].shape[0] if s["ids"].ndim == 1 else -1
        if not packed:
            check_int_array(s["codes"], f"{where} codes", (n_s, m), 0, k, dtype=code_dtype)
        check_int_array(s["ids"], f"{where} ids", (n_s,), lo, max(lo + 1, hi),
                        dtype=id_dtype)
        off = s["list_offsets"]
        check_int_array(off, f"{where} list_offsets", (n_lists + 1,), 0, n_s + 1,
                        dtype=np.int64)
        require(off[0] == 0 and off[-1] == n_s and bool(np.all(off[1:] >= off[:-1])),
                f"{where}: list_offsets must rise from 0 to the number of codes")
        if packed:
            _check_packed(s, where, m, n_lists)
        for name in s.names:
            require(s[name].flags.c_contiguous, f"{where} {name} is not C-contiguous")


def _check_packed(s, where, m, n_lists):
    """A packed segment's blocks: list l in ``list_blocks[l]:
    list_blocks[l + 1]``, as many blocks as its entries need, every
    padding code (past a list's entries, or the odd sub-space) 0."""
    blocks, off, packed = s["list_blocks"], s["list_offsets"], s["packed"]
    check_int_array(blocks, f"{where} list_blocks", (n_lists + 1,), 0, max(1, off[-1] + 1),
                    dtype=np.int64)
    n_l = np.diff(off)
    require(blocks[0] == 0 and bool(np.all(np.diff(blocks) == -(-n_l // 32))),
            f"{where}: list_blocks must give each list the blocks its entries need")
    nb, half = int(blocks[-1]), (m + 1) // 2
    require(isinstance(packed, np.ndarray) and packed.dtype == np.uint8
            and packed.shape == (nb, half, 32),
            f"{where}: packed must be uint8 of shape ({nb}, {half}, 32)")
    padded = _scorers.unpack_codes4(packed, nb * 32, 2 * half)
    real = np.zeros(nb * 32, dtype=bool)
    real[_scorers.list_rows4(off, blocks)] = True
    require(not padded[~real].any() and not padded[:, m:].any(),
            f"{where}: padding codes of packed blocks must be 0")
