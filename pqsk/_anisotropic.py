"""Anisotropic (score-aware) product quantization.

Guo et al., "Accelerating Large-Scale Inference with Anisotropic Vector
Quantization", ICML 2020 (the loss behind ScaNN's "AH" quantizer).  For
maximum inner product search the error that matters is the error of the
score ``<q, x>`` for the queries that score ``x`` high; the paper shows
(Theorem 3.4) that weighting those queries gives, for a datapoint x of
norm ``||x||`` in ``d`` dimensions, quantized as ``x~`` (error
``r = x - x~``, direction ``u = x / ||x||``), the loss::

    h_par * (r . u)^2 + h_perp * (||r||^2 - (r . u)^2)

with ``eta = h_par / h_perp = (d - 1) * s / (1 - s)``, ``s = (T / ||x||)^2``
for a threshold ``T`` on the inner product (ScaNN's default 0.2, for
unit-norm data).  pqsk minimises ``||r||^2 + (eta - 1) (r . u)^2`` (the
loss divided by ``h_perp``).  ``T >= ||x||`` makes the formula meaningless
(no unit query scores x above T): ``T / ||x||`` is clipped to at most
``MAX_RATIO`` (eta at most ~49 (d - 1)); rows of norm 0 get the plain loss.

The error ``r`` decomposes over the m sub-spaces: ``r . u = sum_j r_j . u_j``
and ``||r||^2 = sum_j ||r_j||^2``.  So

* encoding (:func:`anisotropic_encode`) is coordinate descent over the
  sub-spaces: from the plain nearest-codeword codes, each sub-space j in
  turn takes the codeword that minimises the whole loss given the other
  blocks (running sums of ``r . u`` and ``||r||^2``), a few sweeps; a code
  changes only when its loss strictly drops, so the loss never increases;
* the codebook update (:func:`update_codebooks`) with assignments fixed is
  block coordinate descent too: given the other blocks, the loss is
  quadratic in the codewords of block j and separates per codeword: for
  codeword c with rows S_c, ``(|S_c| I + sum_i (eta_i - 1) u_ij u_ij^T) w =
  sum_i x_ij + sum_i (eta_i - 1) a_i u_ij`` with ``a_i = r_i . u_i - r_ij .
  u_ij + x_ij . u_ij``, a ds x ds system per codeword (positive definite:
  its eigenvalues are at least ``|S_c| min(1, eta)``; a tiny ridge toward
  the current codeword covers eta near 0);
* :func:`train_anisotropic` starts from the k-means codebooks and
  alternates the two.

For IVF the rows quantized are residuals ``x - c_l`` but the score is
``<q, x>``: the directions (and norms, hence eta) are passed separately
(``directions``) from the rows quantized.

Rows of D features are worked on in the padded layout of
:mod:`pqsk._quantizer` (zero columns after each sub-space narrower than
``ds``; nothing changes when m divides D): the zero columns add nothing
to ``r . u`` or ``||r||^2``, their codeword entries stay 0 in the update
(their equations read ``(|S_c| + ridge) w = ridge * 0``), and eta uses the
true D.

Everything is computed in float64, a chunk of rows at a time.
"""

import numpy as np
from scipy import sparse

from . import _aniso
from ._quantizer import code_dtype, encode, padded_rows, scratch, train_codebooks, transposed
from ._store import chunk_slices

# T / ||x|| is clipped to this: eta <= (d - 1) * 0.9801 / 0.0199.
MAX_RATIO = 0.99
# Encoding sweeps over the m sub-spaces (stops earlier once no code changes).
ENCODE_SWEEPS = 4
# Alternations of encoding and codebook update in training.
TRAIN_ITERATIONS = 8
# Training stops when an alternation lowers the loss by less than this share.
TRAIN_TOL = 1e-4
# Ridge of the codebook update, per row of a codeword (see update_codebooks).
RIDGE = 1e-6
# float64 values per chunk of padded rows (and of directions) when encoding.
_BLOCK_VALUES = 2**21


def anisotropic_eta(threshold, norms, n_features):
    """eta = h_par / h_perp of each row (Theorem 3.4 of Guo et al., 2020).

    ``eta = (d - 1) * s / (1 - s)`` with ``s = (T / ||x||)^2``, ``T / ||x||``
    clipped to ``MAX_RATIO``; rows of norm 0 get 1 (the plain loss: their
    direction is undefined and they score 0 with every query).

    Parameters
    ----------
    threshold : float > 0
    norms : array-like of shape (n,)
        ``||x||`` of each datapoint.
    n_features : int

    Returns
    -------
    eta : ndarray of shape (n,), float64
    """
    norms = np.asarray(norms, dtype=np.float64)
    eta = np.ones(norms.shape, dtype=np.float64)
    pos = norms > 0
    ratio = np.minimum(float(threshold) / norms[pos], MAX_RATIO)
    s = ratio * ratio
    eta[pos] = (n_features - 1) * s / (1 - s)
    return eta


