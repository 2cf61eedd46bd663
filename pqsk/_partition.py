"""The partition stage: the coarse quantizer of the inverted file.

Plain functions on arrays: train the coarse centroids (k-means on one
thread below ``LLOYD_THRESHOLD``, fixed-task Lloyd passes from it on),
assign rows to their nearest centroid (their list) and, for spilling, to
a second list (SOAR, :func:`spill_lists`), and the coarse and list terms
a search adds to the ADC tables.  Reads rows (an array or a
:class:`~pqsk._store.FitRows`) and centroids; writes centroids, labels
and term arrays.  The sampling and k-means schedule it follows are those
of :mod:`pqsk._quantizer`.
"""

import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import sparse
from sklearn.utils import check_random_state

from ._quantizer import (FIRST_STAGE_POINTS, fit_kmeans, gather_rows, one_blas_thread,
                         one_openmp_thread, padded_rows, quiet_kmeans, refine_iterations,
                         row_hashes, subsample_rows)
from ._store import chunk_slices

# --- coarse k-means --------------------------------------------------------
#
# The coarse k-means follows the two-stage schedule of
# pqsk._quantizer.fit_kmeans, by one of two implementations chosen by the
# size of the problem (never by the thread count):
#
# * below LLOYD_THRESHOLD (n_train * n_lists), fit_kmeans: scikit-learn's
#   KMeans on one OpenMP thread (its per-thread partial sums would make
#   the centroids depend on the thread count);
# * from LLOYD_THRESHOLD on, train_coarse_streamed: Lloyd passes in fixed
#   tasks of STREAM_TASK_ROWS rows, each task's per-centre sums in float64,
#   added in task order, so that the tasks run side by side on ``n_threads``
#   threads and the centroids still do not depend on ``n_threads``.  Up to
#   STREAMED_THRESHOLD the training sample is gathered in memory once (as
#   KMeans holds it); beyond it every pass reads its rows from X, and the
#   sample is never held.  Both give the same centroids.
#
# LLOYD_THRESHOLD = 2**24: n_lists >= 256 with the default 256 rows per
# list.  From there on the tasks are faster than KMeans on one thread, and
# a fit with more threads (n_jobs, or the training task of
# pqsk.dask.ShardedNeighbors) runs the coarse k-means on all of them
# (``python -m benchmarks.bench_dask --coarse``, results/dask.md).
LLOYD_THRESHOLD = 2**24
# The sample is gathered in memory up to this (one Lloyd pass then costs
# less than ~2**28 distance evaluations, a second or so on one thread);
# beyond it each pass streams its rows from X.
STREAMED_THRESHOLD = 2**28
# Sample rows per task of a Lloyd pass (fixed: the centroids depend on it).
STREAM_TASK_ROWS = 16384
# Distance values a task's (rows, n_lists) block holds: 2**19 (2 MiB of
# float32), so that the block stays in cache.
LLOYD_BLOCK = 2**19


def train_coarse(X, n_lists, *, rows=None, max_iter=25, tol=1e-4, random_state=None,
                 n_threads=1):
    """Coarse centroids, (n_lists, D), and the Lloyd iterations run.

    The training sample is ``X[rows]`` (every row of X when ``rows`` is
    None); X is an array or a :class:`~pqsk._store.FitRows`.  Below
    ``LLOYD_THRESHOLD`` (sample rows x ``n_lists``, see there)
    :func:`~pqsk._quantizer.fit_kmeans` (KMeans on one thread, random
    init, the two-stage schedule) clusters the sample; from it on
    :func:`train_coarse_streamed` follows the same schedule in fixed
    tasks, ``n_threads`` side by side, on the sample gathered in memory up
    to ``STREAMED_THRESHOLD`` and streamed from X beyond.  The centroids
    do not depend on ``n_threads``.
    """
    rng = check_random_state(random_state)
    n_train = X.shape[0] if rows is None else len(rows)
    work = n_train * n_lists
    streamed = work > STREAMED_THRESHOLD  # tested first: it bounds memory
    if streamed or work >= LLOYD_THRESHOLD:
        return train_coarse_streamed(X, rows, n_lists, max_iter=max_iter, tol=tol,
                                     random_state=rng, n_threads=n_threads,
                                     gather=not streamed)
    with one_openmp_thread(), quiet_kmeans():
        centroids, n_iter, distinct = fit_kmeans(gather_rows(X, rows), n_lists,
                                                 max_iter=max_iter, tol=tol, random_state=rng)
    if distinct is not None and not distinct.exact:
        warnings.warn(
            f"the coarse quantizer's k-means found {distinct.centroids} distinct centroids "
            f"for n_lists={n_lists}, from {distinct.rows:,} distinct rows of its "
            f"{n_train:,} training rows: duplicate rows left {n_lists - distinct.centroids} "
            "centroids without a row, so as many lists may stay empty. The index is valid; "
            "fewer lists, or training rows without duplicates, avoid it.",
            UserWarning, stacklevel=2)
    return centroids, n_iter


