"""The neighbors contract every pqsk search estimator shares.

:class:`BasePQNeighbors` owns input validation, the metrics, ``fit`` /
``partial_fit``, and the ``kneighbors`` / ``kneighbors_graph`` /
``transform`` contract of :class:`sklearn.neighbors.KNeighborsTransformer`
(``radius_neighbors`` from :class:`pqsk._radius.RadiusNeighborsMixin`),
and the shard protocol :mod:`pqsk.dask` builds on.  Estimators implement
``_start_empty``, ``_add_rows``, ``_search``, ``_reconstruct`` and
``_memory_parts``, and mix in the quantizer training of
:mod:`pqsk._training`.  ``remove`` and the segment write policy of the
indexes whose ids are stable are :class:`pqsk._segments.SegmentWritesMixin`.
"""

from numbers import Integral, Real

import numpy as np
from scipy import sparse
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
    clone,
)
from sklearn.preprocessing import normalize
from sklearn.utils._param_validation import (
    Interval,
    StrOptions,
    validate_parameter_constraints,
)
from sklearn.utils.validation import check_is_fitted

from . import _growable, _header, _opq, _quantizer, _reorder
from ._checks import (
    METRIC_ALIASES,
    METRICS,
    check_enough_points,
    check_graph_mode,
    check_int_array,
    check_n_neighbors,
    check_neighbors_state,
    check_self_query,
    checked_queries,
    checked_rows,
    query_parts,
    resolve_metric,
)
from ._filter import check_filter
from ._segments import drop_self
from ._radius import RadiusNeighborsMixin
from ._runtime import index_lock, index_writer, runtime, yield_to_queries
from ._store import (FitRows, RowStore, chunk_slices, decoded_chunks, rows_per_chunk,
                     unit_rows)
from ._training import RefineMixin
from ._utils import (
    Progress,
    effective_n_threads,
    openmp_region,
    release_memory,
    restore_on_error,
)

