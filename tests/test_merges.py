"""Merges built beside the index (issue 21, item 1): pqsk/_merges.py.

A merge snapshots the segments, builds the merged ones without a lock and
swaps them in under the write lock, re-checking the run; with
``merge="background"`` it runs on a thread (``wait_merges``).  Checked
here: answers equal a brute force over the live decoded rows (n_probe =
n_lists, no re-ranking), removals and appends made during a build are
kept, queries go on during a build, errors surface, backpressure, and
pickling / saving / cloning during a merge.
"""
import copy
import pickle
import threading
import time

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.base import clone

from pqsk import IVFPQNeighbors, _lists, _merges
from pqsk._runtime import runtime

r = np.random.RandomState(0)
X = r.standard_normal((12000, 16)).astype(np.float32)
Q = r.standard_normal((25, 16)).astype(np.float32)
K = 5


def make(merge="inline", n=2000, **kw):
    params = dict(n_neighbors=K, n_lists=8, n_probe=8, n_subspaces=4, n_codewords=16,
                  refine_factor=0, segment_size=4096, random_state=0, n_jobs=1,
                  merge=merge)
    params.update(kw)
    return IVFPQNeighbors(**params).fit(X[:n])


def brute(nn, Qs=Q):
    """Top-K of the live decoded rows, by exact distance (sorted ids)."""
    live = np.flatnonzero(~nn.removed_) if nn.removed_ is not None else \
        np.arange(nn.n_samples_fit_)
    V = nn._reconstruct()[live].astype(np.float64)
    D = ((Qs[:, None, :].astype(np.float64) - V[None]) ** 2).sum(-1)
    return np.sort(live[np.argsort(D, axis=1, kind="stable")[:, :K]], axis=1)


def check_consistent(nn):
    """Every live id stored once, records right, answers a brute force."""
    _lists.check_stored_ids(nn.segments_, nn.growing_ids_, nn.growing_lists_, nn.removed_,
                            nn.n_samples_fit_, nn.n_removed_, nn._copies(), nn.n_lists_)
    for seg in nn.segments_:
        dead = (0 if nn.removed_ is None
                else int(np.count_nonzero(nn.removed_[seg["ids"]])))
        assert nn._segment_dead(seg) == dead
    assert_array_equal(np.sort(nn.kneighbors(Q, return_distance=False), axis=1), brute(nn))


def stream(nn, lo=2000, hi=12000, step=500, dead=20):
    for start in range(lo, hi, step):
        nn.partial_fit(X[start:start + step])
        nn.remove(np.arange(start, start + dead))


class Gate:
    """Holds ``_lists.merge_tail`` (as the merges call it) until opened."""

    def __init__(self, monkeypatch, fail=None):
        self.entered, self.open, self.fail = threading.Event(), threading.Event(), fail
        self.calls = 0
        real = _lists.merge_tail

        def gated(*args, **kwargs):
            if threading.current_thread().name == "pqsk-merge" or self.armed:
                self.calls += 1
                self.entered.set()
                assert self.open.wait(30)
                if self.fail is not None:
                    raise self.fail
            return real(*args, **kwargs)
        self.armed = False
        monkeypatch.setattr(_lists, "merge_tail", gated)


@pytest.mark.parametrize("merge", ["inline", "background"])
def test_stream_answers_equal_brute_force(merge):
    nn = make(merge)
    stream(nn)
    assert nn.wait_merges() is True
    assert _merges.pending_merges([s["ids"].shape[0] for s in nn.segments_],
                                  nn.segment_size) == 0
    check_consistent(nn)
    ref = make("inline")
    stream(ref)
    assert_array_equal(nn.kneighbors(Q)[1], ref.kneighbors(Q)[1])  # same quantizers


def test_inline_merge_keeps_the_old_policy():
    """Inline merges give the segments the merge inside the append gave."""
    nn = make()
    stream(nn, dead=0)
    sizes = [s["ids"].shape[0] for s in nn.segments_]
    assert _merges.pending_merges(sizes, nn.segment_size) == 0
    assert len(sizes) <= 8


def test_wait_merges_inline_and_unfitted():
    assert IVFPQNeighbors().wait_merges() is True
    assert make().wait_merges(timeout=0) is True


def test_bad_merge_value():
    with pytest.raises(ValueError, match="merge"):
        IVFPQNeighbors(merge="later").fit(X[:500])


