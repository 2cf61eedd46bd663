"""Training: results independent of n_jobs, and the KMeans schedule."""

import os
import warnings

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from threadpoolctl import threadpool_limits

from pqsk import IVFPQNeighbors, PQTransformer

needs_two_cpus = pytest.mark.skipif(
    (os.cpu_count() or 1) < 2, reason="n_jobs=2 runs one thread on one CPU")


@pytest.fixture(scope="module")
def X():
    rng = np.random.RandomState(0)
    return rng.randn(4000, 16).astype(np.float32)


@needs_two_cpus
def test_ivfpq_training_independent_of_n_jobs(X):
    # Finding 10: the coarse KMeans ran on n_jobs OpenMP threads, and its
    # per-thread partial sums made the centroids (then the residual
    # codebooks and the answers) depend on n_jobs.
    fitted = [
        IVFPQNeighbors(n_neighbors=5, n_lists=16, n_probe=2, n_subspaces=4,
                       n_codewords=32, random_state=0, n_jobs=n_jobs).fit(X)
        for n_jobs in (1, 2)
    ]
    a, b = fitted
    assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert_array_equal(a.codebooks_, b.codebooks_)
    assert_array_equal(a.codes_, b.codes_)
    assert_array_equal(a.ids_, b.ids_)
    assert_array_equal(a.list_offsets_, b.list_offsets_)
    da, ia = a.kneighbors(X[:300])
    db, ib = b.kneighbors(X[:300])
    assert_array_equal(ia, ib)
    assert_array_equal(da, db)


@needs_two_cpus
@pytest.mark.parametrize("n_subspaces", [1, 2])
def test_pq_training_independent_of_n_jobs(X, n_subspaces):
    # With fewer sub-spaces than threads, each sub-space's KMeans used to
    # get the spare OpenMP threads (n_subspaces=1: both).
    a, b = (PQTransformer(n_subspaces=n_subspaces, n_codewords=64, random_state=0,
                          n_jobs=n_jobs).fit(X) for n_jobs in (1, 2))
    assert_array_equal(a.codebooks_, b.codebooks_)
    assert a.n_iter_ == b.n_iter_


# --- the KMeans schedule (pqsk._quantizer, "k-means training") ----------------

def _schedule_oracle(A, k, max_iter, random_state, tol=1e-4):
    """The documented two-stage schedule, spelled out with sklearn KMeans:
    max_iter - ceil(max_iter / 4) iterations on 64 * k random rows, then
    ceil(max_iter / 4) on every row from those centres."""
    from sklearn.cluster import KMeans

    with threadpool_limits(limits=1, user_api="openmp"):  # as pqsk runs KMeans
        return _two_stages(KMeans, A, k, max_iter, random_state, tol)


