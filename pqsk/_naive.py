"""Naive NumPy / pure-Python versions of every kernel: the meaning of each
kernel and the oracle the tests compare the Cython code against.  Clarity
over speed: loops are written out, nothing is fused or precomputed.

Conventions shared with the kernels:

* a distance is the squared L2 distance, or minus the inner product
  (``inner_product=True``): smaller is always better;
* results are sorted by the pair (distance, id), so ties in distance go to
  the smaller id;
* output slots that no candidate fills hold ``(+inf, INT64_MAX)``;
* the D features are cut into m contiguous sub-spaces, the first ``D % m``
  of ``D // m + 1`` features, the others of ``D // m``
  (:func:`subspace_slices`); codebooks are (m, k, ceil(D / m)), codeword
  c of sub-space j being ``codebooks[j, c, :width_j]`` (the rest is
  padding, never read here).
"""

import heapq

import numpy as np

EMPTY_ID = np.iinfo(np.int64).max


def subspace_slices(n_features, n_subspaces):
    """The m slices of features, in order: the first ``D % m`` sub-spaces
    are one feature wider than the others."""
    out, start = [], 0
    for j in range(n_subspaces):
        width = n_features // n_subspaces + (1 if j < n_features % n_subspaces else 0)
        out.append(slice(start, start + width))
        start += width
    return out


def encode(X, codebooks):
    """codes[i, j] = argmin_c ||X[i, j-th block] - codebooks[j, c]||^2 (ties: smallest c)."""
    m, k, ds = codebooks.shape
    codes = np.empty((X.shape[0], m), dtype=np.int64)
    for j, sl in enumerate(subspace_slices(X.shape[1], m)):
        sub = X[:, sl]
        cb = codebooks[j][:, :sub.shape[1]]
        d = ((sub[:, None, :] - cb[None, :, :]) ** 2).sum(axis=2)
        codes[:, j] = np.argmin(d, axis=1)
    return codes


def decode(codes, codebooks, n_features=None):
    """Concatenate, for each row, the codewords its code names (each cut
    to its sub-space's width for ``n_features`` features; default m * ds)."""
    m, _, ds = codebooks.shape
    d = m * ds if n_features is None else n_features
    return np.hstack([codebooks[j][codes[:, j]][:, :sl.stop - sl.start]
                      for j, sl in enumerate(subspace_slices(d, m))])


def adc_tables(Q, codebooks, inner_product=False, dtype=np.float64):
    """tables[q, j, c]: squared L2 (or minus the dot product) between query
    q's j-th block and codeword c of sub-space j.

    Computed in ``dtype``, one feature of the block after the other
    (``t += diff * diff``, or ``t -= q_d * c_d``): with ``dtype=float32``
    and float32 inputs this is, operation for operation, the arithmetic of
    the kernels' ``build_table``, so the result is bit-identical to it.
    """
    m, k, ds = codebooks.shape
    Q = np.asarray(Q).astype(dtype)
    cb = np.asarray(codebooks).astype(dtype)
    tables = np.zeros((Q.shape[0], m, k), dtype=dtype)
    for j, sl in enumerate(subspace_slices(Q.shape[1], m)):
        for d in range(sl.stop - sl.start):
            qd = Q[:, sl.start + d][:, None]        # (nq, 1)
            cd = cb[j, :, d][None, :]               # (1, k)
            if inner_product:
                tables[:, j, :] -= qd * cd
            else:
                diff = qd - cd
                tables[:, j, :] += diff * diff
    return tables


def adc_distances(table, codes):
    """ADC distance of every code for one query's (m, k) table:
    ``sum_j table[j, codes[i, j]]``, added in order j = 0, 1, ... in the
    table's dtype (as the kernels add them)."""
    dist = np.zeros(codes.shape[0], dtype=table.dtype)
    for j in range(table.shape[0]):
        dist += table[j][codes[:, j].astype(np.int64)]
    return dist


