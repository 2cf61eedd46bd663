"""tune_search: the setting it sets reaches the target on the sample, and
is the cheapest of those measured that do."""

import warnings

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.neighbors import NearestNeighbors

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, tune_search

X, _ = make_blobs(2100, n_features=16, centers=30, cluster_std=2.0, random_state=0)
X = X.astype(np.float32)
X_FIT, X_Q = X[:2000], X[2000:]
PQ = dict(n_subspaces=4, n_codewords=16, random_state=0)
K = 5


def _recall(found, truth):
    return np.mean([np.intersect1d(f, t).size for f, t in zip(found, truth)]) / truth.shape[1]


def _check_choice(nn, result, knob):
    table = result.frontier
    n = table["recall"].shape[0]
    assert all(v.shape == (n,) for v in table.values())
    # The cheapest of those measured that reach the target (of equally
    # cheap ones, the most accurate) is the result's setting, and is set.
    ok = table["reaches_target"]
    assert ok.any() and result.target_reached
    fastest = ok & (table["time_per_query"] == table["time_per_query"][ok].min())
    pick = np.flatnonzero(fastest)[np.argmax(table["recall"][fastest])]
    assert result.time_per_query == table["time_per_query"][pick]
    assert result.recall == table["recall"][pick] == table["recall"][fastest].max()
    assert table["pareto"][pick]
    for name, value in result.params.items():
        assert getattr(nn, name) == value == table[name][pick]
    assert np.all(table["time_per_query"] <= table["measured_time_per_query"])
    assert_frontier_walk(table, knob)


def assert_frontier_walk(table, knob):
    """Each refine_factor's row grows its knob and stops at the first
    setting reaching the target."""
    for rf in np.unique(table["refine_factor"]):
        row = table["refine_factor"] == rf
        if knob is not None:
            assert np.all(np.diff(table[knob][row]) > 0)
        reached = np.flatnonzero(table["reaches_target"][row])
        assert reached.size <= 1 and (reached.size == 0 or reached[0] == row.sum() - 1)


@pytest.mark.parametrize("make, knob", [
    (lambda: IVFPQNeighbors(n_lists=32, refine_factor=4, **PQ), "n_probe"),
    (lambda: HNSWPQNeighbors(n_links=8, ef_construction=40, refine_factor=4, **PQ),
     "ef_search"),
    (lambda: PQNeighbors(refine_factor=4, **PQ), None),
])
def test_chosen_setting_reaches_the_target(make, knob):
    nn = make().fit(X_FIT)
    result = tune_search(nn, X_Q, 0.9, K, n_queries=X_Q.shape[0], random_state=0)
    _check_choice(nn, result, knob)
    # Measured independently: the same queries (all of X_Q), sklearn's truth.
    truth = NearestNeighbors(n_neighbors=K).fit(X_FIT).kneighbors(X_Q)[1]
    found = nn.kneighbors(X_Q, n_neighbors=K, return_distance=False)
    assert _recall(found, truth) >= 0.9
    assert abs(_recall(found, truth) - result.recall) < 0.02  # ties only
    assert result.recall >= 0.9
    if knob is not None:
        assert len(result.frontier[knob]) >= 3  # a walk, not one point


def test_self_queries_leave_the_point_out():
    """X_sample=None tunes kneighbors(X=None): checked with every indexed
    point as a query against scikit-learn's kneighbors(X=None)."""
    data = X_FIT[:600]
    nn = HNSWPQNeighbors(n_links=8, ef_construction=40, refine_factor=2, **PQ).fit(data)
    result = tune_search(nn, None, 0.95, K, n_queries=600, random_state=0)
    _check_choice(nn, result, "ef_search")
    truth = NearestNeighbors(n_neighbors=K).fit(data).kneighbors()[1]
    found = nn.kneighbors(n_neighbors=K, return_distance=False)
    assert _recall(found, truth) >= 0.95
    assert abs(_recall(found, truth) - result.recall) < 0.02


