"""The segment write policy (``pqsk._segments.SegmentWritesMixin``) and the
per-estimator runtime state (``pqsk._runtime``), tested directly.

A toy index (sealed segments of ids, a growing part of ids) follows the
policy as IVF and HNSW do: its tombstone records must stay right through
remove, append, seal and compaction, be updated in place rather than
recomputed, and be recomputed when stale; the compaction decision picks
exactly the segments past ``COMPACT_SHARE``; the replace step builds
under the read lock and swaps atomically under the write lock.  Then the
same records are checked on the real estimators against brute force.
"""

import copy
import pickle
import threading

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.base import BaseEstimator

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, _growable
from pqsk._runtime import index_lock, index_writer, runtime
from pqsk._segments import (COMPACT_SHARE, NO_TOMBSTONES, Segment, SegmentWritesMixin,
                            positions)


class Toy(SegmentWritesMixin, BaseEstimator):
    """Sealed segments of consecutive ids (``sizes``), then ``growing``
    ids in a growing part; compaction drops removed ids."""

    def __init__(self, sizes, growing=0, masks=False):
        self.sizes, self.growing, self.masks = sizes, growing, masks
        self._node_masks = masks
        segs, lo = [], 0
        for n in sizes:
            segs.append(self._made(np.arange(lo, lo + n)))
            lo += n
        self.segments_ = tuple(segs)
        self.growing_ids_ = np.arange(lo, lo + growing)
        self.n_samples_fit_ = lo + growing
        self.removed_ = None
        self.n_removed_ = 0
        self.builds = 0

    def fit(self):  # check_is_fitted wants one
        return self

    def compact(self):
        return self._compact_all()

    @staticmethod
    def _made(ids):
        return Segment({"ids": ids}, {"lo": int(ids[0]), "hi": int(ids[-1]) + 1})

    def _compacted_segment(self, seg):
        self.builds += 1
        keep = ~self.removed_[seg["ids"]]
        if keep.all():
            return seg, {}
        if not keep.any():
            return None, {}
        return self._made(seg["ids"][keep]), {}

    def _compact_growing(self):
        if self.n_removed_:
            with index_lock(self).write():
                self.growing_ids_ = self.growing_ids_[~self.removed_[self.growing_ids_]]

    def append(self, b):
        old = self.removed_
        if old is not None:
            self.removed_ = _growable.grow(self, "removed", old, b, False)
        self.growing_ids_ = np.r_[self.growing_ids_, np.arange(b) + self.n_samples_fit_]
        self.n_samples_fit_ += b
        self._note_grown(old)

    def seal(self):
        ids = self.growing_ids_
        seg = self._made(ids)
        mask = None if not self.n_removed_ else self.removed_[ids].view(np.uint8)
        self.segments_ += (seg,)
        self.growing_ids_ = ids[:0]
        self._note_segment(seg, mask)
        return seg


def _truth(toy, seg):
    flags = (np.zeros(toy.n_samples_fit_, bool) if toy.removed_ is None
             else toy.removed_)[seg["ids"]]
    return flags.view(np.uint8), int(flags.sum())


def _check_records(toy):
    for seg in toy.segments_:
        mask, count = _truth(toy, seg)
        assert toy._segment_dead(seg) == count
        if toy._node_masks:
            got, n = toy._segment_tombstones(seg)
            assert n == count
            if count:
                assert_array_equal(got, mask)
            else:
                assert got is NO_TOMBSTONES


def _record(toy, seg):
    return runtime(toy).segment_tombstones.get(seg.uid)


# -- tombstone records --------------------------------------------------------

@pytest.mark.parametrize("masks", [False, True])
def test_records_stay_right_through_remove_append_seal_compact(masks):
    toy = Toy([100, 100, 50], growing=30, masks=masks)
    _check_records(toy)
    toy.remove([3, 150, 151, 260])  # segments 0, 1 and the growing part
    _check_records(toy)
    records = [_record(toy, s) for s in toy.segments_]
    assert all(r is not None for r in records)
    toy.remove(np.arange(10, 20))
    _check_records(toy)
    # Updated in place (O(ids)), never recomputed: the same objects, and
    # for graphs the same mask arrays.
    assert all(_record(toy, s) is r for s, r in zip(toy.segments_, records))
    masks_before = [r.mask for r in records]
    toy.append(40)
    _check_records(toy)
    assert all(_record(toy, s) is r for s, r in zip(toy.segments_, records))
    assert all(r.mask is m for r, m in zip(records, masks_before))
    sealed = toy.seal()
    _check_records(toy)
    assert _record(toy, sealed).count == 1  # id 260
    toy.remove([sealed["ids"][-1], 0])
    _check_records(toy)
    assert _record(toy, sealed).count == 2
    first = toy.segments_[0]
    toy.compact()
    _check_records(toy)
    assert all(toy._segment_dead(s) == 0 for s in toy.segments_)
    assert first not in toy.segments_ and _record(toy, first) is None
    assert sorted(np.concatenate([s["ids"] for s in toy.segments_]).tolist()) == \
        np.flatnonzero(~toy.removed_[:sealed.meta["hi"]]).tolist()


