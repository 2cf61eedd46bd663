"""The quantizer core shared by every pqsk estimator.

Plain functions on arrays, no estimator state: train codebooks, encode,
decode, build ADC tables and run an exhaustive ADC search.  Inputs are
assumed validated (finite, C-contiguous, float32 or float64); the
estimators do that.

Layout conventions (as in Jégou et al., 2011):

* sub-spaces: the D features are cut into m contiguous sub-spaces of
  nearly equal widths, as ScaNN does: the first ``D % m`` are ``ds =
  ceil(D / m)`` features wide, the others ``D // m`` (``np.array_split``'s
  rule); see :func:`subspace_widths`.  When m divides D every sub-space is
  ``ds = D / m`` wide.
* ``codebooks``: (m, k, ds) array, ``ds = ceil(D / m)``;
  ``codebooks[j, c, :w_j]`` is codeword c of sub-space j (``w_j`` its
  width), and ``codebooks[j, c, w_j:]`` is zero.
* the padded layout: a row of D features is laid out in ``m * ds``
  columns, sub-space j in columns ``j * ds`` to ``j * ds + w_j - 1``,
  followed by zeros (:func:`pad_features`).  Zero columns in both the
  row and the codewords change no squared distance and no inner product,
  so the kernels, which read sub-space j at ``j * ds``, are the same for
  every width; when m divides D the layout is the row itself (no copy).
  The functions below take rows of D features and pad them as needed.
* ``codes``: (n, m) uint8 (k <= 256) or uint16 array, ``codes[i, j]`` is
  the codeword of vector i in sub-space j.
"""

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy import sparse
from sklearn.cluster import KMeans
from sklearn.utils import check_random_state
from threadpoolctl import ThreadpoolController


from . import _adc, _encode, _ivf
from ._store import chunk_slices, rows_per_chunk
from ._utils import release_memory

MAX_CODEWORDS = 65536
# n_codewords="auto": 256 (one byte per sub-space), or half the training
# rows when there are fewer than 512 (at least 1), so that every k-means
# still clusters (two rows per codeword on average).
AUTO_CODEWORDS = 256
# n_subspaces="auto": sub-spaces of about this many features, for 8-bit
# codes (k > 16) and for 4-bit codes (k <= 16); see auto_n_subspaces.
AUTO_WIDTH_8BIT = 2
AUTO_WIDTH_4BIT = 1


def code_dtype(n_codewords):
    """Smallest unsigned integer dtype that holds codes for ``n_codewords``."""
    return np.dtype(np.uint8) if n_codewords <= 256 else np.dtype(np.uint16)


def check_subspaces(n_features, n_subspaces):
    """Raise ValueError when m sub-spaces cannot split ``n_features``
    features (each needs at least one)."""
    if n_subspaces > n_features:
        raise ValueError(
            f"n_subspaces={n_subspaces} is larger than the number of features "
            f"({n_features}); each sub-space needs at least one feature. Use "
            f"n_subspaces <= {n_features} (or n_subspaces='auto')."
        )


