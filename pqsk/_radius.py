"""Radius queries: :class:`RadiusNeighborsMixin`.

``radius_neighbors`` and ``radius_neighbors_graph`` of the scikit-learn
neighbors API, built on the k-neighbours search of
:class:`pqsk._base.BasePQNeighbors` (which mixes this class in): the
candidates of a query are fetched k at a time, k doubling, until the k-th
is beyond the radius or the query has no more points to visit.
"""

from numbers import Real

import numpy as np
from scipy import sparse
from sklearn.utils.validation import check_is_fitted

from ._checks import check_graph_mode, check_self_query
from ._filter import check_filter
from ._runtime import index_lock
from ._utils import effective_n_threads, openmp_region


class RadiusNeighborsMixin:
    """``radius_neighbors`` / ``radius_neighbors_graph`` for
    :class:`~pqsk._base.BasePQNeighbors`.

    Uses the base class's ``_check_fitted``, ``_check_params_at_call``,
    ``_query_parts``, ``_self_queries``, ``_search_refined``,
    ``_finish_distances`` and ``_n_live``; estimators may override
    ``_radius_first_k`` and ``_radius_caps`` (the most points a search of
    a query can visit).
    """

    # Candidates asked for first (HNSW: its beam width).
    _radius_first_k = 16

    def radius_neighbors(self, X=None, radius=None, return_distance=True,
                         sort_results=False, *, filter=None):
        """Find the (approximate) neighbors within a given radius of points.

        Approximate: a query returns the points within ``radius`` among
        those the index visits for it, which are

        * :class:`PQNeighbors`: every indexed point;
        * :class:`IVFPQNeighbors`: the points of the ``n_probe`` lists
          nearest the query (its last request, of at most twice as many
          candidates as those lists hold, may reach into the next lists in
          centroid order, as ``kneighbors`` does when the probed lists hold
          too few points);
        * :class:`HNSWPQNeighbors`: those a beam search of width ``max(k,
          ef_search)`` returns (its k best), k doubling from ``ef_search``
          until the k-th is beyond ``radius``.

        Candidates are fetched with the k-neighbours search, k doubling
        from 16 (HNSW: ``ef_search``) until the k-th candidate is beyond
        ``radius`` or the query's visitable points are all fetched; each
        doubling repeats the search (a flat index rescans every code).
        Without re-ranking, the distances (and so the radius test) are the
        ADC distances between the query and the decoded points; with
        ``refine_factor > 0`` they are exact (the best k of ``refine_factor
        * k`` ADC candidates, by exact distance), so with an exhaustive
        search (flat, ``n_probe = n_lists``, or ``ef_search`` at least the
        number of points) and enough re-ranking the result is
        :class:`~sklearn.neighbors.NearestNeighbors`'s.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            The query points (float16 ones converted to the fitted dtype a
            chunk at a time).  If None, the indexed points (their raw
            vectors when kept, else their reconstructions), each point
            excluded from its own neighbors, as scikit-learn does.
        radius : float, default=None
            Range, in the units of ``metric`` (for ``"dot"``, ``-<q, x> <=
            radius``, which may be negative); the estimator's ``radius``
            if None.
        return_distance : bool, default=True
            Whether to return the distances.
        sort_results : bool, default=False
            Accepted for scikit-learn's API; results are always sorted by
            distance, ties broken by the smaller index.  Requires
            ``return_distance=True``, as in scikit-learn.
        filter : array-like or sparse matrix, default=None
            The ids each query may return, as in :meth:`kneighbors`
            (applied inside the search; the candidates fetched are allowed
            ones only): a boolean mask, ids, or a sparse per-query matrix;
            a 0/1 integer array of n_samples_fit entries is refused.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries,), dtype=object
            Array of arrays: the distances of each query's neighbors, in
            the dtype of the fitted data (float32 unless fitted on
            float64); only if ``return_distance``.
        neigh_ind : ndarray of shape (n_queries,), dtype=object
            Array of int64 arrays: the indices of each query's neighbors.
        """
        self._check_fitted()
        with index_lock(self).read():
            return self._radius_neighbors(X, radius, return_distance, sort_results,
                                          filter)

    def _check_radius(self, radius):
        if radius is None:
            radius = self.radius  # validated with the search parameters
        elif isinstance(radius, bool) or not isinstance(radius, Real):
            raise TypeError(f"radius must be a real number, got {radius!r}.")
        radius = float(radius)
        if not np.isfinite(radius):
            raise ValueError(f"radius must be finite, got {radius}.")
        if radius < 0 and self.effective_metric_ != "dot":
            raise ValueError(f"radius must be >= 0 for metric={self.effective_metric_!r}, "
                             f"got {radius}.")
        return radius

    def _radius_neighbors(self, X, radius, return_distance, sort_results, filter=None):
        self._check_params_at_call()
        radius = self._check_radius(radius)
        if sort_results and not return_distance:
            raise ValueError("return_distance must be True if sort_results is True.")
        query_is_train = X is None
        if query_is_train:
            check_self_query(self.n_removed_, "radius_neighbors")
            n_queries = self.n_samples_fit_
            parts = self._self_queries()
        else:
            n_queries, parts = self._query_parts(X)
        flt = check_filter(filter, self.n_samples_fit_, n_queries)
        n_threads = max(1, min(effective_n_threads(self.n_jobs), n_queries))
        dist = np.empty(n_queries, dtype=object)
        ind = np.empty(n_queries, dtype=object)
        with openmp_region(n_threads):
            for sl, Q in parts:
                for q, (d, i) in enumerate(zip(*self._radius_search(
                        Q, radius, n_threads, query_is_train, flt, sl.start))):
                    row = sl.start + q
                    if query_is_train:  # the point itself, wherever it is
                        keep = i != row
                        d, i = d[keep], i[keep]
                    dist[row], ind[row] = d, i
        return (dist, ind) if return_distance else ind

    def _shard_radius(self, Q, radius, filter=None):
        """The shard protocol's radius search (:mod:`pqsk.dask`): two
        lists, (finished distances, local int64 ids) of each row of the
        prepared queries Q within ``radius``, sorted; ``filter`` as in
        ``_shard_search``."""
        self._check_params_at_call()
        flt = check_filter(filter, self.n_samples_fit_, Q.shape[0])
        n_threads = max(1, min(effective_n_threads(self.n_jobs), Q.shape[0]))
        with openmp_region(n_threads):
            return self._radius_search(Q, radius, n_threads, False, flt, 0)

    def _radius_caps(self, Q):
        """The most points a search of each row of Q can visit (int64)."""
        return np.full(Q.shape[0], self._n_live, dtype=np.int64)

    def _radius_search(self, Q, radius, n_threads, self_query=False, flt=None, first=0):
        """(distances, ids): two lists of arrays, one pair per row of Q, of
        the candidates within ``radius`` (finished distances), sorted.
        ``flt``: the filter of queries numbered from ``first``."""
        nq = Q.shape[0]
        n_live = self._n_live
        caps = np.minimum(self._radius_caps(Q), n_live)
        removed = self.removed_ if self.n_removed_ else None
        shared = None
        if flt is not None:  # at most the allowed live ids
            if flt.per_query:
                allowed = np.diff(flt.matrix.indptr)[first:first + nq].astype(np.int64)
            else:
                shared = flt.blocked(removed)
                allowed = shared.allowed_counts(nq)
            caps = np.minimum(caps, allowed)
        out_d = [np.empty(0, dtype=self._fit_dtype_) for _ in range(nq)]
        out_i = [np.empty(0, dtype=np.int64) for _ in range(nq)]
        pending = np.flatnonzero(caps > 0)  # all removed / none allowed: nothing
        k = min(n_live, self._radius_first_k + int(self_query))
        while pending.size:
            k = max(1, min(k, int(caps[pending].max())))
            # Chunks bound the (rows, k) results of a round.
            step = max(1, (1 << 22) // k)
            if flt is not None and flt.per_query:
                step = min(step, flt.chunk_rows())
            still = []
            for start in range(0, pending.size, step):
                rows = pending[start:start + step]
                blocked = (shared if flt is None or not flt.per_query
                           else flt.blocked(removed, first + rows))
                kw = {} if blocked is None else {"blocked": blocked}
                d, i = self._search_refined(Q[rows], k, n_threads, **kw)
                d = self._finish_distances(np.array(d, copy=True))
                done = (d[:, -1] > radius) | (k >= caps[rows])
                for r, row in enumerate(rows):
                    if not done[r]:
                        continue
                    keep = (d[r] <= radius) & (i[r] >= 0) & (i[r] < self.n_samples_fit_)
                    out_d[row], out_i[row] = d[r][keep], i[r][keep].astype(np.int64)
                still.append(rows[~done])
            pending = np.concatenate(still)
            k *= 2
        return out_d, out_i

    def radius_neighbors_graph(self, X=None, radius=None, mode="connectivity",
                               sort_results=False, *, filter=None):
        """Compute the (weighted) graph of neighbors within ``radius``.

        Approximate, as :meth:`radius_neighbors`, which it calls.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            The query points; if None, the indexed points (self excluded).
        radius : float, default=None
            Range; the estimator's ``radius`` if None.
        mode : {"connectivity", "distance"}, default="connectivity"
            ``"connectivity"`` stores ones, ``"distance"`` the distances
            under ``metric``.
        sort_results : bool, default=False
            Accepted for scikit-learn's API (rows are always sorted by
            distance); in ``"connectivity"`` mode it is ignored.
        filter : array-like or sparse matrix, default=None
            The ids each query may link to, as in :meth:`kneighbors`.

        Returns
        -------
        A : sparse matrix of shape (n_queries, n_samples_fit), CSR
            ``A[i, j]`` is the edge from query i to indexed point j.
        """
        check_is_fitted(self)
        check_graph_mode(mode)
        if mode == "connectivity":
            ind = self.radius_neighbors(X, radius, return_distance=False, filter=filter)
            dist = None
        else:
            dist, ind = self.radius_neighbors(X, radius, return_distance=True,
                                              sort_results=sort_results, filter=filter)
        n_queries = ind.shape[0]
        counts = np.fromiter((a.shape[0] for a in ind), dtype=np.int64, count=n_queries)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        indices = (np.concatenate(list(ind)) if n_queries else np.empty(0, np.int64))
        data = (np.ones(indices.shape[0], dtype=np.float64) if dist is None
                else np.concatenate(list(dist)) if n_queries else np.empty(0))
        return sparse.csr_matrix((data, indices, indptr),
                                 shape=(n_queries, self.n_samples_fit_))