def train_coarse_streamed(X, rows, n_lists, *, max_iter=25, tol=1e-4, random_state=None,
                          n_threads=1, gather=False):
    """The two-stage k-means of :func:`~pqsk._quantizer.fit_kmeans` on
    ``X[rows]`` (every row of X when ``rows`` is None), in fixed tasks of
    rows.

    1. Random initialisation (``n_lists`` rows drawn from the stage-1
       rows), then ``max_iter - ceil(max_iter / 4)`` Lloyd passes over
       ``FIRST_STAGE_POINTS * n_lists`` rows of the sample;
    2. ``ceil(max_iter / 4)`` Lloyd passes over the whole sample.

    Each pass runs over its rows in tasks of ``STREAM_TASK_ROWS`` and
    stops the stage early when the centres move (sum of squared shifts)
    less than ``tol`` times the sample's mean feature variance, as KMeans
    does.  A centre left without rows moves to the row farthest from its
    centre (among the ``STREAM_FAR`` farthest of each task), as KMeans
    relocates empty clusters.  A first pass hashes the rows (8 bytes each):
    a sample with at most ``n_lists`` distinct rows gets them as its
    centroids (exact).

    Each task (its rows' nearest centres, their per-centre sums in float64)
    runs on one BLAS thread, ``n_threads`` tasks side by side, and the sums
    are added in task order: the centroids do not depend on ``n_threads``,
    on ``gather`` or on where X lives.  With ``gather`` the sample (and the
    stage-1 rows) is read from X once and held in memory, as KMeans holds
    it; without, every pass reads its rows from X and the sample is never
    held.  Memory besides: per thread a task's rows, a (rows, n_lists)
    distance block of ``chunk_rows(n_lists, LLOYD_BLOCK)`` rows and an
    (n_lists, D) float64 sum.

    Returns (centroids of X's dtype, Lloyd passes run).
    """
    rng = check_random_state(random_state)
    n_train = X.shape[0] if rows is None else len(rows)
    d = X.shape[1]
    workers = max(1, int(n_threads))
    if gather:
        X, rows = np.ascontiguousarray(gather_rows(X, rows)), None

    def reader(source, row_set):
        """Task ``sl`` of a row set of ``source`` (None: its rows in order),
        as C-contiguous rows."""
        if row_set is None and isinstance(source, np.ndarray):
            return lambda sl: np.ascontiguousarray(source[sl])  # a view if C-contiguous
        if row_set is None:
            return lambda sl: np.ascontiguousarray(source[np.arange(sl.start, sl.stop)])
        return lambda sl: np.ascontiguousarray(source[row_set[sl]])

    buffers = TaskBuffers()
    with one_blas_thread(), ThreadPoolExecutor(max_workers=workers) as ex:

        def run_tasks(fn, read, size):
            """fn on each task of ``size`` rows; results in task order, at
            most ``workers`` tasks running or waiting to be consumed."""
            tasks = chunk_slices(size, STREAM_TASK_ROWS)
            if workers == 1:
                for sl in tasks:
                    yield fn(read(sl))
                return
            pending = deque()
            for sl in tasks:
                if len(pending) == workers:
                    yield pending.popleft().result()
                pending.append(ex.submit(lambda sl=sl: fn(read(sl))))
            while pending:
                yield pending.popleft().result()

        # Pass 0: row hashes (degenerate samples) and the feature variance (tol).
        hashes, total, total_sq = [], np.zeros(d), np.zeros(d)
        for h, s1, s2 in run_tasks(
                lambda A: (row_hashes(A), A.sum(0, dtype=np.float64),
                           np.einsum("ij,ij->j", A, A, dtype=np.float64)),
                reader(X, rows), n_train):
            hashes.append(h)
            total += s1
            total_sq += s2
        hashes = np.concatenate(hashes)
        ordered = np.sort(hashes)
        if np.any(ordered[1:] == ordered[:-1]):
            distinct = np.concatenate([[True], ordered[1:] != ordered[:-1]])
            if np.count_nonzero(distinct) <= n_lists:
                # At most n_lists distinct rows: one of each is exact.
                _, pos = np.unique(hashes, return_index=True)
                points = gather_rows(X, np.sort(pos) if rows is None else rows[np.sort(pos)])
                with one_openmp_thread():
                    return fit_kmeans(np.ascontiguousarray(points), n_lists)[:2]
        del hashes, ordered
        mean = total / n_train
        tol_abs = float(np.mean(np.maximum(total_sq / n_train - mean**2, 0))) * tol

        n_refine = refine_iterations(max_iter) if max_iter >= 2 else 0
        first = subsample_rows(rows, X.shape[0] if rows is None else n_train,
                               FIRST_STAGE_POINTS * n_lists, rng)
        n_first = n_train if first is None else len(first)
        seeds = np.sort(rng.choice(n_first, size=n_lists, replace=False))
        centroids = np.ascontiguousarray(X[seeds if first is None else first[seeds]])
        # With gather, the stage-1 rows are read from the sample once.
        stage1 = (reader(np.ascontiguousarray(X[first]), None) if gather and first is not None
                  else reader(X, first))
        n_iter = 0
        for read, size, passes in ((stage1, n_first, max_iter - n_refine),
                                   (reader(X, rows), n_train, n_refine)):
            for _ in range(passes):
                centroids, shift = _lloyd_pass(run_tasks, read, size, centroids, buffers)
                n_iter += 1
                if shift <= tol_abs:
                    break
    return centroids, n_iter