def test_removed_points_are_not_in_the_truth():
    """With every list probed and every candidate re-ranked the search is
    exact: recall 1 only if the removed points are left out of the truth."""
    nn = IVFPQNeighbors(n_lists=8, refine_factor=64, **PQ).fit(X_FIT)
    nn.remove(np.arange(0, 2000, 3))
    result = tune_search(nn, None, 1.0, K, n_queries=100, random_state=0,
                         param_grid={"n_probe": [8], "refine_factor": [64]})
    assert result.recall == 1.0 and result.target_reached
    result = tune_search(nn, X_Q, 1.0, K, n_queries=100, random_state=0,
                         param_grid={"n_probe": [8], "refine_factor": [64]})
    assert result.recall == 1.0


def test_unreachable_target_sets_the_best_and_warns():
    nn = PQNeighbors(refine_factor=0, **PQ).fit(X_FIT)  # codes only: no re-ranking
    with pytest.warns(UserWarning, match="no setting measured reaches recall 1.0"):
        result = tune_search(nn, X_Q, 1.0, K, X=X_FIT, random_state=0)
    assert not result.target_reached and result.params == {"refine_factor": 0}
    assert list(result.frontier) == ["refine_factor", "recall", "queries_per_second",
                                     "time_per_query", "measured_time_per_query",
                                     "reaches_target", "pareto"]
    nn = IVFPQNeighbors(n_lists=16, refine_factor=2, **PQ).fit(X_FIT)
    with pytest.warns(UserWarning, match="no setting"):
        result = tune_search(nn, X_Q, 1.0, K, random_state=0,
                             param_grid={"refine_factor": [0], "n_probe": [1, 2]})
    table = result.frontier
    top = table["recall"] == table["recall"].max()
    assert result.recall == table["recall"].max()
    assert result.time_per_query == table["time_per_query"][top].min()
    assert nn.n_probe == result.params["n_probe"] and nn.refine_factor == 0


def test_frontier_makes_a_dataframe():
    pd = pytest.importorskip("pandas")
    nn = IVFPQNeighbors(n_lists=16, refine_factor=2, **PQ).fit(X_FIT)
    result = tune_search(nn, X_Q, 0.8, K, random_state=0)
    df = pd.DataFrame(result.frontier)
    assert list(df.columns[:2]) == ["n_probe", "refine_factor"]
    assert df["pareto"].any() and len(df) == len(result.frontier["recall"])
    pareto = df[df["pareto"]]
    # On the Pareto front, slower means at least as high a recall; every
    # other point is beaten by one on the front.
    pareto = pareto.sort_values(["time_per_query", "recall"])
    assert np.all(np.diff(pareto["recall"].to_numpy()) >= 0)
    for _, row in df[~df["pareto"]].iterrows():
        assert ((pareto["recall"] >= row["recall"])
                & (pareto["time_per_query"] <= row["time_per_query"])).any()


def test_bad_input():
    nn = IVFPQNeighbors(n_lists=8, n_probe=2, refine_factor=0, **PQ).fit(X_FIT)
    with pytest.raises(ValueError, match="pass X"):
        tune_search(nn, X_Q)
    with pytest.raises(ValueError, match="X must hold the 2000 indexed rows"):
        tune_search(nn, X_Q, X=X_FIT[:10])
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="target_recall"):
            tune_search(nn, X_Q, bad, X=X_FIT)
    with pytest.raises(ValueError, match="n_neighbors=2001"):
        tune_search(nn, X_Q, 0.9, 2001, X=X_FIT)
    with pytest.raises(ValueError, match="param_grid keys"):
        tune_search(nn, X_Q, X=X_FIT, param_grid={"ef_search": [10]})
    with pytest.raises(TypeError, match="tunes a PQNeighbors"):
        tune_search(NearestNeighbors().fit(X_FIT), X_Q)
    with pytest.raises(NotFittedError):
        tune_search(IVFPQNeighbors(), X_Q)
    # A failing setting leaves the parameters as they were.
    with pytest.raises(ValueError):
        tune_search(nn, X_Q, X=X_FIT, param_grid={"n_probe": [1, 0]})
    assert nn.n_probe == 2 and nn.refine_factor == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nn.kneighbors(X_Q[:2])
