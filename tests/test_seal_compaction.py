"""Seal-time compaction (issue 21, item 3a): a growing part with removed
entries is sealed into a segment without them, so no new segment starts
past ``COMPACT_SHARE`` removed (IVF; HNSW: see the issue)."""
import numpy as np
from numpy.testing import assert_array_equal

from pqsk import IVFPQNeighbors
from pqsk._segments import COMPACT_SHARE

r = np.random.RandomState(0)
X = r.standard_normal((3000, 16)).astype(np.float32)
Q = r.standard_normal((30, 16)).astype(np.float32)


def test_ivf_seal_drops_the_removed_growing_rows():
    nn = IVFPQNeighbors(n_neighbors=5, n_lists=8, n_probe=8, n_subspaces=4, n_codewords=16,
                        refine_factor=0, segment_size=1024, random_state=0,
                        n_jobs=1).fit(X[:1024])
    nn.partial_fit(X[1024:1524])  # 500 rows in the growing part
    dead = np.arange(1024, 1324)  # 60% of the growing rows
    nn.remove(dead)
    n_before = len(nn.segments_)
    for lo in range(1524, 3000, 250):  # append until the growing part is sealed
        nn.partial_fit(X[lo:lo + 250])
    assert len(nn.segments_) > n_before
    for seg in nn.segments_:
        ids = np.asarray(seg["ids"])
        assert np.count_nonzero(nn.removed_[ids]) <= COMPACT_SHARE * ids.size
    assert not np.isin(dead, np.concatenate([s["ids"] for s in nn.segments_]
                                            + [nn.growing_ids_])).any()
    # n_probe = n_lists, no re-ranking: the answers are a brute force over
    # the decoded live rows
    live = np.flatnonzero(~nn.removed_)
    V = nn._reconstruct()[live].astype(np.float64)
    D = ((Q[:, None, :].astype(np.float64) - V[None]) ** 2).sum(-1)
    expect = live[np.argsort(D, axis=1, kind="stable")[:, :5]]
    assert_array_equal(np.sort(nn.kneighbors(Q, return_distance=False), axis=1),
                       np.sort(expect, axis=1))


def test_hnsw_seal_past_the_share_is_compacted():
    """An HNSW growing graph keeps its removed nodes until sealed: the
    segment it becomes, more than half removed, is compacted by the append
    that seals it."""
    from pqsk import HNSWPQNeighbors

    nn = HNSWPQNeighbors(n_neighbors=5, n_subspaces=4, n_codewords=16, refine_factor=0,
                         segment_size=1024, ef_search=1200, random_state=0,
                         n_jobs=1).fit(X[:1024])
    nn.partial_fit(X[1024:1824])  # 800 nodes in the growing graph
    dead = np.arange(1024, 1624)  # 75% of them
    nn.remove(dead)
    n_before = len(nn.segments_)
    nn.partial_fit(X[1824:2400])  # seals the growing graph
    assert len(nn.segments_) > n_before
    for seg in nn.segments_:
        ids = np.asarray(seg["ids"])
        assert np.count_nonzero(nn.removed_[ids]) <= COMPACT_SHARE * ids.size
    live = np.flatnonzero(~nn.removed_)
    V = nn._reconstruct()[live].astype(np.float64)
    D = ((Q[:, None, :].astype(np.float64) - V[None]) ** 2).sum(-1)
    expect = live[np.argsort(D, axis=1, kind="stable")[:, :5]]
    got = nn.kneighbors(Q, return_distance=False)
    assert not np.isin(got, dead).any()
    assert_array_equal(np.sort(got, axis=1), np.sort(expect, axis=1))
