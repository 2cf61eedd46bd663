"""Out-of-core fit and the row store (issue 11, items 1 and 2).

fit / partial_fit on a memmap must give the index they give on the same
array in memory, read the input chunk by chunk without copying it, keep
the raw vectors of a memmap by reference, append without copying old
chunks, and stay within the index + a bound of anonymous memory.
"""

import copy
import os
import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.datasets import make_blobs

import pqsk._store as store_mod
from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, _partition, _quantizer
from pqsk._store import FitRows, RowStore, is_file_backed

METRICS = ["euclidean", "sqeuclidean", "cosine", "dot"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=2400, d=16, seed=0):
    X, _ = make_blobs(n, n_features=d, centers=20, cluster_std=2.0, random_state=seed)
    return X.astype(np.float32)


FACTORIES = {
    "pq": lambda **kw: PQNeighbors(6, n_subspaces=4, n_codewords=32, random_state=0, **kw),
    "ivf": lambda **kw: IVFPQNeighbors(6, n_lists=12, n_probe=4, n_subspaces=4,
                                       n_codewords=32, random_state=0, **kw),
    "hnsw": lambda **kw: HNSWPQNeighbors(6, n_links=6, ef_construction=32, n_subspaces=4,
                                         n_codewords=32, random_state=0, **kw),
}

FITTED = ["codebooks_", "codes_", "ids_", "list_offsets_", "cluster_centers_", "links0_",
          "upper_links_", "levels_"]


