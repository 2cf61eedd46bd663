"""IVFPQNeighbors: inverted file over residual product-quantization codes."""

import warnings
from numbers import Integral

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from . import _quantizer
from ._base import BasePQNeighbors, PQParamsMixin, RemovalMixin
from ._persist import IndexIOMixin, check_int_array, require
from ._utils import effective_n_threads, release_memory

# Seed article, step 8: the coarse quantizer wants ~256 training points per
# cell; below ~39 per cell k-means is poorly determined.
POINTS_PER_LIST = 256
MIN_POINTS_PER_LIST = 39


class IVFPQNeighbors(IndexIOMixin, RemovalMixin, PQParamsMixin, BasePQNeighbors):
    """Approximate nearest neighbours with an inverted file and PQ residuals.

    A coarse k-means splits the space into ``n_lists`` cells.  Each vector
    is stored in the list of its nearest centroid as the PQ code of its
    residual (vector minus centroid) plus its id.  A query ranks the
    centroids and scans only the ``n_probe`` nearest lists with
    asymmetric distance computation (IVFADC, Jégou, Douze and Schmid,
    "Product quantization for nearest neighbor search", IEEE TPAMI 2011).

    Parameters
    ----------
    n_neighbors : int, default=5
        Neighbours returned by ``kneighbors`` and, plus one in
        ``mode="distance"``, per row of ``transform``.
    n_lists : int or "auto", default="auto"
        Number of inverted lists (coarse centroids).  ``"auto"`` uses
        ``4 * sqrt(n_samples)``, capped so that each list gets at least 39
        training points.  For the L2 metrics (all but "dot") the index
        keeps a precomputed table of ``n_lists * n_subspaces * n_codewords``
        floats (10 MiB for 1024 lists, m=10, k=256) that makes each probed
        list's lookup tables cost m * k additions instead of k * D
        multiply-adds.
    n_probe : int, default=8
        Lists scanned per query; can be changed after fit with
        ``set_params``.  A value above ``n_lists`` is clipped to
        ``n_lists`` with a warning.  When the probed lists hold fewer than
        the requested neighbours, further lists are scanned in centroid
        order, so every query gets real neighbours.
    n_subspaces, n_codewords, init, max_iter, n_init, tol, codebooks
        Product quantizer of the residuals, as in :class:`PQTransformer`.
    metric : {"euclidean", "sqeuclidean", "cosine", "dot"}, default="euclidean"
        As in :class:`PQNeighbors`.
    refine_factor : int, default=0
        If positive, the raw vectors are kept too (``4 * n_features`` more
        bytes per vector in float32, in memory, or on disk when X is a
        memmap: see Notes); ``refine_factor * n_neighbors`` candidates are
        fetched by ADC and re-ranked by exact distance, so the returned
        distances are exact.  0 keeps only codes.
    mode : {"distance", "connectivity"}, default="distance"
        What ``transform`` stores in the graph.
    coarse_max_iter : int, default=10
        Lloyd iterations of the coarse k-means.  Cells need not be optimal,
        only balanced and compact: 10 (as faiss) is enough, and each
        iteration over ``n_lists`` centroids is expensive.  Split in two
        stages like ``max_iter`` (see :class:`PQTransformer`) when the
        coarse training sample has more than 128 rows per list.
    max_train_samples : int, "auto" or None, default="auto"
        Rows drawn from X to train on; ``"auto"`` means ``256 * n_lists``,
        None every row.  Within that sample each k-means sees at most 256
        rows per centroid: ``256 * n_lists`` for the coarse quantizer,
        ``256 * n_codewords`` for the residual codebooks (as faiss does).
    n_jobs : int, default=None
        Threads for training, encoding and search (parallel over queries,
        GIL released).  None uses every thread OpenMP allows (threadpoolctl
        limits apply).  Every KMeans runs on one thread (the residual
        codebooks' sub-spaces side by side), so the fitted index does not
        depend on ``n_jobs``.
    random_state : int, RandomState instance or None, default=None
    verbose : int, default=0
        Progress messages on stderr.

    Notes
    -----
    The coarse quantizer is :class:`~sklearn.cluster.KMeans` (random
    initialisation, ``coarse_max_iter`` iterations in two stages) while
    ``n_train * n_lists <= 2**28``; beyond that, one Lloyd pass costs
    seconds: the first stage runs KMeans on ``64 * n_lists`` rows, and the
    last ``ceil(coarse_max_iter / 4)`` Lloyd passes stream over the whole
    training sample, ``n_jobs`` threads side by side (the centroids still
    do not depend on ``n_jobs``).  Vectors are
    assigned to cells by L2 distance for every metric; cells are ranked at
    query time by ``||q - c||`` (every metric but "dot") or ``<q, c>`` ("dot").

    Memory: ``fit`` and ``partial_fit`` read X (a ``np.memmap`` or
    ``np.load(path, mmap_mode="r")`` array included) chunk by chunk (see
    :class:`BasePQNeighbors` and ``pqsk._store.CHUNK_ROWS``).  Peak extra
    memory during ``fit`` is the index + the training sample + a few
    chunks (each at most 65,536 rows and 32 MiB).  The index: ``m + 4``
    bytes per vector (codes and int32 ids), the centroids, and the
    precomputed list terms (``n_lists * m * k`` floats).  The training
    sample: the coarse k-means holds at most ``256 * n_lists`` rows while
    ``n_train * n_lists <= 2**28`` and ``64 * n_lists`` beyond (its last
    passes stream over the sample); the residual codebooks ``256 * k``
    rows.  Example: 4,000,000 x 96 float32, ``n_lists=4096``, m=12, k=256:
    index 61 MiB + 48 MiB of list terms, training 96 MiB.  With
    ``refine_factor > 0``, a C-contiguous memmap of the fitted dtype is
    kept by reference in ``vectors_`` (nothing copied, re-ranking reads
    ``refine_factor * n_neighbors`` rows per query from the file); other
    input is copied into memory.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_lists, n_features)
        Coarse centroids.
    codebooks_ : ndarray of shape (n_subspaces, n_codewords, ds)
        Residual codebooks.
    codes_ : ndarray of shape (n_samples_fit, n_subspaces), uint8 or uint16
        Residual codes, list after list.
    ids_ : ndarray of shape (n_samples_fit,), int32 or int64
        Id (row number at fit / partial_fit) of each code; int32 while the
        index holds fewer than 2**31 vectors.
    list_offsets_ : ndarray of shape (n_lists + 1,), int64
        List l holds ``codes_[list_offsets_[l]:list_offsets_[l + 1]]``.
    n_lists_ : int
    n_samples_fit_ : int
    n_iter_ : int
        The most KMeans iterations run by any residual codebook.
    vectors_ : RowStore of shape (n_samples_fit, n_features) or None
        Raw vectors (as given, also for cosine), kept only if
        ``refine_factor > 0``: an array-like (``np.asarray(vectors_)``,
        ``vectors_[ids]``) whose chunks are in memory or, for memmap input,
        the caller's file.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)

    See Also
    --------
    PQNeighbors : exhaustive ADC search, no coarse quantizer.
    sklearn.neighbors.KNeighborsTransformer : the exact equivalent.

    Examples
    --------
    >>> import numpy as np
    >>> from pqsk import IVFPQNeighbors
    >>> rng = np.random.RandomState(0)
    >>> X = rng.rand(2000, 16).astype(np.float32)
    >>> nn = IVFPQNeighbors(n_neighbors=3, n_lists=16, n_probe=4, n_subspaces=4,
    ...                     n_codewords=32, random_state=0).fit(X)
    >>> nn.codes_.shape, nn.ids_.dtype
    ((2000, 4), dtype('int32'))
    >>> dist, ind = nn.kneighbors(X[:2])
    >>> ind.shape
    (2, 3)
    >>> nn.partial_fit(X[:10]).n_samples_fit_
    2010
    """

    _parameter_constraints = {
        **PQParamsMixin._pq_parameter_constraints,
        **BasePQNeighbors._neighbors_parameter_constraints,
        "n_lists": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "n_probe": [Interval(Integral, 1, None, closed="left")],
        "coarse_max_iter": [Interval(Integral, 1, None, closed="left")],
    }

    _search_params = BasePQNeighbors._search_params + ("n_probe",)
    _structural_params = BasePQNeighbors._structural_params + ("n_lists",)

    def __init__(
        self,
        n_neighbors=5,
        *,
        n_lists="auto",
        n_probe=8,
        n_subspaces=8,
        n_codewords=256,
        metric="euclidean",
        refine_factor=0,
        mode="distance",
        coarse_max_iter=10,
        init="random",
        max_iter=25,
        n_init=1,
        tol=1e-4,
        max_train_samples="auto",
        codebooks=None,
        n_jobs=None,
        random_state=None,
        verbose=0,
    ):
        self.n_neighbors = n_neighbors
        self.n_lists = n_lists
        self.n_probe = n_probe
        self.n_subspaces = n_subspaces
        self.n_codewords = n_codewords
        self.metric = metric
        self.refine_factor = refine_factor
        self.mode = mode
        self.coarse_max_iter = coarse_max_iter
        self.init = init
        self.max_iter = max_iter
        self.n_init = n_init
        self.tol = tol
        self.max_train_samples = max_train_samples
        self.codebooks = codebooks
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose

    def _fitted_values(self):
        fitted = super()._fitted_values()
        if self.n_lists != "auto":  # "auto" chose n_lists_ at fit
            fitted["n_lists"] = self.n_lists_
        return fitted

    def _max_train_samples(self):
        # PQParamsMixin uses this for the residual codebooks, which see at
        # most 256 rows per codeword of the training sample.
        return POINTS_PER_LIST * self.n_codewords

    def _resolve_n_lists(self, n_samples):
        if self.n_lists == "auto":
            n_train = n_samples
            if isinstance(self.max_train_samples, Integral):
                n_train = min(n_samples, self.max_train_samples)
            return int(max(1, min(4 * np.sqrt(n_samples), n_train // MIN_POINTS_PER_LIST)))
        return self.n_lists

    def _fit_index(self, X, progress):
        n, d = X.shape
        _quantizer.check_subspaces(d, self.n_subspaces)
        _quantizer.check_codewords(self.n_codewords, np.inf)
        n_threads = effective_n_threads(self.n_jobs)
        rng = check_random_state(self.random_state)
        n_lists = self._resolve_n_lists(n)

        if self.max_train_samples == "auto":
            cap = POINTS_PER_LIST * n_lists
        else:
            cap = n if self.max_train_samples is None else self.max_train_samples
        # The training sample is a set of row numbers: only the rows each
        # k-means needs are gathered (at sorted positions, so a memmap is
        # read in file order), never the whole sample unless it is small.
        train_rows = _quantizer.sample_rows(n, cap, rng)
        n_train = n if train_rows is None else train_rows.shape[0]
        if n_train < n_lists:
            raise ValueError(
                f"n_lists={n_lists} needs at least {n_lists} training samples, got "
                f"n_samples={n_train}; use fewer lists or more data."
            )
        if n_train < MIN_POINTS_PER_LIST * n_lists:
            warnings.warn(
                f"{n_train} training samples for n_lists={n_lists} is fewer "
                f"than {MIN_POINTS_PER_LIST} per list; the coarse quantizer will be "
                f"poor (256 per list is comfortable). Use fewer lists or more data.",
                UserWarning,
            )
        coarse_rows = _quantizer.subsample_rows(train_rows, n, POINTS_PER_LIST * n_lists, rng)
        progress(f"training the coarse quantizer: {n_lists} lists on "
                 f"{n if coarse_rows is None else coarse_rows.shape[0]} rows")
        centroids, _ = _quantizer.train_coarse(
            X, n_lists, rows=coarse_rows, max_iter=self.coarse_max_iter, tol=self.tol,
            random_state=rng, n_threads=n_threads,
        )
        # Residual codebooks: trained on the residuals of (at most
        # 256 * n_codewords of) the training rows.
        pq_train = _quantizer.gather_rows(X, _quantizer.subsample_rows(
            train_rows, n, self._max_train_samples(), rng))
        residuals = pq_train - centroids[_quantizer.assign(pq_train, centroids)]
        del pq_train
        codebooks = self._fit_codebooks(residuals, progress)
        del residuals
        release_memory()  # the training sample, before the index is built

        self.cluster_centers_ = centroids
        self.codebooks_ = codebooks
        self.n_lists_ = n_lists
        self._list_terms = (
            np.empty((0, self.n_subspaces, self.n_codewords), dtype=X.dtype)
            if self._inner_product else _quantizer.list_terms(centroids, codebooks)
        )
        self.codes_ = np.empty((0, self.n_subspaces), dtype=_quantizer.code_dtype(self.n_codewords))
        self.ids_ = np.empty(0, dtype=np.int32)
        self.list_offsets_ = np.zeros(n_lists + 1, dtype=np.int64)
        self._add_rows(X, n_threads, progress)

    def _add_rows(self, X, n_threads, progress):
        # Assign, encode and merge into new arrays; attributes are replaced
        # only at the end, so an error leaves the index as it was.
        first_id = self.n_samples_fit_  # ids continue, removed ones included
        # X (a FitRows) is read once, chunk by chunk.
        labels, codes = _quantizer.assign_encode(X, self.cluster_centers_, self.codebooks_,
                                                 n_threads)
        n_total = first_id + X.shape[0]
        id_dtype = np.int32 if n_total < 2**31 else np.int64
        old_lists = np.repeat(np.arange(self.n_lists_), np.diff(self.list_offsets_))
        # Stable sort by list: old entries (ids ascending) come before new ones.
        order = np.argsort(np.concatenate([old_lists, labels]), kind="stable")
        all_codes = np.concatenate([self.codes_, codes])[order]
        all_ids = np.concatenate([self.ids_.astype(id_dtype),
                                  np.arange(first_id, n_total, dtype=id_dtype)])[order]
        counts = np.bincount(np.concatenate([old_lists, labels]), minlength=self.n_lists_)
        offsets = np.zeros(self.n_lists_ + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        vectors = self._grown_vectors(X)
        self.codes_, self.ids_, self.list_offsets_ = all_codes, all_ids, offsets
        self.vectors_ = vectors
        self._commit_size(n_total)
        progress(f"indexed {X.shape[0]} vectors in {self.n_lists_} lists")

    def _check_loaded_state(self):
        """Loaded-index invariants (see ``BasePQNeighbors``), and the list
        terms, which are derived state, recomputed rather than read."""
        from ._persist import check_float_array, check_scalar_int, distance_bound

        super()._check_loaded_state()
        cb, dtype, d = self.codebooks_, self._fit_dtype_, self.n_features_in_
        m, k, _ = cb.shape
        bound = distance_bound(dtype, d)
        L = check_scalar_int(self.n_lists_, "n_lists_", 1, 2**31)
        check_float_array(self.cluster_centers_, "cluster_centers_", (L, d), dtype, bound)
        # Residuals of vectors and centroids both within ``bound``.
        check_float_array(cb, "codebooks_", cb.shape, dtype, 2 * bound)
        n, n_codes = self.n_samples_fit_, self.codes_.shape[0]
        off = self.list_offsets_
        check_int_array(off, "list_offsets_", (L + 1,), 0, n_codes + 1, dtype=np.int64)
        require(off[0] == 0 and off[-1] == n_codes and bool(np.all(off[1:] >= off[:-1])),
                "list_offsets_ must rise from 0 to the number of codes")
        check_int_array(self.ids_, "ids_", (n_codes,), 0, n,
                        dtype=np.int32 if n < 2**31 else np.int64)
        # Every live id exactly once, no removed one.
        require(n_codes == n - self.n_removed_, "ids_ must hold every id not removed")
        live = (np.arange(n) if self.removed_ is None
                else np.flatnonzero(~self.removed_))
        require(np.array_equal(np.sort(self.ids_), live),
                "ids_ must hold every id not removed, each once")
        if self.effective_metric_ == "dot":
            self._list_terms = np.empty((0, m, k), dtype=dtype)
        else:
            self._list_terms = _quantizer.list_terms(self.cluster_centers_, cb)

    def _remove_rows(self, ids, removed):
        # Entries leave their lists for good; the raw vectors (if kept) stay
        # in place, addressed by id.
        keep = ~removed[self.ids_]
        lists = np.repeat(np.arange(self.n_lists_), np.diff(self.list_offsets_))
        offsets = np.zeros(self.n_lists_ + 1, dtype=np.int64)
        np.cumsum(np.bincount(lists[keep], minlength=self.n_lists_), out=offsets[1:])
        self.codes_, self.ids_, self.list_offsets_ = self.codes_[keep], self.ids_[keep], offsets

    def _n_probe(self):
        if self.n_probe > self.n_lists_:
            warnings.warn(
                f"n_probe={self.n_probe} is larger than n_lists={self.n_lists_}; "
                f"scanning all {self.n_lists_} lists.",
                UserWarning,
            )
            return self.n_lists_
        return self.n_probe

    def _search(self, Q, n_candidates, n_threads):
        ip = self._inner_product
        n_probe = self._n_probe()
        dist = np.empty((Q.shape[0], n_candidates), dtype=self._fit_dtype_)
        ind = np.empty((Q.shape[0], n_candidates), dtype=np.int64)
        # Chunks bound the (rows, n_lists) coarse table.
        step = _quantizer.chunk_rows(self.n_lists_)
        for sl in _quantizer._chunks(Q.shape[0], step):
            coarse = _quantizer.coarse_terms(Q[sl], self.cluster_centers_, ip)
            dist[sl], ind[sl] = _quantizer.ivf_search(
                Q[sl], coarse, self.codebooks_, self._list_terms, self.codes_, self.ids_,
                self.list_offsets_, n_candidates, n_probe, ip, n_threads,
            )
        return dist, ind

    def _reconstruct(self):
        lists = np.repeat(np.arange(self.n_lists_), np.diff(self.list_offsets_))
        X_hat = np.empty((self.n_samples_fit_, self.n_features_in_), dtype=self._fit_dtype_)
        X_hat[self.ids_] = (self.cluster_centers_[lists]
                            + _quantizer.decode(self.codes_, self.codebooks_))
        return X_hat

    def _memory_parts(self):
        return (
            {"codes": self.codes_.nbytes, "ids": self.ids_.nbytes},
            {"list_offsets": self.list_offsets_.nbytes,
             "centroids": self.cluster_centers_.nbytes,
             "codebooks": self.codebooks_.nbytes,
             "list_terms": self._list_terms.nbytes},
        )
