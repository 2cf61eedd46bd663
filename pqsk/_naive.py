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


def ivf_search(Q, centroids, codebooks, lists, codes, ids, n_probe, n_neighbors,
               inner_product=False, removed=None):
    """IVFADC over entries given in any order (``lists[i]``, ``codes[i]``,
    ``ids[i]``), in float64: rank the lists by ``||q - c_l||^2`` (or
    ``-<q, c_l>``), ties to the smaller list; scan the first ``n_probe``,
    then further lists in that order while fewer than ``n_neighbors`` live
    entries (ids not marked in ``removed``) were seen; return the
    ``n_neighbors`` smallest (distance, id) pairs, where an entry's distance
    is ``||q - c_l - r_hat||^2`` (or ``-<q, c_l + r_hat>``).  Missing slots
    hold (inf, INT64_MAX)."""
    Q = np.asarray(Q, dtype=np.float64)
    C = np.asarray(centroids, dtype=np.float64)
    X_hat = C[lists] + decode(codes, np.asarray(codebooks, dtype=np.float64))
    live = np.ones(len(ids), bool) if removed is None else ~np.asarray(removed)[ids]
    out_d = np.full((Q.shape[0], n_neighbors), np.inf)
    out_i = np.full((Q.shape[0], n_neighbors), np.iinfo(np.int64).max, dtype=np.int64)
    for q in range(Q.shape[0]):
        coarse = -(C @ Q[q]) if inner_product else ((C - Q[q]) ** 2).sum(axis=1)
        order = np.lexsort((np.arange(C.shape[0]), coarse))
        chosen = list(order[:n_probe])
        for l in order[n_probe:]:
            if np.count_nonzero(live & np.isin(lists, chosen)) >= n_neighbors:
                break
            chosen.append(l)
        sel = np.flatnonzero(live & np.isin(lists, chosen))
        if inner_product:
            dist = -(X_hat[sel] @ Q[q])
        else:
            dist = ((X_hat[sel] - Q[q]) ** 2).sum(axis=1)
        best = np.lexsort((ids[sel], dist))[:n_neighbors]
        out_d[q, :best.size] = dist[best]
        out_i[q, :best.size] = ids[sel][best]
    return out_d, out_i