# Farthest rows each task of a Lloyd pass keeps, for empty clusters.
STREAM_FAR = 64


class TaskBuffers(threading.local):
    """Buffers each thread reuses from task to task (and pass to pass):
    ``get(name, rows, width, dtype)`` is a (rows, width) array, allocated
    when none of that name is large enough.  A dask worker returns freed
    memory to the system at once (``MALLOC_TRIM_THRESHOLD_``), so a
    temporary allocated per task is page-faulted in again every time:
    the training task's system time doubled."""

    def get(self, name, rows, width, dtype):
        buf = self.__dict__.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != width or buf.dtype != dtype:
            buf = self.__dict__[name] = np.empty((rows, width), dtype=dtype)
        return buf[:rows]


def _lloyd_pass(run_tasks, read, size, centroids, buffers=None):
    """One Lloyd pass over ``size`` rows (task ``sl`` reads ``read(sl)``):
    (new centroids, sum of the squared centre shifts).  ``buffers``: a
    :class:`TaskBuffers` the tasks' temporaries are kept in.  See
    :func:`train_coarse_streamed`."""
    buffers = TaskBuffers() if buffers is None else buffers
    n_lists, d = centroids.shape
    c_norms = np.einsum("ij,ij->i", centroids, centroids)
    # ||a - c||^2 - ||a||^2 = a.(-2c) + ||c||^2; scaling by -2 is exact, so
    # one product and one addition give each block (KMeans's arithmetic).
    scaled = np.ascontiguousarray(-2 * centroids.T)
    step = chunk_rows(n_lists, LLOYD_BLOCK)

    def task(A):
        n = A.shape[0]
        labels = buffers.get("labels", n, 1, np.intp)[:, 0]
        dist = buffers.get("dist", n, 1, np.float64)[:, 0]
        block = buffers.get("block", min(step, n), n_lists, np.result_type(A, scaled))
        for sub in chunk_slices(n, step):
            rows = sub.stop - sub.start
            b = np.matmul(A[sub], scaled, out=block[:rows])
            b += c_norms
            np.argmin(b, axis=1, out=labels[sub])
            dist[sub] = b[np.arange(rows), labels[sub]]
        dist += np.einsum("ij,ij->i", A, A)
        # Per-centre sums in row order (a one-hot sparse product: one pass).
        onehot = sparse.csc_matrix((np.ones(n), labels, np.arange(n + 1)),
                                   shape=(n_lists, n))
        wide = buffers.get("wide", n, d, np.float64)
        wide[...] = A
        sums = np.asarray(onehot @ wide)
        # The STREAM_FAR largest distances, ties by row: those of a stable
        # sort of -dist, found by a partition.
        k = min(STREAM_FAR, n)
        cut = np.partition(dist, n - k)[n - k]
        cand = np.flatnonzero(dist >= cut)
        far = cand[np.argsort(-dist[cand], kind="stable")[:k]]
        return sums, np.bincount(labels, minlength=n_lists), dist[far], A[far]

    sums = np.zeros((n_lists, d), dtype=np.float64)
    counts = np.zeros(n_lists, dtype=np.int64)
    far_d, far_rows = [], []
    for s, c, fd, fr in run_tasks(task, read, size):
        sums += s
        counts += c
        far_d.append(fd)
        far_rows.append(fr)
    new = np.empty_like(centroids)
    full = counts > 0
    new[full] = sums[full] / counts[full, None]
    empty = np.flatnonzero(~full)
    if empty.size:
        far_d, far_rows = np.concatenate(far_d), np.concatenate(far_rows)
        order = np.argsort(-far_d, kind="stable")[:empty.size]
        new[empty[:order.size]] = far_rows[order]
        new[empty[order.size:]] = centroids[empty[order.size:]]
    shift = float(((new.astype(np.float64) - centroids) ** 2).sum())
    return new, shift


