"""Recall autotuner: the cheapest search setting that reaches a target recall.

:func:`tune_search` measures recall@k and query time of a fitted index
over a grid of its search-time parameters (``n_probe`` or ``ef_search``,
and ``refine_factor``), walking each from cheap to expensive, and sets the
fastest setting that reaches the target.  Search parameters change with
``set_params`` and no rebuild, so tuning costs a few hundred queries per
setting plus one exact search of the sample.
"""

import time
import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.utils import Bunch, check_array, check_random_state
from sklearn.utils.validation import check_is_fitted

from ._base import BasePQNeighbors
from ._store import chunk_slices, rows_per_chunk
from ._utils import Progress

# refine_factor values tried when the index keeps its raw vectors.
REFINE_FACTORS = (0, 2, 4, 8, 16)

# Each setting is timed at least n_repeats times, and more (at most
# MAX_RUNS) until the runs took MIN_SECONDS; the fastest run counts.
MIN_SECONDS = 0.05
MAX_RUNS = 20

# A row stops when a setting is slower than PRUNE times the fastest one
# already reaching the target (a margin for timing noise).
PRUNE = 1.5

# A row of the walk stops when its recall rose less than this over its last
# two steps (the codes' ceiling: more candidates no longer help).
PLATEAU = 0.002


def _knob(estimator):
    """(name, default values) of the estimator's candidate-count knob:
    ``n_probe`` for an inverted file, ``ef_search`` for a graph, none for
    an exhaustive scan (read from the parameters, so no estimator module
    is imported)."""
    params = estimator.get_params(deep=False)
    if "n_probe" in params:
        n = estimator.n_lists_
        return "n_probe", sorted({min(2**i, n) for i in range(n.bit_length() + 1)})
    if "ef_search" in params:
        return "ef_search", None  # depends on k: see _default_values
    return None, [None]


def _default_values(name, values, k, n_live):
    if name != "ef_search":
        return values
    out, v = [], k
    while v < n_live:
        out.append(v)
        v *= 2
    out.append(max(k, n_live))
    return out


def _row_source(estimator, X):
    """The indexed rows, id order, as an array-like, and its name: the raw
    vectors the index keeps, else X."""
    if estimator.vectors_ is not None:
        return estimator.vectors_
    if X is None:
        raise ValueError(
            "tune_search computes exact neighbours from the raw indexed vectors, which "
            "this index does not keep (refine_factor=0 at fit): pass X, the indexed "
            "rows in id order.")
    X = check_array(X, dtype=[np.float32, np.float64], order="C")
    expected = (estimator.n_samples_fit_, estimator.n_features_in_)
    if X.shape != expected:
        raise ValueError(f"X must hold the {expected[0]} indexed rows in id order "
                         f"({expected[1]} features), got shape {X.shape}.")
    return X


def _ranking(estimator, Q, rows):
    """(nq, n_rows) float64 ranking distances: squared L2 (every metric but
    "dot", on normalised rows for "cosine"), or minus the inner product."""
    Q = np.asarray(Q, dtype=np.float64)
    rows = np.asarray(estimator._prepare(np.asarray(rows)), dtype=np.float64)
    prod = Q @ rows.T
    if estimator._inner_product:
        return -prod
    prod *= -2
    prod += np.einsum("ij,ij->i", Q, Q)[:, None]
    prod += np.einsum("ij,ij->i", rows, rows)[None, :]
    return np.maximum(prod, 0, out=prod)


def _exact_neighbors(estimator, source, Q, k, self_ids, bar):
    """Ranking distances (nq, k) of each query's k exact nearest live
    indexed rows, ascending; ``self_ids`` (or None): each query's own id,
    left out."""
    n = estimator.n_samples_fit_
    removed = estimator.removed_
    nq = Q.shape[0]
    best_d = np.full((nq, 0), np.inf)
    best_i = np.zeros((nq, 0), dtype=np.int64)
    step = rows_per_chunk(estimator.n_features_in_ * 8)
    for sl in chunk_slices(n, step):
        d = _ranking(estimator, Q, source[sl])
        ids = np.arange(sl.start, sl.stop)
        if removed is not None:
            d[:, removed[sl]] = np.inf
        if self_ids is not None:
            mine = (self_ids >= sl.start) & (self_ids < sl.stop)
            d[np.flatnonzero(mine), self_ids[mine] - sl.start] = np.inf
        cat_d = np.concatenate([best_d, d], axis=1)
        cat_i = np.concatenate([best_i, np.broadcast_to(ids, d.shape)], axis=1)
        keep = min(k, cat_d.shape[1])
        part = np.argpartition(cat_d, keep - 1, axis=1)[:, :keep]
        best_d = np.take_along_axis(cat_d, part, axis=1)
        best_i = np.take_along_axis(cat_i, part, axis=1)
        bar.update(sl.stop - sl.start)
    return np.sort(best_d, axis=1)


