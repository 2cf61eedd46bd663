"""Product quantization: the PQTransformer and exhaustive ADC search."""


import numpy as np
from sklearn.base import (
    BaseEstimator,
    ClassNamePrefixFeaturesOutMixin,
    TransformerMixin,
    _fit_context,
)
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from . import _growable, _opq, _quantizer, _scorers
from ._base import BasePQNeighbors
from ._checks import (FLOAT_DTYPES, check_anisotropic_state, check_codebooks,
                      check_float_array, check_int_array, check_range, check_scalar_int,
                      checked_float16_chunks, checked_rows, is_float16_rows, require)
from ._persist import IndexIOMixin
from ._store import FitRows
from ._training import PQParamsMixin
from ._utils import Progress, effective_n_threads, range_bound


class PQTransformer(IndexIOMixin, PQParamsMixin, ClassNamePrefixFeaturesOutMixin,
                    TransformerMixin, BaseEstimator):
    """Product quantizer: compress vectors to short codes of codeword indices.

    The ``n_features`` columns are split into ``n_subspaces`` (m) contiguous
    blocks of nearly equal widths (``n_features / m`` when m divides it;
    otherwise the first ``n_features % m`` blocks are one column wider, as
    in ScaNN); each block gets its own
    codebook of ``n_codewords`` (k) codewords learned with
    :class:`~sklearn.cluster.KMeans`.  A vector is stored as the m indices
    of its nearest codewords, ``m`` bytes for k <= 256 (Jégou, Douze and
    Schmid, "Product quantization for nearest neighbor search", IEEE TPAMI
    2011).

    Parameters
    ----------
    n_subspaces : int or "auto", default="auto"
        Number of sub-spaces m, from 1 to ``n_features``: the code length,
        m bytes per vector for k <= 256 (two per byte for k = 16 in the
        search estimators).  ``"auto"``: ``ceil(n_features / 2)`` (2
        features per sub-space), or ``n_features`` when k <= 16, so
        ``ceil(n_features / 2)`` bytes per vector by default (25 for a
        50-d vector of 200 float32 bytes); the measurements behind it are in
        ``benchmarks/results/defaults.md``.  Fewer sub-spaces make smaller
        codes and faster scans at a lower recall.
    n_codewords : int or "auto", default="auto"
        Codewords per sub-space k, at most 65536 and at most the number of
        training samples.  Codes are uint8 for k <= 256, else uint16.
        ``"auto"``: 256, or half the training rows when there are fewer
        than 512 (so that each k-means still has two rows per codeword).
    init : {"random", "k-means++"}, default="random"
        KMeans initialisation.  ``"random"`` (as faiss does) trains about
        three times faster than ``"k-means++"`` for a near-identical
        distortion once ``max_iter`` iterations have run.
    max_iter : int, default=25
        Maximum Lloyd iterations per sub-space, in all.  When the training
        sample has more than ``128 * n_codewords`` rows, KMeans runs in two
        stages: ``max_iter - ceil(max_iter / 4)`` iterations on
        ``64 * n_codewords`` of its rows drawn at random, then
        ``ceil(max_iter / 4)`` on all of them, started from those centres
        (by default 18 + 7: about half the time of 25 full iterations, for
        a reconstruction error ~0.5% higher).  Otherwise one KMeans of
        ``max_iter`` iterations.
    n_init : int, default=1
        KMeans restarts per sub-space (in the first stage).
    tol : float, default=1e-4
        KMeans convergence tolerance (relative to the data variance).
    max_train_samples : int, "auto" or None, default="auto"
        Train on at most this many rows, drawn at random; ``"auto"`` means
        ``256 * n_codewords`` (more rows barely improve the codebooks, and
        faiss samples the same way), ``None`` uses every row.  At most
        ``128 * n_codewords`` rows are clustered in one stage (see
        ``max_iter``).
    codebooks : array-like of shape (n_subspaces, n_codewords, ds), default=None
        Use these codebooks instead of training; ``fit`` then only records
        the input's shape.  ``ds = ceil(n_features / n_subspaces)``;
        ``codebooks[j, c, :w]`` is codeword c of sub-space j of width w,
        entries past w are ignored (set to 0).  With "auto" parameters m
        and k are the codebooks'.
    rotation : {"opq"} or None, default=None
        ``"opq"`` learns an orthogonal D x D rotation R together with the
        codebooks (non-parametric OPQ: Ge et al., "Optimized Product
        Quantization", CVPR 2013), alternating encoding, the Procrustes
        solution for R (an SVD) and Lloyd updates of the codebooks on the
        training sample; every row is then encoded, and every query
        searched, as ``x @ R`` (after cosine normalisation).  L2 distances
        and inner products are unchanged by R, so the same code size gives
        a lower quantization error on data whose variance is unevenly
        spread over the sub-spaces.  R is learned on at most
        ``64 * n_codewords`` rows of the training sample, 50 alternations
        (about 4.5 times plain PQ's training time on GloVe-50; see
        ``pqsk._opq``); not with ``codebooks``.
    n_jobs : int, default=None
        Threads for training (sub-spaces in parallel, each KMeans on one
        thread, so the codebooks do not depend on ``n_jobs``) and encoding.
        None uses every thread OpenMP allows (threadpoolctl limits apply);
        -1 all CPUs.
    anisotropic_threshold : float > 0 or None, default=None
        None trains codebooks for the squared reconstruction error (k-means)
        and encodes each sub-vector by its nearest codeword.  A float T
        uses the score-aware (anisotropic) loss of Guo et al., "Accelerating
        Large-Scale Inference with Anisotropic Vector Quantization", ICML
        2020: the error parallel to a row x is weighted ``eta = (d - 1) s /
        (1 - s)`` times the orthogonal error, ``s = (T / ||x||)^2`` (``T /
        ||x||`` clipped to 0.99).  The k-means codebooks are refined by
        alternating score-aware assignment (coordinate descent over the
        sub-spaces) and the closed-form codebook update, and ``transform``
        encodes with the same assignment.  The transformer has no metric:
        the loss applies to the rows as given (their norms set eta; T is on
        the scale of ``<q, x>``, 0.2 the ScaNN default for unit-norm data).
        Codes then fit inner products better and squared distances worse.
    random_state : int, RandomState instance or None, default=None
        Seeds the training sample and the KMeans initialisations.
    verbose : int, default=0
        Progress messages on stderr: 1 for stages, 2 per sub-space.

    Attributes
    ----------
    codebooks_ : ndarray of shape (n_subspaces, n_codewords, ds)
        ``codebooks_[j, c]`` is codeword c of sub-space j (float32, or
        float64 when fitted on float64), ``ds = ceil(n_features / m)``;
        zero past the width of a narrower sub-space.  Its shape gives the
        m and k that "auto" chose.
    code_dtype_ : numpy.dtype
        uint8 or uint16.
    rotation_ : ndarray of shape (n_features, n_features) or None
        The OPQ rotation R (``rotation="opq"``), in the codebooks' dtype;
        the codebooks quantize ``x @ R``.
    n_iter_ : int
        The most KMeans iterations run in any sub-space (0 when
        ``codebooks`` was supplied).
    anisotropic_threshold_ : float or None
        The anisotropic threshold the codebooks were trained with and that
        ``transform`` encodes with (``anisotropic_threshold`` at fit).
    n_features_in_ : int
        Number of features seen during fit.
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Names of features seen during fit, when X has string column names.

    See Also
    --------
    PQNeighbors : exhaustive nearest-neighbour search over PQ codes.
    sklearn.cluster.KMeans : the clustering behind each codebook.

    Examples
    --------
    The worked example of the seed notes: five 4-d vectors, m=2, k=2, and
    the first two training sub-vectors as codewords.

    >>> import numpy as np
    >>> from pqsk import PQTransformer
    >>> X = np.array([[1, 2, 3, 4], [1, 3, 3, 5], [2, 2, 4, 4],
    ...               [8, 9, 0, 1], [9, 8, 1, 0]], dtype=np.float32)
    >>> codebooks = np.stack([X[:2, :2], X[:2, 2:]])
    >>> pq = PQTransformer(n_subspaces=2, n_codewords=2, codebooks=codebooks).fit(X)
    >>> pq.transform(X)
    array([[0, 0],
           [1, 1],
           [0, 0],
           [1, 0],
           [1, 0]], dtype=uint8)
    >>> pq.distance_tables([[1, 3, 4, 4]])
    array([[[1., 0.],
            [1., 2.]]], dtype=float32)
    """

    _parameter_constraints = dict(PQParamsMixin._pq_parameter_constraints)

    def __init__(
        self,
        n_subspaces="auto",
        n_codewords="auto",
        *,
        init="random",
        max_iter=25,
        n_init=1,
        tol=1e-4,
        max_train_samples="auto",
        codebooks=None,
        rotation=None,
        anisotropic_threshold=None,
        n_jobs=None,
        random_state=None,
        verbose=0,
    ):
        self.n_subspaces = n_subspaces
        self.n_codewords = n_codewords
        self.init = init
        self.max_iter = max_iter
        self.n_init = n_init
        self.tol = tol
        self.max_train_samples = max_train_samples
        self.codebooks = codebooks
        self.rotation = rotation
        self.anisotropic_threshold = anisotropic_threshold
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose

    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Learn one codebook per sub-space.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training vectors; at least ``n_subspaces`` features.  A float16
            ndarray (a memmap included) is read as float32 a chunk at a time.
        y : ignored

        Returns
        -------
        self : PQTransformer
        """
        if is_float16_rows(X):  # read a chunk at a time, as float32
            X = FitRows(*checked_rows(self, X, reset=True), unit_norm=False)
        else:
            X = check_range(validate_data(self, X, dtype=FLOAT_DTYPES, order="C"))
        progress = Progress(self.verbose, "PQTransformer")
        self.rotation_ = self._fit_rotation(X, progress)
        if self.rotation_ is not None and isinstance(X, FitRows):
            X.rotation = self.rotation_
        elif self.rotation_ is not None:
            X = np.ascontiguousarray(X @ self.rotation_)
        self.codebooks_ = self._fit_codebooks(X, progress)
        self.code_dtype_ = _quantizer.code_dtype(self.codebooks_.shape[1])
        self._n_features_out = self.codebooks_.shape[0]
        return self

    def _fitted_values(self):
        # The structural parameters: transform encodes with the fitted
        # quantizer whatever they say now, but save and load refuse a
        # state where they contradict it (``_structural_mismatch``).
        return self._pq_fitted_values()

    def _validate(self, X):
        """X checked, in the codebooks' dtype, and rotated (``x @ R``)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=FLOAT_DTYPES, order="C", reset=False)
        return self._rotate(check_range(np.ascontiguousarray(X, dtype=self.codebooks_.dtype)))

    def _rotate(self, X):
        R = self.__dict__.get("rotation_")  # files saved before OPQ lack it
        return X if R is None else np.ascontiguousarray(X @ R)

    def transform(self, X):
        """Encode X: the index of the nearest codeword in each sub-space.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            float16 rows are encoded as float32, a chunk at a time.

        Returns
        -------
        codes : ndarray of shape (n_samples, n_subspaces), uint8 or uint16
            ``codes[i, j]`` is the codeword of row i in sub-space j (ties
            go to the smaller index).
        """
        n_threads = effective_n_threads(self.n_jobs)
        if not is_float16_rows(X):
            return _scorers.encode(self._validate(X), self.codebooks_, n_threads,
                                   **self._anisotropic_kw())
        check_is_fitted(self)  # float16: encoded a chunk at a time, as float32
        n, chunks = checked_float16_chunks(self, X)
        m, k = self.codebooks_.shape[:2]
        codes = np.empty((n, m), dtype=_quantizer.code_dtype(k))
        for sl, Q in chunks:
            codes[sl] = _scorers.encode(self._rotate(Q), self.codebooks_, n_threads,
                                        **self._anisotropic_kw())
        return codes

    def inverse_transform(self, X):
        """Reconstruct vectors from their codes.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_subspaces), integer
            Codes, as returned by :meth:`transform`.

        Returns
        -------
        X_hat : ndarray of shape (n_samples, n_features)
            Concatenated codewords, in the dtype of ``codebooks_``, rotated
            back (``x_hat @ R.T``) when fitted with ``rotation="opq"``.
        """
        check_is_fitted(self)
        codes = check_array(X, dtype=None, ensure_min_samples=0)
        if codes.dtype.kind not in "iu":
            raise TypeError(
                f"codes must be an integer array (as returned by transform), got "
                f"dtype {codes.dtype}."
            )
        m, k = self.codebooks_.shape[:2]  # as fitted
        if codes.shape[1] != m:
            raise ValueError(
                f"codes have {codes.shape[1]} columns, but this PQTransformer was "
                f"fitted with n_subspaces={m}."
            )
        if codes.size and (codes.min() < 0 or codes.max() >= k):
            raise ValueError(
                f"codes must lie in [0, {k}), got values in "
                f"[{codes.min()}, {codes.max()}]."
            )
        X_hat = _quantizer.decode(codes, self.codebooks_, self.n_features_in_)
        R = self.__dict__.get("rotation_")
        return X_hat if R is None else np.ascontiguousarray(X_hat @ R.T)

    def score(self, X, y=None):
        """Minus the mean squared reconstruction error of X.

        The error of a row is ``||x - decode(encode(x))||^2``; higher scores
        are better, so :class:`~sklearn.model_selection.GridSearchCV` can
        choose ``n_subspaces`` and ``n_codewords`` without a scorer.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored

        Returns
        -------
        score : float
        """
        X = self._validate(X)
        codes = _scorers.encode(X, self.codebooks_, effective_n_threads(self.n_jobs),
                                  **self._anisotropic_kw())
        err = X - _quantizer.decode(codes, self.codebooks_, X.shape[1])
        return -float(np.mean(np.einsum("ij,ij->i", err, err, dtype=np.float64)))

    def distance_tables(self, X, metric="sqeuclidean"):
        """ADC lookup tables of each row of X against every codeword.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
        metric : {"sqeuclidean", "dot"}, default="sqeuclidean"
            ``tables[q, j, c]`` is the squared distance between query q's
            j-th sub-vector and codeword c, or minus their dot product.

        Returns
        -------
        tables : ndarray of shape (n_queries, n_subspaces, n_codewords)
            The sum over j of ``tables[q, j, codes[i, j]]`` is the ADC
            distance between query q and code i (with ``rotation="opq"``,
            between ``q @ R`` and the codewords).
        """
        if metric not in ("sqeuclidean", "dot"):
            raise ValueError(f"metric must be 'sqeuclidean' or 'dot', got {metric!r}.")
        X = self._validate(X)
        return _quantizer.adc_tables(
            X, self.codebooks_, metric == "dot", effective_n_threads(self.n_jobs)
        )

    def _check_loaded_state(self):
        m, k, _ = check_codebooks(self, _quantizer.MAX_CODEWORDS)
        check_anisotropic_state(self)
        cb = self.codebooks_
        check_float_array(cb, "codebooks_", cb.shape, cb.dtype,
                          range_bound(self.n_features_in_, cb.dtype))
        require(self.code_dtype_ == _quantizer.code_dtype(k),
                "code_dtype_ does not match the codebooks")
        self.rotation_ = self.__dict__.get("rotation_")  # saved before OPQ: None
        if self.rotation_ is not None:
            _opq.check_rotation(self.rotation_, self.n_features_in_, cb.dtype)
        check_scalar_int(self._n_features_out, "_n_features_out", m, m + 1)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = []
        return tags