def _memmap(tmp_path, X, name="X.npy"):
    path = tmp_path / name
    np.save(path, X)
    return np.load(path, mmap_mode="r")


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 300 rows, so that a 2,400-row fit is read in 8 chunks."""
    monkeypatch.setattr(store_mod, "CHUNK_ROWS", 300)


@pytest.mark.parametrize("refine", [0, 3])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_fit_on_memmap_equals_fit_in_memory(tmp_path, small_chunks, kind, metric, refine):
    X = _data()
    Q = _data(40, seed=1)
    mm = _memmap(tmp_path, X)
    a = FACTORIES[kind](metric=metric, refine_factor=refine).fit(X)
    b = FACTORIES[kind](metric=metric, refine_factor=refine).fit(mm)
    for name in FITTED:
        if hasattr(a, name):
            assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    da, ia = a.kneighbors(Q)
    db, ib = b.kneighbors(Q)
    assert_array_equal(ia, ib)
    assert_array_equal(da, db)
    # X=None (the indexed points as queries) reads the row store too.
    assert_array_equal(a.kneighbors(n_neighbors=3)[1], b.kneighbors(n_neighbors=3)[1])
    # partial_fit from a memmap, too.
    a.partial_fit(Q)
    b.partial_fit(_memmap(tmp_path, Q, "Q.npy"))
    assert_array_equal(a.codes_, b.codes_)
    assert_array_equal(a.kneighbors(Q)[1], b.kneighbors(Q)[1])
    if refine:
        assert_array_equal(np.asarray(a.vectors_), np.asarray(b.vectors_))
        assert_array_equal(np.asarray(b.vectors_), np.vstack([X, Q]))


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_refine_from_memmap_store_matches_exact_distances(tmp_path, kind):
    """The row store of a memmap is the file, read by reference; re-ranked
    distances are the exact ones (cosine: of the normalised rows)."""
    X = _data()
    Q = _data(30, seed=2)
    mm = _memmap(tmp_path, X)
    nn = FACTORIES[kind](metric="cosine", refine_factor=5).fit(mm)
    (chunk,) = nn.vectors_.chunks
    assert is_file_backed(chunk) and np.shares_memory(chunk, mm)
    usage = nn.memory_usage_
    assert usage["vectors"] == 0 and usage["vectors_mapped"] == X.nbytes
    dist, ind = nn.kneighbors(Q)
    Xn = X / np.linalg.norm(X, axis=1, keepdims=True)
    Qn = Q / np.linalg.norm(Q, axis=1, keepdims=True)
    exact = 0.5 * ((Qn[:, None, :] - Xn[ind]) ** 2).sum(-1)
    np.testing.assert_allclose(dist, exact, rtol=1e-4, atol=1e-6)
    # Stored rows are raw, not normalised.
    assert_array_equal(nn.vectors_[ind[0]], X[ind[0]])


def test_fit_does_not_write_to_or_copy_a_readonly_memmap(tmp_path, small_chunks):
    X = _data()
    mm = _memmap(tmp_path, X)
    assert not mm.flags.writeable
    nn = IVFPQNeighbors(5, n_lists=8, n_subspaces=4, n_codewords=16, metric="cosine",
                        refine_factor=2, random_state=0).fit(mm)
    assert np.shares_memory(nn.vectors_.chunks[0], mm)
    assert_array_equal(mm, X)


def test_partial_fit_appends_without_copying_old_chunks(tmp_path):
    X = _data()
    mm = _memmap(tmp_path, X)
    nn = FACTORIES["ivf"](refine_factor=2).fit(mm)
    stores = [nn.vectors_]
    batches = [_data(n, seed=s) for s, n in ((3, 7), (4, 1), (5, 1500), (6, 40))]
    for b in batches:
        nn.partial_fit(b)
        stores.append(nn.vectors_)
    for old, new in zip(stores, stores[1:]):
        # Every chunk of the old store is still there, as the same memory.
        for c_old, c_new in zip(old.chunks, new.chunks):
            assert np.shares_memory(c_old, c_new)
            assert c_new.shape[0] >= c_old.shape[0]
        assert new.chunks[0] is mm  # the file, by reference, throughout
    # Old stores still read their own rows (append never wrote over them).
    for i, s in enumerate(stores):
        assert_array_equal(np.asarray(s), np.vstack([X] + batches[:i]))
    # Small batches shared one growing chunk.
    assert len(stores[-1].chunks) <= 3


def test_partial_fit_memmap_batches_are_kept_by_reference(tmp_path):
    X = _data()
    nn = FACTORIES["pq"](refine_factor=2).fit(X)
    assert not is_file_backed(nn.vectors_.chunks[0])
    assert nn.memory_usage_["vectors"] == X.nbytes
    mm = _memmap(tmp_path, _data(500, seed=7))
    nn.partial_fit(mm)
    assert nn.vectors_.chunks[-1] is mm
    assert nn.memory_usage_["vectors_mapped"] == mm.nbytes
    # Not of the fitted dtype, or not C-contiguous: copied.
    mm64 = _memmap(tmp_path, _data(50, seed=8).astype(np.float64), "X64.npy")
    nn.partial_fit(mm64)
    assert not is_file_backed(nn.vectors_.chunks[-1])
    assert nn.vectors_.dtype == np.float32


def test_stores_sharing_a_buffer_never_overwrite_each_other():
    base = RowStore.empty(3, np.float32).appended(np.zeros((2, 3), np.float32))
    a = base.appended(np.ones((1, 3), np.float32))
    b = base.appended(np.full((2, 3), 2, np.float32))   # base's end was claimed by a
    c = a.appended(np.full((1, 3), 3, np.float32))
    assert_array_equal(np.asarray(a)[2:], [[1, 1, 1]])
    assert_array_equal(np.asarray(b)[2:], [[2, 2, 2]] * 2)
    assert_array_equal(np.asarray(c)[2:], [[1, 1, 1], [3, 3, 3]])
    assert_array_equal(np.asarray(base), np.zeros((2, 3)))


def test_shallow_copies_of_an_index_append_independently():
    X = _data(600)
    a = FACTORIES["ivf"](refine_factor=2).fit(X[:500])
    b = copy.copy(a)
    a.partial_fit(X[500:550])
    b.partial_fit(X[550:])
    assert_array_equal(np.asarray(a.vectors_), X[:550])
    assert_array_equal(np.asarray(b.vectors_), np.vstack([X[:500], X[550:]]))


def test_row_store_take_and_array_api():
    rng = np.random.RandomState(0)
    rows = rng.rand(50, 4).astype(np.float32)
    s = RowStore.empty(4, np.float32)
    for a, b in ((0, 3), (3, 4), (4, 30), (30, 50)):
        s = s.appended(rows[a:b])
    assert s.shape == (50, 4) and len(s) == 50 and s.dtype == np.float32
    ids = rng.randint(-50, 50, size=(6, 7))
    assert_array_equal(s[ids], rows[ids])
    assert_array_equal(s.take(np.array([], dtype=np.int64)), rows[:0])
    assert_array_equal(s[5], rows[5])
    assert_array_equal(s[10:40:3], rows[10:40:3])
    mask = rng.rand(50) < 0.3
    assert_array_equal(s[mask], rows[mask])
    with pytest.raises(IndexError):
        s[np.array([50])]
    with pytest.raises(IndexError):
        s[np.array([0.5])]
    back = pickle.loads(pickle.dumps(s))
    assert back == s and back is not s
    assert_array_equal(np.asarray(back), rows)
    assert s != s.appended(rows[:1])


def test_unit_rows_is_sklearn_normalize_bit_for_bit():
    from sklearn.preprocessing import normalize
    from pqsk._store import unit_rows
    rng = np.random.RandomState(0)
    for dtype in (np.float32, np.float64):
        A = (rng.randn(500, 24) * rng.lognormal(0, 3, size=(500, 1))).astype(dtype)
        A[:3] = 0
        A[3] = 1e-30
        assert_array_equal(unit_rows(A), normalize(A))
        B = A.copy()
        unit_rows(B, out=B)
        assert_array_equal(B, normalize(A))


def test_fit_rows_prepare_chunks_like_the_whole():
    X = (np.random.RandomState(0).rand(1000, 8) * 100).astype(np.int32)
    rows = FitRows(X, np.float32, unit_norm=True)
    whole = np.asarray(rows)
    from sklearn.preprocessing import normalize
    assert_array_equal(whole, normalize(X.astype(np.float32)))
    parts = np.vstack([c.copy() for _, c in rows.chunks(rows=77)])
    assert_array_equal(parts, whole)
    idx = np.array([3, 500, 999])
    assert_array_equal(rows[idx], whole[idx])


# -- validation, chunk by chunk ----------------------------------------------------

@pytest.mark.parametrize("kind", sorted(FACTORIES))
@pytest.mark.parametrize("bad, match", [(np.nan, "contains NaN"),
                                        (np.inf, "infinity"),
                                        (1e30, "overflow")])
def test_bad_value_in_a_late_chunk_is_found(tmp_path, small_chunks, kind, bad, match):
    X = _data()
    X[2345, 3] = bad        # in the last chunk, far past the validated head
    mm = _memmap(tmp_path, X)
    with pytest.raises(ValueError, match=match):
        FACTORIES[kind]().fit(mm)
    nn = FACTORIES[kind]().fit(_data())
    with pytest.raises(ValueError, match=match):
        nn.partial_fit(mm)
    assert nn.n_samples_fit_ == 2400


def test_float64_partial_fit_into_float32_index_checks_after_conversion(small_chunks):
    nn = FACTORIES["ivf"]().fit(_data())
    Y = _data(700).astype(np.float64)
    Y[650, 0] = 1e39            # finite in float64, inf in float32
    with pytest.raises(ValueError, match="overflow"):
        nn.partial_fit(Y)
    assert nn.n_samples_fit_ == 2400


def test_memmap_width_and_dtype_contract(tmp_path):
    X = _data()
    nn = FACTORIES["pq"]().fit(_memmap(tmp_path, X.astype(np.float64)))
    assert nn._fit_dtype_ == np.float64
    with pytest.raises(ValueError, match="features"):
        nn.partial_fit(_memmap(tmp_path, X[:, :8], "narrow.npy"))
    nn = FACTORIES["pq"]().fit(_memmap(tmp_path, (X * 10).astype(np.int16), "int.npy"))
    assert nn._fit_dtype_ == np.float32
    with pytest.raises(ValueError, match="0 sample"):
        FACTORIES["pq"]().fit(_memmap(tmp_path, X[:0], "empty.npy"))


# -- the streamed coarse quantizer --------------------------------------------------

def test_streamed_coarse_training_is_the_same_for_any_thread_count_and_source(tmp_path):
    X = _data(6000, d=16)
    mm = _memmap(tmp_path, X)
    rows = np.sort(np.random.RandomState(0).choice(6000, 5000, replace=False))
    runs = [_partition.train_coarse_streamed(src, rows, 24, max_iter=10, random_state=0,
                                             n_threads=t)
            for src, t in ((X, 1), (X, 2), (mm, 2),
                           (FitRows(mm, np.float32, False), 3))]
    for c, n_iter in runs[1:]:
        assert_array_equal(c, runs[0][0])
        assert n_iter == runs[0][1]
    # As good as the in-memory schedule on the same sample.
    with _quantizer.one_openmp_thread():
        ref, _, _ = _quantizer.fit_kmeans(X[rows], 24, max_iter=10, random_state=0)

    def inertia(c):
        return float(((X - c[_partition.assign(X, c)]) ** 2).sum())

    assert inertia(runs[0][0]) <= 1.02 * inertia(ref)


def test_streamed_coarse_training_with_few_distinct_rows_is_exact():
    X = _data(40)
    Y = np.repeat(X, 200, axis=0)[np.random.RandomState(0).permutation(8000)]
    c, n_iter = _partition.train_coarse_streamed(Y, None, 64, max_iter=10, random_state=0)
    assert n_iter == 0
    assert {tuple(r) for r in c} == {tuple(r) for r in X}


def test_ivf_fit_uses_the_streamed_path_past_the_threshold(tmp_path, monkeypatch):
    monkeypatch.setattr(_partition, "STREAMED_THRESHOLD", 10_000)
    X = _data(4000)
    mm = _memmap(tmp_path, X)
    a = IVFPQNeighbors(5, n_lists=16, n_subspaces=4, n_codewords=16, metric="cosine",
                       random_state=0, n_jobs=1).fit(X)
    b = IVFPQNeighbors(5, n_lists=16, n_subspaces=4, n_codewords=16, metric="cosine",
                       random_state=0, n_jobs=2).fit(mm)
    assert_array_equal(a.cluster_centers_, b.cluster_centers_)
    assert_array_equal(a.codes_, b.codes_)


# -- memory ------------------------------------------------------------------------------

MEMORY_CHILD = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    sys.path.insert(0, {repo!r})
    try:
        import pqsk._store as store
        store.CHUNK_ROWS = {chunk_rows}
    except ImportError:     # pqsk before the row store
        pass
    from pqsk import IVFPQNeighbors

    def anon():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

    X = np.load({path!r}, mmap_mode="r")
    nn = IVFPQNeighbors(10, n_lists=64, n_subspaces=8, n_codewords=64, metric="cosine",
                        refine_factor=5, random_state=0, n_jobs=1)
    nn.fit(X[:5000])           # warm up: imports, thread pools, first allocations
    base, peak, done = anon(), [0], [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    nn.fit(X)
    nn.kneighbors(np.ascontiguousarray(X[:500]))
    done[0] = True
    t.join()
    usage = nn.memory_usage_
    fit_grown = peak[0] - base

    # save streams the vectors; load maps them and checks them by chunks.
    import pqsk
    base, peak[0], done[0] = anon(), 0, False
    t = threading.Thread(target=sample)
    t.start()
    nn.save({index!r})
    back = pqsk.load({index!r}, mmap_mode="r")
    done[0] = True
    t.join()
    print(fit_grown, usage["total"], usage.get("vectors_mapped", 0), peak[0] - base)
""")


