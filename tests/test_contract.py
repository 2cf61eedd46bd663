"""The rest of the NearestNeighbors contract, against scikit-learn's own
behaviour: metric aliases, effective_metric_ / effective_metric_params_,
n_jobs=0, the ef_search warning, the dtype of distances, and the new
parameters through save / load."""

import warnings

import index_files as files
import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.neighbors import NearestNeighbors

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, load

rng = np.random.RandomState(0)
X = rng.rand(300, 8)
Q = rng.rand(10, 8)
PQ = dict(n_subspaces=4, n_codewords=16, random_state=0)
ESTIMATORS = {
    "flat": lambda **kw: PQNeighbors(**PQ, **kw),
    "ivf": lambda **kw: IVFPQNeighbors(n_lists=4, n_probe=4, **PQ, **kw),
    "hnsw": lambda **kw: HNSWPQNeighbors(n_links=8, **PQ, **kw),
}


@pytest.mark.parametrize("kind", sorted(ESTIMATORS))
@pytest.mark.parametrize("params", [
    dict(metric="l2"),
    dict(metric="minkowski"),
    dict(metric="minkowski", p=2),
    dict(metric="minkowski", p=None, metric_params={"p": 2}),
])
def test_euclidean_aliases(kind, params):
    """Every alias builds the same index as metric="euclidean", and the
    effective metric is scikit-learn's (which keeps the name "l2")."""
    ours = ESTIMATORS[kind](refine_factor=4, **params).fit(X)
    plain = ESTIMATORS[kind](refine_factor=4).fit(X)
    ref = NearestNeighbors(**params).fit(X)
    assert ours.effective_metric_ == "euclidean"
    assert ref.effective_metric_ == ("l2" if params["metric"] == "l2" else "euclidean")
    assert ours.effective_metric_params_ == ref.effective_metric_params_ == {}
    d1, i1 = ours.kneighbors(Q, 5)
    d2, i2 = plain.kneighbors(Q, 5)
    assert_array_equal(i1, i2)
    assert_allclose(d1, d2)
    # Exact distances after re-ranking: scikit-learn's for the ids found.
    assert_allclose(d1, np.linalg.norm(Q[:, None] - X[i1], axis=2), rtol=1e-9)


def test_p_in_metric_params_warns_as_sklearn():
    msg = "Parameter p is found in metric_params"
    with pytest.warns(SyntaxWarning, match=msg):
        NearestNeighbors(metric="minkowski", metric_params={"p": 2}).fit(X)
    with pytest.warns(SyntaxWarning, match=msg):
        nn = PQNeighbors(metric="minkowski", metric_params={"p": 2}, **PQ).fit(X)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nn.kneighbors(Q)  # once, at fit
        PQNeighbors(metric="minkowski", p=None, metric_params={"p": 2}, **PQ).fit(X)


@pytest.mark.parametrize("params, match", [
    (dict(metric="minkowski", p=1), "p=2 .* only, got p=1"),
    (dict(metric="minkowski", p=3.5), "got p=3.5"),
    (dict(metric="minkowski", p=None, metric_params={"p": 1}), "got p=1"),
    (dict(metric="minkowski", metric_params={"w": [1, 2]}), r"metric_params \['w'\]"),
    (dict(metric="euclidean", metric_params={"V": 1}), r"metric_params \['V'\]"),
])
def test_unsupported_metric_settings(params, match):
    with pytest.raises(ValueError, match=match):
        PQNeighbors(**PQ, **params).fit(X)


def test_p_is_ignored_for_other_metrics():
    # As scikit-learn: p matters for "minkowski" only.
    assert NearestNeighbors(metric="euclidean", p=3).fit(X).effective_metric_ == "euclidean"
    nn = PQNeighbors(metric="cosine", p=3, **PQ).fit(X)
    assert nn.effective_metric_ == "cosine"


