"""Compact re-ranking tiers (``refine_dtype="float16"`` / ``"int8"``) on the
three search estimators: recall against the float32 re-ranking, memory,
appends / removals / compaction / save / load / set_refine against a fresh
fit, and every refusal."""

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from sklearn.base import clone
from sklearn.utils._param_validation import InvalidParameterError

import index_files as files
import pqsk
from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors
from pqsk._checks import IndexFormatError

rng = np.random.RandomState(0)
CENTERS = rng.randn(20, 16) * 4
X = (CENTERS[rng.randint(0, 20, 2000)] + rng.randn(2000, 16)).astype(np.float32)
Q = (CENTERS[rng.randint(0, 20, 60)] + rng.randn(60, 16)).astype(np.float32)
# Rows 0 and 1 hold each feature's minimum and maximum: an int8 tier
# trained on any prefix of X has the same offset and scale as on X.
X[0], X[1] = X.min(axis=0), X.max(axis=0)

FACTORIES = {
    "pq": lambda **kw: PQNeighbors(10, n_subspaces=4, n_codewords=32, random_state=0, **kw),
    "ivf": lambda **kw: IVFPQNeighbors(10, n_lists=8, n_probe=4, n_subspaces=4,
                                       n_codewords=32, random_state=0, **kw),
    "hnsw": lambda **kw: HNSWPQNeighbors(10, n_links=8, ef_construction=64, ef_search=64,
                                         n_subspaces=4, n_codewords=32, random_state=0,
                                         **kw),
}
TIERS = ["float16", "int8"]


def true_neighbors(X, Q, k, metric="euclidean"):
    if metric == "dot":
        d = -(Q @ X.T)
    else:
        if metric == "cosine":
            X = X / np.linalg.norm(X, axis=1, keepdims=True)
            Q = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        d = ((Q[:, None, :] - X[None]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def recall(ind, true):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ind, true)])


def decoded(nn):
    """The decoded tier rows of every indexed point (float64)."""
    return nn._tier.take(np.arange(nn.n_samples_fit_), np.float64)


@pytest.mark.parametrize("key", sorted(FACTORIES))
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
def test_recall_of_the_tiers_is_close_to_float32(key, metric):
    true = true_neighbors(X.astype(np.float64), Q.astype(np.float64), 10, metric)
    got = {}
    for rd in ["float32", *TIERS]:
        nn = FACTORIES[key](metric=metric, refine_dtype=rd).fit(X)
        got[rd] = recall(nn.kneighbors(Q, return_distance=False), true)
    assert got["float32"] > 0.9
    assert got["float16"] >= got["float32"] - 0.01
    assert got["int8"] >= got["float32"] - 0.04


@pytest.mark.parametrize("key", sorted(FACTORIES))
@pytest.mark.parametrize("rd", TIERS)
def test_memory_usage_and_attributes(key, rd):
    ref = FACTORIES[key]().fit(X)
    nn = FACTORIES[key](refine_dtype=rd).fit(X)
    assert nn.vectors_ is None and nn.refine_dtype_ == rd
    mu, mu_ref = nn.memory_usage_, ref.memory_usage_
    assert mu["vectors"] == 0 and mu_ref["refine_rows"] == 0
    row_bytes = 16 * (1 if rd == "int8" else 2)
    extra = 2 * 16 * 4 if rd == "int8" else 0
    assert mu["refine_rows"] == 2000 * row_bytes + extra
    assert mu["per_vector"] == mu_ref["per_vector"]
    assert mu["total"] == mu_ref["total"] - mu_ref["vectors"] + mu["refine_rows"]
    assert nn.refine_rows_.shape == (2000, 16)
    assert nn.refine_rows_.dtype == (np.uint8 if rd == "int8" else np.float16)
    if rd == "int8":
        assert nn.refine_offset_.dtype == nn.refine_scale_.dtype == np.float32
        assert_array_equal(nn.refine_offset_, X.min(axis=0))
        assert np.all(nn.refine_scale_ > 0)
    else:
        assert nn.refine_offset_ is None and nn.refine_scale_ is None
    # refine_factor=0 keeps nothing
    bare = FACTORIES[key](refine_dtype=rd, refine_factor=0).fit(X)
    assert bare.vectors_ is None and bare.refine_rows_ is None


