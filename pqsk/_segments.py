"""Sealed segments: the immutable parts of an index.

An index that takes writes is a set of **sealed segments** plus a
**growing** part (the seed article's layout, after Lucene and Milvus).  A
sealed segment is never modified once made: appends go to the growing
part, which is sealed into a new segment when it reaches a size; deletes
are tombstones (``removed_``, one flag per id) that the kernels read; a
merge or a compaction makes *new* segments from old ones and the index
switches to them by replacing one reference.  Because a segment never
changes, it can be

* shared by reference between the states of an index (``restore_on_error``
  keeps the old tuple of segments; a reader holding it sees a consistent
  index), and
* written to disk once: ``save`` writes only the segments the previous
  save of the same path does not already hold (see :mod:`pqsk._persist`),
  and a loaded segment stays a memory map of its files.

A :class:`Segment` holds named arrays (made read-only) and a few JSON
scalars (``meta``), under a random ``uid`` that names its files.  What the
arrays mean is the estimator's business (IVF: sorted inverted lists, see
:mod:`pqsk._lists`; HNSW: a graph).

The **write policy** both indexes follow is here too
(:class:`SegmentWritesMixin`): ``remove`` marks tombstones and keeps, per
sealed segment, how many of its entries are removed (and, for graphs,
which) up to date in O(ids); a segment past :data:`COMPACT_SHARE` removed
entries is compacted; ``compact`` does every segment holding one; each
compaction *replaces* one segment: the new one is built under the read
lock, so queries go on, and swapped in under the write lock.  Each
estimator says only how to compact its kind of segment and its growing
part.
"""

import hashlib
import re
import secrets
import warnings
from numbers import Integral

import numpy as np
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from . import _growable, _reorder
from ._checks import checked_remove_ids
from ._runtime import index_lock, index_writer, runtime, yield_to_queries
from ._utils import one_blas_thread

# ``segment_size`` of IVFPQNeighbors and HNSWPQNeighbors: the most rows a
# sealed segment holds.  4 Mi rows is ~400 MiB of 96-byte codes: a unit
# that one thread rewrites (merge, compaction, codebook refit) in seconds.
DEFAULT_SEGMENT_SIZE = 4_194_304
SEGMENT_PARAMETER_CONSTRAINTS = {
    "segment_size": [Interval(Integral, 1024, None, closed="left")],
}

# ``remove`` compacts a sealed segment once more than this share of its
# entries are removed: tombstones stay in a segment and queries still pay
# for them (an IVF scan reads them, an HNSW beam walks through them), so
# past half of them a segment costs about twice what its live entries need.
COMPACT_SHARE = 0.5
# The id of an empty answer slot (its distance is +inf): sorts after every id.
NO_ID = np.iinfo(np.int64).max
# The tombstone mask the kernels get when no entry they read is removed
# (they then skip the check).
NO_TOMBSTONES = np.empty(0, np.uint8)

_UID = re.compile(r"[0-9a-f]{32}")
_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def array_sha256(a):
    """SHA-256 of an array's bytes (C order), hashed 64 MiB at a time."""
    h = hashlib.sha256()
    flat = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    step = 64 * 2**20
    for start in range(0, flat.size, step):
        h.update(flat[start:start + step])
    return h.hexdigest()


