"""Cython kernels against their naive NumPy oracles (pqsk._naive)."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from pqsk import _adc, _naive, _quantizer

rng = np.random.RandomState(42)


def _random_codebooks(m, k, ds, dtype):
    return rng.randn(m, k, ds).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("m,k,ds", [(1, 8, 3), (4, 16, 2), (5, 256, 4), (2, 300, 3)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_encode_matches_oracle(dtype, m, k, ds, n_threads):
    cb = _random_codebooks(m, k, ds, dtype)
    X = rng.randn(157, m * ds).astype(dtype)
    codes = _quantizer.encode(X, cb, n_threads)
    assert codes.dtype == (np.uint8 if k <= 256 else np.uint16)
    assert_array_equal(codes, _naive.encode(X, cb))


def test_encode_ties_go_to_smaller_index():
    cb = np.zeros((2, 4, 1), dtype=np.float32)  # all codewords equal
    X = rng.randn(10, 2).astype(np.float32)
    assert_array_equal(_quantizer.encode(X, cb), 0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("inner_product", [False, True])
def test_tables_match_oracle(dtype, inner_product):
    cb = _random_codebooks(4, 32, 3, dtype)
    Q = rng.randn(9, 12).astype(dtype)
    tables = _quantizer.adc_tables(Q, cb, inner_product, n_threads=2)
    assert tables.dtype == dtype and tables.shape == (9, 4, 32)
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert_allclose(tables, _naive.adc_tables(Q, cb, inner_product), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("code_dtype,k", [(np.uint8, 256), (np.uint16, 1000)])
@pytest.mark.parametrize("n", [0, 1, 3, 4, 5, 101])
@pytest.mark.parametrize("n_neighbors", [1, 4, 7])
def test_scan_matches_oracle(code_dtype, k, n, n_neighbors):
    m = 3
    # Integer-valued tables: sums are exact, so ties are real ties.
    tables = rng.randint(0, 5, size=(6, m, k)).astype(np.float32)
    codes = rng.randint(0, k, size=(n, m)).astype(code_dtype)
    dist = np.empty((6, n_neighbors), dtype=np.float32)
    idx = np.empty((6, n_neighbors), dtype=np.int64)
    _adc.adc_scan(tables, codes, dist, idx, 2)
    kk = min(n, n_neighbors)
    if kk:
        d_ref, i_ref = _naive.adc_scan(tables, codes, kk)
        assert_array_equal(idx[:, :kk], i_ref)
        assert_array_equal(dist[:, :kk], d_ref)
    # Slots beyond the number of codes stay empty.
    assert np.all(np.isinf(dist[:, kk:]))
    assert np.all(idx[:, kk:] == np.iinfo(np.int64).max)


def test_scan_ties_broken_by_smaller_index():
    tables = np.zeros((1, 2, 4), dtype=np.float64)
    codes = rng.randint(0, 4, size=(50, 2)).astype(np.uint8)
    dist = np.empty((1, 10))
    idx = np.empty((1, 10), dtype=np.int64)
    _adc.adc_scan(tables, codes, dist, idx, 1)
    assert_array_equal(idx[0], np.arange(10))


def test_decode_matches_oracle():
    cb = _random_codebooks(3, 10, 2, np.float32)
    codes = rng.randint(0, 10, size=(40, 3)).astype(np.uint8)
    assert_array_equal(_quantizer.decode(codes, cb), _naive.decode(codes, cb))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_distinct_rows(dtype):
    A = rng.randn(50, 3).astype(dtype)
    pts, counts = _quantizer.distinct_rows(A)
    assert counts is None
    assert_array_equal(pts, A)
    B = np.vstack([A, A[:5], A[:2]])
    pts, counts = _quantizer.distinct_rows(B)
    assert pts.shape == (50, 3) and counts.sum() == 57
    assert_array_equal(np.sort(counts)[::-1][:7], [3, 3, 2, 2, 2, 1, 1])
    # Odd row widths in bytes take the byte-wise hash.
    C = np.repeat(np.arange(6, dtype=np.uint8).reshape(3, 2), 2, axis=0)
    pts, counts = _quantizer.distinct_rows(C)
    assert_array_equal(counts, [2, 2, 2])
