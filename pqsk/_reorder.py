"""The reorder stage: exact re-ranking of a short list of candidates.

The scorers (:mod:`pqsk._scorers`) rank every candidate by its quantized
distance; this stage re-scores the best of them against the raw vectors
(an array or a :class:`~pqsk._store.RowStore`: memory or a memmap) and
keeps the exact top k.  Reads the queries, the raw rows of the candidate
ids and the candidate ids; writes (distance, id) arrays.  Every
re-ranking of a search's candidates belongs in this module.
"""

import numpy as np

from . import _rerank
from ._quantizer import scratch


def exact_rerank(Q, vectors, cand, n_neighbors, inner_product=False, unit_norm=False,
                 n_threads=1):
    """Re-rank candidate ids by exact distance to the raw ``vectors``.

    ``vectors`` is an array or a :class:`~pqsk._store.RowStore`; only the
    candidate rows are read (the kernel ``pqsk._rerank`` reads them in
    place, prefetching ahead).  With ``unit_norm`` (cosine) each row is
    scaled to unit norm first.  ``cand`` is (nq, n_cand) int64; ids
    outside ``[0, len(vectors))`` (empty slots) sort last.  Returns (dist,
    idx) of shape (nq, n_neighbors), rows sorted by (exact distance, id);
    distances are squared L2 or minus the inner product, in the dtype of
    ``vectors``; slots no valid candidate fills hold (+inf, INT64_MAX).
    The naive version is :func:`pqsk._naive.exact_rerank`.
    """
    dtype = vectors.dtype
    parts = vectors.chunks if hasattr(vectors, "chunks") else (vectors,)
    # The kernel reads each part through its address: C-contiguous rows of
    # the queries' dtype (a part that is not is copied, which only a
    # caller passing such an array pays).
    parts = [p if (p.dtype == dtype and p.flags.c_contiguous) else
             np.ascontiguousarray(p, dtype=dtype) for p in parts if p.shape[0]]
    if not parts:
        parts = [np.empty((0, Q.shape[1]), dtype=dtype)]
    part_ptr = np.array([p.ctypes.data for p in parts], dtype=np.uintp)
    part_start = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([p.shape[0] for p in parts], out=part_start[1:])
    cand = np.ascontiguousarray(cand, dtype=np.int64)
    nq = cand.shape[0]
    nt = max(1, n_threads)
    dist = np.empty((nq, n_neighbors), dtype=dtype)
    idx = np.empty((nq, n_neighbors), dtype=np.int64)
    _rerank.exact_rerank(np.ascontiguousarray(Q, dtype=dtype), part_ptr, part_start, cand,
                         bool(unit_norm), bool(inner_product), dist, idx,
                         scratch(nt, n_neighbors, dtype), scratch(nt, n_neighbors, np.int64),
                         nt)
    return dist, idx
