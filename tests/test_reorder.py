"""The reorder stage: pqsk._reorder.exact_rerank (kernel pqsk._rerank)
against its oracle (pqsk._naive.exact_rerank): row parts of a RowStore and memory-mapped
files, cosine scaling (zero rows included), inner products, empty and
out-of-range candidate ids, one and two threads."""

import numpy as np
import pytest

from pqsk import _naive, _reorder
from pqsk._store import RowStore

EMPTY = np.iinfo(np.int64).max
rng = np.random.RandomState(0)


def store_of(X, splits, tmp_path=None):
    """X as a RowStore of several parts; with tmp_path, the first part a
    memory-mapped file kept by reference."""
    store = RowStore.empty(X.shape[1], X.dtype)
    bounds = [0, *splits, X.shape[0]]
    for p, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = X[a:b]
        if tmp_path is not None and p == 0:
            path = tmp_path / "rows.npy"
            np.save(path, part)
            part = np.load(path, mmap_mode="r")
        store = store.appended(part)
    return store


def check(Q, store, X, cand, kn, ip, unit, n_threads=1):
    d, i = _reorder.exact_rerank(Q, store, cand, kn, ip, unit_norm=unit, n_threads=n_threads)
    d_ref, i_ref = _naive.exact_rerank(Q.astype(np.float64), X, cand, kn, ip, unit)
    assert d.dtype == X.dtype and i.dtype == np.int64 and d.shape == (Q.shape[0], kn)
    tol = 1e-4 if X.dtype == np.float32 else 1e-10
    np.testing.assert_allclose(d, d_ref, rtol=tol, atol=tol)
    for q in range(Q.shape[0]):
        gaps = np.diff(d_ref[q][np.isfinite(d_ref[q])])
        if np.all(gaps > 4 * tol * (1 + np.abs(d_ref[q]).max())):
            np.testing.assert_array_equal(i[q], i_ref[q])
        # sorted by (distance, id), no duplicates among filled slots
        filled = i[q][i[q] != EMPTY]
        assert len(set(filled.tolist())) == filled.size
    return d, i


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_rerank_matches_the_oracle(dtype, metric, n_threads, tmp_path):
    X = rng.randn(300, 7).astype(dtype)
    X[5] = 0                                   # a zero row (cosine: stays zero)
    store = store_of(X, [100, 101, 250], tmp_path)
    Q = rng.randn(20, 7).astype(dtype)
    cand = np.stack([rng.choice(300, 30, replace=False) for _ in range(20)]).astype(np.int64)
    cand[0] = np.r_[5, 6, 299, rng.choice(np.arange(7, 299), 27, replace=False)]
    cand[1, -4:] = EMPTY                       # empty slots
    cand[2, :] = EMPTY                         # nothing at all
    cand[3, 0] = 300                           # out of range
    check(Q, store, X, cand, 10, metric == "dot", metric == "cosine", n_threads)


def test_rerank_on_a_plain_array_and_no_candidates():
    X = rng.randn(50, 4).astype(np.float32)
    Q = rng.randn(3, 4).astype(np.float32)
    cand = np.tile(np.arange(50, dtype=np.int64), (3, 1))
    d, i = check(Q, X, X, cand, 50, False, False)
    # every candidate: the exact ranking of the whole set
    full = ((X[None] - Q[:, None]) ** 2).sum(-1)
    np.testing.assert_array_equal(np.sort(i, axis=1), np.tile(np.arange(50), (3, 1)))
    np.testing.assert_allclose(d, np.sort(full, axis=1), rtol=1e-5)
    d, i = _reorder.exact_rerank(Q[:0], X, cand[:0], 5)
    assert d.shape == (0, 5) and i.shape == (0, 5)