def test_queries_go_on_during_an_inline_merge(monkeypatch):
    nn = make(n=2000)
    gate = Gate(monkeypatch)
    before = nn.kneighbors(Q, return_distance=False)
    gate.armed = True
    writer = threading.Thread(target=nn.partial_fit, args=(X[2000:3500],))
    writer.start()
    assert gate.entered.wait(30)
    # the merge is being built: the write lock is free, queries answer
    t = time.perf_counter()
    during = nn.kneighbors(Q, return_distance=False)
    assert time.perf_counter() - t < 10
    assert during.max() < nn.n_samples_fit_
    gate.armed = False
    gate.open.set()
    writer.join(30)
    assert not writer.is_alive()
    assert before.shape == during.shape
    check_consistent(nn)


def test_removals_and_appends_during_a_background_build(monkeypatch):
    """Ids removed while a merge is built are never returned after the
    swap, appended ones are all kept, records count the tombstones."""
    nn = make("background", n=2000)
    gate = Gate(monkeypatch)
    stream(nn, 2000, 4000, 500, 0)  # seals segments: the merge thread starts
    assert gate.entered.wait(30)
    run = {s.uid for s in nn.segments_}
    dead = np.arange(0, 4000, 7)  # in the segments being merged and others
    nn.remove(dead)
    nn.partial_fit(X[4000:5200])  # appends (and seals) during the build
    assert {s.uid for s in nn.segments_} & run  # old segments still served
    gate.open.set()
    assert nn.wait_merges(timeout=30) is True
    ind = nn.kneighbors(Q, n_neighbors=50, return_distance=False)
    assert not np.isin(ind, dead).any()
    assert nn.n_samples_fit_ == 5200
    check_consistent(nn)


def test_swap_dropped_when_the_run_was_replaced(monkeypatch):
    nn = make("background", n=2000)
    gate = Gate(monkeypatch)
    stream(nn, 2000, 4000, 500, 0)
    assert gate.entered.wait(30)
    nn.remove(np.arange(2000, 3000))
    nn.compact()  # replaces segments of the run being merged
    gate.open.set()
    assert nn.wait_merges(timeout=30) is True
    check_consistent(nn)


def stream_with_reader(nn, lo, hi, step, dead):
    """Append X[lo:hi] in ``step``-row batches, removing ``dead`` random live
    ids after each, while a thread queries one row at a time.  Returns the
    answers that named an invalid or removed id and the number of queries."""
    done = threading.Event()
    removed_so_far = []  # ids whose remove() returned
    bad, n_queries = [], [0]

    def reader():
        i = 0
        while not done.is_set():
            known = np.array(removed_so_far[:len(removed_so_far)], dtype=np.int64)
            ind = nn.kneighbors(Q[i % len(Q)][None], return_distance=False)[0]
            n = nn.n_samples_fit_
            if (ind < 0).any() or (ind >= n).any() or np.isin(ind, known).any():
                bad.append(ind)
            i += 1
            n_queries[0] = i

    t = threading.Thread(target=reader)
    t.start()
    try:
        rng = np.random.RandomState(1)
        for start in range(lo, hi, step):
            nn.partial_fit(X[start:start + step])
            live = np.flatnonzero(~nn.removed_) if nn.removed_ is not None \
                else np.arange(nn.n_samples_fit_)
            ids = rng.choice(live, dead, replace=False)
            nn.remove(ids)
            removed_so_far.extend(ids.tolist())
    finally:
        done.set()
        t.join(60)
    return bad, n_queries[0]


def test_reader_thread_during_background_stream():
    nn = make("background", n=2000)
    bad, n_queries = stream_with_reader(nn, 2000, 12000, 500, 25)
    assert nn.wait_merges(timeout=60) is True
    assert not bad
    assert n_queries > 0
    check_consistent(nn)


