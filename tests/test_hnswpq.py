"""HNSWPQNeighbors: graph invariants, recall, partial_fit, degenerate data."""

import copy
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import make_blobs
from sklearn.neighbors import NearestNeighbors

from pqsk import HNSWPQNeighbors, PQNeighbors

rng = np.random.RandomState(0)


def _recall(ind, ref):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ind, ref)])


def _assert_same_neighbors(dist, ind, full, atol=1e-5):
    """``dist``, ``ind`` (n_queries, k) are the k nearest by the distance
    matrix ``full`` (n_queries, n): the k smallest distances in order, k
    distinct ids whose distance is the one returned, and every id strictly
    closer than the k-th distance among them (ids differ only among ties
    at the k-th distance)."""
    k = ind.shape[1]
    kth = np.sort(full, axis=1)[:, :k]
    assert_allclose(dist, kth, rtol=1e-5, atol=atol)
    assert_allclose(np.take_along_axis(full, ind, axis=1), dist, rtol=1e-5, atol=atol)
    for row, ids, ref in zip(full, ind, kth):
        assert len(set(ids)) == k
        assert set(np.flatnonzero(row < ref[-1] - atol)) <= set(ids)


def _level_links(nn, node, level):
    if level == 0:
        row = nn.links0_[node]
    else:
        row = nn.upper_links_[nn.upper_offsets_[node] + level - 1]
    return row[row >= 0]


def _reachable_on_level0(nn):
    seen = np.zeros(nn.n_samples_fit_, bool)
    stack = [nn.entry_point_]
    seen[nn.entry_point_] = True
    while stack:
        node = stack.pop()
        for e in _level_links(nn, node, 0):
            if not seen[e]:
                seen[e] = True
                stack.append(e)
    return seen


@pytest.fixture(scope="module")
def fitted():
    X = rng.randn(3000, 16).astype(np.float32)
    nn = HNSWPQNeighbors(n_neighbors=10, n_links=8, ef_construction=64, n_subspaces=4,
                         n_codewords=32, random_state=0, refine_factor=0).fit(X)
    return X, nn


def test_graph_invariants(fitted):
    X, nn = fitted
    M = nn.n_links
    n = nn.n_samples_fit_
    assert nn.links0_.shape == (n, 2 * M)
    assert nn.levels_[nn.entry_point_] == nn.max_level_ == nn.levels_.max()
    assert nn.upper_links_.shape == (nn.levels_.sum(), M)
    for node in range(n):
        for level in range(nn.levels_[node] + 1):
            links = _level_links(nn, node, level)
            assert len(links) <= (2 * M if level == 0 else M)
            assert node not in links
            assert len(set(links)) == len(links)
            # A node is linked on a level only to nodes that live there.
            assert np.all(nn.levels_[links] >= level)
            # Used slots come first, then -1 padding.
            row = (nn.links0_[node] if level == 0
                   else nn.upper_links_[nn.upper_offsets_[node] + level - 1])
            used = row >= 0
            assert not np.any(used[np.argmin(used):]) or used.all()
        assert len(_level_links(nn, node, 0)) >= 1
    assert _reachable_on_level0(nn).all()


def test_level_histogram_decays_geometrically():
    from pqsk._graph import sample_levels

    M = 8
    levels = sample_levels(200_000, M, np.random.RandomState(1))
    for lev in range(1, 4):
        observed = np.mean(levels >= lev)
        expected = M ** -lev
        # Binomial standard error; 5 sigma.
        se = np.sqrt(expected * (1 - expected) / levels.size)
        assert abs(observed - expected) < 5 * se + 1e-6, (lev, observed, expected)


