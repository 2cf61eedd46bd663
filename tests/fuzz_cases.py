"""Property-based fuzzing of every public method (run by test_fuzz.py in a
subprocess, so that a crash of the interpreter fails the test instead of
killing the test run).

Each case throws random shapes, dtypes, NaN/inf, empty arrays, huge or
negative parameters, non-contiguous and read-only arrays at an estimator
and requires either a clear exception of an expected type or a correct
result; a failed ``partial_fit`` / ``remove`` must leave the index exactly
as it was.
"""

import copy
import os
import resource
import warnings

import numpy as np
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from scipy import sparse

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, PQTransformer, _naive

EXAMPLES = int(os.environ.get("PQSK_FUZZ_EXAMPLES", "300"))
# A runaway allocation must fail here (MemoryError), not take the machine.
_GB = 2**30
resource.setrlimit(resource.RLIMIT_AS, (8 * _GB, resource.getrlimit(resource.RLIMIT_AS)[1]))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
EXPECTED = (ValueError, TypeError)  # NotFittedError is a ValueError

DTYPES = [np.float64, np.float32, np.float16, np.int64, np.int32, np.uint8, bool,
          np.complex128, object]
NONSENSE = st.sampled_from([0, -1, 2**31, 10**9, 70000])


def mostly(valid, nonsense=NONSENSE):
    """Valid values about nine times in ten, nonsense otherwise (hypothesis
    favours small draws, so the nonsense branch is the largest number)."""
    return st.integers(0, 9).flatmap(lambda r: nonsense if r == 9 else valid)


PARAM_INT = mostly(st.integers(1, 8))


@st.composite
def arrays(draw, n_features=None):
    n = draw(st.sampled_from([0, 1, 2, 5, 12, 25, 40]))
    d = n_features if n_features is not None and draw(st.booleans()) else draw(
        st.integers(0, 9))
    dtype = draw(st.sampled_from(DTYPES[:3] * 3 + DTYPES))
    rng = np.random.RandomState(draw(st.integers(0, 2**31 - 1)))
    base = rng.randn(n, max(d, 1) * 2) * draw(st.sampled_from([1.0, 1e-30, 1e30]))
    kind = draw(st.sampled_from(["c", "c", "c", "strided", "fortran", "readonly", "1d",
                                 "3d", "sparse", "list"]))
    X = base[:, : max(d, 1)] if d else base[:, :0]
    if draw(st.integers(0, 3)) == 0 and X.size:
        bad = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        X = X.copy()
        X.flat[draw(st.integers(0, X.size - 1))] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        X = X.astype(dtype) if dtype is not object else X.astype(object)
    if kind == "strided" and X.shape[1]:
        X = np.repeat(X, 2, axis=1)[:, ::2]
    elif kind == "fortran":
        X = np.asfortranarray(X)
    elif kind == "readonly":
        X = np.array(X)
        X.setflags(write=False)
    elif kind == "1d":
        X = X.ravel()
    elif kind == "3d":
        X = X[None]
    elif kind == "sparse" and X.dtype.kind in "fiub" and X.dtype != np.float16:
        X = sparse.csr_matrix(X)
    elif kind == "list":
        X = X.tolist()
    return X


def _state(est):
    return {k: (v.copy() if isinstance(v, np.ndarray) else copy.copy(v))
            for k, v in vars(est).items() if not k.startswith("_levels_rng")}


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], np.ndarray):
            np.testing.assert_array_equal(a[k], b[k])
        else:
            assert a[k] == b[k] or (a[k] is None and b[k] is None), k


def _check_neighbors_result(est, X, res, k):
    dist, ind = res
    nq = est.n_samples_fit_ if X is None else np.asarray(X).shape[0]
    assert dist.shape == ind.shape == (nq, k)
    assert ind.dtype == np.int64
    assert np.all((ind >= 0) & (ind < est.n_samples_fit_))
    assert np.all(np.isfinite(dist))
    assert np.all(np.diff(dist, axis=1) >= -1e-6 * (1 + np.abs(dist[:, 1:])))


