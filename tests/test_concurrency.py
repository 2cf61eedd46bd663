"""Many Python threads on one fitted index: same answers as serial calls,
and writers (partial_fit, remove) never expose a half-modified index."""

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

rng = np.random.RandomState(0)
X = rng.randn(3000, 16).astype(np.float32)
Q = rng.randn(64, 16).astype(np.float32)

FACTORIES = {
    "pq": lambda: PQNeighbors(10, n_subspaces=4, n_codewords=32, random_state=0),
    "ivf": lambda: IVFPQNeighbors(10, n_lists=16, n_probe=4, n_subspaces=4,
                                  n_codewords=32, random_state=0),
    "hnsw": lambda: HNSWPQNeighbors(10, n_links=8, ef_construction=48, n_subspaces=4,
                                    n_codewords=32, random_state=0),
}


@pytest.mark.parametrize("key", sorted(FACTORIES))
def test_eight_threads_match_serial_calls(key):
    nn = FACTORIES[key]().fit(X)
    nn.set_params(n_jobs=1)
    chunks = np.array_split(np.arange(len(Q)), 16)
    serial = [nn.kneighbors(Q[c]) for c in chunks]
    with ThreadPoolExecutor(max_workers=8) as ex:
        for _ in range(3):
            parallel = list(ex.map(lambda c: nn.kneighbors(Q[c]), chunks))
            for (d1, i1), (d2, i2) in zip(serial, parallel):
                assert_array_equal(d1, d2)
                assert_array_equal(i1, i2)


@pytest.mark.parametrize("key", ["ivf", "hnsw", "pq"])
def test_writers_never_expose_a_half_modified_index(key):
    nn = FACTORIES[key]().fit(X[:1000])
    stop = threading.Event()
    errors = []

    def query():
        while not stop.is_set():
            try:
                dist, ind = nn.kneighbors(Q[:8], n_neighbors=20)
                n = nn.n_samples_fit_
                assert np.all((ind >= 0) & (ind < n)) and np.all(np.isfinite(dist))
                assert np.all(np.diff(dist, axis=1) >= 0)
                for row in ind:
                    assert len(set(row)) == 20
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)
                return

    threads = [threading.Thread(target=query) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for start in range(1000, 3000, 250):
            nn.partial_fit(X[start:start + 250])
            if key != "pq":
                nn.remove(np.arange(start - 1000, start - 1000 + 50))
        if key == "hnsw":
            nn.compact()
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert nn.n_samples_fit_ == 3000


@pytest.mark.parametrize("key", ["ivf", "hnsw"])
def test_concurrent_removes_all_take_effect(key):
    nn = FACTORIES[key]().fit(X)
    batches = np.array_split(np.arange(2000), 40)
    with ThreadPoolExecutor(max_workers=8) as ex:
        list(ex.map(nn.remove, batches))
    assert nn.n_removed_ == 2000 and nn.removed_[:2000].all()
    ind = nn.kneighbors(Q, n_neighbors=50, return_distance=False)
    assert not (ind < 2000).any()
