"""IVFPQNeighbors on sealed segments (issue 11, item 4).

The index is a tuple of sealed, immutable segments (each its own sorted
lists) plus a growing part.  What must hold:

* answers do not depend on how the entries are split into segments (the
  kernel scans a probed list's block in every segment into one heap);
* appends seal the growing part and merge small segments without
  rewriting the others; ``remove`` compacts one segment at a time;
* ``save`` writes only the segments the previous save of the path lacks;
* ``compact`` lets queries run while it rewrites a segment.
"""

import os
import threading

import numpy as np
import pytest
from numpy.testing import assert_array_equal

import pqsk
from pqsk import IVFPQNeighbors, _lists, _naive
from pqsk._segments import Segment

pytestmark = pytest.mark.filterwarnings("ignore:.*training samples for n_lists")


def _blobs(n, d=16, seed=0, dtype=np.float32):
    r = np.random.RandomState(seed)
    centers = r.randn(30, d) * 4
    return (centers[r.randint(0, 30, n)] + r.randn(n, d)).astype(dtype)


def _ivf(**kw):
    params = dict(n_lists=16, n_probe=4, n_subspaces=4, n_codewords=16, random_state=0,
                  n_jobs=1, refine_factor=0)
    params.update(kw)
    return IVFPQNeighbors(5, **params)


def _sizes(nn):
    return [s["ids"].shape[0] for s in nn.segments_]


X = _blobs(5000)
Q = _blobs(40, seed=3)


@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
def test_answers_do_not_depend_on_the_segments(metric):
    """The same quantizers and entries in 1 or 5 segments: equal answers,
    ids and distances, for every n_probe."""
    one = _ivf(metric=metric).fit(X)
    five = _ivf(metric=metric, segment_size=1024).fit(X)
    assert _sizes(one) == [5000] and _sizes(five) == [1024] * 4 + [904]
    assert_array_equal(one.codebooks_, five.codebooks_)
    # Consecutive id ranges, each segment sorted by list.
    assert [(s.meta["lo"], s.meta["hi"]) for s in five.segments_] == [
        (i * 1024, min(5000, (i + 1) * 1024)) for i in range(5)]
    for n_probe, k in [(1, 5), (3, 50), (16, 10), (1, 700)]:
        a = one.set_params(n_probe=n_probe).kneighbors(Q, n_neighbors=k)
        b = five.set_params(n_probe=n_probe).kneighbors(Q, n_neighbors=k)
        assert_array_equal(a[1], b[1])
        assert_array_equal(a[0], b[0])


def test_appends_seal_and_merge_without_rewriting_old_segments(monkeypatch):
    monkeypatch.setattr(_lists, "GROWING_MIN", 100)
    nn = _ivf(segment_size=2048).fit(X[:2000])
    first = nn.segments_[0]
    seen = []
    for start in range(2000, 5000, 60):
        nn.partial_fit(X[start:start + 60])
        seen.append(len(nn.segments_))
        assert nn.segments_[0] is first  # never rewritten
        # Ranges stay consecutive and ascending.
        his = [s.meta["hi"] for s in nn.segments_]
        assert his == sorted(his)
    assert max(seen) > 3 and nn.n_samples_fit_ == 5000
    # Merges happened: fewer segments than seals, and none over segment_size.
    assert max(_sizes(nn)) <= 2048
    # Answers: the naive oracle over every stored entry.
    lists = np.concatenate([np.repeat(np.arange(16), np.diff(s["list_offsets"]))
                            for s in nn.segments_] + [nn.growing_lists_])
    codes = np.concatenate([_lists.segment_codes(s, 4) for s in nn.segments_]
                           + [nn.growing_codes_])
    ids = np.concatenate([s["ids"] for s in nn.segments_] + [nn.growing_ids_])
    assert np.array_equal(np.sort(ids), np.arange(5000))
    Qd = Q.astype(np.float64)
    dist, ind = nn.set_params(n_probe=3).kneighbors(Q, n_neighbors=8)
    _, i_ref = _naive.ivf_search_entries(Qd, nn.cluster_centers_.astype(np.float64),
                                         nn.codebooks_.astype(np.float64), lists, codes,
                                         ids.astype(np.int64), 3, 8, False, None)
    # float32 kernel vs float64 oracle: the same ids but for near ties.
    assert (ind == i_ref).mean() > 0.97


