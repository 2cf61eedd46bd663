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
from ._store import FitRows, RowStore


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
    part_ptr, part_start, cand, out, nt = _kernel_args(parts, Q.shape[1], dtype, cand,
                                                       n_neighbors, dtype, n_threads)
    _rerank.exact_rerank(np.ascontiguousarray(Q, dtype=dtype), part_ptr, part_start, cand,
                         bool(unit_norm), bool(inner_product), *out, nt)
    return out[0], out[1]


def _kernel_args(parts, d, part_dtype, cand, n_neighbors, dtype, n_threads):
    """What the re-rank kernels take besides the queries: the row parts'
    addresses and first rows (an empty part when there is none), the
    candidates as C-contiguous int64, the outputs and per-thread heaps
    ((dist, idx, heap_d, heap_i), of ``dtype``), and the thread count."""
    if not parts:
        parts = [np.empty((0, d), dtype=part_dtype)]
    part_ptr = np.array([p.ctypes.data for p in parts], dtype=np.uintp)
    part_start = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([p.shape[0] for p in parts], out=part_start[1:])
    cand = np.ascontiguousarray(cand, dtype=np.int64)
    nq = cand.shape[0]
    nt = max(1, n_threads)
    out = (np.empty((nq, n_neighbors), dtype=dtype), np.empty((nq, n_neighbors), dtype=np.int64),
           scratch(nt, n_neighbors, dtype), scratch(nt, n_neighbors, np.int64))
    return part_ptr, part_start, cand, out, nt


# -- compact re-ranking tiers ---------------------------------------------------

# ``refine_dtype``: what the reorder stage reads.  "float32": the raw rows
# (``vectors_``); "float16" and "int8": a compact tier of the prepared rows.
REFINE_DTYPES = ("float32", "float16", "int8")
TIER_DTYPES = {"float16": np.dtype(np.float16), "int8": np.dtype(np.uint8)}
FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
INT8_LEVELS = 255  # codes 0 .. 255