def test_high_recall_with_exact_codes_and_large_ef():
    X, _ = make_blobs(1000, n_features=8, centers=10, random_state=0)
    X = np.round(X)  # few distinct sub-vectors: 256 codewords cover them
    Q = X[::10] + 0.3 * rng.randn(100, 8)
    nn = HNSWPQNeighbors(n_neighbors=10, n_links=8, ef_construction=100, ef_search=200,
                         n_subspaces=4, n_codewords=256, random_state=0).fit(X)
    dist, ind = nn.kneighbors(Q)
    # Rounded data has ties (the codes are exact, so are the distances):
    # ids are checked as sets, up to ties at the 10th distance.
    _assert_same_neighbors(dist, ind, np.sqrt(((Q[:, None] - X) ** 2).sum(-1)))


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "dot"])
def test_agrees_with_exhaustive_adc(fitted, metric):
    X, _ = fitted
    X = X[:1500]
    nn = HNSWPQNeighbors(n_neighbors=10, n_links=12, ef_construction=100, ef_search=200,
                         n_subspaces=4, n_codewords=32, metric=metric, random_state=0,
                         refine_factor=0).fit(X)
    exhaustive = PQNeighbors(n_neighbors=10, n_subspaces=4, n_codewords=32,
                             codebooks=nn.codebooks_, metric=metric, refine_factor=0).fit(X)
    d1, i1 = nn.kneighbors(X[:100] + 0.1)
    d2, i2 = exhaustive.kneighbors(X[:100] + 0.1)
    assert _recall(i1, i2) > 0.97
    assert_allclose(d1[:, 0], d2[:, 0], rtol=1e-4, atol=1e-4)


def test_ef_search_is_raised_to_n_neighbors(fitted):
    X, nn = fitted
    nn = copy.deepcopy(nn).set_params(ef_search=2)
    with pytest.warns(UserWarning, match="ef_search=2 is smaller than n_neighbors=30"):
        dist, ind = nn.kneighbors(X[:5], n_neighbors=30)
    assert ind.shape == (5, 30) and np.all(ind < nn.n_samples_fit_)
    assert nn.search_stats(X[:5], n_neighbors=30)["ef"] == 30
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_ef_search_can_change_after_fit(fitted):
    X, nn = fitted
    nn = copy.deepcopy(nn)
    exhaustive = PQNeighbors(n_neighbors=10, n_subspaces=4, n_codewords=32,
                             codebooks=nn.codebooks_, refine_factor=0).fit(X)
    ref = exhaustive.kneighbors(X[:200] + 0.05, return_distance=False)
    r_small = _recall(nn.set_params(ef_search=10).kneighbors(X[:200] + 0.05,
                                                             return_distance=False), ref)
    work_small = nn.search_stats(X[:200])["distance_computations"]
    r_big = _recall(nn.set_params(ef_search=200).kneighbors(X[:200] + 0.05,
                                                            return_distance=False), ref)
    work_big = nn.search_stats(X[:200])["distance_computations"]
    assert r_big >= r_small and r_big > 0.95
    assert work_big > work_small