def _call(fn, *args, **kwargs):
    """Run fn; return (True, result) or (False, None) on an expected error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return True, fn(*args, **kwargs)
    except EXPECTED:
        return False, None


def make(kind, p):
    common = dict(n_subspaces=p["m"], n_codewords=p["k"], random_state=0, n_jobs=p["jobs"])
    if kind == "pq":
        return PQNeighbors(p["nn"], metric=p["metric"], **common)
    if kind == "ivf":
        return IVFPQNeighbors(p["nn"], n_lists=p["lists"], n_probe=p["probe"],
                              metric=p["metric"], refine_factor=p["refine"], **common)
    if kind == "hnsw":
        return HNSWPQNeighbors(p["nn"], n_links=p["links"], ef_construction=p["efc"],
                               ef_search=p["ef"], metric=p["metric"],
                               refine_factor=p["refine"], **common)
    return PQTransformer(p["m"], p["k"], random_state=0, n_jobs=p["jobs"])


params = st.fixed_dictionaries({
    "m": mostly(st.sampled_from([1, 2, 3, 6])), "k": PARAM_INT, "nn": PARAM_INT,
    "lists": mostly(st.integers(1, 4)), "probe": PARAM_INT,
    "links": mostly(st.integers(2, 8)), "efc": PARAM_INT, "ef": PARAM_INT,
    "refine": mostly(st.integers(0, 3)), "jobs": st.sampled_from([None, 1, 2, -1]),
    "metric": mostly(st.sampled_from(["euclidean", "sqeuclidean", "cosine", "dot"]),
                     st.just("manhattan")),
})

GOOD = np.random.RandomState(1).randn(40, 6).astype(np.float32)


@SETTINGS
@given(kind=st.sampled_from(["pq", "ivf", "hnsw", "transformer"]), p=params,
       X=arrays(), Q=arrays(n_features=6), k=st.one_of(st.none(), PARAM_INT),
       ids=st.lists(st.integers(-5, 60), max_size=5))
# Found by CI (stop 17): uneven sub-spaces (3 features, 2 sub-spaces) decode to
# the 3 real features, not to the zero-padded width of the codebooks.
@example(kind="transformer",
         p={"m": 2, "k": 1, "nn": 1, "lists": 1, "probe": 1, "links": 2, "efc": 1,
            "ef": 1, "refine": 0, "jobs": None, "metric": "euclidean"},
         X=np.array([[1.76405235, 0.40015721, 0.97873798]]),
         Q=np.array([[1.76405235, 0.40015721, 0.97873798]]), k=None, ids=[])
def test_every_method(kind, p, X, Q, k, ids):
    est = make(kind, p)
    # Fitting on random input either fails cleanly or gives a usable index.
    ok, _ = _call(est.fit, X)
    event(f"{kind}: fit on random input {'ok' if ok else 'rejected'}")
    if not ok:
        ok, _ = _call(est.fit, GOOD)  # valid data, maybe invalid parameters
        if not ok:
            event(f"{kind}: parameters rejected")
            return
    if kind == "transformer":
        ok, codes = _call(est.transform, Q)
        back = None
        if ok:
            assert codes.shape == (np.asarray(Q).shape[0], est.n_subspaces)
            ok, back = _call(est.inverse_transform, codes)
            assert ok and back.shape == (codes.shape[0], est.n_features_in_)
            np.testing.assert_array_equal(back, _naive.decode(codes, est.codebooks_, est.n_features_in_))
        # Q taken as codes: only integers in [0, n_codewords), n_subspaces
        # columns; then the concatenated codewords they name.
        ok, decoded = _call(est.inverse_transform, Q)
        if ok:
            event("transformer: Q decoded as codes")
            Qc = np.asarray(Q)
            assert Qc.dtype.kind in "iu" and Qc.shape[1] == est.n_subspaces
            assert Qc.size == 0 or (Qc.min() >= 0 and Qc.max() < est.n_codewords)
            np.testing.assert_array_equal(decoded, _naive.decode(Qc, est.codebooks_, est.n_features_in_))
        # The score is minus the mean squared error of Q's reconstructions.
        ok, score = _call(est.score, Q)
        assert not ok or back is not None, "score accepted what transform rejected"
        if ok:
            event("transformer: score checked")
            err = np.asarray(Q, dtype=est.codebooks_.dtype) - back
            expected = -np.mean(np.einsum("ij,ij->i", err, err, dtype=np.float64))
            assert isinstance(score, float) and np.isfinite(score) and score <= 0
            np.testing.assert_allclose(score, expected, rtol=1e-6)
        return
    ok, res = _call(est.kneighbors, Q, n_neighbors=k)
    event(f"{kind}: kneighbors {'answered' if ok else 'rejected'}")
    if ok:
        _check_neighbors_result(est, Q, res, est.n_neighbors if k is None else k)
    ok, res = _call(est.kneighbors, None, n_neighbors=k)
    if ok:
        _check_neighbors_result(est, None, res, est.n_neighbors if k is None else k)
    ok, G = _call(est.kneighbors_graph, Q, n_neighbors=k, mode="distance")
    if ok:
        assert G.shape == (np.asarray(Q).shape[0], est.n_samples_fit_)
    _call(est.transform, Q)
    before = _state(est)
    ok, _ = _call(est.partial_fit, Q)
    if not ok:
        _same_state(before, _state(est))
    if hasattr(est, "remove"):
        before = _state(est)
        ok, _ = _call(est.remove, ids)
        if not ok:
            _same_state(before, _state(est))
        elif est.n_samples_fit_ - est.n_removed_ > 0:
            probe = np.random.RandomState(0).randn(3, est.n_features_in_)
            ok, res = _call(est.kneighbors, probe, n_neighbors=1)
            assert ok and not np.isin(res[1], np.asarray(ids, dtype=np.int64)).any()
    # After whatever partial_fit and remove did: asking for as many
    # neighbours as there are live points returns each live id exactly once.
    removed = np.zeros(est.n_samples_fit_, bool) if est.removed_ is None else est.removed_
    live = np.flatnonzero(~removed)
    assert live.size == est.n_samples_fit_ - est.n_removed_
    event(f"{kind}: every live id checked" if live.size else f"{kind}: no live id left")
    if live.size:
        probe = np.random.RandomState(1).randn(2, est.n_features_in_)
        ok, res = _call(est.kneighbors, probe, n_neighbors=live.size)
        assert ok
        _check_neighbors_result(est, probe, res, live.size)
        for row in res[1]:
            np.testing.assert_array_equal(np.sort(row), live)
