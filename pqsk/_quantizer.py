"""The codec stage: product quantization of rows, shared by every estimator.

Plain functions on arrays, no estimator state: the sub-space layout,
codebook training (k-means per sub-space), plain (nearest-codeword)
encoding, decoding and ADC tables.  Inputs are assumed validated
(finite, C-contiguous, float32 or float64); the estimators do that.
The coarse partitioner is :mod:`pqsk._partition`, the scorers (encode
dispatch with the anisotropic loss, ADC and fast-scan searches) are
:mod:`pqsk._scorers`, exact re-ranking is :mod:`pqsk._reorder`.

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

import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state
from threadpoolctl import ThreadpoolController

from . import _adc, _encode

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
# error slightly above that of 25 iterations on every row
# (``python -m benchmarks.bench_train``).  To trade time for accuracy, raise
# max_iter (stage 2 gets a quarter of it); a training sample of at most
# 128 * k rows (max_train_samples <= 128 * k) is clustered in one stage.
#
# The schedule runs on scikit-learn's KMeans (fit_kmeans), except the coarse
# quantizer of a large problem (see :mod:`pqsk._partition`: pqsk's own Lloyd
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


class Distinct(NamedTuple):
    """What a k-means had to work with when its sample held few distinct
    rows (see :func:`fit_kmeans`)."""

    rows: int  # distinct rows in the clustered sample
    centroids: int  # distinct centroids that got a row
    exact: bool  # the distinct rows were the centroids (no KMeans ran)


# scikit-learn's KMeans warns "Number of distinct clusters (c) found smaller
# than n_clusters (k)" when duplicate rows leave centres without a row.
# pqsk mutes it around its k-means and says it once per fit in its own
# words (few_codewords_message, and the coarse quantizer's in _partition).
# The warnings filters are process-wide: the callers mute in the calling
# thread, around the worker threads of train_codebooks, never inside them
# (filters changed by threads side by side would be restored out of order).
_KMEANS_DISTINCT = "Number of distinct clusters"


@contextmanager
def quiet_kmeans():
    """Context manager: scikit-learn's "Number of distinct clusters"
    warning muted (the caller reports it; see :class:`Distinct`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_KMEANS_DISTINCT,
                                category=ConvergenceWarning)
        yield


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
    distinct : Distinct or None
        None when KMeans ran and gave every centroid a row; else the
        number of distinct rows and of distinct centroids found: the
        exact case (the distinct rows are the centroids), or a KMeans
        whose duplicate rows left some centres without a row (for which
        scikit-learn warns; the callers mute that warning, see
        :func:`quiet_kmeans`, and say it in their own words).
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
        return centroids, 0, Distinct(points.shape[0], points.shape[0], True)
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
    found = np.unique(km.labels_).size  # KMeans's own test (labels of the points)
    distinct = None
    if found < n_clusters:
        n_rows = points.shape[0] if counts is not None else distinct_rows(points)[0].shape[0]
        distinct = Distinct(n_rows, found, False)
    return np.ascontiguousarray(km.cluster_centers_, dtype=X.dtype), n_iter, distinct


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
            codebooks[j, :, :hi - lo], n_iter[j], distinct[j] = fit_kmeans(
                X[:, lo:hi], n_codewords, init=init, n_init=n_init,
                max_iter=max_iter, tol=tol, random_state=seeds[j],
            )
        if progress is not None:
            exact = distinct[j] is not None and distinct[j].exact
            progress(f"sub-space {j + 1}/{n_subspaces}: " + (
                f"{distinct[j].rows} distinct sub-vectors, used as codewords"
                if exact else f"{n_iter[j]} iterations"), level=2)

    distinct = [None] * n_subspaces
    workers = max(1, min(n_threads, n_subspaces))
    with quiet_kmeans():  # in this thread, around the workers (see there)
        if workers == 1:
            for j in range(n_subspaces):
                fit_one(j)
        else:
            with ThreadPoolExecutor(max_workers=workers) as ex:
                list(ex.map(fit_one, range(n_subspaces)))
    message = few_codewords_message(distinct, n_codewords, n)
    if message:
        warnings.warn(message, UserWarning, stacklevel=2)
    return codebooks, n_iter


def few_codewords_message(distinct, n_codewords, n_rows):
    """The one warning of a codebook training whose KMeans left codewords
    without a sub-vector (duplicate rows), or None.  ``distinct``: the
    :class:`Distinct` (or None) of each sub-space, from :func:`fit_kmeans`."""
    short = [(j, d) for j, d in enumerate(distinct) if d is not None and not d.exact]
    if not short:
        return None
    shown = "; ".join(f"sub-space {j}: {d.centroids}, from {d.rows:,} distinct sub-vectors"
                      for j, d in short[:3]) + ("; ..." if len(short) > 3 else "")
    return (f"k-means found fewer distinct codewords than n_codewords={n_codewords} in "
            f"{len(short)} of {len(distinct)} sub-spaces (numbered from 0; {shown}; "
            f"{n_rows:,} training rows): the training rows repeat sub-vectors (duplicate "
            "rows), so some codewords repeat others and no vector is encoded with them. "
            "The codes are valid, only that sub-space's quantization is coarser than "
            "n_codewords allows; fewer codewords, or training rows without duplicates, "
            "avoid it.")


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


def transposed(codebooks):
    """(m, k, ds) -> (m, ds, k), the layout the kernels vectorise over."""
    return np.ascontiguousarray(codebooks.transpose(0, 2, 1))


def encode(X, codebooks, n_threads=1):
    """Plain PQ codes of the rows of X: the nearest codeword of each
    sub-vector, (n, m) array of ``code_dtype(k)``.  (The anisotropic codes
    are :func:`pqsk._anisotropic.anisotropic_encode`; :func:`pqsk._scorers.encode`
    chooses between the two.)"""
    m, k, _ = codebooks.shape
    X = padded_rows(np.ascontiguousarray(X, dtype=codebooks.dtype), codebooks)
    n_threads = max(1, min(n_threads, X.shape[0] // 64))  # rows are cheap: few threads
    codes = np.empty((X.shape[0], m), dtype=code_dtype(k))
    work = scratch(n_threads, m * k, codebooks.dtype)
    _encode.encode(X, transposed(codebooks), codes, work, n_threads)
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
    _adc.adc_tables(Q, transposed(codebooks), bool(inner_product), tables, n_threads)
    return tables