def _recall(estimator, source, Q, found, kth):
    """Share of the found neighbours that are true k nearest: a found id
    counts when its exact distance is at most the k-th exact distance (so
    that ties, exact duplicates included, do not count as misses)."""
    nq, k = found.shape
    valid = (found >= 0) & (found < estimator.n_samples_fit_)
    ids = np.unique(found[valid])
    rows = source[ids] if isinstance(source, np.ndarray) else source.take(ids)
    rows = np.asarray(estimator._prepare(np.asarray(rows)), dtype=np.float64)
    # (nq, k, D) rows of the found ids; invalid slots read row 0, then fail.
    R = rows[np.searchsorted(ids, np.where(valid, found, ids[0] if ids.size else 0))]
    Q = np.asarray(Q, dtype=np.float64)
    if estimator._inner_product:
        d = -np.einsum("qkd,qd->qk", R, Q)
    else:
        diff = R - Q[:, None, :]
        d = np.einsum("qkd,qkd->qk", diff, diff)
    tol = 1e-7 * np.maximum(1.0, np.abs(kth))
    hits = valid & (d <= (kth + tol)[:, None])
    return int(np.count_nonzero(hits)) / (nq * k)


def _pareto(recall, times):
    """Points no other point beats on both recall (higher) and time (lower)."""
    out = np.ones(recall.shape[0], dtype=bool)
    for i in range(recall.shape[0]):
        better = (recall >= recall[i]) & (times <= times[i])
        strictly = (recall > recall[i]) | (times < times[i])
        out[i] = not np.any(better & strictly)
    return out


