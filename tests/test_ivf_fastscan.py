"""IVF lists scanned with the 4-bit fast-scan kernels (issue 12, item 1).

With n_codewords=16 a sealed IVF segment stores its codes packed list by
list in fast-scan blocks (``packed``, ``list_blocks``); the search quantizes
each probed list's float table and scans the list's blocks with the block
kernel ``_fastscan`` selected, re-checking the survivors with the float
table.  What must hold:

* the layout: each list on a block boundary, padding codes 0, unpacked
  codes (``_segment_codes``) equal to the encoded residuals;
* the kernel: with the exact margin, ids *and* distances equal to the
  unpacked (float ADC) scan of the same entries, for empty lists and lists
  of 1/31/32/33/64/65 entries, growing part and tombstones included, and
  on every instruction set; with the estimators' margin, the exact oracle
  ``_naive.ivf_search_entries`` but for near ties, distances exact;
* the estimators' estimate mode (packed entries ranked by their quantized
  estimates in a bounded reservoir): the k best estimates are the first k
  of the estimates of every entry, whatever k, n_probe, instruction set
  and tombstones; with exhaustive settings and re-ranking, the exact
  neighbours;
* persistence (mmap), load checks, old (unpacked) files, appends,
  removal, compaction and codebook refits.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import pqsk
from pqsk import IVFPQNeighbors, _fastscan, _lists, _naive, _partition, _quantizer, _scorers
from pqsk._segments import Segment

from index_files import edit_array, read_header

pytestmark = pytest.mark.filterwarnings("ignore:.*training samples for n_lists")

ISAS = _fastscan.available_isas()
INT64_MAX = np.iinfo(np.int64).max


@pytest.fixture(params=["scalar", "avx2", "avx512bw", "neon"])
def isa(request):
    if request.param not in ISAS:
        pytest.skip(f"this CPU cannot run the {request.param} kernel")
    before = _fastscan.isa()
    _fastscan.set_isa(request.param)
    yield request.param
    _fastscan.set_isa(before)


def _blobs(n, d=20, seed=0, dtype=np.float32):
    r = np.random.RandomState(seed)
    centers = r.randn(30, d) * 4
    return (centers[r.randint(0, 30, n)] + r.randn(n, d)).astype(dtype)


X = _blobs(6000)
Q = _blobs(60, seed=3)


def _ivf(**kw):
    params = dict(n_lists=24, n_probe=4, n_subspaces=5, n_codewords=16, random_state=0,
                  n_jobs=1, segment_size=1024, refine_factor=0)
    params.update(kw)
    return IVFPQNeighbors(10, **params)


def _entries(nn):
    """(lists, codes, ids) of every stored entry, segments then growing part."""
    m = nn.codebooks_.shape[0]
    lists = np.concatenate([_lists.segment_lists(s, nn.n_lists_) for s in nn.segments_]
                           + [nn.growing_lists_])
    codes = np.concatenate([_lists.segment_codes(s, m) for s in nn.segments_]
                           + [nn.growing_codes_])
    ids = np.concatenate([s["ids"] for s in nn.segments_] + [nn.growing_ids_])
    return lists, codes, ids.astype(np.int64)


def _prepared(nn, Q):
    Qp = np.asarray(Q, dtype=nn._fit_dtype_)
    if nn.effective_metric_ == "cosine":
        Qp = Qp / np.linalg.norm(Qp, axis=1, keepdims=True)
    return Qp


def _check_against_oracle(nn, Q, k, n_probe):
    """The index's ADC candidates vs the exact float64 oracle on the
    unpacked entries: ids equal but for near ties, every returned distance
    the exact ADC distance of its id."""
    nn.set_params(n_probe=n_probe)
    Qp = _prepared(nn, Q)
    dist, ind = nn._search(Qp, k, 1)
    lists, codes, ids = _entries(nn)
    ip = nn.effective_metric_ == "dot"
    removed = None if nn.removed_ is None else nn.removed_
    d_ref, i_ref = _naive.ivf_search_entries(
        Qp.astype(np.float64), nn.cluster_centers_.astype(np.float64),
        nn.codebooks_.astype(np.float64), lists, codes, ids, n_probe, k, ip, removed)
    overlap = np.mean([np.intersect1d(a[a != INT64_MAX], b[b != INT64_MAX]).size
                       / max(1, np.count_nonzero(b != INT64_MAX))
                       for a, b in zip(ind, i_ref)])
    assert overlap >= 0.99, overlap
    assert_array_equal(ind == INT64_MAX, i_ref == INT64_MAX)
    # Returned distances: the exact ADC distance of the returned id.
    where = {int(i): r for r, i in enumerate(ids)}
    X_hat = (nn.cluster_centers_.astype(np.float64)[lists]
             + _naive.decode(codes, nn.codebooks_.astype(np.float64)))
    got = ind != INT64_MAX
    rows = np.array([where[int(i)] for i in ind[got]])
    qrows = np.nonzero(got)[0]
    exact = (-(X_hat[rows] * Qp[qrows]).sum(1) if ip
             else ((X_hat[rows] - Qp[qrows]) ** 2).sum(1))
    scale = max(1.0, float(np.abs(exact).max()))
    assert_allclose(dist[got], exact, rtol=1e-4, atol=1e-4 * scale)
    assert np.all(np.diff(dist, axis=1)[np.isfinite(np.diff(dist, axis=1))] >= 0)
    if removed is not None:
        assert not removed[ind[got]].any()
    return dist, ind


# -- estimate mode -----------------------------------------------------------------
@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_estimate_reservoir_keeps_the_best_estimates(isa, metric):
    """The reservoir (selections, threshold) keeps what a sort of every
    entry's estimate keeps: the same k smallest estimates, and each
    returned id with its own estimate (ties may go to either id)."""
    nn = _ivf(metric=metric).fit(X[:3000])
    nn.remove(np.arange(0, 3000, 7))
    Qp = _prepared(nn, Q[:20])
    lists, _, ids = _entries(nn)
    live = np.bincount(lists[~nn.removed_[ids]], minlength=nn.n_lists_)
    coarse = _partition.coarse_terms(Qp, nn.cluster_centers_, metric == "dot")
    for n_probe in (1, 3, 24):
        nn.set_params(n_probe=n_probe)
        # Every entry of the probed lists (no query has fewer: no list
        # beyond n_probe is scanned), then smaller k.
        n_all = int(live[np.argsort(coarse, axis=1)[:, :n_probe]].sum(axis=1).min())
        d_all, i_all = nn._search(Qp, n_all, 1, ranking_only=True)
        for kn in sorted({min(v, n_all) for v in (1, 5, 37, max(1, n_all // 2), n_all)}):
            d, i = nn._search(Qp, kn, 1, ranking_only=True)
            assert_array_equal(d, d_all[:, :kn])
            for q in range(len(Qp)):
                est = dict(zip(i_all[q].tolist(), d_all[q].tolist()))
                got = i[q][i[q] != INT64_MAX]
                assert len(set(got.tolist())) == got.size
                assert all(est[j] == dq for j, dq in zip(got.tolist(), d[q].tolist()))
                assert not nn.removed_[got].any()


@pytest.mark.parametrize("spread", [2, 40, 10**6])
def test_reservoir_keeps_exactly_the_smallest_pairs(spread):
    """The reservoir (appends under a threshold, a branchless quickselect of
    the keys when full, stable compactions, a quicksort at the end) against
    a sort of every (estimate, handle) pair: handles arriving in increasing
    order as the scans offer them, estimates drawn from few values (many
    ties, which go to the earlier handle) in random, ascending and
    descending order, negative and zero estimates (-0.0 equal to 0.0),
    reservoir sizes around the kept count, streams shorter and longer than
    the reservoir."""
    from pqsk import _ivf as kernels

    rng = np.random.RandomState(spread)
    for n in (1, 15, 16, 17, 80, 300, 2000):
        h = np.sort(rng.permutation(3 * n)[:n]).astype(np.int64)
        for order in ("random", "ascending", "descending"):
            d = (rng.randint(0, spread, size=n) - spread // 2).astype(np.float64)
            d[d == 0] = rng.choice([0.0, -0.0], size=int(np.sum(d == 0)))
            if order != "random":
                d = np.sort(d)
                if order == "descending":
                    d = d[::-1].copy()
            for keep in (1, 2, 7, 40, 100):
                for cap in (2 * keep, 2 * keep + 3, 5 * keep):
                    got_d, got_h = kernels._reservoir_keep(d, h, keep, cap)
                    ref = np.lexsort((h, d))[:keep]
                    assert_array_equal(got_d, d[ref] + 0.0)
                    assert_array_equal(got_h, h[ref])
    with pytest.raises(ValueError):
        kernels._reservoir_keep(np.zeros(3), np.arange(3, dtype=np.int64), 4, 7)


def test_probes_are_the_nearest_lists_in_order():
    """Probe selection (the same reservoir, over every list's coarse term)
    scans the n_probe nearest lists, ties to the smaller list: with one
    list per probe the candidates come from exactly those lists."""
    nn = _ivf(metric="euclidean").fit(X[:3000])
    Qp = _prepared(nn, Q[:30])
    lists, _, ids = _entries(nn)
    coarse = _partition.coarse_terms(Qp, nn.cluster_centers_, False)
    sizes = np.bincount(lists, minlength=nn.n_lists_)
    for n_probe in (1, 2, 5, 24):
        nn.set_params(n_probe=n_probe)
        for q in range(len(Qp)):
            want = np.lexsort((np.arange(coarse.shape[1]), coarse[q]))[:n_probe]
            # as many candidates as the probed lists hold: no list beyond
            _, i = nn._search(Qp[q:q + 1], int(sizes[want].sum()), 1, ranking_only=True)
            assert np.sort(i[0]).tolist() == np.sort(ids[np.isin(lists, want)]).tolist()


@pytest.mark.parametrize("n_codewords", [16, 256])
def test_cosine_anisotropic_scores_inner_products_on_lists_probed_by_l2(n_codewords):
    """metric="cosine" with anisotropic codes: the lists probed are the
    n_probe nearest by ||q - c|| and their entries are scored 1 - <q,
    x_hat> (the inner product, one table per query), not ||q - x_hat||^2
    / 2; exhaustive re-ranking is still brute force."""
    from sklearn.neighbors import NearestNeighbors

    nn = _ivf(metric="cosine", anisotropic_threshold=0.2, n_codewords=n_codewords,
              n_subspaces=4, refine_factor=1).fit(X[:3000]).set_params(refine_factor=0)
    assert nn._ip_tables and nn._list_terms.shape[0] == 0
    Qp = _prepared(nn, Q[:25])
    lists, codes, ids = _entries(nn)
    where = {int(i): r for r, i in enumerate(ids)}
    X_hat = (nn.cluster_centers_.astype(np.float64)[lists]
             + _naive.decode(codes, nn.codebooks_.astype(np.float64)))
    C = nn.cluster_centers_.astype(np.float64)
    l2 = ((Qp.astype(np.float64)[:, None, :] - C[None]) ** 2).sum(-1)
    sizes = np.bincount(lists, minlength=nn.n_lists_)
    for n_probe in (1, 3):
        nn.set_params(n_probe=n_probe)
        for q in range(len(Qp)):
            want = np.lexsort((np.arange(nn.n_lists_), l2[q]))[:n_probe]
            kn = int(sizes[want].sum())
            d, i = nn.kneighbors(Q[q:q + 1], n_neighbors=kn)
            assert np.sort(i[0]).tolist() == np.sort(ids[np.isin(lists, want)]).tolist()
            rows = np.array([where[int(j)] for j in i[0]])
            expected = 1 - X_hat[rows] @ Qp[q].astype(np.float64)
            assert_allclose(d[0], expected, rtol=1e-4, atol=1e-5)
    nn.set_params(n_probe=24, refine_factor=400)
    d, i = nn.kneighbors(Q, n_neighbors=8)
    ref = NearestNeighbors(n_neighbors=8, metric="cosine").fit(X[:3000])
    d_ref, i_ref = ref.kneighbors(Q)
    assert_array_equal(i, i_ref)
    assert_allclose(d, d_ref, rtol=1e-4, atol=1e-5)


def test_estimate_mode_with_exhaustive_reranking_is_exact():
    """n_probe = n_lists and every live entry re-ranked: brute force."""
    from sklearn.neighbors import NearestNeighbors

    nn = _ivf(refine_factor=400, metric="cosine").fit(X[:3000])
    nn.remove(np.arange(5, 3000, 11))
    live = np.setdiff1d(np.arange(3000), np.arange(5, 3000, 11))
    nn.set_params(n_probe=24)
    d, i = nn.kneighbors(Q, n_neighbors=8)
    ref = NearestNeighbors(n_neighbors=8, metric="cosine").fit(X[live])
    d_ref, i_ref = ref.kneighbors(Q)
    assert_array_equal(i, live[i_ref])
    assert_allclose(d, d_ref, rtol=1e-4, atol=1e-5)


# -- layout ------------------------------------------------------------------
def test_pack_lists_layout_round_trip():
    r = np.random.RandomState(0)
    sizes = [0, 1, 31, 32, 33, 0, 64, 65, 0]
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    for m in (1, 4, 5, 16):
        codes = r.randint(0, 16, (offsets[-1], m)).astype(np.uint8)
        packed, blocks = _scorers.pack_lists4(codes, offsets)
        assert_array_equal(np.diff(blocks), [0, 1, 1, 1, 2, 0, 2, 3, 0])
        assert packed.shape == (blocks[-1], (m + 1) // 2, 32) and packed.dtype == np.uint8
        assert_array_equal(_scorers.unpack_lists4(packed, offsets, blocks, m), codes)
        # Each list on a block boundary, in the flat fast-scan layout.
        for l, n_l in enumerate(sizes):
            flat = _scorers.unpack_codes4(packed[blocks[l]:blocks[l + 1]], 32 * (
                blocks[l + 1] - blocks[l]), m)
            assert_array_equal(flat[:n_l], codes[offsets[l]:offsets[l + 1]])
            assert not flat[n_l:].any()


def test_segments_store_packed_codes():
    nn = _ivf().fit(X)
    m = 5
    assert len(nn.segments_) == 6
    for seg in nn.segments_:
        assert seg.names == ["ids", "list_blocks", "list_offsets", "packed"]
        n_l = np.diff(seg["list_offsets"])
        assert_array_equal(np.diff(seg["list_blocks"]), -(-n_l // 32))
        assert seg["packed"].shape == (seg["list_blocks"][-1], 3, 32)
    # The unpacked codes are the encoded residuals of the stored rows.
    lists, codes, ids = _entries(nn)
    res = X[ids] - nn.cluster_centers_[lists]
    ref = _quantizer.encode(res, nn.codebooks_)
    assert_array_equal(codes, ref)
    # codes_ (assembled) unpacks too.
    assert nn.codes_.shape == (6000, m) and nn.codes_.dtype == np.uint8
    # An 8-bit index keeps plain codes.
    big = _ivf(n_codewords=256).fit(X)
    assert big.segments_[0].names == ["codes", "ids", "list_offsets"]


def test_memory_per_vector():
    nn = _ivf(n_subspaces=10, n_lists=16, segment_size=2**20).fit(_blobs(20000))
    mem = nn.memory_usage_
    per = (mem["codes"] + mem["ids"]) / 20000
    # m / 2 bytes of codes + 4 of id, and at most 31 padding vectors a list.
    assert 10 / 2 + 4 <= per <= 10 / 2 + 4 + 16 * 31 * 5 / 20000 + 1e-9


# -- the kernel against the unpacked scan ---------------------------------------
def _random_ivf(m, sizes, d_sub=2, seed=0, dtype=np.float32):
    r = np.random.RandomState(seed)
    n_lists = len(sizes)
    D = m * d_sub
    cb = r.randn(m, 16, d_sub).astype(dtype)
    centroids = (3 * r.randn(n_lists, D)).astype(dtype)
    offsets = np.zeros(n_lists + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    codes = r.randint(0, 16, (offsets[-1], m)).astype(np.uint8)
    return cb, centroids, offsets, codes


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("metric", ["l2", "l2_no_terms", "ip"])
@pytest.mark.parametrize("m", [1, 5, 8])
def test_packed_scan_equals_unpacked_scan(isa, dtype, metric, m):
    """Exact margin: ids and distances of the packed scan are those of
    the unpacked (float ADC) scan of the same entries, bit for bit; lists
    of 0/1/31/32/33/64/65 entries, two segments, growing part, tombstones,
    n_probe from 1 to all lists (and a heap larger than the probed lists)."""
    sizes = [0, 1, 31, 32, 33, 64, 65, 0, 7]
    cb, centroids, offsets, codes = _random_ivf(m, sizes, dtype=dtype)
    n_lists, D = centroids.shape
    r = np.random.RandomState(1)
    n = int(offsets[-1])
    ids = r.permutation(n + 40).astype(np.int32)
    seg_ids, g_ids = ids[:n], ids[n:]
    # A second segment: the same lists, shuffled within.
    cb2, _, offsets2, codes2 = _random_ivf(m, sizes[::-1], seed=5, dtype=dtype)
    ids2 = np.arange(n + 40, n + 40 + int(offsets2[-1]), dtype=np.int32)
    g_codes = r.randint(0, 16, (40, m)).astype(np.uint8)
    g_lists = r.randint(0, n_lists, 40).astype(np.int32)
    deleted = np.zeros(ids2[-1] + 1, np.uint8)
    deleted[r.choice(ids2[-1] + 1, 30, replace=False)] = 1
    ip = metric == "ip"
    terms = (np.empty((0, m, 16), dtype) if metric != "l2"
             else _partition.list_terms(centroids, cb))
    Qr = (3 * r.randn(25, D)).astype(dtype)
    coarse = _partition.coarse_terms(Qr, centroids, ip)
    plain = [(codes, seg_ids, offsets), (codes2, ids2, offsets2)]
    packed = [(*_scorers.pack_lists4(c, o), i, o) for c, i, o in plain]
    packed = [(p, i, o, b) for p, b, i, o in packed]
    for n_probe in (1, 3, n_lists):
        for k in (1, 10, 500):
            for dead in (None, deleted):
                args = dict(inner_product=ip, n_threads=2, centroids=centroids,
                            growing=(g_codes, g_ids, g_lists), deleted=dead)
                ref = _scorers.ivf_search(Qr, coarse, cb, terms, plain, k, n_probe, **args)
                got = _scorers.ivf_search(Qr, coarse, cb, terms, packed, k, n_probe,
                                            **args)
                assert_array_equal(got[1], ref[1])
                assert_array_equal(got[0], ref[0])
                # Mixed: one packed segment, one plain.
                mixed = _scorers.ivf_search(Qr, coarse, cb, terms, [packed[0], plain[1]],
                                              k, n_probe, **args)
                assert_array_equal(mixed[1], ref[1])
                # The estimators' margin: the same but for near ties.
                fast = _scorers.ivf_search(Qr, coarse, cb, terms, packed, k, n_probe,
                                             fastscan_margin=_scorers.FASTSCAN_MARGIN,
                                             **args)
                assert np.mean(fast[1] == ref[1]) >= 0.99


def test_packed_segment_arrays_are_checked():
    cb, centroids, offsets, codes = _random_ivf(4, [3, 40, 0])
    packed, blocks = _scorers.pack_lists4(codes, offsets)
    ids = np.arange(codes.shape[0], dtype=np.int32)
    Qr = np.zeros((1, 8), np.float32)
    coarse = _partition.coarse_terms(Qr, centroids, True)
    bad = blocks.copy()
    bad[1:] += 1
    for seg in [(packed, ids, offsets, bad), (packed[:-1], ids, offsets, blocks),
                (np.ascontiguousarray(packed[:, :1]), ids, offsets, blocks)]:
        with pytest.raises(ValueError, match="packed segment"):
            _scorers.ivf_search(Qr, coarse, cb, np.empty((0, 4, 16), np.float32), [seg], 3,
                                  1, True)


# -- the estimator against the exact oracle ---------------------------------------
@pytest.mark.parametrize("metric", ["euclidean", "cosine", "dot"])
def test_ivf_matches_the_exact_oracle(metric, monkeypatch):
    monkeypatch.setattr(_lists, "GROWING_MIN", 100)
    nn = _ivf(metric=metric).fit(X[:4500])
    nn.partial_fit(X[4500:4600])  # growing part
    assert nn.growing_codes_.shape[0] == 100 and len(nn.segments_) == 5
    nn.remove(np.arange(0, 4600, 5))  # tombstones everywhere
    assert nn._n_dead() > 0
    for n_probe, k in [(1, 10), (4, 10), (24, 50), (2, 300)]:
        _check_against_oracle(nn, Q, k, n_probe)
    # kneighbors agrees with the candidates (refine 0).
    d, i = nn.set_params(n_probe=4).kneighbors(Q)
    assert not np.isin(i, np.arange(0, 4600, 5)).any()


@pytest.mark.parametrize("metric", ["euclidean", "dot"])
def test_scalar_and_simd_kernels_agree(metric):
    if len(ISAS) < 2:
        pytest.skip("this CPU has only the scalar kernel")
    nn = _ivf(metric=metric).fit(X)
    nn.remove(np.arange(0, 6000, 7))
    before = _fastscan.isa()
    out = {}
    try:
        for name in ISAS:
            _fastscan.set_isa(name)
            out[name] = nn.set_params(n_probe=6).kneighbors(Q, n_neighbors=20)
    finally:
        _fastscan.set_isa(before)
    for name in ISAS[1:]:
        assert_array_equal(out[name][1], out["scalar"][1])
        assert_array_equal(out[name][0], out["scalar"][0])


def test_refine_returns_exact_distances():
    nn = _ivf(refine_factor=5).fit(X)
    d, i = nn.set_params(n_probe=6).kneighbors(Q, n_neighbors=5)
    exact = np.sqrt(((X[i] - Q[:, None, :]) ** 2).sum(-1))
    assert_allclose(d, exact, rtol=1e-4, atol=1e-4)


# -- persistence ------------------------------------------------------------------
def test_save_load_mmap(tmp_path):
    nn = _ivf().fit(X[:3000])
    nn.partial_fit(X[3000:3100])
    nn.remove([5, 1500, 3050])
    path = tmp_path / "index"
    nn.save(path)
    loaded = pqsk.load(path, mmap_mode="r")
    assert isinstance(loaded.segments_[0]["packed"], np.memmap)
    for a, b in zip(loaded.kneighbors(Q), nn.kneighbors(Q)):
        assert_array_equal(a, b)
    loaded.partial_fit(X[3100:3200])
    loaded.compact()
    _check_against_oracle(loaded, Q, 10, 4)


def _corrupt(path, name, fn):
    header = read_header(path)
    key = next(k for k in header["arrays"] if k.startswith("segments_.0.")
               and k.endswith("." + name))
    edit_array(path, key, fn)


@pytest.mark.parametrize("damage, match", [
    (("packed", lambda a: a.__setitem__((-1, 0, 31), 7)), "padding"),    # a padding vector
    (("packed", lambda a: a.__setitem__((0, 2, 0), 0x70)), "padding"),   # odd sub-space 5
    (("packed", lambda a: a[:-1].copy()), "packed"),
    (("list_blocks", lambda a: a + np.arange(a.size)), "list_blocks"),
    (("list_blocks", lambda a: a.astype(np.int32)), "list_blocks"),
])
def test_damaged_packed_segments_are_refused(tmp_path, damage, match):
    nn = _ivf().fit(X[:1500])
    path = tmp_path / "index"
    nn.save(path)
    _corrupt(path, *damage)
    with pytest.raises(pqsk.IndexFormatError, match=match):
        pqsk.load(path)


def test_old_unpacked_files_still_load(tmp_path):
    """An index saved before segments were packed (plain 4-bit codes)
    loads, answers as the packed one, and packs what it seals next."""
    nn = _ivf().fit(X[:3000])
    m = nn.codebooks_.shape[0]
    old = _ivf().fit(X[:3000])
    old.segments_ = tuple(Segment({"codes": np.ascontiguousarray(_lists.segment_codes(s, m)),
                                   "ids": s["ids"], "list_offsets": s["list_offsets"]},
                                  s.meta) for s in old.segments_)
    path = tmp_path / "old"
    old.save(path)
    loaded = pqsk.load(path, mmap_mode="r")
    assert loaded.segments_[0].names == ["codes", "ids", "list_offsets"]
    for a, b in zip(loaded.set_params(n_probe=5).kneighbors(Q),
                    nn.set_params(n_probe=5).kneighbors(Q)):
        assert_array_equal(a, b)
    loaded.partial_fit(X[3000:4200])
    assert any(_lists.is_packed(s) for s in loaded.segments_)
    _check_against_oracle(loaded, Q, 10, 4)
    loaded.remove(np.arange(0, 3000, 2))
    loaded.compact()
    assert all(_lists.is_packed(s) for s in loaded.segments_)
    _check_against_oracle(loaded, Q, 10, 4)


# -- updates ----------------------------------------------------------------------
def test_partial_fit_remove_compact_refit(monkeypatch):
    monkeypatch.setattr(_lists, "GROWING_MIN", 100)
    nn = _ivf(metric="cosine", refine_factor=0).fit(X[:2000])
    for s in range(2000, 5000, 250):
        nn.partial_fit(X[s:s + 250])
        nn.remove(np.arange(s - 2000, s - 2000 + 40))
    assert all(_lists.is_packed(s) for s in nn.segments_)
    _check_against_oracle(nn, Q, 10, 4)
    nn.remove(np.setdiff1d(np.arange(3000, 4000), np.flatnonzero(nn.removed_)))
    # (segments past the removal share were compacted)
    _check_against_oracle(nn, Q, 10, 4)
    nn.compact()
    assert nn._n_dead() == 0 and nn.growing_codes_.shape[0] == 0
    _check_against_oracle(nn, Q, 10, 4)
    # Reconstruction reads the packed codes.
    lists, codes, ids = _entries(nn)
    X_hat = nn._reconstruct()
    assert_allclose(X_hat[ids], nn.cluster_centers_[lists]
                    + _quantizer.decode(codes, nn.codebooks_), rtol=1e-6)
    # A codebook refit re-encodes into packed segments.
    drift = X[:5000] * 1.1 + 0.5
    nn.refit_codebooks(drift[:3000], drift)
    assert all(_lists.is_packed(s) for s in nn.segments_)
    _check_against_oracle(nn, Q, 10, 4)