class Segment:
    """An immutable part of an index: named arrays, small metadata, a uid.

    Parameters
    ----------
    arrays : dict of str to ndarray
        C-contiguous arrays, kept by reference as read-only views (the
        caller must not write to them afterwards).
    meta : dict of str to int or str, optional
        Scalars describing the segment (e.g. its id range).
    uid : str, optional
        32 hex digits; a new random one by default.  Only ``load`` passes
        it (a segment read from files keeps the name of those files).
    checksums : dict of str to str, optional
        SHA-256 of arrays already known (``load`` passes the verified ones),
        so that saving the segment again does not hash it again.
    """

    __slots__ = ("uid", "_arrays", "_meta", "_sha")

    def __init__(self, arrays, meta=None, uid=None, checksums=None):
        self.uid = secrets.token_hex(16) if uid is None else uid
        if not _UID.fullmatch(self.uid):
            raise ValueError(f"bad segment uid {uid!r}")
        frozen = {}
        for name, a in arrays.items():
            if not _NAME.fullmatch(name):
                raise ValueError(f"bad segment array name {name!r}")
            view = a.view()
            view.flags.writeable = False
            frozen[name] = view
        self._arrays = frozen
        self._meta = dict(meta or {})
        self._sha = dict(checksums or {})

    def __getitem__(self, name):
        return self._arrays[name]

    def __contains__(self, name):
        return name in self._arrays

    @property
    def names(self):
        """The array names, sorted."""
        return sorted(self._arrays)

    @property
    def meta(self):
        return dict(self._meta)

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self._arrays.values())

    def sha256(self, name):
        """SHA-256 of an array's bytes, computed once per segment."""
        sha = self._sha.get(name)
        if sha is None:
            sha = self._sha[name] = array_sha256(self._arrays[name])
        return sha

    def __repr__(self):
        shapes = ", ".join(f"{k}{self._arrays[k].shape}" for k in self.names)
        return f"Segment({self.uid[:8]}: {shapes})"

    # Pickling (``copy.deepcopy``, joblib): arrays, meta and uid; the copy
    # holds the same content, so it may keep the uid.
    def __getstate__(self):
        return {"uid": self.uid, "arrays": self._arrays, "meta": self._meta,
                "sha": self._sha}

    def __setstate__(self, state):
        Segment.__init__(self, state["arrays"], state["meta"], state["uid"], state["sha"])

    def __deepcopy__(self, memo):
        # Immutable: a deep copy may share the arrays.
        return self

    def __copy__(self):
        return self


def merge_topk(parts, n_neighbors):
    """Merge per-segment answers into the global top k.

    ``parts`` is a list of (dist, idx) pairs of shape (nq, k_s), each row
    sorted by (distance, id), empty slots (+inf, INT64_MAX); ids are global
    and each appears in at most one part.  Returns (dist, idx) of shape
    (nq, n_neighbors), rows sorted by (distance, id), padded the same way.
    """
    if len(parts) == 1 and parts[0][0].shape[1] == n_neighbors:
        return parts[0]
    dist = np.concatenate([d for d, _ in parts], axis=1)
    idx = np.concatenate([i for _, i in parts], axis=1)
    nq, width = dist.shape
    if width < n_neighbors:
        pad = n_neighbors - width
        dist = np.concatenate([dist, np.full((nq, pad), np.inf, dist.dtype)], axis=1)
        idx = np.concatenate([idx, np.full((nq, pad), NO_ID, np.int64)],
                             axis=1)
    # Sort by (distance, id): lexsort's last key is the primary one.
    order = np.lexsort((idx, dist), axis=1)[:, :n_neighbors]
    return (np.take_along_axis(dist, order, axis=1),
            np.take_along_axis(idx, order, axis=1))


def positions(sorted_ids, ids):
    """Positions in ``sorted_ids`` (ascending) of those of ``ids`` it holds."""
    pos = np.searchsorted(sorted_ids, ids)
    inside = pos < sorted_ids.shape[0]
    pos, ids = pos[inside], ids[inside]
    return pos[sorted_ids[pos] == ids]


class SegmentTombstones:
    """The removed entries of one sealed segment, for one state of the
    tombstones: ``removed_`` being the array ``removed`` with ``n_removed``
    ids marked.  ``remove`` brings it to the next state in O(ids);
    otherwise a stale one is computed again (O(segment)) when next needed.

    Attributes
    ----------
    removed : ndarray of bool or None
    n_removed : int
    count : int
        Removed entries the segment still stores.
    mask : ndarray of shape (n_s,), uint8, or None
        1 where the segment's entry (in its own order) is removed.  Kept
        only by indexes whose search reads it (graphs, ``_node_masks``).
    """

    __slots__ = ("removed", "n_removed", "count", "mask")

    def __init__(self, removed, n_removed, count, mask=None):
        self.removed, self.n_removed = removed, n_removed
        self.count, self.mask = count, mask


