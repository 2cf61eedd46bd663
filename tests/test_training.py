"""Training: results independent of n_jobs, and the KMeans schedule."""

import os

import numpy as np
import pytest
from numpy.testing import assert_array_equal

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