def auto_n_subspaces(n_features, n_codewords):
    """m for ``n_subspaces="auto"``: ``ceil(D / 2)`` sub-spaces (about 2
    features each) for 8-bit codes, ``D`` for ``n_codewords <= 16`` (4-bit
    codes): the same ``D / 2`` bytes per vector either way.  Chosen from
    ``benchmarks/bench_defaults.py`` (results/defaults.md): with re-ranking
    (``refine_factor=10``) 4 features per sub-space reach recall@10 0.99 on
    GloVe-50 and uniform data but 0.82 on 64-d Gaussian blobs; 2 reach
    0.98-1.0 on all three."""
    width = AUTO_WIDTH_4BIT if n_codewords <= 16 else AUTO_WIDTH_8BIT
    return max(1, -(-int(n_features) // width))


def subspace_widths(n_features, n_subspaces):
    """Width of each sub-space, (m,) int64: the first ``D % m`` are
    ``ceil(D / m)`` features wide, the others ``D // m``."""
    check_subspaces(n_features, n_subspaces)
    ds, extra = divmod(n_features, n_subspaces)
    widths = np.full(n_subspaces, ds, dtype=np.int64)
    widths[:extra] += 1
    return widths


def subspace_bounds(n_features, n_subspaces):
    """Feature offsets of the sub-spaces, (m + 1,) int64: sub-space j covers
    features ``bounds[j]:bounds[j + 1]``."""
    bounds = np.zeros(n_subspaces + 1, dtype=np.int64)
    np.cumsum(subspace_widths(n_features, n_subspaces), out=bounds[1:])
    return bounds


def padded_width(n_features, n_subspaces):
    """``m * ceil(D / m)``: the columns of the padded layout."""
    return n_subspaces * -(-n_features // n_subspaces)


def pad_features(X, n_subspaces, out=None):
    """Rows of X (n, D) in the padded layout (see the module docstring),
    C-contiguous (n, m * ceil(D / m)); X itself (made C-contiguous) when
    m divides D.  ``out``: a buffer of that shape to write into."""
    n, d = X.shape
    m = n_subspaces
    if d % m == 0:
        return np.ascontiguousarray(X)
    ds, extra = -(-d // m), d % m
    if out is None:
        out = np.empty((n, m * ds), dtype=X.dtype)
    # The first ``extra`` sub-spaces are full: one contiguous block.
    out[:, :extra * ds] = X[:, :extra * ds]
    blocks = out[:, extra * ds:].reshape(n, m - extra, ds)
    blocks[:, :, :ds - 1] = X[:, extra * ds:].reshape(n, m - extra, ds - 1)
    blocks[:, :, ds - 1] = 0
    return out


def unpad_features(Y, n_features, n_subspaces):
    """Inverse of :func:`pad_features`: the (n, D) rows of the padded rows Y."""
    n = Y.shape[0]
    d, m = n_features, n_subspaces
    if d % m == 0:
        return Y
    ds, extra = -(-d // m), d % m
    out = np.empty((n, d), dtype=Y.dtype)
    out[:, :extra * ds] = Y[:, :extra * ds]
    out[:, extra * ds:].reshape(n, m - extra, ds - 1)[...] = (
        Y[:, extra * ds:].reshape(n, m - extra, ds)[:, :, :ds - 1])
    return out


def padded_rows(X, codebooks):
    """X in the padded layout of ``codebooks`` (m, k, ds): X itself when it
    already has ``m * ds`` columns (m divides D, or X is padded), else
    :func:`pad_features`; ValueError when X's width does not fit."""
    m, _, ds = codebooks.shape
    d = X.shape[1]
    if d == m * ds:
        return X
    if not (m <= d < m * ds and -(-d // m) == ds):
        raise ValueError(f"rows of {d} features do not fit codebooks of shape "
                         f"{codebooks.shape}")
    return pad_features(X, m)


def n_features_of(codebooks, n_features=None):
    """D of codebooks (m, k, ds): ``n_features`` checked, or m * ds."""
    m, _, ds = codebooks.shape
    if n_features is None:
        return m * ds
    if not (m <= n_features <= m * ds and -(-n_features // m) == ds):
        raise ValueError(f"codebooks of shape {codebooks.shape} do not split "
                         f"{n_features} features")
    return int(n_features)


def zero_padding(codebooks, n_features):
    """Set the columns of ``codebooks`` beyond each sub-space's width to 0
    (in place); returns codebooks."""
    m, _, ds = codebooks.shape
    widths = subspace_widths(n_features, m)
    for j in np.flatnonzero(widths < ds):
        codebooks[j, :, widths[j]:] = 0
    return codebooks


def padding_is_zero(codebooks, n_features):
    """Whether every column beyond a sub-space's width is 0."""
    m, _, ds = codebooks.shape
    widths = subspace_widths(n_features, m)
    return all(not np.any(codebooks[j, :, widths[j]:]) for j in np.flatnonzero(widths < ds))


def check_codewords(n_codewords, n_samples):
    if n_codewords > MAX_CODEWORDS:
        raise ValueError(
            f"n_codewords={n_codewords} is larger than {MAX_CODEWORDS}, the "
            "most a uint16 code can hold; use n_codewords <= 65536 (256 gives "
            "one byte per sub-space)."
        )
    if n_codewords > n_samples:
        raise ValueError(
            f"n_codewords={n_codewords} must be <= the number of training "
            f"samples, got n_samples={n_samples}; use fewer codewords or more "
            "training data."
        )


def training_sample(X, max_train_samples, random_state):
    """At most ``max_train_samples`` rows of X, drawn without replacement,
    as an array.

    X is an array or a :class:`~pqsk._store.FitRows`; the sample is
    gathered at sorted row numbers, so a memmap is read in file order and
    only the sampled rows are read.  The sample is the one array of
    training data held in memory (``max_train_samples x n_features``).
    """
    n = X.shape[0]
    if max_train_samples is None or n <= max_train_samples:
        return np.asarray(X)
    rows = np.sort(random_state.choice(n, size=max_train_samples, replace=False))
    return X[rows]


def row_chunks(X):
    """(slice, C-contiguous rows) pairs covering the rows of X in order: a
    :class:`~pqsk._store.FitRows` hands out its prepared chunks, an array
    is cut into chunks of ``rows_per_chunk`` rows."""
    if hasattr(X, "chunks"):
        yield from X.chunks()
        return
    step = rows_per_chunk(X.shape[1] * X.dtype.itemsize)
    for sl in chunk_slices(X.shape[0], step):
        yield sl, np.ascontiguousarray(X[sl])


# --- k-means training -------------------------------------------------------
#
# Every k-means in pqsk (the sub-space codebooks and the coarse quantizer) is
# trained on a sample of at most 256 rows per centroid
# (``max_train_samples="auto"``, as faiss samples), and run in two stages when
# that sample is large:
#
# 1. KMeans(init, n_init, tol) for ``max_iter - refine_iterations(max_iter)``
#    iterations on a random subset of FIRST_STAGE_POINTS = 64 rows per
#    centroid;
# 2. ``refine_iterations(max_iter) = ceil(max_iter / 4)`` Lloyd iterations on
#    the whole sample, started from those centres (same tol).
#
# So max_iter still bounds the Lloyd iterations of a k-means, both stages
# together.  Stage 2 runs only when the sample has more than
# 2 * FIRST_STAGE_POINTS rows per centroid and max_iter >= 2; otherwise one
# KMeans(max_iter) clusters the whole sample.  With the defaults (k=256,
# 65,536 rows: 18 iterations on 16,384 rows, then 7 on all) a sub-space costs
# about 13 Lloyd passes over the sample instead of 26, for a reconstruction
# error ~0.5% above that of 25 iterations on every row (GloVe-50, m=10;
# ``python -m benchmarks.bench_train``).  To trade time for accuracy, raise
# max_iter (stage 2 gets a quarter of it); a training sample of at most
# 128 * k rows (max_train_samples <= 128 * k) is clustered in one stage.
#
# The schedule runs on scikit-learn's KMeans (fit_kmeans), except the coarse
# quantizer of a large problem (see "inverted file" below: pqsk's own Lloyd
# passes in fixed tasks).  Results do not depend on n_jobs: KMeans sums each
# centre in per-thread partial sums, so its output changes with the OpenMP
# thread count; every KMeans runs on one thread, and n_jobs only runs
# independent fits (the sub-spaces) side by side.

FIRST_STAGE_POINTS = 64
REFINE_DIVISOR = 4

_OPENMP_CONTROLLER = None


def one_openmp_thread():
    """Context manager: OpenMP limited to one thread in the calling thread
    (the limit is per thread).  The library scan is done once."""
    global _OPENMP_CONTROLLER
    if _OPENMP_CONTROLLER is None:
        _OPENMP_CONTROLLER = ThreadpoolController()
    return _OPENMP_CONTROLLER.limit(limits=1, user_api="openmp")


def one_blas_thread():
    """Context manager: BLAS limited to one thread (process-wide), so that
    a matrix product's result does not depend on the thread count."""
    global _OPENMP_CONTROLLER
    if _OPENMP_CONTROLLER is None:
        _OPENMP_CONTROLLER = ThreadpoolController()
    return _OPENMP_CONTROLLER.limit(limits=1, user_api="blas")


def refine_iterations(max_iter):
    """Stage-2 Lloyd iterations of a k-means allowed ``max_iter`` in all."""
    return -(-max_iter // REFINE_DIVISOR)


def fit_kmeans(X, n_clusters, *, init="random", n_init=1, max_iter=25, tol=1e-4,
               random_state=None):
    """Centroids of the rows of X by the KMeans schedule described above.

    KMeans runs on distinct rows weighted by their counts (the same
    objective, but initial centres are never duplicates); when X has at
    most ``n_clusters`` distinct rows they are the centroids (exact), the
    rest padded with the first.  The caller limits OpenMP to one thread.
    KMeans centres its input in place (and restores it) when that input is
    an array made here (not X): no second copy of the sample.

    Returns
    -------
    centroids : ndarray of shape (n_clusters, n_features), dtype of X
    n_iter : int
        Lloyd iterations run, both stages (0 for the exact case).
    n_distinct : int or None
        Number of distinct rows when they were used as the centroids.
    """
    n = X.shape[0]
    n_first = FIRST_STAGE_POINTS * n_clusters
    two_stage = n > 2 * n_first and max_iter >= 2
    n_refine = refine_iterations(max_iter) if two_stage else 0
    if two_stage:
        rng = check_random_state(random_state)
        first = X[np.sort(rng.choice(n, size=n_first, replace=False))]
        points, counts = distinct_rows(first)
        if points.shape[0] <= n_clusters:
            # Few distinct rows: whether there are more than n_clusters in
            # the whole sample decides; one stage either way.
            two_stage, n_refine = False, 0
            points, counts = distinct_rows(X)
    else:
        rng = random_state
        points, counts = distinct_rows(X)
    if points.shape[0] <= n_clusters:
        centroids = np.empty((n_clusters, X.shape[1]), dtype=X.dtype)
        centroids[:points.shape[0]] = points
        centroids[points.shape[0]:] = points[0]  # unused padding
        return centroids, 0, points.shape[0]
    km = KMeans(n_clusters=n_clusters, init=init, n_init=n_init,
                max_iter=max_iter - n_refine, tol=tol, random_state=rng,
                copy_x=np.may_share_memory(points, X))
    km.fit(points, sample_weight=None if counts is None else counts.astype(X.dtype))
    n_iter = km.n_iter_
    if two_stage:
        # Same objective on the whole sample; its distinct rows only when the
        # subset already had duplicates (the check costs a pass of its own).
        points, counts = (np.ascontiguousarray(X), None) if counts is None else distinct_rows(X)
        km = KMeans(n_clusters=n_clusters, init=km.cluster_centers_, n_init=1,
                    max_iter=n_refine, tol=tol)
        km.fit(points, sample_weight=None if counts is None else counts.astype(X.dtype))
        n_iter += km.n_iter_
    return np.ascontiguousarray(km.cluster_centers_, dtype=X.dtype), n_iter, None


def train_codebooks(
    X,
    n_subspaces,
    n_codewords,
    *,
    init="random",
    max_iter=25,
    n_init=1,
    tol=1e-4,
    random_state=None,
    n_threads=1,
    progress=None,
):
    """Train one :class:`~sklearn.cluster.KMeans` per sub-space.

    Each sub-space is clustered by :func:`fit_kmeans` (the two-stage
    schedule described above it), on one OpenMP thread and with its own
    seed drawn from ``random_state``; the m independent fits run in up to
    ``n_threads`` Python threads (KMeans releases the GIL), so the
    codebooks do not depend on ``n_threads``.  When a sub-space has at
    most k distinct sub-vectors, they are its codewords and its
    quantization is exact.

    Sub-space j is features ``subspace_bounds(D, m)[j:j + 2]`` of X (m
    need not divide D).

    Returns
    -------
    codebooks : ndarray of shape (m, k, ceil(D / m)), dtype of X
        Zero beyond each sub-space's width.
    n_iter : ndarray of shape (m,), int
        Lloyd iterations run in each sub-space (both stages).
    """
    n, d = X.shape
    check_subspaces(d, n_subspaces)
    check_codewords(n_codewords, n)
    bounds = subspace_bounds(d, n_subspaces)
    ds = -(-d // n_subspaces)
    rng = check_random_state(random_state)
    seeds = rng.randint(np.iinfo(np.int32).max, size=n_subspaces)
    # Zero beyond each sub-space's width (the padded layout).
    codebooks = np.zeros((n_subspaces, n_codewords, ds), dtype=X.dtype)
    n_iter = np.zeros(n_subspaces, dtype=np.int64)

    def fit_one(j):
        lo, hi = bounds[j], bounds[j + 1]
        # OpenMP thread limits are per thread: set this fit's own.
        with one_openmp_thread():
            codebooks[j, :, :hi - lo], n_iter[j], n_distinct = fit_kmeans(
                X[:, lo:hi], n_codewords, init=init, n_init=n_init,
                max_iter=max_iter, tol=tol, random_state=seeds[j],
            )
        if progress is not None:
            progress(f"sub-space {j + 1}/{n_subspaces}: " + (
                f"{n_distinct} distinct sub-vectors, used as codewords"
                if n_distinct is not None else f"{n_iter[j]} iterations"), level=2)

    workers = max(1, min(n_threads, n_subspaces))
    if workers == 1:
        for j in range(n_subspaces):
            fit_one(j)
    else:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            list(ex.map(fit_one, range(n_subspaces)))
    return codebooks, n_iter


def distinct_rows(A):
    """(distinct rows of A, their counts), or (A, None) when all differ.

    A 64-bit hash of each row's bytes answers the common case (no two rows
    alike) with one 1-D sort; only when hashes collide does the exact, and
    slower, ``np.unique(axis=0)`` run.
    """
    A = np.ascontiguousarray(A)
    h = row_hashes(A)
    h.sort()  # np.unique(h) costs ~50x this sort plus comparison (numpy 2.4)
    if not np.any(h[1:] == h[:-1]):
        return A, None
    return np.unique(A, axis=0, return_counts=True)


def row_hashes(A):
    """A 64-bit hash of the bytes of each row of the C-contiguous array A."""
    words = A.view(np.uint8).reshape(A.shape[0], -1)
    words = words.view(np.uint32) if words.shape[1] % 4 == 0 else words
    h = np.zeros(A.shape[0], dtype=np.uint64)
    with np.errstate(over="ignore"):
        for col in words.T:  # in place: no temporary per column
            h *= np.uint64(0x9E3779B97F4A7C15)
            h += col
    return h


def scratch(n_threads, width, dtype):
    """Per-thread scratch rows, (n_threads, >= width), each padded to whole
    64-byte cache lines plus one, so that no two threads' used parts share
    a cache line (false sharing made 2 threads slower than 1)."""
    per_line = max(1, 64 // np.dtype(dtype).itemsize)
    padded = (-(-max(int(width), 1) // per_line) + 1) * per_line
    return np.empty((max(int(n_threads), 1), padded), dtype=dtype)


def _transposed(codebooks):
    """(m, k, ds) -> (m, ds, k), the layout the kernels vectorise over."""
    return np.ascontiguousarray(codebooks.transpose(0, 2, 1))


def encode_rows(X, codebooks, n_threads=1, threshold=None):
    """PQ codes of the rows of X, an array or a :class:`~pqsk._store.FitRows`,
    encoded chunk by chunk (see :func:`row_chunks`)."""
    m, k, _ = codebooks.shape
    codes = np.empty((X.shape[0], m), dtype=code_dtype(k))
    for sl, chunk in row_chunks(X):
        codes[sl] = encode(chunk, codebooks, n_threads, threshold)
    return codes


def encode(X, codebooks, n_threads=1, threshold=None, directions=None):
    """PQ codes of the rows of X: (n, m) array of ``code_dtype(k)``.

    With ``threshold`` (the anisotropic threshold T) the codes minimise
    the anisotropic loss of :mod:`pqsk._anisotropic`, whose directions are
    the rows of ``directions`` (default X); otherwise the nearest codeword
    of each sub-vector.
    """
    m, k, _ = codebooks.shape
    X = np.ascontiguousarray(X, dtype=codebooks.dtype)
    if threshold is not None:
        from ._anisotropic import anisotropic_encode

        return anisotropic_encode(X, codebooks, threshold, directions, n_threads=n_threads)
    X = padded_rows(X, codebooks)
    n_threads = max(1, min(n_threads, X.shape[0] // 64))  # rows are cheap: few threads
    codes = np.empty((X.shape[0], m), dtype=code_dtype(k))
    work = scratch(n_threads, m * k, codebooks.dtype)
    _encode.encode(X, _transposed(codebooks), codes, work, n_threads)
    return codes


def decode(codes, codebooks, n_features=None):
    """Reconstruction of each code: (n, D) array of the codebooks' dtype,
    D = ``n_features``; by default (None) the padded layout, ``m * ds``
    columns (the same when m divides D)."""
    m, _, ds = codebooks.shape
    d = n_features_of(codebooks, n_features)
    out = np.empty((codes.shape[0], m * ds), dtype=codebooks.dtype)
    for j in range(m):
        np.take(codebooks[j], codes[:, j], axis=0, out=out[:, j * ds:(j + 1) * ds])
    return unpad_features(out, d, m) if d != m * ds else out


def adc_tables(Q, codebooks, inner_product=False, n_threads=1):
    """ADC lookup tables, (nq, m, k): squared L2 distances between each
    query's sub-vectors and the codewords, or minus their dot products."""
    m, k, _ = codebooks.shape
    Q = padded_rows(np.ascontiguousarray(Q, dtype=codebooks.dtype), codebooks)
    tables = np.empty((Q.shape[0], m, k), dtype=codebooks.dtype)
    _adc.adc_tables(Q, _transposed(codebooks), bool(inner_product), tables, n_threads)
    return tables


def _blocked_args(blocked, nq, n):
    """(mask, stride) for the kernels from a :class:`pqsk._filter.Blocked`
    (or None), its length checked against nq queries over n rows."""
    if blocked is None:
        return None, 0
    mask, stride = blocked.mask, int(blocked.stride)
    if not (mask.dtype == np.uint8 and mask.ndim == 1 and mask.flags.c_contiguous
            and (mask.shape[0] >= n if stride == 0
                 else stride >= n and mask.shape[0] >= nq * stride)):
        raise ValueError("the filter mask does not cover the queries and rows")
    return mask, stride


def adc_search(Q, codebooks, codes, n_neighbors, inner_product=False, n_threads=1,
               blocked=None):
    """Exhaustive ADC search over every code.

    ``blocked`` (filtered search, a :class:`pqsk._filter.Blocked` over the
    rows of ``codes``): rows never returned.

    Returns
    -------
    dist : ndarray of shape (nq, n_neighbors), codebooks' dtype
        Sum of table entries (squared L2, or minus the inner product).
    idx : ndarray of shape (nq, n_neighbors), int64
        Row numbers into ``codes``, sorted by (dist, idx).
    """
    m, k, _ = codebooks.shape
    Q = padded_rows(np.ascontiguousarray(Q, dtype=codebooks.dtype), codebooks)
    nq = Q.shape[0]
    dist = np.empty((nq, n_neighbors), dtype=codebooks.dtype)
    idx = np.empty((nq, n_neighbors), dtype=np.int64)
    mask, stride = _blocked_args(blocked, nq, codes.shape[0])
    _adc.adc_search(
        Q, _transposed(codebooks), np.ascontiguousarray(codes), bool(inner_product),
        dist, idx, scratch(n_threads, m * k, codebooks.dtype),
        scratch(n_threads, n_neighbors, codebooks.dtype),
        scratch(n_threads, n_neighbors, np.int64), n_threads, mask, stride,
    )
    return dist, idx


# --- inverted file: coarse quantizer and lists ---------------------------------
#
# The coarse k-means follows the two-stage schedule of fit_kmeans, by one
# of two implementations chosen by the size of the problem (never by the
# thread count):
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
# list.  One-thread CPU seconds of the coarse k-means, KMeans vs the tasks
# (coarse_max_iter=10, 256 rows per list, unit-norm rows, 2-core AMD EPYC;
# ``python -m benchmarks.bench_dask --coarse``, results/dask.md): 96-d,
# 1,024 lists: 4.75 vs 2.87; 96-d, 256 lists: 0.31 vs 0.24; 16-d, 1,024
# lists: 1.83 vs 0.86; 96-d, 128 lists (2**22): 0.09 vs 0.08.  So from
# the threshold on a one-thread fit is faster, and a fit with more threads
# (n_jobs, or the training task of pqsk.dask.ShardedNeighbors) runs the
# coarse k-means on all of them (96-d, 1,024 lists: 1.8 s wall on 2
# threads with the second core free, 3.0 s when another job held it).
LLOYD_THRESHOLD = 2**24
# The sample is gathered in memory up to this (one Lloyd pass then costs
# less than ~2**28 distance evaluations, a second or so on one thread);
# beyond it each pass streams its rows from X.
STREAMED_THRESHOLD = 2**28
# Sample rows per task of a Lloyd pass (fixed: the centroids depend on it).
STREAM_TASK_ROWS = 16384
# Distance values a task's (rows, n_lists) block holds: 2**19 (2 MiB of
# float32) kept the block in cache, ~20% faster than 2**22.
LLOYD_BLOCK = 2**19


def sample_rows(n, max_samples, random_state):
    """Sorted numbers of at most ``max_samples`` of ``n`` rows drawn without
    replacement, or None when every row is taken (``n <= max_samples``)."""
    if max_samples is None or n <= max_samples:
        return None
    return np.sort(random_state.choice(n, size=max_samples, replace=False))


def subsample_rows(rows, n, max_samples, random_state):
    """At most ``max_samples`` of the row numbers ``rows`` (None: all ``n``
    rows), drawn as :func:`training_sample` draws from a sample."""
    sub = sample_rows(n if rows is None else len(rows), max_samples, random_state)
    if sub is None:
        return rows
    return sub if rows is None else rows[sub]


def gather_rows(X, rows):
    """``X[rows]`` as an array (every row when ``rows`` is None)."""
    return np.asarray(X) if rows is None else X[rows]


def train_coarse(X, n_lists, *, rows=None, max_iter=25, tol=1e-4, random_state=None,
                 n_threads=1):
    """Coarse centroids, (n_lists, D), and the Lloyd iterations run.

    The training sample is ``X[rows]`` (every row of X when ``rows`` is
    None); X is an array or a :class:`~pqsk._store.FitRows`.  Below
    ``LLOYD_THRESHOLD`` (sample rows x ``n_lists``, see there)
    :func:`fit_kmeans` (KMeans on one thread, random init, the two-stage
    schedule) clusters the sample; from it on :func:`train_coarse_streamed`
    follows the same schedule in fixed tasks, ``n_threads`` side by side,
    on the sample gathered in memory up to ``STREAMED_THRESHOLD`` and
    streamed from X beyond.  The centroids do not depend on ``n_threads``.
    """
    rng = check_random_state(random_state)
    n_train = X.shape[0] if rows is None else len(rows)
    work = n_train * n_lists
    streamed = work > STREAMED_THRESHOLD  # tested first: it bounds memory
    if streamed or work >= LLOYD_THRESHOLD:
        return train_coarse_streamed(X, rows, n_lists, max_iter=max_iter, tol=tol,
                                     random_state=rng, n_threads=n_threads,
                                     gather=not streamed)
    with one_openmp_thread():
        centroids, n_iter, _ = fit_kmeans(gather_rows(X, rows), n_lists,
                                          max_iter=max_iter, tol=tol, random_state=rng)
    return centroids, n_iter


def train_coarse_streamed(X, rows, n_lists, *, max_iter=25, tol=1e-4, random_state=None,
                          n_threads=1, gather=False):
    """The two-stage k-means of :func:`fit_kmeans` on ``X[rows]`` (every
    row of X when ``rows`` is None), in fixed tasks of rows.

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

def chunk_rows(width, budget=2**22):
    """Rows per chunk so that a (rows, width) temporary holds ~budget values."""
    return max(1, budget // max(1, width))


def coarse_terms(Q, centroids, inner_product):
    """(nq, n_lists): ``||q - c_l||^2``, or ``-<q, c_l>`` for inner products."""
    prod = Q @ centroids.T
    if inner_product:
        return np.negative(prod, out=prod)
    prod *= -2
    prod += np.einsum("ij,ij->i", Q, Q)[:, None]
    prod += np.einsum("ij,ij->i", centroids, centroids)[None, :]
    return prod


def coarse_terms_l2_ip(Q, centroids):
    """(ranking terms, IP terms) from one product, for lists probed by
    ``||q - c_l||^2`` (the cells are L2 Voronoi cells) and scored with
    inner-product tables, whose entries get ``-<q, c_l>``: the ranking
    terms are ``||c_l||^2 - 2 <q, c_l>`` (the query's ``||q||^2``, the same
    for all its lists, left out)."""
    prod = Q @ centroids.T
    bias = np.negative(prod)
    prod *= -2
    prod += np.einsum("ij,ij->i", centroids, centroids)[None, :]
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


def encode_residuals(X, labels, centroids, codebooks, n_threads=1, threshold=None):
    """PQ codes of ``X - centroids[labels]``, computed chunk by chunk (an
    anisotropic loss, with ``threshold``, has the rows of X as directions)."""
    m, k, _ = codebooks.shape
    codes = np.empty((X.shape[0], m), dtype=code_dtype(k))
    for sl, chunk in row_chunks(X):
        codes[sl] = encode(chunk - centroids[labels[sl]], codebooks, n_threads, threshold,
                           chunk)
    return codes


def assign_encode(X, centroids, codebooks, n_threads=1, threshold=None):
    """Coarse list and residual PQ code of each row of X, in one pass.

    X is an array or a :class:`~pqsk._store.FitRows` (a memmap's rows are
    read once, chunk by chunk).  Per chunk: the nearest centroid of each
    row (:func:`assign`), then the PQ codes of the residuals.  Working
    memory: a few chunks, whatever the number of rows.

    With ``threshold`` the residuals are encoded for the anisotropic loss
    whose directions are the rows themselves (the score is ``<q, x>``).

    Returns
    -------
    labels : ndarray of shape (n,), int32
        Index of each row's L2-nearest centroid (its list).
    codes : ndarray of shape (n, m), ``code_dtype(k)``
        PQ codes of ``row - centroids[label]``.
    """
    m, k, _ = codebooks.shape
    n = X.shape[0]
    labels = np.empty(n, dtype=np.int32 if centroids.shape[0] < 2**31 else np.int64)
    codes = np.empty((n, m), dtype=code_dtype(k))
    # Buffers reused chunk after chunk: a pass allocates them once.
    c_norms = np.einsum("ij,ij->i", centroids, centroids)
    block = np.empty((min(n, chunk_rows(centroids.shape[0])), centroids.shape[0]),
                     dtype=centroids.dtype)
    lab = residuals = None
    for sl, chunk in row_chunks(X):
        rows = sl.stop - sl.start
        if residuals is None:
            lab = np.empty(rows, dtype=np.intp)
            residuals = np.empty((rows, centroids.shape[1]), dtype=centroids.dtype)
        assign(chunk, centroids, out=lab[:rows], c_norms=c_norms, block=block)
        labels[sl] = lab[:rows]
        np.take(centroids, lab[:rows], axis=0, out=residuals[:rows])
        np.subtract(chunk, residuals[:rows], out=residuals[:rows])
        codes[sl] = encode(residuals[:rows], codebooks, n_threads, threshold, chunk)
    if n > rows_per_chunk(X.shape[1] * codebooks.dtype.itemsize):
        release_memory()  # the chunks' temporaries, before the caller's next step
    return labels, codes


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


def ivf_search(Q, coarse, codebooks, terms, segments, n_neighbors,
               n_probe, inner_product=False, n_threads=1, growing=None, deleted=None,
               centroids=None, fastscan_margin=None, fastscan_estimate=False,
               fastscan_rescore=True, deleted_stride=0, coarse_bias=None):
    """Search ``n_probe`` lists per query (see ``pqsk._ivf``).

    ``segments``: a list of (codes, ids, offsets), each sorted list after
    list (codes C-contiguous (n_s, m), ids (n_s,), offsets (n_lists + 1,)
    int64), all with the same code and id dtypes; or, for 4-bit codes
    (n_codewords = 16, m <= ``_fastscan.MAX_SUBSPACES``), (packed, ids,
    offsets, blocks): the codes in the fast-scan layout, list l in blocks
    ``blocks[l]:blocks[l + 1]`` (see :func:`pack_lists4`), scanned with the
    block kernel ``_fastscan`` selected; ``fastscan_margin`` as in
    :func:`fastscan_search` (None: exact); ``fastscan_estimate``: rank the
    packed entries by their quantized estimates and re-score only the
    ``n_neighbors`` kept (see ``pqsk._ivf.ivf_search``; the margin is then
    unused for those lists); with ``fastscan_rescore=False`` the packed
    entries' distances are those estimates (for a caller that re-ranks).  ``growing``: (codes,
    ids, lists) of entries in arrival order (lists int32), scanned with
    the lists they belong to; ``deleted``: uint8 tombstones by id, or None;
    with ``deleted_stride`` > 0, one row of them per query (filtered
    search: query q reads ``deleted[q * deleted_stride:]``).
    ``centroids`` (n_lists, D) are needed for L2 when ``terms`` is empty
    (see :func:`list_terms`).  ``coarse_bias`` (nq, n_lists), or None:
    the terms added to each list's entries when ``coarse`` only orders the
    lists (see :func:`coarse_terms_l2_ip`).

    Returns (dist, idx): (nq, n_neighbors) arrays, rows sorted by
    (distance, id); ``dist`` as in :func:`adc_search` (squared L2 or minus
    the inner product, coarse term included).  Slots never filled (fewer
    live indexed vectors than n_neighbors) hold (+inf, INT64_MAX).
    """
    m, k, _ = codebooks.shape
    nq = Q.shape[0]
    dtype = codebooks.dtype
    nt = max(n_threads, 1)
    # The kernel reads queries and centroids in the padded layout (a copy
    # only when m does not divide D; the centroids are read only for L2
    # without the list terms).
    Q = padded_rows(np.ascontiguousarray(Q, dtype=dtype), codebooks)
    if centroids is not None and (inner_product or terms.shape[0] != 0):
        centroids = None
    if centroids is not None:
        centroids = padded_rows(np.ascontiguousarray(centroids, dtype=dtype), codebooks)
    if deleted is not None and deleted_stride:
        if not (deleted.dtype == np.uint8 and deleted.ndim == 1
                and deleted.flags.c_contiguous and deleted.shape[0] >= nq * deleted_stride):
            raise ValueError("per-query tombstones do not cover the queries")
    if growing is None:
        codes, ids = segments[0][:2]
        if len(segments[0]) == 4:
            codes = np.empty((0, m), dtype=code_dtype(k))
        growing = (codes[:0], ids[:0], np.empty(0, np.int32))
    g_codes, g_ids, g_lists = growing
    g = g_codes.shape[0]
    n_lists = coarse.shape[1]
    if centroids is None:
        centroids = np.empty((0, Q.shape[1]), dtype=dtype)
    centroids = np.ascontiguousarray(centroids, dtype=dtype)
    if not inner_product and terms.shape[0] != n_lists and (
            terms.shape[0] != 0 or centroids.shape != (n_lists, Q.shape[1])):
        raise ValueError("L2 search needs the list terms or the centroids")
    # The kernel reads each segment through its data pointer: check here
    # what it trusts (dtypes, contiguity, sizes).
    seg_codes = np.empty(len(segments), dtype=np.uintp)
    seg_ids = np.empty(len(segments), dtype=np.uintp)
    seg_offsets = np.empty((len(segments), n_lists + 1), dtype=np.int64)
    seg_packed = np.zeros(len(segments), dtype=np.uintp)
    seg_blocks = np.zeros((len(segments), n_lists + 1), dtype=np.int64)
    seg_base = np.zeros(len(segments) + 1, dtype=np.int64)
    for s, seg in enumerate(segments):
        seg_base[s + 1] = seg_base[s] + seg[1].shape[0]
        if len(seg) == 4:
            from . import _fastscan

            packed, ids, offsets, blocks = seg
            n_l = np.diff(offsets) if offsets.shape == (n_lists + 1,) else None
            if not (k == 16 and m <= _fastscan.MAX_SUBSPACES and packed.dtype == np.uint8
                    and ids.dtype == g_ids.dtype and packed.flags.c_contiguous
                    and ids.flags.c_contiguous and n_l is not None
                    and offsets[0] == 0 and offsets[-1] == ids.shape[0]
                    and blocks.shape == (n_lists + 1,) and blocks[0] == 0
                    and packed.shape == (blocks[-1], (m + 1) // 2, FASTSCAN_BLOCK)
                    and bool(np.all(np.diff(blocks) == -(-n_l // FASTSCAN_BLOCK)))):
                raise ValueError("packed segment arrays do not match")
            seg_packed[s] = packed.ctypes.data if packed.size else 0
            seg_ids[s] = ids.ctypes.data
            seg_offsets[s] = offsets
            seg_blocks[s] = blocks
            continue
        codes, ids, offsets = seg
        if not (codes.dtype == g_codes.dtype and ids.dtype == g_ids.dtype
                and codes.flags.c_contiguous and ids.flags.c_contiguous
                and codes.shape == (ids.shape[0], m) and offsets.shape == (n_lists + 1,)
                and offsets[-1] == ids.shape[0]):
            raise ValueError("segment arrays do not match the growing part")
        seg_codes[s] = codes.ctypes.data
        seg_ids[s] = ids.ctypes.data
        seg_offsets[s] = offsets
    packs = any(len(seg) == 4 for seg in segments)
    kernel, prep = 0, 0
    if packs:
        from . import _fastscan

        kernel, prep = _fastscan._kernel()
    dist = np.empty((nq, n_neighbors), dtype=dtype)
    idx = np.empty((nq, n_neighbors), dtype=np.int64)
    extra = FASTSCAN_EXTRA(n_neighbors) if fastscan_estimate and fastscan_rescore else 0
    slot_of = scratch(nt, n_lists, np.int32)
    slot_of.fill(-1)
    # The reservoirs (probes, then estimates) hold twice the entries kept.
    res_cap = 2 * max(n_probe, n_neighbors + extra)
    _ivf.ivf_search(
        np.ascontiguousarray(Q, dtype=dtype), np.ascontiguousarray(coarse, dtype=dtype),
        _transposed(codebooks), terms, centroids, seg_codes, seg_ids, seg_offsets, seg_packed,
        seg_blocks, g_codes, g_ids,
        g_lists,
        _NO_TOMBSTONES if deleted is None else deleted, bool(inner_product),
        n_probe, dist, idx, scratch(nt, 2 * m * k + Q.shape[1], dtype),
        scratch(nt, 2 * n_probe, dtype),
        scratch(nt, n_probe, np.int64), scratch(nt, n_neighbors, dtype),
        scratch(nt, n_neighbors, np.int64), slot_of, scratch(nt, g, np.int64),
        scratch(nt, g, np.int64), scratch(nt, n_probe + 1, np.int64),
        scratch(nt, (m + 1) // 2 * 32 if packs else 1, np.uint8),
        scratch(nt, (m + 1) // 2 * 256 if packs else 1, np.uint16),
        scratch(nt, 4, np.float64), kernel, prep,
        -1.0 if fastscan_margin is None else float(fastscan_margin),
        bool(fastscan_estimate), extra, bool(fastscan_rescore), seg_base,
        scratch(nt, 2 * res_cap, np.float64), scratch(nt, 4 * res_cap, np.int64),
        scratch(nt, 8, np.int64), n_threads, int(deleted_stride) if deleted is not None else 0,
        None if coarse_bias is None else np.ascontiguousarray(coarse_bias, dtype=dtype),
    )
    return dist, idx


_NO_TOMBSTONES = np.empty(0, np.uint8)


def exact_rerank(Q, vectors, cand, n_neighbors, inner_product=False, unit_norm=False,
                 n_threads=1):
    """Re-rank candidate ids by exact distance to the raw ``vectors``.

    ``vectors`` is an array or a :class:`~pqsk._store.RowStore`; only the
    candidate rows are read (the kernel ``pqsk._rerank`` reads them in
    place, prefetching ahead).  With ``unit_norm`` (cosine) each row is
    scaled to unit norm first.  ``cand`` is (nq, n_cand) int64; ids
    outside ``[0, len(vectors))`` (empty slots) sort last.  Returns (dist,
    idx) of shape (nq, n_neighbors), rows sorted by (exact distance, id);
    distances are squared L2 or minus the inner product, in the dtype of
    ``vectors``; slots no valid candidate fills hold (+inf, INT64_MAX).
    The naive version is :func:`pqsk._naive.exact_rerank`.
    """
    from . import _rerank

    dtype = vectors.dtype
    parts = vectors.chunks if hasattr(vectors, "chunks") else (vectors,)
    # The kernel reads each part through its address: C-contiguous rows of
    # the queries' dtype (a part that is not is copied, which only a
    # caller passing such an array pays).
    parts = [p if (p.dtype == dtype and p.flags.c_contiguous) else
             np.ascontiguousarray(p, dtype=dtype) for p in parts if p.shape[0]]
    if not parts:
        parts = [np.empty((0, Q.shape[1]), dtype=dtype)]
    part_ptr = np.array([p.ctypes.data for p in parts], dtype=np.uintp)
    part_start = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([p.shape[0] for p in parts], out=part_start[1:])
    cand = np.ascontiguousarray(cand, dtype=np.int64)
    nq = cand.shape[0]
    nt = max(1, n_threads)
    dist = np.empty((nq, n_neighbors), dtype=dtype)
    idx = np.empty((nq, n_neighbors), dtype=np.int64)
    _rerank.exact_rerank(np.ascontiguousarray(Q, dtype=dtype), part_ptr, part_start, cand,
                         bool(unit_norm), bool(inner_product), dist, idx,
                         scratch(nt, n_neighbors, dtype), scratch(nt, n_neighbors, np.int64),
                         nt)
    return dist, idx


# --- 4-bit codes: packed layout and fast-scan search ---------------------------
#
# n_codewords = 16: two codes per byte, in blocks of 32 vectors laid out for
# in-register table lookups (see pqsk._fastscan).  For block b and pair p of
# sub-spaces (2p, 2p + 1), 32 bytes: byte i = code[32b + i, 2p] |
# (code[32b + i, 2p + 1] << 4).  m is padded to an even m2 with code 0 and
# the last block to 32 vectors with code 0: packed is (n_blocks, m2 / 2, 32)
# uint8, m / 2 bytes per vector (rounded up).

FASTSCAN_BLOCK = 32


def n_blocks4(n):
    """Blocks of 32 vectors that hold ``n`` vectors."""
    return -(-int(n) // FASTSCAN_BLOCK)


def pack_codes4(codes):
    """Pack (n, m) codes < 16 into the fast-scan layout, (n_blocks, m2 / 2, 32)
    uint8 (padding codes 0)."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError("codes must be a 2-d array")
    n, m = codes.shape
    if codes.size and (codes.min() < 0 or codes.max() >= 16):
        raise ValueError("4-bit codes must lie in [0, 16)")
    nb, half = n_blocks4(n), (m + 1) // 2
    padded = np.zeros((nb * FASTSCAN_BLOCK, 2 * half), dtype=np.uint8)
    padded[:n, :m] = codes
    pairs = padded.reshape(nb, FASTSCAN_BLOCK, half, 2)
    packed = pairs[..., 0] | (pairs[..., 1] << 4)          # (nb, 32, half)
    return np.ascontiguousarray(packed.transpose(0, 2, 1))


def unpack_codes4(packed, n, m):
    """The (n, m) uint8 codes of ``pack_codes4``'s layout."""
    nb, half = packed.shape[:2]
    if packed.shape != (nb, (m + 1) // 2, FASTSCAN_BLOCK) or nb != n_blocks4(n):
        raise ValueError(f"packed codes of shape {packed.shape} do not hold {n} codes of "
                         f"{m} sub-spaces")
    rows = np.asarray(packed).transpose(0, 2, 1)              # (nb, 32, half)
    codes = np.empty((nb, FASTSCAN_BLOCK, half, 2), dtype=np.uint8)
    np.bitwise_and(rows, 15, out=codes[..., 0])
    np.right_shift(rows, 4, out=codes[..., 1])
    return np.ascontiguousarray(codes.reshape(nb * FASTSCAN_BLOCK, 2 * half)[:n, :m])


def pack_lists4(codes, offsets):
    """Pack (n, m) codes < 16 sorted by list (list l rows ``offsets[l]:
    offsets[l + 1]``) list by list, each list starting on a block boundary
    (padding codes 0): (packed (n_blocks, m2 / 2, 32) uint8, blocks
    (n_lists + 1,) int64), list l in blocks ``blocks[l]:blocks[l + 1]``."""
    codes = np.asarray(codes)
    n, m = codes.shape
    offsets = np.asarray(offsets, dtype=np.int64)
    n_l = np.diff(offsets)
    blocks = np.zeros(offsets.shape[0], dtype=np.int64)
    np.cumsum(-(-n_l // FASTSCAN_BLOCK), out=blocks[1:])
    padded = np.zeros((int(blocks[-1]) * FASTSCAN_BLOCK, m), dtype=np.uint8)
    padded[list_rows4(offsets, blocks)] = codes
    return pack_codes4(padded), blocks


def list_rows4(offsets, blocks):
    """Row of each entry (in entry order) in the padded layout of
    :func:`pack_lists4`."""
    n_l = np.diff(offsets)
    lists = np.repeat(np.arange(n_l.shape[0]), n_l)
    return (blocks[:-1][lists] * FASTSCAN_BLOCK + np.arange(int(offsets[-1]))
            - offsets[:-1][lists])


def unpack_lists4(packed, offsets, blocks, m):
    """The (n, m) uint8 codes, in entry order, of :func:`pack_lists4`'s layout."""
    nb = int(blocks[-1])
    return np.ascontiguousarray(
        unpack_codes4(packed, nb * FASTSCAN_BLOCK, m)[list_rows4(offsets, blocks)])


# Codes re-checked with the float tables by the estimators' 4-bit scans:
# those whose quantized estimate is within this many table units of the
# current k-th distance (the worst-case rounding bound is 0.5 * m + 1).
# On GloVe-50 (m=25) the top 50 then match the exact float-ADC top 50 on
# 99.96-100% of the ids, 1.6-3.7x faster than the exact bound.
FASTSCAN_MARGIN = 2.0


def FASTSCAN_EXTRA(n_neighbors):
    """Entries the estimators' IVF 4-bit scan ranks by quantized estimate
    beyond the ``n_neighbors`` it re-scores and returns (see
    ``pqsk._ivf.ivf_search``, ``fs_estimate``)."""
    return n_neighbors + 8


def fastscan_search(Q, codebooks, packed, n, n_neighbors, inner_product=False,
                    n_threads=1, margin=None, blocked=None):
    """Exhaustive ADC search over ``n`` packed 4-bit codes (n_codewords = 16,
    m <= ``_fastscan.MAX_SUBSPACES``).  With ``margin=None``, the same
    (dist, idx) as :func:`adc_search` on the unpacked codes, distances
    included (see ``pqsk._fastscan``); with a margin (table units, e.g.
    ``FASTSCAN_MARGIN``) only codes whose quantized estimate is within it
    of the running k-th distance are re-checked: the returned distances are
    still exact float ADC, and a code is missed only in a near-tie.  Every
    instruction set gives the same result either way.  Slots beyond ``n``
    hold (+inf, INT64_MAX).  ``blocked``: rows never returned, as in
    :func:`adc_search`."""
    from . import _fastscan

    m, k, _ = codebooks.shape
    if k != 16:
        raise ValueError(f"fast-scan search needs n_codewords=16, got {k}")
    if m > _fastscan.MAX_SUBSPACES:
        raise ValueError(f"fast-scan search takes at most {_fastscan.MAX_SUBSPACES} "
                         f"sub-spaces (uint16 sums), got {m}")
    Q = padded_rows(np.ascontiguousarray(Q, dtype=codebooks.dtype), codebooks)
    nq = Q.shape[0]
    dist = np.empty((nq, n_neighbors), dtype=codebooks.dtype)
    idx = np.empty((nq, n_neighbors), dtype=np.int64)
    nt = max(int(n_threads), 1)
    _fastscan.fastscan_search(
        Q, _transposed(codebooks), np.ascontiguousarray(packed, dtype=np.uint8), int(n),
        bool(inner_product), dist, idx, scratch(nt, m * 16, codebooks.dtype),
        scratch(nt, (m + 1) // 2 * 32, np.uint8), scratch(nt, n_neighbors, codebooks.dtype),
        scratch(nt, n_neighbors, np.int64), scratch(nt, 3, np.float64),
        scratch(nt, (m + 1) // 2 * 256, np.uint16), nt,
        -1.0 if margin is None else float(margin), *_blocked_args(blocked, nq, int(n)),
    )
    return dist, idx
