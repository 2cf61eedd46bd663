"""radius_neighbors and radius_neighbors_graph: against scikit-learn's
NearestNeighbors on exhaustive settings, and against the ADC distances of
the candidates each index visits on approximate ones."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.neighbors import NearestNeighbors
from sklearn.utils._param_validation import InvalidParameterError

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

rng = np.random.RandomState(0)
X = rng.rand(300, 8)
Q = rng.rand(15, 8)
# Radii giving ~10-40 neighbours per query.
RADII = {"euclidean": 0.75, "sqeuclidean": 0.6, "cosine": 0.1}
PQ = dict(n_subspaces=4, n_codewords=16, random_state=0)


def _exhaustive(kind, metric, **kw):
    """Indexes that visit every point and re-rank every candidate (refine
    20 x the first 16 candidates covers the 300 points)."""
    common = dict(metric=metric, refine_factor=20, **PQ, **kw)
    if kind == "flat":
        return PQNeighbors(**common)
    if kind == "ivf":
        return IVFPQNeighbors(n_lists=6, n_probe=6, **common)
    return HNSWPQNeighbors(n_links=8, ef_search=300, **common)


def _same(ours, theirs, d_ours=None, d_theirs=None):
    for q, (a, b) in enumerate(zip(ours, theirs)):
        assert_array_equal(np.sort(a), np.sort(b), err_msg=f"query {q}")
        if d_ours is not None:
            assert_allclose(d_ours[q], np.sort(d_theirs[q]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("metric", sorted(RADII))
def test_exhaustive_matches_sklearn(kind, metric):
    r = RADII[metric]
    nn = _exhaustive(kind, metric, radius=r).fit(X)
    ref = NearestNeighbors(radius=r, metric=metric).fit(X)
    dist, ind = nn.radius_neighbors(Q)
    ref_dist, ref_ind = ref.radius_neighbors(Q)
    assert dist.shape == ind.shape == (Q.shape[0],) and dist.dtype == ind.dtype == object
    assert sum(a.size for a in ind) > 10 * Q.shape[0]  # the radius is not trivial
    _same(ind, ref_ind, dist, ref_dist)
    # X=None: every point against the others, itself excluded.
    dist, ind = nn.radius_neighbors()
    ref_dist, ref_ind = ref.radius_neighbors()
    assert all(i not in row for i, row in enumerate(ind))
    _same(ind, ref_ind, dist, ref_dist)
    # The graphs.
    for mode in ("connectivity", "distance"):
        A = nn.radius_neighbors_graph(Q, mode=mode)
        B = ref.radius_neighbors_graph(Q, mode=mode)
        assert A.format == "csr" and A.shape == (Q.shape[0], X.shape[0])
        assert_array_equal(A.toarray() != 0, B.toarray() != 0)
        assert_allclose(A.toarray(), B.toarray(), rtol=1e-9, atol=1e-9)
    A = nn.radius_neighbors_graph(mode="distance")
    assert_allclose(A.toarray(), ref.radius_neighbors_graph(mode="distance").toarray(),
                    atol=1e-9)


def test_radius_argument_and_parameter():
    nn = _exhaustive("flat", "euclidean").fit(X)
    ref = NearestNeighbors().fit(X)
    _same(nn.radius_neighbors(Q, radius=0.6, return_distance=False),
          ref.radius_neighbors(Q, radius=0.6, return_distance=False))
    # The parameter is a search parameter: set after fit, no refit.
    nn.set_params(radius=0.7)
    _same(nn.radius_neighbors(Q)[1], ref.radius_neighbors(Q, radius=0.7)[1])
    # Results are sorted by distance, sort_results or not.
    for d in nn.radius_neighbors(Q, sort_results=True)[0]:
        assert np.all(np.diff(d) >= 0)


def test_all_and_nothing():
    nn = PQNeighbors(refine_factor=0, **PQ).fit(X)
    dist, ind = nn.radius_neighbors(Q[:3], radius=100.0)
    assert all(np.array_equal(np.sort(i), np.arange(300)) for i in ind)
    dist, ind = nn.radius_neighbors(Q[:3] + 10, radius=0.0)
    assert all(i.shape == (0,) and i.dtype == np.int64 for i in ind)
    assert all(d.shape == (0,) for d in dist)
    A = nn.radius_neighbors_graph(Q[:3] + 10, radius=0.0)
    assert A.shape == (3, 300) and A.nnz == 0


def _adc(nn, Q_, metric):
    """Distances from Q_ to every decoded indexed vector, as the index ranks
    them without re-ranking."""
    X_hat = nn._reconstruct()
    if metric == "dot":
        return -(Q_ @ X_hat.T)
    d2 = ((Q_[:, None, :] - X_hat[None, :, :]) ** 2).sum(-1)
    return np.sqrt(d2) if metric == "euclidean" else d2


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_flat_without_refine_is_the_adc_ball(metric):
    """PQNeighbors visits every point: the result is exactly the points
    whose ADC distance is within the radius (for "dot", a negative radius:
    inner products above 2.6)."""
    r = 0.75 if metric == "euclidean" else -2.6
    nn = PQNeighbors(metric=metric, refine_factor=0, **PQ).fit(X)
    dist, ind = nn.radius_neighbors(Q, radius=r)
    D = _adc(nn, Q, metric)
    for q in range(Q.shape[0]):
        expected = np.flatnonzero(D[q] <= r)
        assert_array_equal(np.sort(ind[q]), expected)
        assert_allclose(dist[q], np.sort(D[q, expected]), rtol=1e-9, atol=1e-9)
    assert sum(i.size for i in ind) > 5 * Q.shape[0]


def test_ivf_visits_the_probed_lists():
    """IVF: every point of the n_probe nearest lists within the radius (ADC),
    and nothing beyond the radius; the rest of the ball may be missed."""
    r = 0.8
    nn = IVFPQNeighbors(n_lists=6, n_probe=2, refine_factor=0, **PQ).fit(X)
    dist, ind = nn.radius_neighbors(Q, radius=r)
    D = _adc(nn, Q, "euclidean")
    offsets, ids = nn.list_offsets_, nn.ids_
    coarse = ((Q[:, None, :] - nn.cluster_centers_[None]) ** 2).sum(-1)
    missed = 0
    for q in range(Q.shape[0]):
        probed = np.argsort(coarse[q])[:2]
        in_probed = np.concatenate([ids[offsets[l]:offsets[l + 1]] for l in probed])
        must = in_probed[D[q, in_probed] <= r]
        ball = np.flatnonzero(D[q] <= r)
        assert set(must) <= set(ind[q]) <= set(ball)
        assert_allclose(dist[q], np.sort(D[q, ind[q]]), rtol=1e-9, atol=1e-9)
        missed += ball.size - ind[q].size
    assert missed > 0  # two lists of six are an approximation here
    # All lists probed: the whole ADC ball.
    ind = nn.set_params(n_probe=6).radius_neighbors(Q, radius=r, return_distance=False)
    for q in range(Q.shape[0]):
        assert_array_equal(np.sort(ind[q]), np.flatnonzero(D[q] <= r))


def test_hnsw_returns_part_of_the_adc_ball():
    r = 0.75
    nn = HNSWPQNeighbors(n_links=8, ef_search=16, refine_factor=0, **PQ).fit(X)
    dist, ind = nn.radius_neighbors(Q, radius=r)
    D = _adc(nn, Q, "euclidean")
    found = total = 0
    for q in range(Q.shape[0]):
        ball = np.flatnonzero(D[q] <= r)
        assert set(ind[q]) <= set(ball)
        # The graph is walked in float32.
        assert_allclose(dist[q], np.sort(D[q, ind[q]]), rtol=1e-6)
        found, total = found + ind[q].size, total + ball.size
    assert found >= 0.9 * total


def test_dtype_of_distances():
    X32 = X.astype(np.float32)
    nn = PQNeighbors(refine_factor=20, **PQ).fit(X32)
    for queries in (Q, Q.astype(np.float32)):
        dist, ind = nn.radius_neighbors(queries, radius=0.5)
        assert all(d.dtype == np.float32 for d in dist)
        assert all(i.dtype == np.int64 for i in ind)
    assert nn.radius_neighbors_graph(Q, radius=0.5, mode="distance").dtype == np.float32
    assert nn.radius_neighbors_graph(Q, radius=0.5).dtype == np.float64


def test_bad_calls():
    nn = PQNeighbors(refine_factor=0, **PQ).fit(X)
    with pytest.raises(ValueError, match="return_distance must be True"):
        nn.radius_neighbors(Q, return_distance=False, sort_results=True)
    with pytest.raises(ValueError, match="radius must be >= 0"):
        nn.radius_neighbors(Q, radius=-0.1)
    with pytest.raises(ValueError, match="finite"):
        nn.radius_neighbors(Q, radius=np.nan)
    with pytest.raises(TypeError, match="radius must be a real number"):
        nn.radius_neighbors(Q, radius="1")
    with pytest.raises(ValueError, match='Unsupported mode'):
        nn.radius_neighbors_graph(Q, mode="weights")
    with pytest.raises(InvalidParameterError, match="radius"):
        nn.set_params(radius="far").radius_neighbors(Q)
    ivf = IVFPQNeighbors(n_lists=4, n_probe=4, refine_factor=0, **PQ).fit(X).remove([3])
    with pytest.raises(ValueError, match="were removed"):
        ivf.radius_neighbors(radius=0.5)
    # With X the removed point is never returned.
    assert all(3 not in row for row in ivf.radius_neighbors(X[:5], radius=0.8)[1])


@pytest.mark.parametrize("cls", [IVFPQNeighbors, HNSWPQNeighbors])
def test_every_point_removed(cls):
    nn = cls(refine_factor=0, **PQ).fit(X).remove(np.arange(X.shape[0]))
    dist, ind = nn.radius_neighbors(X[:2], radius=10.0)
    assert [i.size for i in ind] == [0, 0] and dist[0].dtype == np.float64
    assert nn.radius_neighbors_graph(X[:2], radius=10.0).nnz == 0
