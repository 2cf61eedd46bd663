"""The score stage (pqsk._scorers), function by function.

The encode dispatch (plain or anisotropic codes, row chunk by row chunk,
and the IVF assignment + residual codes in one pass) against the codec
and the anisotropic encoder it dispatches to and pqsk._naive; the
exhaustive ADC search against the naive scan; the 4-bit packed layout
(list by list) and the one rule deciding when codes are stored packed;
the exhaustive fast-scan search against the float ADC search.  The IVF
scan is checked against its twin in tests/test_oracles.py and packed
against plain in tests/test_ivf_fastscan.py.
"""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from pqsk import PQNeighbors, _anisotropic, _fastscan, _lists, _naive, _partition, _quantizer
from pqsk import _scorers

rng = np.random.RandomState(11)


def _codebooks(m, k, ds, dtype=np.float32):
    return rng.randn(m, k, ds).astype(dtype)


# -- encode dispatch -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encode_without_threshold_is_the_plain_codec(dtype):
    cb = _codebooks(3, 16, 4, dtype)
    X = rng.randn(150, 10).astype(dtype)  # uneven widths: 4, 3, 3
    cb = _quantizer.zero_padding(cb, 10)
    codes = _scorers.encode(X, cb, n_threads=2)
    assert_array_equal(codes, _quantizer.encode(X, cb))
    assert_array_equal(codes, _naive.encode(X, cb))


def test_encode_with_threshold_is_the_anisotropic_encoder():
    cb = _codebooks(4, 16, 2)
    X = rng.randn(120, 8).astype(np.float32)
    D = X + 0.1 * rng.randn(120, 8).astype(np.float32)
    for directions in (None, D):
        got = _scorers.encode(X, cb, 2, 0.3, directions)
        want = _anisotropic.anisotropic_encode(X, cb, 0.3, directions, n_threads=1)
        assert_array_equal(got, want)
    # The anisotropic codes differ from the plain ones (the loss differs).
    assert not np.array_equal(_scorers.encode(X, cb, 1, 0.3), _scorers.encode(X, cb))


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_encode_rows_chunk_by_chunk_equals_one_encode(threshold, monkeypatch):
    cb = _codebooks(4, 16, 2)
    X = rng.randn(100, 8).astype(np.float32)
    monkeypatch.setattr(_scorers, "rows_per_chunk", lambda row_bytes: 7)
    assert [sl for sl, _ in _scorers.row_chunks(X)][-1] == slice(98, 100)
    assert_array_equal(_scorers.encode_rows(X, cb, 2, threshold),
                       _scorers.encode(X, cb, 1, threshold))


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_assign_encode_is_assign_then_residual_codes(threshold, monkeypatch):
    cb = _codebooks(4, 16, 2)
    X = rng.randn(300, 8).astype(np.float32)
    C = X[:6] + 0.01
    monkeypatch.setattr(_scorers, "rows_per_chunk", lambda row_bytes: 64)
    labels, codes = _scorers.assign_encode(X, C, cb, 2, threshold)
    assert labels.dtype == np.int32 and codes.dtype == np.uint8
    assert_array_equal(labels, _partition.assign(X, C))
    # Anisotropic residual codes take the rows (not the residuals) as directions.
    assert_array_equal(codes, _scorers.encode(X - C[labels], cb, 1, threshold, X))


# -- exhaustive 8-bit ADC search -------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inner_product", [False, True])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_adc_search_matches_oracle(dtype, inner_product, n_threads):
    m, k, ds = 4, 16, 2
    cb = _codebooks(m, k, ds, dtype)
    codes = rng.randint(0, k, size=(500, m)).astype(np.uint8)
    Q = rng.randn(20, m * ds).astype(dtype)
    dist, idx = _scorers.adc_search(Q, cb, codes, 10, inner_product, n_threads)
    d_ref, i_ref = _naive.adc_scan(_naive.adc_tables(Q, cb, inner_product), codes, 10)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert_allclose(dist, d_ref, rtol=rtol, atol=rtol)
    # Ids may only differ where float rounding reorders near-ties.
    same = idx == i_ref
    assert same.mean() > 0.98
    assert_allclose(d_ref[~same], dist[~same], rtol=1e-4, atol=1e-4)


def test_adc_search_pads_empty_slots():
    cb = _codebooks(2, 4, 1)
    codes = rng.randint(0, 4, size=(3, 2)).astype(np.uint8)
    dist, idx = _scorers.adc_search(rng.randn(2, 2).astype(np.float32), cb, codes, 5)
    assert np.all(np.isinf(dist[:, 3:])) and np.all(idx[:, 3:] == np.iinfo(np.int64).max)
    assert_array_equal(np.sort(idx[:, :3], axis=1), [[0, 1, 2]] * 2)


@pytest.mark.parametrize("per_query", [False, True])
@pytest.mark.parametrize("inner_product", [False, True])
def test_adc_search_allowed_scores_only_allowed_entries(per_query, inner_product):
    m, k, ds = 3, 8, 2
    cb = _codebooks(m, k, ds)
    # Two parts: node ids 0..n-1, and nodes standing for ids 1000, 1002, ...
    a = rng.randint(0, k, size=(40, m)).astype(np.uint8)
    b = rng.randint(0, k, size=(30, m)).astype(np.uint8)
    b_ids = 1000 + 2 * np.arange(30)
    nq = 4
    rows_a = (rng.rand(nq if per_query else 1, 40) < 0.7).astype(np.uint8)  # 1: blocked
    rows_b = (rng.rand(nq if per_query else 1, 30) < 0.7).astype(np.uint8)
    Q = rng.randn(nq, m * ds).astype(np.float32)
    dist, ind = _scorers.adc_search_allowed(Q, cb, [(a, None, rows_a), (b, b_ids, rows_b)], 5,
                                            inner_product)
    tables = _naive.adc_tables(Q, cb, inner_product, dtype=np.float32)
    for q in range(nq):
        r = q if per_query else 0
        codes = np.concatenate([a[rows_a[r] == 0], b[rows_b[r] == 0]])
        ids = np.concatenate([np.flatnonzero(rows_a[r] == 0), b_ids[rows_b[r] == 0]])
        d_ref = _naive.adc_distances(tables[q], codes)
        d_ref, i_ref = _naive.top_k(d_ref, ids, 5)
        assert_array_equal(ind[q], i_ref)
        assert_allclose(dist[q], d_ref, rtol=1e-5)


