"""What a kernel reads comes from the fitted state (issue 10, findings 1, 2,
5, 6, 7 and 9): parameters changed with ``set_params`` after fit are either
validated at every call (search-time parameters) or refused until the next
fit (parameters that shape the index), never handed to a kernel.

Cases that crashed the interpreter run in a child process, so that a
segfault fails the test instead of ending the run.
"""

import pickle
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors
from pqsk._segments import Segment

rng = np.random.RandomState(0)
X = rng.randn(400, 8).astype(np.float32)
Q = rng.randn(10, 8).astype(np.float32)
METRICS = ["euclidean", "sqeuclidean", "cosine", "dot"]

FACTORIES = {
    "pq": lambda **kw: PQNeighbors(5, n_subspaces=4, n_codewords=16, random_state=0,
                                   **{"refine_factor": 0, **kw}),
    "ivf": lambda **kw: IVFPQNeighbors(5, n_lists=8, n_probe=3, n_subspaces=4,
                                       n_codewords=16, random_state=0,
                                       **{"refine_factor": 0, **kw}),
    "hnsw": lambda **kw: HNSWPQNeighbors(5, n_links=6, ef_construction=32, n_subspaces=4,
                                         n_codewords=16, random_state=0,
                                         **{"refine_factor": 0, **kw}),
}


def run_child(code):
    """Run ``code`` in a fresh interpreter; return (returncode, output)."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def same_state(a, b):
    """Whether two estimators hold the same parameters and fitted state
    (arrays by value, random states by their state)."""
    da, db = vars(a), vars(b)
    if da.keys() != db.keys():
        return False
    for key, va in da.items():
        vb = db[key]
        if isinstance(va, np.ndarray) or isinstance(vb, np.ndarray):
            if not (isinstance(va, np.ndarray) and isinstance(vb, np.ndarray)
                    and va.dtype == vb.dtype and np.array_equal(va, vb)):
                return False
        elif isinstance(va, tuple) and all(isinstance(s, Segment) for s in va):
            # Sealed segments: a copy (pickle) keeps each one's uid and arrays.
            if not (isinstance(vb, tuple) and len(va) == len(vb) and all(
                    isinstance(t, Segment) and s.uid == t.uid and s.meta == t.meta
                    and s.names == t.names
                    and all(s[n].dtype == t[n].dtype and np.array_equal(s[n], t[n])
                            for n in s.names)
                    for s, t in zip(va, vb))):
                return False
        elif isinstance(va, np.random.RandomState):
            sa, sb = va.get_state(), vb.get_state()
            if sa[0] != sb[0] or not np.array_equal(sa[1], sb[1]) or sa[2:] != sb[2:]:
                return False
        elif va is not vb and va != vb:
            return False
    return True


CHILD_PRELUDE = """
import numpy as np
from pqsk import HNSWPQNeighbors, IVFPQNeighbors
rng = np.random.RandomState(0)
X = rng.randn(400, 8).astype(np.float32)
"""


def test_finding1_hnsw_shrunk_quantizer_params_after_fit_raise_not_abort():
    rc, out = run_child(CHILD_PRELUDE + """
nn = HNSWPQNeighbors(5, n_links=6, n_subspaces=4, n_codewords=16,
                     random_state=0).fit(X)
nn.set_params(n_codewords=1, n_subspaces=1)
try:
    nn.kneighbors(X[:3])
except ValueError as e:
    print("REFUSED", e)
""")
    assert rc == 0, out
    assert "REFUSED" in out and "n_subspaces=1 was set after fit" in out, out


def test_finding2_huge_negative_n_probe_after_fit_raises_not_segfault():
    rc, out = run_child(CHILD_PRELUDE + """
nn = IVFPQNeighbors(5, n_lists=8, n_subspaces=4, n_codewords=16, random_state=0).fit(X)
nn.set_params(n_probe=-10**9)
try:
    nn.kneighbors(X[:3])
except ValueError as e:
    print("REFUSED", e)