def test_remove_compacts_one_segment_past_the_share():
    nn = _ivf(segment_size=1024).fit(X)
    before = nn.segments_
    nn.remove(np.arange(1024, 1024 + 400))  # 39% of segment 1: kept as tombstones
    assert nn.segments_ is before and nn._n_dead() == 400
    nn.remove(np.arange(1424, 1424 + 200))  # 59%: segment 1 is rewritten
    assert nn.segments_[0] is before[0] and all(
        a is b for a, b in zip(nn.segments_[2:], before[2:]))
    assert nn.segments_[1] is not before[1] and _sizes(nn)[1] == 1024 - 600
    assert nn._n_dead() == 0
    ind = nn.set_params(n_probe=16).kneighbors(Q, n_neighbors=50)[1]
    assert not np.isin(ind, np.arange(1024, 1624)).any()
    nn.remove(np.arange(0, 1024))  # a whole segment: dropped
    assert len(nn.segments_) == 4 and nn.segments_[0].meta["lo"] == 1024
    nn.remove([3000])
    nn.compact()  # rewrites segment 2 only
    assert nn._n_dead() == 0 and _sizes(nn) == [424, 1023, 1024, 904]


def test_save_writes_only_new_segments(tmp_path, monkeypatch):
    monkeypatch.setattr(_lists, "GROWING_MIN", 100)
    nn = _ivf(segment_size=1024).fit(X[:3000])
    path = tmp_path / "index"
    nn.save(path)
    seg_dir = path / "segments"
    stat = {f: os.stat(seg_dir / f) for f in os.listdir(seg_dir)}
    # 4-bit codes: packed, ids, list_offsets, list_blocks of 3 segments
    assert len(stat) == 3 * 4
    nn.partial_fit(X[3000:3200])  # seals one more segment
    assert len(nn.segments_) == 4
    nn.save(path, overwrite=True)
    after = {f: os.stat(seg_dir / f) for f in os.listdir(seg_dir)}
    assert len(after) == 16 and set(stat) < set(after)
    for f, st in stat.items():  # the old files were not written again
        assert (after[f].st_ino, after[f].st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    # Loaded memory-mapped, appended to, and saved over itself.
    loaded = pqsk.load(path, mmap_mode="r")
    assert isinstance(loaded.segments_[0]["packed"], np.memmap)
    assert_array_equal(loaded.kneighbors(Q)[1], nn.kneighbors(Q)[1])
    loaded.remove(np.arange(0, 700))  # compacts segment 0: a new file set
    loaded.partial_fit(X[3200:3300])
    loaded.save(path, overwrite=True)
    final = set(os.listdir(seg_dir))
    # (Format 6: the tombstones' one bitmap page is a file of segments/ too.)
    pages = {f for f in final if f.endswith(".bits.npy")}
    assert len(pages) == 1
    assert final - pages == {f"{s.uid}.{a}.npy" for s in loaded.segments_ for a in s.names}
    again = pqsk.load(path)
    assert_array_equal(again.kneighbors(Q)[1], loaded.kneighbors(Q)[1])


def test_damaged_segment_file_is_refused(tmp_path):
    nn = _ivf(segment_size=1024).fit(X[:2500])
    path = tmp_path / "index"
    nn.save(path)
    seg = nn.segments_[1]
    fname = path / "segments" / f"{seg.uid}.packed.npy"
    raw = bytearray(fname.read_bytes())
    raw[-3] ^= 1
    fname.write_bytes(bytes(raw))
    with pytest.raises(pqsk.IndexFormatError, match="checksum"):
        pqsk.load(path)
    fname.unlink()
    with pytest.raises(pqsk.IndexFormatError, match="missing"):
        pqsk.load(path)


def test_segments_are_immutable():
    nn = _ivf().fit(X[:2000])
    with pytest.raises(ValueError):
        nn.segments_[0]["packed"][0, 0, 0] = 1
    assert isinstance(nn.segments_, tuple) and isinstance(nn.segments_[0], Segment)


def test_compact_lets_queries_run():
    """Queries keep being answered while ``compact`` rewrites segments;
    every answer is valid (no removed id) before, during and after."""
    nn = _ivf(segment_size=1024).fit(X)
    removed = np.arange(0, 5000, 3)
    nn.remove(removed)  # 1/3 of each segment: below the automatic share
    assert nn._n_dead() == removed.size
    stop = threading.Event()
    answers, errors = [], []

    def reader():
        while not stop.is_set():
            try:
                answers.append(nn.kneighbors(Q[:5], n_neighbors=10)[1])
            except Exception as e:  # noqa: BLE001 -- reported below
                errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        for _ in range(3):
            nn.compact()
    finally:
        stop.set()
        t.join()
    assert not errors and answers
    assert nn._n_dead() == 0
    for ind in answers:
        assert not np.isin(ind, removed).any()


# -- data drift: refit_codebooks ----------------------------------------------

def test_refit_codebooks_follows_drift():
    """Fitted on small-scale data, then fed data 6x wider (drift): the old
    codebooks quantize it coarsely; refitting on a sample of the new data
    re-encodes every segment and the growing part, and the reconstruction
    error of the new rows falls several-fold (7x here)."""
    r = np.random.RandomState(1)
    old = _blobs(3000)
    new = (_blobs(3000, seed=9) * 6 + r.randn(16) * 10).astype(np.float32)
    nn = _ivf(segment_size=1024, n_probe=16).fit(old)
    nn.partial_fit(new[:2500])
    nn.partial_fit(new[2500:2700])  # some rows stay in the growing part
    assert nn.growing_codes_.shape[0] == 200
    nn.remove(np.arange(0, 2000))
    Xall = np.vstack([old, new[:2700]])

    def new_rows_error():
        X_hat = nn._reconstruct()
        return ((X_hat[3000:] - Xall[3000:]) ** 2).sum(1).mean()

    error_before = new_rows_error()
    segs_before = nn.segments_
    nn.refit_codebooks(new[:2000], X=Xall)
    assert new_rows_error() < error_before / 4
    assert len(nn.segments_) == len(segs_before)
    for a, b in zip(nn.segments_, segs_before):
        assert a.uid != b.uid and a.meta == b.meta
        assert_array_equal(a["ids"], b["ids"])
        assert_array_equal(a["list_offsets"], b["list_offsets"])
    # Every stored code is the encoding of its residual with the new codebooks.
    for seg in nn.segments_:
        lists = np.repeat(np.arange(16), np.diff(seg["list_offsets"]))
        res = Xall[seg["ids"]] - nn.cluster_centers_[lists]
        assert (_lists.segment_codes(seg, 4) == _naive.encode(res.astype(np.float64),
                                              nn.codebooks_.astype(np.float64))).mean() > 0.99
    got = nn.kneighbors(new[2700:2800], n_neighbors=10)[1]
    assert not np.isin(got, np.arange(2000)).any()


def test_refit_codebooks_from_kept_vectors_equals_refit_from_X():
    a = _ivf(segment_size=1024, refine_factor=2).fit(X[:3000])
    b = _ivf(segment_size=1024).fit(X[:3000])
    a.refit_codebooks(X[3000:4000])
    b.refit_codebooks(X[3000:4000], X=X[:3000])
    assert_array_equal(a.codebooks_, b.codebooks_)
    for sa, sb in zip(a.segments_, b.segments_):
        assert_array_equal(sa["packed"], sb["packed"])
        assert_array_equal(sa["list_blocks"], sb["list_blocks"])


def test_refit_codebooks_bad_input_leaves_the_index_unchanged():
    nn = _ivf().fit(X[:2000])
    state = (nn.codebooks_, nn.segments_)
    with pytest.raises(ValueError, match="raw vectors"):
        nn.refit_codebooks(X[:500])
    with pytest.raises(ValueError, match="2000 indexed rows"):
        nn.refit_codebooks(X[:500], X=X[:1999])
    with pytest.raises(ValueError, match="features"):
        nn.refit_codebooks(X[:500, :8], X=X[:2000])
    bad = X[:2000].copy()
    bad[5, 3] = np.nan
    with pytest.raises(ValueError, match="NaN|infinity"):
        nn.refit_codebooks(X[:500], X=bad)
    assert nn.codebooks_ is state[0] and nn.segments_ is state[1]
