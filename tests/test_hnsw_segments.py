"""HNSW on sealed segments (issue 11, item 4).

The graph that takes appends is the growing segment; at ``segment_size``
nodes it is sealed into an immutable Segment with its own graph.  Queries
fan out over every graph and merge; ``remove`` tombstones and compacts a
segment past half removed; ``compact`` rebuilds one graph at a time while
queries go on; ``save`` writes a sealed segment's files once.

Small data throughout: segment_size=1024 (the smallest allowed) and a few
thousand rows.
"""

import io
import os
import pickle
import threading

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import pqsk._graph as G
from pqsk import HNSWPQNeighbors, IndexFormatError
import index_files as files

S = 1024
D = 16
rng = np.random.RandomState(0)
X = rng.randn(3000, D).astype(np.float32)
Q = rng.randn(20, D).astype(np.float32)


def _hnsw(**kw):
    kw = {"n_neighbors": 5, "n_links": 8, "ef_construction": 32, "ef_search": 48,
          "n_subspaces": 8, "n_codewords": 32, "segment_size": S, "random_state": 0,
          "n_jobs": 1, "refine_factor": 0, **kw}
    return HNSWPQNeighbors(**kw)


@pytest.fixture(scope="module")
def fitted():
    return _hnsw().fit(X)


def _copy(nn):
    return pickle.loads(pickle.dumps(nn))


def _all_ids(nn):
    """Every stored id, graph by graph (sealed segments, then growing)."""
    parts = [seg["ids"] for seg in nn.segments_]
    n = nn.codes_.shape[0]
    parts.append(np.arange(n) if nn.ids_ is None else nn.ids_)
    return parts


def _live(nn):
    return np.flatnonzero(~nn.removed_) if nn.removed_ is not None else \
        np.arange(nn.n_samples_fit_)


def _exhaustive(nn):
    """ef_search as large as the largest graph: each graph's beam then holds
    every live node it can reach (all of them), so the answers are the
    exact top k over the index's reconstructions (ADC is the exact distance
    to the decoded vector)."""
    n = max([nn.codes_.shape[0]] + [seg["ids"].shape[0] for seg in nn.segments_])
    return nn.set_params(ef_search=n)


def _check_exact(nn, Qs, k):
    dist, ind = nn.kneighbors(Qs, n_neighbors=k)
    live = _live(nn)
    R = nn._reconstruct()[live].astype(np.float64)
    ref = np.sqrt(((Qs[:, None, :].astype(np.float64) - R[None]) ** 2).sum(-1))
    assert np.isin(ind, live).all()
    assert_allclose(dist, np.sort(ref, axis=1)[:, :k], rtol=1e-4, atol=1e-4)
    pos = np.searchsorted(live, ind)
    assert_allclose(dist, np.take_along_axis(ref, pos, axis=1), rtol=1e-4, atol=1e-4)


def _recall(ind, Qs, V, k):
    true = np.argsort(((Qs[:, None, :] - V[None]) ** 2).sum(-1), axis=1)[:, :k]
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(ind, true)])


# -- fit, sealing, fan-out ----------------------------------------------------

def test_fit_builds_consecutive_graphs_of_segment_size(fitted):
    nn = fitted
    assert len(nn.segments_) == 2  # ceil(3000 / 1024) = 3 graphs, the last growing
    assert_array_equal(nn.segments_[0]["ids"], np.arange(0, S))
    assert_array_equal(nn.segments_[1]["ids"], np.arange(S, 2 * S))
    assert_array_equal(nn.ids_, np.arange(2 * S, 3000))
    assert nn.codes_.shape[0] == 3000 - 2 * S
    for seg in nn.segments_:
        assert set(seg.names) == set(G.SEGMENT_ARRAYS)
        assert seg["ids"].dtype == np.int64 and seg["links0"].shape == (S, 16)
        assert not seg["links0"].flags.writeable  # sealed: read-only
        meta = seg.meta
        assert seg["levels"][meta["entry_point"]] == meta["max_level"]
    assert nn.memory_usage_["codes"] == 3000 * 8
    assert nn._n_stored() == 3000
    # Ids are row numbers: the codes of each graph are those of its rows.
    whole = _hnsw(segment_size=4096).fit(X)
    for seg in nn.segments_:
        assert_array_equal(seg["codes"], whole.codes_[seg["ids"]])
    assert_array_equal(nn.codes_, whole.codes_[nn.ids_])


