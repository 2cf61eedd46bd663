"""Optimized product quantization (OPQ): learn an orthogonal rotation R.

Non-parametric OPQ (Ge, He, Ke and Sun, "Optimized Product Quantization
for Approximate Nearest Neighbor Search", CVPR 2013): minimise the
reconstruction error ``||X R - decode(encode(X R))||^2`` over orthogonal
R and the codebooks by alternating

1. encode ``Y = X R`` with the current codebooks, giving ``Y_hat``;
2. R = the orthogonal Procrustes solution ``argmin ||X R - Y_hat||``,
   ``U V^T`` for the SVD ``X^T Y_hat = U S V^T``;
3. update the codebooks on the new ``X R``: Lloyd iterations started from
   the current codewords (the codes of step 1 stay valid starting codes).

Each step does not increase the error on the training sample, so the
result is never worse there than PQ from the same start (R = identity,
codebooks trained as PQ trains them).  Rotating the data and the queries
by R leaves L2 distances and inner products unchanged: search needs no
other change.

The alternation runs on at most ``64 * n_codewords`` rows of the training
sample (as the first stage of every k-means, ``FIRST_STAGE_POINTS``): R
has only D^2 entries, and on GloVe-50 (m=10, k=256) R learned on 16,384
rows gives a reconstruction error on the 65,536-row sample within 6% of
R learned on all of them, in a quarter of the time.  The estimators then
train their codebooks on the whole rotated sample as usual.

Cost, on those n <= 64 k rows of D features: the initial PQ training,
then per iteration one encoding pass (n D k flops, the kernel of
``transform``), ``lloyd_iter`` more for the codebook updates, the product
X^T Y_hat (n D^2) and one D x D SVD: with the defaults (``n_iter=50``, as
faiss's ``OPQMatrix``, and ``lloyd_iter=1``) about 100 encoding passes
over 64 k rows: on GloVe-50 (D=50, m=10, k=256, one thread, a busy
2-core machine) ``PQNeighbors.fit`` of 399,000 rows took 69 s with OPQ
and 15 s without.  Memory: a few copies of those rows.
"""

import numpy as np
from sklearn.utils import check_random_state

from . import _quantizer


def _lloyd_step(Y, codes, codebooks):
    """Codewords moved to the mean of the sub-vectors coded to them
    (codewords no row uses keep their place).  In place; returns
    codebooks."""
    m, k, _ = codebooks.shape
    bounds = _quantizer.subspace_bounds(Y.shape[1], m)
    for j in range(m):
        c = codes[:, j].astype(np.intp)
        counts = np.bincount(c, minlength=k)
        used = counts > 0
        block = Y[:, bounds[j]:bounds[j + 1]]
        for t in range(block.shape[1]):
            sums = np.bincount(c, weights=block[:, t], minlength=k)
            codebooks[j, used, t] = sums[used] / counts[used]
    return codebooks


def reconstruction_error(Y, codebooks, n_threads=1):
    """Mean squared error of the rows of Y against their PQ reconstruction,
    and their codes."""
    codes = _quantizer.encode(Y, codebooks, n_threads)
    err = Y - _quantizer.decode(codes, codebooks, Y.shape[1])
    return float(np.mean(np.einsum("ij,ij->i", err, err, dtype=np.float64))), codes


def procrustes(X, Y):
    """The orthogonal R minimising ``||X R - Y||_F`` (float64): ``U V^T``
    for the SVD ``X^T Y = U S V^T``."""
    M = np.asarray(X, dtype=np.float64).T @ np.asarray(Y, dtype=np.float64)
    U, _, Vt = np.linalg.svd(M)
    return U @ Vt


def train_opq(X, n_subspaces, n_codewords, *, n_iter=50, lloyd_iter=1, init="random",
              max_iter=25, n_init=1, tol=1e-4, random_state=None, n_threads=1,
              progress=None, max_rows="auto"):
    """Learn an OPQ rotation and codebooks on the training sample X.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        The (prepared: normalised for cosine) training sample, float32 or
        float64; D at least ``n_subspaces``.
    n_subspaces, n_codewords : int
    n_iter : int, default=50
        Alternations (encode, Procrustes, codebook update).
    lloyd_iter : int, default=1
        Lloyd iterations of the codebook update in each alternation.
    init, max_iter, n_init, tol, random_state, n_threads, progress
        The initial PQ training, as :func:`pqsk._quantizer.train_codebooks`.
    max_rows : int, "auto" or None, default="auto"
        Learn on at most this many rows of X, drawn at random; ``"auto"``
        means ``FIRST_STAGE_POINTS * n_codewords`` (64 k), None all rows.

    Returns
    -------
    R : ndarray of shape (D, D), dtype of X
        Orthogonal: rows are encoded as ``x @ R``.
    codebooks : ndarray of shape (n_subspaces, n_codewords, ceil(D / n_subspaces))
        Codebooks for the rotated rows (zero beyond each sub-space's width,
        see :mod:`pqsk._quantizer`).
    errors : list of float
        Mean squared reconstruction error on the rows learned on, after
        the initial PQ and after each alternation (non-increasing up to
        rounding).
    """
    rng = check_random_state(random_state)
    if max_rows == "auto":
        max_rows = _quantizer.FIRST_STAGE_POINTS * n_codewords
    if max_rows is not None and X.shape[0] > max_rows:
        X = X[np.sort(rng.choice(X.shape[0], size=max_rows, replace=False))]
    X = np.ascontiguousarray(X)
    dtype = X.dtype
    d = X.shape[1]
    R = np.eye(d)
    Y = X
    codebooks, _ = _quantizer.train_codebooks(
        X, n_subspaces, n_codewords, init=init, max_iter=max_iter, n_init=n_init,
        tol=tol, random_state=rng, n_threads=n_threads)
    err, codes = reconstruction_error(Y, codebooks, n_threads)
    errors = [err]
    for it in range(n_iter):
        R = procrustes(X, _quantizer.decode(codes, codebooks, d))
        Y = np.ascontiguousarray(X @ R.astype(dtype))
        for _ in range(lloyd_iter):
            codes = _quantizer.encode(Y, codebooks, n_threads)
            _lloyd_step(Y, codes, codebooks)
        err, codes = reconstruction_error(Y, codebooks, n_threads)
        errors.append(err)
        if progress is not None:
            progress(f"OPQ iteration {it + 1}/{n_iter}: reconstruction error {err:.6g}",
                     level=2)
    return R.astype(dtype), codebooks, errors


def check_rotation(R, d, dtype):
    """Whether R is a finite orthogonal (d, d) matrix of ``dtype``, within
    a tolerance of ``100 d`` machine epsilons of ``dtype``; raises
    ValueError if not."""
    if not isinstance(R, np.ndarray) or R.shape != (d, d) or R.dtype != dtype:
        raise ValueError(
            f"rotation_ must be a ({d}, {d}) array of {np.dtype(dtype)}, got "
            f"{getattr(R, 'shape', None)} {getattr(R, 'dtype', type(R).__name__)}")
    if not np.all(np.isfinite(R)):
        raise ValueError("rotation_ contains NaN or infinity")
    R64 = R.astype(np.float64)
    dev = np.abs(R64.T @ R64 - np.eye(d)).max() if d else 0.0
    if not dev <= 100 * d * np.finfo(dtype).eps:
        raise ValueError(f"rotation_ is not orthogonal (|R^T R - I| up to {dev:.3g})")