def tune_search(estimator, X_sample=None, target_recall=0.95, n_neighbors=10, *, X=None,
                n_queries=200, param_grid=None, n_repeats=3, random_state=None,
                verbose=0):
    """Set the cheapest search parameters that reach a target recall.

    Measures recall@``n_neighbors`` and the time of ``kneighbors`` on
    ``n_queries`` queries for settings of the estimator's search-time
    parameters, and sets the fastest one that reaches ``target_recall``
    (``set_params``: no rebuild).  Each knob is walked from cheap to
    expensive: for each ``refine_factor`` (0, 2, 4, 8, 16 when the index
    keeps its raw vectors, else 0), ``n_probe`` (:class:`IVFPQNeighbors`:
    1, 2, 4, ... ``n_lists_``) or ``ef_search`` (:class:`HNSWPQNeighbors`:
    ``n_neighbors``, twice that, ... the number of indexed points) grows
    until the target is reached, the setting is 1.5 times slower than the
    best one already reaching it, or recall stops improving (less than 0.002 over
    two steps).  :class:`PQNeighbors` has only ``refine_factor``.

    Ground truth: the exact ``n_neighbors`` nearest live indexed points of
    each query under the estimator's metric, by brute force over the raw
    indexed vectors: ``vectors_`` when the index keeps them (fitted with
    ``refine_factor > 0``), else ``X``.  A found neighbour counts as a hit
    when its exact distance is at most the k-th exact distance, so exact
    ties (duplicates) are not misses.

    Queries: ``n_queries`` rows drawn at random from ``X_sample``, held-out
    queries as the index will see them (if they are indexed points too,
    each is its own nearest neighbour in the truth as in the results).
    With ``X_sample=None`` they are indexed points themselves, tuned for
    ``kneighbors(X=None)`` and ``transform`` on the training data: each
    point is left out of its own truth, the search asks for
    ``n_neighbors + 1`` and drops the point itself (the first column when
    it is not found, as ``kneighbors(X=None)`` does).  Their raw vectors
    are the queries.

    Parameters
    ----------
    estimator : PQNeighbors, IVFPQNeighbors, HNSWPQNeighbors or ShardedNeighbors
        A fitted index; its search parameters are changed in place.  A
        :class:`pqsk.dask.ShardedNeighbors` is tuned as a whole: its
        ``kneighbors`` (every shard, the merge) is timed, the truth is
        computed on the workers, a task per shard, and the setting is set
        on its ``estimator`` (read by every shard at the next query).
    X_sample : array-like of shape (n_samples, n_features) or None, default=None
        Rows to draw the queries from; None draws indexed points (see
        above).
    target_recall : float in (0, 1], default=0.95
        Recall@``n_neighbors`` to reach on the queries.
    n_neighbors : int, default=10
        k of the recall; the estimator's own ``n_neighbors`` is not changed.
    X : array-like of shape (n_samples_fit, n_features), default=None
        The indexed rows in id order, needed when the index keeps no raw
        vectors (ignored otherwise).
    n_queries : int, default=200
        Queries measured (at most the available rows).  The recall is a
        mean over ``n_queries * n_neighbors`` neighbours: 200 x 10 gives
        about +-0.01.
    param_grid : dict, default=None
        Values to walk instead of the defaults, for ``"refine_factor"`` and
        ``"n_probe"`` / ``"ef_search"`` (each sorted ascending).
    n_repeats : int, default=3
        Each setting is timed at least this many times (and up to 20 times
        while the runs took less than 0.05 s in all); the fastest run
        counts.
    random_state : int, RandomState instance or None, default=None
        Draws the queries.
    verbose : int, default=0
        1: progress bars (exact search, settings); 2: a line per setting.

    Returns
    -------
    result : :class:`~sklearn.utils.Bunch`
        ``params`` (dict: the setting chosen and set), ``recall``,
        ``queries_per_second`` and ``time_per_query`` (seconds) of it,
        ``target_reached`` (bool), and ``frontier``: every setting
        measured, in order, as a dict of equal-length arrays
        (``pandas.DataFrame(result.frontier)`` makes a table): the
        parameters, ``"recall"``, ``"queries_per_second"``,
        ``"time_per_query"``, ``"measured_time_per_query"``,
        ``"reaches_target"``, and ``"pareto"`` (no other setting measured
        is both at least as fast and at least as accurate, and better in
        one).  Timing noise only adds time, and a setting is never dearer
        than one fetching more candidates (larger ``n_probe`` /
        ``ef_search`` and ``refine_factor``): ``time_per_query`` (and
        ``queries_per_second``) is the least measured time of the setting
        and of those; ``measured_time_per_query`` its own.  The choice
        uses ``time_per_query``.

    Warns
    -----
    UserWarning
        When no setting reaches the target: the one with the highest
        recall (the fastest of equals) is set.

    Examples
    --------
    >>> import numpy as np
    >>> from pqsk import IVFPQNeighbors, tune_search
    >>> rng = np.random.RandomState(0)
    >>> X = rng.rand(3000, 16).astype(np.float32)
    >>> nn = IVFPQNeighbors(n_lists=16, n_subspaces=4, n_codewords=16,
    ...                     refine_factor=8, random_state=0).fit(X)
    >>> result = tune_search(nn, X[:300] + 0.01, target_recall=0.9,
    ...                      n_neighbors=5, n_queries=100, random_state=0)
    >>> result.target_reached, result.recall >= 0.9
    (True, True)
    >>> nn.n_probe == result.params["n_probe"]
    True
    """
    if hasattr(type(estimator), "_tune_view"):  # pqsk.dask.ShardedNeighbors, as a whole
        estimator = estimator._tune_view()
    k = _check_args(estimator, target_recall, n_neighbors, n_queries, n_repeats)
    progress = Progress(verbose, "tune_search")
    rng = check_random_state(random_state)
    source = _row_source(estimator, X)
    own = X_sample is None
    kq = k + own  # neighbours asked for: the point itself too
    knob, refine, values = _grid(estimator, param_grid, kq)
    Q_raw, self_ids = _queries(estimator, source, X_sample, n_queries, k, rng)
    Q = estimator._prepare(Q_raw)  # normalised for cosine, as the index does
    # A sharded index computes the exact neighbours of its rows on the workers.
    exact = getattr(estimator, "_tune_exact", None) if source is estimator.vectors_ else None
    with progress.bar(estimator.n_samples_fit_, "exact neighbours", unit="vectors") as bar:
        kth = (_exact_neighbors(estimator, source, Q, k, self_ids, bar) if exact is None
               else exact(Q, k, self_ids))[:, k - 1]

    def measure():
        found, best = _timed_search(estimator, Q_raw, kq, n_repeats)
        if own:  # drop the point itself, else the first column (kneighbors(X=None))
            mask = found != self_ids[:, None]
            mask[np.all(mask, axis=1), 0] = False
            found = found[mask].reshape(found.shape[0], k)
        return _recall(estimator, source, Q, found, kth), best / Q.shape[0]

    rows = _walk(estimator, knob, refine, values, kq, target_recall, measure, progress)
    recall, times, measured = _times(rows, knob)
    reaches = recall >= target_recall
    pick = _choose(rows, recall, times, reaches, target_recall)
    params = dict(rows[pick][0])
    estimator.set_params(**params)
    frontier = {}
    if knob is not None:
        frontier[knob] = np.array([p[knob] for p, _, _ in rows])
    frontier["refine_factor"] = np.array([p["refine_factor"] for p, _, _ in rows])
    frontier.update(recall=recall, queries_per_second=1 / times, time_per_query=times,
                    measured_time_per_query=measured, reaches_target=reaches,
                    pareto=_pareto(recall, times))
    progress(f"chose {params}: recall {recall[pick]:.3f}, {1 / times[pick]:,.0f} q/s")
    return Bunch(params=params, recall=float(recall[pick]),
                 queries_per_second=float(1 / times[pick]),
                 time_per_query=float(times[pick]), target_reached=bool(reaches[pick]),
                 frontier=frontier)


