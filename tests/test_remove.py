"""remove(ids) for IVFPQNeighbors and HNSWPQNeighbors, and HNSW compaction."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

rng = np.random.RandomState(0)
X = rng.randn(1200, 8).astype(np.float32)
Q = rng.randn(30, 8).astype(np.float32)

FACTORIES = {
    "ivf": lambda **kw: IVFPQNeighbors(10, n_lists=8, n_probe=8, n_subspaces=4,
                                       n_codewords=32, random_state=0, **kw),
    "hnsw": lambda **kw: HNSWPQNeighbors(10, n_links=8, ef_construction=64, ef_search=128,
                                         n_subspaces=4, n_codewords=32, random_state=0,
                                         **kw),
}


@pytest.mark.parametrize("key", sorted(FACTORIES))
def test_removed_ids_never_come_back(key):
    nn = FACTORIES[key]().fit(X)
    gone = rng.choice(1200, size=300, replace=False)
    nn.remove(gone)
    assert nn.n_removed_ == 300 and nn.removed_[gone].all()
    ind = nn.kneighbors(Q, n_neighbors=100, return_distance=False)
    assert not np.isin(ind, gone).any()
    assert np.all(ind >= 0) and np.all(ind < 1200)
    for row in ind:
        assert len(set(row)) == 100
    # Queries equal to removed points find other points.
    ind = nn.kneighbors(X[gone[:20]], n_neighbors=1, return_distance=False)
    assert not np.isin(ind, gone).any()


@pytest.mark.parametrize("key", sorted(FACTORIES))
def test_add_after_remove_continues_ids(key):
    nn = FACTORIES[key]().fit(X[:1000])
    nn.remove(np.arange(0, 1000, 2))
    nn.partial_fit(X[1000:])
    assert nn.n_samples_fit_ == 1200 and nn.n_removed_ == 500
    ind = nn.kneighbors(X[1000:1050], n_neighbors=1, return_distance=False)
    assert np.mean(ind[:, 0] == np.arange(1000, 1050)) > 0.9
    ind = nn.kneighbors(Q, n_neighbors=50, return_distance=False)
    assert not np.isin(ind, np.arange(0, 1000, 2)).any()
    with pytest.raises(ValueError, match="n_neighbors = 701"):
        nn.kneighbors(Q, n_neighbors=701)
    assert nn.kneighbors(Q[:2], n_neighbors=700)[1].shape == (2, 700)


@pytest.mark.parametrize("key", sorted(FACTORIES))
def test_bad_remove_changes_nothing(key):
    nn = FACTORIES[key]().fit(X)
    nn.remove([3, 5])
    before = nn.kneighbors(Q)
    for bad, err, match in [([1200], ValueError, r"\[0, 1200\)"),
                            ([-1], ValueError, r"\[0, 1200\)"),
                            ([7, 7], ValueError, "duplicates"),
                            ([8, 5], ValueError, "already removed"),
                            ([1.5], TypeError, "integers")]:
        with pytest.raises(err, match=match):
            nn.remove(bad)
    assert nn.n_removed_ == 2
    for a, b in zip(before, nn.kneighbors(Q)):
        assert_array_equal(a, b)
    nn.remove([])
    assert nn.n_removed_ == 2
    with pytest.raises(ValueError, match="were removed; pass the query points"):
        nn.kneighbors()


def test_hnsw_heavy_removal_matches_exhaustive_search_over_live_points():
    nn = FACTORIES["hnsw"]().fit(X)
    keep = np.sort(rng.choice(1200, size=120, replace=False))
    nn.remove(np.setdiff1d(np.arange(1200), keep))
    ref = PQNeighbors(10, n_subspaces=4, n_codewords=32,
                      codebooks=nn.codebooks_).fit(X[keep])
    ind = nn.kneighbors(Q, return_distance=False)
    ref_ind = keep[ref.kneighbors(Q, return_distance=False)]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ind, ref_ind)])
    assert recall > 0.95
    # All 120 live points can be asked for.
    ind = nn.kneighbors(Q[:3], n_neighbors=120, return_distance=False)
    for row in ind:
        assert sorted(row) == list(keep)


def test_hnsw_compact_keeps_ids_and_results():
    nn = FACTORIES["hnsw"](refine_factor=3).fit(X)
    gone = np.arange(0, 1200, 3)
    nn.remove(gone)
    before = nn.kneighbors(Q)
    nn.compact()
    assert nn.codes_.shape[0] == 800 and nn.ids_.shape == (800,)
    assert nn.n_samples_fit_ == 1200
    after = nn.kneighbors(Q)
    assert not np.isin(after[1], gone).any()
    # refine_factor makes distances exact: the top results agree.
    assert np.mean(before[1] == after[1]) > 0.9
    # Re-add copies of removed points: they come back under new ids.
    nn.partial_fit(X[gone[:5]])
    assert nn.n_samples_fit_ == 1205
    ind = nn.kneighbors(X[gone[:5]], n_neighbors=1, return_distance=False)
    assert_array_equal(ind[:, 0], np.arange(1200, 1205))
    assert nn.memory_usage_["ids"] == 805 * 8


@pytest.mark.parametrize("key", sorted(FACTORIES))
def test_save_load_after_removal(key, tmp_path):
    import pqsk

    nn = FACTORIES[key]().fit(X)
    nn.remove(np.arange(100))
    if key == "hnsw":
        nn.compact()
    nn.save(tmp_path / "i")
    loaded = pqsk.load(tmp_path / "i", mmap_mode="r")
    for a, b in zip(nn.kneighbors(Q), loaded.kneighbors(Q)):
        assert_array_equal(a, b)