def top_k(dist, ids, n_neighbors):
    """The n_neighbors smallest (dist, id) pairs, sorted, padded with
    (+inf, INT64_MAX) when there are fewer candidates."""
    dist = np.asarray(dist, dtype=np.float64)
    ids = np.asarray(ids, dtype=np.int64)
    order = np.lexsort((ids, dist))[:n_neighbors]
    out_d = np.full(n_neighbors, np.inf)
    out_i = np.full(n_neighbors, EMPTY_ID, dtype=np.int64)
    out_d[:order.size] = dist[order]
    out_i[:order.size] = ids[order]
    return out_d, out_i


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


# --- inverted file -------------------------------------------------------------

def coarse_terms(Q, centroids, inner_product=False):
    """(nq, n_lists) in float64: ``||q - c_l||^2``, or ``-<q, c_l>``."""
    Q = np.asarray(Q, dtype=np.float64)
    C = np.asarray(centroids, dtype=np.float64)
    out = np.empty((Q.shape[0], C.shape[0]))
    for l in range(C.shape[0]):
        if inner_product:
            out[:, l] = -(Q @ C[l])
        else:
            diff = Q - C[l]
            out[:, l] = (diff * diff).sum(axis=1)
    return out


def ivf_probe_order(coarse_row, offsets, n_probe, n_neighbors, live=None):
    """The lists an IVF search scans for one query, in scan order: the
    n_probe lists with the smallest (coarse term, list), then, while the
    lists scanned hold fewer than n_neighbors live codes, the next lists in
    the same order (until every list is scanned).  ``live``: a boolean per
    stored code (False for tombstones); every code is live by default."""
    coarse_row = np.asarray(coarse_row)
    n_lists = coarse_row.shape[0]
    order = np.lexsort((np.arange(n_lists), coarse_row))
    offsets = np.asarray(offsets, dtype=np.int64)
    if live is None:
        sizes = np.diff(offsets)
    else:
        sizes = np.array([np.count_nonzero(live[offsets[l]:offsets[l + 1]])
                          for l in range(n_lists)], dtype=np.int64)
    scanned = [int(l) for l in order[:n_probe]]
    seen = int(sizes[scanned].sum())
    for l in order[n_probe:]:
        if seen >= n_neighbors:
            break
        scanned.append(int(l))
        seen += int(sizes[l])
    return scanned


def ivf_candidates(q, centroids, codebooks, codes, ids, offsets, lists,
                   inner_product=False, removed=None):
    """(ids, distances in float64) of every live code stored in ``lists``.

    A code of list l stands for ``x_hat = c_l + r_hat`` (r_hat its decoded
    residual); its distance is ``||q - x_hat||^2`` or ``-<q, x_hat>``.
    ``removed``: boolean mask over ids; codes of removed ids (tombstones)
    are left out.
    """
    q = np.asarray(q, dtype=np.float64)
    cb = np.asarray(codebooks, dtype=np.float64)
    C = np.asarray(centroids, dtype=np.float64)
    out_ids, out_d = [], []
    for l in lists:
        rows = slice(int(offsets[l]), int(offsets[l + 1]))
        x_hat = C[l] + decode(np.asarray(codes[rows], dtype=np.int64), cb, C.shape[1])
        if inner_product:
            d = -(x_hat @ q)
        else:
            diff = x_hat - q
            d = (diff * diff).sum(axis=1)
        out_ids.append(np.asarray(ids[rows], dtype=np.int64))
        out_d.append(d)
    if not out_ids:
        return np.empty(0, np.int64), np.empty(0)
    out_ids, out_d = np.concatenate(out_ids), np.concatenate(out_d)
    if removed is not None:
        keep = ~np.asarray(removed)[out_ids]
        out_ids, out_d = out_ids[keep], out_d[keep]
    return out_ids, out_d