def test_small_fit_has_no_segment():
    nn = _hnsw().fit(X[:S])
    assert nn.segments_ == () and nn.ids_ is None and nn.codes_.shape[0] == S


def test_fan_out_is_exact_when_every_beam_covers_its_graph(fitted):
    nn = _exhaustive(_copy(fitted))
    _check_exact(nn, Q, 10)
    # Every graph is searched: a query equal to an indexed row of each graph
    # finds that row first.
    for i in (5, S + 5, 2 * S + 5):
        ind = nn.kneighbors(nn._reconstruct()[i:i + 1], n_neighbors=1,
                            return_distance=False)
        assert ind[0, 0] == i


def test_recall_sanity_against_brute_force(fitted):
    k = 10
    ind = fitted.kneighbors(Q, n_neighbors=k, return_distance=False)
    # The ADC ceiling: the exact top k over the reconstructions.
    ceiling = _recall(_exhaustive(_copy(fitted)).kneighbors(
        Q, n_neighbors=k, return_distance=False), Q, X, k)
    got = _recall(ind, Q, X, k)
    assert got >= 0.9 * ceiling, (got, ceiling)
    assert search_graphs(fitted) == 3
    # Re-ranking the merged candidates by exact distance.
    nn = _hnsw(refine_factor=10).fit(X)
    assert len(nn.segments_) == 2
    assert _recall(nn.kneighbors(Q, n_neighbors=k, return_distance=False), Q, X, k) >= 0.9


def search_graphs(nn):
    return nn.search_stats(Q)["n_graphs"]


def test_refine_over_every_live_row_is_exact():
    nn = _hnsw(refine_factor=1000).fit(X)
    nn.remove(np.arange(0, 3000, 7))
    live = _live(nn)
    dist, ind = nn.kneighbors(Q, n_neighbors=5)
    ref = np.sqrt(((Q[:, None, :].astype(np.float64) - X[live][None]) ** 2).sum(-1))
    assert_allclose(dist, np.sort(ref, axis=1)[:, :5], rtol=1e-5, atol=1e-5)
    assert_array_equal(ind, live[np.argsort(ref, axis=1, kind="stable")[:, :5]])


def test_self_queries_cover_every_graph(fitted):
    nn = _exhaustive(_copy(fitted))
    ind = nn.kneighbors(n_neighbors=3, return_distance=False)
    assert ind.shape == (3000, 3)
    assert not np.any(ind == np.arange(3000)[:, None])
    assert_array_equal(nn._reconstruct(), _hnsw(segment_size=4096).fit(X)._reconstruct())


# -- appends ------------------------------------------------------------------

def test_appends_seal_the_growing_graph_when_full():
    nn = _hnsw().fit(X[:1000])
    assert nn.segments_ == ()
    nn.partial_fit(X[1000:1100])  # fills the growing graph to 1024, then seals
    assert len(nn.segments_) == 1
    assert_array_equal(nn.segments_[0]["ids"], np.arange(S))
    assert_array_equal(nn.ids_, np.arange(S, 1100))
    first = nn.segments_[0]
    before = {name: np.array(first[name]) for name in first.names}
    nn.partial_fit(X[1100:2048])  # exactly full again: not sealed yet
    assert nn.segments_[0] is first and len(nn.segments_) == 1
    assert nn.codes_.shape[0] == S
    nn.partial_fit(X[2048:2049])  # the append finds it full
    assert len(nn.segments_) == 2 and nn.codes_.shape[0] == 1
    assert_array_equal(nn.ids_, [2048])
    for name in first.names:  # sealed data is never touched by appends
        assert_array_equal(first[name], before[name])
    nn.partial_fit(X[2049:])
    assert [s["ids"].shape[0] for s in nn.segments_] == [S, S]
    assert nn.n_samples_fit_ == 3000
    _check_exact(_exhaustive(nn), Q, 7)


def test_a_large_batch_is_split_at_segment_size():
    nn = _hnsw().fit(X[:100])
    nn.partial_fit(X[100:])
    assert [s["ids"].shape[0] for s in nn.segments_] == [S, S]
    assert_array_equal(nn.ids_, np.arange(2 * S, 3000))
    _check_exact(_exhaustive(nn), Q, 5)


def _failing_on_call(monkeypatch, call):
    """Make the ``call``-th graph build (1-based) fail before linking."""
    real = G.build_scratch
    calls = []

    def build_scratch(*args):
        calls.append(1)
        if len(calls) == call:
            raise MemoryError
        return real(*args)

    monkeypatch.setattr(G, "build_scratch", build_scratch)


