"""An index sharded over a dask cluster: :class:`ShardedNeighbors`.

``pip install pqsk[dask]``.  This module is the only part of pqsk that
imports dask; ``import pqsk`` does not import it.

The engine is dask's: shards are ordinary pqsk indexes held in the memory of
dask workers as the results of tasks, queries are tasks placed next to the
shards, and a shard lost with its worker is recomputed by dask from the
tasks that made it (its rows and the shared quantizers, or the saved
directory it was loaded from).

The pqsk estimators are used through the shard protocol of
:class:`pqsk._base.BasePQNeighbors` (its ``_shard_*`` methods: train the
quantizers on a sample, build a shard from them, prepare queries, search a
shard, finish merged distances) and their public API only; this module
imports no estimator module.
"""

import uuid
from numbers import Integral, Real

import dask
import dask.array as da
import numpy as np
from dask import delayed
from scipy import sparse
from sklearn.base import BaseEstimator, clone
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import _quantizer
from ._base import BasePQNeighbors
from ._checks import (check_enough_points, check_graph_mode, check_n_neighbors,
                      check_self_query, checked_remove_ids)
from ._placement import _on, _places, _query_places, _workers
from ._filter import check_filter
from ._routing import runs, train_centroids, visits
from ._segments import drop_self, merge_topk
from ._sharded_io import _persist, load_shards, save_shards
from ._sharded_ops import (TuneView, appended_shard, chunk_bounds, global_ids,
                           graph_block, local_filters, mark_empty, merge_radius,
                           merged_finished, radius_shard, removed_shard, route_rows,
                           routed_rows, rows_of, search_shard, self_queries, take_rows,
                           to_global)
from ._utils import Progress

__all__ = ["ShardedNeighbors"]

# -- tasks (run on the workers) ----------------------------------------------
# They use the estimators through the shard protocol of BasePQNeighbors
# (its ``_shard_*`` methods) only.

def _checked_sample(est, chunk, rows):
    """Validate a chunk of ``fit`` input as ``fit`` does (its errors), and
    return its rows ``rows`` (the chunk's part of the training sample).
    ``est`` is None when the client validated the input already."""
    if est is not None:
        clone(est)._shard_rows(chunk)
    return np.asarray(chunk[rows])


def _checked_rows(template, chunk):
    """Validate a chunk of ``partial_fit`` input against the trained index."""
    template._shard_rows(chunk)
    return chunk.shape[0]


def _train(est, train_n_jobs, n_rows, *parts, routes=None):
    """Train the quantizers on the sample rows (drawn from ``n_rows``);
    return their trained state (and ``routes=(n_shards, seed)``: the
    routing centroids of the sample, prepared as queries).

    The trainer runs with ``n_jobs=train_n_jobs`` (None: every CPU of this
    worker's machine, as the other workers wait for this task), and trains
    only: the sample's rows are not indexed (the shards index every row)."""
    parts = [p for p in parts if p.shape[0]]
    sample = np.concatenate(parts) if len(parts) > 1 else parts[0]
    state = est._shard_train(sample, n_rows, train_n_jobs)
    if routes is None:
        return state
    prepared = clone(est)._shard_from_quantizers(state)._shard_prepare_queries(sample)
    return state, train_centroids(prepared, routes[0], check_random_state(routes[1]))


def _rebuilt(quantizers):
    """The template (an index holding the trained quantizers and no row)
    from (unfitted estimator, trained state): what the graph carries, as
    derived tables (IVF list terms) are bigger than the state."""
    est, state = quantizers
    return clone(est)._shard_from_quantizers(state)


def _build_shard(template, seed, *chunks):
    """A shard: the rows of ``chunks`` indexed with the template's quantizers
    (local ids 0, 1, ...).  ``seed`` fixes the shard's own randomness (HNSW
    levels), so that a rebuild after a lost worker gives the same shard."""
    shard = clone(template).set_params(random_state=seed)
    return shard._shard_from_quantizers(template._shard_quantizers(),
                                        rows_of(chunks) if chunks else None)


def _prepared(template, block):
    return template._shard_prepare_queries(block)


def _merged(n_neighbors, *parts):
    return merge_topk(list(parts), n_neighbors)


# -- client side ---------------------------------------------------------------

def _literal(value, what):
    """``value`` as a dask graph node of its own, under a fresh key (no
    hashing of big arrays).  Its data is part of the graph: dask can
    recompute whatever depends on it."""
    return delayed(value, name=f"pqsk-{what}-{uuid.uuid4().hex}", traverse=False)


