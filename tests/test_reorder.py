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


# -- compact tiers: pqsk._reorder.RefineTier.rerank (kernel
# pqsk._rerank.compact_rerank) against pqsk._naive.compact_rerank --------------

def tier_of(kind, X, splits):
    """X (float rows) as a RefineTier of several row parts."""
    from pqsk._store import FitRows
    tier = _reorder.RefineTier.train(kind, FitRows(X, X.dtype, False))
    bounds = [0, *splits, X.shape[0]]
    parts = [tier.encode(X[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return _reorder.RefineTier(kind, RowStore(X.shape[1], parts[0].dtype, parts),
                               tier.offset, tier.scale)


@pytest.mark.parametrize("kind", ["float16", "int8"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_compact_rerank_matches_the_oracle(kind, dtype, metric, n_threads):
    X = (rng.randn(300, 7) * [1, 2, 3, 0.5, 10, 1, 1]).astype(dtype)
    X[5] = 0                                   # a zero row (cosine: stays zero)
    X[:, 6] = 0.25                             # a constant feature
    tier = tier_of(kind, X, [100, 101, 250])
    assert len(tier.rows.chunks) >= 2 and tier.rows.shape == X.shape
    Q = rng.randn(20, 7).astype(dtype)
    cand = np.stack([rng.choice(300, 30, replace=False) for _ in range(20)]).astype(np.int64)
    cand[0] = np.r_[5, 6, 299, rng.choice(np.arange(7, 299), 27, replace=False)]
    cand[1, -4:] = EMPTY                       # empty slots
    cand[2, :] = EMPTY                         # nothing at all
    cand[3, 0] = 300                           # out of range
    ip, unit = metric == "dot", metric == "cosine"
    d, i = tier.rerank(Q, cand, 10, ip, unit_norm=unit, n_threads=n_threads)
    d_ref, i_ref = _naive.compact_rerank(Q.astype(np.float64), np.asarray(tier.rows), cand,
                                         10, ip, unit, tier.offset, tier.scale)
    assert d.dtype == dtype and i.dtype == np.int64 and d.shape == (20, 10)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(d, d_ref, rtol=tol, atol=tol)
    for q in range(20):
        gaps = np.diff(d_ref[q][np.isfinite(d_ref[q])])
        if np.all(gaps > 4 * tol * (1 + np.abs(d_ref[q]).max())):
            np.testing.assert_array_equal(i[q], i_ref[q])
    assert np.all(i[2] == EMPTY) and np.all(np.isinf(d[2]))
    # The decoded rows are close to X: the tier approximates the exact re-rank.
    err = np.abs(tier.take(np.arange(300), np.float64) - X).max(axis=0)
    if kind == "int8":
        assert np.all(err <= tier.scale * 0.5 + 1e-6)
    else:
        assert np.all(err <= 1e-3 * (1 + np.abs(X).max(axis=0)))


def integer_path(d, metric):
    """Whether an int8 tier's float32 queries of dimension d take the
    integer path of pqsk._rerank.compact_rerank on the path in use."""
    from pqsk import _rerank
    mode = {"l2": 0, "dot": 1, "cosine": 2}[metric]
    return _rerank.TIER_ISA != "scalar" and (
        _rerank.TIER_INT8 == "integer"
        or (_rerank.TIER_INT8 == "auto" and d >= _rerank.INT8_MIN_D[mode]))


def compact_check(kind, d, metric, n_threads, seed=0):
    """compact_rerank on the path in use (pqsk._rerank.TIER_ISA, TIER_INT8)
    against the oracle, float32 queries: distances to float32 rounding (see
    the kernel docstring), ids equal except near-ties, empty slots and an
    empty row.  The integer path of an int8 tier is compared with its own
    oracle (pqsk._naive.compact_rerank_int8: the same integer sums), and
    that oracle with the float one in test_int8_integer_sums_within_their_bound."""
    r = np.random.RandomState(seed)
    X = (r.randn(200, d) * (1 + 3 * r.rand(d))).astype(np.float32)
    X[5] = 0
    tier = tier_of(kind, X, [60, 61])
    Q = r.randn(12, d).astype(np.float32)
    cand = np.stack([r.choice(200, 40, replace=False) for _ in range(12)]).astype(np.int64)
    cand[1, -5:] = EMPTY
    cand[2, :] = EMPTY
    cand[3, 0] = 200
    ip, unit = metric == "dot", metric == "cosine"
    dist, idx = tier.rerank(Q, cand, 10, ip, unit_norm=unit, n_threads=n_threads)
    oracle = _naive.compact_rerank
    if kind == "int8" and integer_path(d, metric):
        oracle = _naive.compact_rerank_int8    # the same integer sums (bound: below)
    d_ref, i_ref = oracle(Q.astype(np.float64), np.asarray(tier.rows), cand,
                          10, ip, unit, tier.offset, tier.scale)
    fin = np.isfinite(d_ref)
    assert np.array_equal(np.isfinite(dist), fin)
    tol = 2e-5 * (1 + np.abs(d_ref[fin]).max())
    np.testing.assert_allclose(dist[fin], d_ref[fin], rtol=1e-5, atol=tol)
    for q in range(12):
        gaps = np.diff(d_ref[q][fin[q]])
        if np.all(gaps > 4 * tol):
            np.testing.assert_array_equal(idx[q], i_ref[q])
    assert np.all(idx[2] == EMPTY) and np.all(np.isinf(dist[2]))


@pytest.mark.parametrize("kind", ["float16", "int8"])
@pytest.mark.parametrize("d", [1, 7, 8, 50, 129])
@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_compact_rerank_every_path_matches_the_oracle(kind, d, metric, n_threads):
    from pqsk import _rerank
    before = (_rerank.TIER_ISA, _rerank.TIER_INT8)
    try:
        for isa in _rerank.tier_isas():
            for int8 in ("float", "auto", "integer"):
                _rerank.set_tier_isa(isa, int8)
                compact_check(kind, d, metric, n_threads)
    finally:
        _rerank.set_tier_isa(*before)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("d", [1, 3, 4, 8, 15, 16, 50, 129])
@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
def test_exact_rerank_every_path_matches_the_oracle(dtype, d, metric):
    """exact_rerank (raw rows) on every path: scalar double, AVX2 / AVX-512
    double lanes (another summation order: same tolerance as ``check``)."""
    from pqsk import _rerank
    r = np.random.RandomState(d)
    X = (r.randn(120, d) * (1 + 3 * r.rand(d))).astype(dtype)
    X[5] = 0
    Q = r.randn(9, d).astype(dtype)
    cand = np.stack([r.choice(120, 30, replace=False) for _ in range(9)]).astype(np.int64)
    cand[1, -3:] = EMPTY
    cand[2, 0] = 120
    before = (_rerank.TIER_ISA, _rerank.TIER_INT8)
    try:
        for isa in _rerank.tier_isas():
            _rerank.set_tier_isa(isa)
            check(Q, store_of(X, [40]), X, cand, 10, metric == "dot", metric == "cosine", 2)
    finally:
        _rerank.set_tier_isa(*before)


@pytest.mark.parametrize("d", [2, 7, 50, 129, 300])
@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
def test_int8_integer_sums_within_their_bound(d, metric):
    """The integer path's oracle (pqsk._naive.compact_rerank_int8) against
    the float one, candidate by candidate, within the bound documented in
    pqsk._rerank.compact_rerank (rounding of the 16-bit query weights and of
    the tier's 16 / 14-bit terms); and the ranking nearly the same."""
    r = np.random.RandomState(d)
    X = (r.randn(150, d) * (1 + 3 * r.rand(d)) + 2 * r.randn(d)).astype(np.float32)
    if metric == "cosine":
        X /= np.linalg.norm(X, axis=1, keepdims=True)
    tier = tier_of("int8", X, [])
    codes = np.asarray(tier.rows)
    off, sc = tier.offset.astype(np.float64), tier.scale.astype(np.float64)
    ip, unit = metric == "dot", metric == "cosine"
    Q = r.randn(8, d)
    if unit:
        Q /= np.linalg.norm(Q, axis=1, keepdims=True)
    cand = np.tile(np.arange(150, dtype=np.int64), (8, 1))
    dq, iq = _naive.compact_rerank_int8(Q, codes, cand, 150, ip, unit, off, sc)
    df, i_f = _naive.compact_rerank(Q, codes, cand, 150, ip, unit, off, sc)
    got = np.empty((8, 150))
    want = np.empty((8, 150))
    got[np.arange(8)[:, None], iq] = dq
    want[np.arange(8)[:, None], i_f] = df
    c = codes.astype(np.float64)
    s_f = np.abs(2 * off * sc).max() / 32767
    s_g = (sc * sc).max() / 16383
    Xd = off + sc * c
    hits = 0
    for q in range(8):
        u = (Q[q] - off) * sc if metric == "l2" else Q[q] * sc
        s_w = np.abs(u).max() / 32767
        e_d = s_w / 2 * c.sum(1)
        e_n = s_f / 2 * c.sum(1) + s_g / 2 * (c * c).sum(1)
        if metric == "dot":
            bound = e_d
        elif metric == "l2":
            bound = 2 * e_d + s_g / 2 * (c * c).sum(1)
        else:  # the worst corner of (<q, x> +- e_d, ||x||^2 +- e_n)
            dot, nrm = Xd @ Q[q], (Xd * Xd).sum(1)
            assert np.all(nrm - e_n > 0.25)
            n = np.sqrt(nrm)
            dev = [np.abs((dot + a * e_d) / np.sqrt(nrm + b * e_n) - dot / n)
                   for a in (-1, 1) for b in (-1, 1)]
            bound = np.max(dev, axis=0) * (1 if ip else 2)
        err = np.abs(got[q] - want[q])
        assert np.all(err <= bound * (1 + 1e-9) + 1e-12 * (1 + np.abs(want[q])))
        hits += len(set(iq[q, :10]) & set(i_f[q, :10]))
    assert hits >= 0.95 * 80


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512bw", "avx512vnni", "avx512", "neon"])
def test_pqsk_simd_selects_each_path(isa):
    """PQSK_SIMD=<isa> at import selects that path for re-ranking (and the
    nearest for fast-scan), which then matches the oracles."""
    import os
    import subprocess
    import sys
    from pqsk import _rerank
    want = isa
    if isa == "avx512":
        want = _rerank.tier_isas()[-1]
    if want not in _rerank.tier_isas():
        pytest.skip(f"this CPU cannot run {isa}")
    code = ("import sys, warnings; warnings.simplefilter('error'); sys.path.insert(0, {!r})\n"
            "import pqsk._rerank as r, pqsk._fastscan as fs\n"
            "assert r.TIER_ISA == {!r}, r.TIER_ISA\n"
            "assert fs.isa() == {!r}, fs.isa()\n"
            "from test_reorder import compact_check\n"
            "for kind in ('float16', 'int8'):\n"
            " for d in (1, 7, 8, 50, 129):\n"
            "  for metric in ('l2', 'dot', 'cosine'):\n"
            "   for nt in (1, 2): compact_check(kind, d, metric, nt)\n"
            "print('ok')").format(os.path.dirname(os.path.abspath(__file__)), want,
                                  "avx512bw" if want.startswith("avx512") else want)
    env = dict(os.environ, PQSK_SIMD=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_tier_isa_is_exposed():
    from pqsk import _rerank
    assert _rerank.TIER_ISA in _rerank.tier_isas()
    assert _rerank.tier_isas()[0] == "scalar"
    assert _rerank.TIER_INT8 in ("float", "auto", "integer")
    with pytest.raises(ValueError, match="unknown instruction set"):
        _rerank.set_tier_isa("sse9")
    if "neon" not in _rerank.tier_isas():  # arm64's path, on x86-64
        with pytest.raises(ValueError, match="cannot run the neon"):
            _rerank.set_tier_isa("neon")
    with pytest.raises(ValueError, match="int8 must be"):
        _rerank.set_tier_isa("scalar", "int4")


def test_compact_tiers_encode_decode_and_refuse():
    from pqsk._store import FitRows
    X = np.array([[0.0, 1.0], [255.0, 1.0], [10.0, 1.0]], dtype=np.float32)
    tier = tier_of("int8", X, [])
    np.testing.assert_array_equal(tier.offset, [0, 1])
    np.testing.assert_array_equal(tier.scale, np.float32([1, 1 / 255]))
    np.testing.assert_array_equal(np.asarray(tier.rows), [[0, 0], [255, 0], [10, 0]])
    # Appended rows outside the trained range are clipped to it.
    more = tier.appended(FitRows(np.float32([[-5, 3], [300, 1]]), np.float32, False))
    np.testing.assert_allclose(more.take(np.arange(3, 5), np.float64),
                               [[0, 2], [255, 1]], rtol=1e-6)
    assert tier.rows.shape == (3, 2)           # the old tier is unchanged
    huge = np.float32([[-3e38, 0], [3e38, 0]])
    with pytest.raises(ValueError, match="int8.*feature 0.*overflows float32"):
        tier_of("int8", huge, [])
    with pytest.raises(ValueError, match="float16.*65504.*feature 0"):
        tier_of("float16", np.float32([[1e5, 0]]), [])
    f16 = tier_of("float16", np.float32([[1, 2]]), [])
    assert f16.appended(FitRows(np.float32([[3, 4]]), np.float32, False)).rows.shape == (2, 2)
    with pytest.raises(ValueError, match="float16"):
        f16.appended(FitRows(np.float32([[7e4, 0]]), np.float32, False))
    # No candidates at all, and an empty tier
    empty = _reorder.RefineTier.empty("int8", 2, tier.offset, tier.scale)
    d, i = empty.rerank(np.float32([[1, 1]]), np.array([[0, 1]]), 2)
    assert np.all(np.isinf(d))  # (out-of-range ids sort last, at +inf, as exact_rerank)


# -- bounded re-ranking -----------------------------------------------------------

def _clustered(n, d, seed):
    rng = np.random.RandomState(seed)
    centers = rng.normal(size=(40, d)) * 2
    return (centers[rng.randint(40, size=n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_merge_sorted_keeps_the_best_by_distance_then_id():
    d1 = np.array([[1.0, 3.0, np.inf]])
    i1 = np.array([[5, 2, _reorder._NO_ID]])
    d2 = np.array([[2.0, 3.0, 9.0]])
    i2 = np.array([[7, 1, 4]])
    d, i = _reorder._merge_sorted(d1, i1, d2, i2, 4)
    np.testing.assert_array_equal(i, [[5, 7, 1, 2]])
    np.testing.assert_array_equal(d, [[1.0, 2.0, 3.0, 3.0]])


def test_query_slack_is_the_largest_overestimate_of_the_neighbours_found():
    approx = np.array([[1.0, 4.0, 9.0]], dtype=np.float32)
    cand = np.array([[3, 8, 6]])
    # exact: id 8 at 1.0 (approx 4.0), id 3 at 4.0 (approx 1.0)
    dist, idx = np.array([[1.0, 4.0]]), np.array([[8, 3]])
    ip = _reorder.query_slack(approx, cand, dist, idx, 0.5, inner_product=True)
    np.testing.assert_allclose(ip, [3.0])          # 4 - 1
    l2 = _reorder.query_slack(approx, cand, dist, idx, 0.5, inner_product=False)
    np.testing.assert_allclose(l2, [1.0])          # sqrt(4) - sqrt(1)
    low = _reorder.query_slack(approx, cand, dist, idx, 7.0, inner_product=True)
    np.testing.assert_allclose(low, [7.0])         # the calibrated slack is the floor


@pytest.mark.parametrize("name,params", [
    ("IVFPQNeighbors", {"n_lists": 16, "n_probe": 8, "n_codewords": 64}),
    ("IVFPQNeighbors", {"n_lists": 16, "n_probe": 8, "n_codewords": 16,
                        "refine_dtype": "int8"}),
    ("PQNeighbors", {"n_codewords": 16, "metric": "cosine"}),
    ("HNSWPQNeighbors", {"n_codewords": 64, "refine_dtype": "float16", "metric": "dot"}),
])
def test_bounded_rerank_reranks_fewer_rows_and_keeps_the_answers(name, params, monkeypatch):
    """refine_factor is an upper bound: the reorder stage skips candidates
    that cannot enter the top k, and the answers stay those of re-ranking
    every candidate (the bound is calibrated, so a rare miss is allowed)."""
    import pqsk
    from pqsk._runtime import runtime

    X = _clustered(6000, 16, 0)
    Q = _clustered(200, 16, 1)
    # Sixteen sub-spaces of one feature: codes close enough to the rows for
    # the bound to skip most candidates (with coarse codes it skips few).
    est = getattr(pqsk, name)(n_neighbors=10, n_subspaces=16, refine_factor=20,
                              random_state=0, **params).fit(X)
    state = runtime(est)
    state.rerank_rows = 0
    d_b, i_b = est.kneighbors(Q)
    bounded_rows = state.rerank_rows
    assert np.isfinite(_reorder.calibrated_slack(est))
    monkeypatch.setattr(_reorder, "MIN_PAIRS", np.inf)   # no bound: re-rank all
    state.rerank_slack = None
    state.rerank_rows = 0
    d_a, i_a = est.kneighbors(Q)
    all_rows = state.rerank_rows
    assert all_rows == 200 * 200
    assert bounded_rows < 0.6 * all_rows, (bounded_rows, all_rows)
    same = np.mean([set(a) == set(b) for a, b in zip(i_a, i_b)])
    assert same >= 0.98, same
    rows_same = np.all(i_a == i_b, axis=1)
    np.testing.assert_array_equal(d_a[rows_same], d_b[rows_same])


def _counting_calibrations(monkeypatch):
    calls = []
    real = _reorder._calibrate

    def counted(est, n_threads):
        calls.append(est.n_samples_fit_ - est.n_removed_)
        return real(est, n_threads)

    monkeypatch.setattr(_reorder, "_calibrate", counted)
    return calls


def test_bounded_rerank_recalibrates_when_the_index_or_setting_changes(monkeypatch):
    """The calibrated slack is kept across small appends and removals (a
    query does not pay a calibration after each batch) and computed again
    for a new setting, new codebooks, or live rows grown or shrunk by more
    than RECALIBRATE_GROWTH."""
    import pqsk
    from pqsk._runtime import runtime

    calls = _counting_calibrations(monkeypatch)
    X = _clustered(5000, 16, 2)
    est = pqsk.IVFPQNeighbors(n_neighbors=10, n_lists=8, n_probe=4, n_subspaces=4,
                              n_codewords=32, refine_factor=20, random_state=0).fit(X)
    first = _reorder.calibrated_slack(est)
    assert np.isfinite(first) and first >= 0 and calls == [5000]
    setting = runtime(est).rerank_slack[1]
    est.set_params(n_probe=8)
    _reorder.calibrated_slack(est)
    assert runtime(est).rerank_slack[1] != setting and calls == [5000, 5000]
    est.partial_fit(_clustered(300, 16, 3))          # 5,300 live rows: within the band
    est.remove(np.arange(200))
    est.kneighbors(X[:3])
    assert calls == [5000, 5000]
    est.partial_fit(_clustered(2000, 16, 4))         # 7,100 > 5,000 * 1.25
    est.kneighbors(X[:3])
    assert calls == [5000, 5000, 7100] and runtime(est).rerank_slack[2] == 7100
    est.remove(np.arange(200, 2000))                 # 5,300 < 7,100 / 1.25
    est.kneighbors(X[:3])
    assert calls[-1] == 5300
    est.refit_codebooks(X[:3000], np.vstack([X, _clustered(300, 16, 3),
                                             _clustered(2000, 16, 4)]))
    est.kneighbors(X[:3])
    assert len(calls) == 5 and calls[-1] == 5300     # new codes: calibrated again


def test_bounded_rerank_calibration_is_saved_with_the_index(tmp_path, monkeypatch):
    """A loaded index re-ranks with the slack the saved one used (it may
    have been calibrated at fewer live rows than the index now holds), and a
    malformed saved calibration is refused like any other bad header value."""
    import hashlib
    import json

    import pqsk
    from pqsk._checks import IndexFormatError
    from pqsk._persist import HEADER, MANIFEST
    from pqsk._runtime import runtime

    X = _clustered(5000, 16, 5)
    Q = _clustered(50, 16, 6)
    est = pqsk.IVFPQNeighbors(n_neighbors=10, n_lists=8, n_probe=4, n_subspaces=4,
                              n_codewords=32, refine_factor=20, random_state=0).fit(X)
    est.kneighbors(Q)
    est.partial_fit(_clustered(600, 16, 7))          # kept: calibrated at 5,000 rows
    saved = runtime(est).rerank_slack
    assert saved[2] == 5000
    est.save(tmp_path / "idx")
    calls = _counting_calibrations(monkeypatch)
    loaded = pqsk.load(tmp_path / "idx")
    assert runtime(loaded).rerank_slack[1:] == saved[1:]
    for a, b in zip(loaded.kneighbors(Q), est.kneighbors(Q)):
        np.testing.assert_array_equal(a, b)
    assert calls == []

    manifest = json.loads((tmp_path / "idx" / MANIFEST).read_text())
    header_path = tmp_path / "idx" / manifest["data"] / HEADER
    header = json.loads(header_path.read_text())
    for bad in ({"setting": "x", "n_live": 5000, "slack": -1.0},
                {"setting": "x", "n_live": 10 ** 9, "slack": 0.5},
                {"setting": "x", "n_live": 5000},
                {"setting": 3, "n_live": 5000, "slack": 0.5}):
        header["attributes"]["_rerank_calibration"] = {"dict": bad}
        raw = json.dumps(header).encode()
        header_path.write_bytes(raw)
        manifest["header_sha256"] = hashlib.sha256(raw).hexdigest()   # checksums redone
        (tmp_path / "idx" / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(IndexFormatError, match="_rerank_calibration"):
            pqsk.load(tmp_path / "idx", verify=False)


@pytest.mark.parametrize("name, params", [
    ("IVFPQNeighbors", {"n_lists": 8, "n_probe": 3, "n_codewords": 16}),
    ("IVFPQNeighbors", {"n_lists": 8, "n_probe": 3, "n_codewords": 32,
                        "refine_dtype": "int8"}),
    ("IVFPQNeighbors", {"n_lists": 8, "n_probe": 3, "n_codewords": 16,
                        "refine_dtype": "float16", "metric": "cosine"}),
])
def test_kernels_answer_the_same_with_or_without_the_gil(name, params, monkeypatch):
    """Small kernel calls keep the GIL (pqsk._utils.GIL_WORK), larger ones
    release it: the two paths of the IVF scan and of both re-rank kernels
    give the same answers, with deletions and growing entries."""
    import pqsk
    from pqsk import _utils

    X = _clustered(3000, 16, 8)
    Q = _clustered(40, 16, 9)
    est = getattr(pqsk, name)(n_neighbors=7, n_subspaces=8, refine_factor=6,
                              random_state=0, **params).fit(X[:2500])
    est.partial_fit(X[2500:])
    est.remove(np.arange(0, 3000, 7))
    answers = []
    for work in (0, 2 ** 62):   # always released, never released
        monkeypatch.setattr(_utils, "GIL_WORK", work)
        answers.append(est.kneighbors(Q))
        answers.append(est.kneighbors(Q[:1]))
    for a, b in zip(answers[:2], answers[2:]):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
