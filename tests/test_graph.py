"""The graph stage (``pqsk._graph``) on its own: grow and link a graph,
repair level 0, check a loaded graph, search one graph against the naive
oracle and brute force."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from pqsk import _graph as G
from pqsk import _naive
from pqsk._segments import Segment
from pqsk._utils import Progress

rng = np.random.RandomState(0)
M = 4
N_FEATURES, N_SUBSPACES, N_CODEWORDS = 8, 4, 16
INT64_MAX = np.iinfo(np.int64).max


def _codebooks(seed=0):
    r = np.random.RandomState(seed)
    ds = N_FEATURES // N_SUBSPACES
    return r.randn(N_SUBSPACES, N_CODEWORDS, ds).astype(np.float32)


def _build(X, codebooks, inner_product=False, ef_construction=32, pieces=(None,), seed=0):
    """A graph of the rows X (float32), grown and linked piece by piece
    (``pieces``: the row where each append ends), as an index builds it."""
    codes = _naive.encode(X, codebooks).astype(np.uint8)
    owner = G.BufferOwner()
    state = G.empty_graph(N_SUBSPACES, M, np.uint8)
    levels_rng = np.random.RandomState(seed)
    kept, start = None, 0
    for stop in pieces:
        stop = X.shape[0] if stop is None else stop
        state = G.grow(state, codes[start:stop], levels_rng, owner)
        kept = G.link(state, start, X[start:stop], codebooks, ef_construction,
                      inner_product, Progress(0, "test"), owner, kept)
        start = stop
    state["ids_"] = None
    return state


@pytest.fixture(scope="module")
def data():
    X = rng.randn(600, N_FEATURES).astype(np.float32)
    X[300:340] = X[:40]  # exact copies
    return X


@pytest.fixture(scope="module", params=[False, True], ids=["l2", "dot"])
def built(request, data):
    cb = _codebooks()
    return _build(data, cb, inner_product=request.param), cb, request.param


def _removed(graph, n_dead=0):
    removed = np.zeros(graph["codes_"].shape[0], bool)
    removed[:n_dead] = True
    return removed


def _check(graph, removed=None):
    removed = _removed(graph) if removed is None else removed
    return G.check_graph(graph, "", N_SUBSPACES, N_CODEWORDS, M, np.uint8, removed)


def test_built_graph_passes_the_checks(built):
    graph, _, _ = built
    n = graph["codes_"].shape[0]
    assert_array_equal(_check(graph), np.arange(n))
    assert G._reachable(graph["links0_"], graph["entry_point_"]).all()
    G.check_parent_tree(graph["links0_"], graph["level0_parent_"], graph["entry_point_"])
    assert graph["levels_"][graph["entry_point_"]] == graph["max_level_"]


def test_appends_keep_every_node_reachable(data):
    cb = _codebooks()
    graph = _build(data, cb, pieces=(200, 201, 260, 450, None))
    _check(graph)
    G.check_parent_tree(graph["links0_"], graph["level0_parent_"], graph["entry_point_"])


def test_grow_appends_unlinked_nodes():
    cb = _codebooks()
    graph = _build(rng.randn(50, N_FEATURES).astype(np.float32), cb)
    codes = np.zeros((7, N_SUBSPACES), np.uint8)
    grown = G.grow(graph, codes, np.random.RandomState(1), G.BufferOwner())
    assert grown["codes_"].shape[0] == 57
    assert np.all(grown["links0_"][50:] == -1)
    assert np.all(grown["level0_parent_"][50:] == G._hnsw.PARENT_LOST)
    levels = grown["levels_"]
    assert grown["upper_links_"].shape[0] == levels.sum()
    assert_array_equal(grown["upper_offsets_"][1:], np.cumsum(levels)[:-1])
    assert_array_equal(grown["links0_"][:50], graph["links0_"])


def test_repair_makes_every_node_reachable(built):
    graph, cb, ip = built
    links0 = graph["links0_"].copy()
    n = links0.shape[0]
    # Cut every link into 30 nodes (the rows stay -1-padded at the end).
    cut = np.setdiff1d(np.arange(0, n, 20), [graph["entry_point_"]])
    for row in links0:
        kept = row[(row >= 0) & ~np.isin(row, cut)]
        row[:] = -1
        row[:kept.size] = kept
    assert not G._reachable(links0, graph["entry_point_"])[cut].any()
    X = _naive.decode(graph["codes_"], cb).astype(np.float32)
    added = G.repair_level0(links0, X, graph["entry_point_"], ip)
    assert added >= 1
    assert G._reachable(links0, graph["entry_point_"]).all()
    _check({**graph, "links0_": links0})
    parent = G.level0_parents(links0, graph["entry_point_"])
    G.check_parent_tree(links0, parent, graph["entry_point_"])


def _corrupt_out_of_range(g):
    g["links0_"][3, 0] = g["codes_"].shape[0]


def _corrupt_gap(g):
    row = g["links0_"][5]
    row[0] = -1  # -1 before used slots
    assert (row[1:] >= 0).any()


def _corrupt_upper_to_lower_level(g):
    levels, off = g["levels_"], g["upper_offsets_"]
    node = int(np.flatnonzero(levels >= 1)[0])
    g["upper_links_"][off[node], 0] = int(np.flatnonzero(levels == 0)[0])


def _corrupt_unreachable(g):
    links0 = g["links0_"]
    target = int(np.setdiff1d(np.arange(links0.shape[0]), [g["entry_point_"]])[0])
    for row in links0:
        kept = row[(row >= 0) & (row != target)]
        row[:] = -1
        row[:kept.size] = kept


@pytest.mark.parametrize("corrupt, message", [
    (_corrupt_out_of_range, r"links0_ has values outside \[-1, 600\)"),
    (_corrupt_gap, r"links0_ has links after an unused \(-1\) slot"),
    (_corrupt_upper_to_lower_level, "an upper-level link points at a node without that level"),
    (_corrupt_unreachable, "a live node is unreachable from the entry point on level 0"),
])
def test_check_graph_rejects_a_corrupted_graph(built, corrupt, message):
    graph, _, _ = built
    bad = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in graph.items()}
    corrupt(bad)
    with pytest.raises(ValueError, match=message):
        _check(bad)
    with pytest.raises(ValueError, match="segment 2 " + message):
        G.check_graph(bad, "segment 2 ", N_SUBSPACES, N_CODEWORDS, M, np.uint8,
                      _removed(graph))


def test_unreachable_removed_nodes_pass_the_check(built):
    """Removed nodes need not be reachable (a search never returns them)."""
    graph, _, _ = built
    bad = {**graph, "links0_": graph["links0_"].copy()}
    _corrupt_unreachable(bad)
    removed = ~G._reachable(bad["links0_"], graph["entry_point_"])
    assert removed.any()
    _check(bad, removed)


def test_check_parent_tree_rejects_a_parent_without_the_link(built):
    graph, _, _ = built
    parent = graph["level0_parent_"].copy()
    child = int(np.flatnonzero(parent >= 0)[0])
    parent[child] = next(i for i in range(parent.size)
                         if i != child and child not in graph["links0_"][i])
    with pytest.raises(ValueError, match="names a parent that does not link to its child"):
        G.check_parent_tree(graph["links0_"], parent, graph["entry_point_"])
    parent[child] = -1
    with pytest.raises(ValueError, match="the entry point as its only root"):
        G.check_parent_tree(graph["links0_"], parent, graph["entry_point_"])


def test_check_graphs_rejects_an_id_stored_twice(built):
    graph, _, _ = built
    n = graph["codes_"].shape[0]
    growing = {**graph, "ids_": np.arange(n, dtype=np.int64)}
    seg = Segment({name: np.ascontiguousarray(growing[name + "_"])
                   for name in G.SEGMENT_ARRAYS},
                  {"entry_point": graph["entry_point_"], "max_level": graph["max_level_"]})
    removed = np.zeros(2 * n, bool)
    G.check_graphs({**growing, "ids_": np.arange(n, 2 * n, dtype=np.int64)}, (seg,),
                   N_SUBSPACES, N_CODEWORDS, np.uint8, removed)
    with pytest.raises(ValueError, match="an id is stored in two graphs"):
        G.check_graphs(growing, (seg,), N_SUBSPACES, N_CODEWORDS, np.uint8, removed)
    with pytest.raises(ValueError, match="an id is neither a node nor removed"):
        G.check_graphs(growing, (), N_SUBSPACES, N_CODEWORDS, np.uint8, removed)


def _oracle(graph, cb, Q, n_out, ef, ip, deleted=None):
    tables = _naive.adc_tables(Q, cb, ip, dtype=np.float32)
    return _naive.hnsw_search(tables, graph["codes_"], graph["links0_"],
                              graph["upper_links_"], graph["upper_offsets_"],
                              graph["entry_point_"], graph["max_level_"], ef, n_out,
                              deleted)


@pytest.mark.parametrize("ef", [10, 40])
def test_search_matches_the_naive_oracle(built, ef):
    graph, cb, ip = built
    Q = rng.randn(25, N_FEATURES).astype(np.float32)
    dist, ind, n_dist = G.search(graph, np.empty(0, np.uint8), Q, 10, ef, cb, ip, 2)
    d_ref, i_ref, n_ref = _oracle(graph, cb, Q, 10, ef, ip)
    assert_array_equal(ind, i_ref)
    assert_allclose(dist, d_ref, rtol=1e-6, atol=1e-6)
    assert_array_equal(n_dist, n_ref)


def test_search_with_tombstones_matches_the_naive_oracle(built):
    graph, cb, ip = built
    deleted = (rng.rand(graph["codes_"].shape[0]) < 0.3).astype(np.uint8)
    Q = rng.randn(25, N_FEATURES).astype(np.float32)
    _, ind, _ = G.search(graph, deleted, Q, 10, 40, cb, ip, 1)
    _, i_ref, _ = _oracle(graph, cb, Q, 10, 40, ip, deleted.astype(bool))
    assert_array_equal(ind, i_ref)
    assert not deleted[ind[ind != INT64_MAX]].any()


def test_full_beam_from_the_entry_point_is_brute_force(built):
    """Every node is reachable from the entry point: a beam as wide as the
    graph finds the exact ADC top k."""
    graph, cb, ip = built
    n = graph["codes_"].shape[0]
    Q = rng.randn(15, N_FEATURES).astype(np.float32)
    dist, ind, _ = G.search(graph, np.empty(0, np.uint8), Q, 12, n, cb, ip, 2,
                            from_entry=True)
    tables = _naive.adc_tables(Q, cb, ip)
    for q in range(Q.shape[0]):
        full = _naive.adc_distances(tables[q], graph["codes_"])
        ref = np.lexsort((np.arange(n), full))[:12]
        assert_allclose(dist[q], full[ref], rtol=1e-5, atol=1e-5)
        assert_allclose(full[ind[q]], full[ref], rtol=1e-5, atol=1e-5)


def test_visited_marks_are_kept_per_thread_and_grow():
    rows, gens = G.visited_marks(2, 100)
    assert rows.shape[0] >= 2 and rows.shape[1] >= 100
    assert G.visited_marks(1, 50)[0] is rows  # reused while large enough
    bigger = G.visited_marks(2, rows.shape[1] + 1)[0]
    assert bigger.shape[1] > rows.shape[1] and not bigger.any()


def _island_graph(n=40, seed=0):
    """A graph whose descent strands the beam: the entry point 0 reaches
    every node on level 0 (0 -> 1, 0 -> 2 -> 3 -> ...), but node 1, which
    the descent moves to for a query near it, has no level-0 link."""
    r = np.random.RandomState(seed)
    codes = r.randint(0, N_CODEWORDS, (n, N_SUBSPACES)).astype(np.uint8)
    codes[1] = (codes[0] + 1) % N_CODEWORDS
    levels = np.zeros(n, np.int32)
    levels[:2] = 1
    offsets = np.zeros(n, np.int64)
    offsets[1:] = 1
    offsets[2:] = 2
    upper = np.array([[1] + [-1] * (M - 1), [0] + [-1] * (M - 1)], np.int32)
    links0 = np.full((n, 2 * M), -1, np.int32)
    links0[0, :2] = [1, 2]
    links0[2:-1, 0] = np.arange(3, n)
    graph = {"codes_": codes, "levels_": levels, "links0_": links0, "upper_links_": upper,
             "upper_offsets_": offsets, "entry_point_": 0, "max_level_": 1, "ids_": None}
    _check(graph, np.zeros(n, bool))
    return graph


@pytest.mark.parametrize("per_query", [False, True])
def test_search_complete_fills_short_beams(per_query):
    """A beam stranded where the descent ended finds too few nodes; those
    queries are searched again over the whole graph from the entry point,
    which finds the exact top k of the nodes they may return."""
    graph, cb = _island_graph(), _codebooks()
    n, nq = graph["codes_"].shape[0], 5
    Q = np.repeat(_naive.decode(graph["codes_"][1:2], cb), nq, axis=0).astype(np.float32)
    Q[1:] += 0.01 * rng.randn(nq - 1, N_FEATURES).astype(np.float32)
    masks = (rng.rand(nq, n) < 0.3).astype(np.uint8)
    masks[:, :2] = 0
    if not per_query:
        masks[:] = masks[0]
    deleted, stride = (masks.ravel(), n) if per_query else (masks[0], 0)
    _, ind, _ = G.search(graph, deleted, Q, 5, 5, cb, False, 1, deleted_stride=stride)
    assert np.all(ind[:, 1:] == INT64_MAX)  # only node 1 found
    dist, ind = G.search_complete(graph, deleted, Q, 5, 5, cb, False, 1,
                                  deleted_stride=stride)
    tables = _naive.adc_tables(Q, cb)
    for q in range(nq):
        full = _naive.adc_distances(tables[q], graph["codes_"])
        full[masks[q] == 1] = np.inf
        ref = np.lexsort((np.arange(n), full))[:5]
        assert_array_equal(ind[q], ref)
        assert_allclose(dist[q], full[ref], rtol=1e-5, atol=1e-5)