def test_a_failed_piece_keeps_the_pieces_linked_before(monkeypatch, tmp_path):
    """The first piece of a batch rewrites old nodes' links (it cannot be
    undone); a later piece failing leaves the index with the first one."""
    nn = _hnsw().fit(X[:1000])
    _failing_on_call(monkeypatch, 2)
    with pytest.raises(MemoryError):
        nn.partial_fit(X[1000:1500])  # 24 rows, seal, then 476 rows: fails
    monkeypatch.undo()
    assert nn.n_samples_fit_ == S and nn.codes_.shape[0] == S and nn.segments_ == ()
    nn.save(tmp_path / "i")
    HNSWPQNeighbors.load(tmp_path / "i")  # every invariant holds
    nn.partial_fit(X[S:1500])
    assert [s["ids"].shape[0] for s in nn.segments_] == [S]
    assert_array_equal(nn.ids_, np.arange(S, 1500))
    _check_exact(_exhaustive(nn), Q, 5)


def test_a_failed_fit_leaves_the_index_unchanged(monkeypatch, fitted):
    from test_fitted_state import same_state

    nn = _copy(fitted)
    before = _copy(nn)
    _failing_on_call(monkeypatch, 2)  # the second graph of the new fit
    with pytest.raises(MemoryError):
        nn.fit(X[::-1])
    monkeypatch.undo()
    assert same_state(nn, before)
    for a, b in zip(before.kneighbors(Q), nn.kneighbors(Q)):
        assert_array_equal(a, b)


def test_segment_size_is_checked_and_changes_only_future_sealing(fitted):
    with pytest.raises(ValueError, match="segment_size"):
        _hnsw(segment_size=1023).fit(X)
    nn = _copy(fitted)
    nn.set_params(segment_size=0)
    with pytest.raises(ValueError, match="segment_size"):
        nn.partial_fit(X[:5])
    assert nn.n_samples_fit_ == 3000
    nn.set_params(segment_size=2 * S)
    nn.partial_fit(X[:1500])  # 952 + 1500 > 1024: fills up to 2048, then seals
    assert [s["ids"].shape[0] for s in nn.segments_] == [S, S, 2 * S]
    assert nn.codes_.shape[0] == 952 + 1500 - 2 * S
    nn.set_params(segment_size=S)
    nn.partial_fit(X[:1])  # 404 < 1024 nodes: no sealing
    assert len(nn.segments_) == 3


# -- removal and compaction ---------------------------------------------------

def test_removed_ids_are_never_returned_and_masks_are_cached(fitted):
    nn = _copy(fitted)
    gone = np.r_[0:400, S:S + 300, 2 * S:2 * S + 200, 2990:3000]
    nn.remove(gone)
    assert [s["ids"].shape[0] for s in nn.segments_] == [S, S]  # <= half: kept
    ind = nn.kneighbors(Q, n_neighbors=20, return_distance=False)
    assert not np.isin(ind, gone).any()
    masks = [nn._segment_tombstones(seg)[0] for seg in nn.segments_]
    assert [m.sum() for m in masks] == [400, 300]
    nn.kneighbors(Q)
    assert all(nn._segment_tombstones(seg)[0] is m for seg, m in zip(nn.segments_, masks))
    nn.remove([500, S + 500])  # updated in place, not recomputed
    assert all(nn._segment_tombstones(seg)[0] is m for seg, m in zip(nn.segments_, masks))
    assert [m.sum() for m in masks] == [401, 301]
    nn.partial_fit(X[:10])  # an append keeps them too
    assert all(nn._segment_tombstones(seg)[0] is m for seg, m in zip(nn.segments_, masks))
    _check_exact(_exhaustive(nn), Q, 10)


def test_short_beams_fall_back_per_graph(fitted):
    """Half of segment 0 removed (not past the share: kept) and a narrow
    beam: beams that end with too few live nodes search their graph again
    from the entry point, so every row is full of live ids."""
    nn = _copy(fitted).set_params(ef_search=1)
    gone = np.arange(0, S, 2)
    nn.remove(gone)
    assert nn.segments_[0]["ids"].shape[0] == S
    dist, ind = nn.kneighbors(Q, n_neighbors=60)
    assert not np.isin(ind, gone).any() and ind.max() < 3000
    assert all(np.unique(row).size == 60 for row in ind)
    assert np.all(np.isfinite(dist))
    # Graphs with fewer live nodes than asked for (3 in the growing graph,
    # 40 in segment 1 once compacted) give what they have, no padding.
    nn.remove(np.r_[2 * S:3000 - 3, S:2 * S - 40])
    assert nn.segments_[1]["ids"].shape[0] == 40
    dist, ind = nn.kneighbors(Q, n_neighbors=200)
    assert np.isin(ind, _live(nn)).all() and np.all(np.isfinite(dist))
    assert all(np.unique(row).size == 200 for row in ind)
    _check_exact(_exhaustive(nn), Q, 200)