def ivf_search(Q, centroids, codebooks, codes, ids, offsets, n_neighbors, n_probe,
               inner_product=False, coarse=None, removed=None, copies=1):
    """IVF-ADC search (the meaning of ``pqsk._ivf.ivf_search``).

    List l holds ``codes[offsets[l]:offsets[l + 1]]`` (residual codes) and
    their ``ids``.  Each query scans the lists of :func:`ivf_probe_order`
    and returns the n_neighbors smallest (distance, id) pairs of
    :func:`ivf_candidates`, in float64, padded with (+inf, INT64_MAX).
    ``coarse`` (nq, n_lists) ranks the lists; by default
    :func:`coarse_terms`.  ``removed``: boolean mask over ids (tombstones,
    skipped and not counted).  ``copies`` (2 with spilling: an id may be
    stored in two lists): lists are scanned on while they hold fewer than
    ``copies * n_neighbors`` live codes, and an id is returned once, at
    the smallest distance of its codes scanned.
    """
    if coarse is None:
        coarse = coarse_terms(Q, centroids, inner_product)
    nq = Q.shape[0]
    out_d = np.empty((nq, n_neighbors))
    out_i = np.empty((nq, n_neighbors), dtype=np.int64)
    for q in range(nq):
        live = None if removed is None else ~np.asarray(removed)[ids]
        lists = ivf_probe_order(coarse[q], offsets, n_probe, copies * n_neighbors, live)
        cid, cd = ivf_candidates(Q[q], centroids, codebooks, codes, ids, offsets, lists,
                                 inner_product, removed)
        cid, cd = best_per_id(cid, cd)
        out_d[q], out_i[q] = top_k(cd, cid, n_neighbors)
    return out_d, out_i


def best_per_id(ids, dist):
    """(ids, dist) with each id once, at its smallest distance (spilled
    entries: one vector stored in two lists)."""
    best = {}
    for i, d in zip(np.asarray(ids, dtype=np.int64).tolist(), np.asarray(dist).tolist()):
        if i not in best or d < best[i]:
            best[i] = d
    return (np.array(list(best), dtype=np.int64),
            np.array(list(best.values()), dtype=np.float64))


def unique_top_k(dist, ids, n_neighbors):
    """Rows of (dist, ids) sorted by (distance, id), each id kept at its
    first (best) place, cut to n_neighbors; empty slots (+inf,
    INT64_MAX) are kept as they are (the meaning of
    ``pqsk._scorers.unique_top_k``)."""
    nq = dist.shape[0]
    out_d = np.full((nq, n_neighbors), np.inf)
    out_i = np.full((nq, n_neighbors), EMPTY_ID, dtype=np.int64)
    for q in range(nq):
        seen, r = set(), 0
        for d, i in zip(dist[q].tolist(), ids[q].tolist()):
            if r == n_neighbors:
                break
            if i != EMPTY_ID and i in seen:
                continue
            seen.add(i)
            out_d[q, r], out_i[q, r] = d, i
            r += 1
    return out_d, out_i


def spill_lists(X, centroids, labels, spill_lambda):
    """The SOAR second list of each row (the meaning of
    ``pqsk._partition.spill_lists``): the list l != labels[i] minimising
    ``||x - c_l||^2 + lambda * <r, x - c_l>^2 / ||r||^2``, r = x - c_labels[i]
    (the last term 0 when r = 0), ties to the smaller l."""
    X = np.asarray(X, dtype=np.float64)
    C = np.asarray(centroids, dtype=np.float64)
    out = np.empty(X.shape[0], dtype=np.int64)
    for i in range(X.shape[0]):
        r = X[i] - C[labels[i]]
        rr = float(r @ r)
        best, best_l = np.inf, -1
        for l in range(C.shape[0]):
            if l == labels[i]:
                continue
            e = X[i] - C[l]
            loss = float(e @ e) + (spill_lambda * float(r @ e) ** 2 / rr if rr > 0 else 0.0)
            if loss < best:
                best, best_l = loss, l
        out[i] = best_l
    return out


