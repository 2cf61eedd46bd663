"""Well-formedness checks of values, parameters and fitted state.

Each check raises ``ValueError`` or ``TypeError`` on failure:

* parameter checks: :func:`resolve_metric` (the metric parameters, and
  the effective metric they name), :func:`check_n_neighbors`,
  :func:`check_enough_points`, :func:`check_self_query`,
  :func:`check_graph_mode`, :func:`checked_remove_ids`;
* input checks at fit and query time: :func:`checked_rows`,
  :func:`checked_queries` (scikit-learn's ``validate_data``, then NaN,
  infinity and :func:`check_range`, the values whose squared distances
  would overflow), :func:`checked_float16_chunks` (float16 queries,
  converted to float32 a chunk at a time);
* checks of a loaded index's state, run by the estimators'
  ``_check_loaded_state`` after :func:`pqsk._persist.load` has read the
  files (``require``, ``check_scalar_int``, ``check_int_array``,
  ``check_float_array``, ``check_bool_mask``, ``check_codebooks``,
  ``check_anisotropic_state``, ``checked_vectors``,
  ``check_neighbors_state``), whose errors ``load`` turns into
  :class:`IndexFormatError` (``pqsk.IndexFormatError``, the error of every
  unreadable file).  Two of them also normalise what files of older
  versions hold: ``check_anisotropic_state`` sets a missing threshold to
  None, ``checked_vectors`` wraps an array in a row store.

The module imports nothing from pqsk but the row store and the range bound.
Checks that read an estimator use only its fitted attributes and the class
attribute ``_kernel_dtype`` (see :class:`pqsk._base.BasePQNeighbors`).
"""

import warnings
from numbers import Integral

import numpy as np
from sklearn.utils import assert_all_finite
from sklearn.utils.validation import validate_data

from ._store import RowStore, chunk_slices, rows_per_chunk
from ._utils import range_bound

METRICS = ("euclidean", "sqeuclidean", "cosine", "dot")

# scikit-learn's names for the Euclidean distance, accepted as ``metric``:
# "l2" always, "minkowski" with p=2 (``p``, or ``metric_params["p"]``).
METRIC_ALIASES = ("l2", "minkowski")


def resolve_metric(metric, p=2, metric_params=None, warn=False):
    """(effective metric, effective metric params) of the ``metric``,
    ``p`` and ``metric_params`` parameters, as
    :class:`sklearn.neighbors.NearestNeighbors` sets ``effective_metric_``
    and ``effective_metric_params_``: ``"minkowski"`` with p=2 is
    ``"euclidean"`` (the p in ``metric_params`` wins over ``p``, with a
    warning when ``warn``), and ``"l2"`` is ``"euclidean"`` too (scikit-learn keeps the
    name "l2"; pqsk's kernels know one name per metric).  Every pqsk metric
    is one of squared L2 or the inner product, so the effective parameters
    are always empty; other values raise ValueError.
    """
    params = {} if metric_params is None else dict(metric_params)
    if warn and "p" in params and p is not None:
        warnings.warn("Parameter p is found in metric_params. The corresponding "
                      "parameter from __init__ is ignored.", SyntaxWarning, stacklevel=4)
    p_eff = params.pop("p", p)
    if params:
        raise ValueError(
            f"metric_params {sorted(params)} are not supported: pqsk's metrics "
            f"{METRICS} take no parameters (metric='minkowski' takes p=2 only).")
    if metric == "minkowski":
        if p_eff != 2:
            raise ValueError(
                f"metric='minkowski' is supported with p=2 (the Euclidean distance) "
                f"only, got p={p_eff!r}: product quantization approximates L2 "
                "distances and inner products.")
        return "euclidean", {}
    if metric == "l2":
        return "euclidean", {}
    return metric, {}

# float16 and integer input are computed in float32; float64 stays float64.
FLOAT_DTYPES = [np.float32, np.float64]


class IndexFormatError(ValueError):
    """A saved index is unreadable, corrupted, or not what was asked for."""


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


