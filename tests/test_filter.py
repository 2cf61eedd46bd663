"""Filtered search: ``kneighbors(..., filter=...)`` and ``kneighbors_graph``.

Every estimator is checked against brute force on the allowed set (exact
settings: flat, IVF with n_probe = n_lists, HNSW with a beam as wide as
the graph, all with re-ranking of every candidate) and, at approximate
settings, for the contract: every id returned is allowed, and each query
gets k results whenever k allowed (and not removed) ids exist.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import sparse
from sklearn.neighbors import NearestNeighbors

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, _hnswpq, _naive

rng = np.random.RandomState(0)
N, D = 1200, 8
X = rng.randn(N, D).astype(np.float32)
Q = rng.randn(12, D).astype(np.float32)
K = 5

# Exact settings: every allowed id is a candidate and re-ranked exactly.
EXACT = {
    "flat": lambda: PQNeighbors(K, n_subspaces=4, n_codewords=32, refine_factor=N,
                                random_state=0),
    "flat4": lambda: PQNeighbors(K, n_subspaces=4, n_codewords=16, refine_factor=N,
                                 random_state=0),
    "ivf": lambda: IVFPQNeighbors(K, n_lists=8, n_probe=8, n_subspaces=4, n_codewords=32,
                                  refine_factor=N, random_state=0),
    "ivf4": lambda: IVFPQNeighbors(K, n_lists=8, n_probe=8, n_subspaces=4, n_codewords=16,
                                   refine_factor=N, random_state=0),
    "hnsw": lambda: HNSWPQNeighbors(K, n_links=8, ef_construction=32, ef_search=N,
                                    n_subspaces=4, n_codewords=32, refine_factor=1,
                                    random_state=0),
}
# Approximate settings: one list probed, a narrow beam, no re-ranking.
APPROX = {
    "flat4": lambda: PQNeighbors(K, n_subspaces=4, n_codewords=16, random_state=0),
    "ivf": lambda: IVFPQNeighbors(K, n_lists=16, n_probe=1, n_subspaces=4, n_codewords=32,
                                  random_state=0),
    "ivf4": lambda: IVFPQNeighbors(K, n_lists=16, n_probe=1, n_subspaces=4,
                                   n_codewords=16, random_state=0),
    "ivf_segments": lambda: IVFPQNeighbors(K, n_lists=16, n_probe=1, n_subspaces=4,
                                           n_codewords=16, segment_size=1024,
                                           random_state=0),
    "hnsw": lambda: HNSWPQNeighbors(K, n_links=8, ef_construction=32, ef_search=16,
                                    n_subspaces=4, n_codewords=32, random_state=0),
    "hnsw_segments": lambda: HNSWPQNeighbors(K, n_links=8, ef_construction=32,
                                             ef_search=16, n_subspaces=4, n_codewords=32,
                                             segment_size=1024, random_state=0),
}

_FITTED = {}


def fitted(table, key):
    if (table, key) not in _FITTED:
        est = (EXACT if table == "exact" else APPROX)[key]()
        if key.endswith("segments"):  # sealed segments and a growing part
            est.fit(X[:700]).partial_fit(X[700:])
        else:
            est.fit(X)
        _FITTED[table, key] = est
    return _FITTED[table, key]


def brute(allowed_ids, Qs, k):
    """Exact (dist, ids) of the k nearest allowed points, padded (inf, -1)."""
    dist = np.full((Qs.shape[0], k), np.inf)
    ind = np.full((Qs.shape[0], k), -1)
    kk = min(k, allowed_ids.size)
    if kk:
        d, i = NearestNeighbors(n_neighbors=kk).fit(X[allowed_ids]).kneighbors(Qs)
        dist[:, :kk], ind[:, :kk] = d, allowed_ids[i]
    return dist, ind


def check_contract(est, ind, allowed_rows, k):
    """Every id allowed, never removed; k results when k are allowed."""
    for row, ok in zip(ind, allowed_rows):
        live = ok if est.removed_ is None else ok & ~est.removed_
        found = row[row >= 0]
        assert live[found].all()
        assert len(set(found)) == found.size
        assert found.size == min(k, int(live.sum()))
        assert np.all(row[found.size:] == -1)


@pytest.mark.parametrize("key", sorted(EXACT))
@pytest.mark.parametrize("share", [0.5, 0.1, 0.01])
def test_exact_settings_match_brute_force(key, share):
    est = fitted("exact", key)
    allowed = np.random.RandomState(1).rand(N) < share
    d, i = est.kneighbors(Q, filter=allowed)
    d_ref, i_ref = brute(np.flatnonzero(allowed), Q, K)
    assert_array_equal(i, i_ref)
    assert_allclose(d, d_ref, rtol=1e-4, atol=1e-5)
    # The same filter given as ids.
    d2, i2 = est.kneighbors(Q, filter=np.flatnonzero(allowed))
    assert_array_equal(i2, i)


@pytest.mark.parametrize("key", ["hnsw"])
def test_hnsw_scan_and_walk_agree(key, monkeypatch):
    # With a beam as wide as the graph, the walk through rejected nodes
    # and the scan of the allowed ids find the same ADC neighbours.
    est = HNSWPQNeighbors(K, n_links=8, ef_construction=32, ef_search=N, n_subspaces=4,
                          n_codewords=32, random_state=0).fit(X)
    allowed = np.random.RandomState(2).rand(N) < 0.3
    monkeypatch.setattr(_hnswpq, "FILTER_SCAN_MIN", 0)
    monkeypatch.setattr(_hnswpq, "FILTER_SCAN_FRACTION", 0.0)
    d_walk, i_walk = est.kneighbors(Q, filter=allowed)
    monkeypatch.setattr(_hnswpq, "FILTER_SCAN_MIN", N + 1)
    d_scan, i_scan = est.kneighbors(Q, filter=allowed)
    assert_array_equal(i_walk, i_scan)
    assert_allclose(d_walk, d_scan, rtol=1e-5)


def test_flat_matches_naive_adc_oracle():
    est = PQNeighbors(K, n_subspaces=4, n_codewords=32, refine_factor=0,
                      random_state=0).fit(X)
    allowed = np.random.RandomState(3).rand(N) < 0.2
    d, i = est.kneighbors(Q, n_neighbors=7, filter=allowed, return_distance=True)
    tables = _naive.adc_tables(Q, est.codebooks_, dtype=np.float32)
    ids = np.flatnonzero(allowed)
    for q in range(Q.shape[0]):
        dist = _naive.adc_distances(tables[q], est.codes_[ids])
        ref_d, ref_i = _naive.top_k(dist, ids, 7)
        assert_array_equal(i[q], ref_i)
        assert_allclose(d[q], np.sqrt(np.maximum(ref_d, 0)), rtol=1e-5)


@pytest.mark.parametrize("key", sorted(APPROX))
@pytest.mark.parametrize("share", [0.5, 0.1, 0.01, 0.002])
def test_approximate_settings_keep_the_contract(key, share):
    est = fitted("approx", key)
    allowed = np.random.RandomState(4).rand(N) < share
    ind = est.kneighbors(Q, n_neighbors=10, return_distance=False, filter=allowed)
    check_contract(est, ind, [allowed] * Q.shape[0], 10)


@pytest.mark.parametrize("key", sorted(APPROX))
def test_per_query_sparse_filter(key):
    est = fitted("approx", key)
    r = np.random.RandomState(5)
    dense = r.rand(Q.shape[0], N) < r.choice([0.5, 0.05, 0.004], size=(Q.shape[0], 1))
    dense[0] = False  # a query that may return nothing
    M = sparse.csr_matrix(dense)
    d, i = est.kneighbors(Q, n_neighbors=10, filter=M)
    check_contract(est, i, dense, 10)
    assert np.all(np.isinf(d[i < 0])) and np.all(np.isfinite(d[i >= 0]))
    # Row q is searched exactly as with its own mask as a shared filter.
    for q in range(Q.shape[0]):
        dq, iq = est.kneighbors(Q[q:q + 1], n_neighbors=10, filter=dense[q])
        assert_array_equal(iq[0], i[q])
        assert_allclose(dq[0], d[q], rtol=1e-6)
    # A 2-d boolean array is the same filter; stored zeros allow nothing.
    assert_array_equal(est.kneighbors(Q, 10, False, filter=dense), i)
    M0 = M.astype(np.int8)
    M0.data[:] = 0
    assert np.all(est.kneighbors(Q, 10, False, filter=M0) == -1)


@pytest.mark.parametrize("key", sorted(APPROX))
def test_single_row_empty_and_all_false_filters(key):
    est = fitted("approx", key)
    # One allowed id: it is every query's only neighbour.
    for f in (np.array([17]), np.arange(N) == 17):
        d, i = est.kneighbors(Q, n_neighbors=3, filter=f)
        assert np.all(i[:, 0] == 17) and np.all(i[:, 1:] == -1)
        assert np.all(np.isfinite(d[:, 0])) and np.all(np.isinf(d[:, 1:]))
    # One query.
    allowed = np.arange(N) % 7 == 0
    d, i = est.kneighbors(Q[:1], n_neighbors=4, filter=allowed)
    assert i.shape == (1, 4) and allowed[i].all()
    # Nothing allowed: rows of (inf, -1); the graph has no edge.
    for f in ([], np.array([], dtype=np.int64), np.zeros(N, bool),
              sparse.csr_matrix((Q.shape[0], N), dtype=bool)):
        d, i = est.kneighbors(Q, n_neighbors=4, filter=f)
        assert np.all(i == -1) and np.all(np.isinf(d))
        G = est.kneighbors_graph(Q, n_neighbors=4, filter=f)
        assert G.shape == (Q.shape[0], N) and G.nnz == 0


def test_kneighbors_graph_with_filter():
    est = fitted("exact", "flat")
    allowed = np.zeros(N, bool)
    allowed[[3, 9, 400]] = True
    G = est.kneighbors_graph(Q, n_neighbors=K, mode="distance", filter=allowed)
    assert G.shape == (Q.shape[0], N)
    assert_array_equal(np.diff(G.indptr), 3)
    assert_array_equal(np.unique(G.indices), [3, 9, 400])
    d, i = est.kneighbors(Q, n_neighbors=K, filter=allowed)
    assert_allclose(G.toarray()[np.arange(Q.shape[0])[:, None], i[:, :3]], d[:, :3])
    full = est.kneighbors_graph(Q, n_neighbors=K, filter=np.ones(N, bool))
    assert_array_equal(np.diff(full.indptr), K)


@pytest.mark.parametrize("key", ["flat", "ivf", "hnsw"])
def test_filter_with_x_none_excludes_each_point(key):
    est = fitted("exact", key)
    allowed = np.random.RandomState(6).rand(N) < 0.3
    ind = est.kneighbors(None, n_neighbors=3, return_distance=False, filter=allowed)
    assert ind.shape == (N, 3)
    assert allowed[ind].all()
    assert not np.any(ind == np.arange(N)[:, None])
    # Brute force over the allowed points, each point excluded.
    ids = np.flatnonzero(allowed)
    _, ref = NearestNeighbors(n_neighbors=4).fit(X[ids]).kneighbors(X)
    ref = ids[ref]
    for p in range(0, N, 37):
        expect = [j for j in ref[p] if j != p][:3]
        assert_array_equal(ind[p], expect)
    # Per-query filter with X=None: row p may return only the ids in row p.
    dense = np.random.RandomState(7).rand(N, N) < 0.02
    ind = est.kneighbors(None, n_neighbors=3, return_distance=False,
                         filter=sparse.csr_matrix(dense))
    for p in range(N):
        found = ind[p][ind[p] >= 0]
        assert dense[p, found].all() and p not in found
        assert found.size == min(3, int(dense[p].sum() - dense[p, p]))


@pytest.mark.parametrize("key", ["ivf", "hnsw", "ivf_segments", "hnsw_segments"])
def test_filter_and_removals(key):
    est = APPROX[key]()
    if key.endswith("segments"):
        est.fit(X[:700]).partial_fit(X[700:])
    else:
        est.fit(X)
    est.remove(np.arange(0, N, 3))
    allowed = np.arange(N) % 2 == 0  # live and allowed: ids 2, 4, 8, 10, ...
    ind = est.kneighbors(Q, n_neighbors=10, return_distance=False, filter=allowed)
    check_contract(est, ind, [allowed] * Q.shape[0], 10)
    few = np.array([0, 3, 6, 9, 10])  # only 10 is live
    d, i = est.kneighbors(Q, n_neighbors=3, filter=few)
    assert np.all(i[:, 0] == 10) and np.all(i[:, 1:] == -1)


@pytest.mark.parametrize("bad, error, match", [
    (np.ones(N - 1, bool), ValueError, "one entry per indexed id"),
    (np.ones((2, 3, 4), bool), ValueError, "1-d"),
    (np.array([0, N]), ValueError, r"lie in \[0, 1200\)"),
    (np.array([-1, 3]), ValueError, r"lie in \[0, 1200\)"),
    (np.array([[1, 2]]), ValueError, "1-d"),
    (np.ones(N, np.float64), TypeError, "boolean mask or integer ids"),
    (np.array(["a"]), TypeError, "boolean mask or integer ids"),
    ("abc", TypeError, "filter must be"),
    (3, TypeError, "filter must be"),
    (sparse.csr_matrix((5, N), dtype=bool), ValueError, r"shape \(n_queries"),
    (sparse.csr_matrix((12, N + 1), dtype=bool), ValueError, r"shape \(n_queries"),
    (sparse.csr_matrix((12, N), dtype=np.float64), TypeError, "booleans"),
    (np.ones((5, N), bool), ValueError, r"shape \(n_queries"),
    (np.ones(N, np.int8), ValueError, r"astype\(bool\)"),
    (sparse.csr_matrix(-np.eye(12, N, dtype=np.int8)), ValueError, "negative entries"),
])
def test_bad_filters_are_refused(bad, error, match):
    est = fitted("approx", "ivf")
    with pytest.raises(error, match=match):
        est.kneighbors(Q, filter=bad)
    with pytest.raises(error, match=match):
        est.kneighbors_graph(Q, filter=bad)


def test_kernel_wrappers_refuse_short_masks():
    # The kernels trust the mask length: the wrappers check it.
    from pqsk import _scorers
    from pqsk._filter import Blocked

    est = fitted("approx", "flat4")
    cb = np.ascontiguousarray(est.codebooks_)
    codes = np.zeros((50, 4), np.uint8)
    with pytest.raises(ValueError, match="does not cover"):
        _scorers.adc_search(Q, cb, codes, 3, blocked=Blocked(np.zeros(49, np.uint8), 0, 49))
    with pytest.raises(ValueError, match="does not cover"):
        _scorers.adc_search(Q, cb, codes, 3,
                            blocked=Blocked(np.zeros(50 * 11, np.uint8), 50, 50))


@pytest.mark.parametrize("key", ["hnsw", "hnsw_segments"])
@pytest.mark.parametrize("share", [0.1, 0.01, 0.002])
def test_hnsw_walk_alone_keeps_the_contract(key, share, monkeypatch):
    # The scan of few allowed ids switched off: the beam, walking through
    # rejected nodes, must still find k allowed ones.
    monkeypatch.setattr(_hnswpq, "FILTER_SCAN_MIN", 0)
    monkeypatch.setattr(_hnswpq, "FILTER_SCAN_FRACTION", 0.0)
    est = fitted("approx", key)
    allowed = np.random.RandomState(8).rand(N) < share
    ind = est.kneighbors(Q, n_neighbors=10, return_distance=False, filter=allowed)
    check_contract(est, ind, [allowed] * Q.shape[0], 10)
    dense = np.random.RandomState(9).rand(Q.shape[0], N) < share
    ind = est.kneighbors(Q, n_neighbors=10, return_distance=False,
                         filter=sparse.csr_matrix(dense))
    check_contract(est, ind, dense, 10)


@pytest.mark.parametrize("key", ["flat", "ivf", "hnsw"])
def test_radius_neighbors_with_filter(key):
    est = fitted("exact", key)
    allowed = np.random.RandomState(10).rand(N) < 0.2
    radius = 2.0
    dist, ind = est.radius_neighbors(Q, radius=radius, filter=allowed)
    ids = np.flatnonzero(allowed)
    ref_d, ref_i = NearestNeighbors().fit(X[ids]).radius_neighbors(Q, radius=radius,
                                                                   sort_results=True)
    for q in range(Q.shape[0]):
        assert_array_equal(ind[q], ids[ref_i[q]])
        assert_allclose(dist[q], ref_d[q], rtol=1e-4, atol=1e-5)
    # Per query, and X=None (each point excluded); the graph form.
    dense = np.random.RandomState(11).rand(Q.shape[0], N) < 0.1
    ind = est.radius_neighbors(Q, radius=radius, return_distance=False,
                               filter=sparse.csr_matrix(dense))
    for q in range(Q.shape[0]):
        near = np.flatnonzero(dense[q] & (np.linalg.norm(X - Q[q], axis=1) <= radius))
        assert_array_equal(np.sort(ind[q]), near)
    ind = est.radius_neighbors(None, radius=1.0, return_distance=False, filter=allowed)
    for p in range(0, N, 53):
        near = np.flatnonzero(allowed & (np.linalg.norm(X - X[p], axis=1) <= 1.0))
        assert_array_equal(np.sort(ind[p]), near[near != p])
    G = est.radius_neighbors_graph(Q, radius=radius, filter=np.zeros(N, bool))
    assert G.nnz == 0 and G.shape == (Q.shape[0], N)


# -- issue 21, item 6: one rule for masks and ids --------------------------------

@pytest.mark.parametrize("key", ["flat", "ivf", "hnsw"])
@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int64])
def test_int_01_array_of_n_entries_is_ambiguous(key, dtype):
    # np.ones(n, np.int8) used to read as the ids [1, 1, ...] (only id 1
    # allowed), while the same 0/1 values in a sparse matrix are a mask.
    est = fitted("exact", key)
    mask = np.random.RandomState(12).rand(N) < 0.3
    for f in (np.ones(N, dtype), np.zeros(N, dtype), mask.astype(dtype)):
        for call in (lambda: est.kneighbors(Q, filter=f),
                     lambda: est.kneighbors_graph(Q, filter=f),
                     lambda: est.radius_neighbors(Q, radius=1.0, filter=f),
                     lambda: est.radius_neighbors_graph(Q, radius=1.0, filter=f)):
            with pytest.raises(ValueError, match=r"all 0 or 1.*astype\(bool\).*"
                                                 r"np\.flatnonzero\(mask\)"):
                call()
    # Either reading, made explicit, is accepted and means what it says.
    d, i = est.kneighbors(Q, filter=mask.astype(dtype).astype(bool))
    d_ref, i_ref = brute(np.flatnonzero(mask), Q, K)
    assert_array_equal(i, i_ref)
    assert_array_equal(est.kneighbors(Q, return_distance=False,
                                      filter=np.flatnonzero(mask)), i)
    ids01 = np.unique(np.ones(N, dtype))  # the ids reading of np.ones: id 1
    i1 = est.kneighbors(Q, n_neighbors=2, return_distance=False, filter=ids01)
    assert np.all(i1[:, 0] == 1) and np.all(i1[:, 1] == -1)


@pytest.mark.parametrize("f, allowed", [
    (np.ones(N - 1, np.int8), [1]),            # another length: ids
    (np.ones(N + 1, np.int8), [1]),
    (np.r_[np.zeros(N - 1, np.int64), 2], [0, 2]),  # another value: ids
    (np.r_[np.ones(N - 1, np.uint16), 5], [1, 5]),
    ([0, 1], [0, 1]),                          # a short list of ids
])
def test_unambiguous_integer_arrays_are_ids(f, allowed):
    est = fitted("exact", "flat")
    i = est.kneighbors(Q, n_neighbors=3, return_distance=False, filter=f)
    assert_array_equal(np.sort(i[:, :len(allowed)], axis=1),
                       np.tile(allowed, (Q.shape[0], 1)))
    assert np.all(i[:, len(allowed):] == -1)


def test_ambiguity_needs_exactly_n_samples_fit_entries():
    # The rule reads the index's n_samples_fit_, also on a tiny index,
    # where ids without repeats can still be all of 0..n-1: a boolean
    # mask is then the unambiguous form.
    est = PQNeighbors(1, n_subspaces=2, n_codewords=1, random_state=0).fit(X[:2])
    for f in ([0, 1], [1, 0], np.array([1, 1], np.int32)):
        with pytest.raises(ValueError, match="could be a mask or a list of ids"):
            est.kneighbors(Q[:1], filter=f)
    assert est.kneighbors(Q[:1], return_distance=False, filter=[True, False])[0, 0] == 0
    assert est.kneighbors(Q[:1], return_distance=False, filter=[1])[0, 0] == 1


@pytest.mark.parametrize("key", ["flat", "ivf", "hnsw"])
def test_sparse_integer_filters_are_masks(key):
    # Whatever the dtype: 0 blocks, any positive value allows (a count),
    # exactly as the boolean matrix of the positive entries.
    est = fitted("exact", key)
    r = np.random.RandomState(13)
    counts = r.randint(0, 4, size=(Q.shape[0], N)) * (r.rand(Q.shape[0], N) < 0.2)
    ref = est.kneighbors(Q, return_distance=False, filter=sparse.csr_matrix(counts > 0))
    for dtype in (np.int8, np.uint8, np.int32, np.uint64):
        M = sparse.csr_matrix(counts.astype(dtype))
        assert_array_equal(est.kneighbors(Q, return_distance=False, filter=M), ref)
        assert_array_equal(est.kneighbors(Q, return_distance=False,
                                          filter=sparse.coo_array(M)), ref)
    # Duplicate entries allow if one does, even when their sum would wrap
    # around to 0 (uint8 128 + 128) or below (int8 100 + 100).
    for dtype, value in ((np.uint8, 128), (np.int8, 100), (np.int16, 0)):
        row, col = np.zeros(2, int), np.full(2, 17)
        dup = sparse.coo_matrix((np.array([value, value], dtype), (row, col)),
                                shape=(1, N))
        i = est.kneighbors(Q[:1], n_neighbors=2, return_distance=False, filter=dup)
        assert_array_equal(i[0], [17, -1] if value else [-1, -1])


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "lil", "dok"])
def test_sparse_filters_with_negative_entries_are_refused(fmt):
    # A -1 used to count as nonzero, i.e. allowed.
    est = fitted("approx", "ivf")
    dense = (np.random.RandomState(14).rand(Q.shape[0], N) < 0.3).astype(np.int8)
    dense[3, 40] = -1
    M = sparse.csr_matrix(dense).asformat(fmt)
    for call in (lambda: est.kneighbors(Q, filter=M),
                 lambda: est.kneighbors_graph(Q, filter=M),
                 lambda: est.radius_neighbors(Q, radius=1.0, filter=M)):
        with pytest.raises(ValueError, match=r"negative entries \(the smallest is -1\)"):
            call()
    # Also when a duplicate would cancel it out to a stored zero.
    dup = sparse.coo_matrix((np.array([1, -1], np.int8), ([0, 0], [5, 5])), shape=(1, N))
    with pytest.raises(ValueError, match="negative entries"):
        est.kneighbors(Q[:1], filter=dup)
    # A 2-d integer array is never a mask (as before), and says how to make one.
    with pytest.raises(ValueError, match=r"1-d.*astype\(bool\)"):
        est.kneighbors(Q, filter=dense)