def test_fit_on_a_memmap_stays_within_the_index_plus_a_bound(tmp_path):
    """200,000 x 64 float32 (49 MiB) on disk, cosine, refine_factor=5:
    fit adds at most the index + 40 MiB of anonymous memory, less than one
    copy of the data (before: a normalised copy and a copy of the raw
    vectors, +128 MiB for an index of 51 MiB).  Chunks of 8,192 rows
    (2 MiB); measured about index + 18 MiB (training sample, a chunk's
    temporaries, allocator slack)."""
    rng = np.random.RandomState(0)
    path = str(tmp_path / "big.npy")
    X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(200_000, 64))
    centers = rng.randn(50, 64).astype(np.float32) * 3
    for s in range(0, 200_000, 20_000):
        X[s:s + 20_000] = (centers[rng.randint(50, size=20_000)]
                           + rng.randn(20_000, 64).astype(np.float32))
    X.flush()
    del X
    code = MEMORY_CHILD.format(repo=os.environ.get("PQSK_MEMORY_REPO", REPO), path=path,
                               chunk_rows=8192, index=str(tmp_path / "index"))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown, index, mapped, saved = map(int, proc.stdout.split())
    print(f"fit added {grown / 2**20:.1f} MiB, index {index / 2**20:.1f} MiB, "
          f"save + load(mmap) {saved / 2**20:.1f} MiB")
    assert mapped == 200_000 * 64 * 4
    assert grown <= index + 40 * 2**20, (grown / 2**20, index / 2**20)
    # Saving and mapping back never hold the vectors (49 MiB) in memory.
    assert saved <= index + 24 * 2**20, (saved / 2**20, index / 2**20)