def check_self_query(n_removed, method):
    """Refuse ``method(X=None)`` (a query of every indexed point) on an
    index with ``n_removed`` > 0 removed points."""
    if n_removed:
        raise ValueError(
            f"{method}(X=None) queries every indexed point, but "
            f"{n_removed} were removed; pass the query points as X.")


def check_enough_points(n_neighbors, n_fit, n_queries, self_query):
    """Refuse more neighbours than the ``n_fit`` live points hold (for a
    query of the indexed points, ``self_query``, each point itself aside),
    with scikit-learn's messages."""
    if self_query and n_neighbors + 1 > n_fit:
        raise ValueError(
            f"Expected n_neighbors < n_samples_fit, but n_neighbors = "
            f"{n_neighbors}, n_samples_fit = {n_fit}, n_samples = {n_queries}")
    if not self_query and n_neighbors > n_fit:
        raise ValueError(
            f"Expected n_neighbors <= n_samples_fit, but n_neighbors = "
            f"{n_neighbors}, n_samples_fit = {n_fit}, n_samples = {n_queries}")


def _clean_query_extremes(est, X):
    """(min, max) of input ``validate_data`` would pass through unchanged
    (a finite, C-contiguous 2-D ndarray of the fitted dtype and width,
    from an estimator fitted without feature names), else None.  Such
    queries skip scikit-learn's generic checks (about 100 us a call);
    anything else, including every error case, goes through
    ``validate_data``."""
    if not (type(X) is np.ndarray and X.ndim == 2 and X.shape[0] > 0
            and X.dtype == est._fit_dtype_ and X.flags.c_contiguous
            and X.shape[1] == est.n_features_in_
            and not hasattr(est, "feature_names_in_")):
        return None
    lo, hi = X.min(), X.max()
    return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else None


def checked_queries(est, X):
    """The queries X for the fitted estimator ``est``: validated (width,
    feature names, finite, range) and converted to its fitted dtype, C
    order: an array of shape (n_queries, n_features)."""
    extremes = _clean_query_extremes(est, X)
    if extremes is None:
        X = validate_data(est, X, dtype=FLOAT_DTYPES, order="C", reset=False)
        X = np.ascontiguousarray(X, dtype=est._fit_dtype_)
    return check_range(X, extremes, dtype=est._kernel_dtype)


def is_float16_rows(X):
    """Whether X is a 2-D float16 ndarray (a memmap included): input the
    checks and the estimators convert to float32 a chunk at a time, never
    whole (see :func:`checked_float16_chunks`)."""
    return (isinstance(X, np.ndarray) and X.dtype == np.float16 and X.ndim == 2
            and X.shape[1] > 0)


def query_parts(est, X):
    """(n_queries, parts) of a fitted estimator's queries X: validated, then
    prepared as (slice, rows) pairs in order; one pair, but for float16
    input, converted a chunk at a time (:func:`checked_float16_chunks`)."""
    if not is_float16_rows(X):
        Q = est._validate_queries(X)
        return Q.shape[0], [(slice(0, Q.shape[0]), Q)]
    est._check_fitted()
    n, chunks = checked_float16_chunks(est, X)
    return n, ((sl, est._prepare(Q)) for sl, Q in chunks)


def checked_float16_chunks(est, X):
    """(n_rows, chunks) of float16 queries X (``is_float16_rows``) for the
    fitted estimator ``est``: every row validated first, as
    :func:`checked_rows` validates a ``partial_fit`` (width, feature names,
    NaN / infinity, range), then ``chunks``, an iterator of (slice, rows)
    pairs covering X in order, each rows a C-contiguous array of the
    fitted dtype converted when the pair is produced.  Nothing larger than
    a chunk (``rows_per_chunk`` rows of the fitted dtype) is converted at
    once."""
    X, dtype = checked_rows(est, X, reset=False)
    step = rows_per_chunk(X.shape[1] * dtype.itemsize)
    return X.shape[0], ((sl, np.ascontiguousarray(X[sl], dtype=dtype))
                        for sl in chunk_slices(X.shape[0], step))