class SegmentWritesMixin:
    """The write policy of an index of sealed segments and a growing part
    (IVF, HNSW): ``remove``, per-segment tombstones, compaction.

    Removed ids are marked in ``removed_`` (one flag per id, read by the
    kernels) and stay in their segments as tombstones.  Per sealed segment
    (by uid) a :class:`SegmentTombstones` in the estimator's runtime state
    counts them; ``remove`` updates it in O(ids), appends keep it, and a
    new segment starts with none.  After a ``remove``, each segment past
    ``COMPACT_SHARE`` removed entries is compacted, one at a time.

    The estimator provides ``segments_`` (a tuple of :class:`Segment`,
    each with an ``ids`` array), ``removed_``, ``n_removed_`` and
    ``n_samples_fit_``, and what differs between kinds of segments:

    * ``_compacted_segment(seg)``: (``seg`` without its removed entries, or
      None when none is left, or ``seg`` itself when it has none;
      attributes to publish with it), built under the read lock;
    * ``_compact_growing()``: rewrite the growing part without its removed
      entries (it takes the locks it needs);
    * ``_growing_past_share()``: whether ``remove`` should do that now;
    * ``_segment_span(seg)``: an id range [lo, hi) holding every id of
      ``seg`` and no live id of another segment;
    * ``_node_masks``: whether its search reads the node masks
      (``_segment_tombstones``).
    """

    _node_masks = False

    def remove(self, ids):
        """Remove indexed vectors by id; they never appear in results again.

        Ids are not reused: later ``partial_fit`` rows continue from
        ``n_samples_fit_``.  On error nothing is removed.  Costs
        O(len(ids)): the ids are marked in ``removed_`` in place (an array
        read from ``removed_`` earlier sees the change) and the search
        skips them; the index drops their entries later (see ``compact``),
        and here rewrites a sealed segment left with more than half of its
        entries removed.

        Parameters
        ----------
        ids : array-like of int
            Ids (row numbers at fit / partial_fit) of vectors to remove.

        Returns
        -------
        self : object
        """
        check_is_fitted(self)
        ids = checked_remove_ids(ids)
        if ids.size == 0:
            return self
        # Checked and applied under the lock: two concurrent removes must not
        # both start from the same old mask.  The mask is updated in place
        # (O(len(ids)), no copy of it): readers wait for the lock.
        with index_writer(self), one_blas_thread():  # beside queries
            with index_lock(self).write():
                self._mark_removed(ids)
            yield_to_queries()  # between the steps of a write (see pqsk._runtime)
            # Still the only writer: compaction takes the locks it needs.
            self._after_remove()
            _reorder.refresh_slack(self)
        return self

    def _mark_removed(self, ids):
        """Check ``ids`` against the index and mark them removed (caller
        holds the write lock)."""
        n = self.n_samples_fit_
        if ids.min() < 0 or ids.max() >= n:
            raise ValueError(f"ids must lie in [0, {n}), got values in "
                             f"[{ids.min()}, {ids.max()}].")
        removed = self.removed_
        if removed is not None and removed[ids].any():
            raise ValueError(
                f"ids {ids[removed[ids]][:10].tolist()} were already removed.")
        removed = (_growable.owned(self, "removed", removed) if removed is not None
                   else _growable.grow(self, "removed", np.zeros(0, bool), n, False))
        removed[ids] = True
        self.removed_ = removed
        self.n_removed_ = self.n_removed_ + int(ids.size)
        self._remove_rows(ids, removed)

    def _remove_rows(self, ids, removed):
        """Bring the segments' tombstone records to the new ``removed_``
        (``ids`` just marked in ``removed``): O(ids log n).  A record that
        was not current before is dropped (computed again when needed), and
        so are those of segments no longer in the index."""
        entries = runtime(self).segment_tombstones
        previous = self.n_removed_ - ids.size
        ids = np.sort(ids)
        kept = {}
        for seg in self.segments_:
            entry = entries.get(seg.uid)
            # Before any removal every record is current, whatever array.
            if (entry is None or entry.n_removed != previous
                    or (previous and entry.removed is not removed)):
                continue
            lo, hi = self._segment_span(seg)
            here = ids[np.searchsorted(ids, lo):np.searchsorted(ids, hi)]
            if entry.mask is not None:
                pos = positions(seg["ids"], here)
                entry.mask[pos] = 1
                entry.count += int(pos.size)
            else:
                entry.count += int(here.size)
            entry.removed, entry.n_removed = removed, self.n_removed_
            kept[seg.uid] = entry
        entries.clear()
        entries.update(kept)

    def _segment_span(self, seg):
        # Graph segments store their ids ascending.
        ids = seg["ids"]
        return (int(ids[0]), int(ids[-1]) + 1) if ids.shape[0] else (0, 0)

    def _tombstone_record(self, seg):
        """The current :class:`SegmentTombstones` of ``seg`` (some id is
        removed), computed (O(segment)) when missing or stale, with its
        mask when the index reads masks."""
        removed, n_removed = self.removed_, self.n_removed_
        entries = runtime(self).segment_tombstones
        entry = entries.get(seg.uid)
        if entry is None or entry.removed is not removed or entry.n_removed != n_removed:
            flags = removed[seg["ids"]]
            entry = SegmentTombstones(removed, n_removed, int(np.count_nonzero(flags)),
                                      flags.view(np.uint8) if self._node_masks else None)
            entries[seg.uid] = entry
        return entry

    def _segment_dead(self, seg):
        """Removed entries ``seg`` still stores."""
        if not self.n_removed_:
            return 0
        return self._tombstone_record(seg).count

    def _segment_tombstones(self, seg):
        """(uint8 mask of ``seg``'s removed entries in its order, number of
        them); the mask is ``NO_TOMBSTONES`` when none is removed.  Cached
        in the runtime state; ``remove`` and appends keep it current at
        O(their ids)."""
        if not self.n_removed_:
            return NO_TOMBSTONES, 0
        entry = self._tombstone_record(seg)
        if not entry.count:
            return NO_TOMBSTONES, 0
        if entry.mask is None:  # recorded when none was removed
            entry.mask = self.removed_[seg["ids"]].view(np.uint8)
        return entry.mask, entry.count

    def _note_segment(self, seg, mask=None):
        """Record the tombstones of ``seg``, just made from the current
        state: ``mask`` (uint8, 1 where its entry is removed) or, when None,
        none removed."""
        count = 0 if mask is None else int(np.count_nonzero(mask))
        runtime(self).segment_tombstones[seg.uid] = SegmentTombstones(
            self.removed_, self.n_removed_, count, mask)

    def _note_grown(self, old_removed):
        """An append replaced ``old_removed`` by ``removed_``, longer by the
        new (live) ids: the segments' records stay current."""
        if self.removed_ is old_removed:
            return
        for entry in runtime(self).segment_tombstones.values():
            if entry.removed is old_removed and entry.n_removed == self.n_removed_:
                entry.removed = self.removed_

    def _note_recoded(self, old, new):
        """``new`` holds ``old``'s entries in the same order (new codes)."""
        entry = runtime(self).segment_tombstones.get(old.uid)
        if entry is not None:
            runtime(self).segment_tombstones[new.uid] = SegmentTombstones(
                entry.removed, entry.n_removed, entry.count,
                None if entry.mask is None else entry.mask.copy())

    def _forget_tombstones(self):
        """Drop every record (a new fit: new segments)."""
        runtime(self).segment_tombstones.clear()

    def _segments_past(self, share):
        """The sealed segments holding more than ``share`` of their entries
        removed (``share=0``: any removed entry)."""
        return [seg for seg in self.segments_
                if self._segment_dead(seg) > share * seg["ids"].shape[0]]

    def _replace_segment(self, seg, build):
        """Replace ``seg`` by the segment ``build()`` makes.

        ``build()`` returns (new segment, or None to drop ``seg``, or ``seg``
        itself to keep it; {attribute: value} to publish with it).  It runs
        under the read lock, so queries go on; the swap of ``segments_``
        (and those attributes) takes the write lock.  The caller holds the
        writer mutex: no other writer changes the index in between, so the
        new segment holds no removed entry."""
        lock = index_lock(self)
        with lock.read():
            new, state = build()
        if new is seg:
            return
        with lock.write():
            self.segments_ = tuple(
                s for s in (new if s is seg else s for s in self.segments_)
                if s is not None and s["ids"].shape[0])
            self.__dict__.update(state)
            runtime(self).segment_tombstones.pop(seg.uid, None)
            if new is not None:
                self._note_segment(new)

    def _compact_segment(self, seg):
        self._replace_segment(seg, lambda: self._compacted_segment(seg))

    def _after_remove(self):
        """Run by ``remove`` once the tombstones are published (writer mutex
        held, not the RWLock): compact each sealed segment past
        ``COMPACT_SHARE`` removed entries, then the growing part if it is.
        The removal itself is done: a compaction that fails (memory) is
        reported, not raised, so that ``remove`` keeps its contract (on
        error nothing is removed)."""
        try:
            for seg in self._segments_past(COMPACT_SHARE):
                self._compact_segment(seg)
            if self._growing_past_share():
                self._compact_growing()
        except Exception as e:  # noqa: BLE001 - reported as a warning
            warnings.warn(
                f"the ids are removed, but compacting a segment failed "
                f"({type(e).__name__}: {e}); call compact() to retry.",
                RuntimeWarning)

    def _after_append(self):
        """Run by ``partial_fit`` once the rows are published: a segment
        sealed past ``COMPACT_SHARE`` removed entries (an HNSW growing graph
        keeps its removed nodes) is compacted now, not at the next
        ``remove``; a failure is reported as by ``_after_remove``."""
        try:
            for seg in self._segments_past(COMPACT_SHARE):
                self._compact_segment(seg)
        except Exception as e:  # noqa: BLE001 - reported as a warning
            warnings.warn(
                f"the rows are added, but compacting a segment failed "
                f"({type(e).__name__}: {e}); call compact() to retry.",
                RuntimeWarning)

    def _growing_past_share(self):
        # By default only ``compact`` rewrites the growing part.
        return False

    def _compact_all(self):
        """``compact``: every sealed segment holding a removed entry, one at
        a time, then the growing part."""
        check_is_fitted(self)
        with index_writer(self):
            for seg in self._segments_past(0):
                self._compact_segment(seg)
            self._compact_growing()
        return self


def drop_self(dist, ind, flt=None):
    """``kneighbors(X=None)``'s answers of k + 1 neighbours (query i is
    point i) without the point itself, as one process drops it: where it
    is not among them (duplicates), the first column, or the last when the
    filter ``flt`` does not allow the point."""
    n = ind.shape[0]
    mask = ind != np.arange(n)[:, None]
    no_self = np.all(mask, axis=1)
    if flt is not None:
        self_ok = (flt.allowed if not flt.per_query
                   else flt.matrix.diagonal().astype(bool))
        mask[no_self & ~self_ok, -1] = False
        no_self &= self_ok
    mask[no_self, 0] = False
    k = ind.shape[1] - 1
    return dist[mask].reshape(n, k), ind[mask].reshape(n, k)
