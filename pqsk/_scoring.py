"""Scorers for model selection: recall of a fitted index against exact
neighbours, usable as ``GridSearchCV(..., scoring=make_recall_scorer())``.

pqsk's searchers have no ``score`` method, and with the default
``refine_factor=10`` their answers hardly depend on the codes (the short
list is re-ranked by exact distances), so a grid over ``n_subspaces`` or
``n_codewords`` scored through a downstream predictor ranks every
combination alike.  :func:`make_recall_scorer` measures what the codes
find: recall@k of ``kneighbors`` on the held-out rows, by default with no
re-ranking, against their exact k nearest neighbours among the rows the
index holds (its raw vectors).  The ground truth and the hit rule are
those of :func:`pqsk.tune_search`.
"""

from numbers import Integral

import numpy as np
from sklearn.pipeline import Pipeline

from ._base import BasePQNeighbors
from ._tune import _exact_neighbors, _recall
from ._utils import Progress

PER_BYTE = (None, "per_vector", "total")


class _RecallScorer:
    """The callable :func:`make_recall_scorer` returns (picklable, so that
    ``GridSearchCV(n_jobs=...)`` can send it to worker processes)."""

    def __init__(self, n_neighbors, refine_factor, per_byte):
        self.n_neighbors = n_neighbors
        self.refine_factor = refine_factor
        self.per_byte = per_byte

    def __repr__(self):
        return (f"make_recall_scorer(n_neighbors={self.n_neighbors}, "
                f"refine_factor={self.refine_factor}, per_byte={self.per_byte!r})")

    def __call__(self, estimator, X, y=None):
        searcher, X = _searcher_and_queries(estimator, X)
        recall = recall_score(searcher, X, self.n_neighbors, self.refine_factor)
        if self.per_byte is None:
            return recall
        return recall / searcher.memory_usage_[self.per_byte]


def make_recall_scorer(n_neighbors=10, *, refine_factor=0, per_byte=None):
    """A scorer of pqsk's searchers: recall@k against exact neighbours.

    For model selection (``GridSearchCV(..., scoring=make_recall_scorer())``,
    :func:`~sklearn.model_selection.cross_val_score`, ...) over the
    parameters that shape the codes (``n_subspaces``, ``n_codewords``,
    ``n_lists``, ...).  Called as ``scorer(estimator, X_val, y=None)`` on
    a fitted :class:`PQNeighbors`, :class:`IVFPQNeighbors` or
    :class:`HNSWPQNeighbors` (or a :class:`~sklearn.pipeline.Pipeline`
    holding one: ``X_val`` then goes through the steps before it), it
    returns the share of the ``n_neighbors`` exact nearest neighbours of
    each row of ``X_val`` that ``kneighbors(X_val)`` finds, a float in
    [0, 1] (larger is better).

    Ground truth: the exact ``n_neighbors`` nearest live rows among the
    rows the index holds, under its metric, by brute force over its raw
    vectors (``vectors_``), the same as
    :class:`~sklearn.neighbors.NearestNeighbors` fitted on the training
    rows.  In a cross-validation the scorer sees only the fitted
    estimator and the validation rows; the index's own raw vectors are
    the training fold, so the estimator must keep them: fitted with
    ``refine_factor > 0`` and ``refine_dtype="float32"`` (the defaults).
    A found neighbour counts when its exact distance is at most the k-th
    exact distance, so that ties (duplicate rows) are not misses.

    Why a scorer: with the estimator's ``refine_factor=10`` the
    ``10 * n_neighbors`` best candidates of the codes are re-ranked by
    their exact distances, which hides the code size; anything scored on
    the neighbours found (a downstream classifier's accuracy, say) then
    changes little with ``n_subspaces`` or ``n_codewords``.  The scorer
    searches with its own ``refine_factor`` (default 0: the codes alone),
    set on the estimator for the search and restored after it.

    Parameters
    ----------
    n_neighbors : int, default=10
        k of the recall (at most the number of indexed rows).
    refine_factor : int >= 0 or None, default=0
        ``refine_factor`` of the scored search: 0 ranks by the codes alone
        (what the grid over the codes should compare); None keeps the
        estimator's own (to score what it will answer).
    per_byte : {None, "per_vector", "total"}, default=None
        None: the recall.  Otherwise the recall divided by
        ``memory_usage_[per_byte]``: ``"per_vector"`` (the bytes stored
        per indexed vector: codes, ids, links; raw vectors not included),
        ``"total"`` (every byte of the index, raw vectors included).
        Recall per byte rewards small codes; compare it between settings
        that all reach the recall you need.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y=None) -> float``.  Scoring does not
        change the estimator (its ``refine_factor`` is restored; other
        threads searching it meanwhile would see the scorer's).

    Raises
    ------
    ValueError
        From the scorer, when the estimator keeps no raw vectors, or has
        fewer live rows than ``n_neighbors``.
    TypeError
        From the scorer, when the estimator is not a pqsk searcher (nor a
        pipeline holding one).  :class:`PQTransformer` needs no scorer: its
        ``score`` is minus the reconstruction error.

    See Also
    --------
    pqsk.tune_search : the search-time parameters, for a target recall.

    Examples
    --------
    >>> import numpy as np
    >>> from sklearn.model_selection import GridSearchCV
    >>> from pqsk import PQNeighbors, make_recall_scorer
    >>> rng = np.random.RandomState(0)
    >>> X = rng.randn(1500, 32).astype(np.float32)
    >>> search = GridSearchCV(PQNeighbors(n_codewords=16, random_state=0),
    ...                       {"n_subspaces": [4, 8, 16]},
    ...                       scoring=make_recall_scorer(n_neighbors=10), cv=3).fit(X)
    >>> search.best_params_
    {'n_subspaces': 16}
    >>> ranks = search.cv_results_["rank_test_score"]
    >>> ranks.tolist()  # more sub-spaces, better codes
    [3, 2, 1]
    """
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, Integral) \
            or n_neighbors < 1:
        raise ValueError(f"n_neighbors must be an integer >= 1, got {n_neighbors!r}.")
    if refine_factor is not None and (isinstance(refine_factor, bool)
                                      or not isinstance(refine_factor, Integral)
                                      or refine_factor < 0):
        raise ValueError(f"refine_factor must be an integer >= 0 or None, got "
                         f"{refine_factor!r}.")
    if per_byte not in PER_BYTE:
        raise ValueError(f"per_byte must be None, 'per_vector' or 'total', got {per_byte!r}.")
    return _RecallScorer(int(n_neighbors), None if refine_factor is None
                         else int(refine_factor), per_byte)


