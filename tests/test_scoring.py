"""pqsk.make_recall_scorer: recall@k of a fitted searcher against exact
neighbours among its indexed rows, for GridSearchCV over the codes."""

import pickle

import numpy as np
import pytest
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pqsk import (HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, PQTransformer,
                  make_recall_scorer)

rng = np.random.RandomState(0)
X_TRAIN = rng.randn(1200, 24).astype(np.float32)
X_VAL = rng.randn(150, 24).astype(np.float32)


def _hand_recall(est, X_train, X_val, k, metric, refine_factor):
    """The recall computed by hand: kneighbors at refine_factor against
    scikit-learn's exact neighbours on the training rows."""
    own = est.refine_factor
    est.set_params(refine_factor=refine_factor)
    found = est.kneighbors(X_val, n_neighbors=k, return_distance=False)
    est.set_params(refine_factor=own)
    if metric == "dot":
        exact = np.argsort(-(X_val.astype(np.float64) @ X_train.T.astype(np.float64)),
                           axis=1, kind="stable")[:, :k]
    else:
        exact = NearestNeighbors(n_neighbors=k, metric=metric).fit(X_train).kneighbors(
            X_val, return_distance=False)
    hits = sum(len(set(f) & set(e)) for f, e in zip(found, exact))
    return hits / (X_val.shape[0] * k)


@pytest.mark.parametrize("est, metric", [
    (PQNeighbors(n_subspaces=6, n_codewords=16, random_state=0), "euclidean"),
    (PQNeighbors(n_subspaces=6, n_codewords=32, metric="cosine", random_state=0), "cosine"),
    (PQNeighbors(n_subspaces=6, n_codewords=16, metric="dot", random_state=0), "dot"),
    (IVFPQNeighbors(n_lists=8, n_probe=3, n_subspaces=6, n_codewords=16, random_state=0),
     "euclidean"),
    (HNSWPQNeighbors(n_subspaces=6, n_codewords=16, random_state=0), "euclidean"),
])
@pytest.mark.parametrize("refine_factor", [0, 2, None])
def test_recall_matches_a_hand_computation(est, metric, refine_factor):
    est.fit(X_TRAIN)
    scorer = make_recall_scorer(n_neighbors=7, refine_factor=refine_factor)
    own = est.refine_factor
    value = scorer(est, X_VAL)
    assert est.refine_factor == own  # restored
    want = _hand_recall(est, X_TRAIN, X_VAL, 7, metric,
                        own if refine_factor is None else refine_factor)
    assert value == pytest.approx(want, abs=1e-12)
    assert 0 < value <= 1
    if refine_factor == 0:
        assert value < 0.95  # the codes alone: far from exact on these rows
    per = make_recall_scorer(7, refine_factor=refine_factor, per_byte="per_vector")(est, X_VAL)
    assert per == pytest.approx(value / est.memory_usage_["per_vector"])
    total = make_recall_scorer(7, refine_factor=refine_factor, per_byte="total")(est, X_VAL)
    assert total == pytest.approx(value / est.memory_usage_["total"])


def test_grid_search_over_the_codes_ranks_them():
    # Without a scorer there is nothing to score: the searchers have no score.
    grid = {"n_subspaces": [2, 4, 8, 12]}
    with pytest.raises(TypeError, match="score"):
        GridSearchCV(PQNeighbors(n_codewords=16, random_state=0), grid, cv=3).fit(X_TRAIN)
    search = GridSearchCV(PQNeighbors(n_codewords=16, random_state=0), grid,
                          scoring=make_recall_scorer(10), cv=3).fit(X_TRAIN)
    assert search.best_params_ == {"n_subspaces": 12}
    assert search.cv_results_["rank_test_score"].tolist() == [4, 3, 2, 1]
    scores = search.cv_results_["mean_test_score"]
    assert np.all(np.diff(scores) > 0.05)
    # With the estimator's own exact re-ranking the codes barely matter.
    flat = GridSearchCV(PQNeighbors(n_codewords=16, random_state=0), {"n_subspaces": [8, 12]},
                        scoring=make_recall_scorer(10, refine_factor=None), cv=3).fit(X_TRAIN)
    assert np.ptp(flat.cv_results_["mean_test_score"]) < 0.05


def test_pipeline_scores_its_pqsk_step():
    pipe = make_pipeline(StandardScaler(),
                         PQNeighbors(n_subspaces=6, n_codewords=16, random_state=0))
    pipe.fit(X_TRAIN * 3 + 1)
    scorer = make_recall_scorer(5)
    inner = scorer(pipe[-1], pipe[0].transform(X_VAL * 3 + 1))
    assert scorer(pipe, X_VAL * 3 + 1) == inner
    search = GridSearchCV(pipe, {"pqneighbors__n_codewords": [4, 16]}, scoring=scorer,
                          cv=3).fit(X_TRAIN)
    assert search.best_params_ == {"pqneighbors__n_codewords": 16}


def test_duplicates_are_not_misses():
    X = np.repeat(X_TRAIN[:400], 2, axis=0)  # every row twice: ties
    nn = PQNeighbors(n_subspaces=6, n_codewords=16, random_state=0).fit(X)
    # Exact re-ranking of every row: the exact answer up to ties, recall 1.
    assert make_recall_scorer(4, refine_factor=1000)(nn, X_VAL) == 1.0


def test_errors():
    nn = PQNeighbors(n_subspaces=6, n_codewords=16, refine_factor=0, random_state=0)
    with pytest.raises(ValueError, match="keeps none"):
        make_recall_scorer()(nn.fit(X_TRAIN), X_VAL)
    nn = PQNeighbors(n_subspaces=6, n_codewords=16, refine_dtype="int8", random_state=0)
    with pytest.raises(ValueError, match="keeps none"):
        make_recall_scorer()(nn.fit(X_TRAIN), X_VAL)
    small = PQNeighbors(n_subspaces=6, n_codewords=4, random_state=0).fit(X_TRAIN[:8])
    with pytest.raises(ValueError, match="n_neighbors=10 exceeds the 8 live rows"):
        make_recall_scorer()(small, X_VAL)
    pq = PQTransformer(n_subspaces=6, n_codewords=16, random_state=0).fit(X_TRAIN)
    with pytest.raises(TypeError, match="PQTransformer needs no scorer"):
        make_recall_scorer()(pq, X_VAL)
    with pytest.raises(TypeError, match="got StandardScaler"):
        make_recall_scorer()(StandardScaler().fit(X_TRAIN), X_VAL)
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(ValueError, match="n_neighbors must be"):
            make_recall_scorer(bad)
    for bad in (-1, 1.5, False, "0"):
        with pytest.raises(ValueError, match="refine_factor must be"):
            make_recall_scorer(refine_factor=bad)
    with pytest.raises(ValueError, match="per_byte must be"):
        make_recall_scorer(per_byte="codes")


def test_scorer_pickles_and_reprs():
    scorer = make_recall_scorer(5, refine_factor=None, per_byte="total")
    again = pickle.loads(pickle.dumps(scorer))
    assert repr(again) == repr(scorer) == (
        "make_recall_scorer(n_neighbors=5, refine_factor=None, per_byte='total')")
