"""IVFPQNeighbors: exactness, recall vs n_probe, partial_fit, refinement,
the TSNE pipeline and bad input."""

import copy
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import load_digits, make_blobs
from sklearn.manifold import TSNE
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline

from pqsk import IVFPQNeighbors, PQNeighbors

rng = np.random.RandomState(0)
METRICS = ["euclidean", "sqeuclidean", "cosine", "dot"]


def _recall(ind, ref):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ind, ref)])


@pytest.fixture(scope="module")
def blobs():
    X, _ = make_blobs(3000, n_features=16, centers=30, cluster_std=2.0, random_state=0)
    return X.astype(np.float32)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_exact_when_all_lists_probed_and_codewords_cover_residuals(metric):
    # 40 distinct rows in 4 lists: each sub-space has at most 40 distinct
    # residual sub-vectors, so 40 codewords reconstruct every row exactly.
    X = np.random.RandomState(3).randn(40, 6)
    Q = rng.randn(9, 6)
    nn = IVFPQNeighbors(n_neighbors=6, n_lists=4, n_probe=4, n_subspaces=3, n_codewords=40,
                        metric=metric, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few points per list
        nn.fit(X)
    dist, ind = nn.kneighbors(Q)
    sk = "euclidean" if metric == "sqeuclidean" else metric
    ref_d, ref_i = NearestNeighbors(n_neighbors=6, metric=sk).fit(X).kneighbors(Q)
    if metric == "sqeuclidean":
        ref_d = ref_d**2
    assert_array_equal(ind, ref_i)
    assert_allclose(dist, ref_d, atol=1e-8)


def test_dot_exact_when_all_lists_probed():
    X = np.random.RandomState(4).randn(30, 4)
    Q = rng.randn(5, 4)
    nn = IVFPQNeighbors(n_neighbors=5, n_lists=3, n_probe=3, n_subspaces=2, n_codewords=30,
                        metric="dot", random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dist, ind = nn.fit(X).kneighbors(Q)
    ips = Q @ X.T
    assert_array_equal(ind, np.argsort(-ips, axis=1, kind="stable")[:, :5])
    assert_allclose(dist, -np.take_along_axis(ips, ind, 1), atol=1e-8)


@pytest.mark.parametrize("metric", METRICS)
def test_ivf_with_all_lists_matches_exhaustive_adc(blobs, metric):
    """Probing every list gives the ADC distances of the decoded vectors."""
    X = blobs[:1000]
    nn = IVFPQNeighbors(n_neighbors=10, n_lists=8, n_probe=8, n_subspaces=4, n_codewords=16,
                        metric=metric, random_state=0, refine_factor=0).fit(X)
    dist, ind = nn.kneighbors(X[:20])
    X_hat = nn._reconstruct().astype(np.float64)
    Q = X[:20].astype(np.float64)
    if metric == "cosine":
        Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    if metric == "dot":
        full = -(Q @ X_hat.T)
    else:
        full = ((Q[:, None] - X_hat[None]) ** 2).sum(-1)
        if metric == "euclidean":
            full = np.sqrt(full)
        elif metric == "cosine":
            full = full / 2
    assert_allclose(dist, np.sort(full, axis=1)[:, :10], rtol=1e-4, atol=1e-4)
    assert_allclose(np.take_along_axis(full, ind, 1), dist, rtol=1e-4, atol=1e-4)


def test_recall_rises_with_n_probe():
    # Unclustered data: a query's neighbours straddle many cells.
    data = np.random.RandomState(5).randn(3000, 16).astype(np.float32)
    X, Q = data[100:], data[:100]
    ref = NearestNeighbors(n_neighbors=10).fit(X).kneighbors(Q, return_distance=False)
    nn = IVFPQNeighbors(n_neighbors=10, n_lists=32, n_subspaces=8, n_codewords=64,
                        random_state=0).fit(X)
    recalls = []
    for n_probe in [1, 2, 4, 8, 16, 32]:
        ind = nn.set_params(n_probe=n_probe).kneighbors(Q, return_distance=False)
        recalls.append(_recall(ind, ref))
    assert all(b >= a - 0.02 for a, b in zip(recalls, recalls[1:])), recalls
    assert recalls[-1] > recalls[0] + 0.1
    # n_probe == n_lists is exhaustive ADC over the same codes.
    assert recalls[-1] > 0.5


def test_every_query_gets_real_neighbours():
    X = rng.randn(200, 8)
    nn = IVFPQNeighbors(n_neighbors=50, n_lists=40, n_probe=1, n_subspaces=2,
                        n_codewords=16, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        nn.fit(X)
    assert np.diff(nn.list_offsets_).min() < 50  # one list cannot answer alone
    dist, ind = nn.kneighbors(X[:30])
    assert np.all(ind >= 0) and np.all(ind < 200) and np.all(np.isfinite(dist))
    for row in ind:
        assert len(set(row)) == 50
    # All 200 neighbours of a point: every list is visited.
    ind = nn.kneighbors(X[:3], n_neighbors=200, return_distance=False)
    for row in ind:
        assert sorted(row) == list(range(200))


def test_partial_fit_in_pieces_equals_one_add(blobs):
    X1, X2, X3 = blobs[:1500], blobs[1500:2200], blobs[2200:]
    kw = dict(n_neighbors=7, n_lists=16, n_probe=4, n_subspaces=4, n_codewords=32,
              random_state=0)
    a = IVFPQNeighbors(**kw).fit(X1)
    b = copy.deepcopy(a)
    a.partial_fit(X2).partial_fit(X3)
    b.partial_fit(np.vstack([X2, X3]))
    assert a.n_samples_fit_ == b.n_samples_fit_ == 3000
    assert_array_equal(a.codes_, b.codes_)
    assert_array_equal(a.ids_, b.ids_)
    assert_array_equal(a.list_offsets_, b.list_offsets_)
    Q = blobs[::97]
    for x, y in zip(a.kneighbors(Q), b.kneighbors(Q)):
        assert_array_equal(x, y)
    # New ids continue from the count, and the new rows are findable.
    ind = a.kneighbors(X3[:20], n_neighbors=1, return_distance=False)
    assert np.mean(ind[:, 0] == np.arange(2200, 2220)) > 0.5
    assert set(a.ids_) == set(range(3000))


def test_partial_fit_on_unfitted_estimator_fits():
    X = rng.randn(500, 8)
    a = IVFPQNeighbors(n_lists=4, n_subspaces=2, n_codewords=16, random_state=0).partial_fit(X)
    b = IVFPQNeighbors(n_lists=4, n_subspaces=2, n_codewords=16, random_state=0).fit(X)
    assert_array_equal(a.codes_, b.codes_)


def test_partial_fit_with_bad_input_leaves_index_unchanged():
    X = rng.randn(500, 8)
    nn = IVFPQNeighbors(n_lists=4, n_subspaces=2, n_codewords=16, random_state=0).fit(X)
    before = copy.deepcopy(nn.__dict__)
    with pytest.raises(ValueError, match="X has 6 features"):
        nn.partial_fit(rng.randn(10, 6))
    bad = rng.randn(10, 8)
    bad[3, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        nn.partial_fit(bad)
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            assert_array_equal(nn.__dict__[key], value)
        else:
            assert nn.__dict__[key] == value or value is None


@pytest.mark.parametrize("metric", METRICS)
def test_refine_returns_exact_distances(blobs, metric):
    X, Q = blobs[100:], blobs[:100]
    nn = IVFPQNeighbors(n_neighbors=10, n_lists=16, n_probe=8, n_subspaces=4, n_codewords=16,
                        metric=metric, refine_factor=10, random_state=0).fit(X)
    dist, ind = nn.kneighbors(Q)
    Xd, Qd = X.astype(np.float64), Q.astype(np.float64)
    if metric == "cosine":
        Xd = Xd / np.linalg.norm(Xd, axis=1, keepdims=True)
        Qd = Qd / np.linalg.norm(Qd, axis=1, keepdims=True)
    V = Xd[ind]
    if metric in ("cosine", "dot"):
        exact = -np.einsum("qcd,qd->qc", V, Qd) + (metric == "cosine")
    else:
        exact = ((V - Qd[:, None]) ** 2).sum(-1)
        if metric == "euclidean":
            exact = np.sqrt(exact)
    assert_allclose(dist, exact, rtol=1e-4, atol=1e-4)
    assert np.all(np.diff(dist, axis=1) >= 0)
    # Re-ranking helps recall against exact search.
    sk = metric if metric == "cosine" else "euclidean"
    if metric != "dot":
        ref = NearestNeighbors(n_neighbors=10, metric=sk).fit(X).kneighbors(
            Q, return_distance=False)
        plain = nn.set_params(refine_factor=0).kneighbors(Q, return_distance=False)
        assert _recall(ind, ref) > _recall(plain, ref)
        assert nn.vectors_ is not None


def test_refine_needs_vectors_kept_at_fit():
    X = rng.randn(300, 8)
    nn = IVFPQNeighbors(n_lists=4, n_subspaces=2, n_codewords=16, random_state=0,
                        refine_factor=0).fit(X)
    assert nn.vectors_ is None
    with pytest.raises(ValueError, match="refit"):
        nn.set_params(refine_factor=5).kneighbors(X[:2])


def test_memory_and_ids():
    X = rng.randn(2000, 16).astype(np.float32)
    nn = IVFPQNeighbors(n_lists=16, n_subspaces=8, n_codewords=16, random_state=0).fit(X)
    mem = nn.memory_usage_
    assert nn.ids_.dtype == np.int32
    # 4-bit codes: packed two per byte (m / 2 bytes), each list padded to
    # whole blocks of 32 vectors (at most 31 padding vectors a list).
    assert mem["codes"] == nn.segments_[0]["packed"].nbytes
    assert 2000 * 4 <= mem["codes"] <= (2000 + 16 * 31) * 4
    assert mem["per_vector"] == (mem["codes"] + mem["ids"]) / 2000
    assert 4 + 4 <= mem["per_vector"] <= 4 + 4 + 16 * 31 * 4 / 2000


def test_n_probe_is_clipped_with_a_warning():
    X = rng.randn(300, 8)
    nn = IVFPQNeighbors(n_lists=4, n_probe=10, n_subspaces=2, n_codewords=16,
                        random_state=0).fit(X)
    with pytest.warns(UserWarning, match="n_probe=10 is larger than n_lists=4"):
        a = nn.kneighbors(X[:5])
    b = nn.set_params(n_probe=4).kneighbors(X[:5])
    assert_array_equal(a[1], b[1])


def test_training_size_rules():
    X = rng.randn(200, 8)
    with pytest.warns(UserWarning, match="fewer than 39 per list"):
        IVFPQNeighbors(n_lists=10, n_subspaces=2, n_codewords=16, random_state=0).fit(X)
    with pytest.raises(ValueError, match="n_lists=300 needs at least 300 training samples"):
        IVFPQNeighbors(n_lists=300, n_subspaces=2, n_codewords=16).fit(X)
    # "auto" keeps at least 39 points per list, and subsamples 256 per list.
    nn = IVFPQNeighbors(n_subspaces=2, n_codewords=16, random_state=0).fit(X)
    assert nn.n_lists_ == 200 // 39
    # Fewer than 39 rows: one list (exhaustive), without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nn = IVFPQNeighbors(n_subspaces=2, n_codewords=16, random_state=0).fit(X[:30])
    assert nn.n_lists_ == 1


def test_kneighbors_without_X_excludes_self():
    X = rng.randn(300, 8)
    nn = IVFPQNeighbors(n_neighbors=4, n_lists=4, n_probe=4, n_subspaces=4, n_codewords=32,
                        refine_factor=5, random_state=0).fit(X)
    dist, ind = nn.kneighbors()
    assert not np.any(ind == np.arange(300)[:, None])
    ref_d, ref_i = NearestNeighbors(n_neighbors=4).fit(X).kneighbors()
    assert _recall(ind, ref_i) > 0.9


def test_n_threads_agree(blobs):
    nn = IVFPQNeighbors(n_neighbors=10, n_lists=16, n_probe=3, n_subspaces=4,
                        n_codewords=32, random_state=0, n_jobs=1).fit(blobs)
    a = nn.kneighbors(blobs[:200])
    b = nn.set_params(n_jobs=2).kneighbors(blobs[:200])
    assert_array_equal(a[0], b[0])
    assert_array_equal(a[1], b[1])


def test_tsne_pipeline_on_digits():
    """scikit-learn's "Approximate nearest neighbors in TSNE" example, with
    IVFPQNeighbors in place of the wrapped packages."""
    X, y = load_digits(return_X_y=True)
    X = X[:600]
    pipe = make_pipeline(
        IVFPQNeighbors(n_neighbors=int(3.0 * 10 + 1), n_lists=8, n_probe=4,
                       n_subspaces=16, n_codewords=32, mode="distance", random_state=0),
        TSNE(metric="precomputed", perplexity=10, init="random", max_iter=250,
             random_state=0),
    )
    emb = pipe.fit_transform(X)
    assert emb.shape == (600, 2) and np.all(np.isfinite(emb))


def test_same_answers_as_pqneighbors_with_one_list():
    X = rng.randn(400, 8)
    kw = dict(n_neighbors=5, n_subspaces=4, n_codewords=16, random_state=0)
    ivf = IVFPQNeighbors(n_lists=1, n_probe=1, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        ivf.fit(X)
    # One list: the residual of x is x - mean(X); same search as exhaustive
    # PQ over the centred data.
    pq = PQNeighbors(codebooks=ivf.codebooks_, **kw).fit(X - ivf.cluster_centers_[0])
    d1, i1 = ivf.kneighbors(X[:20])
    d2, i2 = pq.kneighbors(X[:20] - ivf.cluster_centers_[0])
    assert_allclose(d1, d2, rtol=1e-5)
    assert_array_equal(i1, i2)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_without_precomputed_list_terms_the_answers_stay(metric, monkeypatch):
    """Past LIST_TERMS_MAX_BYTES the n_lists x m x k table is not kept; each
    probed list's table is then built from the residual query: the same
    distances (up to rounding), the same neighbours."""
    from pqsk import _partition

    rng = np.random.RandomState(0)
    X = rng.randn(3000, 16)
    Q = rng.randn(30, 16)
    kw = dict(n_lists=16, n_probe=5, n_subspaces=4, n_codewords=32, random_state=0,
              metric=metric)
    with_table = IVFPQNeighbors(8, **kw).fit(X)
    monkeypatch.setattr(_partition, "LIST_TERMS_MAX_BYTES", 0)
    without = IVFPQNeighbors(8, **kw).fit(X)
    assert with_table._list_terms.shape[0] == 16 and without._list_terms.shape[0] == 0
    assert without.memory_usage_["list_terms"] == 0
    d1, i1 = with_table.kneighbors(Q)
    d2, i2 = without.kneighbors(Q)
    assert_allclose(d1, d2, rtol=1e-9, atol=1e-9)
    assert_array_equal(i1, i2)
