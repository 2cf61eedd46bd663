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
arrays mean is the estimator's business (IVF: codes, ids and list offsets;
HNSW: a graph).
"""

import hashlib
import re
import secrets

from numbers import Integral

import numpy as np
from sklearn.utils._param_validation import Interval

# ``segment_size`` of IVFPQNeighbors and HNSWPQNeighbors: the most rows a
# sealed segment holds.  4 Mi rows is ~400 MiB of 96-byte codes: a unit
# that one thread rewrites (merge, compaction, codebook refit) in seconds.
DEFAULT_SEGMENT_SIZE = 4_194_304
SEGMENT_PARAMETER_CONSTRAINTS = {
    "segment_size": [Interval(Integral, 1024, None, closed="left")],
}

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
        idx = np.concatenate([idx, np.full((nq, pad), np.iinfo(np.int64).max, np.int64)],
                             axis=1)
    # Sort by (distance, id): lexsort's last key is the primary one.
    order = np.lexsort((idx, dist), axis=1)[:, :n_neighbors]
    return (np.take_along_axis(dist, order, axis=1),
            np.take_along_axis(idx, order, axis=1))