@pytest.mark.parametrize("rd", TIERS)
def test_a_fit_of_several_chunks_holds_no_spare_tier_rows(rd, monkeypatch):
    # The tier is encoded a chunk at a time; the fit's last chunk used to
    # get a whole chunk's capacity (15% more tier bytes at 399k GloVe rows).
    monkeypatch.setattr(pqsk._store, "CHUNK_ROWS", 300)
    nn = IVFPQNeighbors(n_lists=4, n_subspaces=4, n_codewords=16, refine_dtype=rd,
                        random_state=0).fit(X)
    row_bytes = 16 * (1 if rd == "int8" else 2)
    extra = 2 * 16 * 4 if rd == "int8" else 0
    assert len(nn.refine_rows_.chunks) > 1
    assert nn.memory_usage_["refine_rows"] == 2000 * row_bytes + extra
    # appends of small batches still get spare capacity (amortized growth)
    grown = clone(nn).fit(X[:1000])
    for s in range(1000, 1100, 10):
        grown.partial_fit(X[s:s + 10])
    assert len(grown.refine_rows_.chunks) <= len(nn.refine_rows_.chunks) + 1


@pytest.mark.parametrize("rd", TIERS)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("rotation", [None, "opq"])
def test_exhaustive_refine_is_the_exact_search_of_the_decoded_tier(rd, metric, rotation):
    """IVF probing every list and re-ranking every live point returns the
    exact neighbours of the decoded tier rows (normalised for cosine; in
    the input space, also with OPQ), with their distances; also after
    removals and compaction."""
    nn = IVFPQNeighbors(10, n_lists=8, n_probe=8, n_subspaces=4, n_codewords=32,
                        metric=metric, refine_factor=400, refine_dtype=rd,
                        rotation=rotation, max_iter=5, random_state=0).fit(X)
    assert_array_equal(nn._tier.take(np.arange(3), np.float64).round(0),
                       (X[:3] / (np.linalg.norm(X[:3], axis=1, keepdims=True)
                                 if metric == "cosine" else 1)).round(0))
    for step in range(3):
        D = decoded(nn)
        if metric == "cosine":
            D = D / np.linalg.norm(D, axis=1, keepdims=True)
            Qp = Q / np.linalg.norm(Q, axis=1, keepdims=True)
        else:
            Qp = Q.astype(np.float64)
        d2 = ((Qp[:, None, :] - D[None]) ** 2).sum(-1)
        if nn.n_removed_:
            d2[:, nn.removed_] = np.inf
        dist, ind = nn.kneighbors(Q)
        want = np.take_along_axis(d2, ind, axis=1)
        want = np.sqrt(want) if metric == "euclidean" else want / 2
        np.testing.assert_allclose(dist, want, rtol=1e-4, atol=1e-5)
        assert_array_equal(np.sort(d2, axis=1)[:, :10] <= np.take_along_axis(
            d2, ind, axis=1).max(axis=1, keepdims=True) * (1 + 1e-6), True)
        if step == 0:
            nn.remove(np.arange(0, 2000, 3))
        elif step == 1:
            nn.compact()
            assert not np.isin(nn.kneighbors(Q, return_distance=False),
                               np.arange(0, 2000, 3)).any()


