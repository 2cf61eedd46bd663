"""4-bit fast-scan (n_codewords=16): packing, and the scalar and SIMD scan
kernels against the float ADC search on the unpacked codes (same ids,
same distances)."""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from pqsk import _fastscan, _naive, _quantizer, _scorers

ISAS = _fastscan.available_isas()
ALL_ISAS = ["scalar", "avx2", "avx512bw", "neon"]
INT64_MAX = np.iinfo(np.int64).max


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Each kernel in turn (skipped when the CPU lacks it); the import-time
    choice is restored after the test."""
    if request.param not in ISAS:
        pytest.skip(f"this CPU cannot run the {request.param} kernel")
    before = _fastscan.isa()
    _fastscan.set_isa(request.param)
    yield request.param
    _fastscan.set_isa(before)


def _oracle(Q, cb, codes, k, inner_product):
    """Float ADC top-k on the plain codes (the 8-bit kernel), checked once
    against the naive NumPy scan."""
    return _scorers.adc_search(Q, cb, codes, k, inner_product)


def _check_same(Q, cb, codes, k, inner_product, n_threads=1):
    n, m = codes.shape
    packed = _scorers.pack_codes4(codes)
    d_ref, i_ref = _oracle(Q, cb, codes, k, inner_product)
    d, i = _scorers.fastscan_search(Q, cb, packed, n, k, inner_product, n_threads)
    assert d.dtype == cb.dtype and i.dtype == np.int64 and d.shape == (Q.shape[0], k)
    assert_array_equal(i, i_ref)
    assert_array_equal(d, d_ref)  # same additions in the same order: bit-identical
    kk = min(n, k)
    assert np.all(i[:, kk:] == INT64_MAX) and np.all(np.isposinf(d[:, kk:]))
    return d, i


# -- packing -------------------------------------------------------------------

@pytest.mark.parametrize("m", [1, 2, 7, 8, 33])
@pytest.mark.parametrize("n", [0, 1, 31, 32, 33, 100])
def test_pack_unpack_round_trip(m, n):
    rng = np.random.RandomState(m * 1000 + n)
    codes = rng.randint(0, 16, size=(n, m)).astype(np.uint8)
    packed = _scorers.pack_codes4(codes)
    m2 = m + m % 2
    assert packed.dtype == np.uint8 and packed.flags.c_contiguous
    assert packed.shape == (-(-n // 32), m2 // 2, 32)
    assert packed.nbytes == -(-n // 32) * 32 * m2 // 2
    back = _scorers.unpack_codes4(packed, n, m)
    assert back.dtype == np.uint8 and back.shape == (n, m)
    assert_array_equal(back, codes)
    if n:
        # The layout itself: byte i of pair p of block b.
        b, p, i = (n - 1) // 32, (m - 1) // 2, (n - 1) % 32
        lo = codes[n - 1, 2 * p]
        hi = codes[n - 1, 2 * p + 1] if 2 * p + 1 < m else 0
        assert packed[b, p, i] == lo | (hi << 4)
        # Padding vectors and the padding sub-space hold code 0.
        flat = _scorers.unpack_codes4(packed, len(packed) * 32, m2)
        assert not flat[n:].any() and not flat[:, m:].any()


def test_pack_refuses_codes_beyond_4_bits():
    with pytest.raises(ValueError, match="4-bit"):
        _scorers.pack_codes4(np.array([[3, 16]], dtype=np.uint8))
    packed = _scorers.pack_codes4(np.zeros((40, 3), np.uint8))
    with pytest.raises(ValueError, match="do not hold"):
        _scorers.unpack_codes4(packed, 70, 3)
    with pytest.raises(ValueError, match="do not hold"):
        _scorers.unpack_codes4(packed, 40, 5)


@pytest.mark.parametrize("m", [1, 2, 3, 8, 25, 257])
@pytest.mark.parametrize("sizes", [[0], [5], [0, 31, 32, 33, 0, 64, 1], [70, 0, 3]])
def test_list_packing_kernels_equal_the_numpy_oracle(m, sizes):
    # The writers' packing (pqsk._fastscan.pack_lists4_into, without the
    # GIL) against pqsk._naive's NumPy layout, list by list.
    rng = np.random.RandomState(m + len(sizes))
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    codes = rng.randint(0, 16, size=(int(offsets[-1]), m)).astype(np.uint8)
    packed, blocks = _scorers.pack_lists4(codes, offsets)
    want_packed, want_blocks = _naive.pack_lists4(codes, offsets)
    assert_array_equal(blocks, want_blocks)
    assert_array_equal(packed, want_packed)
    assert_array_equal(_scorers.unpack_lists4(packed, offsets, blocks, m), codes)
    assert_array_equal(_naive.unpack_lists4(packed, offsets, blocks, m), codes)
    # order: entry j is code row order[j], as if the codes were gathered first.
    order = rng.permutation(codes.shape[0])
    assert_array_equal(_scorers.pack_lists4(codes, offsets, order)[0],
                       _naive.pack_lists4(codes[order], offsets)[0])
    # codes of another integer dtype pack the same
    assert_array_equal(_scorers.pack_lists4(codes.astype(np.int64), offsets)[0], packed)


def test_list_packing_refuses_offsets_and_blocks_that_do_not_fit():
    codes = np.zeros((40, 3), np.uint8)
    packed, blocks = _scorers.pack_lists4(codes, [0, 10, 40])
    with pytest.raises(ValueError, match="do not describe"):
        _scorers.pack_lists4(codes, [0, 10, 41])          # more entries than codes
    with pytest.raises(ValueError, match="do not describe"):
        _scorers.pack_lists4(codes, [0, 30, 10, 40])       # falling offsets
    with pytest.raises(ValueError, match="one row of the codes per code"):
        _scorers.pack_lists4(codes, [0, 10, 40], order=np.arange(39))
    with pytest.raises(ValueError, match="one row of the codes per code"):
        _scorers.pack_lists4(codes, [0, 10, 40], order=np.arange(1, 41))
    with pytest.raises(ValueError, match="do not describe"):
        _scorers.unpack_lists4(packed, np.array([0, 10, 40]), np.array([0, 0, 2]), 3)
    with pytest.raises(ValueError, match="do not describe"):
        _scorers.unpack_lists4(packed, np.array([0, 40, 40]), np.array([0, 1, 2]), 3)
    with pytest.raises(ValueError, match="do not hold"):
        _scorers.unpack_lists4(packed, np.array([0, 10, 40]), blocks, 5)


# -- search: every kernel equals the float ADC search ---------------------------

def test_oracle_is_the_naive_scan():
    rng = np.random.RandomState(1)
    cb = rng.randn(5, 16, 2).astype(np.float64)
    Q = rng.randn(4, 10)
    codes = rng.randint(0, 16, size=(300, 5)).astype(np.uint8)
    d, i = _oracle(Q, cb, codes, 7, False)
    d_ref, i_ref = _naive.adc_scan(_naive.adc_tables(Q, cb), codes, 7)
    assert_array_equal(i, i_ref)
    np.testing.assert_allclose(d, d_ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inner_product", [False, True])
@pytest.mark.parametrize("m", [1, 2, 7, 8, 16, 33])
@pytest.mark.parametrize("n", [3, 31, 32, 33, 1000])
def test_fastscan_equals_float_adc(isa, dtype, inner_product, m, n):
    rng = np.random.RandomState(m * 7919 + n)
    cb = rng.randn(m, 16, 2).astype(dtype)
    Q = rng.randn(6, 2 * m).astype(dtype)
    codes = rng.randint(0, 16, size=(n, m)).astype(np.uint8)
    for k in (1, 5, 40):
        _check_same(Q, cb, codes, k, inner_product)


@pytest.mark.parametrize("inner_product", [False, True])
def test_ties_go_to_the_smaller_id(isa, inner_product):
    """Duplicate codes and integer-valued tables: many exact ties, broken by
    id exactly as the float kernel breaks them."""
    rng = np.random.RandomState(3)
    m = 6
    cb = rng.randint(-2, 3, size=(m, 16, 1)).astype(np.float32)
    Q = rng.randint(-2, 3, size=(5, m)).astype(np.float32)
    distinct = rng.randint(0, 16, size=(7, m)).astype(np.uint8)
    codes = distinct[rng.randint(0, 7, size=2000)]
    for k in (1, 3, 50, 300):
        d, _ = _check_same(Q, cb, codes, k, inner_product)
        assert k == 1 or np.any(d[:, 1:] == d[:, :-1])  # the test does test ties


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_coarse_quantization_never_drops_a_neighbour(isa, dtype):
    """One sub-space with a huge range makes delta large (the uint8 tables of
    the others all ~0): the bound must still keep every true neighbour."""
    rng = np.random.RandomState(5)
    m = 12
    cb = rng.randn(m, 16, 3).astype(dtype)
    cb[4] *= 1000
    cb[7] *= 1e-4
    Q = rng.randn(8, 3 * m).astype(dtype)
    codes = rng.randint(0, 16, size=(3000, m)).astype(np.uint8)
    codes[:, 4] = 3  # the huge sub-space the same for all: order set by the others
    for k in (1, 10, 100):
        for ip in (False, True):
            _check_same(Q, cb, codes, k, ip)


def test_largest_m_uses_the_whole_uint16_range(isa):
    """m = 257 sub-spaces whose codes 15 all quantize to 255: S reaches
    65535 exactly."""
    m = _fastscan.MAX_SUBSPACES
    assert m == 257
    cb = np.tile(np.arange(16, dtype=np.float64)[None, :, None], (m, 1, 1))
    Q = np.zeros((2, m))
    Q[1] = 15
    rng = np.random.RandomState(2)
    codes = rng.randint(0, 16, size=(100, m)).astype(np.uint8)
    codes[:10] = 15
    codes[10:20] = 0
    for k in (1, 15, 100):
        _check_same(Q, cb, codes, k, False)
    with pytest.raises(ValueError, match="at most 257"):
        _scorers.fastscan_search(np.zeros((1, m + 1)), np.zeros((m + 1, 16, 1)),
                                 _scorers.pack_codes4(np.zeros((1, m + 1), np.uint8)),
                                 1, 1)


def test_empty_and_too_few_codes(isa):
    rng = np.random.RandomState(4)
    cb = rng.randn(3, 16, 2).astype(np.float32)
    Q = rng.randn(4, 6).astype(np.float32)
    d, i = _scorers.fastscan_search(Q, cb, _scorers.pack_codes4(np.zeros((0, 3), np.uint8)),
                                    0, 4)
    assert np.all(i == INT64_MAX) and np.all(np.isposinf(d))
    codes = rng.randint(0, 16, size=(2, 3)).astype(np.uint8)
    _check_same(Q, cb, codes, 5, False)
    d, i = _scorers.fastscan_search(Q[:0], cb, _scorers.pack_codes4(codes), 2, 5)
    assert d.shape == (0, 5) and i.shape == (0, 5)


def test_threads_do_not_change_results(isa):
    rng = np.random.RandomState(6)
    cb = rng.randn(8, 16, 2).astype(np.float32)
    Q = rng.randn(37, 16).astype(np.float32)
    codes = rng.randint(0, 16, size=(5000, 8)).astype(np.uint8)
    a = _check_same(Q, cb, codes, 10, False, n_threads=1)
    b = _check_same(Q, cb, codes, 10, False, n_threads=2)
    assert_array_equal(a[0], b[0])
    assert_array_equal(a[1], b[1])


def test_kernels_agree_with_each_other():
    """Same data through every available kernel: identical (dist, idx)."""
    rng = np.random.RandomState(7)
    m, n = 9, 4321
    cb = rng.randn(m, 16, 2).astype(np.float32)
    Q = rng.randn(10, 2 * m).astype(np.float32)
    codes = rng.randint(0, 16, size=(n, m)).astype(np.uint8)
    packed = _scorers.pack_codes4(codes)
    before = _fastscan.isa()
    results = {}
    try:
        for name in ISAS:
            _fastscan.set_isa(name)
            results[name] = _scorers.fastscan_search(Q, cb, packed, n, 20, True)
    finally:
        _fastscan.set_isa(before)
    for name, (d, i) in results.items():
        assert_array_equal(d, results["scalar"][0])
        assert_array_equal(i, results["scalar"][1])


def test_set_isa_refuses_unknown_and_unavailable():
    before = _fastscan.isa()
    assert before == ISAS[-1] or os.environ.get("PQSK_SIMD")
    with pytest.raises(ValueError, match="unknown"):
        _fastscan.set_isa("sse9")
    for name in ALL_ISAS:
        if name not in ISAS:
            with pytest.raises(ValueError, match="cannot run"):
                _fastscan.set_isa(name)
    assert _fastscan.isa() == before


def _run(code, **env):
    full = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out


def test_forced_scalar_path_via_environment():
    """PQSK_SIMD=scalar at import selects the portable kernel (how CI runs
    the path of CPUs without AVX2), with the same results."""
    out = _run("""
        import numpy as np
        from pqsk import _fastscan, _scorers
        assert _fastscan.isa() == "scalar", _fastscan.isa()
        rng = np.random.RandomState(8)
        cb = rng.randn(5, 16, 2).astype(np.float32)
        Q = rng.randn(7, 10).astype(np.float32)
        codes = rng.randint(0, 16, size=(999, 5)).astype(np.uint8)
        d, i = _scorers.fastscan_search(Q, cb, _scorers.pack_codes4(codes), 999, 9)
        d_ref, i_ref = _scorers.adc_search(Q, cb, codes, 9)
        assert (i == i_ref).all() and (d == d_ref).all()
        print("ok")
    """, PQSK_SIMD="scalar")
    assert out.stdout.strip() == "ok"


def test_unusable_environment_choice_warns_and_falls_back():
    out = _run("""
        import warnings
        warnings.simplefilter("always")
        from pqsk import _fastscan
        print(_fastscan.isa())
    """, PQSK_SIMD="sse9")
    assert out.stdout.strip() == ISAS[-1]
    assert "PQSK_SIMD='sse9' ignored" in out.stderr


def test_read_bytes_helper():
    data = np.arange(256, dtype=np.uint8)
    words = data.view(np.uint64)
    expect = 0
    for w in words:
        expect ^= int(w)
    assert _fastscan._read_bytes(data) == expect


# -- PQNeighbors(n_codewords=16): packed storage, fast-scan search --------------

from pqsk import PQNeighbors, load  # noqa: E402

X_PQ = np.random.RandomState(10).randn(1000, 16).astype(np.float32)
Q_PQ = np.random.RandomState(11).randn(25, 16).astype(np.float32)


@pytest.mark.parametrize("metric", ["euclidean", "sqeuclidean", "cosine", "dot"])
@pytest.mark.parametrize("m", [3, 8])
def test_pqneighbors_16_codewords_searches_packed_codes(isa, metric, m):
    X = X_PQ[:, :12] if m == 3 else X_PQ
    Q = Q_PQ[:, :X.shape[1]]
    nn = PQNeighbors(7, n_subspaces=m, n_codewords=16, metric=metric, random_state=0,
                     refine_factor=0).fit(X)
    assert "codes_" not in vars(nn)
    packed = nn.packed_codes_
    assert packed.shape == (32, (m + 1) // 2, 32) and packed.dtype == np.uint8
    codes = nn.codes_
    assert codes.shape == (1000, m) and codes.dtype == np.uint8
    assert_array_equal(codes, _quantizer.encode(nn._prepare(X), nn.codebooks_))
    # kneighbors == the float ADC search over the unpacked codes.
    d_ref, i_ref = _scorers.adc_search(nn._prepare(Q), nn.codebooks_, codes, 7,
                                       metric == "dot")
    d, i = nn.kneighbors(Q)
    assert_array_equal(i, i_ref)
    assert_array_equal(d, nn._finish_distances(d_ref.copy()))
    with pytest.raises(AttributeError, match="read-only"):
        nn.codes_ = codes


def test_pqneighbors_memory_is_half_a_byte_per_code():
    nn = PQNeighbors(5, n_subspaces=8, n_codewords=16, random_state=0,
                     refine_factor=0).fit(X_PQ[:960])
    mem = nn.memory_usage_
    assert mem["codes"] == 960 * 4 and mem["per_vector"] == 4.0  # m / 2 bytes
    wide = PQNeighbors(5, n_subspaces=8, n_codewords=32, random_state=0,
                       refine_factor=0).fit(X_PQ[:960])
    assert "packed_codes_" not in vars(wide) and wide.memory_usage_["per_vector"] == 8.0


def test_pqneighbors_partial_fit_appends_to_the_packed_blocks():
    kw = dict(n_neighbors=6, n_subspaces=4, n_codewords=16, random_state=0)
    ref = PQNeighbors(**kw).fit(X_PQ)
    nn = PQNeighbors(codebooks=ref.codebooks_, **{k: v for k, v in kw.items()
                                                  if k != "random_state"})
    nn.fit(X_PQ[:45])
    for a, b in [(45, 46), (46, 64), (64, 100), (100, 333), (333, 1000)]:
        nn.partial_fit(X_PQ[a:b])
        assert nn.packed_codes_.shape[0] == -(-b // 32)
        assert_array_equal(nn.codes_, ref.codes_[:b])
        nn._check_codes(4, 16)  # padding still 0
    assert_array_equal(nn.packed_codes_, ref.packed_codes_)
    for x, y in zip(nn.kneighbors(Q_PQ), ref.kneighbors(Q_PQ)):
        assert_array_equal(x, y)
    # Spare blocks: a stream of small appends does not copy the index each time.
    assert nn.memory_usage_["reserved"] >= 0


@pytest.mark.parametrize("mmap_mode", [None, "r"])
def test_pqneighbors_packed_save_load(tmp_path, mmap_mode):
    nn = PQNeighbors(5, n_subspaces=3, n_codewords=16, random_state=0,
                     refine_factor=0).fit(X_PQ[:, :12][:777])
    nn.save(tmp_path / "i")
    loaded = load(tmp_path / "i", mmap_mode=mmap_mode)
    if mmap_mode == "r":
        assert isinstance(loaded.packed_codes_, np.memmap)
    assert "codes_" not in vars(loaded)
    for x, y in zip(nn.kneighbors(Q_PQ[:, :12]), loaded.kneighbors(Q_PQ[:, :12])):
        assert_array_equal(x, y)
    loaded.partial_fit(X_PQ[:5, :12])
    nn.partial_fit(X_PQ[:5, :12])
    for x, y in zip(nn.kneighbors(Q_PQ[:, :12]), loaded.kneighbors(Q_PQ[:, :12])):
        assert_array_equal(x, y)


@pytest.mark.parametrize("edit,match", [
    (lambda a: a.__setitem__((-1, 0, 31), 1), "padding"),       # vector past n
    (lambda a: a.__setitem__((0, 1, 0), 0x10), "padding"),      # odd m: 4th sub-space
    (lambda a: a[:-1].copy(), "shape"),                          # a block missing
    (lambda a: a.reshape(a.shape[0], -1).copy(), "shape"),
    (lambda a: a.astype(np.int32), "uint8"),
])
def test_pqneighbors_crafted_packed_codes_are_rejected(tmp_path, edit, match):
    from pqsk import IndexFormatError

    import index_files as files

    nn = PQNeighbors(5, n_subspaces=3, n_codewords=16, random_state=0,
                     refine_factor=0).fit(X_PQ[:, :12][:100])
    nn.save(tmp_path / "i")
    files.edit_array(tmp_path / "i", "packed_codes_", edit)
    with pytest.raises(IndexFormatError, match=match):
        load(tmp_path / "i")


def test_pqneighbors_loads_unpacked_codes_of_earlier_files(tmp_path):
    """Indexes written before packing hold codes_: converted at load (also
    from format 1), out-of-range codes refused."""
    from pqsk import IndexFormatError

    import index_files as files

    nn = PQNeighbors(5, n_subspaces=3, n_codewords=16, random_state=0,
                     refine_factor=0).fit(X_PQ[:, :12][:300])
    path = tmp_path / "i"
    nn.save(path)
    # Rewrite the file as the previous pqsk wrote it: codes_ instead of packed.
    header = files.read_header(path)
    meta = header["arrays"].pop(files.array_name(header, "packed_codes_"))
    header["arrays"]["codes_"] = meta
    del header["attributes"]["packed_codes_"]
    header["attributes"]["codes_"] = {"array": "codes_"}
    files.write_header(path, header)
    files.rewrite_array(path, "codes_", nn.codes_)
    for mmap_mode in (None, "r"):
        loaded = load(path, mmap_mode=mmap_mode)
        assert "codes_" not in vars(loaded)
        assert_array_equal(loaded.packed_codes_, nn.packed_codes_)
        for x, y in zip(nn.kneighbors(Q_PQ[:, :12]), loaded.kneighbors(Q_PQ[:, :12])):
            assert_array_equal(x, y)
    files.edit_array(path, "codes_", lambda a: a.__setitem__((7, 1), 16))
    with pytest.raises(IndexFormatError, match="inconsistent"):
        load(path)
    v1 = tmp_path / "v1"
    files.write_version1(nn, v1)
    assert_array_equal(load(v1).packed_codes_, nn.packed_codes_)


def test_pqneighbors_refit_switches_storage():
    nn = PQNeighbors(3, n_subspaces=4, n_codewords=16, random_state=0,
                     refine_factor=0).fit(X_PQ[:300])
    assert nn._packed
    nn.set_params(n_codewords=32).fit(X_PQ[:300])
    assert "packed_codes_" not in vars(nn) and nn.codes_.shape == (300, 4)
    nn.set_params(n_codewords=16).fit(X_PQ[:300])
    assert "codes_" not in vars(nn) and nn.codes_.shape == (300, 4)


# scikit-learn's checks on a 4-bit PQNeighbors.  Three checks fit on 10 or
# 15 rows, fewer than the 16 codewords (refused by design, as for any
# n_codewords > n_samples); every other check runs.
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

_TOO_FEW_ROWS = "the check fits on fewer rows than n_codewords=16"


@parametrize_with_checks(
    [PQNeighbors(n_neighbors=3, n_subspaces=1, n_codewords=16, random_state=0, refine_factor=0)],
    expected_failed_checks=lambda est: {
        "check_n_features_in_after_fitting": _TOO_FEW_ROWS,
        "check_estimators_nan_inf": _TOO_FEW_ROWS,
        "check_fit2d_1feature": _TOO_FEW_ROWS,
    })
def test_sklearn_checks_on_4bit_pqneighbors(estimator, check):
    check(estimator)


@pytest.mark.parametrize("inner_product", [False, True])
def test_margin_scan_is_exact_float_adc_but_for_near_ties(inner_product):
    """With the estimators' margin (FASTSCAN_MARGIN) fewer codes are
    re-checked; the distances returned are still the exact float ADC of
    the returned codes, every instruction set gives the same result, and
    the ids match the exact top-k but for near ties."""
    rng = np.random.RandomState(3)
    m, n, k = 12, 3000, 40
    cb = rng.randn(m, 16, 2).astype(np.float32)
    codes = rng.randint(0, 16, (n, m)).astype(np.uint8)
    Q = rng.randn(25, 2 * m).astype(np.float32)
    packed = _scorers.pack_codes4(codes)
    exact = _scorers.fastscan_search(Q, cb, packed, n, k, inner_product)
    results = {}
    previous = _fastscan.isa()
    try:
        for name in _fastscan.available_isas():
            _fastscan.set_isa(name)
            results[name] = _scorers.fastscan_search(
                Q, cb, packed, n, k, inner_product, margin=_scorers.FASTSCAN_MARGIN)
    finally:
        _fastscan.set_isa(previous)
    first = next(iter(results.values()))
    for d, i in results.values():
        assert_array_equal(i, first[1])
        assert_array_equal(d, first[0])
    d, i = first
    # Distances: the float ADC of the returned codes (as adc_search adds them).
    ref_d, ref_i = _scorers.adc_search(Q, cb, codes, n, inner_product)
    full = np.empty((Q.shape[0], n), dtype=np.float32)
    np.put_along_axis(full, ref_i, ref_d, 1)
    assert_array_equal(np.take_along_axis(full, i, 1), d)
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(i, exact[1])])
    assert overlap >= 0.99


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_table_quantization_matches_its_definition(dtype):
    """quantize_tables (SSE2 for float32, a loop for float64) against the
    same arithmetic in NumPy, in the table's precision: row minima, one
    step delta = largest row span / 255, round((t - lo) / delta) computed
    as (t - lo) * (1 / delta) + 0.5 truncated, saturated at 255."""
    r = np.random.RandomState(7)
    for m in (1, 3, 25, 64):
        t = (r.randn(m, 16) * r.choice([1e-3, 1.0, 50.0], (m, 1))).astype(dtype)
        t[0, 3] = t[0].min() - 1.0                 # a row with a far outlier
        if m > 2:
            t[2] = 0.5                             # a flat row
        lut, params = _fastscan._quantize_tables(t)
        lo = t.min(axis=1)
        span = float((t.max(axis=1).astype(np.float64) - lo.astype(np.float64)).max())
        delta = span / 255.0 if span > 0 else 1.0
        inv = dtype(1.0 / delta)
        x = (t - lo[:, None]) * inv + dtype(0.5)
        assert x.dtype == dtype
        expected = np.minimum(x, dtype(255)).astype(np.uint8)
        assert_array_equal(lut, expected)
        assert params[0] == pytest.approx(float(lo.astype(np.float64).sum()), rel=1e-12)
        assert params[1] == delta
        # every entry within half a step (plus float rounding) of the exact ratio
        exact = (t.astype(np.float64) - lo[:, None]) / delta
        assert np.all(np.abs(lut - np.minimum(exact, 255)) <= 0.5 + 1e-4)
    flat = np.zeros((4, 16), dtype)
    lut, params = _fastscan._quantize_tables(flat)
    assert not lut.any() and params[1] == 1.0