def test_aliases_after_fit():
    """An alias of the fitted metric may be set after fit; another metric
    (or p != 2) makes queries raise until the next fit."""
    nn = PQNeighbors(**PQ).fit(X)
    expected = nn.kneighbors(Q)
    for params in (dict(metric="l2"), dict(metric="minkowski", p=2)):
        assert_array_equal(nn.set_params(**params).kneighbors(Q)[1], expected[1])
    with pytest.raises(ValueError, match="got p=1"):
        nn.set_params(metric="minkowski", p=1).kneighbors(Q)
    with pytest.raises(ValueError, match="metric='cosine' was set after fit"):
        nn.set_params(metric="cosine", p=2).kneighbors(Q)
    nn.set_params(metric="euclidean")
    assert_array_equal(nn.kneighbors(Q)[1], expected[1])


def test_effective_metric_params_needs_fit():
    nn = PQNeighbors(**PQ)
    assert not hasattr(nn, "effective_metric_params_")
    assert NearestNeighbors().fit(X).effective_metric_params_ == {}
    assert nn.fit(X).effective_metric_params_ == {}


def test_n_jobs_zero_is_rejected_as_sklearn():
    with pytest.raises(ValueError, match="n_jobs == 0"):
        NearestNeighbors(n_jobs=0).fit(X).kneighbors(Q)
    for make in ESTIMATORS.values():
        with pytest.raises(ValueError, match="n_jobs"):
            make(n_jobs=0).fit(X)
        nn = make().fit(X).set_params(n_jobs=0)
        with pytest.raises(ValueError, match="n_jobs"):
            nn.kneighbors(Q)


def test_ef_search_below_n_neighbors_warns():
    nn = HNSWPQNeighbors(n_links=8, ef_search=4, **PQ).fit(X)
    with pytest.warns(UserWarning, match="ef_search=4 is smaller than n_neighbors=5"):
        nn.kneighbors(Q)
    with pytest.warns(UserWarning, match="n_neighbors=10"):
        nn.kneighbors_graph(Q, n_neighbors=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nn.kneighbors(Q, n_neighbors=4)
        nn.set_params(ef_search=5).kneighbors(Q)
        nn.radius_neighbors(Q, radius=0.5)  # its own candidate counts


@pytest.mark.parametrize("kind", sorted(ESTIMATORS))
@pytest.mark.parametrize("fit_dtype, expected", [
    (np.float32, np.float32), (np.float64, np.float64), (np.int64, np.float32),
    (np.float16, np.float32)])
def test_distances_in_the_fitted_dtype(kind, fit_dtype, expected):
    """Documented: distances come in the dtype the index was fitted in
    (float32 unless fitted on float64), whatever the queries' dtype."""
    data = (X * 10).astype(fit_dtype)
    nn = ESTIMATORS[kind]().fit(data)
    for queries in (Q, Q.astype(np.float32)):
        assert nn.kneighbors(queries)[0].dtype == expected
        assert nn.radius_neighbors(queries, radius=5.0)[0][0].dtype == expected


@pytest.mark.parametrize("kind", sorted(ESTIMATORS))
def test_new_parameters_are_saved(kind, tmp_path):
    nn = ESTIMATORS[kind](metric="minkowski", p=None, metric_params={"p": 2},
                          radius=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        nn.fit(X)
    nn.save(tmp_path / "i")
    back = load(tmp_path / "i")
    assert back.get_params() == nn.get_params()
    assert back.effective_metric_ == "euclidean" and back.effective_metric_params_ == {}
    assert_array_equal(back.radius_neighbors(Q)[1][0], nn.radius_neighbors(Q)[1][0])
    assert clone(back).get_params()["metric_params"] == {"p": 2}


def test_files_without_the_new_parameters_load(tmp_path):
    """Version-3 files written before radius / p / metric_params lack them:
    they load with the defaults."""
    nn = IVFPQNeighbors(n_lists=4, n_probe=4, radius=0.3, p=None, **PQ).fit(X)
    nn.save(tmp_path / "i")

    def strip(header):
        for name in ("radius", "p", "metric_params"):
            del header["params"][name]

    files.as_version3(tmp_path / "i", strip)
    back = load(tmp_path / "i")
    assert (back.radius, back.p, back.metric_params) == (1.0, 2, None)
    assert_array_equal(back.kneighbors(Q)[1], nn.kneighbors(Q)[1])