# -- persistence of the row store ------------------------------------------------------

@pytest.mark.parametrize("mmap_mode", [None, "r"])
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_save_load_round_trip_of_a_chunked_store(tmp_path, kind, mmap_mode):
    """A store of several chunks (a memmap by reference, then appended
    batches), saved for the first time, is one row block (format 6: a file
    of ``segments/``), byte for byte what np.save writes for the whole
    array, and loaded (mapped with mmap_mode) as one chunk."""
    X = _data()
    Q = _data(40, seed=1)
    nn = FACTORIES[kind](metric="cosine", refine_factor=4).fit(_memmap(tmp_path, X))
    nn.partial_fit(Q[:25])
    nn.partial_fit(Q[25:])
    assert len(nn.vectors_.chunks) == 2
    nn.save(tmp_path / "index")
    back = type(nn).load(tmp_path / "index", mmap_mode=mmap_mode)
    (chunk,) = back.vectors_.chunks
    assert is_file_backed(chunk) == (mmap_mode is not None)
    assert back.vectors_ == nn.vectors_
    usage = back.memory_usage_
    assert (usage["vectors_mapped"] > 0) == (mmap_mode is not None)
    assert usage["vectors"] + usage["vectors_mapped"] == np.vstack([X, Q]).nbytes
    for a, b in zip(nn.kneighbors(Q), back.kneighbors(Q)):
        assert_array_equal(a, b)
    # The file is what np.save writes for the concatenated rows.
    import json
    path = tmp_path / "index"
    data = json.loads((path / "MANIFEST.json").read_text())["data"]
    header = json.loads((path / data / "header.json").read_text())
    (block,) = header["attributes"]["vectors_"]["rows"]["blocks"]
    fname = header["arrays"][block["array"]]["segment_file"]
    np.save(tmp_path / "ref.npy", np.vstack([X, Q]))
    assert (path / "segments" / fname).read_bytes() == (tmp_path / "ref.npy").read_bytes()
    # A loaded (mapped) store takes appends too, the file chunk kept.
    back.partial_fit(X[:3])
    assert back.vectors_.chunks[0] is chunk
    assert_array_equal(np.asarray(back.vectors_)[-3:], X[:3])


