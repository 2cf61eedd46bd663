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
from ._utils import effective_n_threads, release_gil


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
                         bool(unit_norm), bool(inner_product), *out, nt,
                         release_gil(cand.size * Q.shape[1]))
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
        step = X.chunk_rows()
        for sl, chunk in X.chunks():
            # A batch of several chunks (a fit, a large append) ends in a
            # chunk of exactly its rows: no spare capacity held after it.
            rows = rows.appended(self.encode(chunk),
                                 spare=len(X) <= step or sl.stop < len(X))
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
                               cand, bool(unit_norm), bool(inner_product), *out, nt,
                               release_gil(cand.size * Q.shape[1]))
        return out[0], out[1]


# -- bounded re-ranking ------------------------------------------------------------
#
# ``refine_factor * n_neighbors`` is how many candidates a query may re-rank,
# not how many it must.  The candidates arrive sorted by their approximate
# (code) distance ``a``; their exact distance ``e`` is at least ``a - slack``
# (squared distances: ``sqrt(e) >= sqrt(a) - slack``, as the error of a code
# moves a point by at most its reconstruction error, whatever the distance;
# inner products: ``e >= a - slack``), where ``slack`` bounds how much the
# codes overestimate a distance.  Once the k best exact distances of the
# first candidates are known (their k-th is ``D``), a candidate beyond
# ``D`` plus the slack cannot enter the top k, and neither can any after it.  ``slack`` is calibrated per index and search
# setting (see :func:`calibrated_slack`) and raised per query to the largest
# overestimate seen among that query's own re-ranked neighbours.

SLACK_QUANTILE = 0.999   # of the calibration pairs' overestimates ...
SLACK_SAFETY = 1.25      # ... times this
N_PSEUDO_QUERIES = 128   # stored rows searched as queries to calibrate
MIN_PAIRS = 2000         # fewer calibration pairs: no bound (re-rank all)


def rerank_candidates(est, Q, approx, cand, n_neighbors, n_threads=1):
    """The reorder stage of a fitted estimator: exact (or tier) distances of
    the candidates worth re-ranking, best ``n_neighbors`` kept.

    ``Q`` (nq, D): prepared, unrotated queries; ``approx``, ``cand`` (nq,
    n_cand): the scorers' distances and ids, rows sorted by (distance, id),
    empty slots (+inf, INT64_MAX).  With more than ``2 * n_neighbors``
    candidates, the first ``2 * n_neighbors`` are re-ranked, then only those
    of the rest whose approximate distance is within the slack of the k-th
    exact distance found (see the comment above).  Returns (dist, idx) as
    :func:`exact_rerank`; adds the rows re-ranked to the estimator's
    runtime counter (``pqsk._runtime.runtime(est).rerank_rows``).
    """
    from ._runtime import runtime

    def score(C, n_out):
        return _rerank_rows(est, Q_sub[0], C, n_out, n_threads)

    nq, n_cand = cand.shape
    first = 2 * n_neighbors
    state = runtime(est)
    Q_sub = [Q]
    if n_cand <= first or nq == 0:
        state.rerank_rows += int(np.count_nonzero(cand != _NO_ID))
        return score(cand, n_neighbors)
    dist, idx = score(cand[:, :first], n_neighbors)
    ip = est._inner_product
    slack = query_slack(approx[:, :first], cand[:, :first], dist, idx,
                        calibrated_slack(est, n_threads), ip)
    kth = dist[:, -1].astype(np.float64)
    limit = kth + slack if ip else (np.sqrt(np.maximum(kth, 0)) + slack) ** 2
    # Candidates past the first whose approximate distance is within the
    # limit: a prefix of each row, as rows are sorted.
    rest = approx[:, first:]
    n_more = np.sum(rest <= limit[:, None], axis=1)
    n_more[~np.isfinite(kth)] = rest.shape[1]   # fewer than k found: no bound
    state.rerank_rows += int(np.count_nonzero(cand[:, :first] != _NO_ID))
    todo = np.flatnonzero(n_more)
    if todo.size == 0:
        return dist, idx
    width = int(n_more[todo].max())
    more = cand[todo, first:first + width].copy()
    more[np.arange(width)[None, :] >= n_more[todo, None]] = _NO_ID
    state.rerank_rows += int(np.count_nonzero(more != _NO_ID))
    Q_sub[0] = Q[todo]
    d2, i2 = score(more, n_neighbors)
    dist[todo], idx[todo] = _merge_sorted(dist[todo], idx[todo], d2, i2, n_neighbors)
    return dist, idx


