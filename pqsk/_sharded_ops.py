"""What :class:`pqsk.dask.ShardedNeighbors` does beyond plain k-neighbours:
filters, radius queries and the tuning view, in global ids.

* The tasks that run on the workers, one per shard and batch of queries
  (the whole batch in one task: :func:`search_shard`, :func:`radius_shard`,
  :func:`exact_shard`, :func:`rows_shard`), each using a shard through the
  shard protocol of :class:`pqsk._base.BasePQNeighbors` and mapping its
  local ids to global ones (:func:`to_global`).
* The client side: a validated ``filter`` (:func:`pqsk._filter.check_filter`
  over the global ids, so its errors are those of one process) cut into
  each shard's local form (:func:`local_filters`), per-shard radius
  results merged (:func:`merge_radius`), the self-exclusion of
  ``kneighbors(X=None)`` (:func:`pqsk._segments.drop_self`), and
  :class:`TuneView`, what
  :func:`pqsk.tune_search` reads of a sharded index.

This module imports neither dask nor any estimator module: ``pqsk.dask``
hands these functions to dask.
"""

import pickle
import threading
import warnings

import numpy as np
from scipy import sparse

from ._routing import assign
from ._runtime import runtime
from ._segments import NO_ID, merge_topk

_VIEWS_LOCK = threading.Lock()  # guards every shard's runtime(shard).views


def shard_view(shard, params):
    """The shard with the search parameters ``params``: a shallow copy
    sharing its arrays (shards are never modified), cached per shard so
    that caches keyed by the estimator survive from one query to the next."""
    key = tuple(sorted(params.items()))
    with _VIEWS_LOCK:
        views = runtime(shard).views
        view = views.get(key)
        if view is None:
            if len(views) >= 8:
                views.clear()
            view = views[key] = shard._shard_with_params(**params)
    return view


def to_global(ind, ranges):
    """Local ids of a shard -> global ids (NO_ID for an id outside the
    shard: an empty slot).  ``ranges`` rows are (first local id, first
    global id, length), sorted by local id, contiguous from 0."""
    out = np.full(ind.shape, NO_ID, np.int64)
    ok = (ind >= 0) & (ind < ranges[-1, 0] + ranges[-1, 2]) if len(ranges) else ind < 0
    r = np.searchsorted(ranges[:, 0], ind[ok], side="right") - 1
    out[ok] = ind[ok] - ranges[r, 0] + ranges[r, 1]
    return out


def global_ids(ranges):
    """The global id of each local id 0, 1, ... of a shard (int64)."""
    if not len(ranges):
        return np.empty(0, np.int64)
    lengths = ranges[:, 2]
    return np.repeat(ranges[:, 1] - ranges[:, 0], lengths) + np.arange(lengths.sum(),
                                                                      dtype=np.int64)


def local_filters(flt, ranges, rows=None):
    """Each shard's part of the validated filter ``flt`` (a
    :class:`pqsk._filter.QueryFilter` over the global ids, or None), in
    its local ids: a boolean mask of the shard's ids, or a CSR boolean
    matrix (queries ``rows`` of a per-query filter, a slice or an index
    array; None: all) with one column per local id."""
    if flt is None:
        return [None] * len(ranges)
    if not flt.per_query:
        return [flt.allowed[global_ids(r)] for r in ranges]
    sub = flt.matrix if rows is None else flt.matrix[rows]
    return [sub[:, global_ids(r)].tocsr() for r in ranges]


def search_shard(shard, Q, n_neighbors, params, ranges, local_filter=None, rows=None):
    """(raw distances, global ids) of the shard's ``n_neighbors`` best for
    the prepared queries Q (the whole batch), rows sorted by (distance,
    id), empty slots (+inf, NO_ID).  ``rows``: the queries routed to this
    shard (an index array; None: all); the other rows are all empty slots.
    ``ranges`` None: local ids, which the caller maps with ``to_global``
    (empty slots included)."""
    if rows is not None:
        sub = Q[rows]
        if sparse.issparse(local_filter):  # a per-query filter: its rows too
            local_filter = local_filter[rows]
        dist, ind = search_shard(shard, sub, n_neighbors, params, ranges, local_filter) \
            if len(rows) else (np.empty((0, n_neighbors), shard._shard_dtype()),
                               np.empty((0, n_neighbors), np.int64))
        out_d = np.full((Q.shape[0], dist.shape[1]), np.inf, dist.dtype)
        out_i = np.full((Q.shape[0], dist.shape[1]), NO_ID, np.int64)
        out_d[rows], out_i[rows] = dist, ind
        return out_d, out_i
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the client warned already
        dist, ind = shard_view(shard, params)._shard_search(Q, n_neighbors, local_filter)
    return dist, ind if ranges is None else to_global(ind, ranges)