@pytest.mark.parametrize("rd", TIERS)
def test_partial_fit_equals_a_fresh_fit(rd):
    """With fixed codebooks, fit + partial_fit gives the fresh fit's codes
    and tier, so the same answers (rows 0 and 1 fix the int8 range)."""
    cb = PQNeighbors(n_subspaces=4, n_codewords=32, random_state=0).fit(X).codebooks_
    whole = PQNeighbors(10, codebooks=cb, refine_dtype=rd).fit(X)
    grown = PQNeighbors(10, codebooks=cb, refine_dtype=rd).fit(X[:700])
    grown.partial_fit(X[700:1500]).partial_fit(X[1500:])
    assert_array_equal(np.asarray(grown.refine_rows_), np.asarray(whole.refine_rows_))
    for a, b in [(grown.kneighbors(Q), whole.kneighbors(Q)),
                 (grown.kneighbors(), whole.kneighbors())]:
        assert_array_equal(a[1], b[1])
        assert_array_equal(a[0], b[0])


def test_int8_clips_appended_rows_to_the_trained_range():
    nn = PQNeighbors(5, n_subspaces=4, n_codewords=16, refine_dtype="int8",
                     random_state=0).fit(X)
    far = X[:3] * 100
    nn.partial_fit(far)
    got = nn._tier.take(np.arange(2000, 2003), np.float64)
    lo, hi = X.min(axis=0), X.max(axis=0)
    assert np.all(got >= lo - 1e-4) and np.all(got <= hi + 1e-4)
    np.testing.assert_allclose(got, np.clip(far, lo, hi), atol=1e-4)


@pytest.mark.parametrize("key", ["ivf", "hnsw"])
@pytest.mark.parametrize("rd", TIERS)
def test_removed_ids_stay_out_and_self_queries_work(key, rd):
    nn = FACTORIES[key](refine_dtype=rd).fit(X)
    ref = FACTORIES[key]().fit(X)
    # X=None: the tier stands for the points; mostly the float32 answers.
    ind, ind_ref = nn.kneighbors(return_distance=False), ref.kneighbors(return_distance=False)
    assert ind.shape == (2000, 10) and not np.any(ind == np.arange(2000)[:, None])
    assert recall(ind, ind_ref) > 0.9
    gone = np.arange(1, 2000, 4)
    nn.remove(gone)
    ind = nn.kneighbors(Q, n_neighbors=30, return_distance=False)
    assert not np.isin(ind, gone).any()
    nn.compact()
    assert not np.isin(nn.kneighbors(Q, n_neighbors=30, return_distance=False), gone).any()
    # filters, radius, transform
    allowed = np.arange(0, 2000, 2)
    ind = nn.kneighbors(Q, filter=allowed, return_distance=False)
    assert np.isin(ind, allowed).all()
    dist, ind = nn.radius_neighbors(Q[:5], radius=3.0)
    assert all(np.all(d <= 3.0) for d in dist)
    assert nn.transform(Q).shape == (60, 2000)


@pytest.mark.parametrize("key", sorted(FACTORIES))
@pytest.mark.parametrize("rd", TIERS)
def test_save_load_round_trip(key, rd, tmp_path):
    nn = FACTORIES[key](refine_dtype=rd).fit(X[:1500])
    nn.partial_fit(X[1500:])
    nn.save(tmp_path / "i")
    for mmap_mode in [None, "r"]:
        back = pqsk.load(tmp_path / "i", mmap_mode=mmap_mode)
        assert back.refine_dtype == back.refine_dtype_ == rd and back.vectors_ is None
        assert_array_equal(np.asarray(back.refine_rows_), np.asarray(nn.refine_rows_))
        for a, b in [(back.kneighbors(Q), nn.kneighbors(Q))]:
            assert_array_equal(a[0], b[0])
            assert_array_equal(a[1], b[1])
    back.partial_fit(X[:5])  # a memory-mapped tier keeps growing
    assert back.refine_rows_.shape == (2005, 16)


def test_format_3_files_load_without_a_tier(tmp_path):
    nn = FACTORIES["ivf"]().fit(X)
    nn.save(tmp_path / "i")
    files.as_version3(tmp_path / "i")
    back = pqsk.load(tmp_path / "i")
    assert back.refine_dtype == back.refine_dtype_ == "float32"
    assert back.refine_rows_ is None
    assert_array_equal(back.kneighbors(Q)[1], nn.kneighbors(Q)[1])