@pytest.mark.parametrize("data", ["duplicates", "identical"])
def test_degenerate_data_is_connected_and_searchable(data):
    if data == "identical":
        X = np.ones((300, 8))
    else:
        X = np.repeat(rng.randn(30, 8), 10, axis=0)
    # 32 codewords >= 30 distinct sub-vectors: the codes are exact.
    nn = HNSWPQNeighbors(n_neighbors=5, n_links=4, ef_construction=32, n_subspaces=2,
                         n_codewords=32, random_state=0).fit(X)
    assert _reachable_on_level0(nn).all()
    dist, ind = nn.kneighbors(X[:20])
    assert_allclose(dist, 0, atol=1e-5)
    if data == "duplicates":
        # The 10 copies of a row are its 5 nearest.
        for q, row in enumerate(ind):
            assert np.all(row // 10 == q // 10)
    d_self, i_self = nn.kneighbors()
    assert not np.any(i_self == np.arange(300)[:, None])


def _many_copies(seed=0):
    """2,000 rows that are copies of 5 points, 300 distinct rows, shuffled;
    queries near the 5 points and anywhere."""
    r = np.random.RandomState(seed)
    P = r.randn(5, 8)
    X = np.concatenate([np.repeat(P, 400, axis=0), r.randn(300, 8)])
    X = X[r.permutation(len(X))]
    Q = np.concatenate([P + 0.05 * r.randn(5, 8), r.randn(25, 8)])
    return X, Q


def _adc_distances(nn, X, Q):
    """Exhaustive ADC distances (n_queries, n) with ``nn``'s codebooks."""
    m, k = nn.codebooks_.shape[:2]
    ex = PQNeighbors(n_subspaces=m, n_codewords=k, codebooks=nn.codebooks_).fit(X)
    d, i = ex.kneighbors(Q, n_neighbors=len(X))
    full = np.empty_like(d)
    np.put_along_axis(full, i, d, axis=1)
    return full


def test_many_copies_all_reachable_and_exhaustive_search_exact():
    """Finding 13: with many exact copies every node is reachable from the
    entry point on level 0, after fit and after partial_fit, and a search
    as wide as the graph returns the exact neighbours."""
    X, Q = _many_copies()
    kw = dict(n_neighbors=10, n_links=8, ef_construction=64, n_subspaces=2,
              n_codewords=16, random_state=0)
    once = HNSWPQNeighbors(**kw).fit(X)
    twice = HNSWPQNeighbors(**kw).fit(X[:1200]).partial_fit(X[1200:])
    for nn in (once, twice):
        assert nn.n_samples_fit_ == len(X)
        assert _reachable_on_level0(nn).all()
        dist, ind = nn.set_params(ef_search=len(X)).kneighbors(Q)
        _assert_same_neighbors(dist, ind, _adc_distances(nn, X, Q), atol=1e-4)


def test_copies_are_linked_by_the_build(monkeypatch):
    """Finding 13: the build itself leaves copies reachable: a newcomer
    identical to an old neighbour is not the link systematically dropped
    (before, most copies waited for the level-0 repair, once per node)."""
    import pqsk._graph as G

    stranded = []
    repair = G.repair_level0

    def counting_repair(links0, vectors, entry_point, *args):
        stranded.append(int((~G._reachable(links0, entry_point)).sum()))
        return repair(links0, vectors, entry_point, *args)

    monkeypatch.setattr(G, "repair_level0", counting_repair)
    X, _ = _many_copies(1)
    HNSWPQNeighbors(n_links=8, ef_construction=64, n_subspaces=2, n_codewords=16,
                    random_state=0).fit(X)
    assert stranded[0] <= len(X) // 100


def test_identical_rows_build_in_linear_time():
    """Finding 13: 6,000 identical rows used to take 33-52 s (a quadratic
    level-0 repair); now well under a second (bound kept generous)."""
    import time

    X = np.ones((6000, 16), np.float32)
    start = time.process_time()
    nn = HNSWPQNeighbors(n_neighbors=5, n_subspaces=4, n_codewords=16,
                         random_state=0).fit(X)
    assert time.process_time() - start < 10
    assert _reachable_on_level0(nn).all()
    dist, ind = nn.kneighbors(X[:3])
    assert_allclose(dist, 0, atol=1e-6)
    assert all(len(set(row)) == 5 for row in ind)


def test_partial_fit_keeps_old_points_findable():
    X = rng.randn(2000, 16).astype(np.float32)
    kw = dict(n_neighbors=1, n_links=8, ef_construction=64, ef_search=64,
              n_subspaces=8, n_codewords=64, random_state=0)
    nn = HNSWPQNeighbors(**kw).fit(X[:1000])
    before = nn.kneighbors(X[:1000], return_distance=False)
    nn.partial_fit(X[1000:1500]).partial_fit(X[1500:])
    assert nn.n_samples_fit_ == 2000
    assert _reachable_on_level0(nn).all()
    after = nn.kneighbors(X, return_distance=False)
    # Every point (old and new) finds itself, as with exhaustive ADC.
    exhaustive = PQNeighbors(n_neighbors=1, n_subspaces=8, n_codewords=64,
                             codebooks=nn.codebooks_).fit(X)
    ref = exhaustive.kneighbors(X, return_distance=False)
    assert np.mean(after[:, 0] == ref[:, 0]) > 0.98
    assert np.mean(before[:, 0] == after[:1000, 0]) > 0.98


def test_partial_fit_bad_input_leaves_index_unchanged(fitted):
    X, nn = fitted
    nn = copy.deepcopy(nn)
    before = {k: (v.copy() if isinstance(v, np.ndarray) else v)
              for k, v in nn.__dict__.items() if k != "_levels_rng_"}
    with pytest.raises(ValueError, match="X has 5 features"):
        nn.partial_fit(rng.randn(10, 5))
    with pytest.raises(ValueError, match="infinity"):
        nn.partial_fit(np.full((3, 16), np.inf))
    for key, value in before.items():
        if isinstance(value, np.ndarray):
            assert_array_equal(nn.__dict__[key], value)
        else:
            assert nn.__dict__[key] == value


def test_partial_fit_unfitted_fits():
    X = rng.randn(300, 8)
    kw = dict(n_links=4, ef_construction=16, n_subspaces=2, n_codewords=16, random_state=0)
    a = HNSWPQNeighbors(**kw).partial_fit(X)
    b = HNSWPQNeighbors(**kw).fit(X)
    assert_array_equal(a.links0_, b.links0_)


def test_build_is_deterministic():
    X = rng.randn(1500, 8)
    kw = dict(n_links=6, ef_construction=32, n_subspaces=2, n_codewords=16, random_state=7)
    a = HNSWPQNeighbors(n_jobs=1, **kw).fit(X)
    b = HNSWPQNeighbors(n_jobs=1, **kw).fit(X)
    assert_array_equal(a.links0_, b.links0_)
    assert_array_equal(a.upper_links_, b.upper_links_)
    assert a.entry_point_ == b.entry_point_


def test_n_jobs_agree_at_query_time(fitted):
    X, nn = fitted
    nn = copy.deepcopy(nn)
    a = nn.set_params(n_jobs=1).kneighbors(X[:300])
    b = nn.set_params(n_jobs=2).kneighbors(X[:300])
    assert_array_equal(a[0], b[0])
    assert_array_equal(a[1], b[1])


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_refine_returns_exact_distances(metric):
    X = rng.randn(1000, 8)
    nn = HNSWPQNeighbors(n_neighbors=5, n_links=8, ef_construction=64, n_subspaces=4,
                         n_codewords=64, metric=metric, refine_factor=10,
                         random_state=0).fit(X)
    dist, ind = nn.kneighbors(X[:50] + 0.01)
    ref_d, ref_i = NearestNeighbors(n_neighbors=5, metric=metric).fit(X).kneighbors(
        X[:50] + 0.01)
    assert _recall(ind, ref_i) > 0.95
    Q = X[:50] + 0.01
    if metric == "cosine":
        Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
        Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        exact = 1 - np.einsum("qcd,qd->qc", Xn[ind], Qn)
    else:
        exact = np.sqrt(((X[ind] - Q[:, None]) ** 2).sum(-1))
    assert_allclose(dist, exact, rtol=1e-5, atol=1e-6)


def test_kneighbors_without_X_and_memory(fitted):
    X, nn = fitted
    dist, ind = nn.kneighbors(n_neighbors=3)
    assert ind.shape == (3000, 3)
    assert not np.any(ind == np.arange(3000)[:, None])
    mem = nn.memory_usage_
    # graph + codes: 2M int32 links at level 0, codes, levels, offsets, upper links
    assert mem["per_vector"] < 4 * 2 * nn.n_links + nn.n_subspaces + 4 + 8 + 4 * nn.n_links
    assert mem["vectors"] == 0


def test_bad_parameters():
    X = rng.randn(100, 8)
    with pytest.raises(ValueError, match="n_links"):
        HNSWPQNeighbors(n_links=1, refine_factor=0).fit(X)
    with pytest.raises(ValueError, match="ef_search"):
        HNSWPQNeighbors(ef_search=0, refine_factor=0).fit(X)
    nn = HNSWPQNeighbors(n_links=4, ef_construction=16, n_subspaces=2, n_codewords=16,
                         random_state=0, refine_factor=0).fit(X)
    with pytest.raises(ValueError, match="refit"):
        nn.set_params(refine_factor=3).kneighbors(X[:2])


def test_repair_level0_links_unreachable_nodes():
    from pqsk._graph import _reachable, repair_level0

    V = rng.randn(6, 3).astype(np.float32)
    links0 = np.full((6, 4), -1, np.int32)
    links0[0, :2] = [1, 2]
    links0[1, :1] = [0]
    links0[2, :1] = [0]
    links0[3, :1] = [4]       # 3 <-> 4 and 5 form an island
    links0[4, :1] = [3]
    links0[5, :1] = [3]
    assert _reachable(links0, 0).sum() == 3
    added = repair_level0(links0, V, 0)
    assert _reachable(links0, 0).all()
    assert 1 <= added <= 3
    # Full lists: a link is replaced, never one whose target would be orphaned.
    full = np.array([[1, 2], [2, 0], [0, 1], [0, 1]], np.int32)  # node 3 unreachable
    repair_level0(full, rng.randn(4, 2).astype(np.float32), 0)
    assert _reachable(full, 0).all()


def test_repair_level0_is_linear(monkeypatch):
    """Finding 13: the repair costs a bounded number of breadth-first passes
    over the graph, never one per unreachable node."""
    import pqsk._graph as G

    calls = []
    bfs = G.breadth_first_order
    monkeypatch.setattr(G, "breadth_first_order",
                        lambda *a, **k: calls.append(1) or bfs(*a, **k))
    n, k, width = 1500, 9, 8
    links0 = np.full((n, width), -1, np.int32)
    for i in range(k):  # a full clique around the entry point 0...
        links0[i] = [j for j in range(k) if j != i]
    # ...that every other node links into, and nothing links out of.
    links0[k:, :3] = np.argsort(rng.rand(n - k, k), axis=1)[:, :3]
    V = rng.randn(n, 4).astype(np.float32)
    assert G._reachable(links0, 0).sum() == k
    G.repair_level0(links0, V, 0)
    assert G._reachable(links0, 0).all()
    assert len(calls) <= 12
    # The lists stay well formed: valid ids, no self links, no repeats.
    assert np.all(links0 >= -1) and np.all(links0 < n)
    for i, row in enumerate(links0):
        row = row[row >= 0]
        assert i not in row and len(set(row)) == len(row)


@pytest.mark.parametrize("seed", range(12))
def test_repair_level0_on_random_graphs(seed):
    """Whatever the graph (islands, full lists, no way out of a group), the
    repair makes every node reachable and keeps the lists well formed."""
    from pqsk._graph import _reachable, repair_level0

    r = np.random.RandomState(seed)
    n, width = r.randint(2, 200), r.choice([4, 8])
    links0 = np.full((n, width), -1, np.int32)
    fill = r.rand()
    for i in range(n):
        near = np.setdiff1d(np.arange(max(0, i - 15), min(n, i + 15)), [i])
        k = min(len(near), r.binomial(width, fill))
        links0[i, :k] = r.choice(near, k, replace=False)
    V = np.round(r.randn(n, 3)).astype(np.float32)  # with exact copies
    entry = r.randint(n)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        repair_level0(links0, V, entry, inner_product=bool(seed % 3 == 0))
    assert _reachable(links0, entry).all()
    for i, row in enumerate(links0):
        used = row >= 0
        assert used.all() or not used[np.argmin(used):].any()
        row = row[used]
        assert i not in row and len(set(row)) == len(row)


def test_poor_graph_still_returns_full_rows():
    """A tiny beam on a sparse graph can strand the search; every row is
    still filled with real, distinct neighbours."""
    X = np.random.RandomState(1).randn(40, 6).astype(np.float32)
    nn = HNSWPQNeighbors(1, n_links=2, ef_construction=1, ef_search=1, n_subspaces=3,
                         n_codewords=2, random_state=0).fit(X)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "ef_search=1 is smaller", UserWarning)
        results = (nn.kneighbors(n_neighbors=5, return_distance=False),
                   nn.kneighbors(X, n_neighbors=39, return_distance=False))
    for ind in results:
        assert np.all((ind >= 0) & (ind < 40))
        assert all(len(set(row)) == ind.shape[1] for row in ind)


