"""Filtered search: the ``filter`` argument of ``kneighbors``.

A filter says which indexed ids a query may return.  It is applied inside
the kernels, at the place they read tombstones: the kernels take a uint8
"blocked" mask (removed, or not allowed by the filter), one per id, read
only for an entry that would enter the heap (or the IVF reservoir), and
skip the entry when it is set.  Nothing is post-filtered: a query gets k
results that pass whenever k such points exist (IVF probes further lists
while it has fewer; HNSW walks through blocked nodes without returning
them, and scans the allowed ids when they are few).

Three forms are accepted (see :func:`check_filter`):

* a boolean mask of shape (n_samples_fit,): one filter for every query;
* an integer array of allowed ids: the same, given as ids;
* a scipy sparse matrix (or a 2-d boolean array) of shape (n_queries,
  n_samples_fit): row i holds the ids query i may return (nonzero
  entries).  Queries are then searched a chunk at a time, each chunk
  with a dense (chunk, n_samples_fit) uint8 block of masks, at most
  ``CHUNK_BYTES`` bytes.

One rule separates masks from ids: a mask is boolean (or sparse), ids are
integers.  A 1-d integer array of exactly n_samples_fit entries, all 0 or
1 (``np.ones(n, np.int8)``), reads as both, a 0/1 mask or a list of ids
0 and 1, so it is refused (ValueError): pass ``f.astype(bool)`` for a
mask, or the ids as a boolean mask or without repeats (a mask becomes
ids with ``np.flatnonzero(mask)``).  An integer array of another length,
or holding other values, is ids.  Entries of a sparse filter are a mask
whatever its dtype: zero (stored or not) blocks, any positive value
allows (a count, e.g. from the product of two incidence matrices;
duplicate entries allow if one does), a negative value is refused
(ValueError): it reads as "forbidden" to some and as nonzero to others.

Validation is here, in Python; the kernels trust what they get.
"""

import numpy as np
from scipy import sparse

from ._store import CHUNK_BYTES

__all__ = ["check_filter", "QueryFilter", "Blocked"]