def routed_rows(visit, j):
    """The queries (index array) whose row of the boolean ``visit`` matrix
    names shard j."""
    return np.flatnonzero(visit[:, j])


def route_rows(template, routing, chunk, block=1 << 16):
    """The shard of each row of ``chunk`` prepared as a query
    (:func:`pqsk._routing.assign` with ``routing`` = (centroids, bias,
    scale), block by block), in the smallest unsigned dtype that holds it."""
    n_shards = routing[0].shape[0]
    labels = [assign(template._shard_prepare_queries(chunk[a:a + block]), *routing[:2])
              for a in range(0, chunk.shape[0], block)]
    dtype = np.min_scalar_type(max(n_shards - 1, 0))
    return np.concatenate(labels).astype(dtype) if labels else np.empty(0, dtype)


def take_rows(chunk, labels, j):
    """The rows of a chunk whose label (``route_rows``) is j, as an array."""
    return np.asarray(chunk[np.flatnonzero(labels == j)])


def self_queries(shard, ranges):
    """(global ids, query vectors) standing for the shard's indexed points,
    as the single-machine ``kneighbors(X=None)`` makes them."""
    return to_global(np.arange(shard.n_samples_fit_), ranges), shard._shard_self_queries()


def merged_finished(template, n_neighbors, filtered, *parts):
    """The shards' answers (``search_shard``'s) merged into the top
    ``n_neighbors``, distances finished; ``filtered``: empty slots marked."""
    dist, ind = merge_topk(list(parts), n_neighbors)
    if filtered:
        mark_empty(dist, ind)
    return template._shard_finish(dist), ind


def graph_block(ind, dist, n_fit, mode):
    """The CSR rows of a k-neighbours answer; ids -1 (filtered answers
    with fewer allowed ids) are left out."""
    n = ind.shape[0]
    found = ind >= 0
    data = np.ones(int(found.sum())) if mode == "connectivity" else dist[found]
    indptr = np.concatenate([[0], np.cumsum(found.sum(axis=1))])
    return sparse.csr_matrix((data, ind[found], indptr), shape=(n, n_fit))