def test_remove_compacts_a_segment_past_half_removed(fitted):
    nn = _copy(fitted)
    first, second = nn.segments_
    nn.remove(np.arange(0, S // 2))  # exactly half: not past the share
    assert nn.segments_[0] is first
    nn.remove(np.arange(S // 2, S // 2 + 10))
    new, kept = nn.segments_
    assert kept is second and new is not first and new.uid != first.uid
    assert_array_equal(new["ids"], np.arange(S // 2 + 10, S))
    assert_array_equal(new["codes"], first["codes"][S // 2 + 10:])
    assert new["links0"].shape[0] == S - S // 2 - 10
    assert nn._segment_tombstones(new)[1] == 0
    assert nn.n_removed_ == S // 2 + 10  # ids are not reused
    ind = nn.kneighbors(Q, n_neighbors=10, return_distance=False)
    assert not np.isin(ind, np.arange(S // 2 + 10)).any()
    _check_exact(_exhaustive(nn), Q, 10)
    nn.remove(np.arange(S, 2 * S))  # a whole segment: dropped
    assert nn.segments_ == (new,)
    _check_exact(_exhaustive(nn), Q, 10)


def test_a_failed_auto_compaction_does_not_undo_the_removal(monkeypatch, fitted):
    nn = _copy(fitted)
    first = nn.segments_[0]
    _failing_on_call(monkeypatch, 1)
    with pytest.warns(RuntimeWarning, match="compacting a segment failed.*MemoryError"):
        nn.remove(np.arange(600))
    monkeypatch.undo()
    assert nn.n_removed_ == 600 and nn.segments_[0] is first
    ind = nn.kneighbors(Q, n_neighbors=10, return_distance=False)
    assert not np.isin(ind, np.arange(600)).any()
    nn.compact()
    assert_array_equal(nn.segments_[0]["ids"], np.arange(600, S))


def test_compact_rebuilds_every_graph_with_tombstones(fitted):
    nn = _copy(fitted)
    first, second = nn.segments_
    gone = np.r_[0:100, 2 * S:2 * S + 50]  # segment 0 and the growing graph
    nn.remove(gone)
    nn.compact()
    assert nn.segments_[1] is second  # no tombstone: untouched
    assert nn.segments_[0] is not first
    assert_array_equal(nn.segments_[0]["ids"], np.arange(100, S))
    assert_array_equal(nn.ids_, np.arange(2 * S + 50, 3000))
    assert nn._tombstones().size == 0
    assert all(nn._segment_tombstones(seg)[1] == 0 for seg in nn.segments_)
    ids = np.concatenate(_all_ids(nn))
    assert_array_equal(np.sort(ids), np.setdiff1d(np.arange(3000), gone))
    _check_exact(_exhaustive(nn), Q, 10)
    again = nn.segments_
    nn.compact()  # nothing to do
    assert nn.segments_ == again


def test_compact_keeps_appends_cheap_and_ids_right():
    nn = _hnsw().fit(X[:2500])
    nn.remove(np.arange(0, 2500, 3))
    nn.compact()
    nn.partial_fit(X[2500:])
    nn.remove([2999])
    assert nn.n_samples_fit_ == 3000
    stored = np.concatenate(_all_ids(nn))
    assert np.unique(stored).size == stored.size
    assert_array_equal(np.sort(stored[~nn.removed_[stored]]), _live(nn))
    _check_exact(_exhaustive(nn), Q, 10)


# -- persistence --------------------------------------------------------------

def _segment_files(path):
    """The files of the sealed segments' arrays under ``segments/`` (not the
    tombstone pages and row blocks of format 6, which live there too)."""
    d = os.path.join(path, "segments")
    return {f: os.stat(os.path.join(d, f)) for f in os.listdir(d)
            if not f.endswith((".bits.npy", ".rows.npy"))}


def test_save_writes_new_segments_only(tmp_path, fitted):
    path = str(tmp_path / "i")
    fitted.save(path)
    first = _segment_files(path)
    assert {f.split(".")[0] for f in first} == {s.uid for s in fitted.segments_}
    assert len(first) == 2 * len(G.SEGMENT_ARRAYS)
    nn = HNSWPQNeighbors.load(path)
    nn.partial_fit(X[:200])  # 952 + 200: one more segment sealed
    assert len(nn.segments_) == 3
    nn.save(path, overwrite=True)
    second = _segment_files(path)
    new = set(second) - set(first)
    assert {f.split(".")[0] for f in new} == {nn.segments_[2].uid}
    assert len(new) == len(G.SEGMENT_ARRAYS)
    for f, st in first.items():  # old files are the same files, unchanged
        assert (second[f].st_ino, second[f].st_mtime_ns, second[f].st_size) == \
            (st.st_ino, st.st_mtime_ns, st.st_size)
    back = HNSWPQNeighbors.load(path)
    for a, b in zip(nn.kneighbors(Q), back.kneighbors(Q)):
        assert_array_equal(a, b)
    # A compaction replaces a segment: its files go, the new ones come.
    back.remove(np.arange(600))
    back.save(path, overwrite=True)
    third = _segment_files(path)
    assert {f.split(".")[0] for f in third} == {s.uid for s in back.segments_}
    assert first.keys() - third.keys()


def test_load_with_mmap(tmp_path, fitted):
    path = str(tmp_path / "i")
    nn = _copy(fitted)
    nn.remove(np.arange(0, 3000, 5))
    nn.save(path)
    back = HNSWPQNeighbors.load(path, mmap_mode="r")
    for seg in back.segments_:
        assert isinstance(seg["links0"].base, np.memmap) or isinstance(seg["links0"], np.memmap)
    for a, b in zip(nn.kneighbors(Q), back.kneighbors(Q)):
        assert_array_equal(a, b)
    back.partial_fit(X[:100])  # appends go on next to mapped segments
    back.remove(np.arange(1, 600, 5))  # compacts the mapped segment 0
    ind = back.kneighbors(Q, n_neighbors=10, return_distance=False)
    assert not np.isin(ind, np.flatnonzero(back.removed_)).any()


def _segment_entry(path, i, name):
    header = files.read_header(path)
    key = header["attributes"]["segments_"]["segments"][i]["arrays"][name]
    return header, header["arrays"][key]


def _edit_segment_array(path, i, name, fn):
    """Rewrite segment i's array ``name`` as ``fn(copy)``, its checksum
    recomputed (as someone editing the files on purpose would)."""
    header, meta = _segment_entry(path, i, name)
    fname = os.path.join(path, "segments", meta["segment_file"])
    a = np.load(fname).copy()
    out = fn(a)
    a = a if out is None else out
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    files.replace_file(fname, buf.getvalue())
    meta.update(shape=list(a.shape), dtype=a.dtype.str, sha256=files.sha256_array(a))
    files.write_header(path, header)


def test_corrupted_segment_file_is_refused(tmp_path, fitted):
    path = str(tmp_path / "i")
    fitted.save(path)
    _, meta = _segment_entry(path, 1, "links0")
    fname = os.path.join(path, "segments", meta["segment_file"])
    raw = bytearray(open(fname, "rb").read())
    raw[-5] ^= 0xFF
    files.replace_file(fname, bytes(raw))
    with pytest.raises(IndexFormatError, match="checksum|corrupt"):
        HNSWPQNeighbors.load(path)


def _unreachable(a):
    a[:] = -1
    a[0, 0] = 1


@pytest.mark.parametrize("name, edit, match", [
    ("links0", lambda a: a.__setitem__((3, 0), 10**6), "links0_ has values outside"),
    ("links0", lambda a: a.__setitem__((3, slice(None)), np.r_[-1, a[3, 1:]]),
     "after an unused"),
    ("links0", _unreachable, "unreachable"),
    ("levels", lambda a: a.__setitem__(slice(None), 0), "upper_offsets_ do not match"),
    ("upper_offsets", lambda a: a.__setitem__(slice(None), 0), "upper_offsets_"),
    ("ids", lambda a: a[::-1].copy(), "increasing"),
    ("ids", lambda a: a - S, "stored in two graphs"),    # segment 1 holds segment 0's ids
    ("ids", lambda a: a + 2000, "ids_ has values outside"),
    ("codes", lambda a: a[:-1].copy(), "shape"),
])
def test_inconsistent_segment_is_refused(tmp_path, fitted, name, edit, match):
    path = str(tmp_path / "i")
    fitted.save(path)
    _edit_segment_array(path, 1, name, edit)
    with pytest.raises(IndexFormatError, match=match):
        HNSWPQNeighbors.load(path)


@pytest.mark.parametrize("edit, match", [
    (lambda s: s.update(meta={"entry_point": 10**6, "max_level": 0}), "entry_point_"),
    (lambda s: s.update(meta={"entry_point": 0}), "must hold"),
    (lambda s: s["arrays"].pop("levels"), "must hold the arrays"),
])
def test_inconsistent_segment_entry_is_refused(tmp_path, fitted, edit, match):
    path = str(tmp_path / "i")
    fitted.save(path)
    header = files.read_header(path)
    edit(header["attributes"]["segments_"]["segments"][0])
    files.write_header(path, header)
    with pytest.raises(IndexFormatError, match=match):
        HNSWPQNeighbors.load(path)


def test_a_live_id_missing_from_every_graph_is_refused(tmp_path, fitted):
    path = str(tmp_path / "i")
    fitted.save(path)
    header = files.read_header(path)
    header["attributes"]["segments_"]["segments"].pop(0)
    files.write_header(path, header)
    with pytest.raises(IndexFormatError, match="neither a node nor removed"):
        HNSWPQNeighbors.load(path)


def test_pickle_keeps_segments(fitted):
    back = pickle.loads(pickle.dumps(fitted))
    assert [s.uid for s in back.segments_] == [s.uid for s in fitted.segments_]
    for a, b in zip(fitted.kneighbors(Q), back.kneighbors(Q)):
        assert_array_equal(a, b)


# -- readers during compaction ------------------------------------------------

def test_queries_run_while_compact_builds_a_segment(fitted, monkeypatch):
    """compact() holds only the read lock while it builds: a query started
    in the middle of a segment's build completes before the build ends."""
    nn = _copy(fitted)
    gone = np.r_[0:300, S:S + 300]
    nn.remove(gone)
    expected = _live(nn)
    served = []
    real_link = HNSWPQNeighbors._link

    def link(self, state, n_old, vectors, progress, owner=None, publish=True):
        if self is nn and not publish:
            t = threading.Thread(target=lambda: served.append(
                nn.kneighbors(Q, n_neighbors=10, return_distance=False)))
            t.start()
            t.join(timeout=60)
            assert not t.is_alive(), "a query waited for the build"
        return real_link(self, state, n_old, vectors, progress, owner, publish)

    monkeypatch.setattr(HNSWPQNeighbors, "_link", link)
    nn.compact()
    assert len(served) == 2  # one per rebuilt segment
    for ind in served:
        assert np.isin(ind, expected).all()


def test_reader_thread_gets_valid_answers_while_compact_runs(fitted):
    nn = _copy(fitted)
    gone = np.r_[0:200, S:S + 200, 2 * S:2 * S + 200]
    nn.remove(gone)
    stop = threading.Event()
    errors, answers = [], []

    def reader():
        while not stop.is_set():
            try:
                dist, ind = nn.kneighbors(Q, n_neighbors=10)
                assert ind.shape == (20, 10) and not np.isin(ind, gone).any()
                assert ind.min() >= 0 and ind.max() < 3500
                assert all(np.unique(row).size == 10 for row in ind)
                assert np.all(np.diff(dist, axis=1) >= 0)
                answers.append(ind)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        nn.compact()
        nn.partial_fit(X[:500])
        nn.remove(np.arange(S + 200, S + 700))  # auto-compaction of segment 1
    finally:
        stop.set()
        t.join()
    assert not errors, repr(errors[0])
    assert answers
    assert nn._segment_tombstones(nn.segments_[1])[1] == 0
    ind = nn.kneighbors(Q, n_neighbors=10, return_distance=False)
    assert np.isin(ind, _live(nn)).all()


def test_writers_are_serialised_by_the_writer_mutex():
    from pqsk._runtime import index_writer

    nn = _hnsw()
    lock = index_writer(nn)
    assert index_writer(nn) is lock and hasattr(lock, "acquire")
    nn.fit(X[:1100])
    done = threading.Event()
    with lock:  # another writer holds it: partial_fit waits, queries do not
        t = threading.Thread(target=lambda: (nn.partial_fit(X[:10]), done.set()))
        t.start()
        nn.kneighbors(Q)
        assert not done.wait(0.3)
    t.join(timeout=60)
    assert done.is_set() and nn.n_samples_fit_ == 1110