_NO_ID = np.iinfo(np.int64).max


def _rerank_rows(est, Q, cand, n_out, n_threads):
    """Exact distances of ``cand`` against the estimator's re-ranking
    source: its compact tier, else its raw rows."""
    unit = est.effective_metric_ == "cosine"
    tier = est._tier
    if tier is not None:  # decoded row by row in the kernel
        return tier.rerank(Q, cand, n_out, est._inner_product, unit_norm=unit,
                           n_threads=n_threads)
    # Only the candidate rows are read from the row store; stored rows are
    # raw, so cosine normalises them here.
    return exact_rerank(Q, est.vectors_, cand, n_out, est._inner_product, unit_norm=unit,
                        n_threads=n_threads)


def _merge_sorted(d1, i1, d2, i2, k):
    """The k best of two (distance, id) row sets, rows sorted by (distance, id)."""
    d = np.concatenate([d1, d2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    order = np.lexsort((i, d), axis=1)[:, :k]
    return np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)


def _domain(d, inner_product):
    """Distances where the slack is additive: inner products as they are,
    squared distances as their square roots (float64)."""
    d = np.asarray(d, dtype=np.float64)
    return d if inner_product else np.sqrt(np.maximum(d, 0))


def query_slack(approx, cand, dist, idx, slack, inner_product):
    """Per query: ``slack``, raised to the largest overestimate (approximate
    minus exact distance, in :func:`_domain`) among its re-ranked neighbours
    ``idx`` found in ``cand`` (float64, shape (nq,))."""
    hit = cand[:, None, :] == idx[:, :, None]            # (nq, k, n_first)
    a = np.where(hit, approx[:, None, :].astype(np.float64), -np.inf).max(axis=2)
    ok = np.isfinite(a) & np.isfinite(dist)
    over = np.where(ok, _domain(np.where(ok, a, 0), inner_product)
                    - _domain(np.where(ok, dist, 0), inner_product), -np.inf)
    return np.maximum(over.max(axis=1), slack)


def calibrated_slack(est, n_threads=1):
    """How much the codes may overestimate a distance at the estimator's
    current search setting: the ``SLACK_QUANTILE`` quantile of (approximate
    - exact) distance over the candidates of ``N_PSEUDO_QUERIES`` stored rows
    searched as queries (their own ids left out), times ``SLACK_SAFETY``;
    +inf (no bound: every candidate is re-ranked) when there are fewer than
    ``MIN_PAIRS`` pairs to estimate it from (a small index, or few
    candidates).

    Cached in the estimator's runtime state for its codebooks, re-ranking
    tier and search setting, and kept while the number of live rows stays
    within a factor ``RECALIBRATE_GROWTH`` of the number it was calibrated
    at: appends and removals do not each pay a calibration (tens of
    milliseconds, which a query would wait for), and the slack drifts
    slowly with the index's size (+25% from 50,000 to 150,000 GloVe rows),
    which ``SLACK_SAFETY`` covers.  A write that leaves the band calibrates
    again before it returns (:func:`refresh_slack`), so a sequence of calls
    answers the same whatever the timing; queries running during that
    write keep the previous band's slack.  Saved with the index, so a
    loaded index answers as the one saved.
    """
    from ._runtime import runtime

    state = runtime(est)
    cached, in_band = _cached_slack(est)
    if cached is not None and (in_band or _writer_busy(state)):
        # Out of the band during a write: the writer calibrates when it is
        # done (refresh_slack); until then the queries, which see a state
        # that is changing anyway, keep the slack of the previous band.
        return cached[3]
    slack = _calibrate(est, n_threads)
    state.rerank_slack = (slack_owner(est), slack_setting(est), _n_live(est), slack)
    return slack


RECALIBRATE_GROWTH = 1.25   # live rows grown or shrunk by more: calibrate again


def _n_live(est):
    return int(est.n_samples_fit_ - est.n_removed_)


def _cached_slack(est):
    """(the cached calibration if it is for the estimator's codebooks,
    tier and search setting, else None; whether its live rows' band holds
    the current number)."""
    from ._runtime import runtime

    cached = runtime(est).rerank_slack
    if cached is None or cached[0] != slack_owner(est) or cached[1] != slack_setting(est):
        return None, False
    n_live = _n_live(est)
    return cached, cached[2] / RECALIBRATE_GROWTH <= n_live <= cached[2] * RECALIBRATE_GROWTH


def _writer_busy(state):
    """Whether another thread holds the index's writer mutex."""
    if state.writer.acquire(blocking=False):
        state.writer.release()
        return False
    return True


def refresh_slack(est, n_threads=None):
    """After an append or a removal, by the writer (still the only one):
    when a slack is cached for the current setting and the live rows have
    left its band, calibrate again now, on the state just published, so
    that no query pays for it.  A query that sees that state first
    computes the same value (it depends on the state only)."""
    from ._runtime import index_lock

    cached, in_band = _cached_slack(est)
    if cached is None or in_band:
        return
    if n_threads is None:
        n_threads = effective_n_threads(est.n_jobs)
    with index_lock(est).read():
        calibrated_slack(est, n_threads)


def slack_owner(est):
    """What a calibrated slack belongs to: the fitted codebooks and the
    re-ranking tier's kind and trained offsets (by identity: ``fit`` and
    ``refit_codebooks`` replace them; appends do not; ``set_refine``, which
    may keep them, forgets the cached slack itself)."""
    d = est.__dict__
    return (id(d.get("codebooks_")), d.get("refine_dtype_"), id(d.get("refine_offset_")))


def slack_setting(est):
    """The search setting a calibrated slack holds for (a string, as saved)."""
    return "\x1f".join(repr(getattr(est, n, None)) for n in est._search_params)


def saved_slack(est):
    """The calibration to save with the estimator (``{"setting", "n_live",
    "slack"}``), or None when the cached one is not for its current state."""
    from ._runtime import runtime

    cached = runtime(est).rerank_slack
    if cached is None or cached[0] != slack_owner(est):
        return None
    return {"setting": cached[1], "n_live": int(cached[2]), "slack": float(cached[3])}


def restore_slack(est, saved):
    """Install a calibration read from a saved index (after its arrays are
    checked); raises ValueError when it is malformed."""
    from ._runtime import runtime

    if not (isinstance(saved, dict) and set(saved) == {"setting", "n_live", "slack"}
            and isinstance(saved["setting"], str) and type(saved["n_live"]) is int
            and type(saved["slack"]) is float):
        raise ValueError("_rerank_calibration must hold a setting (str), n_live (int) "
                         "and slack (float)")
    slack, n_live = saved["slack"], saved["n_live"]
    if not (slack >= 0) or n_live < 1 or n_live > est.n_samples_fit_:
        raise ValueError(f"_rerank_calibration holds slack={slack!r}, n_live={n_live!r}: "
                         f"a slack is >= 0 (or inf) and n_live in [1, n_samples_fit_]")
    runtime(est).rerank_slack = (slack_owner(est), saved["setting"], n_live, slack)


def _calibrate(est, n_threads):
    n = est.n_samples_fit_
    removed = np.asarray(est.removed_[:n], dtype=bool) if est.n_removed_ else None
    live = np.arange(n) if removed is None else np.flatnonzero(~removed)
    k = est.n_neighbors
    if live.size <= 4 * k:
        return np.inf
    rng = np.random.RandomState(0)
    ids = np.sort(rng.choice(live, min(N_PSEUDO_QUERIES, live.size), replace=False))
    tier = est._tier
    rows = (tier.take(ids, est._fit_dtype_) if tier is not None
            else np.asarray(est.vectors_[ids], dtype=est._fit_dtype_))
    P = est._prepare(rows)
    n_cand = est._n_candidates(k)
    approx, cand = est._search(est._rotate(P), n_cand, n_threads, ranking_only=True)
    cand = np.where(cand == ids[:, None], _NO_ID, cand)   # not the query itself
    exact, eids = _rerank_rows(est, P, cand, n_cand, n_threads)
    # the exact distance of each candidate, found by id in its row
    order = np.argsort(eids, axis=1, kind="stable")
    eids, exact = np.take_along_axis(eids, order, 1), np.take_along_axis(exact, order, 1)
    pos = np.minimum(np.stack([np.searchsorted(e, c) for e, c in zip(eids, cand)]),
                     eids.shape[1] - 1)
    found = np.take_along_axis(eids, pos, 1) == cand
    e = np.take_along_axis(exact, pos, 1).astype(np.float64)
    a = approx.astype(np.float64)
    ok = found & np.isfinite(a) & np.isfinite(e) & (cand != _NO_ID)
    over = _domain(a[ok], est._inner_product) - _domain(e[ok], est._inner_product)
    if over.size < MIN_PAIRS:
        return np.inf
    return SLACK_SAFETY * float(max(0.0, np.quantile(over, SLACK_QUANTILE)))