def test_background_error_surfaces(monkeypatch):
    nn = make("background", n=2000)
    gate = Gate(monkeypatch, fail=MemoryError("no room"))
    stream(nn, 2000, 3500, 500, 0)
    assert gate.entered.wait(30)
    before = nn.kneighbors(Q, return_distance=False)
    gate.open.set()
    with pytest.raises(RuntimeError, match="background merge") as info:
        nn.wait_merges(timeout=30)
    assert isinstance(info.value.__cause__, MemoryError)
    assert nn.wait_merges() is True  # reported once
    assert_array_equal(nn.kneighbors(Q, return_distance=False), before)
    check_consistent(nn)

    # the next partial_fit reports it too, before appending anything
    gate.entered.clear()
    gate.open.clear()  # the next merge waits at the gate: the stream appends all
    stream(nn, 3500, 5000, 500, 0)
    assert gate.entered.wait(30)
    n = nn.n_samples_fit_
    gate.open.set()
    deadline = time.time() + 30
    while runtime(nn).merges.thread is not None and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(RuntimeError, match="background merge"):
        nn.partial_fit(X[5000:5100])
    assert nn.n_samples_fit_ == n
    monkeypatch.undo()
    nn.partial_fit(X[5000:5100])
    assert nn.wait_merges(timeout=30) is True
    check_consistent(nn)


def test_inline_error_warns_and_keeps_the_rows(monkeypatch):
    nn = make(n=2000)
    gate = Gate(monkeypatch, fail=MemoryError("no room"))
    gate.armed = True
    gate.open.set()
    with pytest.warns(RuntimeWarning, match="merging segments failed"):
        nn.partial_fit(X[2000:3500])
    assert nn.n_samples_fit_ == 3500
    gate.armed = False
    check_consistent(nn)


def test_backpressure(monkeypatch):
    monkeypatch.setattr(_merges, "MAX_PENDING_MERGES", 1)
    nn = make("background", n=2000, segment_size=4096)
    gate = Gate(monkeypatch)
    nn.partial_fit(X[2000:3100])  # seals: the thread starts and is held
    assert gate.entered.wait(30)
    for start in range(3100, 6000, 1100):
        if nn._pending_merges() > 1:
            break
        nn.partial_fit(X[start:start + 1100])
    assert nn._pending_merges() > 1
    writer = threading.Thread(target=nn.partial_fit, args=(X[6000:6100],))
    writer.start()
    writer.join(0.5)
    assert writer.is_alive()  # waits for the merges
    gate.open.set()
    writer.join(30)
    assert not writer.is_alive()
    assert nn.wait_merges(timeout=30) is True
    check_consistent(nn)


def test_pickle_save_clone_during_a_merge(monkeypatch, tmp_path):
    nn = make("background", n=2000)
    gate = Gate(monkeypatch)
    stream(nn, 2000, 4000, 500, 40)
    assert gate.entered.wait(30)
    expect = nn.kneighbors(Q, return_distance=False)
    for other in (pickle.loads(pickle.dumps(nn)), copy.deepcopy(nn)):
        assert_array_equal(other.kneighbors(Q, return_distance=False), expect)
        assert other.wait_merges() is True  # a copy has no merge running
    nn.save(tmp_path / "idx")
    loaded = IVFPQNeighbors.load(tmp_path / "idx")
    assert loaded.merge == "background"
    assert_array_equal(loaded.kneighbors(Q, return_distance=False), expect)
    assert clone(nn).get_params()["merge"] == "background"
    gate.open.set()
    assert nn.wait_merges(timeout=30) is True
    assert_array_equal(nn.kneighbors(Q, return_distance=False), expect)
    check_consistent(nn)


def test_pending_merges_follows_the_policy():
    assert _merges.pending_merges([], 100) == 0
    assert _merges.pending_merges([10], 100) == 0
    assert _merges.pending_merges([40, 20, 10], 100) == 2
    assert _merges.pending_merges([40, 10], 100) == 0  # 40 > 2 * 10
    assert _merges.pending_merges([60, 50], 100) == 0  # over segment_size


# -- HNSW: appends built beside the index (GraphAppendsMixin) -----------------
def _hnsw(**kw):
    from pqsk import HNSWPQNeighbors

    params = dict(n_neighbors=K, n_subspaces=4, n_codewords=16, refine_factor=0,
                  segment_size=2048, random_state=0, n_jobs=1)
    params.update(kw)
    return HNSWPQNeighbors(**params)


def _hnsw_stream(nn, lo, hi, step=300, dead=30):
    for start in range(lo, hi, step):
        nn.partial_fit(X[start:start + step])
        nn.remove(np.arange(start, start + dead))


