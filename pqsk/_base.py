"""What every pqsk estimator shares: PQ parameters and the neighbors contract.

* :class:`PQParamsMixin` validates the product-quantization parameters and
  fits (or accepts user-supplied) codebooks through the quantizer core.
* :class:`BasePQNeighbors` owns input validation, the metrics, and the
  ``kneighbors`` / ``kneighbors_graph`` / ``transform`` contract of
  :class:`sklearn.neighbors.KNeighborsTransformer`.  Subclasses implement
  only ``_fit_index``, ``_search`` and ``_self_queries``.
"""

import warnings
import weakref
from numbers import Integral, Real

import numpy as np
from scipy import sparse
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.preprocessing import normalize
from sklearn.utils import assert_all_finite, check_random_state
from sklearn.utils._param_validation import (
    Interval,
    StrOptions,
    validate_parameter_constraints,
)
from sklearn.utils.validation import check_is_fitted, validate_data

from . import _growable, _opq, _quantizer, _reorder, _scorers
from ._filter import check_filter
from ._persist import check_int_array, require
from ._store import FitRows, RowStore, chunk_slices, rows_per_chunk
from ._utils import (
    Progress,
    effective_n_threads,
    index_lock,
    index_writer,
    openmp_region,
    range_bound,
    release_memory,
    restore_on_error,
)

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


# Estimator -> the search-time parameter values last found valid (kept
# outside ``__dict__``, so that pickling, cloning and saving never see it).
_CHECKED_PARAMS = weakref.WeakKeyDictionary()

# float16 and integer input are computed in float32; float64 stays float64.
FLOAT_DTYPES = [np.float32, np.float64]


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


