"""Well-formedness checks of values, parameters and fitted state.

Each check raises ``ValueError`` or ``TypeError`` on failure:

* input checks at fit and query time: :func:`check_range` (values whose
  squared distances would overflow), :func:`check_n_neighbors`,
  :func:`check_graph_mode`, :func:`checked_remove_ids`;
* checks of a loaded index's state, run by the estimators'
  ``_check_loaded_state`` after :func:`pqsk._persist.load` has read the
  files (``require``, ``check_scalar_int``, ``check_int_array``,
  ``check_float_array``, ``check_bool_mask``, ``check_codebooks``,
  ``check_anisotropic_state``, ``checked_vectors``), whose errors
  ``load`` turns into :class:`pqsk.IndexFormatError`.  Two of them also
  normalise what files of older versions hold: ``check_anisotropic_state``
  sets a missing threshold to None, ``checked_vectors`` wraps an array in
  a row store.

The module imports nothing from pqsk but the row store and the range bound.
"""

from numbers import Integral

import numpy as np

from ._store import RowStore, chunk_slices, rows_per_chunk
from ._utils import range_bound


def require(cond, msg):
    """Raise ``ValueError(msg)`` unless ``cond``."""
    if not cond:
        raise ValueError(msg)


def check_scalar_int(value, name, lo, hi):
    """``value`` is a Python int (not a bool) in [lo, hi)."""
    require(type(value) is int and lo <= value < hi,
            f"{name} must be an int in [{lo}, {hi}), got {value!r}")
    return value


def _check_shape(a, name, shape):
    ok = a.ndim == len(shape) and all(s is None or s == t for s, t in zip(shape, a.shape))
    require(ok, f"{name} has shape {a.shape}, expected "
                f"({', '.join('n' if s is None else str(s) for s in shape)})")


def check_int_array(a, name, shape, lo, hi, dtype=None):
    """``a`` is an integer ndarray of ``shape`` (None: any length) and
    ``dtype`` if given, C-contiguous in native byte order, with values in
    [lo, hi)."""
    require(isinstance(a, np.ndarray) and a.dtype.kind in "iu",
            f"{name} must be an integer array")
    if dtype is not None:
        require(a.dtype == dtype, f"{name} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    require(a.flags.c_contiguous and a.dtype.isnative,
            f"{name} must be C-contiguous in native byte order")
    _check_shape(a, name, shape)
    if a.size:
        require(int(a.min()) >= lo and int(a.max()) < hi,
                f"{name} has values outside [{lo}, {hi})")


def check_float_array(a, name, shape, dtype, bound):
    """``a`` is a C-contiguous native ndarray of exactly ``shape`` and
    ``dtype``, finite, with every value in [-bound, bound]."""
    require(isinstance(a, np.ndarray) and a.dtype == dtype,
            f"{name} must be a {np.dtype(dtype)} array")
    require(a.flags.c_contiguous and a.dtype.isnative,
            f"{name} must be C-contiguous in native byte order")
    _check_shape(a, name, shape)
    if a.size:
        lo, hi = float(a.min()), float(a.max())  # NaN propagates to both
        require(np.isfinite(lo) and np.isfinite(hi), f"{name} contain NaN or infinity")
        require(max(hi, -lo) <= bound,
                f"{name} have values up to {max(hi, -lo):.3g}, beyond {bound:.3g} where "
                "squared distances overflow")


def check_bool_mask(a, name, n):
    require(isinstance(a, np.ndarray) and a.dtype == np.bool_ and a.shape == (n,)
            and a.flags.c_contiguous, f"{name} must be a bool array of shape ({n},)")


