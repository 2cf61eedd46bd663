"""Naive NumPy versions of every kernel: the meaning of each kernel and the
oracle the tests compare the Cython code against.  Clarity over speed."""

import numpy as np


def encode(X, codebooks):
    """codes[i, j] = argmin_c ||X[i, j-th block] - codebooks[j, c]||^2 (ties: smallest c)."""
    m, k, ds = codebooks.shape
    codes = np.empty((X.shape[0], m), dtype=np.int64)
    for j in range(m):
        sub = X[:, j * ds:(j + 1) * ds]
        d = ((sub[:, None, :] - codebooks[j][None, :, :]) ** 2).sum(axis=2)
        codes[:, j] = np.argmin(d, axis=1)
    return codes


def decode(codes, codebooks):
    """Concatenate, for each row, the codewords its code names."""
    m = codebooks.shape[0]
    return np.hstack([codebooks[j][codes[:, j]] for j in range(m)])


def adc_tables(Q, codebooks, inner_product=False):
    """tables[q, j, c]: squared L2 (or minus the dot product) between query
    q's j-th block and codeword c of sub-space j."""
    m, k, ds = codebooks.shape
    tables = np.empty((Q.shape[0], m, k), dtype=np.float64)
    for j in range(m):
        sub = Q[:, j * ds:(j + 1) * ds].astype(np.float64)
        cb = codebooks[j].astype(np.float64)
        if inner_product:
            tables[:, j, :] = -(sub @ cb.T)
        else:
            tables[:, j, :] = ((sub[:, None, :] - cb[None, :, :]) ** 2).sum(axis=2)
    return tables


def adc_scan(tables, codes, n_neighbors):
    """For each query: dist[i] = sum_j tables[q, j, codes[i, j]]; return the
    n_neighbors smallest (dist, i) pairs, sorted, ties to the smaller i."""
    nq, m, _ = tables.shape
    out_d = np.empty((nq, n_neighbors))
    out_i = np.empty((nq, n_neighbors), dtype=np.int64)
    ids = np.arange(codes.shape[0])
    for q in range(nq):
        dist = np.zeros(codes.shape[0])
        for j in range(m):
            dist += tables[q, j, codes[:, j]]
        order = np.lexsort((ids, dist))[:n_neighbors]
        out_d[q] = dist[order]
        out_i[q] = order
    return out_d, out_i