# -- 4-bit codes: when packed, the packed layout, fast-scan ----------------------------

def test_packs4_bounds():
    """Packed 4-bit codes: n_codewords = 16 and at most the kernels'
    MAX_SUBSPACES sub-spaces (uint16 sums of uint8 table entries), or at
    most EXHAUSTIVE_MAX_PACKED for PQNeighbors."""
    top = _fastscan.MAX_SUBSPACES
    assert top * 255 < 2**16 <= (top + 1) * 255
    assert _scorers.EXHAUSTIVE_MAX_PACKED <= top
    for m in (1, 2, 255, 256, 257, 258):
        for k in (8, 16, 17, 256):
            ivf = _scorers.packs4(m, k)
            exhaustive = _scorers.packs4(m, k, exhaustive=True)
            assert ivf == (k == 16 and m <= top)
            assert exhaustive == (k == 16 and m <= _scorers.EXHAUSTIVE_MAX_PACKED)
            # The estimators ask this one rule.
            assert PQNeighbors._packs(m, k) == exhaustive
            assert _lists.packs(m, k) == ivf


def test_pack_lists4_starts_each_list_on_a_block():
    m = 5
    sizes = np.array([0, 1, 31, 32, 33, 70])
    offsets = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=offsets[1:])
    codes = rng.randint(0, 16, size=(int(offsets[-1]), m)).astype(np.uint8)
    packed, blocks = _scorers.pack_lists4(codes, offsets)
    assert_array_equal(np.diff(blocks), [_scorers.n_blocks4(s) for s in sizes])
    assert packed.shape == (blocks[-1], (m + 1) // 2, _scorers.FASTSCAN_BLOCK)
    for lst in range(len(sizes)):
        part = packed[blocks[lst]:blocks[lst + 1]]
        want = codes[offsets[lst]:offsets[lst + 1]]
        assert_array_equal(_scorers.unpack_codes4(part, sizes[lst], m), want)
        assert_array_equal(part, _scorers.pack_codes4(want))
    rows = _scorers.list_rows4(offsets, blocks)
    assert_array_equal(rows // 32, np.repeat(blocks[:-1], sizes)
                       + np.concatenate([np.arange(s) // 32 for s in sizes]))
    assert_array_equal(_scorers.unpack_lists4(packed, offsets, blocks, m), codes)


@pytest.mark.parametrize("inner_product", [False, True])
def test_fastscan_search_without_margin_is_the_adc_search(inner_product):
    m, n = 7, 1000
    cb = _codebooks(m, 16, 2)
    codes = rng.randint(0, 16, size=(n, m)).astype(np.uint8)
    Q = rng.randn(13, 2 * m).astype(np.float32)
    got = _scorers.fastscan_search(Q, cb, _scorers.pack_codes4(codes), n, 9, inner_product,
                                   n_threads=2)
    want = _scorers.adc_search(Q, cb, codes, 9, inner_product)
    assert_array_equal(got[0], want[0])
    assert_array_equal(got[1], want[1])


def test_fastscan_search_refuses_what_the_kernel_cannot_scan():
    with pytest.raises(ValueError, match="n_codewords=16"):
        _scorers.fastscan_search(np.zeros((1, 2)), np.zeros((2, 8, 1)),
                                 _scorers.pack_codes4(np.zeros((1, 2), np.uint8)), 1, 1)


def test_segment_table_is_cached_by_the_identity_of_the_arrays():
    rng = np.random.RandomState(0)
    codes = rng.randint(0, 16, (100, 4)).astype(np.uint8)
    offsets = np.array([0, 30, 100], dtype=np.int64)
    ids = np.arange(100, dtype=np.int32)
    packed, blocks = _scorers.pack_lists4(codes, offsets)
    seg = (packed, ids, offsets, blocks)
    args = (4, 16, 2, np.uint8, np.int32)
    table = _scorers._segment_table([seg], *args)
    assert _scorers._segment_table([seg], *args) is table          # unchanged: reused
    copy = (packed.copy(), ids, offsets, blocks)
    other = _scorers._segment_table([copy], *args)                 # a new array: built
    assert other is not table and other[3][0] == copy[0].ctypes.data
    assert _scorers._segment_table([seg, copy], *args) is not table
    # a segment whose arrays do not match is refused, cached table or not
    bad = (packed, ids, np.array([0, 40, 100], dtype=np.int64), blocks)
    with pytest.raises(ValueError, match="do not match"):
        _scorers._segment_table([bad], *args)
    with pytest.raises(ValueError, match="do not match"):
        _scorers._segment_table([bad], *args)
    # the cache holds no array alive, and a dead array's entry is never hit
    import gc
    import weakref
    ref = weakref.ref(copy[0])
    del copy, other
    gc.collect()
    assert ref() is None
    for _ in range(_scorers._SEGMENT_TABLES_MAX + 5):
        _scorers._segment_table([(packed.copy(), ids, offsets, blocks)], *args)
    assert len(_scorers._SEGMENT_TABLES) <= _scorers._SEGMENT_TABLES_MAX