def _saved_int8(tmp_path):
    nn = FACTORIES["pq"](refine_dtype="int8").fit(X)
    path = tmp_path / "i"
    nn.save(path)
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda p: files.edit_array(p, "refine_scale_", lambda a: a.__setitem__(3, 0)),
     "refine_scale_ must be > 0"),
    (lambda p: files.edit_array(p, "refine_scale_", lambda a: a.__setitem__(3, -1)),
     "refine_scale_ must be > 0"),
    (lambda p: files.edit_array(p, "refine_scale_", lambda a: a.__setitem__(0, np.nan)),
     "NaN"),
    (lambda p: files.edit_array(p, "refine_offset_", lambda a: a.__setitem__(0, np.inf)),
     "NaN"),
    (lambda p: files.edit_array(p, "refine_offset_", lambda a: a.__setitem__(0, 1e30)),
     "refine_offset_"),
    (lambda p: files.edit_array(p, "refine_scale_", lambda a: a[:5]), "refine_scale_"),
    (lambda p: files.edit_array(p, "refine_scale_", lambda a: a.astype(np.float64)),
     "refine_scale_ must be a float32"),
    (lambda p: files.edit_array(p, "refine_rows_", lambda a: a[:10]), "refine_rows_ has"),
    (lambda p: files.edit_array(p, "refine_rows_", lambda a: a.astype(np.float16)),
     "refine_rows_ has"),
    (lambda p: files.edit_header(p, lambda h: h["attributes"].__setitem__(
        "refine_dtype_", "float32")), "refine_dtype_='float32'"),
    (lambda p: files.edit_header(p, lambda h: h["attributes"].__setitem__(
        "refine_dtype_", "int4")), "refine_dtype_ 'int4'"),
    (lambda p: files.edit_header(p, lambda h: h["attributes"].__setitem__(
        "refine_dtype_", "float16")), "refine_offset_"),
    (lambda p: files.edit_header(p, lambda h: h["attributes"].__setitem__(
        "refine_offset_", None)), "refine_offset_"),
])
def test_inconsistent_tiers_are_refused_at_load(tmp_path, edit, match):
    path = _saved_int8(tmp_path)
    edit(path)
    with pytest.raises(IndexFormatError, match=match):
        pqsk.load(path)


def test_float16_tier_with_infinity_is_refused_at_load(tmp_path):
    nn = FACTORIES["pq"](refine_dtype="float16").fit(X)
    nn.save(tmp_path / "i")
    files.edit_array(tmp_path / "i", "refine_rows_", lambda a: a.__setitem__((3, 3), np.inf))
    with pytest.raises(IndexFormatError, match="NaN or infinity"):
        pqsk.load(tmp_path / "i")


@pytest.mark.parametrize("key", sorted(FACTORIES))
@pytest.mark.parametrize("rd", ["float32", *TIERS])
def test_set_refine_gives_the_fresh_fits_tier(key, rd, tmp_path):
    fresh = FACTORIES[key](refine_dtype=rd).fit(X)
    bare = FACTORIES[key](refine_factor=0).fit(X)
    bare.set_params(refine_factor=10, refine_dtype=rd).set_refine(X)
    assert bare.refine_dtype_ == rd
    if rd == "float32":
        assert_array_equal(np.asarray(bare.vectors_), X)
        assert bare.refine_rows_ is None
    else:
        assert bare.vectors_ is None
        assert_array_equal(np.asarray(bare.refine_rows_), np.asarray(fresh.refine_rows_))
    a, b = bare.kneighbors(Q), fresh.kneighbors(Q)
    assert_array_equal(a[0], b[0])
    assert_array_equal(a[1], b[1])
    # From a memmap, and switching the tier of an index that has one.
    np.save(tmp_path / "X.npy", X)
    Xm = np.load(tmp_path / "X.npy", mmap_mode="r")
    other = "int8" if rd != "int8" else "float16"
    fresh.set_params(refine_dtype=other).set_refine(Xm)
    assert fresh.refine_dtype_ == other and fresh.vectors_ is None
    true = true_neighbors(X.astype(np.float64), Q.astype(np.float64), 10)
    assert recall(fresh.kneighbors(Q, return_distance=False), true) > 0.85