class BasePQNeighbors(RefineMixin, RadiusNeighborsMixin, ClassNamePrefixFeaturesOutMixin,
                      TransformerMixin, BaseEstimator):
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
    With ``refine_dtype`` "float16" or "int8" the raw vectors are not
    kept: a compact tier of the prepared rows (``refine_rows_``, see
    :class:`pqsk._reorder.RefineTier`) is, decoded at re-rank time.

    Thread safety: ``kneighbors`` (and what calls it) may run from many
    threads at once, each releasing the GIL in the kernels.  ``fit``,
    ``partial_fit``, ``remove`` and ``compact`` take the index's exclusive
    lock: queries see the index before or after, never half-modified.
    IVF and HNSW build appends, merges and compactions beside the index
    and take it only to publish them (``pqsk._merges``).

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

    The shard protocol: the ``_shard_*`` methods (one section below) are
    what a meta-estimator holding one index per shard (:mod:`pqsk.dask`)
    may call; doc/user_guide/dask.rst ("The shard protocol") describes
    them together, with shapes and dtypes.
    """

    _neighbors_parameter_constraints = {
        "n_neighbors": [Interval(Integral, 1, None, closed="left")],
        "metric": [StrOptions(set(METRICS) | set(METRIC_ALIASES))],
        "p": [Interval(Real, 0, None, closed="right"), None],
        "metric_params": [dict, None],
        "mode": [StrOptions({"distance", "connectivity"})],
        "refine_factor": [Interval(Integral, 0, None, closed="left")],
        "refine_dtype": [StrOptions(set(_reorder.REFINE_DTYPES))],
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
        """Train the quantizers on validated, metric-prepared X (a
        :class:`~pqsk._store.FitRows`) and index it."""
        self._train_quantizers(X, progress)
        self._start_empty()
        self._add_rows(X, effective_n_threads(self.n_jobs), progress)

    def _start_empty(self):
        """Set up the row state of an index holding no rows, its quantizers
        trained (``_fit_index`` after training; ``_shard_from_quantizers``)."""
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

    def _after_append(self):
        """Run by ``partial_fit`` once the rows are published (writer mutex
        held, not the RWLock); see ``SegmentWritesMixin``."""

    def _before_append(self):
        """Run by ``partial_fit`` before the writer mutex (``_merges``)."""

    def _append_rows(self, rows, progress, n_threads):
        """``partial_fit``'s ``_add_rows`` (writer mutex held): under the
        write lock, the state restored on error.  Indexes that build an
        append beside themselves override it (see ``pqsk._merges``)."""
        with index_lock(self).write(), restore_on_error(self):
            self._add_rows(rows, n_threads, progress)

    def _decode_parts(self):
        """[(ids, decode(positions) -> rows)]: where each indexed point's
        code lives (see :func:`pqsk._store.decoded_chunks`)."""
        raise NotImplementedError

    def _reconstruct(self):
        """Decoded vectors of every indexed point, in id order."""
        n, d = self.n_samples_fit_, self.n_features_in_
        return next(decoded_chunks(self._decode_parts(), n, d, self._fit_dtype_, max(n, 1)),
                    (None, np.zeros((0, d), self._fit_dtype_)))[1]

    def _fitted_values(self):
        """{parameter: the value the fitted index was built with} for the
        parameters that define the fitted state (compared with the
        parameters by ``PQParamsMixin._structural_mismatch``).  Subclasses
        add theirs."""
        return {"metric": self.effective_metric_, **self._pq_fitted_values(),
                "refine_dtype": self._refine_dtype}

    @property
    def _refine_dtype(self):
        """The fitted ``refine_dtype`` ("float32" for files saved before it)."""
        return self.__dict__.get("refine_dtype_", "float32")

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
        if runtime(self).checked_params == key:
            return
        validate_parameter_constraints(
            {n: self._parameter_constraints[n] for n in names},
            {n: getattr(self, n) for n in names},
            caller_name=type(self).__name__,
        )
        mismatch = self._structural_mismatch()
        if mismatch is not None:
            name, value, fitted = mismatch
            raise ValueError(
                f"{name}={value!r} was set after fit, but this index was built "
                f"with {name}={fitted!r}; call fit to rebuild it with the new "
                f"value (partial_fit cannot change it"
                + ("; set_refine(X) rebuilds the re-ranking rows alone"
                   if name == "refine_dtype" else "") + f"), or set {name} back."
            )
        runtime(self).checked_params = key

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
        if self.effective_metric_ != "cosine":
            return X
        # Float rows (validated queries, stored rows): scaled as normalize
        # scales them, without its parameter validation (a third of a
        # one-row query's time).
        if isinstance(X, np.ndarray) and X.dtype in (np.float32, np.float64):
            return unit_rows(X)
        return normalize(X, copy=True)

    def _check_fitted(self):
        # check_is_fitted scans every attribute; this is on every query.
        if not hasattr(self, "n_samples_fit_"):
            check_is_fitted(self)

    def _validate_queries(self, X):
        """The queries X validated (see :func:`pqsk._checks.checked_queries`)
        and prepared for the metric."""
        self._check_fitted()
        return self._prepare(checked_queries(self, X))

    def _query_parts(self, X):
        """(n_queries, parts): see :func:`pqsk._checks.query_parts`."""
        return query_parts(self, X)

    def _validate_rows(self, X, reset):
        """Validate ``fit`` (``reset=True``) or ``partial_fit`` input without
        copying it (see :func:`pqsk._checks.checked_rows`): a
        :class:`~pqsk._store.FitRows` that hands out its rows chunk by
        chunk, in the fitted dtype, normalised for cosine."""
        X, dtype = checked_rows(self, X, reset)
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
            Vectors to index (float16, float32, float64 or integers; float16
            computed in float32, converted a chunk at a time); row i gets id i.
        y : ignored

        Returns
        -------
        self : object
            The fitted estimator.
        """
        # A failed fit leaves a fitted index as it was (restore_on_error).
        with index_writer(self), index_lock(self).write(), restore_on_error(self):
            metric = resolve_metric(self.metric, self.p, self.metric_params, warn=True)[0]
            rows, progress = self._begin_fit(X, metric)
            self._fit_index(rows, progress)
        runtime(self).checked_params = None
        runtime(self).rerank_slack = None
        release_memory()
        return self

    def _begin_fit(self, X, metric):
        """What ``fit`` does before training, ``metric`` being the effective
        metric: check it, validate X, reset the row state, learn the OPQ
        rotation.  Returns (the rows, a :class:`~pqsk._store.FitRows`, and
        the progress reporter)."""
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
        # What re-ranking reads is kept, for good, when fitted with it: the
        # raw vectors, or a compact tier trained here (rows not rotated yet).
        self.refine_dtype_ = self.refine_dtype
        self.__dict__.update(self._empty_refine(rows, self.refine_factor > 0))
        # OPQ: every row is encoded, and every query searched, as x @ R.
        self.rotation_ = rows.rotation = self._fit_rotation(rows, progress)
        return rows, progress

    def partial_fit(self, X, y=None):
        """Add rows to the index without retraining the quantizers.

        New rows get ids ``n_samples_fit_``, ``n_samples_fit_ + 1``, ...
        An unfitted estimator is fitted on X instead.  On error the index
        is left unchanged.  X is read chunk by chunk, as in ``fit``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            float16 rows are converted to the fitted dtype a chunk at a time.
        y : ignored

        Returns
        -------
        self : object
            The estimator, with X indexed.
        """
        if not hasattr(self, "n_samples_fit_"):
            return self.fit(X)
        self._check_params_at_call()
        self._before_append()
        n_threads = effective_n_threads(self.n_jobs)
        with index_writer(self), openmp_region(n_threads, beside_queries=True):
            rows = self._validate_rows(X, reset=False)
            yield_to_queries()  # between the steps of a write (see pqsk._runtime)
            if self._tier is not None:
                self._tier.check(rows)  # before any piece of an append is added
            self._append_rows(rows, Progress(self.verbose, type(self).__name__), n_threads)
            yield_to_queries()
            self._after_append()
            _reorder.refresh_slack(self, n_threads)
        if rows.shape[0] > rows.chunk_rows():
            release_memory()  # after a chunked pass; not after every small batch
        return self

    # -- the shard protocol (doc/user_guide/dask.rst, "The shard protocol") --
    # What pqsk.dask calls: shards built from one set of trained quantizers
    # compare their raw distances and ids, so their answers merge.

    # Fitted attributes that make up the trained quantizers (subclasses add
    # theirs); every other fitted attribute describes indexed rows.
    _trained_attrs = ("_fit_dtype_", "effective_metric_", "n_features_in_",
                      "feature_names_in_", "codebooks_", "rotation_",
                      "anisotropic_threshold_", "n_iter_", "refine_dtype_",
                      "refine_offset_", "refine_scale_")

    def _shard_rows(self, X):
        """X (returned as given) validated as the next ``fit`` (unfitted)
        or ``partial_fit`` (fitted) validates it."""
        return self._validate_rows(X, reset=not hasattr(self, "n_samples_fit_")).raw

    def _shard_params(self, n_rows):
        """{parameter: value} fixing what a fit of ``n_rows`` rows resolves
        from the data."""
        return {}

    def _shard_sample_size(self, n_rows):
        """How many rows a fit of ``n_rows`` rows trains on."""
        cap = self._max_train_samples()
        return n_rows if cap is None else min(n_rows, int(cap))

    def _shard_train(self, sample, n_rows, n_jobs=None):
        """The quantizers (as ``_shard_quantizers``) a fit of ``n_rows``
        rows trains on its training sample ``sample``, trained with
        ``n_jobs`` threads without indexing a row; self is not changed."""
        trainer = clone(self).set_params(n_jobs=-1 if n_jobs is None else n_jobs)
        trainer._validate_params()
        rows, progress = trainer._begin_fit(sample, trainer._param_metric())
        trainer._train_quantizers(rows, progress, drawn_from=n_rows)
        return trainer._shard_quantizers()

    def _shard_quantizers(self):
        """{attribute: value} of the trained quantizers (arrays by
        reference, read only)."""
        check_is_fitted(self)
        return {a: self.__dict__[a] for a in self._trained_attrs if a in self.__dict__}

    def _shard_from_quantizers(self, quantizers, X=None):
        """``fit(X)`` with ``quantizers`` (another index's
        ``_shard_quantizers()``): X (None: no row) validated as by
        ``partial_fit``, ids 0, 1, ...; the structural parameters must be
        those the quantizers were trained with.  Returns self."""
        with index_writer(self), index_lock(self).write(), restore_on_error(self):
            self.__dict__.update(quantizers)
            rows = None if X is None else self._validate_rows(X, reset=False)
            self.n_samples_fit_ = self._n_features_out = 0
            self.n_removed_ = 0
            self.removed_ = None
            self.__dict__.update(self._empty_refine(None, self.refine_factor > 0))
            self._start_empty()
            runtime(self).checked_params = None
            runtime(self).rerank_slack = None
            self._check_params_at_call()
            if rows is not None and rows.shape[0]:
                n_threads = effective_n_threads(self.n_jobs)
                with openmp_region(n_threads):
                    self._add_rows(rows, n_threads,
                                   Progress(self.verbose, type(self).__name__))
        runtime(self).checked_params = None
        runtime(self).rerank_slack = None
        return self

    def _shard_with_params(self, **params):
        """A shallow copy sharing every fitted array, with ``params``
        (search parameters) set: for queries only."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        return view.set_params(**params)

    def _shard_search_params(self):
        """The search parameters, validated as a query validates them."""
        self._check_params_at_call()
        return {name: getattr(self, name) for name in self._search_params}

    def _shard_prepare_queries(self, X):
        """X validated and prepared as ``kneighbors`` prepares queries."""
        return self._validate_queries(X)

    def _shard_self_queries(self):
        """The prepared queries standing for the indexed points, in id order."""
        return np.concatenate([q for _, q in self._self_queries()])

    def _shard_search(self, Q, n_neighbors, filter=None):
        """(raw distances, local int64 ids) of the ``n_neighbors`` best of
        the prepared queries Q, rows sorted by (distance, id); ``filter``:
        the local ids each query may return, in a form ``kneighbors`` takes
        (empty slots: +inf and an id outside [0, n_samples_fit_))."""
        self._check_params_at_call()
        flt = check_filter(filter, self.n_samples_fit_, Q.shape[0])
        n_threads = max(1, min(effective_n_threads(self.n_jobs), Q.shape[0]))
        with openmp_region(n_threads):
            return self._search_filtered(Q, n_neighbors, n_threads, flt, 0)

    def _shard_finish(self, dist):
        """The distances ``kneighbors`` returns, from raw ones (a copy)."""
        return self._finish_distances(np.array(dist, copy=True))

    def _shard_dtype(self):
        """The dtype of the distances."""
        return self._fit_dtype_

    def _check_loaded_state(self):
        """Invariants the kernels rely on, checked after ``load``.

        Everything is checked against the fitted attributes (m and k from
        ``codebooks_``...), never against the parameters, which
        ``set_params`` may have changed before the save.  Subclasses add
        their own arrays and the range of their floats.
        """
        calibration = self.__dict__.pop(_header.CALIBRATION, None)
        m, k = check_neighbors_state(self, _quantizer.MAX_CODEWORDS)
        self.rotation_ = self._rotation  # missing (saved before OPQ): None
        if self.rotation_ is not None:
            _opq.check_rotation(self.rotation_, self.n_features_in_, self._fit_dtype_)
        self._check_codes(m, k)
        if calibration is not None:
            _reorder.restore_slack(self, calibration)

    def _check_codes(self, m, k):
        check_int_array(self.codes_, "codes_", (None, m), 0, k,
                        dtype=_quantizer.code_dtype(k))

    def _memory_parts(self):
        """({part: bytes} growing with the vectors, {part: bytes} fixed)."""
        raise NotImplementedError

    @property
    def memory_usage_(self):
        """Bytes held by the fitted index, by part (dict of ints).

        Each array the index holds, plus ``"vectors"`` (raw vectors kept
        in memory for ``refine_factor > 0``, else 0), ``"refine_rows"``
        (the compact re-ranking tier of ``refine_dtype`` "float16" or
        "int8": its rows, offset and scale; else 0), ``"reserved"``
        (capacity held by arrays that grow in place, beyond their used
        rows: at most about as much again as those arrays), ``"total"``
        (everything in memory), ``"vectors_mapped"`` (raw vectors read
        from a memory-mapped file: a memmap the index was fitted on, or a
        saved index loaded with ``mmap_mode``; not in ``"total"``), and
        ``"per_vector"``: the bytes per indexed vector of the parts that
        grow with the data (codes, ids, graph links), raw vectors not
        included, so that it compares across estimators (with spilling,
        both entries of each vector: see ``IVFPQNeighbors.spill_lambda``).
        """
        check_is_fitted(self)
        growing, fixed = self._memory_parts()
        store, tier = self.vectors_, self._tier
        parts = {**growing, **fixed,
                 "vectors": 0 if store is None else store.memory_nbytes,
                 "refine_rows": 0 if tier is None else tier.nbytes,
                 "reserved": self._reserved_bytes()}
        parts["total"] = sum(parts.values())
        parts["vectors_mapped"] = 0 if store is None else store.mapped_nbytes
        parts["per_vector"] = sum(growing.values()) / max(1, self._n_stored() / self._copies())
        return parts

    def _n_stored(self):
        """Entries the index stores (removed ones not yet dropped included)."""
        return self.codes_.shape[0]

    def _copies(self):
        """Entries per stored vector (2 for a spilled IVF index)."""
        return 1

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

    @property
    def _tier(self):
        """The compact re-ranking tier (:class:`pqsk._reorder.RefineTier`), or None."""
        return _reorder.RefineTier.of(self)

    def _empty_refine(self, rows, keep=True):
        """{attribute: value} of what re-ranking reads, holding no row:
        ``vectors_`` (an empty row store for ``refine_dtype_="float32"``),
        and the compact tier's attributes (for "float16" / "int8": trained
        on ``rows``, a :class:`~pqsk._store.FitRows` prepared and not
        rotated; ``rows=None``: the fitted ``refine_offset_`` /
        ``refine_scale_`` are kept).  Nothing is kept when not ``keep`` (or
        for an int8 tier that has neither rows nor a fitted offset)."""
        kind = self.refine_dtype_
        keep = keep and (rows is not None or kind != "int8"
                         or self.__dict__.get("refine_offset_") is not None)
        state = {"vectors_": None, **_reorder.RefineTier.no_tier()}
        if not keep:
            return state
        if kind == "float32":
            state["vectors_"] = RowStore.empty(self.n_features_in_ if rows is None
                                               else rows.shape[1], self._fit_dtype_)
        elif rows is not None:
            state.update(_reorder.RefineTier.train(kind, rows).attributes())
        else:
            state.update(_reorder.RefineTier.empty(
                kind, self.n_features_in_, self.refine_offset_, self.refine_scale_
            ).attributes())
        return state

    def _grown_refine(self, X):
        """{attribute: value} of what re-ranking reads, with the rows of X
        (a :class:`~pqsk._store.FitRows`) appended: the raw vectors when
        the index keeps them, the compact tier's rows when it has one (a
        new row store sharing the old one's chunks, O(batch)); {} when it
        keeps neither (fitted with ``refine_factor=0``)."""
        tier = self._tier
        if tier is not None:
            return {"refine_rows_": tier.appended(X).rows}
        if self.vectors_ is None:
            return {}
        return {"vectors_": self.vectors_.appended(X)}

    @property
    def _n_live(self):
        return self.n_samples_fit_ - self.n_removed_

    def _n_candidates(self, n_neighbors):
        """How many ADC candidates to fetch: ``refine_factor * n_neighbors``
        (at most the live vectors) when re-ranking, else ``n_neighbors``."""
        if self.refine_factor == 0:
            return n_neighbors
        if self.vectors_ is None and self._tier is None:
            raise ValueError(
                f"refine_factor={self.refine_factor} needs the raw vectors or a re-ranking "
                "tier, which are kept only when the index is fitted with refine_factor > 0; "
                "refit the index, add a tier with set_refine(X), or set refine_factor=0."
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
            return _reorder.rerank_candidates(self, Q, dist, ind, n_neighbors, n_threads)
        return dist.astype(self._fit_dtype_, copy=False), ind

    def _self_queries(self):
        """(slice, query vectors) pairs standing for the indexed points (for
        X=None), in id order: the raw vectors when kept (normalised for
        cosine), a chunk at a time, so that a memory-mapped store is never
        read whole into memory; else the reconstructions, a chunk of ids at
        a time too, rotated back to the input space (``x_hat @ rotation_.T``)
        as ``_search_refined`` rotates them."""
        n = self.n_samples_fit_
        tier = self._tier
        step = rows_per_chunk(self.n_features_in_ * np.dtype(self._fit_dtype_).itemsize)
        if self.vectors_ is not None or tier is not None:
            for sl in chunk_slices(n, step):
                rows = (self.vectors_[sl] if tier is None else
                        tier.take(np.arange(sl.start, sl.stop), self._fit_dtype_))
                yield sl, self._prepare(rows)
            return
        R = self._rotation
        for sl, X_hat in decoded_chunks(self._decode_parts(), n, self.n_features_in_,
                                        self._fit_dtype_, step):
            yield sl, X_hat if R is None else np.ascontiguousarray(X_hat @ R.T)

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
            The query points (float16 ones converted to the fitted dtype a
            chunk at a time). If None, the neighbors of each indexed point
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
            query i may return (negative entries raise ValueError).  A
            mask is boolean: an integer array of n_samples_fit entries
            all 0 or 1 could be a mask or ids and raises ValueError (pass
            ``filter.astype(bool)`` for a mask; ids without repeats, or
            ``np.flatnonzero(mask)``); an integer array of another
            length or with other values is ids.  Applied inside the
            search, not to its results: each query gets ``n_neighbors``
            allowed ids whenever that many are allowed (and not removed).
            When fewer are, the row ends with id -1 at distance +inf.
            With ``X=None`` each point is still excluded from its own row.

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
        n_neighbors = check_n_neighbors(n_neighbors)
        query_is_train = X is None
        if query_is_train:
            check_self_query(self.n_removed_, "kneighbors")
            n_queries, parts = self.n_samples_fit_, self._self_queries()
        else:
            n_queries, parts = self._query_parts(X)
        flt = check_filter(filter, self.n_samples_fit_, n_queries)
        check_enough_points(n_neighbors, self._n_live, n_queries, query_is_train)
        if query_is_train:
            n_neighbors += 1  # each point finds itself, dropped below
        # One thread per query at most: a parallel region for a handful of
        # queries costs more than it saves, badly so on a busy machine.
        n_threads = max(1, min(effective_n_threads(self.n_jobs), n_queries))
        with openmp_region(n_threads):
            dist = ind = None
            for sl, Q in parts:
                d, i = self._search_filtered(Q, n_neighbors, n_threads, flt, sl.start)
                if sl.stop - sl.start == n_queries:  # one part: no copy
                    dist, ind = d, i
                    continue
                if dist is None:
                    dist = np.empty((n_queries, n_neighbors), dtype=d.dtype)
                    ind = np.empty((n_queries, n_neighbors), dtype=i.dtype)
                dist[sl], ind[sl] = d, i
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
            dist, ind = drop_self(dist, ind, flt)
        if return_distance:
            return self._finish_distances(dist), ind
        return ind

    def kneighbors_graph(self, X=None, n_neighbors=None, mode="connectivity", *,
                         filter=None):
        """Compute the (weighted) graph of k-neighbors for points in X.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), default=None
            The query points (float16: as in :meth:`kneighbors`); if None,
            the indexed points (self excluded).
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
        check_graph_mode(mode)
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

    def transform(self, X):
        """Sparse k-neighbors graph of X, as :class:`~sklearn.neighbors.KNeighborsTransformer`.

        In ``mode="distance"`` each row has ``n_neighbors + 1`` entries, so
        that each training point still has ``n_neighbors`` neighbours once
        itself is discounted.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
            float16 queries are converted a chunk at a time.

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