class ShardedNeighbors(BaseEstimator):
    """A pqsk neighbours index split into shards held by dask workers.

    A meta-estimator around a pqsk neighbours estimator
    (:class:`~pqsk.IVFPQNeighbors`, :class:`~pqsk.HNSWPQNeighbors` or
    :class:`~pqsk.PQNeighbors`).  ``fit`` trains the quantizers once, on a
    sample drawn across the chunks of X, then builds one shard per chunk
    (or per group of chunks) on the workers, every shard an index of that
    class using the same quantizers.  Queries go to every shard (or, with
    ``partition="kmeans"``, to the shards near them); each returns its top
    k, and the answers are merged into the global top k with global ids
    (row numbers of the fit data, then of ``partial_fit``).

    With the same quantizers, an inverted file probes the same lists in
    every shard: sharded :class:`~pqsk.IVFPQNeighbors` and
    :class:`~pqsk.PQNeighbors` (with ``refine_factor=0``) return the
    answers of one index of all the rows built with those quantizers, ties
    aside, except for queries whose ``n_probe`` lists hold fewer than k
    rows in some shard: that shard fills its top k from the next lists, so
    the answer can only be closer.

    It runs on the current ``dask.distributed`` client, or on dask's local
    scheduler when there is none.  A worker lost between or during queries
    costs no answer: dask rebuilds its shards from the tasks that made them.

    Parameters
    ----------
    estimator : pqsk neighbours estimator
        The template: its parameters build every shard.  Search parameters
        (``n_neighbors``, ``n_probe``, ``ef_search``, ``refine_factor``,
        ``n_jobs``, ``mode``) are read from it at every call, so
        ``set_params(estimator__n_probe=16)`` applies to the next query
        without rebuilding anything.
    n_shards : int, default=None
        Number of shards.  None: one shard per chunk of X (a NumPy X is
        split into one chunk per worker), and ``partial_fit`` adds a shard
        per chunk.  An int: the chunks are grouped (or split) into that many
        shards of consecutive rows, and ``partial_fit`` appends its chunks
        to the smallest shards.  With ``partition="kmeans"``: the number of
        regions (None: one per worker).
    train_n_jobs : int, default=None
        Threads of the task that trains the quantizers (the other workers
        wait for it): the estimator's ``n_jobs`` during training only, on
        the worker that runs it.  None: every CPU of that worker's machine;
        ``-1`` likewise, ``-2`` all but one, and so on.  The trained
        quantizers do not depend on it: the codebooks' sub-spaces are
        trained side by side, one thread each; the coarse k-means runs in
        fixed tasks side by side, adding their sums in task order (from
        sample rows x ``n_lists`` = ``2**24`` on, e.g. 256 lists; below,
        it is a KMeans on one thread, the serial part of the build, see
        the user guide's cost model).
    partition : {"rows", "kmeans"}, default="rows"
        How ``fit`` splits the rows.  ``"rows"``: by row number (chunks),
        and every query searches every shard.  ``"kmeans"``: by region, a
        row going to the shard of its nearest of ``n_shards`` centroids
        (k-means on the training sample, squared L2 between rows prepared as
        queries, e.g. unit rows for cosine, plus a bias per centroid that
        makes the shards about equal; ``partial_fit`` routes its rows the
        same way), and a query searches only the shards near it (see
        ``probe_margin``), queries that visit a shard travelling to it as
        one batch.  With HNSW, whose beam costs nearly as much on a shard
        as on the whole graph, this is what makes shards answer more
        queries per second than one index; neighbours across a region's
        border are found only when the query visits both sides.  Filtered,
        ``X=None`` and radius queries still search every shard.  Not for
        ``metric="dot"``.  Read at ``fit``.
    probe_margin : float, default=0.05
        With ``partition="kmeans"``: a query visits its own region's shard
        and every shard whose (biased) squared distance is at most
        ``probe_margin * shard_scale_`` larger, and more, nearest first,
        while those hold fewer than ``n_neighbors`` live rows.  0: one
        shard per query; larger: more shards, higher recall, fewer queries
        per second.  Read at every query.

    Attributes
    ----------
    template_ : pqsk neighbours estimator
        A fitted index of ``estimator``'s class holding the trained
        quantizers (coarse centroids, codebooks, rotation) and no row.
    shards_ : list of dask.delayed.Delayed
        The shards: persisted results (futures on a distributed cluster).
    n_samples_fit_ : int
        Ids given so far (removed ones included).
    n_removed_ : int
        Ids removed.
    n_features_in_ : int
        Width of the indexed vectors.
    shard_centroids_ : ndarray of shape (n_shards, n_features) or None
        The routing centroids (float64, in the space of prepared queries)
        with ``partition="kmeans"``; None otherwise.
    shard_bias_ : ndarray of shape (n_shards,) or None
        Added to a row's squared distances to the centroids before the
        nearest is taken: evens out the shards' sizes.
    shard_scale_ : float or None
        The mean (biased) squared distance of a training row to its
        shard's centroid: the unit of ``probe_margin``.

    Examples
    --------
    >>> import numpy as np
    >>> from pqsk import IVFPQNeighbors
    >>> from pqsk.dask import ShardedNeighbors
    >>> X = np.random.RandomState(0).rand(2000, 8).astype(np.float32)
    >>> index = ShardedNeighbors(
    ...     IVFPQNeighbors(n_lists=8, n_probe=8, n_subspaces=4, n_codewords=16,
    ...                    random_state=0), n_shards=2).fit(X)
    >>> len(index.shards_), index.shard_sizes_
    (2, [1000, 1000])
    >>> dist, ind = index.kneighbors(X[:3], n_neighbors=2)
    >>> ind.shape
    (3, 2)
    """

    _parameter_constraints = {
        "estimator": [HasMethods(["fit", "kneighbors"])],
        "n_shards": [Interval(Integral, 1, None, closed="left"), None],
        "train_n_jobs": [Interval(Integral, 1, None, closed="left"),
                         Interval(Integral, None, -1, closed="right"), None],
        "partition": [StrOptions({"rows", "kmeans"})],
        "probe_margin": [Interval(Real, 0, None, closed="left")],
    }

    def __init__(self, estimator, *, n_shards=None, train_n_jobs=None, partition="rows",
                 probe_margin=0.05):
        self.estimator = estimator
        self.n_shards = n_shards
        self.train_n_jobs = train_n_jobs
        self.partition = partition
        self.probe_margin = probe_margin

    # -- input -------------------------------------------------------------
    def _check_estimator(self):
        self._validate_params()
        if not isinstance(self.estimator, BasePQNeighbors):
            raise TypeError(
                "estimator must be a pqsk neighbours estimator (PQNeighbors, "
                f"IVFPQNeighbors, HNSWPQNeighbors), got {type(self.estimator).__name__}.")
        if self.partition == "kmeans" and self.estimator._param_metric() == "dot":
            raise ValueError("partition='kmeans' routes by L2 distance and does not "
                             "apply to metric='dot'; use partition='rows'.")

    def _chunked(self, X, validator):
        """X as a list of row chunks (delayed, or dask keys) and their
        lengths.  A NumPy array is validated here (``validator``: its
        errors before any task); a dask array is checked for its width and
        dtype here, for NaN and range by a task per chunk."""
        if isinstance(X, da.Array):
            if X.ndim != 2:
                validator(np.zeros((1,) * X.ndim, X.dtype))  # the estimator's error
            if any(np.isnan(c) for c in X.chunks[0]):
                raise ValueError("X has chunks of unknown size; call "
                                 "X.compute_chunk_sizes() first.")
            validator(np.zeros((1, X.shape[1]), X.dtype))  # width and dtype
            X = X.rechunk({1: -1})
            return list(X.to_delayed()[:, 0]), list(X.chunks[0]), True
        X = validator(X)
        n = X.shape[0]
        pieces = self.n_shards or max(1, len(_workers()) or 1)
        bounds = np.linspace(0, n, min(pieces, n) + 1).astype(np.int64)
        chunks = [_literal(X[a:b], "rows") for a, b in zip(bounds[:-1], bounds[1:])]
        return chunks, list(np.diff(bounds)), False

    # -- fit -----------------------------------------------------------------
    def fit(self, X, y=None):
        """Train the quantizers on a sample of X, then build the shards.

        The sample is the rows a single fit of X draws (same random_state);
        for :class:`~pqsk.IVFPQNeighbors` with an integer random_state the
        training then repeats that fit's, so the quantizers, hence the
        answers, are those of ``estimator.fit(X)``.

        Parameters
        ----------
        X : dask.array.Array or array-like of shape (n_samples, n_features)
            Vectors to index; row i gets id i.  A dask array's chunks of
            rows become the shards (or groups of them, see ``n_shards``),
            built on the workers that hold them.
        y : ignored

        Returns
        -------
        self : object
        """
        self._check_estimator()
        est = clone(self.estimator)
        progress = Progress(est.verbose, type(self).__name__)

        def validate(A):
            return clone(est)._shard_rows(A)

        chunks, lengths, lazy = self._chunked(X, validate)
        n = int(sum(lengths))
        if n == 0:
            validate(np.zeros((0, 1)))  # the estimator's "0 sample(s)" error
        est.set_params(**est._shard_params(n))  # as a single index of n rows
        rng = check_random_state(est.random_state)
        n_sample = est._shard_sample_size(n)
        # The rows a single index of X would train on (the same draw); the
        # IVF trainer repeats the draw to continue the same random stream:
        # with an integer random_state its quantizers are those of
        # ``est.fit(X)``.
        rows = _quantizer.sample_rows(n, n_sample, rng)
        rows = np.arange(n) if rows is None else rows
        bounds = chunk_bounds(lengths)
        parts = []
        for i, c in enumerate(chunks):
            a, b = np.searchsorted(rows, bounds[i:i + 2])
            if lazy or b > a:  # dask chunks are all validated
                parts.append(delayed(_checked_sample)(est if lazy else None, c,
                                                      rows[a:b] - bounds[i]))
        progress(f"training the quantizers on {n_sample} of {n} rows, drawn from "
                 f"{len(chunks)} chunk(s)")
        routed = self.partition == "kmeans"
        routes = (self.n_shards or max(1, len(_workers())),
                  int(rng.randint(2**31 - 1))) if routed else None
        # The sample goes from the chunks' workers to the training task,
        # never through the client; every chunk is checked before it ends.
        trained = dask.compute(delayed(_train)(est, self.train_n_jobs, n, *parts,
                                               routes=routes))[0]
        trained, routing = trained if routed else (trained, None)
        template = clone(est)._shard_from_quantizers(trained)
        tpl = self._template_node(template)
        if routed:  # each region's rows: (piece of a chunk, rows, global ids)
            groups = self._regions(tpl, routing, chunks, bounds)
            pieces = [[(p, len(ids)) for p, ids in g] for g in groups]
            ids = [np.concatenate([i for _, i in g] or [np.empty(0, np.int64)])
                   for g in groups]
        else:
            groups = self._groups(lengths)
            pieces = [[(chunks[i], lengths[i]) for i in g] for g in groups]
            ids = [np.arange(bounds[g[0]], bounds[g[-1] + 1]) for g in groups]
        seeds = rng.randint(np.iinfo(np.int32).max, size=len(groups))
        shards = []
        for g, seed, place in zip(pieces, seeds, _places(pieces)):
            with _on(place):
                shards.append(delayed(_build_shard)(tpl, int(seed), *[c for c, _ in g]))
        ranges = [runs(i) for i in ids]
        progress(f"building {len(shards)} shard(s)")
        self.shards_ = _persist(shards)
        self.template_ = template
        self.n_features_in_ = template.n_features_in_
        if hasattr(template, "feature_names_in_"):
            self.feature_names_in_ = template.feature_names_in_
        self.n_samples_fit_ = n
        self.n_removed_ = 0
        self._set_routing(routing)
        self._ranges = ranges
        self._live = [int(r[:, 2].sum()) for r in ranges]
        self._removed = np.zeros(n, bool)
        self._token = uuid.uuid4().hex
        progress(f"{len(shards)} shard(s) built")
        return self

    def _groups(self, lengths):
        """Chunk numbers of each shard: one chunk each, or ``n_shards``
        groups of consecutive chunks of about equal rows."""
        k = len(lengths)
        if self.n_shards is None or self.n_shards >= k:
            return [[i] for i in range(k)]
        cum = np.cumsum(lengths)
        cut = np.searchsorted(cum, cum[-1] * np.arange(1, self.n_shards) / self.n_shards)
        edges = np.unique(np.concatenate([[0], np.minimum(cut + 1, k), [k]]))
        return [list(range(a, b)) for a, b in zip(edges[:-1], edges[1:])]

    def _regions(self, tpl, routing, chunks, bounds):
        """Per region: (piece of a chunk, its global ids) of the rows of
        ``chunks`` (first global ids ``bounds``) routed to it."""
        # The labels stay on the chunks' workers (the pieces are cut there);
        # the client gets a copy (a byte per row) for the id ranges.
        held = _persist([delayed(route_rows)(tpl, routing, c) for c in chunks])
        out = [[] for _ in range(routing[0].shape[0])]
        for c, h, lab, start in zip(chunks, held, dask.compute(*held), bounds):
            for j in np.unique(lab):
                out[j].append((delayed(take_rows)(c, h, j),
                               np.flatnonzero(lab == j) + start))
        return out

    def partial_fit(self, X, y=None):
        """Index more rows with the trained quantizers (no retraining).

        New rows get ids ``n_samples_fit_``, ``n_samples_fit_ + 1``, ...
        Each chunk becomes a new shard (``n_shards=None``, or fewer shards
        than ``n_shards``), or is appended to the smallest shard; with
        ``partition="kmeans"``, each row is appended to the shard of its
        nearest routing centroid.  An unfitted estimator is fitted on X
        instead.

        Parameters
        ----------
        X : dask.array.Array or array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self : object
        """
        if not hasattr(self, "template_"):
            return self.fit(X)
        self._check_estimator()
        template = self.template_
        chunks, lengths, lazy = self._chunked(
            X, template._shard_rows)
        tpl = self._template_node(template)
        if lazy:  # NaN and range, before any shard changes
            dask.compute(*[delayed(_checked_rows)(tpl, c) for c in chunks])
        bounds = chunk_bounds(lengths) + self.n_samples_fit_
        shards, ranges, live = list(self.shards_), list(self._ranges), list(self._live)
        changed = {}
        rng = check_random_state(self._seed())
        if self._routing() is not None:
            for j, g in enumerate(self._regions(tpl, self._routing(), chunks, bounds)):
                if g:
                    shards[j] = delayed(appended_shard)(shards[j], *[p for p, _ in g])
                    local = int(ranges[j][-1, 0] + ranges[j][-1, 2]) if len(ranges[j]) else 0
                    ranges[j] = np.vstack([ranges[j], runs(np.concatenate(
                        [i for _, i in g]), local)])
                    live[j] += sum(len(i) for _, i in g)
                    changed[j] = True
            chunks = []
        for i, c in enumerate(chunks):
            m = int(lengths[i])
            if m == 0:
                continue
            if self.n_shards is None or len(shards) < self.n_shards:
                with _on(_places([[(c, m)]], self.shards_)[0]):
                    shards.append(delayed(_build_shard)(tpl, int(rng.randint(2**31 - 1)),
                                                        c))
                ranges.append(np.array([[0, bounds[i], m]], np.int64))
                live.append(m)
                changed[len(shards) - 1] = True
                continue
            j = int(np.argmin(live))
            local = int(ranges[j][-1, 0] + ranges[j][-1, 2])
            shards[j] = delayed(appended_shard)(shards[j], c)
            ranges[j] = np.vstack([ranges[j], [[local, bounds[i], m]]])
            live[j] += m
            changed[j] = True
        done = _persist([shards[j] for j in changed])
        for j, s in zip(changed, done):
            shards[j] = s
        n_new = int(sum(lengths))
        self.shards_, self._ranges, self._live = shards, ranges, live
        self._removed = np.concatenate([self._removed, np.zeros(n_new, bool)])
        self.n_samples_fit_ += n_new
        return self

    @staticmethod
    def _template_node(template):
        """The template as a node of the task graph (rebuilt on a worker
        from the trained state)."""
        return delayed(_rebuilt)(_literal((clone(template), template._shard_quantizers()),
                                          "quantizers"))

    def _seed(self):
        """Seed of the new shards' seeds: fixed by the estimator's
        ``random_state`` and the ids given so far, if any is fixed."""
        rs = self.estimator.random_state
        if rs is None:
            return None
        return (check_random_state(rs).randint(2**31 - 1) + self.n_samples_fit_) % 2**31

    # -- remove ----------------------------------------------------------------
    def remove(self, ids):
        """Remove indexed vectors by global id; each shard removes its own.

        Errors (ids not integers, duplicated, out of range, already
        removed) are those of the single-machine estimators, raised before
        any shard changes.

        Parameters
        ----------
        ids : array-like of int

        Returns
        -------
        self : object
        """
        check_is_fitted(self)
        if not hasattr(self.template_, "remove"):
            raise AttributeError(f"{type(self.template_).__name__} indexes have no remove; "
                                 "use IVFPQNeighbors or HNSWPQNeighbors.")
        ids = checked_remove_ids(ids)
        if ids.size == 0:
            return self
        n = self.n_samples_fit_
        if ids.min() < 0 or ids.max() >= n:
            raise ValueError(f"ids must lie in [0, {n}), got values in "
                             f"[{ids.min()}, {ids.max()}].")
        if self._removed[ids].any():
            raise ValueError(f"ids {ids[self._removed[ids]][:10].tolist()} were already "
                             "removed.")
        shard, local = self._route(ids)
        shards, live = list(self.shards_), list(self._live)
        changed = {}
        for j in np.unique(shard):
            mine = local[shard == j]
            changed[j] = delayed(removed_shard)(shards[j], mine)
            live[j] -= mine.size
        for j, s in zip(changed, _persist(list(changed.values()))):
            shards[j] = s
        self._removed[ids] = True
        self.shards_, self._live = shards, live
        self.n_removed_ += int(ids.size)
        return self

    def _route(self, ids):
        """(shard number, local id) of each global id."""
        table = np.vstack([np.column_stack([r, np.full(len(r), j)])
                           for j, r in enumerate(self._ranges)])
        table = table[np.argsort(table[:, 1])]
        r = np.searchsorted(table[:, 1], ids, side="right") - 1
        return table[r, 3], ids - table[r, 1] + table[r, 0]

    # -- queries -----------------------------------------------------------------
    def _search_params(self):
        """The search parameters to send with a query, validated here (with
        the single-machine errors), and a view of the template having them."""
        self._validate_params()  # probe_margin, read at every query
        view = self.template_._shard_with_params(**{
            k: v for k, v in self.estimator.get_params(deep=False).items()
            if k != "random_state"})
        return view._shard_search_params(), view

    def _n_neighbors(self, n_neighbors, view, n_queries, query_is_train):
        if n_neighbors is None:
            n_neighbors = view.n_neighbors
        n_neighbors = check_n_neighbors(n_neighbors)
        if query_is_train:
            check_self_query(self.n_removed_, "kneighbors")
        check_enough_points(n_neighbors, self.n_samples_fit_ - self.n_removed_, n_queries,
                            query_is_train)
        return n_neighbors

    def _set_routing(self, routing):
        self.shard_centroids_, self.shard_bias_, self.shard_scale_ = routing or (None,) * 3

    def _routing(self):
        """(centroids, bias, scale) of ``partition="kmeans"``, or None."""
        if getattr(self, "shard_centroids_", None) is None:
            return None
        return self.shard_centroids_, self.shard_bias_, self.shard_scale_

    def _visits(self, Q, n_neighbors, flt):
        """The shards each prepared query visits (boolean (n_queries,
        n_shards), a delayed one for a delayed Q), or None: every shard
        (partition by rows; filtered queries)."""
        if self._routing() is None or flt is not None:
            return None
        args = (self._routing(), self.probe_margin, self._live, n_neighbors)
        if isinstance(Q, np.ndarray):
            return visits(Q, *args)
        return delayed(visits)(Q, *args)

    def _ranges_nodes(self):
        """Each shard's id ranges as its query tasks get them: the array when
        small, else a node persisted once next to the shard (a shard by
        region has megabytes of ranges, too many to send with each query)."""
        cache = self.__dict__.setdefault("_ranges_cache", {})
        out = []
        for j, (s, r) in enumerate(zip(self.shards_, self._ranges)):
            if len(r) <= 64:
                out.append(r)
                continue
            if cache.get(j, (None,))[0] is not r:
                with _on(_query_places([s])[0]):
                    cache[j] = (r, _persist([_literal(r, "ranges")])[0])
            out.append(cache[j][1])
        return out

    def _fan_out(self, Q, n_neighbors, params, flt=None, rows=None, visit=None,
                 local=False):
        """(shard number, delayed (raw dist, global ids)) of each shard
        searched for the prepared Q, the whole batch in one task per shard;
        ``flt``: the validated filter (global ids), of the queries ``rows``
        for a per-query one; ``visit``: see ``_visits`` (a shard then gets
        only its queries, and answers empty slots for the others);
        ``local``: local ids instead (the caller maps them)."""
        filters = local_filters(flt, self._ranges, rows)
        ranges = [None] * len(self.shards_) if local else self._ranges_nodes()
        parts = []
        for j, (s, live, r, f, w) in enumerate(zip(self.shards_, self._live, ranges,
                                                   filters, _query_places(self.shards_))):
            mine = None
            if isinstance(visit, np.ndarray):
                mine = np.flatnonzero(visit[:, j])
                if not mine.size:
                    continue
            elif visit is not None:
                mine = delayed(routed_rows)(visit, j)
            if live:
                with _on(w):
                    parts.append((j, delayed(search_shard)(s, Q, min(n_neighbors, live),
                                                           params, r, f, mine)))
        return parts

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True, *, filter=None):
        """Find the (approximate) K-neighbors of points, on every shard.

        Each shard returns its top ``n_neighbors``; they are merged into the
        global top ``n_neighbors``.  Latency: the slowest shard plus the
        merge.  The queries go to each shard as one batch (one task per
        shard, per block of a dask array).

        Parameters
        ----------
        X : array-like or dask.array.Array of shape (n_queries, n_features), \
                default=None
            Query points.  A NumPy array gives NumPy answers; a dask array
            gives dask arrays, computed lazily, block by block.  None: the
            neighbours of each indexed point, itself excluded (NumPy).
        n_neighbors : int, default=None
            The estimator's ``n_neighbors`` if None.
        return_distance : bool, default=True
        filter : array-like or sparse matrix, default=None
            The global ids each query may return, in any form the wrapped
            estimator's ``kneighbors`` takes (a boolean mask of shape
            ``(n_samples_fit_,)``, allowed ids, a sparse matrix of shape
            ``(n_queries, n_samples_fit_)``), validated on the client with the same
            errors; each shard gets its part in its local ids and applies
            it inside its kernels.  Rows with fewer allowed ids than
            ``n_neighbors`` end with id -1 at distance +inf.

        Returns
        -------
        neigh_dist : ndarray or dask array of shape (n_queries, n_neighbors)
            Only if ``return_distance``.
        neigh_ind : ndarray or dask array of shape (n_queries, n_neighbors), int64
            Global ids, sorted by distance, ties broken by the smaller id.
        """
        check_is_fitted(self)
        params, view = self._search_params()
        template = self.template_
        if X is None:
            dist, ind = self._kneighbors_self(n_neighbors, view, params, filter)
        elif isinstance(X, da.Array):
            if X.ndim == 2 and any(np.isnan(c) for c in X.chunks[0]):
                raise ValueError("X has chunks of unknown size; call "
                                 "X.compute_chunk_sizes() first.")
            # Width, dimensions and dtype: the estimator's errors, here.
            template._shard_prepare_queries(np.zeros((1,) * (X.ndim - 1) + X.shape[1:],
                                                     X.dtype))
            flt = check_filter(filter, self.n_samples_fit_, X.shape[0])
            k = self._n_neighbors(n_neighbors, view, X.shape[0], False)
            X = X.rechunk({1: -1})
            tpl = self._template_node(template)
            dists, inds = [], []
            start = 0
            for block, nb in zip(X.to_delayed()[:, 0], X.chunks[0]):
                Q = delayed(_prepared)(tpl, block)
                parts = self._fan_out(Q, k, params, flt, slice(start, start + nb),
                                      self._visits(Q, k, flt))
                d, i = delayed(merged_finished, nout=2)(tpl, k, flt is not None,
                                                        *[p for _, p in parts])
                dists.append(da.from_delayed(d, (nb, k), dtype=template._shard_dtype()))
                inds.append(da.from_delayed(i, (nb, k), dtype=np.int64))
                start += nb
            dist, ind = da.concatenate(dists), da.concatenate(inds)
            return (dist, ind) if return_distance else ind
        else:
            Q = template._shard_prepare_queries(X)
            flt = check_filter(filter, self.n_samples_fit_, Q.shape[0])
            k = self._n_neighbors(n_neighbors, view, Q.shape[0], False)
            # The shards' answers (local ids) come straight back and are
            # mapped and merged here: a merge task would add a transfer
            # between workers to the call.
            parts = self._fan_out(Q, k, params, flt, visit=self._visits(Q, k, flt),
                                  local=True)
            got = dask.compute(*[p for _, p in parts], optimize_graph=False)  # placed
            dist, ind = merge_topk([(d, to_global(i, self._ranges[j]))
                                    for (j, _), (d, i) in zip(parts, got)], k)
            if flt is not None:
                mark_empty(dist, ind)
            dist = template._shard_finish(dist)
        return (dist, ind) if return_distance else ind

    def _kneighbors_self(self, n_neighbors, view, params, filter=None):
        n = self.n_samples_fit_
        flt = check_filter(filter, n, n)
        k = self._n_neighbors(n_neighbors, view, n, True) + 1
        merged = []
        for s, r in zip(self.shards_, self._ranges):
            if not len(r):  # an empty region
                continue
            ids_q = delayed(self_queries, nout=2)(s, r)
            rows = global_ids(r)  # its queries' ids
            merged.append((ids_q[0], delayed(_merged)(
                k, *[p for _, p in self._fan_out(ids_q[1], k, params, flt, rows)])))
        dist = np.empty((n, k), self.template_._shard_dtype())
        ind = np.empty((n, k), np.int64)
        for ids, (d, i) in dask.compute(*merged, optimize_graph=False):
            dist[ids], ind[ids] = d, i
        if flt is not None:
            mark_empty(dist, ind)
        dist, ind = drop_self(dist, ind, flt)
        return self.template_._shard_finish(dist), ind

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity", *,
                         filter=None):
        """The (weighted) graph of k-neighbors of the query points.

        Parameters
        ----------
        X : array-like or dask.array.Array of shape (n_queries, n_features), \
                default=None
        n_neighbors : int, default=None
        mode : {"connectivity", "distance"}, default="connectivity"
        filter : array-like or sparse matrix, default=None
            As in :meth:`kneighbors`; a row whose query has fewer than
            ``n_neighbors`` allowed ids holds only those.

        Returns
        -------
        A : sparse matrix of shape (n_queries, ``n_samples_fit_``), CSR
            For a dask array X, a dask array whose blocks are CSR matrices.
        """
        check_is_fitted(self)
        check_graph_mode(mode)
        dist, ind = self.kneighbors(X, n_neighbors, return_distance=True, filter=filter)
        n_fit = self.n_samples_fit_
        if isinstance(ind, da.Array):
            return da.map_blocks(graph_block, ind, dist, n_fit, mode,
                                 chunks=(ind.chunks[0], (n_fit,)), dtype=np.float64,
                                 meta=sparse.csr_matrix((0, 0)))
        return graph_block(ind, dist, n_fit, mode)

    def radius_neighbors(self, X=None, radius=None, return_distance=True,
                         sort_results=False, *, filter=None):
        """The (approximate) neighbours within ``radius`` of points, on
        every shard: each shard returns its points within ``radius``
        (as the wrapped estimator's ``radius_neighbors`` finds them, the
        queries one batch per shard), merged and sorted by (distance, id).

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            Query points (NumPy); None: the indexed points, each point
            excluded from its own neighbours.
        radius : float, default=None
            The estimator's ``radius`` if None.
        return_distance : bool, default=True
        sort_results : bool, default=False
            Accepted for scikit-learn's API; results are always sorted.
        filter : array-like or sparse matrix, default=None
            The global ids each query may return, as in :meth:`kneighbors`.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries,), dtype=object
            Arrays of distances; only if ``return_distance``.
        neigh_ind : ndarray of shape (n_queries,), dtype=object
            Arrays of int64 global ids.
        """
        check_is_fitted(self)
        params, view = self._search_params()
        radius = view._check_radius(radius)
        if sort_results and not return_distance:
            raise ValueError("return_distance must be True if sort_results is True.")
        if X is None:
            check_self_query(self.n_removed_, "radius_neighbors")
            blocks = [(delayed(self_queries, nout=2)(s, r)[1],
                       global_ids(r))
                      for s, r in zip(self.shards_, self._ranges) if len(r)]
            n = self.n_samples_fit_
        else:
            Q = self.template_._shard_prepare_queries(X)
            n = Q.shape[0]
            blocks = [(_literal(Q, "queries"), np.arange(n))]
        flt = check_filter(filter, self.n_samples_fit_, n)
        tasks = []
        for Qb, rows in blocks:
            filters = local_filters(flt, self._ranges, rows)
            tasks.append(delayed(merge_radius)([
                delayed(radius_shard)(s, Qb, radius, params, r, f)
                for s, r, f in zip(self.shards_, self._ranges, filters)],
                rows if X is None else None))
        dist, ind = np.empty(n, dtype=object), np.empty(n, dtype=object)
        for (Qb, rows), (d, i) in zip(blocks, dask.compute(*tasks)):
            dist[rows], ind[rows] = d, i
        return (dist, ind) if return_distance else ind

    def transform(self, X):
        """Sparse k-neighbors graph of X, as the wrapped estimator's
        ``transform`` (``n_neighbors + 1`` entries per row in
        ``mode="distance"``).

        Parameters
        ----------
        X : array-like or dask.array.Array of shape (n_queries, n_features)

        Returns
        -------
        Xt : sparse matrix of shape (n_queries, ``n_samples_fit_``), CSR
        """
        check_is_fitted(self)
        _, view = self._search_params()
        add_one = view.mode == "distance"
        return self.kneighbors_graph(X, n_neighbors=view.n_neighbors + add_one,
                                     mode=view.mode)

    @property
    def shard_sizes_(self):
        """Live (not removed) vectors of each shard (list of ints)."""
        check_is_fitted(self)
        return list(self._live)

    def _tune_view(self):
        """What :func:`pqsk.tune_search` tunes: this index as a whole
        (:class:`pqsk._sharded_ops.TuneView`; the chosen parameters are set
        on ``estimator``)."""
        check_is_fitted(self)
        return TuneView(self, lambda tasks: dask.compute(*[delayed(f)(*a) for f, *a in tasks]))

    # -- save / load -------------------------------------------------------------
    def save(self, path, *, overwrite=False, serve_saved=False):
        """Write every shard from its worker, and a manifest, under ``path``.

        ``path`` must be reachable by every worker under the same name: a
        shared file system on a multi-machine cluster, any local directory
        on a one-machine cluster.  The shards go to a new sub-directory,
        every file and directory is fsynced, and the manifest naming it is
        replaced last, atomically and durably (``pqsk._manifest``): a save
        interrupted at any point, or by a crash, leaves the previous index
        readable.  Saves to one path are serialised by a lock file; each
        removes the leftovers of interrupted ones.

        Parameters
        ----------
        path : str or os.PathLike
        overwrite : bool, default=False
            Replace a sharded index already saved at ``path``.
        serve_saved : bool, default=False
            Then serve the saved shards: each is read back, memory-mapped,
            by a worker (the in-memory copies are released), and a shard
            whose worker is lost is read again from ``path`` instead of
            being rebuilt from the fit data, as after :meth:`load`.

        Returns
        -------
        self : object
        """
        check_is_fitted(self)
        save_shards(self, path, overwrite, serve_saved)
        return self

    @classmethod
    def load(cls, path):
        """Reopen a sharded index saved with :meth:`save` on the current
        cluster: each shard is read by a task on a worker (and read again
        if that worker is lost).

        Parameters
        ----------
        path : str or os.PathLike

        Returns
        -------
        sharded : ShardedNeighbors
        """
        return load_shards(cls, path)
