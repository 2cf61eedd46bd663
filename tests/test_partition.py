"""The partition stage (pqsk._partition).

The coarse k-means in fixed tasks (train_coarse_streamed): its Lloyd pass
against a naive oracle, its results independent of the thread count and of
where the sample lives, and train_coarse's choice of path; the assignment
to lists and the coarse and list terms against pqsk._naive and brute force.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import make_blobs

from pqsk import IVFPQNeighbors, _naive, _partition, _quantizer
from pqsk._store import FitRows, chunk_slices

rng = np.random.RandomState(7)


def _blobs(n=3000, d=12, seed=0):
    X, _ = make_blobs(n, n_features=d, centers=25, cluster_std=1.5, random_state=seed)
    return X.astype(np.float32)


def _memmap(tmp_path, X):
    np.save(tmp_path / "X.npy", X)
    return np.load(tmp_path / "X.npy", mmap_mode="r")


# -- one Lloyd pass against the oracle ----------------------------------------------

def _naive_lloyd_pass(A, centroids, task_rows, n_far):
    """The documented pass, spelled out row by row in float64: each row to
    its nearest centre; each centre to the mean of its rows; centres left
    without rows, in order, to the farthest rows (distance to their centre,
    ties by row number) among the ``n_far`` farthest of each task of
    ``task_rows`` rows; a centre beyond those keeps its place."""
    A64, C64 = A.astype(np.float64), centroids.astype(np.float64)
    n, k = A.shape[0], centroids.shape[0]
    labels = np.empty(n, dtype=np.int64)
    dist = np.empty(n)
    for i in range(n):
        d2 = ((A64[i] - C64) ** 2).sum(axis=1)
        labels[i] = int(np.argmin(d2))
        dist[i] = d2[labels[i]]
    new = centroids.copy()
    for c in range(k):
        mine = labels == c
        if mine.any():
            new[c] = A64[mine].sum(axis=0) / mine.sum()
    kept = []
    for start in range(0, n, task_rows):
        rows = list(range(start, min(n, start + task_rows)))
        kept += sorted(rows, key=lambda i: (-dist[i], i))[:n_far]
    kept.sort(key=lambda i: (-dist[i], i))
    empty = [c for c in range(k) if not (labels == c).any()]
    for c, i in zip(empty, kept):
        new[c] = A[i]
    shift = float(((new.astype(np.float64) - C64) ** 2).sum())
    return new, shift, len(empty)


def _serial_tasks(fn, read, size):
    for sl in chunk_slices(size, _partition.STREAM_TASK_ROWS):
        yield fn(read(sl))


@pytest.mark.parametrize("n_far", [64, 2])
def test_lloyd_pass_matches_the_naive_oracle(monkeypatch, n_far):
    monkeypatch.setattr(_partition, "STREAM_TASK_ROWS", 70)  # several tasks
    monkeypatch.setattr(_partition, "STREAM_FAR", n_far)
    A = rng.randn(300, 5)
    A[200:260, 4] += 100.0
    # Far rows at exactly the same distance (1600) from the centre at the
    # origin, all different: which of them relocate the empty centres (ties
    # by row number, within a task and across) shows in the result.  Rows 10,
    # 11, 12 are one task's (n_far=2 keeps two), 150-153 another's.
    far = 40.0 * np.vstack([np.eye(5)[:4], -np.eye(5)[:4]])
    A[[10, 11, 12, 150, 151, 152, 153, 299]] = far
    # Centres: the origin, one in the shifted group, a random row, and 12
    # no row is near (empty: more than the kept rows when n_far=2).
    centroids = np.vstack([np.zeros(5), A[230], A[5], 1e4 + np.arange(12)[:, None]
                           * np.ones((12, 5))])
    got, shift = _partition._lloyd_pass(_serial_tasks, lambda sl: A[sl], 300, centroids)
    want, want_shift, n_empty = _naive_lloyd_pass(A, centroids, 70, n_far)
    assert n_empty >= 12
    assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert shift == pytest.approx(want_shift, rel=1e-12)


def test_lloyd_pass_in_float32_matches_the_oracle_up_to_rounding():
    X = _blobs(2000, 8)
    centroids = X[rng.choice(2000, 30, replace=False)]
    got, _ = _partition._lloyd_pass(_serial_tasks, lambda sl: X[sl], 2000, centroids)
    want, _, _ = _naive_lloyd_pass(X, centroids, _partition.STREAM_TASK_ROWS, 64)
    assert got.dtype == np.float32
    assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# -- the same centroids whatever the threads and the source -----------------------------

def test_coarse_lloyd_is_the_same_for_any_threads_gather_and_source(tmp_path, monkeypatch):
    monkeypatch.setattr(_partition, "STREAM_TASK_ROWS", 256)  # 11 tasks per pass
    X = _blobs(3000, 12)
    Xn = np.asarray(FitRows(X, np.float32, True))  # normalised as the memmap's rows
    rows = np.sort(rng.choice(3000, 2700, replace=False))
    mm = _memmap(tmp_path, X)
    runs = [_partition.train_coarse_streamed(src, rows, 20, max_iter=10, random_state=3,
                                             n_threads=t, gather=g)
            for src, t, g in ((Xn, 1, False), (Xn, 2, False), (Xn, 3, True), (Xn, 1, True),
                              (FitRows(mm, np.float32, True), 2, True),
                              (FitRows(mm, np.float32, True), 3, False))]
    for c, n_iter in runs[1:]:
        assert_array_equal(c, runs[0][0])
        assert n_iter == runs[0][1]
    assert runs[0][1] >= 2  # both stages ran


def test_coarse_lloyd_is_as_good_as_kmeans():
    # Same schedule, other random centres: inertia within 2% of KMeans's,
    # averaged over seeds.
    X = _blobs(6000, 16, seed=1)

    def inertia(c):
        return float(((X - c[_partition.assign(X, c)]) ** 2).sum())

    ratios = []
    for seed in range(3):
        lloyd, _ = _partition.train_coarse_streamed(X, None, 40, max_iter=10,
                                                    random_state=seed, gather=True)
        with _quantizer.one_openmp_thread():
            km, _, _ = _quantizer.fit_kmeans(X, 40, max_iter=10, random_state=seed)
        ratios.append(inertia(lloyd) / inertia(km))
    assert np.mean(ratios) <= 1.02


# -- train_coarse: which path ------------------------------------------------------------

@pytest.mark.parametrize("n_train, n_lists, path", [
    (65535, 256, "kmeans"),             # just below LLOYD_THRESHOLD = 2**24
    (65536, 256, "gathered"),           # from it on: the sample in memory
    (2**20, 256, "gathered"),           # up to STREAMED_THRESHOLD = 2**28
    (2**20 + 1, 256, "streamed"),       # beyond: never held
])
def test_train_coarse_chooses_by_size_never_by_threads(monkeypatch, n_train, n_lists, path):
    calls = []
    monkeypatch.setattr(_partition, "fit_kmeans",
                        lambda X, k, **kw: calls.append(("kmeans", X.shape[0])) or (X[:k], 0, None))
    monkeypatch.setattr(_partition, "train_coarse_streamed",
                        lambda X, rows, k, gather, **kw: calls.append(
                            ("gathered" if gather else "streamed", kw["n_threads"])) or (X[:k], 0))
    X = np.zeros((1, 2), np.float32)
    rows = np.zeros(n_train, dtype=np.intp)  # row numbers only: nothing is computed
    for t in (1, 2):
        _partition.train_coarse(X, n_lists, rows=rows, random_state=0, n_threads=t)
    assert [c[0] for c in calls] == [path, path]
    if path != "kmeans":
        assert [c[1] for c in calls] == [1, 2]  # threads passed on


def test_ivfpq_fit_on_the_lloyd_path_is_independent_of_n_jobs(monkeypatch):
    X = _blobs(4000, 16, seed=2)

    def fit(n_jobs):
        return IVFPQNeighbors(5, n_lists=24, n_probe=3, n_subspaces=4, n_codewords=32,
                              metric="cosine", random_state=0, n_jobs=n_jobs).fit(X)

    kmeans = fit(1)
    monkeypatch.setattr(_partition, "LLOYD_THRESHOLD", 0)
    monkeypatch.setattr(_partition, "STREAM_TASK_ROWS", 512)
    a, b = fit(1), fit(2)
    assert not np.array_equal(a.cluster_centers_, kmeans.cluster_centers_)  # path switched
    for name in ("cluster_centers_", "codebooks_", "codes_", "ids_", "list_offsets_"):
        assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert_array_equal(a.kneighbors(X[:50])[1], b.kneighbors(X[:50])[1])


# -- assignment, coarse and list terms -----------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_assign_is_the_nearest_centroid(dtype):
    X = _blobs(700, 6, seed=4).astype(dtype)
    C = X[rng.choice(700, 30, replace=False)] + rng.randn(30, 6).astype(dtype)
    d = ((X[:, None, :].astype(np.float64) - C[None].astype(np.float64)) ** 2).sum(-1)
    labels = _partition.assign(X, C)
    assert labels.dtype == np.int64 and labels.shape == (700,)
    # Ties up to rounding aside, the L2-nearest centroid.
    best = d[np.arange(700), labels]
    assert_allclose(best, d.min(axis=1), rtol=1e-5, atol=1e-5)
    assert (labels == d.argmin(axis=1)).mean() > 0.99
    # Given buffers (a pass over chunks): the same labels.
    out = np.empty(700, dtype=np.intp)
    block = np.empty((64, 30), dtype=dtype)
    c_norms = np.einsum("ij,ij->i", C, C)
    _partition.assign(X, C, out=out, c_norms=c_norms, block=block)
    assert_array_equal(out, labels)


@pytest.mark.parametrize("inner_product", [False, True])
def test_coarse_terms_match_the_oracle(inner_product):
    Q = rng.randn(9, 8)
    C = rng.randn(13, 8)
    got = _partition.coarse_terms(Q, C, inner_product)
    assert_allclose(got, _naive.coarse_terms(Q, C, inner_product), rtol=1e-10, atol=1e-10)


def test_coarse_terms_l2_ip_rank_as_l2_and_score_as_ip():
    Q = rng.randn(9, 8)
    C = rng.randn(13, 8)
    rank, bias = _partition.coarse_terms_l2_ip(Q, C)
    # The ranking terms are ||q - c||^2 without the query's ||q||^2.
    l2 = _naive.coarse_terms(Q, C, False)
    assert_allclose(rank + (Q ** 2).sum(1)[:, None], l2, rtol=1e-10, atol=1e-10)
    assert_allclose(bias, _naive.coarse_terms(Q, C, True), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d,m", [(12, 4), (10, 4)])
def test_list_terms_are_the_list_part_of_the_l2_table(d, m, monkeypatch):
    """||q - c - r||^2 = ||q - c||^2 - 2 <q, r> + (||r||^2 + 2 <c, r>): the
    list terms are the last part, block by block."""
    k = 8
    cb = _quantizer.zero_padding(rng.randn(m, k, -(-d // m)), d)
    C = rng.randn(5, d)
    terms = _partition.list_terms(C, cb)
    assert terms.shape == (5, m, k) and terms.dtype == cb.dtype
    blocks = _quantizer.pad_features(C, m).reshape(5, m, -1)
    want = (cb ** 2).sum(-1)[None] + 2 * np.einsum("ljd,jkd->ljk", blocks, cb)
    assert_allclose(terms, want, rtol=1e-12, atol=1e-12)
    # Beyond the memory cap the search builds each table from the residual query.
    monkeypatch.setattr(_partition, "LIST_TERMS_MAX_BYTES", 0)
    assert _partition.list_terms(C, cb).shape == (0, m, k)


def test_chunk_rows_bounds_the_temporary():
    assert _partition.chunk_rows(1000, 10**6) == 1000
    assert _partition.chunk_rows(10**9, 10) == 1
    assert _partition.chunk_rows(0, 7) == 7
