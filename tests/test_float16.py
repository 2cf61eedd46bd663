"""float16 input (issue 22, item 3).

Every estimator takes float16 rows in ``fit``, ``partial_fit``,
``kneighbors``, ``kneighbors_graph``, ``radius_neighbors`` and ``transform``
and computes in float32 (float16 values are exact there), converting a
chunk at a time, never the whole array: the answers are those of the same
rows cast to float32 beforehand, bit for bit; a float16 row with NaN or
infinity gets the error of the float32 rows; a float16 memmap fit stays
within the out-of-core memory bound of ``tests/test_out_of_core.py``.
"""

import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.datasets import make_blobs

import pqsk._store as store_mod
from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, PQTransformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FACTORIES = {
    "pq": lambda **kw: PQNeighbors(n_neighbors=6, n_subspaces=4, n_codewords=32,
                                   random_state=0, **kw),
    "ivf": lambda **kw: IVFPQNeighbors(n_neighbors=6, n_lists=12, n_probe=4, n_subspaces=4,
                                       n_codewords=32, random_state=0, **kw),
    "hnsw": lambda **kw: HNSWPQNeighbors(n_neighbors=6, n_links=6, ef_construction=32,
                                         n_subspaces=4, n_codewords=32, random_state=0, **kw),
}


def _data(n=2400, d=16, seed=0):
    X, _ = make_blobs(n, n_features=d, centers=20, cluster_std=2.0, random_state=seed)
    return X.astype(np.float16)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 300 rows: a 2,400-row input is read in 8 chunks."""
    monkeypatch.setattr(store_mod, "CHUNK_ROWS", 300)


def _same_sparse(a, b):
    assert_array_equal(a.indptr, b.indptr)
    assert_array_equal(a.indices, b.indices)
    assert_array_equal(a.data, b.data)


@pytest.mark.parametrize("refine", [0, 3])
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_float16_answers_are_those_of_the_float32_rows(small_chunks, kind, metric, refine):
    X16 = _data()
    X32 = X16.astype(np.float32)
    Q16 = _data(700, seed=1)  # 3 chunks of queries
    Q32 = Q16.astype(np.float32)
    a = FACTORIES[kind](metric=metric, refine_factor=refine).fit(X16)
    b = FACTORIES[kind](metric=metric, refine_factor=refine).fit(X32)
    assert a._fit_dtype_ == np.float32
    assert_array_equal(a.codebooks_, b.codebooks_)
    da, ia = a.kneighbors(Q16)
    db, ib = b.kneighbors(Q32)
    assert da.dtype == np.float32
    assert_array_equal(ia, ib)
    assert_array_equal(da, db)
    _same_sparse(a.kneighbors_graph(Q16, mode="distance"),
                 b.kneighbors_graph(Q32, mode="distance"))
    _same_sparse(a.transform(Q16), b.transform(Q32))
    radius = float(np.median(db[:, 2]))
    ra, rb = a.radius_neighbors(Q16, radius), b.radius_neighbors(Q32, radius)
    for x, y in zip(ra[0], rb[0]):
        assert_array_equal(x, y)
    for x, y in zip(ra[1], rb[1]):
        assert_array_equal(x, y)
    # Filtered queries are numbered across the chunks.
    allowed = np.arange(0, 2400, 3)
    assert_array_equal(a.kneighbors(Q16, filter=allowed)[1],
                       b.kneighbors(Q32, filter=allowed)[1])
    a.partial_fit(Q16)
    b.partial_fit(Q32)
    assert_array_equal(a.kneighbors(Q16[:100])[1], b.kneighbors(Q32[:100])[1])
    assert_array_equal(a.kneighbors()[1], b.kneighbors()[1])


def test_float16_into_a_float64_index_is_computed_in_float64(small_chunks):
    X = _data().astype(np.float64)
    nn = FACTORIES["ivf"](refine_factor=2).fit(X)
    Q16 = _data(500, seed=1)
    d16, i16 = nn.kneighbors(Q16)
    d64, i64 = nn.kneighbors(Q16.astype(np.float64))
    assert d16.dtype == np.float64
    assert_array_equal(i16, i64)
    assert_array_equal(d16, d64)


@pytest.mark.parametrize("rotation", [None, "opq"])
def test_pq_transformer_float16(small_chunks, rotation):
    X16 = _data()
    a = PQTransformer(n_subspaces=4, n_codewords=32, rotation=rotation, max_iter=5,
                      random_state=0).fit(X16)
    b = PQTransformer(n_subspaces=4, n_codewords=32, rotation=rotation, max_iter=5,
                      random_state=0).fit(X16.astype(np.float32))
    assert a.codebooks_.dtype == np.float32
    if rotation is None:  # the rotated rows are a product of BLAS: equal, not bitwise
        assert_array_equal(a.codebooks_, b.codebooks_)
        assert_array_equal(a.transform(X16), b.transform(X16.astype(np.float32)))
    else:
        np.testing.assert_allclose(a.codebooks_, b.codebooks_, rtol=1e-4, atol=1e-4)
        assert (a.transform(X16) == b.transform(X16.astype(np.float32))).mean() > 0.99
    assert_array_equal(b.transform(X16), b.transform(X16.astype(np.float32)))


def _message(call, X):
    with pytest.raises(ValueError) as info:
        call(X)
    return str(info.value)


@pytest.mark.parametrize("kind", sorted(FACTORIES) + ["transformer"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_bad_float16_rows_get_the_float32_error(small_chunks, kind, bad):
    """NaN or infinity in a late chunk, past the validated head: the error
    of the same rows in float32, at fit, partial_fit and query time."""
    X = _data()
    X[2345, 3] = bad
    make = ((lambda: PQTransformer(n_subspaces=4, n_codewords=32, random_state=0))
            if kind == "transformer" else FACTORIES[kind])
    msg = _message(make().fit, X)
    assert msg == _message(make().fit, X.astype(np.float32))
    assert "contains NaN" in msg or "infinity or a value too large for dtype('float32')" in msg
    fitted = make().fit(_data())
    query = fitted.transform if kind == "transformer" else fitted.kneighbors
    assert _message(query, X) == _message(query, X.astype(np.float32))
    if kind != "transformer":
        assert _message(fitted.partial_fit, X) == msg
        assert fitted.n_samples_fit_ == 2400
        assert (_message(fitted.radius_neighbors, X)
                == _message(fitted.radius_neighbors, X.astype(np.float32)))


def test_float16_queries_of_the_wrong_width_are_refused_as_float32():
    nn = FACTORIES["pq"]().fit(_data())
    Q = _data(50, d=12)
    assert _message(nn.kneighbors, Q) == _message(nn.kneighbors, Q.astype(np.float32))
    assert (_message(nn.kneighbors, Q[:0])
            == _message(nn.kneighbors, Q[:0].astype(np.float32)))


def _peak_bytes(call):
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", sorted(FACTORIES) + ["transformer"])
def test_float16_queries_are_converted_a_chunk_at_a_time(small_chunks, kind):
    """20,000 float16 queries of 128 features: a float32 copy is 9.8 MiB;
    queries, transform and fit (no raw rows kept) allocate less than half
    of it."""
    d = 128
    X = _data(1200, d=d)
    Q = _data(20_000, d=d, seed=1)
    whole = Q.shape[0] * d * 4
    if kind == "transformer":
        t = PQTransformer(n_subspaces=8, n_codewords=16, random_state=0).fit(X)
        calls = [lambda: t.transform(Q), lambda: PQTransformer(
            n_subspaces=8, n_codewords=16, max_train_samples=1000, random_state=0).fit(Q)]
    else:
        nn = FACTORIES[kind](metric="cosine", refine_factor=2).set_params(
            n_subspaces=8, n_codewords=16).fit(X)
        calls = [lambda: nn.kneighbors(Q, n_neighbors=2),
                 lambda: nn.radius_neighbors(Q[:5000], radius=0.01)]
        if kind != "hnsw":  # HNSW links an append by its float32 rows (documented)
            calls.append(lambda: FACTORIES[kind](max_train_samples=1000, refine_factor=0).set_params(
                n_subspaces=8, n_codewords=16).fit(Q))
    for i, call in enumerate(calls):
        peak = _peak_bytes(call)
        assert peak < whole / 2, (i, peak / 2**20, whole / 2**20)


MEMORY_CHILD = textwrap.dedent("""
    import sys, threading, time
    import numpy as np
    sys.path.insert(0, {repo!r})
    import pqsk._store as store
    store.CHUNK_ROWS = 8192
    from pqsk import IVFPQNeighbors

    def anon():  # as tests/test_out_of_core.py measures it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024

    X = np.load({path!r}, mmap_mode="r")
    nn = IVFPQNeighbors(10, n_lists=64, n_subspaces=8, n_codewords=64, metric="cosine",
                        refine_factor=5, refine_dtype={refine_dtype!r}, random_state=0,
                        n_jobs=1)
    nn.fit(X[:5000])           # warm up: imports, thread pools, first allocations
    base, peak, done = anon(), [0], [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], anon())
            time.sleep(0.0005)

    t = threading.Thread(target=sample)
    t.start()
    nn.fit(X)
    nn.kneighbors(X[:20000])
    done[0] = True
    t.join()
    print(peak[0] - base, nn.memory_usage_["total"])