class PQNeighbors(IndexIOMixin, PQParamsMixin, BasePQNeighbors):
    """Exhaustive nearest-neighbour search over product-quantization codes.

    The codes are stored (``n_subspaces`` bytes per vector for
    ``n_codewords <= 256``), and by default the raw vectors for
    re-ranking (``refine_factor``).  A query builds ``n_subspaces`` lookup tables of
    ``n_codewords`` distances, then every code's distance is the sum of m
    table entries (asymmetric distance computation, ADC); a bounded heap
    keeps the best ``n_neighbors``.  As a transformer it behaves as
    :class:`~sklearn.neighbors.KNeighborsTransformer`.

    Parameters
    ----------
    n_neighbors : int, default=5
        Neighbours returned by ``kneighbors`` and, plus one in
        ``mode="distance"``, stored per row by ``transform``.
    n_subspaces, n_codewords, init, max_iter, n_init, tol, max_train_samples, codebooks, rotation
        Product quantizer parameters, as in :class:`PQTransformer`.
    metric : {"euclidean", "sqeuclidean", "cosine", "dot", "l2", "minkowski"}, \
            default="euclidean"
        ``"l2"``, and ``"minkowski"`` with ``p=2``, are ``"euclidean"``
        (``effective_metric_``).
        ``"euclidean"`` returns square-rooted ADC distances, as
        :class:`~sklearn.neighbors.NearestNeighbors` does;
        ``"sqeuclidean"`` the ADC squared distances; ``"cosine"``
        normalises the vectors at fit and query time and returns
        ``||q - x_hat||^2 / 2`` (x_hat the decoded vector; this is
        ``1 - cos(q, x)`` when x_hat = x); ``"dot"`` returns ``-<q, x_hat>``
        (maximum inner product).
    refine_factor : int, default=10
        If positive, the raw vectors are kept too and up to ``refine_factor
        * n_neighbors`` ADC candidates are re-ranked by exact distance (those
        that can still enter the top k), so the returned distances are exact.  0 keeps only codes.  Cost of the
        default: ``4 * n_features`` bytes per vector for the float32 raw
        vectors (none for a memmap, kept by reference), beside the
        ``ceil(n_features / 2)`` bytes of codes, and 15-25% of the
        queries/s; with it, recall@10 is 0.98-1.0 on GloVe-50, 64-d
        blobs and uniform data, without it 0.62-0.89
        (``benchmarks/results/defaults.md``).  Must be positive at fit for
        re-ranking to be possible later (it is a search parameter after
        that).
    refine_dtype : {"float32", "float16", "int8"}, default="float32"
        What re-ranking (``refine_factor > 0``) reads.  ``"float32"``: the
        raw vectors (``vectors_``, ``4 * n_features`` bytes per vector,
        none for a memmap kept by reference).  ``"float16"`` (``2 *
        n_features`` bytes, values up to 65504 in magnitude) or ``"int8"``
        (``n_features`` bytes, each feature scaled between the minimum and
        maximum of the rows at fit; values of rows appended later are
        clipped to that range, as faiss's 8-bit scalar quantizer does): a
        compact tier of the prepared rows (normalised for cosine), decoded
        at re-rank time; the raw vectors are then not kept
        (``vectors_`` is None).  Fixed at fit; :meth:`set_refine` builds
        another tier from the indexed rows without refitting the codes.
    mode : {"distance", "connectivity"}, default="distance"
        What ``transform`` stores in the graph.
    n_jobs : int, default=None
        Threads for training, encoding and search (parallel over queries,
        GIL released).  None uses every thread OpenMP allows (threadpoolctl
        limits apply).
    anisotropic_threshold : float > 0 or None, default=None
        Score-aware (anisotropic) quantization, as in :class:`PQTransformer`:
        None is the k-means loss; a float T (0.2 for unit-norm data, the
        ScaNN default) weights the error parallel to each vector by
        ``eta = (d - 1) s / (1 - s)``, ``s = (T / ||x||)^2``, over the
        orthogonal error, in training and in every encoding (``fit``,
        ``partial_fit``).  Only for ``metric="dot"`` or ``"cosine"`` (fit
        raises ValueError for L2 metrics).  T is on the scale of the
        vectors' norms (below ``||x|| / sqrt(d)`` eta is under 1).
        Structural: the value used is ``anisotropic_threshold_``, and
        ``partial_fit`` raises if the parameter changed since fit.
        Training costs far more than k-means, and encoding than the
        nearest-codeword kernel (GloVe 50-d, m=10, k=256, one thread on a
        loaded machine: fit of 399,000 vectors 5.6 s -> 97 s).  Measured
        recall@10 without re-ranking (same data): "cosine" (ranked by
        ``||q - x_hat||^2``) 0.447 -> 0.450 with T=0.2, 0.453 with T=0.3;
        "dot" on the raw vectors (median norm 4.4) with T=2.2, 0.269 ->
        0.335 (k=16: 0.066 -> 0.108).
    random_state : int, RandomState instance or None, default=None
    verbose : int, default=0
        Progress on stderr: 1 shows the stages and a progress bar for
        training and encoding, 2 also a line per sub-space.
    radius : float, default=1.0
        Range of :meth:`radius_neighbors` and :meth:`radius_neighbors_graph`
        when they are not given one, in the units of ``metric`` (for
        ``"dot"``, a bound on ``-<q, x>``, which may be negative).  A
        search parameter: may change after fit.
    p : float, default=2
        Power of the Minkowski metric, for ``metric="minkowski"``, which
        is supported with ``p=2`` only (it is then ``"euclidean"``, as in
        :class:`~sklearn.neighbors.NearestNeighbors`); ignored otherwise.
    metric_params : dict, default=None
        As in :class:`~sklearn.neighbors.NearestNeighbors`: only ``{"p":
        2}`` with ``metric="minkowski"`` (pqsk's metrics take no
        parameters).

    Attributes
    ----------
    codebooks_ : ndarray of shape (n_subspaces, n_codewords, ds)
    codes_ : ndarray of shape (n_samples_fit, n_subspaces), uint8 or uint16
        With ``n_codewords=16`` (and at most 256 sub-spaces) a read-only
        copy unpacked from ``packed_codes_`` at each access.
    packed_codes_ : ndarray of shape (n_blocks, ceil(n_subspaces / 2), 32), uint8
        Only with ``n_codewords=16``: the codes two per byte, in blocks of
        32 vectors (``n_subspaces / 2`` bytes per vector), searched by the
        4-bit fast-scan kernels (``pqsk._fastscan``: SIMD table lookups
        with uint8 tables, then the candidates re-checked with the float
        tables, so results equal the float ADC search).
    vectors_ : RowStore of shape (n_samples_fit, n_features) or None
        Raw vectors (as given, also for cosine), kept only if
        ``refine_factor > 0`` and ``refine_dtype="float32"``: an array-like (``np.asarray(vectors_)``,
        ``vectors_[ids]``); memmap input is kept by reference.
    refine_dtype_ : str
        The ``refine_dtype`` the index was built with (or ``set_refine``
        last built).
    refine_rows_ : RowStore of shape (n_samples_fit, n_features) or None
        The compact re-ranking tier (``refine_dtype`` "float16": float16
        rows; "int8": uint8 codes), kept only if ``refine_factor > 0``.
    refine_offset_, refine_scale_ : ndarray of shape (n_features,), float32, or None
        int8 tier: feature j of a row decodes as ``refine_offset_[j] +
        refine_scale_[j] * code[j]``.
    rotation_ : ndarray of shape (n_features, n_features) or None
        The OPQ rotation R (``rotation="opq"``), in the fitted dtype: rows
        are encoded and queries searched as ``x @ R``; ``vectors_`` stay
        unrotated.
    n_iter_ : int
        The most KMeans iterations run in any sub-space.
    anisotropic_threshold_ : float or None
        ``anisotropic_threshold`` at fit: the loss every encoding uses.
    effective_metric_ : str
        The metric the index was built with (``metric`` at the last fit,
        aliases resolved: ``"l2"`` and ``"minkowski"`` with p=2 are
        ``"euclidean"``); the kernels use it.  Changing ``metric``
        afterwards (to another metric, not an alias) makes queries and
        ``partial_fit`` raise until the next fit.
    effective_metric_params_ : dict
        Always ``{}``: pqsk's metrics take no parameters.
    n_samples_fit_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)

    See Also
    --------
    PQTransformer : the quantizer alone.
    sklearn.neighbors.KNeighborsTransformer : the exact equivalent.

    Examples
    --------
    >>> import numpy as np
    >>> from pqsk import PQNeighbors
    >>> rng = np.random.RandomState(0)
    >>> X = rng.rand(1000, 16).astype(np.float32)
    >>> nn = PQNeighbors(n_neighbors=3, n_subspaces=4, n_codewords=16,
    ...                  random_state=0).fit(X)
    >>> nn.codes_.shape, nn.codes_.dtype
    ((1000, 4), dtype('uint8'))
    >>> dist, ind = nn.kneighbors(X[:2])
    >>> ind.shape, dist.dtype
    ((2, 3), dtype('float32'))
    >>> nn.transform(X[:2]).shape
    (2, 1000)
    """

    _parameter_constraints = {
        **PQParamsMixin._pq_parameter_constraints,
        **BasePQNeighbors._neighbors_parameter_constraints,
    }

    def __init__(
        self,
        n_neighbors=5,
        *,
        n_subspaces="auto",
        n_codewords="auto",
        metric="euclidean",
        refine_factor=10,
        refine_dtype="float32",
        mode="distance",
        init="random",
        max_iter=25,
        n_init=1,
        tol=1e-4,
        max_train_samples="auto",
        codebooks=None,
        rotation=None,
        anisotropic_threshold=None,
        n_jobs=None,
        random_state=None,
        verbose=0,
        radius=1.0,
        p=2,
        metric_params=None,
    ):
        self.n_neighbors = n_neighbors
        self.n_subspaces = n_subspaces
        self.n_codewords = n_codewords
        self.metric = metric
        self.refine_factor = refine_factor
        self.refine_dtype = refine_dtype
        self.mode = mode
        self.init = init
        self.max_iter = max_iter
        self.n_init = n_init
        self.tol = tol
        self.max_train_samples = max_train_samples
        self.codebooks = codebooks
        self.rotation = rotation
        self.anisotropic_threshold = anisotropic_threshold
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose
        self.radius = radius
        self.p = p
        self.metric_params = metric_params

    # 4-bit codes (n_codewords=16, at most 256 sub-spaces) are stored packed
    # for the fast-scan kernels (``packed_codes_``); ``codes_`` is then
    # computed on access.  Files that hold ``codes_`` for such an index
    # (written before packing) are converted at load.
    _legacy_attributes = ("codes_",)

    @staticmethod
    def _packs(m, k):
        """Whether an index of m sub-spaces of k codewords stores packed
        4-bit codes."""
        return _scorers.packs4(m, k, exhaustive=True)

    @property
    def _packed(self):
        return "packed_codes_" in self.__dict__

    def __getattr__(self, name):
        # Reached only when ``name`` is neither an instance attribute nor
        # a class attribute: ``codes_`` of a packed index is unpacked here.
        # (Not a property: a class attribute ``codes_`` would make the
        # loader refuse the ``codes_`` arrays of every saved PQNeighbors.)
        if name == "codes_":
            d = self.__dict__
            if "packed_codes_" in d:
                return _scorers.unpack_codes4(d["packed_codes_"], d["n_samples_fit_"],
                                                d["codebooks_"].shape[0])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __setattr__(self, name, value):
        if name == "codes_" and "packed_codes_" in self.__dict__:
            raise AttributeError(
                "codes_ is read-only for 4-bit codes (n_codewords=16): they are stored "
                "packed in packed_codes_")
        super().__setattr__(name, value)

    def _check_loaded_state(self):
        d = self.__dict__
        cb = d.get("codebooks_")
        require(not ("codes_" in d and "packed_codes_" in d),
                "an index holds either codes_ or packed_codes_")
        if ("codes_" in d and isinstance(cb, np.ndarray) and cb.ndim == 3
                and self._packs(cb.shape[0], cb.shape[1])):
            # Written before 4-bit codes were packed: pack them now.
            codes = d.pop("codes_")
            check_int_array(codes, "codes_", (None, cb.shape[0]), 0, 16, dtype=np.uint8)
            d["packed_codes_"] = _scorers.pack_codes4(codes)
            require(codes.shape[0] == self.n_samples_fit_, "codes_ and n_samples_fit_ differ")
        super()._check_loaded_state()
        require(self._n_stored() == self.n_samples_fit_, "codes_ and n_samples_fit_ differ")
        # No remove(): the exhaustive search does not look at removed_.
        require(self.removed_ is None and self.n_removed_ == 0,
                "a PQNeighbors index has no removed vectors")
        cb = self.codebooks_
        check_float_array(cb, "codebooks_", cb.shape, cb.dtype,
                          range_bound(self.n_features_in_, cb.dtype))

    def _check_codes(self, m, k):
        if not self._packs(m, k):
            require(not self._packed, "packed_codes_ needs n_codewords=16")
            return super()._check_codes(m, k)
        require(self._packed, "a 4-bit index stores packed_codes_")
        packed = self.packed_codes_
        n = self.n_samples_fit_
        require(isinstance(packed, np.ndarray) and packed.dtype == np.uint8,
                "packed_codes_ must be a uint8 array")
        nb = _scorers.n_blocks4(n)
        require(packed.shape == (nb, (m + 1) // 2, _scorers.FASTSCAN_BLOCK),
                f"packed_codes_ has shape {packed.shape}, expected "
                f"({nb}, {(m + 1) // 2}, {_scorers.FASTSCAN_BLOCK}) for {n} vectors")
        require(packed.flags.c_contiguous, "packed_codes_ must be C-contiguous")
        # Padding (vectors past n in the last block, the sub-space that
        # makes m even) holds code 0.
        r = n % _scorers.FASTSCAN_BLOCK
        if r:
            require(not packed[-1, :, r:].any(), "padding of packed_codes_ is not 0")
        if m % 2 and nb:
            require(not (packed[:, -1, :] >> 4).any(), "padding of packed_codes_ is not 0")

    def _start_empty(self):
        m, k = self.codebooks_.shape[:2]
        self.__dict__.pop("codes_", None)
        self.__dict__.pop("packed_codes_", None)
        _growable.discard(self, "packed_codes")
        if self._packs(m, k):
            self.packed_codes_ = _scorers.pack_codes4(np.empty((0, m), np.uint8))
        else:
            self.codes_ = np.empty((0, m), _quantizer.code_dtype(k))

    def _add_rows(self, X, n_threads, progress):
        codes = _scorers.encode_rows(progress.rows(X, "encoding"), self.codebooks_,
                                       n_threads, **self._anisotropic_kw())
        refine = self._grown_refine(X)
        n_total = self.n_samples_fit_ + codes.shape[0]
        if self._packed:
            self.packed_codes_ = self._appended_packed(codes)
        else:
            self.codes_ = np.concatenate([self.codes_, codes])
        self.__dict__.update(refine)
        self._commit_size(n_total)
        progress(f"encoded {X.shape[0]} vectors")

    def _appended_packed(self, codes):
        """``packed_codes_`` with ``codes`` appended: O(batch) amortized.  The
        last partial block is repacked with the new codes; the blocks go to
        a buffer with spare blocks (``pqsk._growable``).  The one write
        into the published blocks (the old last block's padding, zero until
        then) comes last."""
        old, n_old = self.packed_codes_, self.n_samples_fit_
        m = self.codebooks_.shape[0]
        if codes.shape[0] == 0:
            return old
        full, r = divmod(n_old, _scorers.FASTSCAN_BLOCK)
        if r:
            head = _scorers.unpack_codes4(old[full:full + 1], r, m)
            codes = np.concatenate([head, codes])
        tail = _scorers.pack_codes4(codes)
        view = _growable.grow(self, "packed_codes", old, full + tail.shape[0] - old.shape[0])
        view[full + 1:] = tail[1:]
        view[full] = tail[0]
        return view

    def _search(self, Q, n_candidates, n_threads, ranking_only=False, blocked=None):
        # Exhaustive: a filtered search is exact (blocked rows are skipped
        # inside the scan, so every allowed row competes).
        if self._packed:
            return _scorers.fastscan_search(
                Q, self.codebooks_, self.packed_codes_, self.n_samples_fit_, n_candidates,
                self._inner_product, n_threads, margin=_scorers.FASTSCAN_MARGIN,
                blocked=blocked)
        return _scorers.adc_search(
            Q, self.codebooks_, self.codes_, n_candidates, self._inner_product, n_threads,
            blocked=blocked)

    def _decode_parts(self):
        return [(None, lambda pos: _quantizer.decode(self.codes_[pos], self.codebooks_,
                                                     self.n_features_in_))]

    def _n_stored(self):
        return self.n_samples_fit_ if self._packed else self.codes_.shape[0]

    def _reserved_bytes(self):
        extra = (_growable.spare_bytes(self, "packed_codes", self.packed_codes_)
                 if self._packed else 0)
        return super()._reserved_bytes() + extra

    def _memory_parts(self):
        codes = self.packed_codes_ if self._packed else self.codes_
        return {"codes": codes.nbytes}, {"codebooks": self.codebooks_.nbytes}
