"""The HNSW tier walk (``walk``): the kernel against the NumPy oracle
(``pqsk._naive.hnsw_tier_search``) on every instruction-set path, recall on
clustered data, and the walk through segments, appends, removals, filters
and save / load against brute force over the tier's rows."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.utils._param_validation import InvalidParameterError

from pqsk import HNSWPQNeighbors, _hnsw, _naive, _rerank
from pqsk._reorder import RefineTier

ISAS = _rerank.tier_isas()


@pytest.fixture(params=ISAS)
def isa(request):
    before = _rerank.TIER_ISA
    _rerank.set_tier_isa(request.param)
    yield request.param
    _rerank.set_tier_isa(before)


def random_graph(rng, n, M):
    """A flat graph on n nodes: random links (unreachable nodes possible),
    upper links only to nodes of that level, the entry point on top."""
    levels = np.minimum(rng.geometric(0.6, size=n) - 1, 3).astype(np.int32)
    upper_off = np.zeros(n, np.int64)
    np.cumsum(levels[:-1], out=upper_off[1:])
    links0 = np.full((n, 2 * M), -1, np.int32)
    upper = np.full((max(1, int(levels.sum())), M), -1, np.int32)
    for i in range(n):
        c = rng.randint(0, 2 * M + 1)
        links0[i, :c] = rng.randint(0, n, size=c)
        for lev in range(1, levels[i] + 1):
            c = rng.randint(0, M + 1)
            upper[upper_off[i] + lev - 1, :c] = rng.choice(np.flatnonzero(levels >= lev), c)
    top = int(levels.max())
    return links0, upper, upper_off, int(rng.choice(np.flatnonzero(levels == top))), top


def tier_kernel(Q, tier_rows, parts, ids, offset, scale, graph, ef, n_out, ip, unit_norm,
                deleted, simd, n_threads=1):
    """``_hnsw.hnsw_search`` with the tier walk; ``parts``: the row counts
    the tier's rows are split in (several parts, as appends make)."""
    links0, upper, upper_off, entry, top = graph
    n, nq, d = links0.shape[0], Q.shape[0], Q.shape[1]
    chunks = np.split(tier_rows, np.cumsum(parts)[:-1])
    chunks = [np.ascontiguousarray(c) for c in chunks if c.shape[0]]
    ptr = np.array([c.ctypes.data for c in chunks], np.uintp)
    start = np.zeros(len(chunks) + 1, np.int64)
    np.cumsum([c.shape[0] for c in chunks], out=start[1:])
    nt = n_threads
    dist = np.empty((nq, n_out), np.float32)
    idx = np.empty((nq, n_out), np.int64)
    n_dist = np.zeros(nq, np.int64)
    cbt = np.zeros((1, 1, 16), np.float32)  # not read by the tier walk
    _hnsw.hnsw_search(
        np.ascontiguousarray(Q, np.float32), cbt, np.zeros((n, 1), np.uint8),
        np.empty((0, 1), np.uint16), deleted, links0, upper, upper_off, entry, top, ef, ip,
        dist, idx, n_dist, np.zeros((nt, n), np.uint32), np.zeros((nt, 1), np.uint32),
        np.empty((nt, n), np.float32), np.empty((nt, n), np.int64),
        np.empty((nt, ef + 1), np.float32), np.empty((nt, ef + 1), np.int64),
        np.empty((nt, 16), np.float32), nt, 0,
        tier_ptr=ptr, tier_start=start, tier_ids=ids, tier_offset=offset, tier_scale=scale,
        tier_unit_norm=unit_norm, tier_simd=simd)
    return dist, idx, n_dist


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("kind", ["int8", "float16"])
@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_kernel_matches_oracle(seed, kind, metric, isa):
    rng = np.random.RandomState(seed)
    n, d = rng.randint(5, 120), rng.choice([1, 7, 8, 13, 50])
    ip, unit_norm = metric == "ip", metric == "cosine"
    n_rows = n + rng.randint(0, 30)  # the tier holds more ids than the graph's nodes
    X = rng.randn(n_rows, d) * rng.choice([0.1, 1.0, 10.0])
    if rng.rand() < 0.3:
        X = X[rng.randint(0, 4, n_rows)]  # copies: exact ties
    ids = None if rng.rand() < 0.4 else np.sort(rng.choice(n_rows, n, replace=False))
    tier = RefineTier.train(kind, _fitrows(X)).appended(_fitrows(X))
    rows = np.asarray(tier.rows)
    offset = None if kind == "float16" else tier.offset
    scale = None if kind == "float16" else tier.scale
    parts = [n_rows] if rng.rand() < 0.5 else [n_rows // 3, n_rows - n_rows // 3]
    graph = random_graph(rng, n, rng.randint(1, 5))
    Q = (rng.randn(rng.randint(1, 5), d) * X.std()).astype(np.float32)
    deleted = (rng.rand(n) < 0.3).astype(np.uint8) if rng.rand() < 0.5 else np.empty(0, np.uint8)
    ef = rng.randint(1, n + 3)
    n_out = rng.randint(1, ef + 1)
    simd = isa != "scalar"
    got = tier_kernel(Q, rows, parts, ids, offset, scale, graph, ef, n_out, ip, unit_norm,
                      deleted, simd, n_threads=rng.randint(1, 3))
    twin = _naive.hnsw_tier_search(Q, rows, ids, *graph, ef, n_out, deleted, ip, unit_norm,
                                   offset, scale)
    if not simd:  # float64 sums rounded to float32, as the oracle does
        assert_array_equal(got[1], twin[1])
        assert_allclose(got[0].astype(np.float64), twin[0], rtol=1e-6, atol=1e-6)
        assert_array_equal(got[2], twin[2])
    # Every path: a beam as wide as the graph from the entry point returns
    # each live node it reaches, each at its oracle distance, in order.
    links0 = graph[0]
    d_all, i_all, _ = tier_kernel(Q, rows, parts, ids, offset, scale,
                                  (links0, graph[1], graph[2], graph[3], 0), n, n, ip,
                                  unit_norm, deleted, simd)
    reach = _reachable(links0, graph[3])
    if deleted.size:
        reach = reach[deleted[reach] == 0]
    for q in range(Q.shape[0]):
        found = i_all[q][i_all[q] != _naive.EMPTY_ID]
        assert_array_equal(np.sort(found), reach)
        ref = _naive.tier_node_distances(Q[q], rows, ids, ip, unit_norm, offset, scale)
        scale_q = 1 + float(np.abs(ref).max())
        assert_allclose(d_all[q][:found.size], ref[found], rtol=1e-5, atol=1e-5 * scale_q)
        assert np.all(np.diff(d_all[q][:found.size]) >= 0)


def _fitrows(X):
    from pqsk._store import FitRows
    return FitRows(np.asarray(X), np.float64, False)


def _reachable(links0, start):
    seen, todo = {start}, [start]
    while todo:
        for e in links0[todo.pop()]:
            if e < 0:
                break
            if int(e) not in seen:
                seen.add(int(e))
                todo.append(int(e))
    return np.array(sorted(seen), np.int64)


# -- estimators ------------------------------------------------------------------

rng = np.random.RandomState(0)
CENTERS = rng.randn(30, 24) * 3
X = (CENTERS[rng.randint(0, 30, 3000)] + rng.randn(3000, 24)).astype(np.float32)
Q = (CENTERS[rng.randint(0, 30, 80)] + rng.randn(80, 24)).astype(np.float32)


def make(**kw):
    params = dict(n_neighbors=10, n_links=8, ef_construction=64, ef_search=32,
                  n_subspaces=6, n_codewords=16, refine_dtype="int8", random_state=0)
    params.update(kw)
    return HNSWPQNeighbors(**params)


def recall(ind, true):
    return np.mean([len(set(a) & set(b)) / true.shape[1] for a, b in zip(ind, true)])


def brute(X, Q, k, metric):
    from sklearn.neighbors import NearestNeighbors
    return NearestNeighbors(n_neighbors=k, metric=metric).fit(X).kneighbors(
        Q, return_distance=False)


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("kind", ["int8", "float16"])
def test_tier_walk_recall_on_clusters(metric, kind, isa):
    true = brute(X, Q, 10, metric)
    nn = make(metric=metric, refine_dtype=kind, refine_factor=1).fit(X)
    got = {w: recall(nn.set_params(walk=w).kneighbors(Q, return_distance=False), true)
           for w in ("codes", "tier", "auto")}
    assert got["auto"] == got["tier"]
    assert got["tier"] >= 0.97
    assert got["tier"] >= got["codes"] + 0.05  # 4-bit ADC misranks near neighbours


def test_tier_walk_without_refine_returns_tier_distances():
    nn = make(refine_factor=0).fit(X)
    assert nn.refine_rows_ is None  # refine_factor=0 keeps no tier: the walk is ADC
    assert_array_equal(nn.kneighbors(Q)[1], nn.set_params(walk="codes").kneighbors(Q)[1])
    with pytest.raises(ValueError, match="walk='tier' needs a compact re-ranking tier"):
        nn.set_params(walk="tier").kneighbors(Q)
    nn = make(refine_factor=1).fit(X)
    nn.set_params(refine_factor=0, ef_search=3000)  # the beam covers the graph
    dist, ind = nn.kneighbors(Q)
    exact = exact_by_tier(nn, Q, np.arange(X.shape[0]), 10)
    assert_array_equal(ind, exact[1])
    assert_allclose(dist, np.sqrt(exact[0]), rtol=1e-4, atol=1e-4)


def test_walk_parameter_is_validated():
    with pytest.raises(InvalidParameterError):
        make(walk="graph").fit(X)
    with pytest.raises(ValueError, match="walk='tier' needs"):
        make(refine_dtype="float32", walk="tier").fit(X).kneighbors(Q)
    nn = make(refine_dtype="float32").fit(X)  # auto without a tier: ADC, as before
    assert_array_equal(nn.kneighbors(Q)[1], nn.set_params(walk="codes").kneighbors(Q)[1])


def exact_by_tier(nn, Q, allowed, k):
    """Brute-force top k by the tier's distances (the compact_rerank oracle)
    among ``allowed`` ids: (squared distances, ids)."""
    tier = RefineTier.of(nn)
    rows = np.asarray(tier.rows)
    cand = np.tile(np.asarray(allowed, np.int64), (Q.shape[0], 1))
    Qp = Q / np.linalg.norm(Q, axis=1, keepdims=True) if nn.metric == "cosine" else Q
    return _naive.compact_rerank(Qp.astype(np.float64), rows, cand, k,
                                 unit_norm=nn.metric == "cosine",
                                 offset=tier.offset, scale=tier.scale)


def check_full_beam(nn, allowed, flt=None):
    """With a beam as wide as each graph, the tier walk sees every live
    node: the answers are the brute-force top 10 by the tier's distances."""
    nn.set_params(ef_search=nn.n_samples_fit_, walk="tier")
    ind = nn.kneighbors(Q, filter=flt, return_distance=False)
    assert_array_equal(ind, exact_by_tier(nn, Q, allowed, 10)[1])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_tier_walk_through_segments_appends_removes_filters_and_save(metric, tmp_path, isa):
    from pqsk import load
    nn = make(metric=metric, segment_size=1024).fit(X[:1500])
    nn.partial_fit(X[1500:2600])
    nn.partial_fit(X[2600:])
    assert len(nn.segments_) >= 2 and len(nn.refine_rows_.chunks) >= 2
    alive = np.ones(X.shape[0], bool)
    gone = np.random.RandomState(1).choice(X.shape[0], 400, replace=False)
    nn.remove(gone)
    alive[gone] = False
    check_full_beam(nn, np.flatnonzero(alive))
    flt = np.zeros(X.shape[0], bool)
    flt[::3] = True  # a third of the ids: the graph is walked, not scanned
    check_full_beam(nn, np.flatnonzero(alive & flt), flt)
    # Recall at an ordinary beam stays high through all of it.
    nn.set_params(ef_search=32)
    true = np.flatnonzero(alive)[brute(X[alive], Q, 10, metric)]
    assert recall(nn.kneighbors(Q, return_distance=False), true) >= 0.95
    nn.save(tmp_path / "idx")
    back = load(tmp_path / "idx")
    assert back.walk == "tier"
    assert_array_equal(back.kneighbors(Q)[1], nn.kneighbors(Q)[1])
    nn.compact()
    check_full_beam(nn, np.flatnonzero(alive))


def test_tier_walk_float64_and_rotation():
    X64, Q64 = X.astype(np.float64), Q.astype(np.float64)
    nn = make(rotation="opq", refine_factor=2).fit(X64)
    dist, ind = nn.kneighbors(Q64)
    assert dist.dtype == np.float64
    assert recall(ind, brute(X64, Q64, 10, "euclidean")) >= 0.95
    check_full_beam(nn, np.arange(X.shape[0]))


def test_search_stats_counts_tier_distances():
    nn = make().fit(X)
    tier = nn.search_stats(Q)
    codes = nn.set_params(walk="codes").search_stats(Q)
    assert tier["distance_computations"] > 0 and codes["distance_computations"] > 0
    assert tier["ef"] == codes["ef"]


def test_appends_decode_old_nodes_from_the_tier():
    """The repair's view of old nodes (``_NodeVectors``) reads their tier
    rows when given a walk, zero-padded to the build's width."""
    from pqsk._graph import _NodeVectors
    from pqsk._tierwalk import TierWalk
    nn = make().fit(X[:500])
    walk = TierWalk.choose("auto", RefineTier.of(nn), False)
    ids = np.arange(0, 1000, 2)
    new = np.ones((3, 30), np.float32)
    nv = _NodeVectors(None, None, new, 500, walk, ids)
    got = nv[np.array([0, 7, 501])]
    want = RefineTier.of(nn).take(ids[[0, 7]], np.float32)
    assert_array_equal(got[:2, :24], want)
    assert_array_equal(got[:2, 24:], 0)
    assert_array_equal(got[2], new[1])


@pytest.mark.parametrize("rotation", [None, "opq"])
def test_appended_graph_with_tier_has_high_recall(rotation):
    # Old nodes are decoded from the tier when there is no rotation, from
    # their codes with one (4-bit codes: a worse graph): both keep every
    # node reachable (the load checks).
    from pqsk import load
    nn = make(rotation=rotation, n_subspaces=6 if rotation is None else 4).fit(X[:800])
    for s in range(800, 3000, 550):
        nn.partial_fit(X[s:s + 550])
    true = brute(X, Q, 10, "euclidean")
    floor = 0.95 if rotation is None else 0.85
    assert recall(nn.kneighbors(Q, return_distance=False), true) >= floor
    nn._check_loaded_state()
