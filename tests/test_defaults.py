"""Default parameters: the "auto" rules, tiny data, iris, and what the
defaults cost.  Recall at defaults on real-sized data is measured in
benchmarks/bench_defaults.py (results/defaults.md), not here."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.datasets import load_iris
from sklearn.neighbors import NearestNeighbors

import pqsk
from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, PQTransformer, _quantizer

rng = np.random.RandomState(3)
NEIGHBORS = (PQNeighbors, IVFPQNeighbors, HNSWPQNeighbors)


def _recall(ind, ref):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ind, ref)])


@pytest.mark.parametrize("d,k,m", [(1, 256, 1), (4, 256, 2), (5, 256, 3), (50, 256, 25),
                                   (64, 256, 32), (768, 256, 384), (50, 16, 50), (5, 8, 5)])
def test_auto_n_subspaces_rule(d, k, m):
    assert _quantizer.auto_n_subspaces(d, k) == m


@pytest.mark.parametrize("n,k", [(1, 1), (2, 1), (30, 15), (150, 75), (511, 255),
                                 (512, 256), (10**6, 256)])
def test_auto_n_codewords_rule(n, k):
    assert PQTransformer()._pq_shape(8, n) == (4, k)


@pytest.mark.parametrize("Est", NEIGHBORS)
def test_iris_fits_at_defaults(Est):
    X = load_iris().data
    nn = Est(random_state=0).fit(X)
    assert nn.codebooks_.shape == (2, 75, 2)  # m = ceil(4 / 2), k = 150 // 2
    ind = nn.kneighbors(X[:20], return_distance=False)
    ref = NearestNeighbors(n_neighbors=5).fit(X).kneighbors(X[:20], return_distance=False)
    assert _recall(ind, ref) >= 0.9
    # The parameters stay "auto": clone, set_params and a second fit work.
    assert nn.get_params()["n_subspaces"] == "auto"
    nn.set_params(n_neighbors=3).kneighbors(X[:2])
    nn.fit(X[:, :3])
    assert nn.codebooks_.shape == (2, 75, 2)  # widths 2 and 1


def test_auto_follows_the_dimension_and_n_codewords():
    X = rng.randn(600, 10).astype(np.float32)
    assert PQTransformer(random_state=0).fit(X).codebooks_.shape == (5, 256, 2)
    pq = PQTransformer(n_codewords=16, random_state=0).fit(X)
    assert pq.codebooks_.shape == (10, 16, 1)
    assert pq.transform(X[:3]).shape == (3, 10)
    # Supplied codebooks set m and k.
    cb = rng.randn(4, 8, 3)
    pq = PQTransformer(codebooks=cb).fit(X)
    assert pq.codebooks_.shape == (4, 8, 3)


def test_fitted_auto_is_not_a_changed_parameter():
    """"auto" resolved at fit must not read as a structural change at query
    time, while an explicit different value still does."""
    X = rng.randn(300, 8).astype(np.float32)
    nn = PQNeighbors(random_state=0).fit(X)
    nn.kneighbors(X[:2])
    nn.partial_fit(X[:10])
    with pytest.raises(ValueError, match="n_subspaces=3 was set after fit"):
        nn.set_params(n_subspaces=3).kneighbors(X[:2])
    nn.set_params(n_subspaces=4).kneighbors(X[:2])  # the fitted value is fine


@pytest.mark.parametrize("Est", NEIGHBORS)
def test_defaults_round_trip_through_save(Est, tmp_path):
    X = rng.randn(400, 6).astype(np.float32)
    nn = Est(random_state=0).fit(X)
    nn.save(tmp_path / "index")
    back = pqsk.load(tmp_path / "index")
    assert back.get_params()["n_codewords"] == "auto"
    for a, b in zip(nn.kneighbors(X[:5]), back.kneighbors(X[:5])):
        assert_array_equal(a, b)