""")


@pytest.mark.parametrize("refine_dtype", ["float16", "float32"])
def test_float16_memmap_fit_stays_within_the_out_of_core_bound(tmp_path, refine_dtype):
    """200,000 x 64 float16 (24 MiB) on disk, cosine, refine_factor=5: fit
    and 20,000 float16 queries add at most the index + 40 MiB of anonymous
    memory, the bound of ``test_fit_on_a_memmap_stays_within_the_index_plus_a_bound``
    (a float32 copy of the data would be 49 MiB, a float64 one 98 MiB).
    A float32 re-ranking tier holds the rows in memory as float32 (they are
    the index: float16 memmap rows are not the fitted dtype, so not kept by
    reference); ``refine_dtype="float16"`` keeps them as float16."""
    rng = np.random.RandomState(0)
    path = str(tmp_path / "big16.npy")
    X = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(200_000, 64))
    centers = rng.randn(50, 64).astype(np.float32) * 3
    for s in range(0, 200_000, 20_000):
        X[s:s + 20_000] = (centers[rng.randint(50, size=20_000)]
                           + rng.randn(20_000, 64).astype(np.float32))
    X.flush()
    del X
    code = MEMORY_CHILD.format(repo=os.environ.get("PQSK_MEMORY_REPO", REPO), path=path,
                               refine_dtype=refine_dtype)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grown, index = map(int, proc.stdout.split())
    print(f"fit + queries added {grown / 2**20:.1f} MiB, index {index / 2**20:.1f} MiB")
    assert grown <= index + 40 * 2**20, (grown / 2**20, index / 2**20)