class QueryFilter:
    """A validated ``filter``: ``allowed`` (bool (n,)) for every query, or
    ``matrix`` (CSR bool (n_queries, n)) per query."""

    def __init__(self, n, allowed=None, matrix=None):
        self.n = n
        self.allowed = allowed
        self.matrix = matrix

    @property
    def per_query(self):
        return self.matrix is not None

    def chunk_rows(self):
        """Queries searched together: all of them for a shared filter,
        else as many as a ``CHUNK_BYTES`` block of masks holds."""
        if not self.per_query:
            return None
        return max(1, CHUNK_BYTES // max(1, self.n))

    def blocked(self, removed, rows=None):
        """The kernels' mask for the queries ``rows`` (a slice; None: all):
        a :class:`Blocked`, 1 where an id is removed or not allowed."""
        n = self.n
        if not self.per_query:
            mask = ~self.allowed
            if removed is not None:
                mask |= removed[:n]
            return Blocked(mask.view(np.uint8), 0, n)
        sub = self.matrix[rows] if rows is not None else self.matrix
        nq = sub.shape[0]
        mask = np.ones((nq, n), dtype=np.uint8)
        r = np.repeat(np.arange(nq), np.diff(sub.indptr))
        mask[r, sub.indices] = 0
        if removed is not None:
            mask |= removed[:n].view(np.uint8)
        return Blocked(mask.ravel(), n, n)


class Blocked:
    """Blocked entries as the kernels read them: ``mask`` (uint8, C
    order) of ``width`` entries per row; query q reads ``mask[q *
    stride:][:width]`` (``stride`` 0: one row for every query)."""

    def __init__(self, mask, stride, width):
        self.mask = mask
        self.stride = stride
        self.width = width

    @property
    def rows(self):
        """(n_rows, width) view (one row when shared)."""
        return self.mask.reshape(-1, self.width)

    def take(self, queries):
        """The masks of the queries ``queries`` (an index array or slice)."""
        if not self.stride:
            return self
        return Blocked(np.ascontiguousarray(self.rows[queries]).ravel(), self.width,
                       self.width)

    def for_nodes(self, ids):
        """The mask in the order of ``ids`` (a graph's node -> id map;
        None: node i is id i, for the first ``n_nodes`` ids)."""
        if ids is None:
            return self
        sub = np.ascontiguousarray(self.rows[:, ids])
        return Blocked(sub.ravel(), ids.shape[0] if self.stride else 0, ids.shape[0])

    def allowed_counts(self, n_queries, n_nodes=None):
        """Entries each query may return, among the first ``n_nodes``
        (int64 (n_queries,))."""
        rows = self.rows if n_nodes is None else self.rows[:, :n_nodes]
        counts = rows.shape[1] - np.count_nonzero(rows, axis=1).astype(np.int64)
        return np.broadcast_to(counts, (n_queries,)) if not self.stride else counts


def check_filter(filter, n, n_queries):
    """Validate ``filter`` against an index of ``n`` ids (``n_samples_fit_``)
    and ``n_queries`` queries; a :class:`QueryFilter`, or None for no
    filter.  Errors name the problem; nothing is modified."""
    if filter is None:
        return None
    if sparse.issparse(filter):
        return QueryFilter(n, matrix=_sparse_mask(filter, n, n_queries))
    if isinstance(filter, (str, bytes)) or not hasattr(filter, "__len__") and not \
            isinstance(filter, np.ndarray):
        raise TypeError(
            "filter must be a boolean mask over the indexed ids, an array of allowed "
            f"ids, or a scipy sparse (n_queries, n_samples_fit) matrix, got "
            f"{type(filter).__name__}.")
    arr = np.asarray(filter)
    if arr.dtype == bool:
        if arr.ndim == 1:
            if arr.shape[0] != n:
                raise ValueError(
                    f"A boolean filter must have one entry per indexed id "
                    f"(n_samples_fit={n}), got {arr.shape[0]}.")
            return QueryFilter(n, allowed=np.array(arr, dtype=bool))
        if arr.ndim == 2:
            return check_filter(sparse.csr_matrix(arr), n, n_queries)
        raise ValueError(f"A boolean filter must be 1-d (or 2-d per query), got "
                         f"{arr.ndim} dimensions.")
    if arr.size == 0 and arr.ndim == 1:  # [] : no id allowed
        return QueryFilter(n, allowed=np.zeros(n, dtype=bool))
    if arr.dtype.kind not in "iu":
        raise TypeError(
            f"filter must be a boolean mask or integer ids, got dtype {arr.dtype}.")
    if arr.ndim != 1:
        raise ValueError(
            f"An id filter must be 1-d, got shape {arr.shape}; a per-query mask is a "
            "boolean array (filter.astype(bool)) or a scipy sparse matrix.")
    lo, hi = int(arr.min()), int(arr.max())
    if arr.shape[0] == n and lo >= 0 and hi <= 1:
        raise ValueError(
            f"filter is an integer array of n_samples_fit={n} entries, all 0 or 1: it "
            "could be a mask or a list of ids (0 and 1). Pass filter.astype(bool) for "
            "a mask; for ids, pass them without repeats (np.unique(filter)) or as a "
            "boolean mask (a mask gives its ids with np.flatnonzero(mask)).")
    if lo < 0 or hi >= n:
        raise ValueError(
            f"filter ids must lie in [0, {n}) (n_samples_fit), got values in "
            f"[{lo}, {hi}].")
    allowed = np.zeros(n, dtype=bool)
    allowed[arr] = True
    return QueryFilter(n, allowed=allowed)


def _sparse_mask(filter, n, n_queries):
    """A sparse ``filter`` as a CSR bool (n_queries, n) matrix of its
    allowed entries: nonzero ones (stored zeros do not allow); negative
    entries are refused.  Entries are read one by one (COO), before any
    sum of duplicates could wrap around in a small integer dtype."""
    if filter.ndim != 2 or filter.shape != (n_queries, n):
        raise ValueError(
            f"A sparse filter must have shape (n_queries, n_samples_fit) = "
            f"({n_queries}, {n}), got {filter.shape}.")
    if filter.dtype.kind not in "biu":
        raise TypeError(
            f"A sparse filter must hold booleans (or integers: 0 blocks, a positive "
            f"value allows), got dtype "
            f"{filter.dtype}.")
    coo = filter.tocoo()
    if filter.dtype.kind == "i" and coo.nnz and int(coo.data.min()) < 0:
        raise ValueError(
            f"A sparse filter has negative entries (the smallest is "
            f"{int(coo.data.min())}): an entry allows its id when positive and blocks "
            "it when 0, and a negative one is neither. Pass booleans (e.g. "
            "filter > 0), or 0 and positive values.")
    keep = coo.data != 0  # stored zeros do not allow
    m = sparse.csr_matrix((np.ones(int(keep.sum()), dtype=bool),
                           (coo.row[keep], coo.col[keep])), shape=(n_queries, n))
    m.sum_duplicates()
    return m