# --- HNSW -----------------------------------------------------------------------

class _Counted:
    """Distance lookups of one query, counted as the kernel counts them."""

    def __init__(self, dist):
        self.dist = dist
        self.count = 0

    def __call__(self, node):
        self.count += 1
        return float(self.dist[node])


def hnsw_neighbours(links0, upper, upper_off, node, level):
    """Node's links on ``level`` (0: ``links0``; l >= 1: row
    ``upper_off[node] + l - 1`` of ``upper``), up to the first -1."""
    row = links0[node] if level == 0 else upper[upper_off[node] + level - 1]
    out = []
    for e in row:
        if e < 0:
            break
        out.append(int(e))
    return out


def hnsw_greedy(links0, upper, upper_off, dist, cur, d_cur, level):
    """Greedy walk on one level: go through the current node's links in
    order, moving to any that is better by (distance, id) than the current
    best; repeat from the new node until a pass changes nothing."""
    changed = True
    while changed:
        changed = False
        for e in hnsw_neighbours(links0, upper, upper_off, cur, level):
            de = dist(e)
            if de < d_cur or (de == d_cur and e < cur):
                cur, d_cur = e, de
                changed = True
    return cur, d_cur


def hnsw_beam(links0, dist, entry, d_entry, ef, deleted=None):
    """Best-first search of width ef on level 0 from ``entry``.

    Candidates are expanded smallest (distance, id) first; the search stops
    when the best candidate is farther than the worst of ef results.  A
    neighbour enters the candidates when there is room among the results or
    it beats the worst result by (distance, id); tombstoned nodes
    (``deleted[node]`` true) are expanded like the others but never become
    results.  Returns the results as (distance, node) sorted ascending.
    """
    def dead(node):
        return deleted is not None and len(deleted) > 0 and bool(deleted[node])

    visited = {entry}
    cand = [(d_entry, entry)]                 # min-heap on (distance, node)
    res = []                                  # max-heap: entries (-distance, -node)
    if not dead(entry):
        heapq.heappush(res, (-d_entry, -entry))
    while cand:
        dc, c = cand[0]
        if len(res) >= ef and dc > -res[0][0]:
            break
        heapq.heappop(cand)
        for e in hnsw_neighbours(links0, None, None, c, 0):
            if e in visited:
                continue
            visited.add(e)
            de = dist(e)
            worst = (-res[0][0], -res[0][1]) if res else None
            if len(res) < ef or (de, e) < worst:
                heapq.heappush(cand, (de, e))
                if dead(e):
                    continue
                heapq.heappush(res, (-de, -e))
                if len(res) > ef:
                    heapq.heappop(res)
    return sorted((-d, -i) for d, i in res)


def hnsw_search(tables, codes, links0, upper, upper_off, entry_point, max_level, ef,
                n_out, deleted=None):
    """HNSW search over a flat graph (the meaning of ``pqsk._hnsw.hnsw_search``).

    For each query's (m, k) table: start at ``entry_point``, walk greedily
    (:func:`hnsw_greedy`) on levels ``max_level`` down to 1, then run the
    level-0 beam (:func:`hnsw_beam`) of width ``ef`` from where the walk
    ended.  Distances are :func:`adc_distances` in the tables' dtype (pass
    float32 tables to get the kernel's values bit for bit).

    Returns (dist, idx, n_dist): (nq, n_out) float64 and int64 arrays,
    rows sorted by (distance, node) and padded with (+inf, INT64_MAX), and
    the number of distance computations per query.
    """
    nq = tables.shape[0]
    out_d = np.full((nq, n_out), np.inf)
    out_i = np.full((nq, n_out), EMPTY_ID, dtype=np.int64)
    n_dist = np.zeros(nq, dtype=np.int64)
    if links0.shape[0] == 0 or entry_point < 0:
        return out_d, out_i, n_dist
    for q in range(nq):
        dist = _Counted(adc_distances(tables[q], codes))
        cur = int(entry_point)
        d_cur = dist(cur)
        for level in range(max_level, 0, -1):
            cur, d_cur = hnsw_greedy(links0, upper, upper_off, dist, cur, d_cur, level)
        found = hnsw_beam(links0, dist, cur, d_cur, ef, deleted)[:n_out]
        for r, (d, i) in enumerate(found):
            out_d[q, r], out_i[q, r] = d, i
        n_dist[q] = dist.count
    return out_d, out_i, n_dist


