"""kneighbors(X=None) without raw vectors decodes the indexed points a
chunk of ids at a time (issue 21, item 3): same answers as decoding them
all at once, and extra memory bounded by the chunk, not by n x d."""
import tracemalloc

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import pqsk
from pqsk import _store

rng = np.random.RandomState(0)
X = rng.standard_normal((20000, 32)).astype(np.float32)
CHUNK = 512

ESTIMATORS = {
    "pq": lambda: pqsk.PQNeighbors(n_subspaces=8, n_codewords=16, refine_factor=0,
                                   random_state=0),
    "ivf": lambda: pqsk.IVFPQNeighbors(n_subspaces=8, n_codewords=16, n_lists=16,
                                       refine_factor=0, random_state=0),
    "hnsw": lambda: pqsk.HNSWPQNeighbors(n_subspaces=8, n_codewords=16, refine_factor=0,
                                         random_state=0),
}


@pytest.fixture(scope="module", params=sorted(ESTIMATORS))
def fitted(request):
    est = ESTIMATORS[request.param]().fit(X[:15000])
    if request.param != "pq":  # sealed segments and a growing part
        est.partial_fit(X[15000:])
    return est


def test_chunks_cover_the_reconstruction(fitted, monkeypatch):
    whole = fitted._reconstruct()
    monkeypatch.setattr(_store, "CHUNK_ROWS", CHUNK)
    parts = list(fitted._self_queries())
    assert len(parts) == -(-fitted.n_samples_fit_ // CHUNK)
    assert [sl.start for sl, _ in parts] == list(range(0, fitted.n_samples_fit_, CHUNK))
    assert_array_equal(np.concatenate([q for _, q in parts]), whole)


def test_kneighbors_none_same_answers_in_chunks(fitted, monkeypatch):
    d0, i0 = fitted.kneighbors(n_neighbors=5)
    monkeypatch.setattr(_store, "CHUNK_ROWS", CHUNK)
    d1, i1 = fitted.kneighbors(n_neighbors=5)
    assert_array_equal(i1, i0)
    # the same queries; the search's BLAS tables of a batch of 32 rows may
    # round differently from those of a larger one (last ulp)
    assert_allclose(d1, d0, rtol=1e-6)


def test_self_queries_memory_bounded_by_chunk(fitted, monkeypatch):
    monkeypatch.setattr(_store, "CHUNK_ROWS", CHUNK)
    chunk_bytes = CHUNK * X.shape[1] * 4
    tracemalloc.start()
    try:
        for _ in fitted._self_queries():
            pass
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # a chunk's rows and temporaries, plus (IVF 4-bit) a sealed segment's
    # packed codes unpacked once: n x m bytes, not n x d x 4
    unpacked = X.shape[0] * 8
    assert peak < 6 * chunk_bytes + 3 * unpacked < X.nbytes / 2, (peak, chunk_bytes)