def test_the_first_removal_updates_the_records_of_sealing():
    """Records made before any removal are current for the first one: no
    pass over the segments."""
    toy = Toy([100, 100])
    for seg in toy.segments_:
        toy._note_segment(seg)
    before = [_record(toy, s) for s in toy.segments_]
    toy.remove([1, 2, 150])
    assert [_record(toy, s) for s in toy.segments_] == before
    assert [r.count for r in before] == [2, 1]


def test_stale_records_are_recomputed():
    toy = Toy([100, 100], masks=True)
    toy.remove([5, 105])
    _check_records(toy)
    # A removed_ replaced by an equal array, with another id marked (as a
    # restored or reloaded state would be): records keyed to the old array
    # are stale.
    removed = toy.removed_.copy()
    removed[7] = True
    toy.removed_, toy.n_removed_ = removed, 3
    _check_records(toy)
    # A record that was stale when remove came is not updated: it is made
    # again (here by the compaction decision that follows the removal).
    stale = _record(toy, toy.segments_[1])
    stale.n_removed = -1
    toy.remove([106])
    assert _record(toy, toy.segments_[1]) is not stale and stale.count == 1
    _check_records(toy)


def test_records_of_dropped_segments_are_pruned():
    toy = Toy([100, 100])
    toy.remove([1])
    old = toy.segments_[0]
    toy.compact()
    assert _record(toy, old) is None
    toy.remove([150])
    assert set(runtime(toy).segment_tombstones) <= {s.uid for s in toy.segments_}


def test_positions():
    sorted_ids = np.array([2, 5, 9, 12])
    assert_array_equal(positions(sorted_ids, np.array([12, 2, 3, 20])), [3, 0])


# -- the compaction decision ---------------------------------------------------

def test_segments_past_the_share():
    toy = Toy([100, 100, 100])
    toy.removed_ = np.zeros(300, bool)
    toy.removed_[:50] = True  # exactly half: not past
    toy.removed_[100:151] = True  # past
    toy.removed_[299] = True
    toy.n_removed_ = int(toy.removed_.sum())
    assert COMPACT_SHARE == 0.5
    assert toy._segments_past(COMPACT_SHARE) == [toy.segments_[1]]
    assert toy._segments_past(0) == list(toy.segments_)


def test_remove_compacts_only_the_segments_past_the_share():
    toy = Toy([100, 100, 100], growing=10)
    first, second, third = toy.segments_
    toy.remove(np.arange(50))
    assert toy.segments_ == (first, second, third) and toy.builds == 0
    toy.remove(np.r_[50, 100:120])
    new = toy.segments_[0]
    assert toy.segments_[1:] == (second, third) and toy.builds == 1
    assert_array_equal(new["ids"], np.arange(51, 100))
    assert toy._segment_dead(new) == 0 and toy._segment_dead(second) == 20
    toy.remove(np.arange(200, 300))  # the whole segment: dropped
    assert toy.segments_ == (new, second)
    assert_array_equal(toy.growing_ids_, np.arange(300, 310))  # not past: kept


def test_a_failed_compaction_is_a_warning_and_the_ids_stay_removed(monkeypatch):
    toy = Toy([100, 100])
    first = toy.segments_[0]

    def fail(seg):
        raise MemoryError("no room")

    monkeypatch.setattr(toy, "_compacted_segment", fail)
    with pytest.warns(RuntimeWarning, match="compacting a segment failed.*MemoryError"):
        toy.remove(np.arange(60))
    assert toy.n_removed_ == 60 and toy.segments_[0] is first
    monkeypatch.undo()
    toy.compact()
    assert_array_equal(toy.segments_[0]["ids"], np.arange(60, 100))


def test_compact_keeps_segments_without_tombstones():
    toy = Toy([100, 100, 100])
    toy.remove([150])
    first, _, third = toy.segments_
    toy.compact()
    assert toy.segments_[0] is first and toy.segments_[2] is third
    assert toy.builds == 1


# -- the replace step ----------------------------------------------------------