def _two_stages(KMeans, A, k, max_iter, random_state, tol):
    n_refine = -(-max_iter // 4)
    rs = np.random.RandomState(random_state) if np.isscalar(random_state) else random_state
    first = A[np.sort(rs.choice(A.shape[0], size=64 * k, replace=False))]
    km1 = KMeans(k, init="random", n_init=1, max_iter=max_iter - n_refine, tol=tol,
                 random_state=rs).fit(first)
    km2 = KMeans(k, init=km1.cluster_centers_, n_init=1, max_iter=n_refine,
                 tol=tol).fit(np.ascontiguousarray(A))
    return km2.cluster_centers_, km1.n_iter_ + km2.n_iter_


def test_codebooks_follow_the_two_stage_schedule():
    # Finding 14: a sample of more than 128 rows per codeword is clustered
    # in two stages (it used to be max_iter full Lloyd passes over it).
    rng = np.random.RandomState(1)
    k, m, n = 16, 2, 2 * 64 * 16 + 300
    X = rng.randn(n, 6).astype(np.float32)
    pq = PQTransformer(n_subspaces=m, n_codewords=k, max_train_samples=None,
                       random_state=0).fit(X)
    # _fit_codebooks draws one seed per sub-space from random_state.
    seeds = np.random.RandomState(0).randint(np.iinfo(np.int32).max, size=m)
    iters = []
    for j in range(m):
        centres, n_iter = _schedule_oracle(X[:, 3 * j:3 * (j + 1)], k, 25, seeds[j])
        assert_array_equal(pq.codebooks_[j], centres)
        iters.append(n_iter)
    assert pq.n_iter_ == max(iters) <= 25


def test_small_sample_is_one_kmeans():
    # At most 128 rows per codeword: one KMeans(max_iter) on every row.
    from sklearn.cluster import KMeans

    rng = np.random.RandomState(2)
    k, n = 16, 2 * 64 * 16
    X = rng.randn(n, 4)
    pq = PQTransformer(n_subspaces=1, n_codewords=k, max_iter=7, random_state=3).fit(X)
    seed = np.random.RandomState(3).randint(np.iinfo(np.int32).max, size=1)[0]
    with threadpool_limits(limits=1, user_api="openmp"):
        km = KMeans(k, init="random", n_init=1, max_iter=7, random_state=seed).fit(X)
    assert_array_equal(pq.codebooks_[0], km.cluster_centers_)
    assert pq.n_iter_ == km.n_iter_


def test_ivfpq_coarse_quantizer_follows_the_schedule(X):
    # The coarse quantizer uses the same schedule: coarse_max_iter=10 is 7
    # iterations on 64 rows per list, then 3 on the training sample (here
    # all 4000 rows: fewer than 256 per list).
    nn = IVFPQNeighbors(n_lists=16, n_subspaces=4, n_codewords=32, random_state=0).fit(X)
    centres, _ = _schedule_oracle(X, 16, 10, np.random.RandomState(0))
    assert_array_equal(nn.cluster_centers_, centres)


def test_few_distinct_rows_in_a_large_sample():
    # Exact codebooks when a sub-space has at most k distinct sub-vectors,
    # on a sample large enough for two stages.
    rng = np.random.RandomState(3)
    k = 16
    values = rng.randn(12, 2).astype(np.float32)
    X = values[rng.randint(12, size=3 * 64 * k)]
    pq = PQTransformer(n_subspaces=1, n_codewords=k, random_state=0).fit(X)
    assert pq.n_iter_ == 0
    assert_array_equal(pq.inverse_transform(pq.transform(X)), X)
    # More distinct rows than k, but the stage-1 subset sees at most k of
    # them: one weighted KMeans on the distinct rows of the whole sample.
    rare = rng.randn(30, 2).astype(np.float32)
    Y = np.vstack([X, rare])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pq = PQTransformer(n_subspaces=1, n_codewords=k, random_state=0).fit(Y)
    assert 0 < pq.n_iter_ <= 25
    # The 12 frequent values carry almost all the weight: each keeps a
    # codeword, at most slightly pulled by rare rows joining its cell.
    err = ((pq.inverse_transform(pq.transform(values)) - values) ** 2).sum(axis=1)
    assert err.max() < 1e-3 * values.var()


# -- duplicate rows: scikit-learn's "distinct clusters" warning, in pqsk's words -----

SKLEARN_DISTINCT = "Number of distinct clusters"
PQSK_DISTINCT = "k-means found fewer distinct codewords than n_codewords"


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_duplicate_rows_warn_once_in_pqsk_words(n_jobs):
    # Digits repeat sub-vectors: the KMeans of two residual sub-spaces keep
    # fewer distinct centres than n_codewords, and scikit-learn warned for
    # each (from worker threads with n_jobs=2).
    from sklearn.datasets import load_digits
    X = load_digits().data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filters = list(warnings.filters)
        IVFPQNeighbors(n_lists=64, random_state=0, n_jobs=n_jobs).fit(X)
        assert warnings.filters == filters  # the mute did not outlive the fit
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if SKLEARN_DISTINCT in m], messages
    ours = [w for w in caught if PQSK_DISTINCT in str(w.message)]
    assert len(ours) == 1, messages
    assert ours[0].category is UserWarning
    text = str(ours[0].message)
    assert "n_codewords=256 in 2 of 32 sub-spaces" in text
    assert "sub-space 19: 255, from 369 distinct sub-vectors" in text
    assert "1,797 training rows" in text


def test_coarse_quantizer_duplicates_warn_once_in_pqsk_words(monkeypatch):
    from sklearn.exceptions import ConvergenceWarning

    from pqsk import _partition, _quantizer

    def fit_kmeans(X, k, **kw):  # as KMeans on duplicate rows
        warnings.warn(f"{SKLEARN_DISTINCT} ({k - 3}) found smaller than n_clusters ({k}). "
                      "Possibly due to duplicate points in X.", ConvergenceWarning)
        return X[:k], 5, _quantizer.Distinct(40, k - 3, False)

    monkeypatch.setattr(_partition, "fit_kmeans", fit_kmeans)
    X = np.random.RandomState(0).randn(200, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _partition.train_coarse(X, 16, random_state=0)
    assert [str(w.message)[:60] for w in caught] == [
        "the coarse quantizer's k-means found 13 distinct centroids f"]
    assert "from 40 distinct rows of its 200 training rows" in str(caught[0].message)
    assert "3 centroids without a row" in str(caught[0].message)


def test_few_distinct_rows_used_as_codewords_warn_nothing():
    # At most n_codewords distinct sub-vectors are the codewords (exact):
    # nothing is lost, nothing said.
    from sklearn.datasets import load_digits
    X = load_digits().data
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PQTransformer(n_subspaces=64, n_codewords=32, random_state=0).fit(X)