def _searcher_and_queries(estimator, X):
    """(the pqsk searcher to score, X as it sees it): the estimator itself,
    or the last pqsk searcher of a pipeline and X through the steps
    before it."""
    if isinstance(estimator, BasePQNeighbors):
        return estimator, X
    if isinstance(estimator, Pipeline):
        for i in range(len(estimator.steps) - 1, -1, -1):
            step = estimator.steps[i][1]
            if isinstance(step, BasePQNeighbors):
                return step, (X if i == 0 else estimator[:i].transform(X))
    raise TypeError(
        "make_recall_scorer scores pqsk's searchers (PQNeighbors, IVFPQNeighbors, "
        f"HNSWPQNeighbors) or a Pipeline holding one, got {type(estimator).__name__}"
        + ("; PQTransformer needs no scorer: its score is minus the reconstruction error."
           if type(estimator).__name__ == "PQTransformer" else "."))


def recall_score(estimator, X, n_neighbors, refine_factor=0):
    """Recall@``n_neighbors`` of ``estimator.kneighbors(X)`` against the
    exact neighbours among its indexed rows (see :func:`make_recall_scorer`),
    searched with ``refine_factor`` (None: the estimator's own)."""
    estimator._check_fitted()
    if estimator.vectors_ is None:
        raise ValueError(
            "make_recall_scorer computes the exact neighbours from the raw rows the index "
            f"keeps (vectors_), and this {type(estimator).__name__} keeps none (fitted with "
            "refine_factor=0, or a float16/int8 refine_dtype): fit it with refine_factor > 0 "
            "and refine_dtype='float32' (the defaults); the scorer's own refine_factor "
            "(default 0) sets the re-ranking of the scored search.")
    if n_neighbors > estimator._n_live:
        raise ValueError(f"n_neighbors={n_neighbors} exceeds the {estimator._n_live} live "
                         "rows of the index.")
    Q = estimator._validate_queries(X)
    own = estimator.refine_factor
    if refine_factor is not None:
        estimator.set_params(refine_factor=refine_factor)
    try:
        found = estimator.kneighbors(X, n_neighbors=n_neighbors, return_distance=False)
    finally:
        estimator.set_params(refine_factor=own)
    source = estimator.vectors_
    with Progress(0, "recall").bar(estimator.n_samples_fit_, "exact neighbours") as bar:
        kth = _exact_neighbors(estimator, source, Q, n_neighbors, None, bar)[:, -1]
    return float(_recall(estimator, source, Q, np.asarray(found), kth))