def test_replace_builds_under_the_read_lock_and_swaps_atomically():
    """While the new segment is built, queries run (they take the read
    lock); the swap of ``segments_`` and the attributes published with it
    is one step for every reader."""
    toy = Toy([100, 100])
    toy.version = 0
    seg = toy.segments_[0]
    building, go_on = threading.Event(), threading.Event()

    def build():
        building.set()
        assert go_on.wait(10)
        return Toy._made(np.arange(1, 100)), {"version": 1}

    seen, errors, stop = set(), [], threading.Event()

    def reader():
        while not stop.is_set():
            with index_lock(toy).read():
                segs, version = toy.segments_, toy.version
            first = segs[0]["ids"]
            # Old segments with version 0, or the new one with version 1.
            if (first[0] == 0) != (version == 0):
                errors.append((first[0], version))
            seen.add(version)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    for t in readers:
        t.start()
    writer = threading.Thread(target=lambda: toy._replace_segment(seg, build))
    with index_writer(toy):
        writer.start()
        assert building.wait(10)
        # The build holds the read lock: another reader gets in meanwhile.
        got_in = threading.Event()
        probe = threading.Thread(target=lambda: (index_lock(toy).read().__enter__(),
                                                 got_in.set()))
        probe.start()
        assert got_in.wait(10)
        probe.join()
        go_on.set()
    writer.join(10)
    stop.set()
    for t in readers:
        t.join(10)
    assert not errors
    assert toy.version == 1 and toy.segments_[0]["ids"][0] == 1
    assert toy.segments_[1] is not seg and toy._segment_dead(toy.segments_[0]) == 0


def test_replace_with_the_same_segment_changes_nothing():
    toy = Toy([100])
    before = toy.segments_
    toy._replace_segment(toy.segments_[0], lambda: (toy.segments_[0], {"x": 1}))
    assert toy.segments_ is before and not hasattr(toy, "x")


# -- the runtime state ---------------------------------------------------------

def test_runtime_is_per_estimator_and_outside_the_estimator():
    nn = IVFPQNeighbors(n_lists=4, n_subspaces=2, n_codewords=16, random_state=0)
    nn.fit(np.random.RandomState(0).rand(300, 4).astype(np.float32))
    state = runtime(nn)
    assert runtime(nn) is state
    assert index_lock(nn) is state.lock and index_writer(nn) is state.writer
    assert not any(v is state for v in vars(nn).values())
    assert runtime(copy.copy(nn)) is not state
    assert runtime(pickle.loads(pickle.dumps(nn))) is not state
    # A query changes the runtime state, not __dict__.
    before = dict(vars(nn))
    nn.kneighbors(nn.cluster_centers_[:2])
    assert vars(nn).keys() == before.keys()
    assert state.checked_params is not None


def test_runtime_created_once_under_concurrent_first_use():
    owner = type("Owner", (), {})()
    got, start = [], threading.Barrier(8)

    def first_use():
        start.wait()
        got.append(runtime(owner))

    threads = [threading.Thread(target=first_use) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in got}) == 1


# -- the policy in the estimators ----------------------------------------------

def _real_check(nn):
    removed = nn.removed_
    for seg in nn.segments_:
        flags = removed[seg["ids"]]
        assert nn._segment_dead(seg) == int(flags.sum())
        if nn._node_masks:
            mask, n = nn._segment_tombstones(seg)
            assert n == int(flags.sum())
            if n:
                assert_array_equal(mask, flags.view(np.uint8))


@pytest.mark.parametrize("make", [
    lambda: IVFPQNeighbors(n_lists=8, n_subspaces=4, n_codewords=16, segment_size=1024,
                           refine_factor=0, random_state=0),
    lambda: HNSWPQNeighbors(n_links=8, ef_construction=32, n_subspaces=4, n_codewords=16,
                            segment_size=1024, refine_factor=0, random_state=0, n_jobs=1),
], ids=["ivf", "hnsw"])
def test_estimator_records_through_remove_append_compact(make):
    rng = np.random.RandomState(0)
    X = rng.rand(3300, 8).astype(np.float32)
    nn = make().fit(X[:2100])
    assert len(nn.segments_) >= 2
    nn.remove(np.r_[0:300, 1100:1200, 2090:2100])
    _real_check(nn)
    records = {s.uid: runtime(nn).segment_tombstones.get(s.uid) for s in nn.segments_}
    nn.partial_fit(X[2100:2200])
    nn.remove(np.r_[300:310, 2150:2160])
    _real_check(nn)
    # Records updated in place by remove and kept by partial_fit.
    assert all(runtime(nn).segment_tombstones.get(uid) is r
               for uid, r in records.items() if r is not None)
    n_segments = len(nn.segments_)
    nn.partial_fit(X[2200:])  # seals the growing part
    assert len(nn.segments_) > n_segments
    _real_check(nn)
    nn.remove(np.arange(310, 700))  # segment 0 past the share: compacted
    _real_check(nn)
    assert all(nn._segment_dead(s) <= COMPACT_SHARE * s["ids"].shape[0]
               for s in nn.segments_)
    nn.compact()
    _real_check(nn)
    assert all(nn._segment_dead(s) == 0 for s in nn.segments_)
    ind = nn.kneighbors(X[:20], n_neighbors=10, return_distance=False)
    assert not nn.removed_[ind].any()