def test_visited_marks_reused_across_indexes_and_calls():
    """Marks persist per Python thread across searches of different graphs;
    answers must not depend on what was searched before."""
    big = HNSWPQNeighbors(5, n_links=6, ef_construction=32, n_subspaces=2, n_codewords=16,
                          random_state=0).fit(rng.randn(3000, 8))
    small = HNSWPQNeighbors(5, n_links=6, ef_construction=32, n_subspaces=2,
                            n_codewords=16, random_state=0).fit(rng.randn(500, 8))
    Q = rng.randn(20, 8)
    first_small = small.kneighbors(Q)
    first_big = big.kneighbors(Q)
    for _ in range(5):
        for nn, ref in ((small, first_small), (big, first_big)):
            got = nn.kneighbors(Q)
            assert_array_equal(got[0], ref[0])
            assert_array_equal(got[1], ref[1])


def test_repair_never_gives_up_on_one_dimensional_inner_products():
    """Tiny M and inner products in one dimension make the nearest links
    cut nodes off again and again; the repair's last resort links them
    without touching the breadth-first tree, so fit always ends with every
    node reachable (and a saved index that loads)."""
    import warnings

    from pqsk._graph import _reachable

    for seed in range(40):
        r = np.random.RandomState(seed)
        X = r.randn(r.randint(20, 200), 1)
        for metric in ["dot", "euclidean"]:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # "repair gave up" fails the test
                nn = HNSWPQNeighbors(n_links=2, ef_construction=int(r.randint(1, 10)),
                                     n_subspaces=1, n_codewords=min(300, X.shape[0]),
                                     metric=metric, random_state=seed).fit(X)
            assert _reachable(nn.links0_, nn.entry_point_).all(), (seed, metric)