@pytest.mark.parametrize("rd", TIERS)
def test_set_refine_errors_change_nothing(rd):
    nn = FACTORIES["ivf"](refine_dtype=rd).fit(X)
    before = dict(vars(nn))
    ind = nn.kneighbors(Q, return_distance=False)
    bad_nan = X.copy()
    bad_nan[7, 3] = np.nan
    for bad, err, match in [(X[:100], ValueError, "2000 indexed rows"),
                            (bad_nan, ValueError, "NaN"),
                            (X[:, :5], ValueError, "features")]:
        with pytest.raises(err, match=match):
            nn.set_refine(bad)
        assert vars(nn).keys() == before.keys()
        assert all(vars(nn)[k] is v for k, v in before.items())
    if rd == "float16":
        with pytest.raises(ValueError, match="65504"):
            nn.set_refine(X * 1e4)
    assert all(vars(nn)[k] is v for k, v in before.items())
    assert_array_equal(nn.kneighbors(Q, return_distance=False), ind)
    with pytest.raises(InvalidParameterError, match="refine_dtype"):
        nn.set_params(refine_dtype="int4").set_refine(X)


def test_refusals():
    with pytest.raises(InvalidParameterError, match="refine_dtype"):
        PQNeighbors(refine_dtype="bfloat16").fit(X)
    nn = FACTORIES["ivf"](refine_dtype="int8").fit(X)
    nn.set_params(refine_dtype="float16")
    with pytest.raises(ValueError, match="refine_dtype='float16' was set after fit.*"
                                         "set_refine"):
        nn.kneighbors(Q)
    nn.set_params(refine_dtype="int8")
    before = dict(vars(nn))
    # NaN / infinity: refused by fit's validation, the index unchanged.
    for v in [np.nan, np.inf]:
        bad = X.copy()
        bad[5, 5] = v
        with pytest.raises(ValueError, match="NaN|infinity"):
            nn.fit(bad)
        assert all(vars(nn)[k] is v for k, v in before.items())
    # An int8 range float32 cannot hold; a float16 value beyond 65504.
    wide = X.astype(np.float64)
    wide[0, 2], wide[1, 2] = -1e39, 1e39
    with pytest.raises(ValueError, match="int8.*feature 2.*overflows float32"):
        nn.fit(wide)
    assert all(vars(nn)[k] is v for k, v in before.items())
    with pytest.raises(ValueError, match="float16.*feature 2"):
        clone(nn).set_params(refine_dtype="float16").fit(wide)
    # float16: a partial_fit beyond +-65504 changes nothing (HNSW with segments
    # too: refused before its first piece is added).
    for key in sorted(FACTORIES):
        extra = {"segment_size": 1024} if key == "hnsw" else {}
        f16 = FACTORIES[key](refine_dtype="float16", **extra).fit(X[:1000])
        state = dict(vars(f16))
        big = np.concatenate([X[:1500], X[:10] * 1e5])
        with pytest.raises(ValueError, match="float16.*65504"):
            f16.partial_fit(big)
        assert all(vars(f16)[k] is v for k, v in state.items()) and vars(f16).keys() == \
            state.keys()
    # refit_codebooks and tune_search need X when the raw rows are not kept.
    with pytest.raises(ValueError, match="pass X"):
        nn.refit_codebooks(X[:500])
    nn.refit_codebooks(X[:500], X)
    with pytest.raises(ValueError, match="pass X"):
        pqsk.tune_search(nn, X[:200])