class PQParamsMixin:
    """Product-quantization parameters shared by every estimator."""

    _pq_parameter_constraints = {
        "n_subspaces": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "n_codewords": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "init": [StrOptions({"random", "k-means++"})],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="left")],
        "max_train_samples": [
            Interval(Integral, 1, None, closed="left"),
            StrOptions({"auto"}),
            None,
        ],
        "codebooks": ["array-like", None],
        "rotation": [StrOptions({"opq"}), None],
        "n_jobs": [Interval(Integral, None, -1, closed="right"),
                   Interval(Integral, 1, None, closed="left"), None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "anisotropic_threshold": [Interval(Real, 0, None, closed="neither"), None],
    }

    def _max_train_samples(self):
        if self.max_train_samples == "auto":
            return 256 * self._codewords_cap()
        return self.max_train_samples

    def _codewords_cap(self):
        """k before the training sample is known: ``n_codewords``, 256 for
        "auto" (or the supplied codebooks' k)."""
        if self.n_codewords != "auto":
            return self.n_codewords
        if self.codebooks is not None and np.ndim(self.codebooks) == 3:
            return np.shape(self.codebooks)[1]
        return _quantizer.AUTO_CODEWORDS

    def _pq_shape(self, n_features, n_train):
        """(m, k) for rows of ``n_features`` features trained on ``n_train``
        rows: the parameters, with "auto" resolved (see
        :func:`pqsk._quantizer.auto_n_subspaces` and ``AUTO_CODEWORDS``;
        the supplied codebooks' shape when there are some).  Raises
        ValueError for m > n_features or k > 65536."""
        supplied = self.codebooks is not None and np.ndim(self.codebooks) == 3
        k = self._codewords_cap()
        if self.n_codewords == "auto" and not supplied:
            k = max(1, min(k, n_train // 2))  # k-means with 2+ rows per codeword
        if self.n_subspaces != "auto":
            m = self.n_subspaces
        elif supplied:
            m = np.shape(self.codebooks)[0]
        else:
            m = _quantizer.auto_n_subspaces(n_features, self._codewords_cap())
        _quantizer.check_subspaces(n_features, m)
        _quantizer.check_codewords(k, np.inf)
        return int(m), int(k)

    def _check_user_codebooks(self, n_features, dtype, shape):
        cb = np.asarray(self.codebooks)
        if cb.dtype.kind not in "fiu":
            raise TypeError(f"codebooks must be a numeric array, got dtype {cb.dtype}.")
        m, k = shape
        expected = (m, k, -(-n_features // m))
        if cb.shape != expected:
            raise ValueError(
                "codebooks must have shape (n_subspaces, n_codewords, "
                f"ceil(n_features / n_subspaces)) = {expected} for X with {n_features} "
                f"features, got {cb.shape}."
            )
        with np.errstate(over="ignore"):
            cb = np.array(cb, dtype=dtype, order="C", copy=True)
        # Columns beyond a sub-space's width (m not dividing n_features)
        # are not part of any codeword.
        _quantizer.zero_padding(cb, n_features)
        # Checked after the cast: float64 values beyond float32's range
        # become inf only then.
        if not np.all(np.isfinite(cb)):
            raise ValueError(f"codebooks contain NaN or infinity (in {cb.dtype}).")
        check_range(cb.reshape(-1, cb.shape[2]), name="codebooks",
                    dtype=getattr(self, "_kernel_dtype", None))
        return cb

    def _fit_rotation(self, X, progress):
        """The OPQ rotation learned on a training sample of X (prepared
        rows, an array or a :class:`~pqsk._store.FitRows`), or None for
        ``rotation=None``.  See :mod:`pqsk._opq` for the cost."""
        if self.rotation is None:
            return None
        if self.codebooks is not None:
            raise ValueError("rotation='opq' learns the codebooks with the rotation; it "
                             "cannot be combined with codebooks=... (set one to None).")
        d = X.shape[1]
        self._pq_shape(d, X.shape[0])  # m and k checked before the sample is drawn
        rng = check_random_state(self.random_state)
        sample = _quantizer.training_sample(X, self._max_train_samples(), rng)
        m, k = self._pq_shape(d, sample.shape[0])
        _quantizer.check_codewords(k, sample.shape[0])
        progress(f"learning the OPQ rotation on {sample.shape[0]} x {d} rows")
        R, _, errors = _opq.train_opq(
            sample, m, k, init=self.init,
            max_iter=self.max_iter, n_init=self.n_init, tol=self.tol, random_state=rng,
            n_threads=effective_n_threads(self.n_jobs), progress=progress)
        progress(f"OPQ rotation learned: reconstruction error {errors[0]:.6g} -> "
                 f"{errors[-1]:.6g} on the sample")
        return R

    def _anisotropic_kw(self):
        """Keyword arguments of the ``_quantizer`` encoders: the fitted
        anisotropic threshold (see :mod:`pqsk._anisotropic`), if any."""
        t = getattr(self, "anisotropic_threshold_", None)
        return {} if t is None else {"threshold": t}

    def _fit_codebooks(self, X, progress, directions=None, shape=None):
        """Train the codebooks on (a sample of) X, or take the user's.

        Sets ``n_iter_``, the most Lloyd iterations any sub-space ran (0
        for supplied codebooks), and ``anisotropic_threshold_``, and
        returns the codebooks.  With ``anisotropic_threshold`` the k-means
        codebooks are refined for the anisotropic loss, whose directions
        are the rows of ``directions`` (default X; IVF passes the rows
        whose residuals X holds, X then being the whole sample).
        ``shape``: the (m, k) to train (``refit_codebooks`` keeps the
        fitted ones); default the parameters' (see ``_pq_shape``).
        """
        threshold = getattr(self, "anisotropic_threshold", None)
        self.anisotropic_threshold_ = None if threshold is None else float(threshold)
        n, d = X.shape
        m, k = self._pq_shape(d, n) if shape is None else shape
        if self.codebooks is not None:
            progress("using the supplied codebooks")
            self.n_iter_ = 0
            return self._check_user_codebooks(d, X.dtype, (m, k))
        rng = check_random_state(self.random_state)
        if directions is None:
            sample = _quantizer.training_sample(X, self._max_train_samples(), rng)
        else:  # the same rows of both (as training_sample draws them)
            rows = _quantizer.sample_rows(n, self._max_train_samples(), rng)
            sample = _quantizer.gather_rows(X, rows)
            directions = _quantizer.gather_rows(directions, rows)
        if shape is None:
            m, k = self._pq_shape(d, sample.shape[0])  # "auto": k <= the sample's rows
        _quantizer.check_codewords(k, sample.shape[0])
        progress(
            f"training {m} x KMeans({k}) on {sample.shape[0]} x "
            + (f"{d // m}" if d % m == 0 else f"{d // m}-{d // m + 1}") + " sub-vectors"
        )
        with progress.bar(m, "codebooks", unit="sub-spaces") as bar:
            def subspace_done(msg, level=1):  # called once per sub-space trained
                bar.update()
                progress(msg, level)

            codebooks, n_iter = _quantizer.train_codebooks(
                sample,
                m,
                k,
                init=self.init,
                max_iter=self.max_iter,
                n_init=self.n_init,
                tol=self.tol,
                random_state=rng,
                n_threads=effective_n_threads(self.n_jobs),
                progress=subspace_done,
            )
        self.n_iter_ = int(n_iter.max())
        progress(f"codebooks trained (at most {self.n_iter_} KMeans iterations)")
        if threshold is not None:
            from ._anisotropic import train_anisotropic

            codebooks, losses = train_anisotropic(
                sample, m, k, float(threshold),
                directions=directions, codebooks=codebooks, progress=progress,
                n_threads=effective_n_threads(self.n_jobs))
            progress(f"anisotropic codebooks: mean loss {losses[0]:.4g} -> "
                     f"{losses[-1]:.4g} in {len(losses) - 1} iterations")
        release_memory()  # training's temporaries, before the index is built
        return codebooks


class RefitMixin:
    """``refit_codebooks``: retrain the codebooks on a fresh sample and
    re-encode every stored vector from its raw vector (data drift).

    Estimators implement ``_refit_training_rows(sample)`` (the rows the
    codebooks are trained on) and ``_refit_state(codebooks, recode,
    progress)``, which returns (new attributes, names of growable buffers
    they replace); ``recode(ids, offset=None)`` encodes the prepared raw
    rows of ``ids`` (minus ``offset(rows)``, e.g. the coarse centroids of
    their lists), reading them in id order a chunk at a time.
    """

    def refit_codebooks(self, X_sample, X=None):
        """Retrain the codebooks on a fresh sample and re-encode every stored
        vector, segment by segment.

        For data drift (the seed article's last section): when the vectors
        added since ``fit`` no longer look like the training sample, the
        codebooks fit them worse and recall drops.  Everything but the codes
        stays as it is: ids, tombstones, the segment layout, and the coarse
        cells (IVF) or the graph links (HNSW).  Rows are re-encoded from the
        raw vectors: ``vectors_`` (kept when fitted with ``refine_factor >
        0``), or ``X``, every indexed row in id order (e.g. the memmap the
        index was built from, grown by the appends).

        Cost: training as in ``fit`` (``n_subspaces`` k-means on at most
        ``max_train_samples`` rows of the sample), then one pass that reads
        each stored row (``n_features`` floats, gathered by id, a chunk at a
        time) and encodes it: ``fit``'s encoding pass, without the coarse
        assignment or the graph build.  The new codes are built beside the
        old ones (``n_subspaces`` bytes per stored vector of extra memory)
        while queries go on with the old codebooks; the switch to the new
        codebooks and codes takes the write lock only for a pointer swap.
        Appends and removals wait for the refit.

        Parameters
        ----------
        X_sample : array-like of shape (n_train, n_features)
            Training rows (for example a random sample of recent data).
        X : array-like of shape (``n_samples_fit_``, n_features), default=None
            The indexed rows, row i being id i (removed ids' rows are not
            read); needed when the index keeps no raw vectors.

        Returns
        -------
        self : object
        """
        check_is_fitted(self)
        if self.codebooks is not None:
            raise ValueError("refit_codebooks trains codebooks; this estimator was given "
                             "fixed ones (codebooks=...). Set codebooks=None first.")
        self._check_params_at_call()  # structural parameters changed after fit
        n_threads = effective_n_threads(self.n_jobs)
        progress = Progress(self.verbose, type(self).__name__)
        with index_writer(self):
            with index_lock(self).read(), openmp_region(n_threads):
                state, replaced = self._refit(X_sample, X, n_threads, progress)
            with index_lock(self).write():
                for name in replaced:
                    _growable.discard(self, name)
                self.__dict__.update(state)
        release_memory()
        return self

    def _refit(self, X_sample, X, n_threads, progress):
        sample = np.asarray(self._validate_rows(X_sample, reset=False))
        if X is not None:
            source = self._validate_rows(X, reset=False)
            if source.shape[0] != self.n_samples_fit_:
                raise ValueError(
                    f"X must hold the {self.n_samples_fit_} indexed rows in id order, "
                    f"got {source.shape[0]} rows.")
        elif self.vectors_ is not None:
            source = FitRows(self.vectors_, self._fit_dtype_,
                             self.effective_metric_ == "cosine", self._rotation)
        else:
            raise ValueError(
                "refit_codebooks re-encodes from the raw vectors, which this index does "
                "not keep (refine_factor=0 at fit): pass X, the indexed rows in id order.")
        rows = self._refit_training_rows(sample)
        old_iter = self.n_iter_
        try:
            codebooks = self._fit_codebooks(
                rows, progress, directions=None if rows is sample else sample,
                shape=self.codebooks_.shape[:2])
            n_iter = self.n_iter_
        finally:
            self.n_iter_ = old_iter  # set with the rest, at the switch
        del rows, sample

        def recode(ids, offset=None):
            out = np.empty((ids.shape[0], codebooks.shape[0]),
                           dtype=_quantizer.code_dtype(codebooks.shape[1]))
            order = np.argsort(ids, kind="stable")  # read the source in id order
            for sl in chunk_slices(ids.shape[0], source.chunk_rows()):
                rows = order[sl]
                part = raw = source.take(ids[rows])
                if offset is not None:
                    part = part - offset(rows)
                out[rows] = _scorers.encode(part, codebooks, n_threads, directions=raw,
                                            **self._anisotropic_kw())
            return out

        state, replaced = self._refit_state(codebooks, recode, progress)
        state.update(codebooks_=codebooks, n_iter_=n_iter)
        return state, replaced


def _check_graph_mode(mode):
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


class RemovalMixin:
    """``remove(ids)`` for indexes whose ids are stable (IVF, HNSW)."""

    def remove(self, ids):
        """Remove indexed vectors by id; they never appear in results again.

        Ids are not reused: later ``partial_fit`` rows continue from
        ``n_samples_fit_``.  On error nothing is removed.  Costs
        O(len(ids)): the ids are marked in ``removed_`` in place (an array
        read from ``removed_`` earlier sees the change) and the search
        skips them; the index drops their entries later (see ``compact``;
        :class:`HNSWPQNeighbors` also rebuilds, here, a sealed segment
        left with more than half of its nodes removed).

        Parameters
        ----------
        ids : array-like of int
            Ids (row numbers at fit / partial_fit) of vectors to remove.

        Returns
        -------
        self : object
        """
        check_is_fitted(self)
        ids = checked_remove_ids(ids)
        if ids.size == 0:
            return self
        # Checked and applied under the lock: two concurrent removes must not
        # both start from the same old mask.  The mask is updated in place
        # (O(len(ids)), no copy of it): readers wait for the lock.
        with index_writer(self):
            with index_lock(self).write():
                self._mark_removed(ids)
            # Still the only writer: follow-up work (HNSW compacts sealed
            # segments past a share of tombstones) takes the locks it needs.
            self._after_remove()
        return self

    def _after_remove(self):
        """Hook run after ``remove`` published its tombstones, under the
        writer mutex but not the RWLock."""

    def _mark_removed(self, ids):
        """Check ``ids`` against the index and mark them removed (caller
        holds the write lock)."""
        n = self.n_samples_fit_
        if ids.min() < 0 or ids.max() >= n:
            raise ValueError(f"ids must lie in [0, {n}), got values in "
                             f"[{ids.min()}, {ids.max()}].")
        removed = self.removed_
        if removed is not None and removed[ids].any():
            raise ValueError(
                f"ids {ids[removed[ids]][:10].tolist()} were already removed.")
        removed = (_growable.owned(self, "removed", removed) if removed is not None
                   else _growable.grow(self, "removed", np.zeros(0, bool), n, False))
        removed[ids] = True
        self.removed_ = removed
        self.n_removed_ = self.n_removed_ + int(ids.size)
        self._remove_rows(ids, removed)


def _check_n_neighbors(n_neighbors):
    if not isinstance(n_neighbors, (Integral, np.integer)) or isinstance(n_neighbors, bool):
        raise TypeError(
            f"n_neighbors does not take {type(n_neighbors).__name__} value, enter "
            "an integer value."
        )
    if n_neighbors <= 0:
        raise ValueError(f"Expected n_neighbors > 0. Got {n_neighbors}.")
    return int(n_neighbors)


class BasePQNeighbors(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    """The neighbors contract shared by pqsk's search estimators.

    Memory model of ``fit`` and ``partial_fit`` (out-of-core input): X is
    read in chunks of at most ``pqsk._store.CHUNK_ROWS`` rows (65,536) and
    ``CHUNK_BYTES`` bytes (32 MiB), so a ``np.memmap`` or
    ``np.load(path, mmap_mode="r")`` array is never copied whole:
    validation (NaN, infinity, the overflow range), conversion to the
    fitted dtype, cosine normalisation, encoding and (IVF) list assignment
    all run a chunk at a time.  Peak extra memory is::

        the index + the training sample + a few chunks

    where the index is what ``memory_usage_["total"]`` reports at the end
    (codes, ids, lists or graph, raw vectors held in memory), the training
    sample the rows a k-means holds at once (at most
    ``max_train_samples``; see each estimator), and a chunk's working set
    a few times ``CHUNK_BYTES``.  Other array-likes (lists, DataFrames)
    are converted to one array first, as scikit-learn does.  Exception:
    :class:`HNSWPQNeighbors` links the rows it inserts by their float32
    vectors, all at once (``n_samples * n_features * 4`` bytes during
    ``fit``, the batch's during ``partial_fit``).

    Raw vectors (``refine_factor > 0``) are kept in ``vectors_``, a row
    store (:class:`pqsk._store.RowStore`, array-like).  Rows given as a
    file-backed array (a memmap) that is C-contiguous and of the fitted
    dtype are kept by reference, like the training data of
    :class:`~sklearn.neighbors.NearestNeighbors`: they stay on disk, and
    re-ranking reads only the ``refine_factor * n_neighbors`` candidate
    rows of each query (keep the file unchanged while the index is used).
    Other rows are copied into memory.  The rows are stored as given, also
    for ``metric="cosine"``: the candidates are normalised at re-rank time.

    Thread safety: ``kneighbors`` (and what calls it) may run from many
    threads at once, each releasing the GIL in the kernels.  ``fit``,
    ``partial_fit``, ``remove`` and ``compact`` take the index's exclusive
    lock: queries wait for them, and see the index before or after, never
    half-modified.

    Distances follow ``metric``: ``"euclidean"`` returns the square root of
    the ADC squared distance, ``"sqeuclidean"`` the ADC squared distance,
    ``"cosine"`` ``||q - x_hat||^2 / 2`` for the normalised query q and
    the decoded normalised vector x_hat (which is ``1 - cos(q, x)`` when
    x_hat = x), ``"dot"`` ``-<q, x_hat>``.

    Cosine ranks by the L2 ADC distance on unit vectors rather than by the
    inner product with x_hat: the decoded vectors are shorter than 1 by
    varying amounts, and the L2 form accounts for it.  On GloVe 50-d with
    m=10, k=256 it finds 0.45 of the true top-10 where the inner-product
    form finds 0.35.  (:class:`IVFPQNeighbors` with
    ``anisotropic_threshold`` ranks cosine candidates by the inner
    product, ``1 - <q, x_hat>``, whose error that loss bounds.)
    """

    _neighbors_parameter_constraints = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "metric": [StrOptions(set(METRICS) | set(METRIC_ALIASES))],
        "p": [Interval(Real, 0, None, closed="right"), None],
        "metric_params": [dict, None],
        "mode": [StrOptions({"distance", "connectivity"})],
        "refine_factor": [Interval(Integral, 0, None, closed="left")],
        "radius": [Interval(Real, None, None, closed="neither")],
    }

    # Parameters read at search time: they may change with ``set_params``
    # after fit and are validated at every call.  Every other parameter
    # shapes the fitted index; see ``_fitted_values``.
    _search_params = ("n_neighbors", "refine_factor", "n_jobs", "mode", "radius")

    # dtype the kernels compute distances in, when not the fitted dtype.
    _kernel_dtype = None

    # -- subclass hooks -------------------------------------------------
    def _fit_index(self, X, progress):
        """Train the quantizers on validated, metric-prepared X and index it
        (typically through ``_add_rows``)."""
        raise NotImplementedError

    def _add_rows(self, X, n_threads, progress):
        """Append prepared rows to a trained index, ids continuing from
        ``n_samples_fit_``.  Must compute everything before replacing any
        attribute, so that a failure leaves the index unchanged, and must
        end with ``_commit_size``."""
        raise NotImplementedError

    def _search(self, Q, n_candidates, n_threads, ranking_only=False, blocked=None):
        """ADC distances and int64 ids of the best ``n_candidates``, rows
        sorted by (dist, id), empty slots (+inf, INT64_MAX).
        ``ranking_only``: the caller re-ranks the candidates with exact
        distances, so the distances may be cheaper estimates of the ADC
        ones (4-bit IVF lists).  ``blocked``: a :class:`pqsk._filter.Blocked`
        (ids removed or not allowed, one row per query of Q or one for
        all), which replaces the tombstones: the kernels skip those ids."""
        raise NotImplementedError

    def _reconstruct(self):
        """Decoded vectors of every indexed point, in id order."""
        raise NotImplementedError

    def _fitted_values(self):
        """{parameter: the value the fitted index was built with} for the
        parameters that define the fitted state.  Subclasses add theirs."""
        m, k = self.codebooks_.shape[:2]
        # "auto" chose m and k at fit.
        fitted = {"n_subspaces": m, "n_codewords": k}
        return {"metric": self.effective_metric_,
                **{p: v for p, v in fitted.items() if not isinstance(getattr(self, p), str)},
                "rotation": None if self._rotation is None else "opq",
                "anisotropic_threshold": self.anisotropic_threshold_}

    # -- shared machinery -------------------------------------------------
    def _check_params_at_call(self):
        """Validate the search-time parameters, and refuse structural ones
        changed with ``set_params`` since fit.

        What a kernel reads comes from the fitted state; the parameters
        only choose how to search it.  The last values found valid are
        remembered, so a query with unchanged parameters pays a tuple
        comparison, not scikit-learn's validation.
        """
        names = self._search_params
        fitted_values = self._fitted_values()
        key = tuple((type(v), v) for v in (getattr(self, n) for n in
                                           (*names, *fitted_values, *self._metric_names)))
        if _CHECKED_PARAMS.get(self) == key:
            return
        validate_parameter_constraints(
            {n: self._parameter_constraints[n] for n in names},
            {n: getattr(self, n) for n in names},
            caller_name=type(self).__name__,
        )
        for name, fitted in fitted_values.items():
            value = getattr(self, name)
            if name == "metric":  # aliases: compared by what they mean
                value = self._param_metric()
            if value != fitted:
                raise ValueError(
                    f"{name}={value!r} was set after fit, but this index was built "
                    f"with {name}={fitted!r}; call fit to rebuild it with the new "
                    f"value (partial_fit cannot change it), or set {name} back."
                )
        _CHECKED_PARAMS[self] = key

    # The parameters that together name the metric (see ``resolve_metric``).
    _metric_names = ("metric", "p", "metric_params")

    def _param_metric(self):
        """The metric the parameters name now (aliases resolved): what the
        next ``fit`` gives ``effective_metric_``."""
        return resolve_metric(self.metric, self.p, self.metric_params)[0]

    @property
    def effective_metric_params_(self):
        """Parameters of ``effective_metric_``: always ``{}`` (pqsk's metrics
        take none; "minkowski" with p=2 is "euclidean"), as
        :class:`~sklearn.neighbors.NearestNeighbors` reports them."""
        self.effective_metric_  # AttributeError when not fitted
        return {}

    @property
    def _inner_product(self):
        """Whether the kernels rank by minus the inner product ("dot") rather
        than by squared L2 (every other metric), as fitted."""
        return self.effective_metric_ == "dot"

    @property
    def _rotation(self):
        """The fitted OPQ rotation R (rows and queries are searched as
        ``x @ R``), or None; files saved before OPQ have no ``rotation_``."""
        return self.__dict__.get("rotation_")

    def _rotate(self, Q):
        R = self._rotation
        return Q if R is None else np.ascontiguousarray(Q @ R, dtype=Q.dtype)

    def _prepare(self, X):
        if self.effective_metric_ == "cosine":
            X = normalize(X, copy=True)
        return X

    def _check_fitted(self):
        # check_is_fitted scans every attribute; this is on every query.
        if not hasattr(self, "n_samples_fit_"):
            check_is_fitted(self)

    def _validate_queries(self, X):
        self._check_fitted()
        extremes = self._clean_query_extremes(X)
        if extremes is None:
            X = validate_data(self, X, dtype=FLOAT_DTYPES, order="C", reset=False)
            X = np.ascontiguousarray(X, dtype=self._fit_dtype_)
        return self._prepare(check_range(X, extremes, dtype=self._kernel_dtype))

    def _clean_query_extremes(self, X):
        """(min, max) of input ``validate_data`` would pass through unchanged
        (a finite, C-contiguous 2-D ndarray of the fitted dtype and width,
        from an estimator fitted without feature names), else None.  Such
        queries skip scikit-learn's generic checks (about 100 us a call);
        anything else, including every error case, goes through
        ``validate_data``."""
        if not (type(X) is np.ndarray and X.ndim == 2 and X.shape[0] > 0
                and X.dtype == self._fit_dtype_ and X.flags.c_contiguous
                and X.shape[1] == self.n_features_in_
                and not hasattr(self, "feature_names_in_")):
            return None
        lo, hi = X.min(), X.max()
        return (lo, hi) if np.isfinite(lo) and np.isfinite(hi) else None

    def _validate_rows(self, X, reset):
        """Validate ``fit`` (``reset=True``) or ``partial_fit`` input without
        copying it: a :class:`~pqsk._store.FitRows` that hands out its rows
        chunk by chunk, in the fitted dtype, normalised for cosine.

        A 2-D float or integer ndarray (a memmap included) is checked chunk
        by chunk: its first chunk through scikit-learn's ``validate_data``
        (the ``n_features_in_`` / feature-names contract and its errors),
        then every chunk for NaN / infinity and for the overflow range
        (``check_range``), in the dtype it will be computed in.  Any other
        array-like (lists, DataFrames...) goes through ``validate_data``
        whole, which converts it to one array first.
        """
        if not (isinstance(X, np.ndarray) and X.ndim == 2 and X.shape[1] > 0
                and X.dtype.kind in "fiu" and X.dtype.itemsize <= 8):
            X = validate_data(self, X, dtype=FLOAT_DTYPES, order="C", reset=reset)
            dtype = X.dtype if reset else self._fit_dtype_
            X = np.ascontiguousarray(X, dtype=dtype)
            check_range(X, dtype=self._kernel_dtype)
            return FitRows(X, dtype, self._unit_norm(reset),
                           None if reset else self._rotation)
        # The head gives validate_data's errors (too few rows, wrong width,
        # feature names, NaN in the head) exactly as for a whole array.
        head_rows = rows_per_chunk(X.shape[1] * 8)
        head = validate_data(self, X[:head_rows], dtype=FLOAT_DTYPES, order="C",
                             reset=reset)
        dtype = head.dtype if reset else self._fit_dtype_
        bound = range_bound(X.shape[1], np.dtype(self._kernel_dtype or dtype))
        lo = hi = 0.0
        for sl in chunk_slices(X.shape[0], rows_per_chunk(X.shape[1] * X.dtype.itemsize)):
            raw = X[sl]
            c_lo, c_hi = raw.min(), raw.max()
            if not (np.isfinite(c_lo) and np.isfinite(c_hi)):
                assert_all_finite(raw, estimator_name=type(self).__name__, input_name="X")
            if raw.dtype != dtype:
                # The range is checked in the dtype the index computes in:
                # float64 beyond float32's range becomes inf only here.
                with np.errstate(over="ignore"):
                    chunk = np.asarray(raw, dtype=dtype)
                c_lo, c_hi = chunk.min(), chunk.max()
            lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
            if not max(hi, -lo) <= bound:
                break
        check_range(np.zeros((1, X.shape[1]), dtype), extremes=(lo, hi),
                    dtype=self._kernel_dtype)
        return FitRows(X, dtype, self._unit_norm(reset), None if reset else self._rotation)

    def _unit_norm(self, reset):
        metric = self._param_metric() if reset else self.effective_metric_
        return metric == "cosine"

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Train the quantizers on X and index every row of X.

        X is read chunk by chunk (see the memory model in the class
        docstring): a ``np.memmap`` or ``np.load(..., mmap_mode="r")`` array
        is never copied whole.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Vectors to index; row i gets id i.
        y : ignored

        Returns
        -------
        self : object
            The fitted estimator.
        """
        # A failed fit leaves a fitted index as it was (restore_on_error).
        with index_writer(self), index_lock(self).write(), restore_on_error(self):
            metric = resolve_metric(self.metric, self.p, self.metric_params, warn=True)[0]
            if self.anisotropic_threshold is not None and metric not in ("dot", "cosine"):
                raise ValueError(
                    f"anisotropic_threshold={self.anisotropic_threshold!r} needs an "
                    f"inner-product metric ('dot' or 'cosine'), got metric="
                    f"{self.metric!r}; set anisotropic_threshold=None for L2 metrics.")
            rows = self._validate_rows(X, reset=True)
            progress = Progress(self.verbose, type(self).__name__)
            self._fit_dtype_ = rows.dtype
            self.effective_metric_ = metric
            self.n_samples_fit_ = 0
            self.n_removed_ = 0
            self.removed_ = None
            # Raw vectors are kept, for good, when fitted with re-ranking.
            self.vectors_ = (RowStore.empty(rows.shape[1], rows.dtype)
                             if self.refine_factor > 0 else None)
            # OPQ: every row is encoded, and every query searched, as x @ R.
            self.rotation_ = rows.rotation = self._fit_rotation(rows, progress)
            self._fit_index(rows, progress)
        _CHECKED_PARAMS.pop(self, None)
        release_memory()
        return self

    def partial_fit(self, X, y=None):
        """Add rows to the index without retraining the quantizers.

        New rows get ids ``n_samples_fit_``, ``n_samples_fit_ + 1``, ...
        An unfitted estimator is fitted on X instead.  On error the index
        is left unchanged.  X is read chunk by chunk, as in ``fit``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        self : object
            The estimator, with X indexed.
        """
        if not hasattr(self, "n_samples_fit_"):
            return self.fit(X)
        self._check_params_at_call()
        n_threads = effective_n_threads(self.n_jobs)
        with index_writer(self), index_lock(self).write(), restore_on_error(self), \
                openmp_region(n_threads):
            rows = self._validate_rows(X, reset=False)
            self._add_rows(rows, n_threads, Progress(self.verbose, type(self).__name__))
        if rows.shape[0] > rows.chunk_rows():
            release_memory()  # after a chunked pass; not after every small batch
        return self

    # -- shards that share trained quantizers (pqsk.dask) -------------------
    # Fitted attributes that make up the trained quantizers: what
    # ``_trained_state`` hands out and ``_fit_trained`` copies (subclasses
    # add theirs).  Every other fitted attribute describes indexed rows.
    _trained_attrs = ("_fit_dtype_", "effective_metric_", "n_features_in_",
                      "feature_names_in_", "codebooks_", "rotation_",
                      "anisotropic_threshold_", "n_iter_")

    def _start_empty(self):
        """Set up the row state of an index holding no rows, its quantizers
        trained (``_fit_index`` after training; ``_fit_trained``)."""
        raise NotImplementedError

    def _trained_state(self):
        """{attribute: value} of the trained quantizers of this fitted
        index (arrays by reference), for ``_fit_trained``."""
        check_is_fitted(self)
        return {a: self.__dict__[a] for a in self._trained_attrs if a in self.__dict__}

    def _fit_trained(self, trained, X=None):
        """``fit(X)`` with the quantizers of ``trained`` (another index's
        ``_trained_state()``) instead of quantizers trained on X.

        Indexes built so from one state compare their distances and ids:
        the shards of :class:`pqsk.dask.ShardedNeighbors`.  X (None: no
        row) is validated as by ``partial_fit``, its rows get ids 0, 1, ...
        The structural parameters must be those the state was trained with.
        """
        with index_writer(self), index_lock(self).write(), restore_on_error(self):
            self.__dict__.update(trained)
            rows = None if X is None else self._validate_rows(X, reset=False)
            self.n_samples_fit_ = self._n_features_out = 0
            self.n_removed_ = 0
            self.removed_ = None
            self.vectors_ = (RowStore.empty(self.n_features_in_, self._fit_dtype_)
                             if self.refine_factor > 0 else None)
            self._start_empty()
            _CHECKED_PARAMS.pop(self, None)
            self._check_params_at_call()
            if rows is not None and rows.shape[0]:
                n_threads = effective_n_threads(self.n_jobs)
                with openmp_region(n_threads):
                    self._add_rows(rows, n_threads,
                                   Progress(self.verbose, type(self).__name__))
        _CHECKED_PARAMS.pop(self, None)
        return self

    def _check_loaded_state(self):
        """Invariants the kernels rely on, checked after ``load``.

        Everything is checked against the fitted attributes (m and k from
        ``codebooks_``...), never against the parameters, which
        ``set_params`` may have changed before the save.  Subclasses add
        their own arrays and the range of their floats.
        """
        from ._persist import check_bool_mask, check_codebooks, check_scalar_int

        dtype = self._fit_dtype_
        require(isinstance(dtype, np.dtype) and dtype in (np.float32, np.float64),
                "_fit_dtype_ must be float32 or float64")
        m, k, _ = check_codebooks(self, _quantizer.MAX_CODEWORDS)
        require(self.codebooks_.dtype == dtype, "_fit_dtype_ differs from the codebooks' dtype")
        d = self.n_features_in_
        self.rotation_ = self._rotation  # missing (saved before OPQ): None
        if self.rotation_ is not None:
            _opq.check_rotation(self.rotation_, d, dtype)
        metric = self.effective_metric_
        require(isinstance(metric, str) and metric in METRICS, f"effective_metric_ {metric!r} is not a metric")
        check_anisotropic_state(self, metric)
        n = check_scalar_int(self.n_samples_fit_, "n_samples_fit_", 0, 2**62)
        check_scalar_int(self._n_features_out, "_n_features_out", n, n + 1)
        self._check_codes(m, k)
        check_scalar_int(self.n_removed_, "n_removed_", 0, n + 1)
        if self.removed_ is None:
            require(self.n_removed_ == 0, "n_removed_ > 0 but removed_ is None")
        else:
            check_bool_mask(self.removed_, "removed_", n)
            require(int(np.count_nonzero(self.removed_)) == self.n_removed_,
                    "removed_ does not match n_removed_")
        if self.vectors_ is not None:
            self.vectors_ = self._checked_vectors(
                self.vectors_, n, d, dtype, range_bound(d, np.dtype(self._kernel_dtype or dtype)))

    def _check_codes(self, m, k):
        check_int_array(self.codes_, "codes_", (None, m), 0, k,
                        dtype=_quantizer.code_dtype(k))

    @staticmethod
    def _checked_vectors(vectors, n, d, dtype, bound):
        """The raw vectors as a row store, every chunk checked (dtype,
        C order, finite, within ``bound``) a ``CHUNK_BYTES`` slice at a
        time.  ``load`` gives one array, memory-mapped with ``mmap_mode``:
        it becomes the store's only chunk, by reference."""
        from ._persist import check_float_array

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

    def _memory_parts(self):
        """({part: bytes} growing with the vectors, {part: bytes} fixed)."""
        raise NotImplementedError

    @property
    def memory_usage_(self):
        """Bytes held by the fitted index, by part (dict of ints).

        Each array the index holds, plus ``"vectors"`` (raw vectors kept
        in memory for ``refine_factor > 0``, else 0), ``"reserved"``
        (capacity held by arrays that grow in place, beyond their used
        rows: at most about as much again as those arrays), ``"total"``
        (everything in memory), ``"vectors_mapped"`` (raw vectors read
        from a memory-mapped file: a memmap the index was fitted on, or a
        saved index loaded with ``mmap_mode``; not in ``"total"``), and
        ``"per_vector"``: the bytes per indexed vector of the parts that
        grow with the data (codes, ids, graph links), raw vectors not
        included, so that it compares across estimators.
        """
        check_is_fitted(self)
        growing, fixed = self._memory_parts()
        store = self.vectors_
        parts = {**growing, **fixed,
                 "vectors": 0 if store is None else store.memory_nbytes,
                 "reserved": self._reserved_bytes()}
        parts["total"] = sum(parts.values())
        parts["vectors_mapped"] = 0 if store is None else store.mapped_nbytes
        parts["per_vector"] = sum(growing.values()) / max(1, self._n_stored())
        return parts

    def _n_stored(self):
        """Entries the index stores (removed ones not yet dropped included)."""
        return self.codes_.shape[0]

    def _reserved_bytes(self):
        """Bytes allocated for appends beyond the used rows (see
        ``pqsk._growable``); the ``"reserved"`` part of ``memory_usage_``."""
        return _growable.spare_bytes(self, "removed", self.removed_)

    def _size_state(self, n_total):
        """The attributes that record the index's size once it holds
        ``n_total`` ids: computed (and the tombstones grown, in place,
        amortized O(new rows)) without changing the estimator."""
        removed = self.removed_
        if removed is not None:
            removed = _growable.grow(self, "removed", removed,
                                     n_total - removed.shape[0], False)
        return {"removed_": removed, "n_samples_fit_": n_total,
                "_n_features_out": n_total}

    def _commit_size(self, n_total):
        self.__dict__.update(self._size_state(n_total))

    def _grown_vectors(self, X):
        """The raw vectors with the rows of X (a :class:`~pqsk._store.FitRows`)
        appended when the index keeps them (it was fitted with
        ``refine_factor > 0``), else None: a new row store sharing the old
        one's chunks (O(batch), nothing copied)."""
        if self.vectors_ is None:
            return None
        return self.vectors_.appended(X)

    @property
    def _n_live(self):
        return self.n_samples_fit_ - self.n_removed_

    def _n_candidates(self, n_neighbors):
        """How many ADC candidates to fetch: ``refine_factor * n_neighbors``
        (at most the live vectors) when re-ranking, else ``n_neighbors``."""
        if self.refine_factor == 0:
            return n_neighbors
        if self.vectors_ is None:
            raise ValueError(
                f"refine_factor={self.refine_factor} needs the raw vectors, which are "
                "kept only when the index is fitted with refine_factor > 0; refit the "
                "index, or set refine_factor=0."
            )
        return max(n_neighbors, min(n_neighbors * self.refine_factor, self._n_live))

    def _search_refined(self, Q, n_neighbors, n_threads, blocked=None):
        """ADC search, then exact re-ranking when ``refine_factor > 0``.

        Q is prepared (normalised for cosine) but not rotated: the ADC
        search sees ``Q @ rotation_``, the re-ranking compares Q itself with
        the raw (unrotated) vectors.  ``blocked`` (filtered search): see
        ``_search``; the re-ranking sees only the candidates it lets
        through."""
        kw = {} if blocked is None else {"blocked": blocked}
        dist, ind = self._search(self._rotate(Q), self._n_candidates(n_neighbors), n_threads,
                                 ranking_only=self.refine_factor > 0, **kw)
        if self.refine_factor > 0:
            # Only the candidate rows are read from the row store; stored
            # rows are raw, so cosine normalises them here.
            return _reorder.exact_rerank(Q, self.vectors_, ind, n_neighbors,
                                         self._inner_product,
                                         unit_norm=self.effective_metric_ == "cosine",
                                         n_threads=n_threads)
        return dist.astype(self._fit_dtype_, copy=False), ind

    def _self_queries(self):
        """(slice, query vectors) pairs standing for the indexed points (for
        X=None), in id order: the raw vectors when kept (normalised for
        cosine), a chunk at a time, so that a memory-mapped store is never
        read whole into memory; else the reconstructions, all at once
        (n_samples_fit x n_features), rotated back to the input space
        (``x_hat @ rotation_.T``) as ``_search_refined`` rotates them."""
        n = self.n_samples_fit_
        if self.vectors_ is not None:
            step = rows_per_chunk(self.n_features_in_ * self.vectors_.dtype.itemsize)
            for sl in chunk_slices(n, step):
                yield sl, self._prepare(self.vectors_[sl])
            return
        X_hat = self._reconstruct()
        R = self._rotation
        yield slice(0, n), X_hat if R is None else np.ascontiguousarray(X_hat @ R.T)

    def _finish_distances(self, raw):
        if self.effective_metric_ == "euclidean":
            return np.sqrt(np.maximum(raw, 0, out=raw), out=raw)
        if self.effective_metric_ == "cosine":
            raw *= 0.5
        return raw

    def _search_filtered(self, Q, n_neighbors, n_threads, flt, first):
        """``_search_refined`` of the queries Q, numbered from ``first``
        in the filter ``flt`` (a :class:`pqsk._filter.QueryFilter` or
        None); per-query filters are searched a chunk of queries at a
        time (each with a dense block of masks)."""
        if flt is None:
            return self._search_refined(Q, n_neighbors, n_threads)
        removed = self.removed_ if self.n_removed_ else None
        if not flt.per_query:
            return self._search_refined(Q, n_neighbors, n_threads, flt.blocked(removed))
        dist = ind = None
        for sl in chunk_slices(Q.shape[0], flt.chunk_rows()):
            blocked = flt.blocked(removed, slice(first + sl.start, first + sl.stop))
            d, i = self._search_refined(Q[sl], n_neighbors, n_threads, blocked)
            if dist is None:
                dist = np.empty((Q.shape[0], d.shape[1]), dtype=d.dtype)
                ind = np.empty((Q.shape[0], i.shape[1]), dtype=i.dtype)
            dist[sl], ind[sl] = d, i
        if dist is None:  # no query
            return self._search_refined(Q, n_neighbors, n_threads)
        return dist, ind

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True, *, filter=None):
        """Find the (approximate) K-neighbors of points.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            The query points. If None, the neighbors of each indexed point
            are returned, the point itself excluded.  As the index keeps
            only codes, the indexed points are then represented by their
            reconstructions.
        n_neighbors : int, default=None
            Number of neighbors to get; the estimator's ``n_neighbors``
            if None.
        return_distance : bool, default=True
            Whether to return the distances.
        filter : array-like or sparse matrix, default=None
            The indexed ids each query may return (see
            :ref:`filtering`): a boolean mask of shape
            (n_samples_fit,), an array of allowed ids, or a scipy sparse
            matrix (or 2-d boolean array) of shape (n_queries,
            n_samples_fit) whose nonzero entries in row i are the ids
            query i may return.  Applied inside the search, not to its
            results: each query gets ``n_neighbors`` allowed ids whenever
            that many are allowed (and not removed).  When fewer are, the
            row ends with id -1 at distance +inf.  With ``X=None`` each
            point is still excluded from its own row.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries, n_neighbors)
            Distances under ``metric``, in the float dtype the index was
            fitted in: float64 when fitted on float64, else float32
            (float32, float16 and integer input), whatever the queries'
            dtype (they are converted to it).  scikit-learn's
            :class:`~sklearn.neighbors.NearestNeighbors` returns float64
            in every case.  Only if ``return_distance``.
        neigh_ind : ndarray of shape (n_queries, n_neighbors), int64
            Indices of the nearest indexed points, sorted by distance, ties
            broken by the smaller index.
        """
        self._check_fitted()
        with index_lock(self).read():
            return self._kneighbors(X, n_neighbors, return_distance, filter)

    def _kneighbors(self, X, n_neighbors, return_distance, filter=None):
        self._check_params_at_call()
        if n_neighbors is None:
            n_neighbors = self.n_neighbors
        n_neighbors = _check_n_neighbors(n_neighbors)
        query_is_train = X is None
        if query_is_train:
            if self.n_removed_:
                raise ValueError(
                    "kneighbors(X=None) queries every indexed point, but "
                    f"{self.n_removed_} were removed; pass the query points as X."
                )
            n_neighbors += 1
            n_queries = self.n_samples_fit_
        else:
            Q = self._validate_queries(X)
            n_queries = Q.shape[0]
        flt = check_filter(filter, self.n_samples_fit_, n_queries)
        n_fit = self._n_live
        if n_neighbors > n_fit:
            if query_is_train:
                raise ValueError(
                    f"Expected n_neighbors < n_samples_fit, but n_neighbors = "
                    f"{n_neighbors - 1}, n_samples_fit = {n_fit}, n_samples = "
                    f"{n_queries}"
                )
            raise ValueError(
                f"Expected n_neighbors <= n_samples_fit, but n_neighbors = "
                f"{n_neighbors}, n_samples_fit = {n_fit}, n_samples = {n_queries}"
            )
        # One thread per query at most: a parallel region for a handful of
        # queries costs more than it saves, badly so on a busy machine.
        n_threads = max(1, min(effective_n_threads(self.n_jobs), n_queries))
        with openmp_region(n_threads):
            if query_is_train:
                dist = ind = None
                for sl, Q in self._self_queries():
                    d, i = self._search_filtered(Q, n_neighbors, n_threads, flt, sl.start)
                    if dist is None:
                        dist = np.empty((n_queries, n_neighbors), dtype=d.dtype)
                        ind = np.empty((n_queries, n_neighbors), dtype=i.dtype)
                    dist[sl], ind[sl] = d, i
            else:
                dist, ind = self._search_filtered(Q, n_neighbors, n_threads, flt, 0)
        if flt is not None:
            # Fewer allowed ids than n_neighbors: the empty slots (+inf,
            # INT64_MAX, last in each row) become (+inf, -1).
            empty = (ind < 0) | (ind >= self.n_samples_fit_)
            if empty.any():
                ind[empty] = -1
                dist[empty] = np.inf
        if query_is_train:
            # Drop each point from its own row; where it is not among the
            # results (duplicates), drop the first column as scikit-learn does
            # (or, when the filter does not allow the point, the last one).
            mask = ind != np.arange(n_queries)[:, None]
            no_self = np.all(mask, axis=1)
            if flt is not None:
                self_ok = (flt.allowed if not flt.per_query
                           else flt.matrix.diagonal().astype(bool))
                mask[no_self & ~self_ok, -1] = False
                no_self &= self_ok
            mask[no_self, 0] = False
            ind = ind[mask].reshape(n_queries, n_neighbors - 1)
            dist = dist[mask].reshape(n_queries, n_neighbors - 1)
        if return_distance:
            return self._finish_distances(dist), ind
        return ind

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity", *,
                         filter=None):
        """Compute the (weighted) graph of k-neighbors for points in X.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            The query points; if None, the indexed points (self excluded).
        n_neighbors : int, default=None
            Number of neighbors per row; the estimator's ``n_neighbors`` if None.
        mode : {"connectivity", "distance"}, default="connectivity"
            ``"connectivity"`` stores ones, ``"distance"`` the distances
            under ``metric``.
        filter : array-like or sparse matrix, default=None
            The ids each query may link to, as in :meth:`kneighbors`.  A
            row whose query has fewer than ``n_neighbors`` allowed ids
            holds only those.

        Returns
        -------
        A : sparse matrix of shape (n_queries, n_samples_fit), CSR
            ``A[i, j]`` is the edge from query i to indexed point j.
        """
        check_is_fitted(self)
        _check_graph_mode(mode)
        if mode == "connectivity":
            ind = self.kneighbors(X, n_neighbors, return_distance=False, filter=filter)
            data = np.ones(ind.size, dtype=np.float64)
        else:
            dist, ind = self.kneighbors(X, n_neighbors, return_distance=True,
                                        filter=filter)
            data = np.ravel(dist)
        n_queries, k = ind.shape
        found = ind >= 0  # filtered rows may hold fewer than k
        if not found.all():
            indptr = np.concatenate([[0], np.cumsum(found.sum(axis=1))])
            return sparse.csr_matrix((data[found.ravel()], ind[found], indptr),
                                     shape=(n_queries, self.n_samples_fit_))
        indptr = np.arange(0, n_queries * k + 1, k)
        return sparse.csr_matrix(
            (data, ind.ravel(), indptr), shape=(n_queries, self.n_samples_fit_)
        )

    # -- radius queries ----------------------------------------------------
    # Candidates are fetched k at a time with the k-neighbours search, k
    # doubling, until the k-th is beyond the radius or the query has no
    # more points to visit (``_radius_caps``).

    # Candidates asked for first (HNSW: its beam width).
    _radius_first_k = 16

    def radius_neighbors(self, X=None, radius=None, return_distance=True,
                         sort_results=False, *, filter=None):
        """Find the (approximate) neighbors within a given radius of points.

        Approximate: a query returns the points within ``radius`` among
        those the index visits for it, which are

        * :class:`PQNeighbors`: every indexed point;
        * :class:`IVFPQNeighbors`: the points of the ``n_probe`` lists
          nearest the query (its last request, of at most twice as many
          candidates as those lists hold, may reach into the next lists in
          centroid order, as ``kneighbors`` does when the probed lists hold
          too few points);
        * :class:`HNSWPQNeighbors`: those a beam search of width ``max(k,
          ef_search)`` returns (its k best), k doubling from ``ef_search``
          until the k-th is beyond ``radius``.

        Candidates are fetched with the k-neighbours search, k doubling
        from 16 (HNSW: ``ef_search``) until the k-th candidate is beyond
        ``radius`` or the query's visitable points are all fetched; each
        doubling repeats the search (a flat index rescans every code).
        Without re-ranking, the distances (and so the radius test) are the
        ADC distances between the query and the decoded points; with
        ``refine_factor > 0`` they are exact (the best k of ``refine_factor
        * k`` ADC candidates, by exact distance), so with an exhaustive
        search (flat, ``n_probe = n_lists``, or ``ef_search`` at least the
        number of points) and enough re-ranking the result is
        :class:`~sklearn.neighbors.NearestNeighbors`'s.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            The query points.  If None, the indexed points (their raw
            vectors when kept, else their reconstructions), each point
            excluded from its own neighbors, as scikit-learn does.
        radius : float, default=None
            Range, in the units of ``metric`` (for ``"dot"``, ``-<q, x> <=
            radius``, which may be negative); the estimator's ``radius``
            if None.
        return_distance : bool, default=True
            Whether to return the distances.
        sort_results : bool, default=False
            Accepted for scikit-learn's API; results are always sorted by
            distance, ties broken by the smaller index.  Requires
            ``return_distance=True``, as in scikit-learn.
        filter : array-like or sparse matrix, default=None
            The ids each query may return, as in :meth:`kneighbors`
            (applied inside the search; the candidates fetched are allowed
            ones only).

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries,), dtype=object
            Array of arrays: the distances of each query's neighbors, in
            the dtype of the fitted data (float32 unless fitted on
            float64); only if ``return_distance``.
        neigh_ind : ndarray of shape (n_queries,), dtype=object
            Array of int64 arrays: the indices of each query's neighbors.
        """
        self._check_fitted()
        with index_lock(self).read():
            return self._radius_neighbors(X, radius, return_distance, sort_results,
                                          filter)

    def _check_radius(self, radius):
        if radius is None:
            radius = self.radius  # validated with the search parameters
        elif isinstance(radius, bool) or not isinstance(radius, Real):
            raise TypeError(f"radius must be a real number, got {radius!r}.")
        radius = float(radius)
        if not np.isfinite(radius):
            raise ValueError(f"radius must be finite, got {radius}.")
        if radius < 0 and self.effective_metric_ != "dot":
            raise ValueError(f"radius must be >= 0 for metric={self.effective_metric_!r}, "
                             f"got {radius}.")
        return radius

    def _radius_neighbors(self, X, radius, return_distance, sort_results, filter=None):
        self._check_params_at_call()
        radius = self._check_radius(radius)
        if sort_results and not return_distance:
            raise ValueError("return_distance must be True if sort_results is True.")
        query_is_train = X is None
        if query_is_train:
            if self.n_removed_:
                raise ValueError(
                    "radius_neighbors(X=None) queries every indexed point, but "
                    f"{self.n_removed_} were removed; pass the query points as X.")
            n_queries = self.n_samples_fit_
            parts = self._self_queries()
        else:
            Q = self._validate_queries(X)
            n_queries = Q.shape[0]
            parts = [(slice(0, n_queries), Q)]
        flt = check_filter(filter, self.n_samples_fit_, n_queries)
        n_threads = max(1, min(effective_n_threads(self.n_jobs), n_queries))
        dist = np.empty(n_queries, dtype=object)
        ind = np.empty(n_queries, dtype=object)
        with openmp_region(n_threads):
            for sl, Q in parts:
                for q, (d, i) in enumerate(zip(*self._radius_search(
                        Q, radius, n_threads, query_is_train, flt, sl.start))):
                    row = sl.start + q
                    if query_is_train:  # the point itself, wherever it is
                        keep = i != row
                        d, i = d[keep], i[keep]
                    dist[row], ind[row] = d, i
        return (dist, ind) if return_distance else ind

    def _radius_caps(self, Q):
        """The most points a search of each row of Q can visit (int64)."""
        return np.full(Q.shape[0], self._n_live, dtype=np.int64)

    def _radius_search(self, Q, radius, n_threads, self_query=False, flt=None, first=0):
        """(distances, ids): two lists of arrays, one pair per row of Q, of
        the candidates within ``radius`` (finished distances), sorted.
        ``flt``: the filter of queries numbered from ``first``."""
        nq = Q.shape[0]
        n_live = self._n_live
        caps = np.minimum(self._radius_caps(Q), n_live)
        removed = self.removed_ if self.n_removed_ else None
        shared = None
        if flt is not None:  # at most the allowed live ids
            if flt.per_query:
                allowed = np.diff(flt.matrix.indptr)[first:first + nq].astype(np.int64)
            else:
                shared = flt.blocked(removed)
                allowed = shared.allowed_counts(nq)
            caps = np.minimum(caps, allowed)
        out_d = [np.empty(0, dtype=self._fit_dtype_) for _ in range(nq)]
        out_i = [np.empty(0, dtype=np.int64) for _ in range(nq)]
        pending = np.flatnonzero(caps > 0)  # all removed / none allowed: nothing
        k = min(n_live, self._radius_first_k + int(self_query))
        while pending.size:
            k = max(1, min(k, int(caps[pending].max())))
            # Chunks bound the (rows, k) results of a round.
            step = max(1, (1 << 22) // k)
            if flt is not None and flt.per_query:
                step = min(step, flt.chunk_rows())
            still = []
            for start in range(0, pending.size, step):
                rows = pending[start:start + step]
                blocked = (shared if flt is None or not flt.per_query
                           else flt.blocked(removed, first + rows))
                kw = {} if blocked is None else {"blocked": blocked}
                d, i = self._search_refined(Q[rows], k, n_threads, **kw)
                d = self._finish_distances(np.array(d, copy=True))
                done = (d[:, -1] > radius) | (k >= caps[rows])
                for r, row in enumerate(rows):
                    if not done[r]:
                        continue
                    keep = (d[r] <= radius) & (i[r] >= 0) & (i[r] < self.n_samples_fit_)
                    out_d[row], out_i[row] = d[r][keep], i[r][keep].astype(np.int64)
                still.append(rows[~done])
            pending = np.concatenate(still)
            k *= 2
        return out_d, out_i

    def radius_neighbors_graph(self, X=None, radius=None, mode="connectivity",
                               sort_results=False, *, filter=None):
        """Compute the (weighted) graph of neighbors within ``radius``.

        Approximate, as :meth:`radius_neighbors`, which it calls.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            The query points; if None, the indexed points (self excluded).
        radius : float, default=None
            Range; the estimator's ``radius`` if None.
        mode : {"connectivity", "distance"}, default="connectivity"
            ``"connectivity"`` stores ones, ``"distance"`` the distances
            under ``metric``.
        sort_results : bool, default=False
            Accepted for scikit-learn's API (rows are always sorted by
            distance); in ``"connectivity"`` mode it is ignored.
        filter : array-like or sparse matrix, default=None
            The ids each query may link to, as in :meth:`kneighbors`.

        Returns
        -------
        A : sparse matrix of shape (n_queries, n_samples_fit), CSR
            ``A[i, j]`` is the edge from query i to indexed point j.
        """
        check_is_fitted(self)
        _check_graph_mode(mode)
        if mode == "connectivity":
            ind = self.radius_neighbors(X, radius, return_distance=False, filter=filter)
            dist = None
        else:
            dist, ind = self.radius_neighbors(X, radius, return_distance=True,
                                              sort_results=sort_results, filter=filter)
        n_queries = ind.shape[0]
        counts = np.fromiter((a.shape[0] for a in ind), dtype=np.int64, count=n_queries)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        indices = (np.concatenate(list(ind)) if n_queries else np.empty(0, np.int64))
        data = (np.ones(indices.shape[0], dtype=np.float64) if dist is None
                else np.concatenate(list(dist)) if n_queries else np.empty(0))
        return sparse.csr_matrix((data, indices, indptr),
                                 shape=(n_queries, self.n_samples_fit_))

    def transform(self, X):
        """Sparse k-neighbors graph of X, as :class:`~sklearn.neighbors.KNeighborsTransformer`.

        In ``mode="distance"`` each row has ``n_neighbors + 1`` entries, so
        that each training point still has ``n_neighbors`` neighbours once
        itself is discounted.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)

        Returns
        -------
        Xt : sparse matrix of shape (n_queries, n_samples_fit), CSR
        """
        check_is_fitted(self)
        self._check_params_at_call()
        add_one = self.mode == "distance"
        return self.kneighbors_graph(
            X, mode=self.mode, n_neighbors=self.n_neighbors + add_one
        )

    def fit_transform(self, X, y=None):
        """Fit to X, then transform X (X itself is the query, not None).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        Xt : sparse matrix of shape (n_samples, n_samples), CSR
        """
        return self.fit(X).transform(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags
