"""Every search kernel against its naive twin in ``pqsk._naive``.

Property tests (hypothesis) on random small data, for every metric x
uint8 / uint16 codes x float32 / float64:

* kernel level, through the low-level entry points
  (``pqsk._quantizer.encode``, ``pqsk._scorers.adc_search / ivf_search``,
  ``pqsk._partition.coarse_terms / list_terms`` and
  ``pqsk._hnsw.hnsw_search``);
* estimator level: ``kneighbors`` of a fitted :class:`PQNeighbors`,
  :class:`IVFPQNeighbors` or :class:`HNSWPQNeighbors` equals the twin
  applied to the fitted arrays.

How results are compared.  The PQ and IVF twins compute distances in
float64, the kernels in the data's dtype (IVF through a different but
equivalent decomposition), so distances agree up to a tolerance ``tol``
scaled by the magnitudes involved.  :func:`check_top_k` then requires, for
each query, that the kernel's answer is the true top-k up to ``tol``: the
distance reported for each returned id is that id's distance, the r-th
distance is the twin's r-th, every candidate clearly inside the top-k is
returned, and wherever the twin's distances are separated by more than the
tolerance the ids are exactly the twin's.  Candidates whose kernel distance
is bit-identical (same code in the same list) must be ranked by id.

The HNSW twin repeats the kernel's float32 arithmetic operation for
operation (float32 tables, terms added in the same order), so the graph
walk makes the same decisions: ids, distances and even the number of
distance computations must be exactly equal.
"""

import os
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.preprocessing import normalize

from pqsk import (HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, _hnsw, _naive, _partition,
                  _quantizer, _scorers)

METRICS = ["euclidean", "sqeuclidean", "cosine", "dot"]
EMPTY_ID = np.iinfo(np.int64).max
# Relative tolerance of a kernel distance, times the squared norms involved.
RTOL = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-12}

# Examples per kernel test and parametrization (a quarter of that for the
# estimator tests, which fit an index each); raise it to hunt for bugs.
EXAMPLES = int(os.environ.get("PQSK_ORACLE_EXAMPLES", "40"))
KERNEL = settings(max_examples=EXAMPLES, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow])
# No shrinking there: each step refits, and a failure would take minutes
# to report; the examples drawn are small already.
ESTIMATOR = settings(max_examples=max(1, EXAMPLES // 4), deadline=None, database=None,
                     phases=[Phase.generate], suppress_health_check=[HealthCheck.too_slow])

grid = pytest.mark.parametrize("metric", METRICS)
code_grid = pytest.mark.parametrize("code_dtype", [np.uint8, np.uint16])
dtype_grid = pytest.mark.parametrize("dtype", [np.float32, np.float64])
seeds = st.integers(0, 2**32 - 1)


# --- comparison -------------------------------------------------------------------

def check_top_k(kd, ki, cand_ids, cand_d, tol, cand_keys=None):
    """Assert that the kernel row (kd, ki) is the top-len(kd) of the
    candidates (ids, exact distances) up to ``tol``; see the module
    docstring.  ``cand_keys``: equal keys mean bit-identical kernel
    distances (ties the kernel must break by the smaller id)."""
    kn = kd.shape[0]
    cand_ids = np.asarray(cand_ids, dtype=np.int64)
    cand_d = np.asarray(cand_d, dtype=np.float64)
    order = np.lexsort((cand_ids, cand_d))
    s_ids, s_d = cand_ids[order], cand_d[order]
    f = min(kn, cand_ids.size)
    # Slots no candidate can fill are empty; the others are real candidates.
    n_filled = int(np.sum(ki != EMPTY_ID))
    assert n_filled == f, f"{n_filled} slots filled, expected {f}: {ki}"
    assert np.all(np.isinf(kd[f:]) & (kd[f:] > 0)), kd
    assert np.all(ki[f:] == EMPTY_ID), ki
    got = [int(i) for i in ki[:f]]
    assert len(set(got)) == f, f"duplicate ids in {got}"
    where = {int(i): r for r, i in enumerate(cand_ids)}
    assert all(i in where for i in got), f"{got} not all among the candidates"
    true_d = cand_d[[where[i] for i in got]]
    assert np.all(np.abs(kd[:f] - true_d) <= tol), (kd[:f], true_d, tol)
    # Sorted by (distance, id).
    for r in range(f - 1):
        assert (kd[r], got[r]) < (kd[r + 1], got[r + 1]), (kd, ki)
    if f == 0:
        return
    # The r-th distance is the twin's r-th distance.
    assert np.all(np.abs(kd[:f] - s_d[:f]) <= 2 * tol), (kd[:f], s_d[:f], tol)
    # Every candidate clearly inside the top-f is returned.
    inside = set(s_ids[s_d < s_d[f - 1] - 2 * tol].tolist())
    assert inside <= set(got), (inside - set(got), got)
    # Where the twin's ranking is unambiguous, the ids are the twin's.
    gaps = np.diff(s_d)
    for r in range(f):
        alone = (r == 0 or gaps[r - 1] > 2 * tol) and (r == s_d.size - 1 or gaps[r] > 2 * tol)
        if alone:
            assert got[r] == s_ids[r], (r, got, s_ids[:f].tolist(), s_d[:f])
    # Bit-identical distances: the smaller id wins.
    if cand_keys is not None:
        keys = np.asarray(cand_keys)
        returned = set(got)
        for i in got:
            twins = cand_ids[keys == keys[where[i]]]
            lost = [int(o) for o in twins if int(o) not in returned and o < i]
            assert not lost, f"id {i} returned before tied ids {lost}"


def code_keys(codes, lists=None):
    """One integer per row: equal for equal codes (in the same list)."""
    rows = np.asarray(codes, dtype=np.int64)
    if lists is not None:
        rows = np.column_stack([lists, rows])
    if rows.shape[0] == 0:
        return np.empty(0, np.int64)
    return np.unique(rows, axis=0, return_inverse=True)[1].ravel()


def scale(Q, *point_sets):
    """Per query, (||q|| + sum of the largest norm of each point set)^2:
    a bound on every term the kernels add up."""
    s = np.linalg.norm(np.asarray(Q, np.float64), axis=1)
    for P in point_sets:
        P = np.asarray(P, np.float64)
        s = s + (np.linalg.norm(P, axis=-1).max() if P.size else 0.0)
    return s * s + 1e-30


def prepare(metric, A):
    """What the estimators do to data and queries before the kernels."""
    return normalize(A) if metric == "cosine" else A


def k_for(code_dtype, draw):
    if code_dtype == np.uint8:
        return draw(st.sampled_from([1, 2, 3, 16, 256]))
    return draw(st.sampled_from([257, 300]))


@st.composite
def pq_problem(draw, metric, code_dtype, dtype):
    """Random codebooks, codes drawn from a random subset of codewords (so
    that equal codes, hence exact ties, are common) and queries."""
    rng = np.random.RandomState(draw(seeds))
    m, ds = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    k = k_for(code_dtype, draw)
    n = draw(st.integers(0, 60))
    used = rng.choice(k, size=draw(st.integers(1, min(k, 8))), replace=False)
    codes = rng.choice(used, size=(n, m)).astype(code_dtype)
    codebooks = (rng.randn(m, k, ds) * draw(st.sampled_from([0.1, 1.0, 30.0]))).astype(dtype)
    if draw(st.booleans()):  # some codewords repeat others: exact ties
        copy = rng.rand(k) < 0.3
        codebooks[:, copy] = codebooks[:, rng.randint(0, k, size=copy.sum())]
    Q = prepare(metric, rng.randn(draw(st.integers(1, 4)), m * ds)).astype(dtype)
    return Q, codebooks, codes


# --- kernels --------------------------------------------------------------------

@grid
@code_grid
@dtype_grid
@KERNEL
@given(data=st.data())
def test_encode_matches_twin(metric, code_dtype, dtype, data):
    Q, codebooks, _ = data.draw(pq_problem(metric, code_dtype, dtype))
    m, k, ds = codebooks.shape
    X = np.ascontiguousarray(np.repeat(Q, 3, axis=0) + 0.1 * np.arange(3 * Q.shape[0])[:, None],
                             dtype=dtype)
    codes = _quantizer.encode(X, codebooks, n_threads=data.draw(st.integers(1, 2)))
    assert codes.dtype == _quantizer.code_dtype(k) and codes.shape == (X.shape[0], m)
    twin = _naive.encode(X.astype(np.float64), codebooks.astype(np.float64))
    for j in range(m):
        sub = X[:, j * ds:(j + 1) * ds].astype(np.float64)
        cb = codebooks[j].astype(np.float64)
        d_all = ((sub[:, None, :] - cb[None]) ** 2).sum(axis=2)
        got = codes[:, j].astype(np.int64)
        tol = RTOL[np.dtype(dtype)] * scale(sub, cb)
        # A nearest codeword, up to rounding ...
        assert np.all(d_all[np.arange(len(got)), got] <= d_all.min(axis=1) + tol)
        # ... the twin's wherever no other codeword is as near ...
        second = np.sort(d_all, axis=1)[:, 1] if k > 1 else np.full(len(got), np.inf)
        clear = second - d_all.min(axis=1) > 2 * tol
        assert_array_equal(got[clear], twin[clear, j])
        # ... and among equal codewords the first.
        first = np.array([np.flatnonzero((cb == cb[c]).all(axis=1))[0] for c in got])
        assert_array_equal(got, first)


@grid
@code_grid
@dtype_grid
@KERNEL
@given(data=st.data())
def test_adc_search_matches_twin(metric, code_dtype, dtype, data):
    Q, codebooks, codes = data.draw(pq_problem(metric, code_dtype, dtype))
    ip = metric == "dot"
    n = codes.shape[0]
    kn = data.draw(st.integers(1, n + 3))
    dist, idx = _scorers.adc_search(Q, codebooks, codes, kn, ip,
                                    n_threads=data.draw(st.integers(1, 2)))
    assert dist.dtype == dtype and idx.dtype == np.int64 and dist.shape == (Q.shape[0], kn)
    tables = _naive.adc_tables(Q, codebooks, ip)
    x_hat = _naive.decode(codes.astype(np.int64), codebooks)
    tol = RTOL[np.dtype(dtype)] * scale(Q, x_hat)
    keys = code_keys(codes)
    for q in range(Q.shape[0]):
        check_top_k(dist[q].astype(np.float64), idx[q], np.arange(n),
                    _naive.adc_distances(tables[q], codes), tol[q], keys)


@st.composite
def ivf_problem(draw, metric, code_dtype, dtype):
    """Random coarse centroids, residual codebooks, lists (some empty),
    codes and ids (any distinct non-negative ints, int32 or int64)."""
    Q, codebooks, codes = draw(pq_problem(metric, code_dtype, dtype))
    rng = np.random.RandomState(draw(seeds))
    n, D = codes.shape[0], Q.shape[1]
    n_lists = draw(st.integers(1, 6))
    centroids = prepare(metric, rng.randn(n_lists, D)).astype(dtype)
    if draw(st.booleans()):  # repeated centroids: lists tied in the coarse ranking
        centroids[rng.randint(0, n_lists, size=n_lists // 2)] = centroids[0]
    lists = np.sort(rng.randint(0, draw(st.integers(1, n_lists)), size=n))
    offsets = np.zeros(n_lists + 1, np.int64)
    np.cumsum(np.bincount(lists, minlength=n_lists), out=offsets[1:])
    id_dtype = draw(st.sampled_from([np.int32, np.int64]))
    ids = rng.choice(3 * n + 1, size=n, replace=False).astype(id_dtype)
    return Q, centroids, codebooks, codes, ids, offsets, lists


@grid
@code_grid
@dtype_grid
@KERNEL
@given(data=st.data())
def test_ivf_search_matches_twin(metric, code_dtype, dtype, data):
    Q, centroids, codebooks, codes, ids, offsets, lists = data.draw(
        ivf_problem(metric, code_dtype, dtype))
    ip = metric == "dot"
    n, n_lists = codes.shape[0], centroids.shape[0]
    kn = data.draw(st.integers(1, n + 3))
    n_probe = data.draw(st.integers(1, n_lists))
    coarse = _partition.coarse_terms(Q, centroids, ip)
    r_hat = _naive.decode(codes.astype(np.int64), codebooks)
    tol = RTOL[np.dtype(dtype)] * scale(Q, centroids, r_hat)
    assert_allclose(coarse, _naive.coarse_terms(Q, centroids, ip), rtol=0,
                    atol=tol.max())
    terms = (np.empty((0,) + codebooks.shape[:2], dtype) if ip
             else _partition.list_terms(centroids, codebooks))
    if not ip:  # ||r||^2 + 2 <c_l block j, r> for every list, block, codeword
        m, k, ds = codebooks.shape
        cb = codebooks.astype(np.float64)
        blocks = centroids.astype(np.float64).reshape(n_lists, m, ds)
        ref = (cb ** 2).sum(-1)[None] + 2 * np.einsum("ljd,jkd->ljk", blocks, cb)
        longest = np.sqrt((cb ** 2).sum(-1).max(axis=1).sum())  # largest ||r_hat||
        assert_allclose(terms, ref, rtol=0,
                        atol=RTOL[np.dtype(dtype)] * scale(centroids, [[longest]]).max())
    # The entries split across 1-3 sealed segments (each sorted by list):
    # the kernel scans a list's block in each, into one heap.
    n_seg = data.draw(st.integers(1, 3))
    owner = np.random.RandomState(data.draw(st.integers(0, 2**16))).randint(0, n_seg, n)
    segments = []
    for s in range(n_seg):
        sel = owner == s
        seg_off = np.zeros(n_lists + 1, np.int64)
        np.cumsum(np.bincount(lists[sel], minlength=n_lists), out=seg_off[1:])
        segments.append((np.ascontiguousarray(codes[sel]), np.ascontiguousarray(ids[sel]),
                         seg_off))
    if not ip and data.draw(st.booleans()):
        # Without the precomputed terms (too many lists): each list's table
        # is built from the residual query.
        terms = terms[:0]
    dist, idx = _scorers.ivf_search(Q, coarse, codebooks, terms, segments,
                                    kn, n_probe, ip, n_threads=data.draw(st.integers(1, 2)),
                                    centroids=centroids)
    assert dist.dtype == dtype and idx.dtype == np.int64 and dist.shape == (Q.shape[0], kn)
    keys = code_keys(codes, lists)
    key_of = dict(zip(ids.tolist(), keys.tolist()))
    for q in range(Q.shape[0]):
        # The kernel's coarse terms rank the lists (near-ties between lists
        # are its to break; the values were checked above).
        scanned = _naive.ivf_probe_order(coarse[q], offsets, n_probe, kn)
        cid, cd = _naive.ivf_candidates(Q[q], centroids, codebooks, codes, ids, offsets,
                                        scanned, ip)
        check_top_k(dist[q].astype(np.float64), idx[q], cid, cd, tol[q],
                    [key_of[i] for i in cid.tolist()])


def call_hnsw_kernel(Q, codebooks, codes, deleted, links0, upper, upper_off, entry_point,
                     max_level, ef, n_out, inner_product, n_threads):
    """``pqsk._hnsw.hnsw_search`` called directly (float32 graph search)."""
    m, k, _ = codebooks.shape
    n, nq = links0.shape[0], Q.shape[0]
    nt = n_threads
    codes8 = codes if codes.dtype == np.uint8 else np.empty((0, m), np.uint8)
    codes16 = codes if codes.dtype == np.uint16 else np.empty((0, m), np.uint16)
    dist = np.empty((nq, n_out), np.float32)
    idx = np.empty((nq, n_out), np.int64)
    n_dist = np.zeros(nq, np.int64)
    _hnsw.hnsw_search(
        np.ascontiguousarray(Q, dtype=np.float32),
        np.ascontiguousarray(codebooks.transpose(0, 2, 1), dtype=np.float32),
        codes8, codes16, deleted, links0, upper, upper_off, entry_point, max_level, ef,
        inner_product, dist, idx, n_dist,
        np.zeros((nt, n), np.uint32), np.zeros((nt, 1), np.uint32),
        np.empty((nt, n), np.float32), np.empty((nt, n), np.int64),
        np.empty((nt, ef + 1), np.float32), np.empty((nt, ef + 1), np.int64),
        np.empty((nt, m * k), np.float32), nt,
    )
    return dist, idx, n_dist


@st.composite
def random_graph(draw, n):
    """An arbitrary flat HNSW graph on n nodes: random links (self-links,
    repeats and unreachable nodes included), upper-level links only to
    nodes that have that level, an entry point on the top level."""
    rng = np.random.RandomState(draw(seeds))
    M = draw(st.integers(1, 4))
    levels = np.minimum(rng.geometric(draw(st.sampled_from([0.5, 0.8, 1.0])), size=n) - 1,
                        3).astype(np.int32)
    upper_off = np.zeros(n, np.int64)
    np.cumsum(levels[:-1], out=upper_off[1:])
    links0 = np.full((n, 2 * M), -1, np.int32)
    upper = np.full((int(levels.sum()), M), -1, np.int32)
    for i in range(n):
        c = rng.randint(0, 2 * M + 1)
        links0[i, :c] = rng.randint(0, n, size=c)
        for lev in range(1, levels[i] + 1):
            able = np.flatnonzero(levels >= lev)
            c = rng.randint(0, M + 1)
            upper[upper_off[i] + lev - 1, :c] = rng.choice(able, size=c)
    max_level = int(levels.max())
    entry = int(rng.choice(np.flatnonzero(levels == max_level)))
    return links0, upper, upper_off, entry, max_level


def reachable(links0, start):
    seen, todo = {start}, [start]
    while todo:
        for e in links0[todo.pop()]:
            if e < 0:
                break
            if int(e) not in seen:
                seen.add(int(e))
                todo.append(int(e))
    return np.array(sorted(seen), dtype=np.int64)


def assert_same_walk(got, twin):
    """Kernel and float32 twin: same ids, distances, distance counts."""
    (d, i, c), (td, ti, tc) = got, twin
    assert_array_equal(i, ti)
    assert_array_equal(d.astype(np.float64), td)
    assert_array_equal(c, tc)


@grid
@code_grid
@dtype_grid
@KERNEL
@given(data=st.data())
def test_hnsw_search_matches_twin_on_random_graphs(metric, code_dtype, dtype, data):
    Q, codebooks, codes = data.draw(pq_problem(metric, code_dtype, dtype))
    n = codes.shape[0]
    if n == 0:
        return  # nothing to walk (the kernel returns at once)
    ip = metric == "dot"
    links0, upper, upper_off, entry, max_level = data.draw(random_graph(n))
    deleted = np.empty(0, np.uint8)
    if data.draw(st.booleans()):
        deleted = (np.random.RandomState(data.draw(seeds)).rand(n) < 0.3).astype(np.uint8)
    ef = data.draw(st.integers(1, n + 2))
    n_out = data.draw(st.integers(1, ef))
    nt = data.draw(st.integers(1, 2))
    tables32 = _naive.adc_tables(Q, codebooks, ip, dtype=np.float32)
    got = call_hnsw_kernel(Q, codebooks, codes, deleted, links0, upper, upper_off, entry,
                           max_level, ef, n_out, ip, nt)
    assert_same_walk(got, _naive.hnsw_search(tables32, codes, links0, upper, upper_off,
                                             entry, max_level, ef, n_out, deleted))
    # A beam as wide as the graph, from the entry point, returns every live
    # node reachable from there, in exact ADC order.
    d, i, _ = call_hnsw_kernel(Q, codebooks, codes, deleted, links0, upper, upper_off,
                               entry, 0, n, n, ip, nt)
    live = reachable(links0, entry)
    if deleted.size:
        live = live[deleted[live] == 0]
    for q in range(Q.shape[0]):
        dist = _naive.adc_distances(tables32[q], codes)
        check_top_k(d[q].astype(np.float64), i[q], live, dist[live], 0.0,
                    code_keys(codes)[live])


# --- estimators -----------------------------------------------------------------

@st.composite
def fit_problem(draw, code_dtype, dtype):
    """Data to fit on (k = 16 gives uint8 codes, k = 300 uint16) and queries."""
    rng = np.random.RandomState(draw(seeds))
    k = 16 if code_dtype == np.uint8 else 300
    n = draw(st.integers(k + 10, 2 * k + 40) if k == 16 else st.integers(300, 320))
    m = draw(st.sampled_from([1, 2]))
    D = m * draw(st.integers(1, 3))
    X = rng.randn(n, D) * draw(st.sampled_from([1.0, 100.0]))
    if draw(st.booleans()):  # few distinct rows: duplicates, exact ties
        X = X[rng.randint(0, draw(st.integers(1, 6)), size=n)]
    X = X.astype(dtype)
    Q = np.vstack([X[rng.choice(n, 2)] + 0.01 * rng.randn(2, D),
                   rng.randn(draw(st.integers(1, 4)), D) * X.std()]).astype(dtype)
    return X, Q, m, k, draw(st.integers(0, 2**31 - 1))


def removed_ids(est, data):
    """Remove up to a quarter of the ids, maybe none; return them."""
    n = est.n_samples_fit_
    ids = data.draw(st.lists(st.integers(0, n - 1), max_size=n // 4, unique=True))
    if ids:
        est.remove(ids)
    return np.array(ids, dtype=np.int64)


def raw_distances(metric, dist):
    """Undo the metric's finishing (square root, halving) of kneighbors."""
    dist = dist.astype(np.float64)
    return dist ** 2 if metric == "euclidean" else 2 * dist if metric == "cosine" else dist


@grid
@code_grid
@dtype_grid
@ESTIMATOR
@given(data=st.data())
def test_pq_neighbors_match_twin(metric, code_dtype, dtype, data):
    X, Q, m, k, seed = data.draw(fit_problem(code_dtype, dtype))
    est = PQNeighbors(n_subspaces=m, n_codewords=k, metric=metric, random_state=seed,
                      n_jobs=data.draw(st.sampled_from([1, 2])), refine_factor=0).fit(X)
    assert est.codes_.dtype == code_dtype and est.codebooks_.dtype == dtype
    kn = data.draw(st.integers(1, 12))
    dist, ind = est.kneighbors(Q, n_neighbors=kn)
    assert dist.dtype == dtype
    Qp = prepare(metric, Q)
    ip = metric == "dot"
    tables = _naive.adc_tables(Qp, est.codebooks_, ip)
    x_hat = _naive.decode(est.codes_.astype(np.int64), est.codebooks_)
    tol = RTOL[np.dtype(dtype)] * scale(Qp, x_hat)
    n = est.codes_.shape[0]
    keys = code_keys(est.codes_)
    raw = raw_distances(metric, dist)
    for q in range(Q.shape[0]):
        check_top_k(raw[q], ind[q], np.arange(n),
                    _naive.adc_distances(tables[q], est.codes_), tol[q], keys)


@grid
@code_grid
@dtype_grid
@ESTIMATOR
@given(data=st.data())
def test_ivf_neighbors_match_twin(metric, code_dtype, dtype, data):
    X, Q, m, k, seed = data.draw(fit_problem(code_dtype, dtype))
    n_lists = data.draw(st.integers(1, 4))
    est = IVFPQNeighbors(n_lists=n_lists, n_probe=data.draw(st.integers(1, n_lists)),
                         n_subspaces=m, n_codewords=k, metric=metric, random_state=seed,
                         max_train_samples=None, n_jobs=data.draw(st.sampled_from([1, 2])),
                         refine_factor=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # few points per list
        est.fit(X)
    assert est.codes_.dtype == code_dtype and est.codebooks_.dtype == dtype
    gone = removed_ids(est, data)
    kn = data.draw(st.integers(1, 12))
    dist, ind = est.kneighbors(Q, n_neighbors=kn)
    assert dist.dtype == dtype and not np.isin(ind, gone).any()

    Qp = prepare(metric, Q)
    ip = metric == "dot"
    C, cb, codes, ids, off = (est.cluster_centers_, est.codebooks_, est.codes_, est.ids_,
                              est.list_offsets_)
    r_hat = _naive.decode(codes.astype(np.int64), cb)
    tol = RTOL[np.dtype(dtype)] * scale(Qp, C, r_hat)
    coarse = _naive.coarse_terms(Qp, C, ip)
    lists = np.repeat(np.arange(C.shape[0]), np.diff(off))
    key_of = dict(zip(ids.tolist(), code_keys(codes, lists).tolist()))
    raw = raw_distances(metric, dist)
    # Removed ids may stay in their lists as tombstones until a merge.
    assert est.growing_ids_.size == 0  # nothing appended after fit
    removed = est.removed_
    live = None if removed is None else ~removed[ids]
    for q in range(Q.shape[0]):
        scanned = _naive.ivf_probe_order(coarse[q], off, est.n_probe, kn, live)
        ranked = np.sort(coarse[q])[:len(scanned) + 1]
        if np.any(np.diff(ranked) <= 2 * tol[q]):
            # Lists nearly tied in the coarse ranking: which one is scanned
            # is the kernel's float rounding to decide; take its ranking.
            kernel_coarse = _partition.coarse_terms(Qp[q:q + 1], C, ip)[0]
            scanned = _naive.ivf_probe_order(kernel_coarse, off, est.n_probe, kn, live)
        cid, cd = _naive.ivf_candidates(Qp[q], C, cb, codes, ids, off, scanned, ip, removed)
        check_top_k(raw[q], ind[q], cid, cd, tol[q], [key_of[i] for i in cid.tolist()])


@grid
@code_grid
@dtype_grid
@ESTIMATOR
@given(data=st.data())
def test_hnsw_neighbors_match_twin(metric, code_dtype, dtype, data):
    X, Q, m, k, seed = data.draw(fit_problem(code_dtype, dtype))
    n_links = data.draw(st.integers(2, 6))
    ef_search = data.draw(st.integers(1, 40))
    est = HNSWPQNeighbors(n_links=n_links, ef_construction=data.draw(st.integers(1, 24)),
                          ef_search=ef_search, n_subspaces=m, n_codewords=k, metric=metric,
                          random_state=seed, n_jobs=data.draw(st.sampled_from([1, 2])),
                          refine_factor=0).fit(X)
    assert est.codes_.dtype == code_dtype and est.codebooks_.dtype == dtype
    gone = removed_ids(est, data)
    n_nodes = est.codes_.shape[0]
    kn = data.draw(st.integers(1, 12))
    dist, ind = est.kneighbors(Q, n_neighbors=kn)
    assert dist.dtype == dtype and not np.isin(ind, gone).any()

    ip = metric == "dot"
    Qp = prepare(metric, Q)
    cb, codes = est.codebooks_, est.codes_
    graph = (est.links0_, est.upper_links_, est.upper_offsets_, est.entry_point_)
    node_ids = getattr(est, "ids_", None)
    node_ids = np.arange(n_nodes) if node_ids is None else node_ids
    deleted = np.isin(node_ids, gone).astype(np.uint8)
    tables32 = _naive.adc_tables(Qp, cb, ip, dtype=np.float32)  # the graph runs in float32

    # The kernel on the fitted arrays walks exactly as the twin does.
    ef = max(1, min(max(ef_search, kn), n_nodes))
    got = call_hnsw_kernel(Qp, cb, codes, deleted, *graph, est.max_level_, ef, kn, ip, 2)
    twin = _naive.hnsw_search(tables32, codes, *graph, est.max_level_, ef, kn, deleted)
    assert_same_walk(got, twin)

    # Every node is reachable from the entry point: a beam as wide as the
    # graph from there returns every live node, in exact ADC order (so any
    # top-k it returns is exact).
    d, i, _ = call_hnsw_kernel(Qp, cb, codes, deleted, *graph, 0, n_nodes, n_nodes, ip, 1)
    live = np.flatnonzero(deleted == 0)
    found = np.isin(live, i)
    assert found.all(), f"nodes {live[~found][:10]} unreachable from the entry point"
    tables = _naive.adc_tables(Qp, cb, ip)
    x_hat = _naive.decode(codes.astype(np.int64), cb)
    tol = RTOL[np.dtype(np.float32)] * scale(Qp, x_hat)
    for q in range(Q.shape[0]):
        check_top_k(d[q].astype(np.float64), i[q], live,
                    _naive.adc_distances(tables[q], codes)[live], tol[q],
                    code_keys(codes)[live])

    # kneighbors is that search (rows the beam could not fill are searched
    # again over the whole graph from the entry point), in ids.
    td, ti, _ = twin
    short = ti[:, -1] == EMPTY_ID
    if short.any():
        td[short], ti[short], _ = _naive.hnsw_search(tables32[short], codes, *graph, 0,
                                                     n_nodes, kn, deleted)
    assert np.all(ti != EMPTY_ID)
    assert_array_equal(ind, node_ids[ti])
    assert_allclose(raw_distances(metric, dist), td, rtol=1e-6, atol=1e-30)
