"""IVFPQNeighbors: inverted file over residual product-quantization codes."""

import warnings
from numbers import Integral, Real

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from . import _growable, _lists, _partition, _quantizer, _scorers
from ._base import BasePQNeighbors
from ._checks import check_float_array, check_int_array, check_scalar_int, require
from ._merges import MERGE_PARAMETER_CONSTRAINTS, MergesMixin
from ._persist import IndexIOMixin
from ._runtime import index_lock, runtime, yield_to_queries
from ._segments import (COMPACT_SHARE, DEFAULT_SEGMENT_SIZE, SEGMENT_PARAMETER_CONSTRAINTS,
                        Segment, SegmentWritesMixin)
from ._store import chunk_slices
from ._training import PQParamsMixin, RefitMixin
from ._utils import effective_n_threads, range_bound, release_memory

# Seed article, step 8: the coarse quantizer wants ~256 training points per
# cell; below ~39 per cell k-means is poorly determined.
POINTS_PER_LIST = 256
MIN_POINTS_PER_LIST = 39


def auto_n_probe(n_lists):
    """``n_probe="auto"``: ``ceil(2 * sqrt(n_lists))`` lists, at most all.

    Measured (``benchmarks/bench_defaults.py``, re-ranking on): GloVe-50,
    50,000 rows, 894 lists: recall@10 0.87 at 32 lists, 0.94 at 64; 64-d
    blobs, 512 lists: 0.94-0.95 at 16, 0.99-1.0 at 32.  The square root
    (rather than a fixed share of the lists) is an assumption for larger
    indexes, whose cells are smaller than the neighbourhood of a query
    grows: not measured beyond 50,000 rows.
    """
    return int(min(n_lists, -(-2 * np.sqrt(n_lists) // 1)))

class IVFPQNeighbors(IndexIOMixin, RefitMixin, MergesMixin, SegmentWritesMixin,
                     PQParamsMixin, BasePQNeighbors):
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
        multiply-adds, while it takes at most 512 MiB; beyond that it is
        not kept and each probed list's tables are built from the residual
        query (same distances, k * D multiply-adds per probed list).
    n_probe : int or "auto", default="auto"
        Lists scanned per query; can be changed after fit with
        ``set_params``.  ``"auto"``: ``ceil(2 * sqrt(n_lists))``, at most
        ``n_lists`` (60 of 894 lists for 50,000 rows: recall@10 0.94 on
        GloVe-50 with the other defaults; see ``auto_n_probe``).  An int
        above ``n_lists`` is clipped to ``n_lists`` with a warning.  When
        the probed lists hold fewer than
        the requested neighbours, further lists are scanned in centroid
        order, so every query gets real neighbours.
    n_subspaces, n_codewords, init, max_iter, n_init, tol, codebooks, rotation
        Product quantizer of the residuals, as in :class:`PQTransformer`.
    metric : {"euclidean", "sqeuclidean", "cosine", "dot", "l2", "minkowski"}, \
            default="euclidean"
        ``"l2"``, and ``"minkowski"`` with ``p=2``, are ``"euclidean"``
        (``effective_metric_``).
        As in :class:`PQNeighbors`.
    refine_factor : int, default=10
        If positive, the raw vectors are kept too (``4 * n_features`` more
        bytes per vector in float32, in memory, or on disk when X is a
        memmap: see Notes); up to ``refine_factor * n_neighbors`` ADC
        candidates are re-ranked by exact distance, so the returned
        distances are exact.  0 keeps only codes.  By default the index
        holds ``ceil(n_features / 2) + 4`` bytes per vector (codes and
        int32 ids) plus the raw vectors.
    refine_dtype : {"float32", "float16", "int8"}, default="float32"
        What re-ranking reads: the raw vectors (``vectors_``), or a compact
        tier of the prepared rows (``refine_rows_``, 2 or 1 bytes per
        feature; the raw vectors are then not kept): see :class:`PQNeighbors`.
    mode : {"distance", "connectivity"}, default="distance"
        What ``transform`` stores in the graph.
    spill_lambda : float >= 0 or None, default=None
        Spilling (SOAR, Sun et al., NeurIPS 2023): each vector is also
        stored in a second list, the one minimising ``||x - c||^2 +
        spill_lambda * <r, x - c>^2 / ||r||^2`` (r its residual to its own
        centroid; 0 is plain second-nearest, 1.5 is ScaNN's choice), so a
        neighbour near a cell border is found from either side: higher
        recall at the same ``n_probe``, for twice the codes and ids (and
        scan work).  A query returns each id once.  See :ref:`spilling`.
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
    segment_size : int, default=4_194_304
        Most rows a sealed segment holds (at least 1,024).  ``fit`` cuts
        the data into segments of this size; appends are sealed into
        segments and small segments merged up to it (see Notes).  Only
        where rows go depends on it, not the answers; changing it after
        fit affects later sealing and merging.
    merge : {"inline", "background"}, default="inline"
        Where ``partial_fit``'s segment merges run: in the call, or on a
        background thread (:meth:`wait_merges` waits for them).  Either
        way a merge is built beside the index and swapped in (see Notes).
    n_jobs : int, default=None
        Threads for training, encoding and search (parallel over queries,
        GIL released).  None uses every thread OpenMP allows (threadpoolctl
        limits apply).  Every KMeans runs on one thread (the residual
        codebooks' sub-spaces side by side) and the coarse k-means of a
        large sample runs in fixed tasks (see Notes), so the fitted index
        does not depend on ``n_jobs``.
    anisotropic_threshold : float > 0 or None, default=None
        Score-aware (anisotropic) quantization, as in :class:`PQTransformer`:
        None is the k-means loss; a float T (0.2 for unit-norm data, the
        ScaNN default) weights the error parallel to each vector by
        ``eta = (d - 1) s / (1 - s)``, ``s = (T / ||x||)^2``, over the
        orthogonal error, in training and in every encoding (``fit``,
        ``partial_fit``, ``refit_codebooks``); the residual ``x - c`` is
        quantized, the loss has the direction of x.  Only for
        ``metric="dot"`` or ``"cosine"`` (fit raises ValueError for L2
        metrics).  With ``"cosine"`` the lists are then scored by the inner
        product with ``x_hat`` (the error that loss bounds; one lookup table
        per query for every list) instead of by ``||q - x_hat||``, and
        still probed by ``||q - c||``: ScaNN's configuration, the fastest
        here for unit-norm embeddings (see the frontier in the user guide).
        Structural: the value used is ``anisotropic_threshold_``, and
        ``partial_fit`` raises if the parameter changed since fit.
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

    Notes
    -----
    The coarse quantizer is :class:`~sklearn.cluster.KMeans` on one thread
    (random initialisation, ``coarse_max_iter`` iterations in two stages)
    while ``n_train * n_lists < 2**24`` (fewer than 256 lists with the
    default sample).  From there on the same two-stage schedule runs as
    pqsk's own Lloyd passes: random centres, passes over ``64 * n_lists``
    of the training rows, then the last ``ceil(coarse_max_iter / 4)`` over
    all of them, each pass in tasks of 16,384 rows, ``n_jobs`` tasks side
    by side, their per-centre sums added in task order (the centroids do
    not depend on ``n_jobs``).  It is faster than KMeans on one thread at
    these sizes (96-d, 1,024 lists, 262,144 rows: 2.9 s instead of 4.8 s),
    and uses every thread.  Up to ``n_train * n_lists = 2**28`` the
    training sample is held in memory; beyond, each pass reads its rows
    from X (streamed).  Vectors are
    assigned to cells by L2 distance for every metric; cells are ranked at
    query time by ``||q - c||`` (every metric but "dot") or ``<q, c>`` ("dot").
    With ``rotation="opq"`` the rotation R is learned first, with a flat
    PQ on the training sample (as faiss's ``OPQMatrix`` before an IVFPQ);
    the coarse quantizer, the residual codebooks and the queries then all
    work on the rotated rows ``x @ R``.

    Memory: ``fit`` and ``partial_fit`` read X (a ``np.memmap`` or
    ``np.load(path, mmap_mode="r")`` array included) chunk by chunk (see
    :class:`BasePQNeighbors` and ``pqsk._store.CHUNK_ROWS``).  Peak extra
    memory during ``fit`` is the index + the training sample + a few
    chunks (each at most 65,536 rows and 32 MiB).  The index: ``m + 4``
    bytes per vector (codes and int32 ids; ``ceil(m / 2) + 4`` with
    ``n_codewords=16``, plus each list's padding to 32 vectors), the centroids, and the
    precomputed list terms (``n_lists * m * k`` floats).  The training
    sample: the coarse k-means holds at most ``1.25 * 256 * n_lists`` rows
    (the sample and its stage-1 rows) while ``n_train * n_lists <= 2**28``
    (at most 262,144 rows) and none beyond
    (streamed: per thread a task of 16,384 rows and an (n_lists, D) float64
    sum); the residual codebooks ``256 * k`` rows.  Example: 4,000,000 x 96
    float32 in a memmap, cosine, ``n_lists=4096``, m=12, k=256: index
    61 MiB + 48 MiB of list terms; ``fit`` added at most 304 MiB of
    anonymous memory (``benchmarks/results/scale_4m.md``).  With
    ``refine_factor > 0``, a C-contiguous memmap of the fitted dtype is
    kept by reference in ``vectors_`` (nothing copied, re-ranking reads
    ``refine_factor * n_neighbors`` rows per query from the file); other
    input is copied into memory.

    Segments: the lists are stored in sealed, immutable segments
    (``segments_``, each at most ``segment_size`` rows of consecutive ids,
    sorted by list) plus a growing part.  A query scans each probed list
    in every segment with one table into one top-k heap, so the answers
    do not depend on the segmentation.  ``partial_fit`` costs O(rows
    added), amortized, whatever the index size: new entries go to the
    growing part (arrays with spare capacity, appended in place), which
    queries scan too; past 1/64 of the stored entries it is sealed into a
    new segment (O(its size)); the newest segment is merged with the one
    before it while it holds at least half as many rows and the two fit in
    ``segment_size`` (sizes fall geometrically: O(log n) segments, each row
    rewritten O(log n) times).  ``remove`` marks ids as tombstones, O(ids
    removed): queries skip them at no cost unless they would have been
    returned; a segment more than half removed is compacted (rewritten
    without them, alone), and :meth:`compact` does it for every segment.
    Merges, compaction and :meth:`refit_codebooks` build new segments
    while queries go on and swap them in under the write lock, which an
    append takes only to publish its rows (see :mod:`pqsk._merges`).
    ``save`` writes only the segments the last save of the same path lacks.

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_lists, n_features)
        Coarse centroids.
    codebooks_ : ndarray of shape (n_subspaces, n_codewords, ds)
        Residual codebooks.
    segments_ : tuple of Segment
        The sealed segments, in id order: each holds ``codes`` (n_s,
        n_subspaces), ``ids`` (n_s,) and ``list_offsets`` (n_lists + 1,)
        (list l is rows ``list_offsets[l]:list_offsets[l + 1]``), and
        ``meta`` {"lo", "hi"}, its id range.  Read-only.  With
        ``n_codewords=16`` (4-bit codes) a segment holds, in place of
        ``codes``, ``packed`` (n_blocks, (n_subspaces + 1) // 2, 32) uint8:
        the codes two per byte in the fast-scan layout of blocks of 32
        vectors, each list starting on a block boundary (padding codes 0),
        and ``list_blocks`` (n_lists + 1,) int64 (list l is blocks
        ``list_blocks[l]:list_blocks[l + 1]``); queries scan its lists
        with the 4-bit fast-scan kernels (``pqsk._fastscan``): about
        ``m / 2 + 4`` bytes per vector.  Indexes saved with plain 4-bit
        codes still load and are searched as they are.
    codes_ : ndarray of shape (n_sealed, n_subspaces), uint8 or uint16
        Residual codes of the sealed segments as one index sorted by list
        (a read-only property, assembled when there are several segments).
    ids_ : ndarray of shape (n_sealed,), int32 or int64
        Id (row number at fit / partial_fit) of each code of ``codes_``;
        int32 while the index holds fewer than 2**31 vectors.
    list_offsets_ : ndarray of shape (n_lists + 1,), int64
        List l holds ``codes_[list_offsets_[l]:list_offsets_[l + 1]]``
        and the growing entries labelled l.
    growing_codes_ : ndarray of shape (n_growing, n_subspaces)
        Residual codes of the rows appended since the last seal, in
        arrival order (the growing part; see Notes).
    growing_ids_ : ndarray of shape (n_growing,), dtype of ``ids_``
    growing_lists_ : ndarray of shape (n_growing,), int32
        The list each growing entry belongs to.
    n_lists_ : int
    effective_metric_ : str
        The metric the index was built with (``metric`` at the last fit,
        aliases resolved: ``"l2"`` and ``"minkowski"`` with p=2 are
        ``"euclidean"``); the kernels use it.  Changing ``metric``
        afterwards (to another metric, not an alias) makes queries and
        ``partial_fit`` raise until the next fit.
    effective_metric_params_ : dict
        Always ``{}``: pqsk's metrics take no parameters.
    n_samples_fit_ : int
    rotation_ : ndarray of shape (n_features, n_features) or None
        The OPQ rotation R (``rotation="opq"``), in the fitted dtype: rows
        are encoded and queries searched as ``x @ R``; ``vectors_`` stay
        unrotated.
    n_iter_ : int
        The most KMeans iterations run by any residual codebook.
    anisotropic_threshold_ : float or None
        ``anisotropic_threshold`` at fit: the loss every encoding uses.
    spill_lambda_ : float or None
        ``spill_lambda`` at fit.  With a float (and ``n_lists_ > 1``) each
        id is stored twice, in two lists (``codes_``, ``ids_`` and the
        growing part hold both entries; ``n_samples_fit_`` counts vectors).
    vectors_ : RowStore of shape (n_samples_fit, n_features) or None
        Raw vectors (as given, also for cosine), kept only if
        ``refine_factor > 0`` and ``refine_dtype="float32"``: an array-like (``np.asarray(vectors_)``,
        ``vectors_[ids]``) whose chunks are in memory or, for memmap input,
        the caller's file.
    refine_dtype_, refine_rows_, refine_offset_, refine_scale_
        The re-ranking tier, as in :class:`PQNeighbors`.
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
    >>> nn.set_params(spill_lambda=1.5).fit(X).ids_.shape  # each vector in two lists
    (4000,)
    """

    _parameter_constraints = {
        **PQParamsMixin._pq_parameter_constraints,
        **BasePQNeighbors._neighbors_parameter_constraints,
        "n_lists": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "n_probe": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "coarse_max_iter": [Interval(Integral, 1, None, closed="left")],
        "spill_lambda": [None, Interval(Real, 0, np.inf, closed="left")],
        **SEGMENT_PARAMETER_CONSTRAINTS, **MERGE_PARAMETER_CONSTRAINTS,
    }

    _search_params = BasePQNeighbors._search_params + ("n_probe",)

    def __init__(
        self,
        n_neighbors=5,
        *,
        n_lists="auto",
        n_probe="auto",
        n_subspaces="auto",
        n_codewords="auto",
        metric="euclidean",
        refine_factor=10,
        refine_dtype="float32",
        mode="distance",
        spill_lambda=None,
        coarse_max_iter=10,
        init="random",
        max_iter=25,
        n_init=1,
        tol=1e-4,
        max_train_samples="auto",
        codebooks=None,
        rotation=None,
        anisotropic_threshold=None,
        segment_size=DEFAULT_SEGMENT_SIZE,
        merge="inline",
        n_jobs=None,
        random_state=None,
        verbose=0,
        radius=1.0,
        p=2,
        metric_params=None,
    ):
        self.n_neighbors = n_neighbors
        self.n_lists = n_lists
        self.n_probe = n_probe
        self.n_subspaces = n_subspaces
        self.n_codewords = n_codewords
        self.metric = metric
        self.refine_factor = refine_factor
        self.refine_dtype = refine_dtype
        self.mode = mode
        self.spill_lambda = spill_lambda
        self.coarse_max_iter = coarse_max_iter
        self.init = init
        self.max_iter = max_iter
        self.n_init = n_init
        self.tol = tol
        self.max_train_samples = max_train_samples
        self.codebooks = codebooks
        self.rotation = rotation
        self.anisotropic_threshold = anisotropic_threshold
        self.segment_size = segment_size
        self.merge = merge
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose
        self.radius = radius
        self.p = p
        self.metric_params = metric_params

    def _fitted_values(self):
        fitted = {**super()._fitted_values(), "spill_lambda": self._spill_lambda}
        if self.n_lists != "auto":  # "auto" chose n_lists_ at fit
            fitted["n_lists"] = self.n_lists_
        return fitted

    def _max_train_samples(self):
        # PQParamsMixin uses this for the residual codebooks, which see at
        # most 256 rows per codeword of the training sample.
        return POINTS_PER_LIST * self._codewords_cap()

    def _resolve_n_lists(self, n_samples):
        if self.n_lists == "auto":
            n_train = n_samples
            if isinstance(self.max_train_samples, Integral):
                n_train = min(n_samples, self.max_train_samples)
            return int(max(1, min(4 * np.sqrt(n_samples), n_train // MIN_POINTS_PER_LIST)))
        return self.n_lists

    def _fit_index(self, X, progress):
        self._train_quantizers(X, progress)
        self._start_empty()
        self._add_rows(X, effective_n_threads(self.n_jobs), progress, fit=True)

    def _train_quantizers(self, X, progress, drawn_from=None):
        n, d = X.shape
        self._pq_shape(d, n)  # m and k checked before any training
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
        if drawn_from is not None and train_rows is None:
            # X is already the sample a fit of ``drawn_from`` rows draws
            # (pqsk.dask trains on it): the same draw, to continue the same
            # random stream, and every row of X.
            _quantizer.sample_rows(drawn_from, cap, rng)
        n_train = n if train_rows is None else train_rows.shape[0]
        if n_train < n_lists:
            raise ValueError(
                f"n_lists={n_lists} needs at least {n_lists} training samples, got "
                f"n_samples={n_train}; use fewer lists or more data."
            )
        if n_lists > 1 and n_train < MIN_POINTS_PER_LIST * n_lists:  # one list: no k-means
            warnings.warn(
                f"{n_train} training samples for n_lists={n_lists} is fewer "
                f"than {MIN_POINTS_PER_LIST} per list; the coarse quantizer will be "
                f"poor (256 per list is comfortable). Use fewer lists or more data.",
                UserWarning,
            )
        coarse_rows = _quantizer.subsample_rows(train_rows, n, POINTS_PER_LIST * n_lists, rng)
        progress(f"training the coarse quantizer: {n_lists} lists on "
                 f"{n if coarse_rows is None else coarse_rows.shape[0]} rows")
        centroids, _ = _partition.train_coarse(
            X, n_lists, rows=coarse_rows, max_iter=self.coarse_max_iter, tol=self.tol,
            random_state=rng, n_threads=n_threads,
        )
        # Residual codebooks: trained on the residuals of (at most
        # 256 * n_codewords of) the training rows.
        pq_train = _quantizer.gather_rows(X, _quantizer.subsample_rows(
            train_rows, n, self._max_train_samples(), rng))
        residuals = pq_train - centroids[_partition.assign(pq_train, centroids)]
        # The anisotropic loss has the direction of the row, not the residual's.
        codebooks = self._fit_codebooks(
            residuals, progress,
            directions=None if self.anisotropic_threshold is None else pq_train)
        del residuals, pq_train
        release_memory()  # the training sample, before the index is built

        self.cluster_centers_ = centroids
        self.codebooks_ = codebooks
        self.n_lists_ = n_lists

    # -- the shard protocol (see BasePQNeighbors) ----------------------------
    def _shard_params(self, n_rows):
        return {"n_lists": self._resolve_n_lists(n_rows)}

    def _shard_sample_size(self, n_rows):
        # The cap of _train_quantizers' sample.
        if self.max_train_samples == "auto":
            cap = POINTS_PER_LIST * self._resolve_n_lists(n_rows)
        else:
            cap = self.max_train_samples
        return n_rows if cap is None else min(n_rows, cap)

    def _shard_search_params(self):
        params = super()._shard_search_params()
        self._n_probe()  # warns here when n_probe > n_lists
        return params

    _trained_attrs = BasePQNeighbors._trained_attrs + ("cluster_centers_", "n_lists_")

    def _start_empty(self):
        codebooks = self.codebooks_
        m, k = codebooks.shape[:2]
        self._list_terms = (
            np.empty((0, m, k), dtype=codebooks.dtype)
            if self._ip_tables else _partition.list_terms(self.cluster_centers_,
                                                              codebooks)
        )
        lam = self.spill_lambda
        self.segments_, self.spill_lambda_ = (), None if lam is None else float(lam)
        self.__dict__.update(_lists.empty_growing(m, _quantizer.code_dtype(k), np.int32))
        self._forget_tombstones()

    # -- segments ------------------------------------------------------------
    def _segment_size(self):
        return int(self.segment_size)

    def _add_rows(self, X, n_threads, progress, fit=False):
        # Everything is computed before the attributes are replaced (one
        # dict update), so an error leaves the index as it was: rows are
        # written past the published growing part only, and sealed
        # segments are never modified.
        first_id = self.n_samples_fit_  # ids continue, removed ones included
        b = X.shape[0]
        # X (a FitRows) is read once, chunk by chunk.
        labels, codes = _scorers.assign_encode(progress.rows(X, "encoding"),
                                                 self.cluster_centers_, self.codebooks_,
                                                 n_threads, **self._anisotropic_kw(),
                                                 spill=self._spill_lambda)
        n_total = first_id + b
        id_dtype = np.dtype(np.int32 if n_total < 2**31 else np.int64)
        new_ids = _lists.entry_ids(first_id, n_total, id_dtype, self._copies())
        segments = self.segments_
        if segments and segments[0]["ids"].dtype != id_dtype:  # past 2**31 ids, once
            segments = tuple(Segment({**{name: s[name] for name in s.names},
                                      "ids": s["ids"].astype(id_dtype)}, s.meta)
                             for s in segments)
            for old, new in zip(self.segments_, segments):
                self._note_recoded(old, new)
        g = self.growing_codes_.shape[0] + b
        if fit or _lists.growing_full(g, self._n_stored() + b, self._segment_size()):
            sealed = self._sealed_growing((codes, new_ids, labels), id_dtype, n_total)
            # partial_fit merges after publishing (_merges); fit cuts whole segments.
            segments = self._merge_tail(segments + sealed) if fit else segments + sealed
            state = {"segments_": segments}
            state.update(_lists.empty_growing(codes.shape[1], codes.dtype, id_dtype))
            for name in ("growing_codes", "growing_ids", "growing_lists"):
                _growable.discard(self, name)
            progress(f"indexed {b} vectors; sealed {len(sealed)} segment(s) of "
                     f"{', '.join(str(s['ids'].shape[0]) for s in sealed)} rows; "
                     f"{len(segments)} segment(s)")
        else:
            state = {
                "growing_codes_": self._appended("growing_codes", self.growing_codes_,
                                                 codes),
                "growing_ids_": self._appended("growing_ids",
                                               self.growing_ids_.astype(id_dtype,
                                                                        copy=False),
                                               new_ids),
                "growing_lists_": self._appended("growing_lists", self.growing_lists_,
                                                 labels),
            }
            if segments is not self.segments_:
                state["segments_"] = segments
            progress(f"indexed {b} vectors ({g} in the growing part)")
        yield_to_queries()  # between the steps of a write (see pqsk._runtime)
        state.update(self._grown_refine(X))
        state.update(self._size_state(n_total))
        self._publish(state)

    def _appended(self, name, current, rows):
        view = _growable.grow(self, name, current, rows.shape[0])
        view[current.shape[0]:] = rows
        return view

    def _sealed_growing(self, extra=None, id_dtype=None, n_total=None):
        """New sealed segments holding the growing part (its removed
        entries dropped) and ``extra`` (codes, ids, lists of new rows, none
        removed), in pieces of at most ``segment_size`` rows, consecutive
        in id order, their tombstone records kept (none removed).  No
        attribute of the estimator changes."""
        g_codes, g_ids, g_lists = (self.growing_codes_, self.growing_ids_,
                                   self.growing_lists_)
        id_dtype = g_ids.dtype if id_dtype is None else id_dtype
        n_total = self.n_samples_fit_ if n_total is None else n_total
        if self.removed_ is not None and g_ids.shape[0]:
            keep = ~self.removed_[g_ids]
            if not keep.all():
                g_codes, g_ids, g_lists = g_codes[keep], g_ids[keep], g_lists[keep]
        if extra is not None and g_codes.shape[0]:
            g_codes = np.concatenate([g_codes, extra[0]])
            g_ids = np.concatenate([g_ids.astype(id_dtype, copy=False), extra[1]])
            g_lists = np.concatenate([g_lists, extra[2]])
        elif extra is not None:  # no growing part: the new rows alone, uncopied
            g_codes, g_ids, g_lists = extra
        g_ids = g_ids.astype(id_dtype, copy=False)
        lo = self.segments_[-1].meta["hi"] if self.segments_ else 0
        out = []
        for sl in _lists.id_slices(g_ids, self._segment_size()):
            hi = int(g_ids[sl.stop]) if sl.stop < g_ids.shape[0] else n_total
            out.append(_lists.sealed(g_codes[sl], g_ids[sl], g_lists[sl], self.n_lists_,
                                     lo, hi, self._packs()))
            self._note_segment(out[-1])
            lo = hi
        return tuple(out)

    def _merge_tail(self, segments):
        """``segments`` after the merge policy (``_lists.merge_tail``)."""
        segments, made = _lists.merge_tail(segments, self.removed_, *self._merge_params())
        for seg in made:
            self._note_segment(seg)
        return segments

    def _n_stored(self):
        return (sum(s["ids"].shape[0] for s in self.segments_)
                + self.growing_codes_.shape[0])

    def _n_dead(self):
        """Removed entries still stored (tombstones not yet merged away)."""
        return self._n_stored() - self._n_live * self._copies()

    @property
    def _spill_lambda(self):
        return self.__dict__.get("spill_lambda_")  # None: fitted without, or before it

    def _copies(self):
        return _lists.copies(self._spill_lambda, self.n_lists_)

    # -- inspection: the sealed entries as one sorted index ------------------
    def _assembled(self):
        segs = self.segments_
        cached = runtime(self).assembled
        if cached is not None and cached[0] is segs:
            return cached[1]
        if len(segs) == 1:
            parts = (_lists.segment_codes(segs[0], self._m()), segs[0]["ids"],
                     segs[0]["list_offsets"])
        elif not segs:
            m = self.codebooks_.shape[0]
            parts = (self.growing_codes_[:0].reshape(0, m), self.growing_ids_[:0],
                     np.zeros(self.n_lists_ + 1, np.int64))
        else:
            one = _lists.merged(segs, None, self.n_lists_, self._m())
            parts = (one["codes"], one["ids"], one["list_offsets"])
        runtime(self).assembled = (segs, parts)
        return parts

    @property
    def codes_(self):
        """Residual codes of the sealed segments as one index sorted by list
        (read-only; a copy assembled from ``segments_`` when there are
        several): (n_sealed, n_subspaces), uint8 or uint16."""
        return self._assembled()[0]

    @property
    def ids_(self):
        """Ids of ``codes_``'s rows: (n_sealed,), int32 or int64."""
        return self._assembled()[1]

    @property
    def list_offsets_(self):
        """List l holds rows ``list_offsets_[l]:list_offsets_[l + 1]`` of
        ``codes_`` (and the growing entries labelled l): (n_lists + 1,) int64."""
        return self._assembled()[2]

    _legacy_attributes = ("codes_", "ids_", "list_offsets_")

    # -- loading -------------------------------------------------------------
    def _check_codes(self, m, k):
        pass  # each segment's codes: _lists.check_segments

    def _check_loaded_state(self):
        """Loaded-index invariants (see ``BasePQNeighbors``), and the list
        terms, which are derived state, recomputed rather than read."""
        legacy = [a for a in self._legacy_attributes if a in self.__dict__]
        if legacy:  # format 1 or 2: one sorted part, becomes one segment
            require(len(legacy) == 3 and "segments_" not in self.__dict__,
                    "an index holds either segments_ or codes_, ids_ and list_offsets_")
            codes, ids, off = (self.__dict__.pop(a) for a in self._legacy_attributes)
            self.segments_ = (Segment({"codes": codes, "ids": ids, "list_offsets": off},
                                      {"lo": 0, "hi": int(self.n_samples_fit_)}),)
        super()._check_loaded_state()
        cb, dtype, d = self.codebooks_, self._fit_dtype_, self.n_features_in_
        m, k, _ = cb.shape
        bound = range_bound(d, dtype)
        L = check_scalar_int(self.n_lists_, "n_lists_", 1, 2**31)
        check_float_array(self.cluster_centers_, "cluster_centers_", (L, d), dtype, bound)
        # Residuals of vectors and centroids both within ``bound``.
        check_float_array(cb, "codebooks_", cb.shape, dtype, 2 * bound)
        _lists.check_segments(self.segments_, m, k, L, self.n_samples_fit_)
        if self._ip_tables:
            self._list_terms = np.empty((0, m, k), dtype=dtype)
        else:
            self._list_terms = _partition.list_terms(self.cluster_centers_, cb)
        # Every live id stored exactly once, segments and growing part
        # together (removed ones may stay as tombstones until compacted).
        self._check_growing_state()

    def _check_growing_state(self):
        """Invariants of the growing part and the tombstones, after ``load``."""
        if not hasattr(self, "growing_codes_"):  # saved before appends grew in place
            self.__dict__.update(_lists.empty_growing(
                self.codebooks_.shape[0], _quantizer.code_dtype(self.codebooks_.shape[1]),
                self.segments_[0]["ids"].dtype) if self.segments_ else {})
        g = self.growing_codes_.shape[0] if self.growing_codes_.ndim == 2 else -1
        m, k = self.codebooks_.shape[:2]
        n = self.n_samples_fit_
        id_dtype = np.dtype(np.int32 if n < 2**31 else np.int64)
        require(self.growing_codes_.dtype == _quantizer.code_dtype(k),
                f"growing_codes_ must be {_quantizer.code_dtype(k)}")
        check_int_array(self.growing_codes_, "growing_codes_", (g, m), 0, k)
        require(self.growing_ids_.dtype == id_dtype, f"growing_ids_ must be {id_dtype}")
        lo = self.segments_[-1].meta["hi"] if self.segments_ else 0
        check_int_array(self.growing_ids_, "growing_ids_", (g,), lo, max(lo + 1, n))
        require(self.growing_lists_.dtype == np.int32, "growing_lists_ must be int32")
        check_int_array(self.growing_lists_, "growing_lists_", (g,), 0, self.n_lists_)
        # Each id stored once (twice, in two lists, with spilling), every
        # live one (the kernel would return duplicates, or miss rows, else).
        require(self._spill_lambda is None or (type(self._spill_lambda) is float and
                                               0 <= self._spill_lambda < np.inf),
                "spill_lambda_ must be None or a finite float >= 0")
        _lists.check_stored_ids(self.segments_, self.growing_ids_, self.growing_lists_,
                                self.removed_, n, self.n_removed_, self._copies(),
                                self.n_lists_)

    # -- removal and compaction (the policy: SegmentWritesMixin) --------------
    def _segment_span(self, seg):
        meta = seg.meta
        return meta["lo"], meta["hi"]

    def _compacted_segment(self, seg):
        return _lists.compacted(seg, self.removed_, self._m(), self._packs()), {}

    def _growing_dead(self):
        if self.removed_ is None or not self.growing_ids_.shape[0]:
            return 0
        return int(np.count_nonzero(self.removed_[self.growing_ids_]))

    def _growing_past_share(self):
        g = self.growing_ids_.shape[0]
        return bool(g) and self._growing_dead() > COMPACT_SHARE * g

    def _compact_growing(self):
        """Seal the growing part (removed entries dropped) into a segment,
        then apply the merge policy; built under the read lock, swapped
        under the write lock.  The caller holds the writer mutex."""
        if not self.growing_codes_.shape[0]:
            return
        with index_lock(self).read():
            sealed = self._sealed_growing()
            segments = self._merge_tail(self.segments_ + sealed)
            empty = _lists.empty_growing(self.growing_codes_.shape[1],
                                         self.growing_codes_.dtype, self.growing_ids_.dtype)
        with index_lock(self).write():
            for name in ("growing_codes", "growing_ids", "growing_lists"):
                _growable.discard(self, name)
            self.__dict__.update(empty, segments_=tuple(
                s for s in segments if s["ids"].shape[0]))

    def compact(self):
        """Drop the removed entries and seal the growing part, one segment
        at a time.

        Never needed for correct answers; it frees the memory of removed
        entries and spares queries the growing part.  Each segment that
        holds removed entries is rewritten (O(its size)) while queries go
        on; only the switch to the new segment waits for running queries.
        ``remove`` does this by itself for a segment once more than
        ``COMPACT_SHARE`` (1/2) of its entries are removed.

        Returns
        -------
        self : IVFPQNeighbors
        """
        return self._compact_all()

    # -- data drift (see RefitMixin.refit_codebooks) --------------------------
    def _refit_training_rows(self, sample):
        # The codebooks quantize residuals: train on the sample's.
        centroids = self.cluster_centers_
        return sample - centroids[_partition.assign(sample, centroids)]

    def _refit_state(self, codebooks, recode, progress):
        centroids = self.cluster_centers_
        segments = []
        for i, seg in enumerate(self.segments_):
            lists = _lists.segment_lists(seg, self.n_lists_)
            codes = recode(seg["ids"], lambda rows, lists=lists: centroids[lists[rows]])
            segments.append(_lists.list_segment(codes, seg["ids"], seg["list_offsets"],
                                                seg.meta, _lists.packs(*codebooks.shape[:2])))
            self._note_recoded(seg, segments[-1])
            progress(f"re-encoded segment {i + 1} of {len(self.segments_)}")
        g_lists = self.growing_lists_
        growing = recode(self.growing_ids_, lambda rows: centroids[g_lists[rows]])
        terms = (np.empty((0,) + codebooks.shape[:2], dtype=codebooks.dtype)
                 if self._ip_tables else _partition.list_terms(centroids, codebooks))
        return {"segments_": tuple(segments), "growing_codes_": growing,
                "_list_terms": terms}, ("growing_codes",)

    def _m(self):
        return self.codebooks_.shape[0]

    def _packs(self):
        return _lists.packs(*self.codebooks_.shape[:2])

    def _n_probe(self):
        if self.n_probe == "auto":
            return auto_n_probe(self.n_lists_)
        if self.n_probe > self.n_lists_:
            warnings.warn(
                f"n_probe={self.n_probe} is larger than n_lists={self.n_lists_}; "
                f"scanning all {self.n_lists_} lists.",
                UserWarning,
            )
            return self.n_lists_
        return self.n_probe

    def _radius_caps(self, Q):
        """Entries in the ``n_probe`` lists nearest each row of Q (removed
        ones included): what ``radius_neighbors`` may visit per query."""
        sizes = np.bincount(self.growing_lists_, minlength=self.n_lists_).astype(np.int64)
        for s in self.segments_:
            sizes += np.diff(s["list_offsets"])
        n_probe = min(self._n_probe(), self.n_lists_)
        caps = np.empty(Q.shape[0], dtype=np.int64)
        for sl in chunk_slices(Q.shape[0], _partition.chunk_rows(self.n_lists_)):
            coarse = _partition.coarse_terms(Q[sl], self.cluster_centers_,
                                             self._inner_product)
            probed = np.argpartition(coarse, n_probe - 1, axis=1)[:, :n_probe]
            caps[sl] = sizes[probed].sum(axis=1)
        return caps

    @property
    def _ip_tables(self):
        """Whether the lists are scored with inner-product tables: for
        "dot", and for "cosine" with score-aware codes (the anisotropic loss
        bounds the error of the inner product, which on unit vectors ranks
        as cosine does; one table per query then serves every list).  The
        lists are probed by ``||q - c||`` for every metric but "dot"."""
        return self.effective_metric_ == "dot" or (
            self.effective_metric_ == "cosine"
            and self.__dict__.get("anisotropic_threshold_") is not None)

    def _search(self, Q, n_candidates, n_threads, ranking_only=False, blocked=None):
        ip = self._ip_tables
        l2_probes = ip and not self._inner_product
        n_probe = self._n_probe()
        dist = np.empty((Q.shape[0], n_candidates), dtype=self._fit_dtype_)
        ind = np.empty((Q.shape[0], n_candidates), dtype=np.int64)
        growing = (self.growing_codes_, self.growing_ids_, self.growing_lists_)
        segments = [(s["packed"], s["ids"], s["list_offsets"], s["list_blocks"])
                    if _lists.is_packed(s) else (s["codes"], s["ids"], s["list_offsets"])
                    for s in self.segments_]
        deleted = self.removed_.view(np.uint8) if self._n_dead() else None
        c_norms = _partition.centroid_norms(runtime(self), self.cluster_centers_)
        # Chunks bound the (rows, n_lists) coarse table.
        step = _partition.chunk_rows(self.n_lists_)
        for sl in chunk_slices(Q.shape[0], step):
            stride = 0
            if blocked is not None:  # filtered: removed or not allowed, by id
                part = blocked.take(sl)
                deleted, stride = part.mask, part.stride
            if l2_probes:
                coarse, bias = _partition.coarse_terms_l2_ip(Q[sl], self.cluster_centers_,
                                                             c_norms)
            else:
                coarse = _partition.coarse_terms(Q[sl], self.cluster_centers_, ip, c_norms)
                bias = None
            dist[sl], ind[sl] = _scorers.ivf_search(
                Q[sl], coarse, self.codebooks_, self._list_terms, segments,
                n_candidates, n_probe, ip, n_threads, centroids=self.cluster_centers_,
                growing=growing, deleted=deleted,
                fastscan_margin=_scorers.FASTSCAN_MARGIN,
                # Where the margin covers the worst-case rounding (m <= 2) the
                # re-checked scan is exact at no extra cost; elsewhere it is
                # approximate anyway and the estimates are cheaper.
                fastscan_estimate=0.5 * self._m() + 1 > _scorers.FASTSCAN_MARGIN,
                fastscan_rescore=not ranking_only, deleted_stride=stride,
                coarse_bias=bias, copies=self._copies(),
            )
        if l2_probes:
            # -<q, x_hat> on unit vectors as the squared L2 distance the
            # cosine metric reports (halved by _finish_distances):
            # 2 - 2 <q, x_hat>.
            dist *= 2
            dist += 2
        return dist, ind

    def _decode_parts(self):
        return ([_lists.decode_part(s, self) for s in self.segments_]
                + [_lists.decode_part(None, self)])

    def _memory_parts(self):
        return (
            {"codes": sum(s["packed" if _lists.is_packed(s) else "codes"].nbytes
                          for s in self.segments_)
             + self.growing_codes_.nbytes,
             "ids": sum(s["ids"].nbytes for s in self.segments_) + self.growing_ids_.nbytes,
             "lists": self.growing_lists_.nbytes},
            {"list_offsets": sum(s["list_offsets"].nbytes
                                 + (s["list_blocks"].nbytes if _lists.is_packed(s) else 0)
                                 for s in self.segments_),
             "centroids": self.cluster_centers_.nbytes,
             "codebooks": self.codebooks_.nbytes,
             "list_terms": self._list_terms.nbytes},
        )

    def _reserved_bytes(self):
        return super()._reserved_bytes() + sum(
            _growable.spare_bytes(self, name, getattr(self, name + "_"))
            for name in ("growing_codes", "growing_ids", "growing_lists"))