def _check_args(estimator, target_recall, n_neighbors, n_queries, n_repeats):
    """Validate tune_search's arguments; returns k (int)."""
    if not isinstance(estimator, BasePQNeighbors) and not hasattr(estimator,
                                                                  "_is_tune_view"):
        raise TypeError("tune_search tunes a PQNeighbors, IVFPQNeighbors, "
                        "HNSWPQNeighbors or pqsk.dask.ShardedNeighbors, got "
                        f"{type(estimator).__name__}.")
    if isinstance(estimator, BasePQNeighbors):  # a sharded view comes fitted
        check_is_fitted(estimator)
    if (isinstance(target_recall, bool) or not isinstance(target_recall, Real)
            or not 0 < target_recall <= 1):
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall!r}.")
    for name, value in (("n_neighbors", n_neighbors), ("n_queries", n_queries),
                        ("n_repeats", n_repeats)):
        if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}.")
    k = int(n_neighbors)
    if k > estimator._n_live:
        raise ValueError(f"n_neighbors={k} is more than the {estimator._n_live} "
                         "indexed points.")
    return k


def _grid(estimator, param_grid, kq):
    """(knob name or None, refine_factor values, knob values), each sorted
    ascending: ``param_grid``'s where given, else the defaults."""
    knob, values = _knob(estimator)
    grid = dict(param_grid or {})
    unknown = set(grid) - {"refine_factor", knob}
    if unknown:
        raise ValueError(f"param_grid keys must be among {['refine_factor', knob]} "
                         f"for {type(estimator).__name__}, got {sorted(unknown)}.")
    refine = sorted(grid.get("refine_factor",
                             REFINE_FACTORS if (estimator.vectors_ is not None
                                                or estimator._tier is not None) else (0,)))
    if knob is not None:
        values = sorted(grid.get(knob, _default_values(knob, values, kq,
                                                       estimator._n_live)))
    return knob, refine, values


def _queries(estimator, source, X_sample, n_queries, k, rng):
    """(raw queries (nq, d) in the fit dtype, C-contiguous; their own ids
    (nq,) when they are indexed points, else None)."""
    if X_sample is None:
        live = np.arange(estimator.n_samples_fit_)
        if estimator.removed_ is not None:
            live = live[~estimator.removed_]
        self_ids = np.sort(rng.choice(live, min(n_queries, live.size), replace=False))
        Q_raw = np.asarray(source[self_ids] if isinstance(source, np.ndarray)
                           else source.take(self_ids))
        if estimator._n_live - 1 < k:
            raise ValueError(f"n_neighbors={k} needs more than {k} indexed points to "
                             "leave each query point out of its own neighbours.")
    else:
        X_sample = check_array(X_sample, dtype=[np.float32, np.float64])
        self_ids = None
        take = np.sort(rng.choice(X_sample.shape[0], min(n_queries, X_sample.shape[0]),
                                  replace=False))
        Q_raw = X_sample[take]
    return np.ascontiguousarray(Q_raw, dtype=estimator._fit_dtype_), self_ids