def tier_node_distances(q, rows, ids, inner_product=False, unit_norm=False,
                        offset=None, scale=None):
    """Distances of a query to a graph's nodes by their tier rows, as the tier
    walk of ``pqsk._hnsw.hnsw_search`` (scalar path) computes them: node i's
    row is ``rows[ids[i]]`` (``ids`` None: ``rows[i]``), decoded as
    :func:`compact_rerank` decodes it, the distance in float64 (with
    ``unit_norm``: ``||q||^2 - 2 <q, x> / n + ||x||^2 / n^2``, clipped at 0, or
    ``-<q, x> / n``, n = ||x|| or 1 below 10 float32 eps), rounded to float32."""
    rows = np.asarray(rows)
    X = (np.asarray(offset, np.float64) + np.asarray(scale, np.float64) * rows
         if rows.dtype == np.uint8 else rows.astype(np.float64))
    if ids is not None:
        X = X[np.asarray(ids)]
    q = np.asarray(q, np.float32).astype(np.float64)
    dot = X @ q
    if not unit_norm:
        d = -dot if inner_product else ((X - q) ** 2).sum(axis=1)
        return d.astype(np.float32)
    nrm = (X * X).sum(axis=1)
    n = np.sqrt(nrm)
    n[~(n >= 10 * np.finfo(np.float32).eps)] = 1.0
    d = -dot / n if inner_product else np.maximum(q @ q - 2 * dot / n + nrm / (n * n), 0)
    return d.astype(np.float32)


def hnsw_tier_search(Q, rows, ids, links0, upper, upper_off, entry_point, max_level, ef,
                     n_out, deleted=None, inner_product=False, unit_norm=False,
                     offset=None, scale=None):
    """The tier walk (``pqsk._hnsw.hnsw_search`` with ``tier_*`` arguments):
    :func:`hnsw_search` with each query's node distances from
    :func:`tier_node_distances` instead of ADC.  Same results."""
    nq = Q.shape[0]
    out_d = np.full((nq, n_out), np.inf)
    out_i = np.full((nq, n_out), EMPTY_ID, dtype=np.int64)
    n_dist = np.zeros(nq, dtype=np.int64)
    if links0.shape[0] == 0 or entry_point < 0:
        return out_d, out_i, n_dist
    for q in range(nq):
        dist = _Counted(tier_node_distances(Q[q], rows, ids, inner_product, unit_norm,
                                            offset, scale))
        cur = int(entry_point)
        d_cur = dist(cur)
        for level in range(max_level, 0, -1):
            cur, d_cur = hnsw_greedy(links0, upper, upper_off, dist, cur, d_cur, level)
        found = hnsw_beam(links0, dist, cur, d_cur, ef, deleted)[:n_out]
        for r, (d, i) in enumerate(found):
            out_d[q, r], out_i[q, r] = d, i
        n_dist[q] = dist.count
    return out_d, out_i, n_dist