def _fitted_dtype(est):
    """The dtype the fitted ``est`` computes in: ``_fit_dtype_`` (the
    neighbors estimators), else its codebooks' (:class:`PQTransformer`)."""
    dtype = est.__dict__.get("_fit_dtype_")
    return np.dtype(est.codebooks_.dtype if dtype is None else dtype)


def checked_rows(est, X, reset):
    """(X, dtype): the rows of a ``fit`` (``reset=True``) or ``partial_fit``
    of ``est`` validated, without a copy of an ndarray, and the dtype they
    are computed in.

    A 2-D float or integer ndarray (a memmap included) is returned as
    given, checked chunk by chunk: its first chunk through scikit-learn's
    ``validate_data`` (the ``n_features_in_`` / feature-names contract and
    its errors; sets them when ``reset``), then every chunk for NaN /
    infinity and for the overflow range (:func:`check_range`) in ``dtype``.
    Any other array-like (lists, DataFrames...) goes through
    ``validate_data`` whole and is returned converted to one array.
    float16 input is computed in float32 (its values are exact there):
    an ndarray is never converted whole, and a chunk with NaN or infinity
    raises the error of the same rows given as float32.
    """
    kernel_dtype = getattr(est, "_kernel_dtype", None)
    if not (isinstance(X, np.ndarray) and X.ndim == 2 and X.shape[1] > 0
            and X.dtype.kind in "fiu" and X.dtype.itemsize <= 8):
        X = validate_data(est, X, dtype=FLOAT_DTYPES, order="C", reset=reset)
        dtype = X.dtype if reset else _fitted_dtype(est)
        X = np.ascontiguousarray(X, dtype=dtype)
        check_range(X, dtype=kernel_dtype)
        return X, dtype
    # The head gives validate_data's errors (too few rows, wrong width,
    # feature names, NaN in the head) exactly as for a whole array.
    head_rows = rows_per_chunk(X.shape[1] * 8)
    head = validate_data(est, X[:head_rows], dtype=FLOAT_DTYPES, order="C", reset=reset)
    dtype = head.dtype if reset else _fitted_dtype(est)
    bound = range_bound(X.shape[1], np.dtype(kernel_dtype or dtype))
    lo = hi = 0.0
    for sl in chunk_slices(X.shape[0], rows_per_chunk(X.shape[1] * X.dtype.itemsize)):
        raw = X[sl]
        c_lo, c_hi = raw.min(), raw.max()
        if not (np.isfinite(c_lo) and np.isfinite(c_hi)):
            # float16 is reported as the float32 rows it stands for.
            assert_all_finite(raw.astype(dtype) if raw.dtype == np.float16 else raw,
                              estimator_name=type(est).__name__, input_name="X")
        if raw.dtype != dtype:
            # The range is checked in the dtype the index computes in:
            # float64 beyond float32's range becomes inf only here.
            with np.errstate(over="ignore"):
                chunk = np.asarray(raw, dtype=dtype)
            c_lo, c_hi = chunk.min(), chunk.max()
        lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
        if not max(hi, -lo) <= bound:
            break
    check_range(np.zeros((1, X.shape[1]), dtype), extremes=(lo, hi), dtype=kernel_dtype)
    return X, dtype