def check_codebooks(est, max_codewords):
    """Checks shared by every estimator's codebooks_: a 3-d float32 or
    float64 array (m, k, ds) covering ``n_features_in_`` features, k at
    most ``max_codewords``, finite.  Returns (m, k, ds); the range is
    checked by the caller, which knows how the codebooks are used."""
    d = check_scalar_int(est.n_features_in_, "n_features_in_", 1, 2**31)
    cb = est.codebooks_
    require(isinstance(cb, np.ndarray) and cb.dtype in (np.float32, np.float64)
            and cb.ndim == 3, "codebooks_ must be a 3-d float32 or float64 array")
    m, k, ds = cb.shape
    # Sub-spaces of nearly equal widths (pqsk._quantizer): ds = ceil(d / m),
    # the columns past a narrower sub-space's width zero.  Files written
    # before uneven sub-spaces have m * ds == d, which passes as before.
    require(1 <= m <= d and ds == -(-d // m),
            f"codebooks_ of shape {cb.shape} do not cover n_features_in_={d}")
    require(1 <= k <= max_codewords, f"codebooks_ hold {k} codewords per sub-space")
    check_float_array(cb, "codebooks_", cb.shape, cb.dtype, np.inf)
    narrow = range(d % m, m) if d % m else ()  # sub-spaces of ds - 1 features
    require(not any(np.any(cb[j, :, ds - 1:]) for j in narrow),
            "codebooks_ are not zero past the width of each sub-space")
    check_scalar_int(est.n_iter_, "n_iter_", 0, 2**31)
    names = getattr(est, "feature_names_in_", None)
    if names is not None or hasattr(est, "feature_names_in_"):
        require(isinstance(names, np.ndarray) and names.dtype == object
                and names.shape == (d,) and all(isinstance(s, str) for s in names),
                "feature_names_in_ must hold n_features_in_ strings")
    return m, k, ds


def check_range(X, extremes=None, dtype=None, name="X"):
    """Reject values whose squared distances would overflow.

    Distances sum D squared differences of up to twice the largest value:
    past ``sqrt(max / (4 D))`` they become inf and every ranking is
    meaningless, so the data must be scaled (or given as float64) first.
    ``extremes``: (X.min(), X.max()) when the caller has them already;
    ``dtype``: the dtype the distances are computed in, when it is not
    X's own (HNSW builds and walks its graph in float32).
    """
    if X.size == 0:
        return X
    lo, hi = (X.min(), X.max()) if extremes is None else extremes  # no |X| temporary
    work = X.dtype if dtype is None else np.dtype(dtype)
    bound = range_bound(int(X.shape[1]), work)
    peak = max(float(hi), -float(lo))
    if not peak <= bound:  # NaN fails too
        raise ValueError(
            f"{name} has values up to {peak:.3g}; with {X.shape[1]} features, squared "
            f"distances in {work} overflow past {bound:.3g}. Scale the data down"
            + (" or pass float64." if work == np.float32 and dtype is None else ".")
        )
    return X


def check_anisotropic_state(est, metric=None):
    """Validate a loaded ``anisotropic_threshold_``; files written before
    it existed have none: None (the k-means loss) is set."""
    t = est.__dict__.setdefault("anisotropic_threshold_", None)
    require(t is None or (isinstance(t, float) and np.isfinite(t) and t > 0),
            "anisotropic_threshold_ must be None or a finite float > 0")
    require(t is None or metric in (None, "dot", "cosine"),
            "anisotropic_threshold_ is set for an L2 metric")


def checked_vectors(vectors, n, d, dtype, bound):
    """The raw vectors as a row store, every chunk checked (dtype,
    C order, finite, within ``bound``) a ``CHUNK_BYTES`` slice at a
    time.  ``load`` gives one array, memory-mapped with ``mmap_mode``:
    it becomes the store's only chunk, by reference."""
    if isinstance(vectors, np.ndarray):
        require(vectors.ndim == 2, "vectors_ must be 2-d")
        vectors = RowStore(vectors.shape[1], vectors.dtype, [vectors])
    require(isinstance(vectors, RowStore), "vectors_ must be a row store")
    require(vectors.shape == (n, d) and vectors.dtype == dtype,
            f"vectors_ has shape {vectors.shape} and dtype {vectors.dtype}, expected "
            f"({n}, {d}) and {np.dtype(dtype)}")
    step = rows_per_chunk(d * np.dtype(dtype).itemsize)
    for chunk in vectors.chunks:
        for sl in chunk_slices(chunk.shape[0], step):
            check_float_array(chunk[sl], "vectors_", (None, d), dtype, bound)
    return vectors


def check_graph_mode(mode):
    """The ``mode`` of ``kneighbors_graph`` / ``radius_neighbors_graph``,
    refused as scikit-learn refuses it."""
    if mode not in ("connectivity", "distance"):
        raise ValueError(
            'Unsupported mode, must be one of "connectivity", or "distance" '
            f'but got "{mode}" instead'
        )


def checked_remove_ids(ids):
    """The ids given to ``remove`` as a flat int64 array (possibly empty),
    refusing non-integers and duplicates (the range is the caller's)."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return np.empty(0, dtype=np.int64)
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ids must be integers, got dtype {ids.dtype}.")
    ids = ids.ravel().astype(np.int64)
    if np.unique(ids).size != ids.size:
        raise ValueError("ids contain duplicates.")
    return ids


def check_n_neighbors(n_neighbors):
    """``n_neighbors`` of a query as an int, refused as scikit-learn refuses
    it (TypeError for a non-integer, ValueError for one below 1)."""
    if not isinstance(n_neighbors, (Integral, np.integer)) or isinstance(n_neighbors, bool):
        raise TypeError(
            f"n_neighbors does not take {type(n_neighbors).__name__} value, enter "
            "an integer value."
        )
    if n_neighbors <= 0:
        raise ValueError(f"Expected n_neighbors > 0. Got {n_neighbors}.")
    return int(n_neighbors)