def ivf_search_entries(Q, centroids, codebooks, lists, codes, ids, n_probe, n_neighbors,
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
    X_hat = C[lists] + decode(codes, np.asarray(codebooks, dtype=np.float64), C.shape[1])
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


def exact_rerank(Q, vectors, cand, n_neighbors, inner_product=False, unit_norm=False):
    """Oracle of ``pqsk._rerank.exact_rerank``: for each query, the exact
    distance (squared L2, or minus the inner product, in float64) to each
    candidate's raw row (scaled to unit norm first with ``unit_norm``,
    norms below ``10 * eps`` counting as 1), ids outside ``[0, n)`` scored
    +inf; the best ``n_neighbors`` (distance, id) pairs, sorted, empty
    slots ``(+inf, EMPTY_ID)``."""
    X = np.asarray(vectors, dtype=np.float64)
    eps = np.finfo(np.asarray(vectors[:0]).dtype).eps
    nq = cand.shape[0]
    dist = np.full((nq, n_neighbors), np.inf)
    idx = np.full((nq, n_neighbors), EMPTY_ID, dtype=np.int64)
    for q in range(nq):
        scored = []
        for i in cand[q].tolist():
            if 0 <= i < X.shape[0]:
                x = X[i]
                if unit_norm:
                    norm = np.sqrt(x @ x)
                    x = x / (norm if norm >= 10 * eps else 1.0)
                d = -(Q[q] @ x) if inner_product else float(((Q[q] - x) ** 2).sum())
            else:
                d = np.inf
            scored.append((d, i))
        scored.sort()
        kept = [p for p in scored if p < (np.inf, EMPTY_ID)][:n_neighbors]
        for r, (d, i) in enumerate(kept):
            dist[q, r], idx[q, r] = d, i
    return dist, idx


def compact_rerank(Q, rows, cand, n_neighbors, inner_product=False, unit_norm=False,
                   offset=None, scale=None):
    """Oracle of ``pqsk._rerank.compact_rerank``: ``rows`` is a tier's
    rows, float16 values or uint8 codes (then element j decodes as
    ``offset[j] + scale[j] * code[j]``, in float64); the decoded rows are
    re-ranked as :func:`exact_rerank` re-ranks raw rows (the unit-norm
    threshold that of float32)."""
    rows = np.asarray(rows)
    if rows.dtype == np.uint8:
        X = (np.asarray(offset, dtype=np.float64)
             + np.asarray(scale, dtype=np.float64) * rows)
    else:
        X = rows.astype(np.float64)
    eps = np.finfo(np.float32).eps
    nq = cand.shape[0]
    dist = np.full((nq, n_neighbors), np.inf)
    idx = np.full((nq, n_neighbors), EMPTY_ID, dtype=np.int64)
    for q in range(nq):
        scored = []
        for i in cand[q].tolist():
            if 0 <= i < X.shape[0]:
                x = X[i]
                if unit_norm:
                    norm = np.sqrt(x @ x)
                    x = x / (norm if norm >= 10 * eps else 1.0)
                d = -(Q[q] @ x) if inner_product else float(((Q[q] - x) ** 2).sum())
            else:
                d = np.inf
            scored.append((d, i))
        scored.sort()
        kept = [p for p in scored if p < (np.inf, EMPTY_ID)][:n_neighbors]
        for r, (d, i) in enumerate(kept):
            dist[q, r], idx[q, r] = d, i
    return dist, idx


def compact_rerank_int8(Q, codes, cand, n_neighbors, inner_product=False, unit_norm=False,
                        offset=None, scale=None, w_max=32767):
    """Oracle of the integer path of ``pqsk._rerank.compact_rerank`` (int8
    tier, ``TIER_INT8 == "integer"``): the same rounded weights and exact
    integer sums, the double terms summed in another order.  Per query
    u_j = (q_j - off_j) sc_j (L2) or q_j sc_j, w = rint(u * (1 / s_w)),
    s_w = max |u| / 32767; per tier f = rint(2 off sc * (1 / s_f)),
    s_f = max |2 off sc| / 32767, g = rint(sc^2 * (1 / s_g)), s_g = max
    sc^2 / 16383 (each 1 if its max is 0); for codes c:

        L2:   sum (q - off)^2 - 2 s_w <w, c> + s_g <g, c^2>    (at least 0)
        IP:   -(<q, off> + s_w <w, c>)
        unit norm: <q, x> = <q, off> + s_w <w, c>,
                   ||x||^2 = ||off||^2 + s_f <f, c> + s_g <g, c^2>,
                   then as ``exact_rerank`` (norm below 10 eps(float32): 1).

    Same (dist, idx) layout as :func:`compact_rerank`.  ``w_max`` (the
    kernel's: 32767) narrows the query weights to study other widths
    (127: 8-bit weights)."""
    Q = np.asarray(Q, dtype=np.float64)
    C = np.asarray(codes).astype(np.int64)
    off = np.asarray(offset, dtype=np.float64)
    sc = np.asarray(scale, dtype=np.float64)

    def rounded(v, vmax, lo):
        m = np.abs(v).max() if v.size else 0.0
        s = m / vmax if m > 0 else 1.0
        return np.clip(np.rint(v * (1.0 / s)), lo, vmax).astype(np.int64), s

    f, s_f = rounded(2 * off * sc, 32767, -32767)
    g, s_g = rounded(sc * sc, 16383, 0)
    eps10 = 10 * np.finfo(np.float32).eps
    nq = cand.shape[0]
    dist = np.full((nq, n_neighbors), np.inf)
    idx = np.full((nq, n_neighbors), EMPTY_ID, dtype=np.int64)
    for q in range(nq):
        u = (Q[q] - off) * sc if not (inner_product or unit_norm) else Q[q] * sc
        w, s_w = rounded(u, w_max, -w_max)
        scored = []
        for i in cand[q].tolist():
            if 0 <= i < C.shape[0]:
                c = C[i]
                if unit_norm:
                    dot = Q[q] @ off + s_w * float(w @ c)
                    nrm = off @ off + s_f * float(f @ c) + s_g * float(g @ (c * c))
                    n = np.sqrt(nrm) if nrm > 0 else 0.0
                    n = n if n >= eps10 else 1.0
                    if inner_product:
                        d = -dot / n
                    else:
                        d = max(0.0, Q[q] @ Q[q] - 2 * dot / n + nrm / (n * n))
                elif inner_product:
                    d = -(Q[q] @ off + s_w * float(w @ c))
                else:
                    d = max(0.0, float(((Q[q] - off) ** 2).sum()) - 2 * s_w * float(w @ c)
                            + s_g * float(g @ (c * c)))
            else:
                d = np.inf
            scored.append((d, i))
        scored.sort()
        kept = [p for p in scored if p < (np.inf, EMPTY_ID)][:n_neighbors]
        for r, (d, i) in enumerate(kept):
            dist[q, r], idx[q, r] = d, i
    return dist, idx


def anisotropic_encode_chunk(X, U, w, codebooks, codes, n_sweeps):
    """Oracle of ``pqsk._aniso.anisotropic_encode_rows``: coordinate descent
    on the anisotropic loss ``||r||^2 + w_i (r . u_i)^2`` (``r = x_i -
    decode(codes[i])``), ``codes`` updated in place.

    X and U are (n, m * ds) float64 rows and unit directions in the padded
    layout, w (n,) is eta - 1, codebooks (m, k, ds).  A sweep visits the
    sub-spaces in order; sub-space j takes the codeword of least loss
    given the other blocks (the first on ties) when that loss is strictly
    below the current code's.  A row none of whose codes changed in a
    sweep is at a fixed point: later sweeps visit only the rows that moved
    in the previous one.  At most ``n_sweeps`` sweeps.
    """
    cb = np.asarray(codebooks, dtype=np.float64)
    m, k, ds = cb.shape
    c_norms = np.einsum("jkd,jkd->jk", cb, cb)
    R = X - np.hstack([cb[j][codes[:, j]] for j in range(m)])
    p = np.einsum("ij,ij->i", R, U)
    nrm = np.einsum("ij,ij->i", R, R)
    act = np.arange(X.shape[0])
    for _ in range(n_sweeps):
        if act.size == 0:
            break
        Ra, pa, na, ca = R[act], p[act], nrm[act], codes[act]
        moved = _anisotropic_sweep(X[act], U[act], w[act], cb, c_norms, Ra, pa, na, ca)
        R[act], p[act], nrm[act], codes[act] = Ra, pa, na, ca
        act = act[moved]
    return codes


def _anisotropic_sweep(X, U, w, cb, c_norms, R, p, nrm, codes):
    """One pass over the sub-spaces (R, p, nrm, codes updated in place);
    returns the mask of rows whose code changed.  For block j, ``p_o`` and
    ``n_o`` are r . u and ||r||^2 with block j's codeword taken out (r_j
    replaced by x_j); codeword c then gives r . u = p_o - u_j . c and
    ||r||^2 = n_o - 2 x_j . c + ||c||^2."""
    m, k, ds = cb.shape
    rows = np.arange(X.shape[0])
    moved = np.zeros(X.shape[0], dtype=bool)
    for j in range(m):
        sl = slice(j * ds, (j + 1) * ds)
        xj, uj, rj = X[:, sl], U[:, sl], R[:, sl]
        p_o = p - np.einsum("ij,ij->i", rj, uj) + np.einsum("ij,ij->i", xj, uj)
        n_o = nrm - np.einsum("ij,ij->i", rj, rj) + np.einsum("ij,ij->i", xj, xj)
        diff = p_o[:, None] - uj @ cb[j].T
        loss = ((-2 * (xj @ cb[j].T) + c_norms[j]) + n_o[:, None]) + (diff * diff) * w[:, None]
        best = np.argmin(loss, axis=1)
        cur = codes[:, j].astype(np.intp)
        move = loss[rows, best] < loss[rows, cur]
        if not move.any():
            continue
        moved |= move
        codes[move, j] = best[move]
        new_rj = xj[move] - cb[j][best[move]]
        rj[move] = new_rj
        p[move] = p_o[move] - np.einsum("ij,ij->i", xj[move], uj[move]) \
            + np.einsum("ij,ij->i", new_rj, uj[move])
        nrm[move] = n_o[move] - np.einsum("ij,ij->i", xj[move], xj[move]) \
            + np.einsum("ij,ij->i", new_rj, new_rj)
    return moved


def pack_lists4(codes, offsets):
    """Oracle of ``pqsk._scorers.pack_lists4`` (4-bit codes packed list by
    list in blocks of 32 rows: byte i of pair p of block b holds rows' codes
    of sub-spaces 2p (low nibble) and 2p + 1 (high)): (packed, blocks)."""
    codes = np.asarray(codes, dtype=np.uint8)
    n, m = codes.shape
    offsets = np.asarray(offsets, dtype=np.int64)
    n_l = np.diff(offsets)
    blocks = np.concatenate([[0], np.cumsum(-(-n_l // 32))]).astype(np.int64)
    half = (m + 1) // 2
    padded = np.zeros((int(blocks[-1]) * 32, 2 * half), dtype=np.uint8)
    for l in range(n_l.shape[0]):
        start = blocks[l] * 32
        padded[start:start + n_l[l], :m] = codes[offsets[l]:offsets[l + 1]]
    pairs = padded.reshape(-1, 32, half, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)
    return np.ascontiguousarray(packed.transpose(0, 2, 1)), blocks


def unpack_lists4(packed, offsets, blocks, m):
    """Oracle of ``pqsk._scorers.unpack_lists4``: (n, m) uint8 codes."""
    rows = np.asarray(packed).transpose(0, 2, 1).reshape(-1, packed.shape[1])
    both = np.stack([rows & 15, rows >> 4], axis=2).reshape(rows.shape[0], 2 * packed.shape[1])
    out = []
    for l in range(len(offsets) - 1):
        start = blocks[l] * 32
        out.append(both[start:start + offsets[l + 1] - offsets[l], :m])
    return np.concatenate(out).astype(np.uint8) if out else np.zeros((0, m), np.uint8)