def check_neighbors_state(est, max_codewords):
    """The invariants of a loaded neighbours index the kernels rely on,
    but its codes and rotation (the estimator checks those): dtype,
    codebooks (at most ``max_codewords`` per sub-space), metric, sizes,
    tombstones, raw vectors.  Everything is checked against the fitted
    attributes, never against the parameters.  Returns (m, k) of the
    codebooks."""
    dtype = est._fit_dtype_
    require(isinstance(dtype, np.dtype) and dtype in (np.float32, np.float64),
            "_fit_dtype_ must be float32 or float64")
    m, k, _ = check_codebooks(est, max_codewords)
    require(est.codebooks_.dtype == dtype, "_fit_dtype_ differs from the codebooks' dtype")
    d = est.n_features_in_
    metric = est.effective_metric_
    require(isinstance(metric, str) and metric in METRICS,
            f"effective_metric_ {metric!r} is not a metric")
    check_anisotropic_state(est, metric)
    n = check_scalar_int(est.n_samples_fit_, "n_samples_fit_", 0, 2**62)
    check_scalar_int(est._n_features_out, "_n_features_out", n, n + 1)
    check_scalar_int(est.n_removed_, "n_removed_", 0, n + 1)
    if est.removed_ is None:
        require(est.n_removed_ == 0, "n_removed_ > 0 but removed_ is None")
    else:
        check_bool_mask(est.removed_, "removed_", n)
        require(int(np.count_nonzero(est.removed_)) == est.n_removed_,
                "removed_ does not match n_removed_")
    bound = range_bound(d, np.dtype(est._kernel_dtype or dtype))
    if est.vectors_ is not None:
        est.vectors_ = checked_vectors(est.vectors_, n, d, dtype, bound)
    check_refine_state(est, n, d, bound)
    return m, k


# The re-ranking tiers (``refine_dtype_``) and the dtype of their rows.
REFINE_TIERS = {"float32": None, "float16": np.dtype(np.float16), "int8": np.dtype(np.uint8)}


def check_refine_state(est, n, d, bound):
    """The re-ranking tier of a loaded index (``refine_dtype_``,
    ``refine_rows_``, ``refine_offset_``, ``refine_scale_``; files written
    before tiers have none: "float32" and None are set): rows of the
    tier's dtype and shape (n, d), float16 rows finite within ``bound``,
    int8 offset and scale float32 (d,), finite, scale > 0, every decoded
    value within ``bound``; no raw vectors beside a compact tier."""
    kind = est.__dict__.setdefault("refine_dtype_", "float32")
    for name in ("refine_rows_", "refine_offset_", "refine_scale_"):
        est.__dict__.setdefault(name, None)
    require(isinstance(kind, str) and kind in REFINE_TIERS,
            f"refine_dtype_ {kind!r} is not one of {sorted(REFINE_TIERS)}")
    rows, offset, scale = est.refine_rows_, est.refine_offset_, est.refine_scale_
    if kind != "int8":
        require(offset is None and scale is None,
                f"refine_offset_ / refine_scale_ are set for refine_dtype_={kind!r}")
    if kind == "float32":
        require(rows is None, "refine_rows_ is set for refine_dtype_='float32'")
        return
    require(est.vectors_ is None, f"vectors_ is kept beside a {kind} re-ranking tier")
    if kind == "int8" and (offset is not None or scale is not None):
        for a, name in ((offset, "refine_offset_"), (scale, "refine_scale_")):
            check_float_array(a, name, (d,), np.float32, bound)
        require(bool(np.all(scale > 0)), "refine_scale_ must be > 0")
        top = offset.astype(np.float64) + 255 * scale.astype(np.float64)
        require(bool(np.all(np.abs(top) <= bound)),
                f"refine_offset_ + 255 * refine_scale_ go beyond {bound:.3g}")
    if rows is None:
        return
    require(kind != "int8" or offset is not None, "an int8 tier needs refine_offset_")
    if isinstance(rows, np.ndarray):
        require(rows.ndim == 2, "refine_rows_ must be 2-d")
        rows = RowStore(rows.shape[1], rows.dtype, [rows])
    require(isinstance(rows, RowStore), "refine_rows_ must be a row store")
    require(rows.shape == (n, d) and rows.dtype == REFINE_TIERS[kind],
            f"refine_rows_ has shape {rows.shape} and dtype {rows.dtype}, expected "
            f"({n}, {d}) and {REFINE_TIERS[kind]}")
    for chunk in rows.chunks:
        require(chunk.flags.c_contiguous and chunk.dtype.isnative,
                "refine_rows_ must be C-contiguous in native byte order")
        if kind == "float16":
            for sl in chunk_slices(chunk.shape[0], rows_per_chunk(2 * d)):
                check_float_array(chunk[sl], "refine_rows_", (None, d), np.float16, bound)
    est.refine_rows_ = rows