class RefineTier:
    """A compact re-ranking tier: the prepared rows (normalised for cosine,
    in the input space: never rotated) in float16, or in 8-bit codes.

    Parameters
    ----------
    kind : {"float16", "int8"}
    rows : RowStore of shape (n_rows, n_features)
        float16 rows, or uint8 codes (dtype ``TIER_DTYPES[kind]``); never
        modified: appends return a new tier sharing its chunks.
    offset, scale : ndarray of shape (n_features,), float32, or None
        int8 only: element j of a row decodes as ``offset[j] + scale[j] *
        code[j]``; ``scale > 0``.  None for float16.

    An int8 tier covers, in feature j, the range ``[offset[j], offset[j] +
    255 * scale[j]]`` learned at fit (the minimum and maximum of the fitted
    rows; a constant feature gets the range ``[c, c + 1]``); values of rows
    appended later are clipped to it, as faiss's 8-bit scalar quantizer
    does.  A float16 tier refuses rows with values beyond +-65504.
    The estimators hold it as three fitted attributes (``refine_rows_``,
    ``refine_offset_``, ``refine_scale_``): see :meth:`of` and
    :meth:`attributes`.
    """

    def __init__(self, kind, rows, offset=None, scale=None):
        self.kind, self.rows, self.offset, self.scale = kind, rows, offset, scale

    @classmethod
    def of(cls, est):
        """The tier the fitted estimator ``est`` holds, or None."""
        rows = est.__dict__.get("refine_rows_")
        if rows is None:
            return None
        kind = "int8" if rows.dtype == np.uint8 else "float16"
        return cls(kind, rows, est.__dict__.get("refine_offset_"),
                   est.__dict__.get("refine_scale_"))

    @classmethod
    def empty(cls, kind, n_features, offset=None, scale=None):
        return cls(kind, RowStore.empty(n_features, TIER_DTYPES[kind]), offset, scale)

    @staticmethod
    def no_tier():
        """The attributes of an index without a compact tier."""
        return {"refine_rows_": None, "refine_offset_": None, "refine_scale_": None}

    def attributes(self):
        return {"refine_rows_": self.rows, "refine_offset_": self.offset,
                "refine_scale_": self.scale}

    @property
    def nbytes(self):
        """Bytes held in memory: the rows (whole capacity) and offset / scale."""
        extra = 0 if self.offset is None else self.offset.nbytes + self.scale.nbytes
        return self.rows.memory_nbytes + extra

    # -- building ------------------------------------------------------------
    @classmethod
    def train(cls, kind, rows):
        """An empty tier for the prepared, unrotated ``rows`` (a
        :class:`~pqsk._store.FitRows`), read once chunk by chunk: int8
        learns ``offset`` (the minimum of each feature) and ``scale``
        (its range / 255); float16 checks that every value fits.  Raises
        ValueError (naming the feature) when it cannot hold the rows."""
        d = rows.shape[1]
        lo = np.full(d, np.inf)
        hi = np.full(d, -np.inf)
        for _, chunk in rows.chunks():
            if chunk.shape[0]:
                np.minimum(lo, chunk.min(axis=0), out=lo)
                np.maximum(hi, chunk.max(axis=0), out=hi)
        if rows.shape[0] == 0:
            lo[:] = hi[:] = 0
        if kind == "float16":
            cls._check_float16(lo, hi)
            return cls.empty(kind, d)
        with np.errstate(over="ignore", invalid="ignore"):
            offset = lo.astype(np.float32)
            span = hi.astype(np.float32) - offset
            bad = ~(np.isfinite(offset) & np.isfinite(span))
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            raise ValueError(
                f"refine_dtype='int8' cannot scale feature {j}: its range [{lo[j]:.6g}, "
                f"{hi[j]:.6g}] overflows float32; use refine_dtype='float32'.")
        scale = (span / np.float32(INT8_LEVELS)).astype(np.float32)
        scale[~(scale > 0)] = np.float32(1 / INT8_LEVELS)  # constant features
        return cls.empty(kind, d, offset, scale)

    @staticmethod
    def _check_float16(lo, hi):
        big = np.flatnonzero(np.maximum(-lo, hi) > FLOAT16_MAX)
        if big.size:
            j = int(big[0])
            raise ValueError(
                f"refine_dtype='float16' holds values up to {FLOAT16_MAX:g} in magnitude; "
                f"feature {j} spans [{lo[j]:.6g}, {hi[j]:.6g}]. Use refine_dtype='int8' or "
                "'float32'.")

    def check(self, X):
        """Raise ValueError if the rows of X (a :class:`~pqsk._store.FitRows`)
        cannot be appended (float16: a value beyond +-65504), reading them
        chunk by chunk, so that an append fails before it changes anything."""
        if self.kind == "float16":
            for _, chunk in X.chunks():
                if chunk.shape[0]:
                    self._check_float16(chunk.min(axis=0), chunk.max(axis=0))

    def encode(self, chunk):
        """Prepared rows (n, n_features) as tier rows: float16 values, or
        uint8 codes ``round((x - offset) / scale)`` clipped to [0, 255]."""
        if self.kind == "float16":
            if chunk.shape[0]:
                self._check_float16(chunk.min(axis=0), chunk.max(axis=0))
            return chunk.astype(np.float16)
        codes = (np.asarray(chunk, dtype=np.float64) - self.offset) / self.scale
        np.rint(codes, out=codes)
        np.clip(codes, 0, INT8_LEVELS, out=codes)
        return codes.astype(np.uint8)

    def appended(self, X):
        """A new tier: these rows, then the rows of X (a
        :class:`~pqsk._store.FitRows`, prepared but not rotated), encoded
        a chunk at a time.  Raises ValueError (float16 overflow) before
        anything is shared."""
        if X.rotation is not None:
            X = FitRows(X.raw, X.dtype, X.unit_norm)
        rows = self.rows
        for _, chunk in X.chunks():
            rows = rows.appended(self.encode(chunk))
        return RefineTier(self.kind, rows, self.offset, self.scale)

    # -- reading -------------------------------------------------------------
    def decode(self, codes, dtype):
        """Tier rows (float16 or uint8 codes) as rows of ``dtype``."""
        if self.kind == "float16":
            return codes.astype(dtype)
        return (self.offset.astype(np.float64) + self.scale.astype(np.float64)
                * codes).astype(dtype)

    def take(self, ids, dtype):
        """Decoded rows of ``ids`` (int array), of ``dtype``."""
        return self.decode(self.rows.take(ids), dtype)

    def rerank(self, Q, cand, n_neighbors, inner_product=False, unit_norm=False,
               n_threads=1):
        """:func:`exact_rerank` of the decoded tier rows (the kernel
        ``pqsk._rerank.compact_rerank`` decodes each candidate row as it
        scores it).  Same arguments and results; distances in Q's dtype.
        The naive version is :func:`pqsk._naive.compact_rerank`."""
        parts = [p for p in self.rows.chunks if p.shape[0]]
        part_ptr, part_start, cand, out, nt = _kernel_args(
            parts, Q.shape[1], self.rows.dtype, cand, n_neighbors, Q.dtype, n_threads)
        none = np.empty(0, dtype=np.float32)
        is_int8 = self.kind == "int8"
        _rerank.compact_rerank(np.ascontiguousarray(Q), part_ptr, part_start, is_int8,
                               self.offset if is_int8 else none,
                               self.scale if is_int8 else none,
                               cand, bool(unit_norm), bool(inner_product), *out, nt)
        return out[0], out[1]
