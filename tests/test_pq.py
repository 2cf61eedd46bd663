"""PQTransformer and PQNeighbors: the seed notes' dry run, exactness,
metrics, the neighbors contract, scikit-learn integration and bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from scipy import sparse
from sklearn.datasets import load_digits
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsClassifier, KNeighborsTransformer, NearestNeighbors
from sklearn.pipeline import make_pipeline
from threadpoolctl import threadpool_limits

from pqsk import PQNeighbors, PQTransformer

rng = np.random.RandomState(0)

# The seed notes' dataset (section 7).
X_SEED = np.array(
    [[1, 2, 3, 4], [1, 3, 3, 5], [2, 2, 4, 4], [8, 9, 0, 1], [9, 8, 1, 0]],
    dtype=np.float32,
)
Q_SEED = np.array([[1, 3, 4, 4]], dtype=np.float32)
# "representatives = the first k training sub-vectors"
CB_SEED = np.stack([X_SEED[:2, :2], X_SEED[:2, 2:]])

METRICS = ["euclidean", "sqeuclidean", "cosine", "dot"]


def _exact_data(n=60, n_distinct=12, d=6, seed=1):
    """Rows drawn from a few distinct points: with n_codewords >= the
    number of distinct sub-vectors PQ reconstructs every row exactly."""
    r = np.random.RandomState(seed)
    centers = r.randn(n_distinct, d)
    return centers[r.randint(n_distinct, size=n)]


# --- the seed notes' dry run, through the public API ----------------------

def test_seed_dry_run_codes_tables_and_top3():
    pq = PQTransformer(n_subspaces=2, n_codewords=2, codebooks=CB_SEED).fit(X_SEED)
    assert_array_equal(pq.transform(X_SEED), [[0, 0], [1, 1], [0, 0], [1, 0], [1, 0]])
    tables = pq.distance_tables(Q_SEED)
    assert_array_equal(tables[0], [[1, 0], [1, 2]])

    nn = PQNeighbors(
        n_neighbors=3, n_subspaces=2, n_codewords=2, codebooks=CB_SEED,
        metric="sqeuclidean", refine_factor=0
    ).fit(X_SEED)
    dist, ind = nn.kneighbors(Q_SEED)
    assert_array_equal(ind, [[3, 4, 0]])
    assert_array_equal(dist, [[1, 1, 2]])
    # Every stored code's distance, as in the notes: 2, 2, 2, 1, 1.
    dist5, ind5 = nn.kneighbors(Q_SEED, n_neighbors=5)
    assert_array_equal(ind5, [[3, 4, 0, 1, 2]])
    assert_array_equal(dist5, [[1, 1, 2, 2, 2]])


def test_seed_dry_run_with_kmeans_training():
    nn = PQNeighbors(n_neighbors=3, n_subspaces=2, n_codewords=2, random_state=0)
    ind = nn.fit(X_SEED).kneighbors(Q_SEED, return_distance=False)
    assert sorted(ind[0]) == [0, 1, 2]


# --- ADC semantics -----------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.sampled_from([1, 2, 4]),
    k=st.integers(2, 12),
    metric=st.sampled_from(METRICS),
)
def test_adc_distance_equals_distance_to_decoded(seed, m, k, metric):
    r = np.random.RandomState(seed)
    X = r.randn(40, 8)
    Q = r.randn(5, 8)
    nn = PQNeighbors(n_neighbors=40, n_subspaces=m, n_codewords=k, metric=metric,
                     random_state=seed, refine_factor=0).fit(X)
    dist, ind = nn.kneighbors(Q)
    X_hat = PQTransformer(n_subspaces=m, n_codewords=k,
                          codebooks=nn.codebooks_).fit(X).inverse_transform(nn.codes_)
    if metric == "cosine":
        Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        exact = ((Qn[:, None, :] - X_hat[None, :, :]) ** 2).sum(-1) / 2
    elif metric == "dot":
        exact = -(Q @ X_hat.T)
    else:
        exact = ((Q[:, None, :] - X_hat[None, :, :]) ** 2).sum(-1)
        if metric == "euclidean":
            exact = np.sqrt(exact)
    assert_allclose(dist, np.take_along_axis(exact, ind, axis=1), rtol=1e-9, atol=1e-9)
    assert np.all(np.diff(dist, axis=1) >= 0)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine"])
def test_search_is_exact_when_codewords_cover_the_data(metric):
    X = _exact_data()
    Q = rng.randn(7, 6)
    nn = PQNeighbors(n_neighbors=8, n_subspaces=3, n_codewords=12, metric=metric,
                     random_state=0).fit(X)
    dist, ind = nn.kneighbors(Q)
    sk_metric = "euclidean" if metric == "sqeuclidean" else metric
    ref_d, _ = NearestNeighbors(n_neighbors=8, metric=sk_metric).fit(X).kneighbors(Q)
    if metric == "sqeuclidean":
        ref_d = ref_d**2
    assert_allclose(dist, ref_d, atol=1e-8)
    # Compare ids through their distances (duplicates are ties).
    full = NearestNeighbors(n_neighbors=len(X), metric=sk_metric).fit(X)
    d_all, i_all = full.kneighbors(Q)
    true_d = np.empty_like(d_all)
    np.put_along_axis(true_d, i_all, d_all, axis=1)
    got = np.take_along_axis(true_d, ind, axis=1)
    if metric == "sqeuclidean":
        got = got**2
    assert_allclose(got, dist, atol=1e-8)


def test_dot_metric_is_maximum_inner_product():
    X = _exact_data(d=4)
    Q = rng.randn(5, 4)
    nn = PQNeighbors(n_neighbors=4, n_subspaces=2, n_codewords=12, metric="dot",
                     random_state=0).fit(X)
    dist, ind = nn.kneighbors(Q)
    ips = Q @ X.T
    assert_allclose(-dist, np.sort(ips, axis=1)[:, ::-1][:, :4], atol=1e-8)


def test_recall_against_brute_force_on_clustered_data():
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(2000, n_features=16, centers=20, random_state=0)
    Q = X[:50] + 0.01 * rng.randn(50, 16)
    nn = PQNeighbors(n_neighbors=10, n_subspaces=8, n_codewords=64, random_state=0).fit(X)
    ind = nn.kneighbors(Q, return_distance=False)
    ref = NearestNeighbors(n_neighbors=10).fit(X).kneighbors(Q, return_distance=False)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ind, ref)])
    assert recall > 0.5
    # A bigger codebook is at least as good.
    nn2 = PQNeighbors(n_neighbors=10, n_subspaces=8, n_codewords=256, random_state=0).fit(X)
    ind2 = nn2.kneighbors(Q, return_distance=False)
    recall2 = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ind2, ref)])
    assert recall2 >= recall - 0.02


# --- the neighbors contract ---------------------------------------------------

def test_kneighbors_without_X_excludes_self():
    X = np.random.RandomState(1).randn(40, 6)  # 40 distinct rows
    nn = PQNeighbors(n_neighbors=3, n_subspaces=2, n_codewords=40, random_state=0).fit(X)
    dist, ind = nn.kneighbors()
    assert ind.shape == (40, 3)
    assert not np.any(ind == np.arange(40)[:, None])
    ref_d, ref_i = NearestNeighbors(n_neighbors=3).fit(X).kneighbors()
    assert_array_equal(ind, ref_i)
    assert_allclose(dist, ref_d, atol=1e-8)
    with pytest.raises(ValueError, match="n_neighbors < n_samples_fit"):
        nn.kneighbors(n_neighbors=40)


def test_kneighbors_without_X_with_duplicates():
    X = np.repeat(rng.randn(5, 4), 3, axis=0)  # every row three times
    nn = PQNeighbors(n_neighbors=2, n_subspaces=2, n_codewords=5, random_state=0).fit(X)
    dist, ind = nn.kneighbors()
    assert ind.shape == (15, 2)
    assert_allclose(dist, 0, atol=1e-6)
    for i in range(15):
        assert i not in ind[i]
        assert set(ind[i]) <= set(range(3 * (i // 3), 3 * (i // 3) + 3))


@pytest.mark.parametrize("mode", ["distance", "connectivity"])
def test_transform_matches_kneighbors_transformer(mode):
    X = np.random.RandomState(2).randn(50, 6)  # 50 distinct rows
    ours = PQNeighbors(n_neighbors=4, n_subspaces=2, n_codewords=50, mode=mode,
                       random_state=0)
    ref = KNeighborsTransformer(n_neighbors=4, mode=mode)
    A = ours.fit_transform(X)
    B = ref.fit_transform(X)
    assert sparse.issparse(A) and A.format == "csr"
    assert A.shape == B.shape == (50, 50)
    assert A.nnz == B.nnz == 50 * (4 + (mode == "distance"))
    assert_allclose(A.toarray(), B.toarray(), atol=1e-8)
    assert_allclose(ours.transform(X[:7]).toarray(), ref.transform(X[:7]).toarray(),
                    atol=1e-8)


def test_kneighbors_graph():
    X = rng.randn(30, 4)
    nn = PQNeighbors(n_neighbors=3, n_subspaces=2, n_codewords=8, random_state=0).fit(X)
    G = nn.kneighbors_graph(X[:5])
    assert G.shape == (5, 30) and G.nnz == 15
    assert_array_equal(G.data, 1)
    dist, ind = nn.kneighbors(X[:5])
    Gd = nn.kneighbors_graph(X[:5], n_neighbors=3, mode="distance")
    assert_allclose(np.take_along_axis(Gd.toarray(), ind, axis=1), dist)
    G_self = nn.kneighbors_graph(n_neighbors=2)
    assert G_self.shape == (30, 30) and G_self.diagonal().sum() == 0
    with pytest.raises(ValueError, match="Unsupported mode"):
        nn.kneighbors_graph(X, mode="bogus")


def test_output_dtypes():
    X = rng.randn(30, 4)
    for dtype, out in [(np.float64, np.float64), (np.float32, np.float32),
                       (np.float16, np.float32)]:
        nn = PQNeighbors(n_neighbors=3, n_subspaces=2, n_codewords=8,
                         random_state=0).fit(X.astype(dtype))
        dist, ind = nn.kneighbors(X[:3].astype(dtype))
        assert dist.dtype == out and ind.dtype == np.int64
        assert nn.codebooks_.dtype == out
        # Queries in another dtype are cast to the fitted one.
        assert nn.kneighbors(X[:3])[0].dtype == out


def test_c_and_f_order_give_the_same_result():
    X = rng.randn(40, 6)
    kw = dict(n_neighbors=3, n_subspaces=3, n_codewords=8, random_state=0)
    a = PQNeighbors(**kw).fit(X).kneighbors(X[:5])
    b = PQNeighbors(**kw).fit(np.asfortranarray(X)).kneighbors(np.asfortranarray(X[:5]))
    assert_array_equal(a[1], b[1])
    assert_allclose(a[0], b[0])


def test_n_jobs_and_threadpool_limits_give_the_same_result():
    X = rng.randn(300, 8).astype(np.float32)
    kw = dict(n_neighbors=5, n_subspaces=4, n_codewords=16, random_state=0)
    nn = PQNeighbors(n_jobs=1, **kw).fit(X)
    a = nn.kneighbors(X[:50])
    b = nn.set_params(n_jobs=2).kneighbors(X[:50])
    with threadpool_limits(1):
        c = nn.set_params(n_jobs=None).kneighbors(X[:50])
    for other in (b, c):
        assert_array_equal(a[1], other[1])
        assert_array_equal(a[0], other[0])
    # Sub-spaces train in parallel threads, each KMeans on one OpenMP
    # thread: the codebooks do not depend on n_jobs.
    nn2 = PQNeighbors(n_jobs=2, **kw).fit(X)
    assert_array_equal(nn2.codebooks_, nn.codebooks_)


def test_n_neighbors_override():
    X = rng.randn(20, 4)
    nn = PQNeighbors(n_neighbors=3, n_subspaces=2, n_codewords=4, random_state=0).fit(X)
    assert nn.kneighbors(X[:2], n_neighbors=20)[1].shape == (2, 20)
    assert nn.kneighbors(X[:2], n_neighbors=np.int64(2))[1].shape == (2, 2)


# --- PQTransformer --------------------------------------------------------------

def test_transformer_roundtrip_and_score():
    X = rng.randn(200, 8)
    pq = PQTransformer(n_subspaces=4, n_codewords=16, random_state=0).fit(X)
    assert pq.codebooks_.shape == (4, 16, 2)
    codes = pq.transform(X)
    assert codes.shape == (200, 4) and codes.dtype == np.uint8
    X_hat = pq.inverse_transform(codes)
    assert X_hat.shape == X.shape
    assert_allclose(pq.score(X), -np.mean(np.sum((X - X_hat) ** 2, axis=1)))
    assert pq.score(X) > -np.mean(np.sum((X - X.mean(0)) ** 2, axis=1))
    # Codes are the nearest codewords: re-encoding the reconstruction is a no-op.
    assert_array_equal(pq.transform(X_hat), codes)
    assert_array_equal(pq.get_feature_names_out(),
                       [f"pqtransformer{i}" for i in range(4)])


def test_uint16_codes_for_many_codewords():
    X = rng.randn(400, 4)
    pq = PQTransformer(n_subspaces=2, n_codewords=300, max_iter=5, random_state=0).fit(X)
    codes = pq.transform(X)
    assert codes.dtype == np.uint16 and codes.max() >= 256


def test_feature_names_in():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(rng.randn(30, 4), columns=list("abcd"))
    pq = PQTransformer(n_subspaces=2, n_codewords=4, random_state=0).fit(df)
    assert_array_equal(pq.feature_names_in_, list("abcd"))


def test_max_train_samples_and_random_state():
    X = rng.randn(500, 4)
    a = PQTransformer(n_subspaces=2, n_codewords=4, max_train_samples=50, random_state=3).fit(X)
    b = PQTransformer(n_subspaces=2, n_codewords=4, max_train_samples=50, random_state=3).fit(X)
    assert_array_equal(a.codebooks_, b.codebooks_)
    with pytest.raises(ValueError, match="n_samples=50"):
        PQTransformer(n_subspaces=2, n_codewords=64, max_train_samples=50).fit(X)


def test_verbose_reports_progress_on_stderr(capsys):
    X = rng.randn(100, 4)
    PQTransformer(n_subspaces=2, n_codewords=4, verbose=2, random_state=0).fit(X)
    out = capsys.readouterr()
    assert out.out == ""
    assert "sub-space 2/2" in out.err and "codebooks trained" in out.err


def test_gridsearch_over_subspaces_and_codewords():
    X = rng.randn(300, 8)
    gs = GridSearchCV(
        PQTransformer(random_state=0),
        {"n_subspaces": [2, 4], "n_codewords": [4, 16]},
        cv=3,
    ).fit(X)
    # More sub-spaces and more codewords reconstruct better.
    assert gs.best_params_ == {"n_subspaces": 4, "n_codewords": 16}


def test_pipeline_with_precomputed_knn_classifier_on_digits():
    X, y = load_digits(return_X_y=True)
    pipe = make_pipeline(
        PQNeighbors(n_neighbors=10, mode="distance", random_state=0),
        KNeighborsClassifier(n_neighbors=10, metric="precomputed"),
    )
    gs = GridSearchCV(
        pipe,
        {"pqneighbors__n_subspaces": [8, 16], "pqneighbors__n_codewords": [16, 64]},
        cv=3,
    ).fit(X, y)
    assert gs.best_score_ > 0.9


# --- bad input -------------------------------------------------------------------

@pytest.mark.parametrize("Est", [PQTransformer, PQNeighbors])
def test_subspaces_need_not_divide_features(Est):
    X = rng.randn(30, 6)
    est = Est(n_subspaces=4, n_codewords=4, random_state=0).fit(X)  # widths 2, 2, 1, 1
    assert est.codebooks_.shape == (4, 4, 2)
    with pytest.raises(ValueError, match="n_subspaces=7 is larger than the number of"):
        Est(n_subspaces=7, n_codewords=4).fit(X)


@pytest.mark.parametrize("Est", [PQTransformer, PQNeighbors])
def test_too_many_codewords(Est):
    X = rng.randn(30, 4)
    with pytest.raises(ValueError, match="n_codewords=31 must be <= .* n_samples=30"):
        Est(n_subspaces=2, n_codewords=31).fit(X)
    with pytest.raises(ValueError, match="65536"):
        Est(n_subspaces=2, n_codewords=70000).fit(X)


@pytest.mark.parametrize("Est", [PQTransformer, PQNeighbors])
def test_bad_input_is_rejected(Est):
    X = rng.randn(30, 4)
    est = Est(n_subspaces=2, n_codewords=4, random_state=0)
    method = est.transform if Est is PQTransformer else est.kneighbors
    with pytest.raises(NotFittedError):
        method(X)
    est.fit(X)
    method = est.transform if Est is PQTransformer else est.kneighbors
    bad_nan = X.copy()
    bad_nan[0, 0] = np.nan
    bad_inf = X.copy()
    bad_inf[1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN"):
        method(bad_nan)
    with pytest.raises(ValueError, match="infinity"):
        method(bad_inf)
    with pytest.raises(ValueError, match="X has 3 features"):
        method(X[:, :3])
    with pytest.raises(TypeError, match="[Ss]parse"):
        method(sparse.csr_matrix(X))
    with pytest.raises(ValueError, match="Expected 2D array"):
        method(X[0])
    with pytest.raises(ValueError, match="0 sample"):
        method(X[:0])
    with pytest.raises((ValueError, TypeError)):
        method(np.array([["a", "b", "c", "d"]], dtype=object))
    with pytest.raises(ValueError, match="NaN"):
        Est(n_subspaces=2, n_codewords=4).fit(bad_nan)
    with pytest.raises(ValueError, match="0 sample"):
        Est(n_subspaces=2, n_codewords=4).fit(X[:0])
    with pytest.raises(TypeError, match="[Ss]parse"):
        Est(n_subspaces=2, n_codewords=4).fit(sparse.csr_matrix(X))


def test_bad_neighbors_parameters():
    X = rng.randn(30, 4)
    nn = PQNeighbors(n_neighbors=3, n_subspaces=2, n_codewords=4, random_state=0).fit(X)
    with pytest.raises(ValueError, match="Expected n_neighbors > 0. Got 0"):
        nn.kneighbors(X, n_neighbors=0)
    with pytest.raises(ValueError, match="Expected n_neighbors > 0. Got -2"):
        nn.kneighbors(X, n_neighbors=-2)
    with pytest.raises(TypeError, match="n_neighbors does not take float"):
        nn.kneighbors(X, n_neighbors=2.5)
    with pytest.raises(ValueError, match="n_neighbors = 31, n_samples_fit = 30"):
        nn.kneighbors(X, n_neighbors=31)
    with pytest.raises(ValueError, match="metric"):
        PQNeighbors(metric="manhattan").fit(X)
    with pytest.raises(ValueError, match="n_neighbors"):
        PQNeighbors(n_neighbors=0).fit(X)


def test_bad_codebooks_and_codes():
    X = rng.randn(30, 4)
    with pytest.raises(ValueError, match="codebooks must have shape"):
        PQTransformer(n_subspaces=2, n_codewords=2, codebooks=np.zeros((2, 3, 2))).fit(X)
    with pytest.raises(ValueError, match=r"= \(2, 2, 2\) for X with 4 features, got \(2, 2, 3\)"):
        PQTransformer(n_subspaces=2, n_codewords=2, codebooks=np.zeros((2, 2, 3))).fit(X)
    bad = np.zeros((2, 2, 2))
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        PQTransformer(n_subspaces=2, n_codewords=2, codebooks=bad).fit(X)
    pq = PQTransformer(n_subspaces=2, n_codewords=4, random_state=0).fit(X)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        pq.inverse_transform([[0, 4]])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        pq.inverse_transform([[0, -1]])
    with pytest.raises(ValueError, match="3 columns"):
        pq.inverse_transform([[0, 1, 2]])
    with pytest.raises(TypeError, match="integer"):
        pq.inverse_transform([[0.5, 1.0]])
    with pytest.raises(ValueError, match="metric"):
        pq.distance_tables(X, metric="cosine")


def test_partial_fit_appends_codes():
    X = rng.randn(300, 8)
    kw = dict(n_neighbors=3, n_subspaces=4, n_codewords=16, random_state=0)
    a = PQNeighbors(**kw).fit(X[:200])
    b = PQNeighbors(codebooks=a.codebooks_, **kw).fit(X)
    a.partial_fit(X[200:250]).partial_fit(X[250:])
    assert a.n_samples_fit_ == 300
    assert_array_equal(a.codes_, b.codes_)
    for x, y in zip(a.kneighbors(X[:20]), b.kneighbors(X[:20])):
        assert_array_equal(x, y)
    with pytest.raises(ValueError, match="X has 5 features"):
        a.partial_fit(X[:3, :5])
    assert a.n_samples_fit_ == 300 and a.codes_.shape == (300, 4)
    assert PQNeighbors(**kw).partial_fit(X).n_samples_fit_ == 300


@pytest.mark.parametrize("metric", METRICS)
def test_refine_gives_exact_distances(metric):
    X = rng.randn(400, 8)
    Q = rng.randn(10, 8)
    nn = PQNeighbors(n_neighbors=5, n_subspaces=2, n_codewords=16, metric=metric,
                     refine_factor=40, random_state=0).fit(X)
    dist, ind = nn.kneighbors(Q)
    Xd, Qd = X, Q
    if metric == "cosine":
        Xd = X / np.linalg.norm(X, axis=1, keepdims=True)
        Qd = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    if metric in ("cosine", "dot"):
        full = -(Qd @ Xd.T) + (metric == "cosine")
    else:
        full = ((Qd[:, None] - Xd[None]) ** 2).sum(-1)
        if metric == "euclidean":
            full = np.sqrt(full)
    assert_allclose(dist, np.take_along_axis(full, ind, 1), rtol=1e-10, atol=1e-10)
    # 200 of 400 candidates re-ranked: the exact top-5 is found.
    assert_allclose(dist, np.sort(full, axis=1)[:, :5], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("Est", [PQTransformer, PQNeighbors])
def test_values_that_overflow_distances_are_rejected(Est):
    X = rng.randn(30, 4) * 1e30
    with pytest.raises(ValueError, match="overflow"):
        Est(n_subspaces=2, n_codewords=4).fit(X.astype(np.float32))
    est = Est(n_subspaces=2, n_codewords=4, random_state=0).fit((X / 1e30).astype(np.float32))
    method = est.transform if Est is PQTransformer else est.kneighbors
    with pytest.raises(ValueError, match="overflow"):
        method(X)
    # float64 has the range: large values are fine there.
    Est(n_subspaces=2, n_codewords=4, random_state=0).fit(X)