def _timed_search(estimator, Q_raw, kq, n_repeats):
    """(ids found, fastest run in seconds): at least n_repeats runs, more
    (up to MAX_RUNS) while they took under MIN_SECONDS in all, since short
    runs are the noisiest."""
    best, found, spent, runs = np.inf, None, 0.0, 0
    while runs < n_repeats or (spent < MIN_SECONDS and runs < MAX_RUNS):
        t0 = time.perf_counter()
        found = estimator.kneighbors(Q_raw, n_neighbors=kq, return_distance=False)
        t = time.perf_counter() - t0
        best, spent, runs = min(best, t), spent + t, runs + 1
    return found, best


def _walk(estimator, knob, refine, values, kq, target_recall, measure, progress):
    """Measure the settings, each row (one refine_factor) from its cheapest
    knob value up, until the target is reached, the setting is PRUNE times
    slower than the best one reaching it, or recall reaches a plateau.
    Returns [(params, recall, seconds per query)], in order.  The
    estimator's parameters are restored if anything fails."""
    original = {name: getattr(estimator, name) for name in ("refine_factor", knob)
                if name is not None}
    rows = []
    best_time = np.inf
    try:
        with progress.bar(len(refine) * len(values), "settings") as bar:
            for rf in refine:
                seen = set()
                history = []
                for j, v in enumerate(values):
                    params = {"refine_factor": rf}
                    if knob is not None:
                        params[knob] = v
                    if knob == "ef_search":
                        # The beam is at least the re-ranked candidates.
                        beam = max(v, min(rf * kq, estimator._n_live))
                        if beam in seen:
                            bar.update()
                            continue
                        seen.add(beam)
                    estimator.set_params(**params)
                    recall, t = measure()
                    rows.append((params, recall, t))
                    history.append(recall)
                    bar.update()
                    progress(", ".join(f"{a}={b}" for a, b in params.items())
                             + f": recall {recall:.3f}, {1 / t:,.0f} q/s", level=2)
                    reached = recall >= target_recall
                    if reached:
                        best_time = min(best_time, t)
                    if (reached or t > PRUNE * best_time
                            or (len(history) >= 3 and history[-1] - history[-3] < PLATEAU)):
                        bar.update(len(values) - j - 1)
                        break
    except BaseException:
        estimator.set_params(**original)
        raise
    return rows


def _times(rows, knob):
    """(recall, time per query, measured time per query) arrays of the
    rows.  Timing noise only adds time, and a setting costs no more than
    one that fetches more candidates (a larger knob, a larger
    refine_factor): its time is the least measured among those."""
    recall = np.array([r for _, r, _ in rows])
    measured = np.array([t for _, _, t in rows])
    rf_of = np.array([p["refine_factor"] for p, _, _ in rows])
    kn_of = np.array([0 if knob is None else p[knob] for p, _, _ in rows])
    times = np.array([measured[(rf_of >= rf_of[i]) & (kn_of >= kn_of[i])].min()
                      for i in range(len(rows))])
    return recall, times, measured


def _choose(rows, recall, times, reaches, target_recall):
    """Index of the setting to set: the fastest reaching the target (of
    equally fast ones, the most accurate); else, with a warning, the most
    accurate (the fastest of equals)."""
    if reaches.any():
        order = np.lexsort((-recall, np.where(reaches, times, np.inf)))
        return int(order[0])
    top = recall == recall.max()
    pick = int(np.argmin(np.where(top, times, np.inf)))
    warnings.warn(
        f"no setting measured reaches recall {target_recall} (the best is "
        f"{recall[pick]:.3f}); set the one with the highest recall: {rows[pick][0]}. "
        "Raise refine_factor's range (the index must keep its raw vectors: fit with "
        "refine_factor > 0), or rebuild with more sub-spaces.", UserWarning,
        stacklevel=3)
    return pick