def test_saved_vectors_are_checked_chunk_by_chunk(tmp_path, monkeypatch):
    """A NaN or an out-of-range value in a late chunk of the saved vectors
    makes load fail (checksums recomputed, so only the value check sees it)."""
    import json
    monkeypatch.setattr(store_mod, "CHUNK_ROWS", 300)
    X = _data()
    nn = FACTORIES["ivf"](refine_factor=2).fit(X)
    path = tmp_path / "index"
    for bad in (np.nan, 1e30):
        nn.save(path, overwrite=True)
        data = json.loads((path / "MANIFEST.json").read_text())["data"]
        header_path = path / data / "header.json"
        header = json.loads(header_path.read_text())
        (block,) = header["attributes"]["vectors_"]["rows"]["blocks"]
        meta = header["arrays"][block["array"]]
        V = np.load(path / "segments" / meta["segment_file"])
        V[2200, 5] = bad
        os.remove(path / "segments" / meta["segment_file"])  # (not the saved bytes)
        np.save(path / "segments" / meta["segment_file"], V)
        from pqsk._persist import _sha256
        meta["sha256"] = _sha256(V)
        raw = json.dumps(header, indent=1).encode()
        header_path.write_bytes(raw)
        import hashlib
        manifest = json.loads((path / "MANIFEST.json").read_text())
        manifest["header_sha256"] = hashlib.sha256(raw).hexdigest()
        (path / "MANIFEST.json").write_text(json.dumps(manifest))
        with pytest.raises(ValueError, match="vectors_"):
            IVFPQNeighbors.load(path, mmap_mode="r")
