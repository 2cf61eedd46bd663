"""Rows and queries of a sharded index routed by k-means centroids
(``ShardedNeighbors(partition="kmeans")``).

The shards then partition the space, not the row numbers: a row goes to
the shard of its nearest centroid, and a query visits only the shards
whose centroids are about as near as its nearest one
(:func:`visits`), so most queries search one shard instead of all.  An
HNSW beam costs about as much on a shard of n / s rows as on one graph of
n rows; searching one shard instead of s is what lets s workers answer
more queries per second than one process.

Distances are squared L2 in the space the index compares in (the
prepared queries: unit rows for cosine), plus a bias per shard that
evens out the shards' sizes.  Everything here is NumPy and
scikit-learn, and imports neither dask nor any estimator module.
"""

import numpy as np

from ._quantizer import fit_kmeans, quiet_kmeans


# Rows of the training sample the routing is trained on: a few regions'
# centroids and shares need far fewer rows than the quantizers.
MAX_ROUTE_ROWS = 32768


def train_centroids(P, n_shards, random_state):
    """The routing of the prepared sample rows P into ``n_shards`` regions
    of about equal size.

    K-means gives the centroids; a bias per centroid, added to the squared
    distances, then evens out the regions' shares of P (a row's region is
    its least biased distance: a power diagram of the centroids), so that
    shards get about as many rows and queries as each other.

    Parameters
    ----------
    P : ndarray of shape (n_rows, n_features), float32 or float64
        Prepared rows (as queries are prepared); at most
        ``max(MAX_ROUTE_ROWS, 256 * n_shards)`` of them, drawn at random,
        are used.
    n_shards : int
    random_state : RandomState

    Returns
    -------
    centroids : ndarray of shape (n_shards, n_features), float64
    bias : ndarray of shape (n_shards,), float64
    scale : float
        The mean biased squared distance of a row of P to its region's
        centroid (the unit of ``probe_margin``); positive.
    """
    cap = max(MAX_ROUTE_ROWS, 256 * n_shards)
    if P.shape[0] > cap:
        P = P[np.sort(random_state.choice(P.shape[0], cap, replace=False))]
    with quiet_kmeans():
        centroids, _, _ = fit_kmeans(np.asarray(P, np.float64), n_shards, init="k-means++",
                                     n_init=3, max_iter=50, random_state=random_state)
    centroids = np.ascontiguousarray(centroids, np.float64)
    d = sq_distances(P, centroids)
    bias = balanced_bias(d)
    scale = float((d + bias).min(axis=1).mean()) if d.size else 0.0
    return centroids, bias, scale if scale > 0 else 1.0


def balanced_bias(d, tol=0.02, max_iter=200):
    """A bias per column of the squared distances d (n_rows, n_shards)
    after which each column is the least biased distance of about
    n_rows / n_shards rows (within ``tol`` of that share, when ties
    allow): overfull regions raise their bias, a step that shrinks as the
    shares settle.  Mean zero."""
    n, s = d.shape
    bias = np.zeros(s)
    if n < s or s == 1:
        return bias
    part = np.partition(d, 1, axis=1)
    step = float(np.median(part[:, 1] - part[:, 0])) or 1.0
    target = n / s
    for _ in range(max_iter):
        share = np.bincount((d + bias).argmin(axis=1), minlength=s) / target - 1.0
        if np.abs(share).max() <= tol:
            break
        bias += step * np.clip(share, -1.0, 1.0)
        step *= 0.97
    return bias - bias.mean()


def sq_distances(P, centroids):
    """Squared L2 distances (n_rows, n_shards), float64, never negative."""
    P = np.asarray(P, np.float64)
    d = (np.einsum("ij,ij->i", P, P)[:, None] - 2.0 * (P @ centroids.T)
         + np.einsum("ij,ij->i", centroids, centroids)[None, :])
    return np.maximum(d, 0.0, out=d)


def assign(P, centroids, bias):
    """The shard of each prepared row: its least biased squared distance
    to a centroid (the first of equal ones), int64 of shape (n_rows,)."""
    if not P.shape[0]:
        return np.empty(0, np.int64)
    return (sq_distances(P, centroids) + bias).argmin(axis=1).astype(np.int64)


def visits(P, routing, margin, live, n_neighbors):
    """Which shards each prepared query visits: boolean (n_queries,
    n_shards).

    ``routing`` is (centroids, bias, scale) (see ``train_centroids``).  A
    query visits its own region's shard and every shard whose biased
    squared distance exceeds that one's by at most ``margin * scale``;
    then, while the shards it visits hold fewer than ``n_neighbors`` live
    rows (``live``: per shard), the next nearest ones too.  Empty shards
    are never visited (unless every shard is).
    """
    centroids, bias, scale = routing
    d = sq_distances(P, centroids) + bias
    live = np.asarray(live, np.int64)
    d[:, live == 0] = np.inf
    out = d <= d.min(axis=1, keepdims=True) + margin * scale
    out[np.arange(d.shape[0]), d.argmin(axis=1)] = True
    short = (out * live).sum(axis=1) < n_neighbors
    if short.any():
        order = np.argsort(d[short], axis=1, kind="stable")
        sub = out[short]
        for rank in range(order.shape[1]):
            need = (sub * live).sum(axis=1) < n_neighbors
            if not need.any():
                break
            sub[np.flatnonzero(need), order[need, rank]] = True
        out[short] = sub
    return out


def runs(ids, first_local=0):
    """The ranges (first local id, first global id, length) of a shard
    whose local ids ``first_local``, ``first_local + 1``, ... stand for the
    increasing global ``ids``: one row per run of consecutive ids."""
    ids = np.asarray(ids, np.int64)
    if not ids.size:
        return np.empty((0, 3), np.int64)
    starts = np.concatenate([[0], np.flatnonzero(np.diff(ids) != 1) + 1])
    lengths = np.diff(np.concatenate([starts, [ids.size]]))
    return np.column_stack([starts + first_local, ids[starts], lengths]).astype(np.int64)