def radius_shard(shard, Q, radius, params, ranges, local_filter=None):
    """Per row of the prepared queries Q: (finished distances, global ids)
    of the shard's points within ``radius``, as two object arrays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dist, ind = shard_view(shard, params)._shard_radius(Q, radius, local_filter)
    out_d = np.empty(len(dist), dtype=object)
    out_i = np.empty(len(ind), dtype=object)
    for q, (d, i) in enumerate(zip(dist, ind)):
        out_d[q], out_i[q] = d, to_global(i, ranges)
    return out_d, out_i


def merge_radius(parts, self_ids=None):
    """The radius answers of every shard (``radius_shard``'s) merged, each
    query's sorted by (distance, id); ``self_ids``: each query's own
    global id, left out (``X=None``)."""
    n = len(parts[0][0])
    dist = np.empty(n, dtype=object)
    ind = np.empty(n, dtype=object)
    for q in range(n):
        d = np.concatenate([p[0][q] for p in parts])
        i = np.concatenate([p[1][q] for p in parts])
        if self_ids is not None:
            keep = i != self_ids[q]
            d, i = d[keep], i[keep]
        order = np.lexsort((i, d))
        dist[q], ind[q] = d[order], i[order]
    return dist, ind


def mark_empty(dist, ind):
    """Empty slots of a filtered answer (fewer allowed ids than k): NO_ID
    becomes -1 at distance +inf, as in one process.  In place."""
    empty = ind == NO_ID
    if empty.any():
        ind[empty] = -1
        dist[empty] = np.inf


# -- tune_search on a sharded index --------------------------------------------

class _NoBar:
    def update(self, n=1):
        pass


def exact_shard(shard, Q, k, self_ids):
    """Sorted (nq, <= k) ranking distances of each prepared query's exact
    nearest live rows of the shard (its raw vectors); ``self_ids``: each
    query's own local id in this shard (-1: not here), left out."""
    from ._tune import _exact_neighbors

    return _exact_neighbors(shard, shard.vectors_, Q, k, self_ids, _NoBar())


def rows_shard(shard, local_ids):
    """The raw rows of the shard's ``local_ids``."""
    return shard.vectors_.take(local_ids)


class TuneView:
    """What :func:`pqsk.tune_search` reads and sets of an index, for a
    sharded one: the template's metric and dtype, the global ids and
    tombstones, the wrapped estimator's search parameters (``set_params``
    sets them for the next queries), ``kneighbors`` of the sharded index
    (timed as it runs: every shard, the merge), and the raw rows and the
    exact neighbours computed on the workers (``_tune_exact``), a task
    per shard, never gathering the vectors to the client.

    ``run(tasks)`` computes a list of ``(function, *args)`` tasks and
    returns their results (pqsk.dask gives its dask scheduler)."""

    _is_tune_view = True

    def __init__(self, sharded, run):
        self._sharded = sharded
        self._run = run
        tpl = sharded.template_
        self._tpl = tpl
        self.n_samples_fit_ = sharded.n_samples_fit_
        self.n_features_in_ = sharded.n_features_in_
        self.removed_ = sharded._removed if sharded.n_removed_ else None
        self._n_live = sharded.n_samples_fit_ - sharded.n_removed_
        self._fit_dtype_ = tpl._fit_dtype_
        self._inner_product = tpl._inner_product
        self._tier = tpl._tier
        self.vectors_ = None if tpl.vectors_ is None else _ShardedRows(self)
        if hasattr(tpl, "n_lists_"):
            self.n_lists_ = tpl.n_lists_

    def __getattr__(self, name):  # the search parameters, read from the estimator
        est = self.__dict__["_sharded"].estimator
        if name in est.get_params(deep=False):
            return getattr(est, name)
        raise AttributeError(name)

    def get_params(self, deep=False):
        return self._sharded.estimator.get_params(deep=False)

    def set_params(self, **params):
        self._sharded.set_params(**{f"estimator__{k}": v for k, v in params.items()})
        return self

    def _prepare(self, X):
        return self._tpl._prepare(X)

    def kneighbors(self, X, n_neighbors=None, return_distance=True):
        return self._sharded.kneighbors(X, n_neighbors, return_distance)

    def _route(self, ids):
        return self._sharded._route(np.asarray(ids, dtype=np.int64))

    def _tune_exact(self, Q, k, self_ids):
        s = self._sharded
        tasks = []
        for j, shard in enumerate(s.shards_):
            local = np.full(Q.shape[0], -1, np.int64)
            if self_ids is not None:
                where, loc = self._route(self_ids)
                local[where == j] = loc[where == j]
            tasks.append((exact_shard, shard, Q, k, local))
        parts = [p for p in self._run(tasks) if p.shape[1]]
        return np.sort(np.concatenate(parts, axis=1), axis=1)[:, :k]


class _ShardedRows:
    """The raw rows of a sharded index by global id (``take``), gathered
    from the shards that hold them."""

    def __init__(self, view):
        self._view = view

    def take(self, ids):
        ids = np.asarray(ids, dtype=np.int64)
        view = self._view
        out = np.empty((ids.shape[0], view.n_features_in_), view._fit_dtype_)
        where, local = view._route(ids)
        shards = np.unique(where)
        got = view._run([(rows_shard, view._sharded.shards_[j], local[where == j])
                         for j in shards])
        for j, rows in zip(shards, got):
            out[where == j] = rows
        return out

    def __getitem__(self, ids):
        return self.take(ids)


# -- shard building blocks (tasks never modify their inputs: dask may hold
# or recompute them) ----------------------------------------------------------------

def rows_of(chunks):
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


def copy_shard(shard):
    return pickle.loads(pickle.dumps(shard, protocol=pickle.HIGHEST_PROTOCOL))


def appended_shard(shard, *chunks):
    return copy_shard(shard).partial_fit(rows_of(chunks))


def removed_shard(shard, local_ids):
    return copy_shard(shard).remove(local_ids)


def chunk_bounds(chunks):
    return np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)
