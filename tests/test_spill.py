"""Spilling (SOAR) in IVFPQNeighbors: ``spill_lambda``.

Each vector is stored in its own list and in a second one; these tests
check the second list against the naive oracle, the kernel's top-k of
distinct ids against the oracle, recall against the unspilled index, and
that no answer holds an id twice, through appends, removals, compaction,
save / load, filters, radius queries, graphs, X=None, refit and set_refine.
Hostile files run in a child interpreter.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy import sparse
from sklearn.base import clone

from pqsk import IVFPQNeighbors, _lists, _naive, _partition, _scorers

rng = np.random.RandomState(7)
CENTERS = rng.randn(40, 12).astype(np.float32) * 3
X = (CENTERS[rng.randint(40, size=2400)] + rng.randn(2400, 12)).astype(np.float32)
Q = (CENTERS[rng.randint(40, size=80)] + rng.randn(80, 12)).astype(np.float32)


def ivf(**kw):
    params = dict(n_neighbors=5, n_lists=24, n_probe=3, n_subspaces=4, n_codewords=32,
                  refine_factor=0, spill_lambda=1.5, random_state=0)
    params.update(kw)
    return IVFPQNeighbors(**params)


def built(est, rows, **params):
    """An index of ``rows`` with ``est``'s quantizers (the shard protocol)
    and ``params``, so that two indexes of the same rows can be compared
    entry for entry."""
    return clone(est).set_params(**params)._shard_from_quantizers(est._shard_quantizers(),
                                                                  rows)


def assert_distinct(ind):
    for row in np.atleast_2d(ind):
        real = row[row >= 0]
        assert len(set(real.tolist())) == real.shape[0], row


def oracle(est, Q, k, removed=None):
    """The naive IVF search (``_naive.ivf_search`` with copies) over the
    sealed entries of ``est`` (its growing part must be empty), as
    ``kneighbors`` reports it (refine_factor=0, euclidean)."""
    assert est.growing_ids_.shape[0] == 0
    d, i = _naive.ivf_search(Q, est.cluster_centers_, est.codebooks_, est.codes_, est.ids_,
                             est.list_offsets_, k, est._n_probe(), removed=removed,
                             copies=est._copies())
    return np.sqrt(np.maximum(d, 0)), i


# -- the stages against their oracles ------------------------------------------

@pytest.mark.parametrize("lam", [0.0, 1.5, 10.0])
def test_spill_lists_matches_oracle(lam):
    r = np.random.RandomState(1)
    C = r.randn(9, 5)
    Xs = np.vstack([r.randn(60, 5), C[3:4]])  # the last row is its centroid: r = 0
    labels = _partition.assign(Xs, C)
    got = _partition.spill_lists(Xs, C, labels, lam, block=np.empty((7, 9)))
    assert got.dtype == np.int32 and np.all(got != labels)
    assert_array_equal(got, _naive.spill_lists(Xs, C, labels, lam))
    # lambda = 0: the second-nearest centroid
    if lam == 0:
        d = ((Xs[:, None] - C[None]) ** 2).sum(-1)
        assert_array_equal(got, np.argsort(d, axis=1, kind="stable")[:, 1])


def test_spill_prefers_an_orthogonal_residual():
    # x sits right of c0; c1 lies further along the residual, c2 aside:
    # plain distance picks c1, SOAR's loss with a large lambda picks c2.
    C = np.array([[0.0, 0.0], [2.0, 0.0], [0.0, 1.9]])
    x = np.array([[0.9, 0.0]])
    assert _partition.spill_lists(x, C, np.array([0]), 0.0)[0] == 1
    assert _partition.spill_lists(x, C, np.array([0]), 10.0)[0] == 2


def test_unique_top_k_matches_oracle():
    r = np.random.RandomState(3)
    ids = r.randint(0, 12, size=(30, 16)).astype(np.int64)
    dist = r.rand(30, 16).astype(np.float32)
    dist[:, -3:] = np.inf
    ids[:, -3:] = np.iinfo(np.int64).max
    order = np.lexsort((ids, dist), axis=1)
    dist, ids = np.take_along_axis(dist, order, 1), np.take_along_axis(ids, order, 1)
    for kn, n_threads in [(8, 1), (8, 2), (1, 2), (16, 1)]:  # 16: rows padded
        d, i = _scorers.unique_top_k(dist, ids, kn, n_threads)
        d0, i0 = _naive.unique_top_k(dist, ids, kn)
        assert_array_equal(i, i0)
        assert_array_equal(d, d0.astype(np.float32))
    d, i = _scorers.unique_top_k(dist[:, :1].astype(np.float64), ids[:, :1], 1)
    assert_array_equal(i, ids[:, :1])


def _spilled_problem(seed, m=4, k=16, n=300, n_lists=7, D=8):
    r = np.random.RandomState(seed)
    C = r.randn(n_lists, D)
    cb = r.randn(m, k, D // m) * 0.5
    first = r.randint(0, n_lists, n)
    second = (first + r.randint(1, n_lists, n)) % n_lists
    lists = np.concatenate([first, second])
    ids = np.concatenate([np.arange(n), np.arange(n)]).astype(np.int32)
    codes = r.randint(0, k, size=(2 * n, m)).astype(np.uint8)
    order = np.argsort(lists, kind="stable")
    offsets = np.zeros(n_lists + 1, np.int64)
    np.cumsum(np.bincount(lists, minlength=n_lists), out=offsets[1:])
    Qs = r.randn(20, D)
    return Qs, C, cb, codes[order], ids[order], offsets


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("kn,n_probe", [(5, 1), (40, 2), (200, 1), (400, 7)])
def test_ivf_search_copies_matches_oracle(packed, kn, n_probe):
    Qs, C, cb, codes, ids, offsets = _spilled_problem(0)
    removed = np.zeros(300, bool)
    removed[::7] = True
    coarse = _partition.coarse_terms(Qs, C, False)
    terms = _partition.list_terms(C, cb)
    seg = (_lists.list_segment(codes, ids, offsets, {}, True) if packed else None)
    segments = ([(seg["packed"], seg["ids"], seg["list_offsets"], seg["list_blocks"])]
                if packed else [(codes, ids, offsets)])
    d, i = _scorers.ivf_search(Qs, coarse, cb, terms, segments, kn, n_probe,
                               deleted=removed.view(np.uint8), centroids=C, copies=2)
    d0, i0 = _naive.ivf_search(Qs, C, cb, codes, ids, offsets, kn, n_probe,
                               coarse=coarse, removed=removed, copies=2)
    assert_array_equal(i, i0)
    assert_allclose(d, d0, rtol=1e-9, atol=1e-9)
    assert_distinct(np.where(i == np.iinfo(np.int64).max, -1, i))


def test_ivf_search_copies_estimates_hold_distinct_ids():
    # Estimate mode (4-bit, the estimators' setting): the reservoir keeps
    # copies * (k + extra) entries, every row still gets k distinct ids.
    Qs, C, cb, codes, ids, offsets = _spilled_problem(1, n=2000)
    seg = _lists.list_segment(codes, ids, offsets, {}, True)
    coarse = _partition.coarse_terms(Qs, C, False)
    for rescore in (True, False):
        d, i = _scorers.ivf_search(
            Qs, coarse, cb, _partition.list_terms(C, cb),
            [(seg["packed"], seg["ids"], seg["list_offsets"], seg["list_blocks"])], 30, 2,
            centroids=C, fastscan_margin=_scorers.FASTSCAN_MARGIN, fastscan_estimate=True,
            fastscan_rescore=rescore, copies=2)
        assert np.all(i < 2000)
        assert_distinct(i)


# -- the estimator ----------------------------------------------------------------

def recall(ind, truth):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ind, truth)])


def test_recall_with_spilling_at_least_without():
    from sklearn.neighbors import NearestNeighbors

    r = np.random.RandomState(0)
    Xr = (r.randn(6000, 16) * np.linspace(0.5, 2, 16)).astype(np.float32)
    Qr = (r.randn(200, 16) * np.linspace(0.5, 2, 16)).astype(np.float32)
    truth = NearestNeighbors(n_neighbors=10).fit(Xr).kneighbors(Qr, return_distance=False)
    base = ivf(spill_lambda=None, n_lists=64, n_subspaces=8, n_codewords=256,
               refine_factor=10, n_neighbors=10).fit(Xr)
    spill = built(base, Xr, spill_lambda=1.5)
    assert spill.n_samples_fit_ == 6000 and spill.ids_.shape[0] == 12000
    for n_probe in (1, 2, 4):
        a = recall(base.set_params(n_probe=n_probe).kneighbors(Qr, return_distance=False),
                   truth)
        ind = spill.set_params(n_probe=n_probe).kneighbors(Qr, return_distance=False)
        assert_distinct(ind)
        b = recall(ind, truth)
        assert b >= a + 0.02, (n_probe, a, b)


@pytest.mark.parametrize("kw", [
    {},
    {"n_codewords": 16},                                        # 4-bit fast-scan
    {"n_codewords": 16, "refine_factor": 10},
    {"refine_factor": 10, "refine_dtype": "int8"},
    {"metric": "cosine", "anisotropic_threshold": 0.2, "refine_factor": 5},
    {"metric": "dot", "n_codewords": 16},
])
def test_no_id_twice_in_any_answer(kw):
    est = ivf(**kw).fit(X)
    assert est._copies() == 2
    k = 8
    ind = est.kneighbors(Q, n_neighbors=k, return_distance=False)
    assert ind.shape == (80, k) and np.all(ind >= 0)
    assert_distinct(ind)
    # every list probed: still each id once
    est.set_params(n_probe=24)
    assert_distinct(est.kneighbors(Q, n_neighbors=50, return_distance=False))
    est.set_params(n_probe=3)
    # X=None: itself excluded, both its entries
    self_ind = est.kneighbors(n_neighbors=4, return_distance=False)
    assert not np.any(self_ind == np.arange(2400)[:, None])
    assert_distinct(self_ind)
    # filters: a mask for all, and one row per query
    mask = np.zeros(2400, bool)
    mask[::3] = True
    ind = est.kneighbors(Q, n_neighbors=k, return_distance=False, filter=mask)
    assert np.all(mask[ind]) and np.all(ind >= 0)
    assert_distinct(ind)
    per_query = sparse.random(80, 2400, density=0.05, random_state=0, format="csr")
    per_query = per_query.astype(bool)
    ind = est.kneighbors(Q, n_neighbors=k, return_distance=False, filter=per_query)
    assert_distinct(ind)
    for q in range(80):
        got = ind[q][ind[q] >= 0]
        assert set(got.tolist()) <= set(per_query[q].indices.tolist())
    # graphs
    g = est.kneighbors_graph(Q, n_neighbors=k, mode="distance")
    assert np.all(np.diff(g.indptr) == k)
    assert est.kneighbors_graph(n_neighbors=3).nnz == 2400 * 3
    # radius: each id once, the same neighbours as kneighbors
    d, i = est.kneighbors(Q[:10], n_neighbors=k)
    rd, ri = est.radius_neighbors(Q[:10], radius=float(d[:, 3].max()))
    for q in range(10):
        assert_distinct(ri[q])
        assert ri[q].shape[0] >= 4


def test_answers_equal_the_oracle_and_survive_removal():
    est = ivf(n_codewords=256).fit(X)
    d, i = est.kneighbors(Q, n_neighbors=7)
    d0, i0 = oracle(est, Q, 7)
    assert_array_equal(i, i0)
    assert_allclose(d, d0, rtol=1e-4, atol=1e-4)
    gone = np.arange(0, 2400, 5)
    est.remove(gone)
    removed = np.zeros(2400, bool)
    removed[gone] = True
    d, i = est.kneighbors(Q, n_neighbors=7)
    assert not np.any(removed[i])
    d0, i0 = oracle(est, Q, 7, removed)
    assert_array_equal(i, i0)
    est.compact()
    assert est.ids_.shape[0] == 2 * (2400 - gone.size)
    d2, i2 = est.kneighbors(Q, n_neighbors=7)
    assert_array_equal(i2, i)
    assert_allclose(d2, d, rtol=1e-6)


@pytest.mark.parametrize("n_codewords", [32, 16])
def test_appends_removals_and_segments_equal_one_build(n_codewords):
    est = ivf(n_codewords=n_codewords, segment_size=1024).fit(X[:1500])
    for lo in range(1500, 2400, 150):  # growing part, sealed, merged
        est.partial_fit(X[lo:lo + 150])
    assert est.n_samples_fit_ == 2400 and len(est.segments_) > 1
    for s in est.segments_:  # no segment cuts a vector's two entries apart
        assert s["ids"].shape[0] <= 1024 and s["ids"].shape[0] % 2 == 0
    ref = built(est, X)
    d, i = est.kneighbors(Q)
    d0, i0 = ref.kneighbors(Q)
    assert_array_equal(i, i0)
    assert_allclose(d, d0, rtol=1e-6)
    est._check_loaded_state()  # every invariant a loaded index must meet
    # removed rows: the answers of an index that never held them
    gone = np.arange(3, 2400, 4)
    est.remove(gone)
    keep = np.setdiff1d(np.arange(2400), gone)
    ref2 = built(est, X[keep])
    d, i = est.kneighbors(Q)
    d0, i0 = ref2.kneighbors(Q)
    assert_array_equal(i, keep[i0])
    assert_allclose(d, d0, rtol=1e-6)
    est.compact()
    est._check_loaded_state()
    assert_array_equal(est.kneighbors(Q, return_distance=False), keep[i0])


def test_save_load_round_trip(tmp_path):
    est = ivf(n_codewords=16, refine_factor=4, refine_dtype="int8").fit(X[:2000])
    est.partial_fit(X[2000:])
    est.remove(np.arange(0, 2400, 9))
    est.save(tmp_path / "a")
    for mmap in (None, "r"):
        loaded = IVFPQNeighbors.load(tmp_path / "a", mmap_mode=mmap)
        assert loaded.spill_lambda_ == 1.5 and loaded.get_params()["spill_lambda"] == 1.5
        for a, b in [(est.kneighbors(Q), loaded.kneighbors(Q)),
                     (est.kneighbors(X[:50], 3), loaded.kneighbors(X[:50], 3))]:
            assert_array_equal(a[1], b[1])
            assert_allclose(a[0], b[0])
    assert est.memory_usage_["ids"] == loaded.memory_usage_["ids"]


def test_refit_and_set_refine_keep_both_entries():
    est = ivf(refine_factor=0).fit(X)
    est.refit_codebooks(X[:1000], X)
    est._check_loaded_state()
    d, i = est.kneighbors(Q)
    assert_array_equal(i, oracle(est, Q, 5)[1])
    est.set_refine(X)
    est.set_params(refine_factor=10)
    ind = est.kneighbors(Q, n_neighbors=8, return_distance=False)
    assert_distinct(ind)


def test_memory_counts_both_entries_and_n_samples_counts_vectors():
    plain = ivf(spill_lambda=None).fit(X)
    spill = built(plain, X, spill_lambda=0.0)
    a, b = plain.memory_usage_, spill.memory_usage_
    assert spill.n_samples_fit_ == plain.n_samples_fit_ == 2400
    assert b["codes"] == 2 * a["codes"] and b["ids"] == 2 * a["ids"]
    assert b["per_vector"] == pytest.approx(2 * a["per_vector"])
    # one list: nothing to spill into
    one = ivf(n_lists=1).fit(X)
    assert one._copies() == 1 and one.ids_.shape[0] == 2400


@pytest.mark.parametrize("bad", [-0.5, np.inf, np.nan, -np.inf, "soar"])
def test_bad_spill_lambda(bad):
    with pytest.raises(ValueError, match="spill_lambda"):
        ivf(spill_lambda=bad).fit(X)


def test_spill_lambda_is_structural(tmp_path):
    est = ivf().fit(X)
    est.set_params(spill_lambda=None)
    with pytest.raises(ValueError, match="spill_lambda"):
        est.kneighbors(Q)
    with pytest.raises(ValueError, match="spill_lambda"):
        est.partial_fit(X[:3])
    with pytest.raises(ValueError, match="spill_lambda"):
        est.save(tmp_path / "x")
    est.set_params(spill_lambda=1.5)
    est.kneighbors(Q)
    est.set_params(spill_lambda=None).fit(X)  # a new fit takes the new value
    assert est.spill_lambda_ is None and est.ids_.shape[0] == 2400


# -- hostile files, in a child interpreter -------------------------------------------

CHILD = textwrap.dedent('''
    import json, sys, shutil
    import numpy as np
    sys.path.insert(0, sys.argv[2])
    import index_files as files
    from pqsk import IVFPQNeighbors
    from pqsk._checks import IndexFormatError

    root = sys.argv[1]
    rng = np.random.RandomState(0)
    X = rng.randn(1500, 8).astype(np.float32)
    results = {}

    saved = {}

    def case(name, make, edit):
        if make not in saved:  # one fit and save per kind, copied per case
            saved[make] = f"{root}/base-{len(saved)}"
            make().save(saved[make])
        path = f"{root}/{name}"
        shutil.copytree(saved[make], path)
        edit(path)
        try:
            est = IVFPQNeighbors.load(path)
        except IndexFormatError as e:
            results[name] = "rejected"
            return
        est.kneighbors(X[:5])
        results[name] = "loaded"

    spill = lambda: IVFPQNeighbors(n_lists=8, n_subspaces=4, n_codewords=16,
                                   refine_factor=0, spill_lambda=1.5, random_state=0).fit(X)
    plain = lambda: IVFPQNeighbors(n_lists=8, n_subspaces=4, n_codewords=16,
                                   refine_factor=0, random_state=0).fit(X)

    def ids(fn):
        return lambda p: files.edit_array(p, "segments_.0.ids", fn)

    def attr(name, value):
        return lambda p: files.edit_header(p, lambda h: h["attributes"].__setitem__(name, value))

    def param(name, value):
        return lambda p: files.edit_header(p, lambda h: h["params"].__setitem__(name, value))

    def third_copy(a):      # an id stored three times, another once
        a[np.flatnonzero(a == a[0])[1]] = a[1] if a[1] != a[0] else a[2]

    def swap_lists(a):      # the two copies of id a[0] in list 0: legal counts
        other = np.flatnonzero(a == a[0])[1]
        k = 1
        while a[k] == a[0]:
            k += 1
        a[other], a[k] = a[k], a[0]

    def as_version4(p):
        def edit(h):
            h["format_version"] = 4
            h["params"].pop("spill_lambda", None)
            h["attributes"].pop("spill_lambda_", None)
        files.edit_header(p, edit)
        m = json.load(open(f"{p}/MANIFEST.json"))
        m["format_version"] = 4
        files.replace_file(f"{p}/MANIFEST.json", json.dumps(m).encode())
        files.edit_header(p, lambda h: None)

    case("ok", spill, lambda p: None)
    case("third_copy", spill, ids(third_copy))
    case("one_copy", spill, ids(lambda a: np.where(a == a[0], a[1] if a[1] != a[0] else a[2], a)))
    case("same_list", spill, ids(swap_lists))
    case("negative_lambda", spill, attr("spill_lambda_", -1.0))
    case("string_lambda", spill, attr("spill_lambda_", "x"))
    case("lambda_none", spill, lambda p: (attr("spill_lambda_", None)(p),
                                          param("spill_lambda", None)(p)))
    case("param_mismatch", spill, param("spill_lambda", 2.0))
    case("bad_param", spill, param("spill_lambda", -3))
    case("plain_duplicated", plain, ids(lambda a: np.where(a == a[1], a[0], a)))
    case("plain_v4", plain, as_version4)
    case("spill_v4", spill, as_version4)
    print(json.dumps(results))
''')


def test_hostile_spill_files(tmp_path):
    import pqsk

    root = os.path.dirname(os.path.dirname(os.path.abspath(pqsk.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=root)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path),
                           os.path.dirname(os.path.abspath(__file__))],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results.pop("ok") == "loaded"
    assert results.pop("plain_v4") == "loaded"
    assert all(v == "rejected" for v in results.values()), results
