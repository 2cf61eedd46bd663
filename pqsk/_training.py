"""Quantizer training for the estimators: parameters, rotation, codebooks, refit.

* :class:`PQParamsMixin` holds the product-quantization parameters (their
  constraints, "auto" resolved from the data), learns the OPQ rotation
  (:mod:`pqsk._opq`) and trains the codebooks (k-means per sub-space,
  :mod:`pqsk._quantizer`, refined for the anisotropic loss by
  :mod:`pqsk._anisotropic`), or checks the codebooks a user supplies.
* :class:`RefitMixin` gives the indexes ``refit_codebooks``: new codebooks
  trained on a fresh sample, every stored vector re-encoded from its raw
  vector.
* :class:`RefineMixin` gives every search estimator ``set_refine``: the
  re-ranking rows (raw vectors or a compact tier, :mod:`pqsk._reorder`)
  rebuilt from the indexed rows, the codes untouched.

The estimators (:mod:`pqsk._pq`, :mod:`pqsk._ivfpq`, :mod:`pqsk._hnswpq`)
mix these in beside :class:`pqsk._base.BasePQNeighbors`, whose ``fit``
calls ``_fit_rotation`` and (through ``_train_quantizers``)
``_fit_codebooks``.
"""

from numbers import Integral, Real

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import _growable, _opq, _quantizer, _reorder, _scorers
from ._anisotropic import train_anisotropic
from ._checks import check_range
from ._runtime import index_lock, index_writer, runtime
from ._store import FitRows, RowStore, chunk_slices
from ._utils import Progress, effective_n_threads, openmp_region, release_memory


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

    def _pq_fitted_values(self):
        """{parameter: the value the fitted quantizer was built with} for
        its structural parameters: ``n_subspaces`` and ``n_codewords``
        (unless "auto", resolved at fit), ``rotation`` and
        ``anisotropic_threshold``.  The estimators' ``_fitted_values``
        adds their own (metric, n_lists, n_links)."""
        m, k = self.codebooks_.shape[:2]
        fitted = {"n_subspaces": m, "n_codewords": k}
        return {**{p: v for p, v in fitted.items() if not isinstance(getattr(self, p), str)},
                "rotation": None if self.__dict__.get("rotation_") is None else "opq",
                "anisotropic_threshold": self.__dict__.get("anisotropic_threshold_")}

    def _structural_mismatch(self):
        """(name, value, fitted value) of the first structural parameter
        whose value contradicts the fitted state (``_fitted_values``),
        or None when they all agree.  The one comparison behind every
        check of it: a query or an append after ``set_params``
        (``_check_params_at_call``), ``save`` (which refuses to write such
        a state) and ``load`` (a header contradicting its arrays).  The
        metric is compared by what it means (aliases resolved)."""
        for name, fitted in self._fitted_values().items():
            value = self._param_metric() if name == "metric" else getattr(self, name)
            if value != fitted:
                return name, value, fitted
        return None

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

    def _train_quantizers(self, X, progress, drawn_from=None):
        """Set the trained quantizers (the ``_trained_attrs`` a fit sets
        after ``_begin_fit``: here the codebooks) from X, the prepared rows
        (a :class:`~pqsk._store.FitRows`).  Estimators with more
        quantizers (IVF's coarse centroids) override it.

        ``drawn_from``: None, or X is the training sample a fit of
        ``drawn_from`` rows draws (the shard protocol's ``_shard_train``);
        an estimator whose fit draws its sample from the random stream
        repeats that draw, so that the stream continues as in that fit.
        """
        self.codebooks_ = self._fit_codebooks(X, progress)

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
            with index_lock(self).read(), openmp_region(n_threads, beside_queries=True):
                state, replaced = self._refit(X_sample, X, n_threads, progress)
            with index_lock(self).write():
                for name in replaced:
                    _growable.discard(self, name)
                self.__dict__.update(state)
                runtime(self).rerank_slack = None   # new codes, new errors
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


class RefineMixin:
    """``set_refine``: give a fitted index the re-ranking rows of its
    ``refine_dtype`` (raw vectors, or a compact tier) without refitting."""

    def set_refine(self, X):
        """(Re)build what re-ranking reads, from the indexed rows X, with the
        estimator's ``refine_dtype``; the codes, ids and graph stay as they are.

        ``refine_dtype="float32"`` keeps X's rows as ``vectors_`` (a
        C-contiguous memmap of the fitted dtype by reference, else copied);
        ``"float16"`` / ``"int8"`` build a compact tier from X's prepared
        rows (normalised for cosine), an int8 tier's offset and scale
        learned on X, and drop ``vectors_``.  So an index fitted with
        ``refine_factor=0``, or with another ``refine_dtype``, gets a tier;
        set ``refine_factor > 0`` to use it.  X is read chunk by chunk
        (twice for int8), validated as ``partial_fit`` validates rows.  On
        error the index is unchanged; queries go on meanwhile, and the
        switch takes the write lock only to swap the attributes.

        Parameters
        ----------
        X : array-like of shape (``n_samples_fit_``, n_features)
            Every indexed row in id order (removed ids' rows included), e.g.
            the memmap the index was built from, grown by the appends.

        Returns
        -------
        self : object
        """
        check_is_fitted(self)
        self._validate_params()
        with index_writer(self):
            with index_lock(self).read():
                rows = self._validate_rows(X, reset=False)
                if rows.shape[0] != self.n_samples_fit_:
                    raise ValueError(
                        f"X must hold the {self.n_samples_fit_} indexed rows in id order, "
                        f"got {rows.shape[0]} rows.")
                kind = self.refine_dtype
                state = {"refine_dtype_": kind, "vectors_": None,
                         **_reorder.RefineTier.no_tier()}
                if kind == "float32":
                    state["vectors_"] = RowStore.empty(rows.shape[1], rows.dtype).appended(rows)
                else:
                    rows = FitRows(rows.raw, rows.dtype, rows.unit_norm)  # not rotated
                    tier = _reorder.RefineTier.train(kind, rows).appended(rows)
                    state.update(tier.attributes())
            with index_lock(self).write():
                self.__dict__.update(state)
                runtime(self).checked_params = None
                runtime(self).rerank_slack = None
        release_memory()
        return self