def _directions(D):
    """(unit rows of D, norms), float64."""
    D = np.asarray(D, dtype=np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", D, D))
    U = np.zeros_like(D)
    pos = norms > 0
    U[pos] = D[pos] / norms[pos, None]
    return U, norms


def row_weights(directions, threshold, codebooks=None):
    """(unit directions, eta - 1) of the rows of ``directions``, float64;
    the directions in the padded layout of ``codebooks`` when given (eta
    from the true number of features)."""
    U, norms = _directions(directions)
    w = anisotropic_eta(threshold, norms, directions.shape[1]) - 1
    if codebooks is not None:
        U = padded_rows(U, codebooks)
    return U, w


def _padded64(X, codebooks):
    return padded_rows(np.asarray(X, dtype=np.float64), codebooks)


def _decode(codes, codebooks):
    m, _, ds = codebooks.shape
    out = np.empty((codes.shape[0], m * ds), dtype=np.float64)
    for j in range(m):
        out[:, j * ds:(j + 1) * ds] = codebooks[j][codes[:, j]]
    return out


def anisotropic_loss(X, codes, codebooks, threshold, directions=None):
    """Per-row loss ``||r||^2 + (eta - 1) (r . u)^2`` of the codes of X
    (``r = X - decode(codes)``; u and eta from ``directions``, default X)."""
    U, w = row_weights(X if directions is None else directions, threshold, codebooks)
    R = _padded64(X, codebooks) - _decode(codes, np.asarray(codebooks, np.float64))
    p = np.einsum("ij,ij->i", R, U)
    return np.einsum("ij,ij->i", R, R) + w * p * p


def kernel_work_width(m, k):
    """float64 scratch values per thread of the encoding kernel: the (m, k)
    tables x . c and u . c, ||x_j||^2 and x_j . u_j, and one row of k losses."""
    return 2 * m * k + 2 * m + k


def anisotropic_encode(X, codebooks, threshold, directions=None, init_codes=None,
                       n_sweeps=ENCODE_SWEEPS, n_threads=1):
    """Codes of the rows of X minimising the anisotropic loss, by coordinate
    descent over the sub-spaces (see the module docstring).

    The descent runs in the kernel :func:`pqsk._aniso.anisotropic_encode_rows`
    (its NumPy oracle is :func:`pqsk._naive.anisotropic_encode_chunk`), a
    chunk of rows at a time.

    Parameters
    ----------
    X : ndarray of shape (n, D)
        Rows to quantize.
    codebooks : ndarray of shape (m, k, ds)
    threshold : float > 0
        T of :func:`anisotropic_eta`.
    directions : ndarray of shape (n, D), default=None
        The datapoints whose direction and norm define the loss (IVF: the
        rows before the coarse centroid is subtracted); default X.
    init_codes : ndarray of shape (n, m), default=None
        Codes to start from; default the plain nearest-codeword codes.
    n_sweeps : int
        At most this many sweeps over the m sub-spaces.
    n_threads : int, default=1
        OpenMP threads of the kernel; the codes do not depend on it.

    Returns
    -------
    codes : ndarray of shape (n, m), ``code_dtype(k)``
        No row's loss is above that of ``init_codes`` (or of the plain codes).
    """
    m, k, ds = codebooks.shape
    if init_codes is None:
        codes = encode(X, codebooks, n_threads)
    else:
        codes = np.array(init_codes, dtype=code_dtype(k), order="C", copy=True)
        if codes.shape != (X.shape[0], m):
            raise ValueError(f"init_codes has shape {codes.shape}; expected "
                             f"{(X.shape[0], m)} (one code per row and sub-space)")
        if codes.size and int(codes.max()) >= k:
            raise ValueError(f"init_codes holds code {int(codes.max())}; the codebooks "
                             f"have only {k} codewords")
    n = X.shape[0]
    if n == 0 or n_sweeps < 1:
        return codes
    cb = np.ascontiguousarray(codebooks, dtype=np.float64)
    cb_t = transposed(cb)
    c_norms = np.einsum("jkd,jkd->jk", cb, cb)
    n_threads = max(1, min(int(n_threads), n))
    work = scratch(n_threads, kernel_work_width(m, k), np.float64)
    step = max(1, _BLOCK_VALUES // (m * ds))
    for sl in chunk_slices(n, step):
        D = X[sl] if directions is None else directions[sl]
        U, w = row_weights(D, threshold, cb)
        _aniso.anisotropic_encode_rows(np.ascontiguousarray(_padded64(X[sl], cb)),
                                       np.ascontiguousarray(U),
                                       np.ascontiguousarray(w), cb_t, c_norms, codes[sl],
                                       int(n_sweeps), work, n_threads)
    return codes


def update_codebooks(X, codes, codebooks, threshold, directions=None):
    """Codebooks minimising the anisotropic loss of X with ``codes`` fixed.

    Block coordinate descent, one pass over the sub-spaces: block j's
    codewords are solved exactly given the other blocks (one ds x ds
    system per codeword, see the module docstring); codewords no row uses
    are kept.  The loss never increases.  Returns float64 codebooks.
    """
    m, k, ds = codebooks.shape
    n = X.shape[0]
    cb = np.array(codebooks, dtype=np.float64, copy=True)
    Xf = _padded64(X, cb)
    U, w = row_weights(X if directions is None else directions, threshold, cb)
    R = Xf - _decode(codes, cb)
    p = np.einsum("ij,ij->i", R, U)
    del R
    eye = np.eye(ds)
    step = max(1, 2**22 // (ds * ds))
    for j in range(m):
        sl = slice(j * ds, (j + 1) * ds)
        xj, uj = Xf[:, sl], U[:, sl]
        cj = codes[:, j].astype(np.intp)
        # a_i: r . u without block j's codeword term.
        a = p - np.einsum("ij,ij->i", xj - cb[j][cj], uj) + np.einsum("ij,ij->i", xj, uj)
        counts = np.bincount(cj, minlength=k)
        onehot = sparse.csr_matrix((np.ones(n), (cj, np.arange(n))), shape=(k, n))
        M = np.zeros((k, ds * ds))
        for part in chunk_slices(n, step):
            outer = (uj[part, :, None] * uj[part, None, :]).reshape(-1, ds * ds)
            outer *= w[part, None]
            M += onehot[:, part] @ outer
        # A ridge toward the current codeword keeps M positive definite
        # when eta is near 0 (the loss then barely sees the parallel error;
        # d = 1 gives eta = 0): the minimiser of loss + ridge * ||w - old||^2
        # has a loss no larger than the old codeword's.  Unused codewords
        # stay as they are.
        ridge = RIDGE * np.maximum(counts, 1)
        M = M.reshape(k, ds, ds) + (counts + ridge)[:, None, None] * eye
        rhs = onehot @ (xj + (w * a)[:, None] * uj) + ridge[:, None] * cb[j]
        cb[j] = np.linalg.solve(M, rhs[:, :, None])[:, :, 0]
        p = a - np.einsum("ij,ij->i", cb[j][cj], uj)
    return cb


def train_anisotropic(X, n_subspaces, n_codewords, threshold, directions=None,
                      codebooks=None, n_iter=TRAIN_ITERATIONS, tol=TRAIN_TOL,
                      progress=None, n_threads=1, **kmeans_params):
    """Anisotropic codebooks for the rows of X.

    Starts from ``codebooks`` or, by default, from the k-means codebooks of
    :func:`pqsk._quantizer.train_codebooks` (``kmeans_params`` passed on),
    then alternates :func:`anisotropic_encode` and :func:`update_codebooks`
    at most ``n_iter`` times, stopping once an alternation lowers the mean
    loss by less than ``tol`` of it.  ``n_threads`` is passed on to the
    k-means training and the encoding kernel (the result does not depend
    on it).

    Returns
    -------
    codebooks : ndarray of shape (m, k, ceil(D / m)), dtype of X
    losses : list of float
        Mean loss of the plain k-means codes, then after each alternation.
    """
    if codebooks is None:
        codebooks, _ = train_codebooks(X, n_subspaces, n_codewords, progress=progress,
                                       n_threads=n_threads, **kmeans_params)
    codes = encode(X, codebooks, n_threads)
    losses = [float(np.mean(anisotropic_loss(X, codes, codebooks, threshold, directions)))]
    for it in range(n_iter):
        codes = anisotropic_encode(X, codebooks, threshold, directions, init_codes=codes,
                                   n_threads=n_threads)
        new = update_codebooks(X, codes, codebooks, threshold, directions).astype(X.dtype)
        codebooks = new
        losses.append(float(np.mean(anisotropic_loss(X, codes, codebooks, threshold,
                                                     directions))))
        if progress is not None:
            progress(f"anisotropic iteration {it + 1}: mean loss {losses[-1]:.6g}", level=2)
        if losses[-2] - losses[-1] <= tol * abs(losses[-2]):
            break
    return np.ascontiguousarray(codebooks, dtype=X.dtype), losses
