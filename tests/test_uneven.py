"""Sub-spaces of unequal widths: n_subspaces need not divide n_features.

The features are cut into nearly equal contiguous sub-spaces (the first
``D % m`` one feature wider), kept by the kernels in a zero-padded layout
(see pqsk._quantizer).  Checked here: the layout helpers, every kernel
against its naive oracle (which slices the true widths and never pads),
the padded path against the same computation on hand-padded rows, and
every estimator against brute force when the quantization is exact.
"""

import re

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.neighbors import NearestNeighbors

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, PQTransformer
from pqsk import _anisotropic, _naive, _opq, _partition, _quantizer, _scorers

rng = np.random.RandomState(7)


@pytest.mark.parametrize("d,m", [(10, 1), (10, 3), (10, 4), (10, 7), (10, 10), (7, 2),
                                 (50, 13), (64, 16)])
def test_widths_bounds_and_padding(d, m):
    widths = _quantizer.subspace_widths(d, m)
    assert widths.sum() == d and widths.max() - widths.min() <= 1
    assert list(widths) == sorted(widths, reverse=True)  # the wider ones first
    assert [w for w in widths] == [len(a) for a in np.array_split(np.arange(d), m)]
    bounds = _quantizer.subspace_bounds(d, m)
    assert [sl.start for sl in _naive.subspace_slices(d, m)] == list(bounds[:-1])
    X = rng.randn(6, d)
    P = _quantizer.pad_features(X, m)
    ds = -(-d // m)
    assert P.shape == (6, m * ds)
    for j in range(m):
        block = P[:, j * ds:(j + 1) * ds]
        assert_array_equal(block[:, :widths[j]], X[:, bounds[j]:bounds[j + 1]])
        assert not block[:, widths[j]:].any()
    assert_array_equal(_quantizer.unpad_features(P, d, m), X)
    if d % m == 0:
        assert P is X or np.shares_memory(P, X)  # no copy when m divides d


def test_more_subspaces_than_features_is_refused():
    msg = re.escape("n_subspaces=5 is larger than the number of features (4)")
    with pytest.raises(ValueError, match=msg):
        _quantizer.subspace_widths(4, 5)
    X = rng.randn(40, 4)
    for est in (PQTransformer(n_subspaces=5, n_codewords=4),
                PQNeighbors(n_subspaces=5, n_codewords=4),
                IVFPQNeighbors(n_subspaces=5, n_codewords=4, n_lists=2),
                HNSWPQNeighbors(n_subspaces=5, n_codewords=4),
                PQNeighbors(n_subspaces=5, n_codewords=4, rotation="opq")):
        with pytest.raises(ValueError, match=msg):
            est.fit(X)


def _padding_is_zero(codebooks, n_features):
    """Whether every column beyond a sub-space's width is 0."""
    m, _, ds = codebooks.shape
    widths = _quantizer.subspace_widths(n_features, m)
    return all(not np.any(codebooks[j, :, widths[j]:]) for j in np.flatnonzero(widths < ds))


def _uneven_codebooks(d, m, k, dtype):
    cb = rng.randn(m, k, -(-d // m)).astype(dtype)
    return _quantizer.zero_padding(cb, d)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d,m,k", [(10, 3, 16), (10, 4, 32), (11, 7, 300), (5, 2, 8)])
def test_kernels_match_the_oracles(dtype, d, m, k):
    cb = _uneven_codebooks(d, m, k, dtype)
    X = rng.randn(97, d).astype(dtype)
    Q = rng.randn(7, d).astype(dtype)
    codes = _quantizer.encode(X, cb, n_threads=2)
    assert_array_equal(codes, _naive.encode(X, cb))
    assert_allclose(_quantizer.decode(codes, cb, d), _naive.decode(codes, cb, d))
    for ip in (False, True):
        tables = _quantizer.adc_tables(Q, cb, ip)
        # Zero padding adds exact zeros: bit-identical to the oracle in float32.
        assert_array_equal(tables, _naive.adc_tables(Q, cb, ip, dtype=dtype))
        dist, idx = _scorers.adc_search(Q, cb, codes, 9, ip, n_threads=2)
        od, oi = _naive.adc_scan(tables.astype(np.float64), codes, 9)
        assert_array_equal(idx, oi)
        assert_allclose(dist, od, rtol=1e-5)


def test_padded_path_equals_hand_padded_rows():
    """Uneven m on X gives what the divisible kernels give on X with zero
    columns inserted after each narrower sub-space."""
    d, m, k = 10, 4, 16
    cb = _uneven_codebooks(d, m, k, np.float32)
    X = rng.randn(200, d).astype(np.float32)
    Q = rng.randn(5, d).astype(np.float32)
    Xp, Qp = _quantizer.pad_features(X, m), _quantizer.pad_features(Q, m)
    assert Xp.shape[1] == m * cb.shape[2]
    codes = _quantizer.encode(X, cb)
    assert_array_equal(codes, _quantizer.encode(Xp, cb))
    for a, b in zip(_scorers.adc_search(Q, cb, codes, 6),
                    _scorers.adc_search(Qp, cb, codes, 6)):
        assert_array_equal(a, b)
    # 4-bit fast-scan on packed codes.
    packed = _scorers.pack_codes4(codes)
    for a, b in zip(_scorers.fastscan_search(Q, cb, packed, 200, 6),
                    _scorers.adc_search(Q, cb, codes, 6)):
        assert_allclose(a, b, rtol=1e-6)
    # IVF: list terms and the residual path give the oracle's distances.
    C = rng.randn(4, d).astype(np.float32)
    labels = _partition.assign(X, C)
    rcodes = _quantizer.encode(X - C[labels], cb)
    order = np.argsort(labels, kind="stable")
    offsets = np.searchsorted(labels[order], np.arange(5)).astype(np.int64)
    segs = [(np.ascontiguousarray(rcodes[order]), order.astype(np.int32), offsets)]
    coarse = _partition.coarse_terms(Q, C, False)
    terms = _partition.list_terms(C, cb)
    for t in (terms, terms[:0]):
        dist, idx = _scorers.ivf_search(Q, coarse, cb, t, segs, 6, 4, centroids=C)
        od, oi = _naive.ivf_search(Q, C, cb, rcodes[order], order, offsets, 6, 4)
        assert_array_equal(idx, oi)
        assert_allclose(dist, od, rtol=1e-4, atol=1e-4)


def test_train_codebooks_pad_with_zeros_and_fit_each_width():
    X = rng.randn(300, 10).astype(np.float32)
    cb, _ = _quantizer.train_codebooks(X, 4, 8, random_state=0)
    assert cb.shape == (4, 8, 3)
    assert _padding_is_zero(cb, 10)
    # Exact quantization when there are no more rows than codewords.
    cb, _ = _quantizer.train_codebooks(X[:8], 4, 8, random_state=0)
    codes = _quantizer.encode(X[:8], cb)
    assert_allclose(_quantizer.decode(codes, cb, 10), X[:8], rtol=1e-6)


def test_opq_and_anisotropic_keep_the_padding_zero():
    X = rng.randn(400, 10).astype(np.float32)
    R, cb, errors = _opq.train_opq(X, 4, 16, n_iter=5, random_state=0)
    assert cb.shape == (4, 16, 3) and _padding_is_zero(cb, 10)
    assert errors[-1] <= errors[0] * (1 + 1e-5)
    cb, losses = _anisotropic.train_anisotropic(X, 4, 16, 0.2, random_state=0)
    assert cb.shape == (4, 16, 3) and _padding_is_zero(cb, 10)
    assert losses[-1] <= losses[0]
    codes = _anisotropic.anisotropic_encode(X, cb, 0.2)
    loss = _anisotropic.anisotropic_loss(X, codes, cb, 0.2)
    plain = _anisotropic.anisotropic_loss(X, _quantizer.encode(X, cb), cb, 0.2)
    assert np.all(loss <= plain + 1e-9)
    # eta comes from the true number of features, not the padded width.
    U, w = _anisotropic.row_weights(X, 0.2, cb)
    assert U.shape == (400, 12)
    assert_allclose(w, _anisotropic.anisotropic_eta(0.2, np.linalg.norm(X, axis=1), 10) - 1)


# Exact quantization (k = n_samples: every sub-vector is a codeword) makes
# every estimator exhaustive search, whatever the widths.
N, D = 160, 11
XE = rng.randn(N, D).astype(np.float32)
QE = rng.randn(9, D).astype(np.float32)
EXACT = [
    PQNeighbors(n_neighbors=5, n_subspaces=3, n_codewords=N),
    PQNeighbors(n_neighbors=5, n_subspaces=4, n_codewords=N, rotation="opq"),
    IVFPQNeighbors(n_neighbors=5, n_lists=4, n_probe=4, n_subspaces=5, n_codewords=N),
    IVFPQNeighbors(n_neighbors=5, n_lists=4, n_probe=4, n_subspaces=5, n_codewords=N,
                   metric="dot"),
    HNSWPQNeighbors(n_neighbors=5, n_subspaces=7, n_codewords=N, ef_search=N),
    HNSWPQNeighbors(n_neighbors=5, n_subspaces=2, n_codewords=N, ef_search=N,
                    refine_factor=2),
]


@pytest.mark.parametrize("est", EXACT, ids=lambda e: f"{type(e).__name__}-m{e.n_subspaces}")
def test_estimators_with_uneven_subspaces_are_exact_when_quantization_is(est):
    est = est.set_params(random_state=0).fit(XE)
    m = est.n_subspaces
    assert est.codebooks_.shape == (m, N, -(-D // m))
    metric = "euclidean" if est.metric != "dot" else None
    if metric:
        ref = NearestNeighbors(n_neighbors=5).fit(XE).kneighbors(QE)
        dist, ind = est.kneighbors(QE)
        assert_array_equal(ind, ref[1])
        assert_allclose(dist, ref[0], rtol=1e-4, atol=1e-4)
    else:
        ind = est.kneighbors(QE, return_distance=False)
        assert_array_equal(ind, np.argsort(-(QE @ XE.T), axis=1, kind="stable")[:, :5])
    assert_allclose(est._reconstruct() if est.rotation is None else XE, XE, atol=1e-5)


def test_transformer_round_trip_and_user_codebooks():
    X = rng.randn(50, 7)
    pq = PQTransformer(n_subspaces=3, n_codewords=50, random_state=0).fit(X)
    assert pq.codebooks_.shape == (3, 50, 3)
    codes = pq.transform(X)
    assert codes.shape == (50, 3)
    assert_allclose(pq.inverse_transform(codes), X, atol=1e-12)
    assert pq.score(X) > -1e-20
    tables = pq.distance_tables(X[:2])
    assert_allclose(tables[0, np.arange(3), codes[0]], 0, atol=1e-12)
    # Supplied codebooks: shape (m, k, ceil(D / m)); the padding is ignored.
    cb = rng.randn(3, 4, 3)
    pq = PQTransformer(n_subspaces=3, n_codewords=4, codebooks=cb).fit(X)
    assert not pq.codebooks_[1:, :, 2].any()  # widths 3, 2, 2
    assert_allclose(pq.codebooks_[:, :, :2], cb[:, :, :2])
    assert_allclose(pq.codebooks_[0], cb[0])
    assert_array_equal(pq.transform(X), _naive.encode(X, pq.codebooks_))
    with pytest.raises(ValueError, match=re.escape("= (3, 4, 3) for X with 7 features")):
        PQTransformer(n_subspaces=3, n_codewords=4, codebooks=cb[:, :, :2]).fit(X)