# --- assignment, coarse and list terms -------------------------------------

def chunk_rows(width, budget=2**22):
    """Rows per chunk so that a (rows, width) temporary holds ~budget values."""
    return max(1, budget // max(1, width))


def centroid_norms(state, centers):
    """The squared norms of ``centers``, cached in ``state`` (an index's
    runtime state) with the array itself, so that they are computed once
    per ``cluster_centers_`` (a one-row query would otherwise spend as long
    on them as on its own coarse terms)."""
    cached = state.centroid_norms
    if cached is None or cached[0] is not centers:
        cached = (centers, np.einsum("ij,ij->i", centers, centers))
        state.centroid_norms = cached
    return cached[1]


def coarse_terms(Q, centroids, inner_product, c_norms=None):
    """(nq, n_lists): ``||q - c_l||^2``, or ``-<q, c_l>`` for inner products.
    ``c_norms``: the centroids' squared norms, if known."""
    prod = Q @ centroids.T
    if inner_product:
        return np.negative(prod, out=prod)
    prod *= -2
    prod += np.einsum("ij,ij->i", Q, Q)[:, None]
    prod += (np.einsum("ij,ij->i", centroids, centroids) if c_norms is None
             else c_norms)[None, :]
    return prod


def coarse_terms_l2_ip(Q, centroids, c_norms=None):
    """(ranking terms, IP terms) from one product, for lists probed by
    ``||q - c_l||^2`` (the cells are L2 Voronoi cells) and scored with
    inner-product tables, whose entries get ``-<q, c_l>``: the ranking
    terms are ``||c_l||^2 - 2 <q, c_l>`` (the query's ``||q||^2``, the same
    for all its lists, left out)."""
    prod = Q @ centroids.T
    bias = np.negative(prod)
    prod *= -2
    prod += (np.einsum("ij,ij->i", centroids, centroids) if c_norms is None
             else c_norms)[None, :]
    return prod, bias


def assign(X, centroids, out=None, c_norms=None, block=None):
    """Index of the L2-nearest centroid of each row (chunked GEMM).

    ``out``: int array for the labels; ``c_norms``: the centroids' squared
    norms; ``block``: a (rows, n_lists) buffer for the distance blocks
    (``chunk_rows(n_lists)`` rows): given when called chunk after chunk,
    so that nothing is allocated per call.
    """
    labels = np.empty(X.shape[0], dtype=np.int64) if out is None else out
    if c_norms is None:
        c_norms = np.einsum("ij,ij->i", centroids, centroids)
    step = chunk_rows(centroids.shape[0]) if block is None else block.shape[0]
    for sl in chunk_slices(X.shape[0], step):
        d = (np.matmul(X[sl], centroids.T) if block is None
             else np.matmul(X[sl], centroids.T, out=block[:sl.stop - sl.start]))
        d *= -2
        d += c_norms
        if labels.dtype == np.intp:
            np.argmin(d, axis=1, out=labels[sl])
        else:
            labels[sl] = np.argmin(d, axis=1)
    return labels


def spill_lists(X, centroids, labels, spill_lambda, c_norms=None, block=None):
    """The second list of each row of X for spilling (SOAR: Sun et al.,
    "SOAR: improved indexing for approximate nearest neighbor search",
    NeurIPS 2023).

    With ``r = x - c_1`` the residual to the row's own list ``labels[i]``,
    the second list is the ``l != labels[i]`` minimising
    ``||x - c_l||^2 + spill_lambda * <r, x - c_l>^2 / ||r||^2``: the
    orthogonality-amplified residual loss, which prefers a list whose
    residual is orthogonal to ``r``, so that a query missed by one list's
    error is caught by the other's.  Every list is a candidate (two
    (rows, n_lists) products per chunk of ``chunk_rows(n_lists)`` rows,
    the cost of one more assignment); ties go to the smaller list.  A
    row equal to its centroid (``r = 0``) takes its second-nearest list.

    ``labels``: (n,) int, the primary lists; ``c_norms`` and ``block``
    as in :func:`assign`.  Needs at least 2 centroids.  Returns (n,)
    int32.
    """
    n, L = X.shape[0], centroids.shape[0]
    out = np.empty(n, dtype=np.int32)
    if c_norms is None:
        c_norms = np.einsum("ij,ij->i", centroids, centroids)
    lam = centroids.dtype.type(spill_lambda)
    step = chunk_rows(L) if block is None else block.shape[0]
    for sl in chunk_slices(n, step):
        x = np.asarray(X[sl], dtype=centroids.dtype)
        own = np.asarray(labels[sl], dtype=np.intp)
        r = x - centroids[own]
        r_norm2 = np.einsum("ij,ij->i", r, r)
        # ||x - c||^2 up to the row's ||x||^2 (the same for all its lists)
        loss = (np.matmul(x, centroids.T) if block is None
                else np.matmul(x, centroids.T, out=block[:x.shape[0]]))
        loss *= -2
        loss += c_norms
        # <r, x - c> = <r, x> - <r, c>, scaled by sqrt(lambda / ||r||^2)
        par = np.einsum("ij,ij->i", r, x)[:, None] - r @ centroids.T
        scale = np.zeros_like(r_norm2)
        np.divide(lam, r_norm2, out=scale, where=r_norm2 > 0)
        par *= par
        par *= scale[:, None]
        loss += par
        loss[np.arange(x.shape[0]), own] = np.inf
        out[sl] = np.argmin(loss, axis=1)
    return out


# The precomputed L2 list terms are kept while they take at most this
# much memory (n_lists * m * k floats: 48 MiB for 4,096 lists, m=12,
# k=256; 6 GiB for 65,536 lists, m=96); beyond it each probed list's table
# is built from the residual query at search time (k * D multiply-adds).
LIST_TERMS_MAX_BYTES = 512 * 2**20


def list_terms(centroids, codebooks):
    """(n_lists, m, k): ``||r_jc||^2 + 2 <c_l block j, r_jc>``, the part of
    the L2 ADC table that depends on the list but not on the query; (0, m,
    k) when that table would exceed ``LIST_TERMS_MAX_BYTES`` (the search
    then builds each list's table from the residual query)."""
    m, k, ds = codebooks.shape
    if centroids.shape[0] * m * k * codebooks.dtype.itemsize > LIST_TERMS_MAX_BYTES:
        return np.empty((0, m, k), dtype=codebooks.dtype)
    blocks = padded_rows(centroids, codebooks).reshape(centroids.shape[0], m, ds)
    terms = 2 * np.einsum("ljd,jkd->ljk", blocks, codebooks)
    terms += np.einsum("jkd,jkd->jk", codebooks, codebooks)[None]
    return np.ascontiguousarray(terms, dtype=codebooks.dtype)