""")
    assert rc == 0, out
    assert "REFUSED" in out and "n_probe" in out, out


@pytest.mark.parametrize("kind, name, value", [
    ("ivf", "n_probe", 0), ("ivf", "n_probe", -5), ("ivf", "n_probe", 2.5),
    ("hnsw", "ef_search", 0), ("hnsw", "ef_search", -3),
    ("pq", "refine_factor", -1), ("ivf", "refine_factor", -2),
    ("hnsw", "refine_factor", -1),
    ("pq", "n_jobs", 2.5), ("ivf", "n_jobs", 0), ("hnsw", "n_jobs", "2"),
    ("pq", "n_neighbors", 0), ("ivf", "n_neighbors", -1), ("hnsw", "n_neighbors", 1.5),
    ("pq", "mode", "distances"),
])
def test_finding2_search_params_set_after_fit_are_validated_at_every_call(kind, name,
                                                                          value):
    nn = FACTORIES[kind]().fit(X)
    expected = nn.kneighbors(Q)
    nn.set_params(**{name: value})
    with pytest.raises((ValueError, TypeError), match=name):
        nn.kneighbors(Q)
    with pytest.raises((ValueError, TypeError), match=name):
        nn.transform(Q)  # uses self.n_neighbors and self.mode
    # Setting it back restores the exact same answers.
    nn.set_params(**{name: FACTORIES[kind]().get_params()[name]})
    for a, b in zip(expected, nn.kneighbors(Q)):
        assert_array_equal(a, b)


def test_finding2_valid_search_params_changed_after_fit_take_effect():
    nn = FACTORIES["ivf"]().fit(X)
    nn.kneighbors(Q)
    nn.set_params(n_probe=8, n_neighbors=7)
    fresh = FACTORIES["ivf"]().set_params(n_probe=8, n_neighbors=7).fit(X)
    for a, b in zip(fresh.kneighbors(Q), nn.kneighbors(Q)):
        assert_array_equal(a, b)
    assert nn.kneighbors(Q)[1].shape == (10, 7)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
@pytest.mark.parametrize("fitted_metric", METRICS)
@pytest.mark.parametrize("new_metric", METRICS)
def test_finding5_metric_changed_after_fit_is_refused(kind, fitted_metric, new_metric,
                                                      tmp_path):
    nn = FACTORIES[kind](metric=fitted_metric).fit(X)
    expected = nn.kneighbors(Q)
    nn.set_params(metric=new_metric)
    if new_metric == fitted_metric:
        for a, b in zip(expected, nn.kneighbors(Q)):
            assert_array_equal(a, b)
        return
    msg = f"metric='{new_metric}' was set after fit.*metric='{fitted_metric}'"
    with pytest.raises(ValueError, match=msg):
        nn.kneighbors(Q)
    with pytest.raises(ValueError, match=msg):
        nn.partial_fit(Q)
    # Saving this state is refused (it used to write an index that loaded
    # and refused every query; issue 21): nothing is written.  Set back, it
    # saves, and the loaded index answers as fitted.
    with pytest.raises(ValueError, match=f"Cannot save: {msg}"):
        nn.save(tmp_path / "index")
    assert not (tmp_path / "index").exists()
    nn.set_params(metric=fitted_metric)
    nn.save(tmp_path / "index")
    loaded = type(nn).load(tmp_path / "index")
    for est in (nn, loaded):
        for a, b in zip(expected, est.kneighbors(Q)):
            assert_array_equal(a, b)
    # A new fit takes the new metric.
    nn.set_params(metric=new_metric).fit(X)
    assert nn.effective_metric_ == new_metric
    nn.kneighbors(Q)


@pytest.mark.parametrize("kind, params", [
    ("pq", {"n_subspaces": 2}), ("pq", {"n_codewords": 8}),
    ("ivf", {"n_subspaces": 8}), ("ivf", {"n_codewords": 300}), ("ivf", {"n_lists": 4}),
    ("hnsw", {"n_links": 3}), ("hnsw", {"n_codewords": 1, "n_subspaces": 1}),
    ("pq", {"rotation": "opq"}), ("ivf", {"rotation": "opq"}), ("hnsw", {"rotation": "opq"}),
])
def test_finding5_structural_params_changed_after_fit_are_refused(kind, params):
    nn = FACTORIES[kind]().fit(X)
    before = pickle.dumps(nn)
    nn.set_params(**params)
    names = "|".join(params)
    with pytest.raises(ValueError, match=f"({names})=.* was set after fit"):
        nn.kneighbors(Q)
    with pytest.raises(ValueError, match=f"({names})=.* was set after fit"):
        nn.partial_fit(Q)
    # Nothing was modified by the refused calls.
    restored = pickle.loads(before)
    nn.set_params(**restored.get_params())
    for a, b in zip(restored.kneighbors(Q), nn.kneighbors(Q)):
        assert_array_equal(a, b)


def test_ivf_n_lists_auto_after_fit_is_accepted():
    nn = IVFPQNeighbors(5, n_lists="auto", n_subspaces=4, n_codewords=16,
                        random_state=0, refine_factor=0).fit(X)
    nn.kneighbors(Q)
    nn.set_params(n_lists=nn.n_lists_)
    nn.kneighbors(Q)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_finding5_refine_factor_raised_after_fit_without_vectors(kind):
    nn = FACTORIES[kind]().fit(X)
    nn.set_params(refine_factor=5)
    with pytest.raises(ValueError, match="refine_factor=5 needs the raw vectors"):
        nn.kneighbors(Q)
    # partial_fit must not start keeping vectors for the new rows only.
    nn.partial_fit(Q)
    assert nn.vectors_ is None
    nn.set_params(refine_factor=0)
    assert nn.kneighbors(Q)[1].shape == (10, 5)


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_refine_factor_lowered_after_fit_keeps_vectors_growing(kind):
    nn = FACTORIES[kind](refine_factor=3).fit(X)
    nn.set_params(refine_factor=0)
    nn.partial_fit(Q)
    assert nn.vectors_.shape == (410, 8)
    nn.set_params(refine_factor=3)
    dist, ind = nn.kneighbors(Q[:2], n_neighbors=1)
    assert_array_equal(ind[:, 0], [400, 401])  # the appended rows themselves
    assert np.allclose(dist, 0, atol=1e-6)


@pytest.mark.parametrize("value", [1e20, 1e39])
def test_finding6_hnsw_float64_beyond_float32_range_is_rejected(value):
    data = X.astype(np.float64)
    data[3, 2] = value
    with pytest.raises(ValueError, match="overflow"):
        HNSWPQNeighbors(5, n_links=6, n_subspaces=4, n_codewords=16,
                        random_state=0, refine_factor=0).fit(data)
    nn = HNSWPQNeighbors(5, n_links=6, n_subspaces=4, n_codewords=16,
                         random_state=0, refine_factor=0).fit(X.astype(np.float64))
    with pytest.raises(ValueError, match="overflow"):
        nn.kneighbors(data[:5])
    with pytest.raises(ValueError, match="overflow"):
        nn.partial_fit(data[:5])
    assert nn.n_samples_fit_ == 400
    # The other estimators compute in float64 and take such data.
    PQNeighbors(5, n_subspaces=4, n_codewords=16, random_state=0,
                refine_factor=0).fit(data * 1e-10)


@pytest.mark.parametrize("dtype, value", [(np.float32, 1e30), (np.float64, 1e39)])
@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_finding7_out_of_range_user_codebooks_are_rejected(kind, dtype, value):
    cb = np.zeros((4, 16, 2), dtype=dtype)
    cb[:, :, :] = rng.randn(4, 16, 2)
    cb[1, 3, 0] = value
    with pytest.raises(ValueError, match="codebooks"):
        FACTORIES[kind](codebooks=cb).fit(X)


def test_finding7_user_codebooks_cast_to_float32_overflowing_are_rejected():
    cb = rng.randn(4, 16, 2)
    cb[0, 0, 0] = 1e39  # finite in float64, inf in float32
    with pytest.raises(ValueError, match="codebooks contain NaN or infinity"):
        PQNeighbors(5, n_subspaces=4, n_codewords=16, codebooks=cb, refine_factor=0).fit(X)


@pytest.mark.parametrize("refine", [0, 10])
def test_finding9_hnsw_refine_after_remove_and_compact(refine):
    nn = HNSWPQNeighbors(3, n_links=6, ef_construction=32, ef_search=8, n_subspaces=4,
                         n_codewords=16, refine_factor=refine,
                         random_state=0).fit(X[:60])
    nn.remove(np.arange(0, 60, 2))
    nn.compact()
    # k * refine_factor (90) exceeds the 30 live rows.
    dist, ind = nn.kneighbors(Q, n_neighbors=9)
    assert np.all(ind % 2 == 1)
    assert np.all(np.diff(dist, axis=1) >= 0)
    dist, ind = nn.kneighbors(Q, n_neighbors=30)
    assert_array_equal(np.sort(ind, axis=1), np.tile(np.arange(1, 60, 2), (10, 1)))


def test_finding9_hnsw_tombstones_not_rebuilt_per_call():
    nn = HNSWPQNeighbors(3, n_links=6, n_subspaces=4, n_codewords=16,
                         random_state=0, refine_factor=0).fit(X)
    nn.remove(np.arange(50))
    mask = nn._tombstones()
    assert mask.sum() == 50
    assert nn._tombstones() is mask  # cached, not recomputed per query
    nn.compact()
    # After compaction no node of the graph is removed: the kernel gets
    # no mask at all.
    assert nn._tombstones().size == 0
    assert not np.isin(nn.kneighbors(Q, n_neighbors=20)[1], np.arange(50)).any()


@pytest.mark.parametrize("kind", sorted(FACTORIES))
def test_failed_fit_leaves_the_fitted_index_unchanged(kind):
    nn = FACTORIES[kind]().fit(X)
    expected = nn.kneighbors(Q)
    state = pickle.loads(pickle.dumps(nn))
    with pytest.raises(ValueError):
        nn.fit(X[:5])  # too few rows for 16 codewords
    assert same_state(nn, state)
    for a, b in zip(expected, nn.kneighbors(Q)):
        assert_array_equal(a, b)