@pytest.mark.parametrize("refine", [0, 5])
def test_hnsw_beside_equals_in_place(monkeypatch, refine):
    """The same graphs, built on a copy or in place: the same answers."""
    out = []
    for ratio, min_rows in ((0, 10**9), (10**9, 1)):  # always in place, always beside
        monkeypatch.setattr(_merges, "BESIDE_RATIO", ratio)
        monkeypatch.setattr(_merges, "BESIDE_MIN_ROWS", min_rows)
        nn = _hnsw(refine_factor=refine).fit(X[:1000])
        _hnsw_stream(nn, 1000, 5000)
        nn.partial_fit(X[:1])
        out.append(nn.kneighbors(Q))
    assert_array_equal(out[0][0], out[1][0])
    assert_array_equal(out[0][1], out[1][1])


class LinkGate:
    """Holds ``_graph.link`` in the thread named "writer" until opened."""

    def __init__(self, monkeypatch, fail=None):
        from pqsk import _graph

        self.entered, self.open, self.fail = threading.Event(), threading.Event(), fail
        real = _graph.link

        def gated(*args, **kwargs):
            if threading.current_thread().name == "writer":
                self.entered.set()
                assert self.open.wait(30)
                if self.fail is not None:
                    raise self.fail
            return real(*args, **kwargs)
        monkeypatch.setattr(_graph, "link", gated)


def test_hnsw_queries_go_on_during_an_append(monkeypatch):
    nn = _hnsw().fit(X[:1000])
    before = nn.kneighbors(Q)
    gate = LinkGate(monkeypatch)
    writer = threading.Thread(target=nn.partial_fit, args=(X[1000:1500],), name="writer")
    writer.start()
    assert gate.entered.wait(30)
    during = nn.kneighbors(Q)  # the write lock is free: the old index answers
    assert_array_equal(during[1], before[1])
    gate.open.set()
    writer.join(30)
    assert not writer.is_alive()
    assert nn.n_samples_fit_ == 1500
    monkeypatch.undo()
    ref = _hnsw().fit(X[:1000])
    monkeypatch.setattr(_merges, "BESIDE_MIN_ROWS", 10**9)  # in place
    ref.partial_fit(X[1000:1500])
    assert_array_equal(nn.kneighbors(Q)[1], ref.kneighbors(Q)[1])


def test_hnsw_failed_beside_append_changes_nothing(monkeypatch):
    from test_fitted_state import same_state

    nn = _hnsw().fit(X[:1000])
    nn.remove(np.arange(0, 1000, 9))
    before = copy.deepcopy(nn)
    gate = LinkGate(monkeypatch, fail=MemoryError("no room"))
    gate.open.set()
    writer_error = []

    def append():
        try:
            nn.partial_fit(X[1000:1300])
        except MemoryError as e:
            writer_error.append(e)
    t = threading.Thread(target=append, name="writer")
    t.start()
    t.join(30)
    assert writer_error
    monkeypatch.undo()
    assert same_state(nn, before)
    assert_array_equal(nn.kneighbors(Q)[1], before.kneighbors(Q)[1])
    nn.partial_fit(X[1000:1300])
    before.partial_fit(X[1000:1300])
    assert_array_equal(nn.kneighbors(Q)[1], before.kneighbors(Q)[1])


def test_hnsw_reader_thread_during_a_stream():
    nn = _hnsw().fit(X[:1000])
    bad, n_queries = stream_with_reader(nn, 1000, 6000, 500, 40)
    assert not bad and n_queries > 0
    # exhaustive beam: the answers are the brute force over the decoded live rows
    nn.set_params(ef_search=nn.n_samples_fit_)
    assert_array_equal(np.sort(nn.kneighbors(Q, return_distance=False), axis=1), brute(nn))


def test_hnsw_small_append_that_seals_is_built_beside(monkeypatch):
    """Fewer than BESIDE_MIN_ROWS rows, but sealing copies the growing
    graph: built beside, so queries answer meanwhile."""
    nn = _hnsw(segment_size=1024).fit(X[:1000])
    before = nn.kneighbors(Q)
    gate = LinkGate(monkeypatch)
    writer = threading.Thread(target=nn.partial_fit, args=(X[1000:1030],), name="writer")
    writer.start()
    assert gate.entered.wait(30)
    assert_array_equal(nn.kneighbors(Q)[1], before[1])
    gate.open.set()
    writer.join(30)
    assert not writer.is_alive()
    assert [s["ids"].shape[0] for s in nn.segments_] == [1024]
    assert nn.codes_.shape[0] == 6 and nn.n_samples_fit_ == 1030
