"""IVFPQNeighbors: inverted file over residual product-quantization codes."""

import warnings
from numbers import Integral

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from sklearn.utils.validation import check_is_fitted

from . import _growable, _quantizer
from ._base import BasePQNeighbors, PQParamsMixin, RemovalMixin
from ._persist import IndexIOMixin, check_int_array, require
from ._store import chunk_slices
from ._utils import effective_n_threads, index_lock, release_memory

# Seed article, step 8: the coarse quantizer wants ~256 training points per
# cell; below ~39 per cell k-means is poorly determined.
POINTS_PER_LIST = 256
MIN_POINTS_PER_LIST = 39

# Appended rows go to a growing part that every query scans (the entries
# of the probed lists are picked out of it in one pass over its labels).
# It is merged into the sorted lists once it holds more than GROWING_SHARE
# of the stored entries and more than GROWING_MIN of them: a merge costs
# one pass over the index and happens every ~GROWING_SHARE * n rows, so an
# append costs O(rows) amortized, and a query scans at most ~1/64 of the
# index more than it would with every list sorted.
GROWING_SHARE = 1 / 64
GROWING_MIN = 1024
# Removed entries stay in their lists as tombstones (skipped by the search)
# until a merge drops them; ``remove`` merges once they exceed this share
# of the stored entries.
DEAD_SHARE = 0.5


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
    seconds and the same two-stage schedule runs streamed: random centres,
    Lloyd passes over ``64 * n_lists`` of the training rows, then the last
    ``ceil(coarse_max_iter / 4)`` over all of them, each pass reading its
    rows from X in tasks of 16,384, ``n_jobs`` tasks side by side (the
    centroids still do not depend on ``n_jobs``).  Vectors are
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
    ``n_train * n_lists <= 2**28`` (at most 262,144 rows) and none beyond
    (streamed: per thread a task of 16,384 rows and an (n_lists, D) float64
    sum); the residual codebooks ``256 * k`` rows.  Example: 4,000,000 x 96
    float32 in a memmap, cosine, ``n_lists=4096``, m=12, k=256: index
    61 MiB + 48 MiB of list terms; ``fit`` added at most 304 MiB of
    anonymous memory (``benchmarks/results/scale_4m.md``).  With
    ``refine_factor > 0``, a C-contiguous memmap of the fitted dtype is
    kept by reference in ``vectors_`` (nothing copied, re-ranking reads
    ``refine_factor * n_neighbors`` rows per query from the file); other
    input is copied into memory.

    ``partial_fit`` costs O(rows added), amortized, whatever the index
    size: new entries go to a growing part (arrays with spare capacity,
    appended in place) that queries scan along with the sorted lists, into
    the same top-k heap, so the answers are those of one index holding
    every entry sorted by list.  The growing part is merged into the
    sorted lists (one pass over the index) when it exceeds 1/64 of the
    stored entries.  ``remove`` marks ids as tombstones, O(ids removed):
    queries skip them at no cost unless they would have been returned;
    merges drop them, and ``remove`` merges when they exceed half the
    stored entries (or call :meth:`compact`).

    Attributes
    ----------
    cluster_centers_ : ndarray of shape (n_lists, n_features)
        Coarse centroids.
    codebooks_ : ndarray of shape (n_subspaces, n_codewords, ds)
        Residual codebooks.
    codes_ : ndarray of shape (n_sorted, n_subspaces), uint8 or uint16
        Residual codes of the sorted part, list after list.
    ids_ : ndarray of shape (n_sorted,), int32 or int64
        Id (row number at fit / partial_fit) of each code; int32 while the
        index holds fewer than 2**31 vectors.
    list_offsets_ : ndarray of shape (n_lists + 1,), int64
        List l holds ``codes_[list_offsets_[l]:list_offsets_[l + 1]]``
        and the growing entries labelled l.
    growing_codes_ : ndarray of shape (n_growing, n_subspaces)
        Residual codes of the rows appended since the last merge, in
        arrival order (the growing part; see Notes).
    growing_ids_ : ndarray of shape (n_growing,), dtype of ``ids_``
    growing_lists_ : ndarray of shape (n_growing,), int32
        The list each growing entry belongs to.
    n_lists_ : int
    effective_metric_ : str
        The metric the index was built with (``metric`` at the last fit);
        the kernels use it.  Changing ``metric`` afterwards makes queries
        and ``partial_fit`` raise until the next fit.
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
        self.__dict__.update(self._empty_growing())
        self._add_rows(X, n_threads, progress, merge=True)

    def _empty_growing(self):
        # Fresh arrays, never views of a buffer: the next append allocates.
        return {"growing_codes_": self.codes_[:0].copy(),
                "growing_ids_": self.ids_[:0].copy(),
                "growing_lists_": np.empty(0, dtype=np.int32)}

    def _add_rows(self, X, n_threads, progress, merge=False):
        # Everything is computed before the attributes are replaced (one
        # dict update), so an error leaves the index as it was: rows are
        # written past the published growing part only.
        first_id = self.n_samples_fit_  # ids continue, removed ones included
        b = X.shape[0]
        # X (a FitRows) is read once, chunk by chunk.
        labels, codes = _quantizer.assign_encode(X, self.cluster_centers_, self.codebooks_,
                                                 n_threads)
        n_total = first_id + b
        id_dtype = np.dtype(np.int32 if n_total < 2**31 else np.int64)
        new_ids = np.arange(first_id, n_total, dtype=id_dtype)
        g = self.growing_codes_.shape[0] + b
        if merge or g > max(GROWING_MIN, GROWING_SHARE * (self.codes_.shape[0] + g)):
            state = self._merged_state((codes, new_ids, labels), id_dtype)
            progress(f"indexed {b} vectors; {g} appended rows merged into the "
                     f"{self.n_lists_} sorted lists")
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
            if self.ids_.dtype != id_dtype:
                state["ids_"] = self.ids_.astype(id_dtype)
            progress(f"indexed {b} vectors ({g} in the growing part)")
        state["vectors_"] = self._grown_vectors(X)
        state.update(self._size_state(n_total))
        self.__dict__.update(state)

    def _appended(self, name, current, rows):
        view = _growable.grow(self, name, current, rows.shape[0])
        view[current.shape[0]:] = rows
        return view

    def _merged_state(self, extra=None, id_dtype=None):
        """Attributes of the index with the growing part (and ``extra``:
        (codes, ids, lists) of new rows) merged into the sorted lists, and
        removed entries dropped.  One pass over the index; within a list,
        the sorted entries keep their order and the growing ones follow in
        arrival order (ids ascending, as one fit would store them)."""
        L = self.n_lists_
        id_dtype = self.ids_.dtype if id_dtype is None else id_dtype
        codes, ids = self.codes_, self.ids_
        old_counts = np.diff(self.list_offsets_)
        g_codes, g_ids, g_lists = (self.growing_codes_, self.growing_ids_,
                                   self.growing_lists_)
        if self._n_dead():
            removed = self.removed_
            keep = ~removed[ids]
            if not keep.all():
                old_lists = np.repeat(np.arange(L), old_counts)
                old_counts = np.bincount(old_lists[keep], minlength=L)
                codes, ids = codes[keep], ids[keep]
            keep = ~removed[g_ids]
            if not keep.all():
                g_codes, g_ids, g_lists = g_codes[keep], g_ids[keep], g_lists[keep]
        if extra is not None and g_codes.shape[0]:  # new rows, none of them removed
            g_codes = np.concatenate([g_codes, extra[0]])
            g_ids = np.concatenate([g_ids.astype(id_dtype, copy=False), extra[1]])
            g_lists = np.concatenate([g_lists, extra[2]])
        elif extra is not None:  # no growing part: the new rows alone, uncopied
            g_codes, g_ids, g_lists = extra[0], extra[1].astype(id_dtype, copy=False), extra[2]
        g_counts = np.bincount(g_lists, minlength=L)
        offsets = np.zeros(L + 1, dtype=np.int64)
        np.cumsum(old_counts + g_counts, out=offsets[1:])
        g_start = np.zeros(L, dtype=np.int64)  # first growing entry of list l, by list
        np.cumsum(g_counts[:-1], out=g_start[1:])
        # Old entries move down by the growing entries of the lists before
        # theirs (offsets[l] = old start of l + g_start[l]); growing entries
        # go after the old entries of their list.
        order = np.argsort(g_lists, kind="stable")
        if codes.shape[0] == 0:
            # Nothing sorted yet (fit, or every sorted entry removed): the
            # lists are the growing entries in list order.  No scatter: a
            # fit of n rows holds n codes twice, not four times.
            state = {"codes_": g_codes[order], "ids_": g_ids[order].astype(id_dtype,
                                                                         copy=False),
                     "list_offsets_": offsets}
            del order
            for name in ("growing_codes", "growing_ids", "growing_lists"):
                _growable.discard(self, name)
            state.update({"growing_codes_": state["codes_"][:0].copy(),
                          "growing_ids_": state["ids_"][:0].copy(),
                          "growing_lists_": np.empty(0, dtype=np.int32)})
            return state
        dest_old = np.arange(codes.shape[0]) + np.repeat(g_start, old_counts)
        lab = g_lists[order]
        dest_g = (offsets[:-1][lab] + old_counts[lab]
                  + np.arange(lab.shape[0]) - g_start[lab])
        new_codes = np.empty((offsets[-1], codes.shape[1]), dtype=codes.dtype)
        new_ids = np.empty(offsets[-1], dtype=id_dtype)
        new_codes[dest_old] = codes
        new_ids[dest_old] = ids  # (cast to id_dtype)
        new_codes[dest_g] = g_codes[order]
        new_ids[dest_g] = g_ids[order]
        for name in ("growing_codes", "growing_ids", "growing_lists"):
            _growable.discard(self, name)
        state = {"codes_": new_codes, "ids_": new_ids, "list_offsets_": offsets}
        state.update({"growing_codes_": new_codes[:0].copy(),
                      "growing_ids_": new_ids[:0].copy(),
                      "growing_lists_": np.empty(0, dtype=np.int32)})
        return state

    def _n_stored(self):
        return self.codes_.shape[0] + self.growing_codes_.shape[0]

    def _n_dead(self):
        """Removed entries still stored (tombstones not yet merged away)."""
        return self._n_stored() - self._n_live

    def _check_loaded_state(self):
        """Loaded-index invariants (see ``BasePQNeighbors``), and the list
        terms, which are derived state, recomputed rather than read."""
        from ._persist import check_float_array, check_scalar_int
        from ._utils import range_bound

        super()._check_loaded_state()
        cb, dtype, d = self.codebooks_, self._fit_dtype_, self.n_features_in_
        m, k, _ = cb.shape
        bound = range_bound(d, dtype)
        L = check_scalar_int(self.n_lists_, "n_lists_", 1, 2**31)
        check_float_array(self.cluster_centers_, "cluster_centers_", (L, d), dtype, bound)
        # Residuals of vectors and centroids both within ``bound``.
        check_float_array(cb, "codebooks_", cb.shape, dtype, 2 * bound)
        n, n_codes = self.n_samples_fit_, self.codes_.shape[0]
        off = self.list_offsets_
        check_int_array(off, "list_offsets_", (L + 1,), 0, n_codes + 1, dtype=np.int64)
        require(off[0] == 0 and off[-1] == n_codes and bool(np.all(off[1:] >= off[:-1])),
                "list_offsets_ must rise from 0 to the number of codes")
        check_int_array(self.ids_, "ids_", (n_codes,), 0, max(1, n),
                        dtype=np.int32 if n < 2**31 else np.int64)
        if self.effective_metric_ == "dot":
            self._list_terms = np.empty((0, m, k), dtype=dtype)
        else:
            self._list_terms = _quantizer.list_terms(self.cluster_centers_, cb)
        # Every live id stored exactly once, sorted part and growing part
        # together (removed ones may stay as tombstones until a merge).
        self._check_growing_state()

    def _check_growing_state(self):
        """Invariants of the growing part and the tombstones, after ``load``."""
        if not hasattr(self, "growing_codes_"):  # saved before appends grew in place
            self.__dict__.update(self._empty_growing())
        g = self.growing_codes_.shape[0] if self.growing_codes_.ndim == 2 else -1
        m, k = self.codebooks_.shape[:2]
        require(self.growing_codes_.dtype == self.codes_.dtype,
                f"growing_codes_ must be {self.codes_.dtype}")
        check_int_array(self.growing_codes_, "growing_codes_", (g, m), 0, k)
        require(self.growing_ids_.dtype == self.ids_.dtype,
                "growing_ids_ and ids_ differ in dtype")
        check_int_array(self.growing_ids_, "growing_ids_", (g,), 0,
                        max(1, self.n_samples_fit_))
        require(self.growing_lists_.dtype == np.int32, "growing_lists_ must be int32")
        check_int_array(self.growing_lists_, "growing_lists_", (g,), 0, self.n_lists_)
        # Each id is stored at most once, and every live id is stored (the
        # kernel would return duplicates, or miss rows, otherwise).  Sizes
        # are compared first: nothing is allocated per claimed id.
        n = self.n_samples_fit_
        n_stored = self.ids_.shape[0] + g
        require(n_stored + self.n_removed_ >= n, "fewer ids are stored than are live")
        stored = np.concatenate([self.ids_, self.growing_ids_])  # in [0, n): checked
        stored.sort()
        require(n_stored < 2 or bool(np.all(stored[1:] != stored[:-1])),
                "an id is stored twice")
        live_stored = (n_stored if self.removed_ is None
                       else n_stored - int(np.count_nonzero(self.removed_[stored])))
        require(live_stored == n - self.n_removed_, "a live id is not stored")

    def _remove_rows(self, ids, removed):
        # Tombstones: ``removed_`` (already updated) is read by the search;
        # the entries stay in their lists until a merge drops them.
        if self._n_dead() > DEAD_SHARE * self._n_stored():
            self.__dict__.update(self._merged_state())

    def compact(self):
        """Merge the growing part into the sorted lists and drop the removed
        entries.

        Never needed for correct answers; it frees the memory of removed
        entries and spares queries the growing part.  Costs one pass over
        the index (``remove`` does it by itself once half of the stored
        entries are removed).

        Returns
        -------
        self : IVFPQNeighbors
        """
        check_is_fitted(self)
        with index_lock(self).write():
            if self.growing_codes_.shape[0] or self._n_dead():
                self.__dict__.update(self._merged_state())
        return self

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
        growing = (self.growing_codes_, self.growing_ids_, self.growing_lists_)
        deleted = self.removed_.view(np.uint8) if self._n_dead() else None
        # Chunks bound the (rows, n_lists) coarse table.
        step = _quantizer.chunk_rows(self.n_lists_)
        for sl in chunk_slices(Q.shape[0], step):
            coarse = _quantizer.coarse_terms(Q[sl], self.cluster_centers_, ip)
            dist[sl], ind[sl] = _quantizer.ivf_search(
                Q[sl], coarse, self.codebooks_, self._list_terms, self.codes_, self.ids_,
                self.list_offsets_, n_candidates, n_probe, ip, n_threads,
                growing=growing, deleted=deleted,
            )
        return dist, ind

    def _reconstruct(self):
        lists = np.concatenate([np.repeat(np.arange(self.n_lists_),
                                          np.diff(self.list_offsets_)),
                                self.growing_lists_])
        ids = np.concatenate([self.ids_, self.growing_ids_])
        codes = np.concatenate([self.codes_, self.growing_codes_])
        X_hat = np.zeros((self.n_samples_fit_, self.n_features_in_), dtype=self._fit_dtype_)
        X_hat[ids] = self.cluster_centers_[lists] + _quantizer.decode(codes, self.codebooks_)
        return X_hat

    def _memory_parts(self):
        return (
            {"codes": self.codes_.nbytes + self.growing_codes_.nbytes,
             "ids": self.ids_.nbytes + self.growing_ids_.nbytes,
             "lists": self.growing_lists_.nbytes},
            {"list_offsets": self.list_offsets_.nbytes,
             "centroids": self.cluster_centers_.nbytes,
             "codebooks": self.codebooks_.nbytes,
             "list_terms": self._list_terms.nbytes},
        )

    def _reserved_bytes(self):
        return super()._reserved_bytes() + sum(
            _growable.spare_bytes(self, name, getattr(self, name + "_"))
            for name in ("growing_codes", "growing_ids", "growing_lists"))
