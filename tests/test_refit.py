"""refit_codebooks on HNSWPQNeighbors (issue 11, item 5); the IVF side is
in test_ivf_segments.py.  The graph keeps its links; every stored code is
re-encoded with the new codebooks, in every sealed graph and the growing
one."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pqsk import HNSWPQNeighbors, _naive


def _blobs(n, d=16, seed=0, scale=1.0, shift=0.0):
    r = np.random.RandomState(seed)
    centers = r.randn(30, d) * 4
    return ((centers[r.randint(0, 30, n)] + r.randn(n, d)) * scale + shift).astype(np.float32)


def _hnsw(**kw):
    params = dict(n_links=8, ef_construction=32, ef_search=32, n_subspaces=4,
                  n_codewords=16, random_state=0, n_jobs=1, segment_size=1024,
                  refine_factor=0)
    params.update(kw)
    return HNSWPQNeighbors(5, **params)


@pytest.mark.parametrize("refine", [0, 2])
def test_hnsw_refit_codebooks_follows_drift(refine):
    old = _blobs(1500)
    new = _blobs(1500, seed=9, scale=6, shift=10)
    nn = _hnsw(refine_factor=refine).fit(old)
    nn.partial_fit(new[:1200])
    assert len(nn.segments_) >= 2 and nn.codes_.shape[0] > 0
    nn.remove(np.arange(0, 1000))
    Xall = np.vstack([old, new[:1200]])

    def new_rows_error():
        X_hat = nn._reconstruct()
        return ((X_hat[1500:] - Xall[1500:]) ** 2).sum(1).mean()

    error_before = new_rows_error()
    links = [s["links0"] for s in nn.segments_] + [nn.links0_.copy()]
    nn.refit_codebooks(new[:1000], X=None if refine else Xall)
    assert new_rows_error() < error_before / 4
    # The graphs are the same; the codes are the new codebooks' encodings.
    for a, b in zip([s["links0"] for s in nn.segments_] + [nn.links0_], links):
        assert_array_equal(a, b)
    cb = nn.codebooks_.astype(np.float64)
    for seg in nn.segments_:
        expected = _naive.encode(Xall[seg["ids"]].astype(np.float64), cb)
        assert (seg["codes"] == expected).mean() > 0.99
    ids = np.arange(nn.codes_.shape[0]) if nn.ids_ is None else nn.ids_
    assert (nn.codes_ == _naive.encode(Xall[ids].astype(np.float64), cb)).mean() > 0.99
    got = nn.kneighbors(new[1200:1300], n_neighbors=10)[1]
    assert not np.isin(got, np.arange(1000)).any()
    # The index still takes appends, removals and compaction.
    nn.partial_fit(new[1200:1500]).remove([1200]).compact()
    assert nn.n_samples_fit_ == 3000


def test_hnsw_refit_codebooks_needs_the_raw_vectors():
    nn = _hnsw().fit(_blobs(1200))
    before = nn.codebooks_
    with pytest.raises(ValueError, match="raw vectors"):
        nn.refit_codebooks(_blobs(300, seed=2))
    with pytest.raises(ValueError, match="1200 indexed rows"):
        nn.refit_codebooks(_blobs(300, seed=2), X=_blobs(100))
    assert nn.codebooks_ is before
