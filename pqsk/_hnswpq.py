"""HNSWPQNeighbors: a hierarchical navigable small-world graph over PQ codes."""

import copy
from numbers import Integral

import warnings

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions

from . import _graph, _growable, _quantizer, _scorers
from ._graph import (GRAPH_ATTRS, MAX_LINKS, SEARCH_ATTRS, SEGMENT_ARRAYS, BufferOwner,
                     empty_graph, level0_parents, segment_graph, trimmed)
from ._segments import (DEFAULT_SEGMENT_SIZE, NO_ID, NO_TOMBSTONES,
                        SEGMENT_PARAMETER_CONSTRAINTS, Segment, SegmentWritesMixin,
                        positions)
from ._store import FitRows
from ._tierwalk import WALKS, TierWalk
from ._base import BasePQNeighbors
from ._checks import check_float_array, check_n_neighbors, require
from ._merges import GraphAppendsMixin
from ._persist import IndexIOMixin
from ._runtime import index_lock, runtime
from ._training import PQParamsMixin, RefitMixin
from ._utils import Progress, effective_n_threads

# Filtered search: a query whose filter allows fewer than
# max(FILTER_SCAN_MIN, FILTER_SCAN_FRACTION * live points) ids scans those
# ids (ADC over their codes, then re-ranking) instead of walking the graph.
# A beam that must collect ef allowed nodes visits about ef / s nodes at
# selectivity s, while the scan reads s * n codes: they cost the same near
# s = sqrt(ef / n), 1.8 % for ef = 64 and n = 200,000.
FILTER_SCAN_FRACTION = 0.02
FILTER_SCAN_MIN = 256


class HNSWPQNeighbors(IndexIOMixin, RefitMixin, GraphAppendsMixin, SegmentWritesMixin,
                      PQParamsMixin, BasePQNeighbors):
    """Approximate nearest neighbours on an HNSW graph over PQ codes.

    Vectors are stored as PQ codes and linked in a hierarchical navigable
    small-world graph (Malkov and Yashunin, IEEE TPAMI 2018): each node
    gets a random level (P(level >= l) = n_links**-l), is linked on every
    level up to its own to its nearest neighbours chosen by the HNSW
    heuristic (keep a candidate only if it is closer to the new node than
    to every neighbour already kept), ``n_links`` per node on the upper
    levels and ``2 * n_links`` on level 0, with back-links pruned by the
    same heuristic.  A query descends greedily from the top level's entry
    point, then runs a best-first search of width ``ef_search`` on level 0,
    all distances being ADC lookups (tables + additions) on the codes.

    Parameters
    ----------
    n_neighbors : int, default=5
    n_links : int, default=16
        M, links per node on the upper levels (2 * M on level 0); between 2
        and 2048.  The links cost about ``8 * M + 16`` bytes per vector
        (int32 level-0 and upper links, levels, ids): 144 by default, to
        which the codes (``ceil(n_features / 2)`` bytes by default) and,
        with ``refine_factor > 0`` (the default), the raw vectors
        (``4 * n_features``) add.  M=8 saves 64 bytes per vector; on 64-d
        uniform data it lowers recall@10 at the defaults from 0.90 to 0.71
        (``benchmarks/results/defaults.md``).
    ef_construction : int, default=200
        Beam width while inserting nodes: larger builds a better graph,
        more slowly.
    ef_search : int, default=64
        Beam width at query time; can be changed after fit with
        ``set_params``.  It is raised to the number of candidates needed
        (``n_neighbors``, or ``refine_factor * n_neighbors``) when smaller,
        and lowered to the number of nodes of the graph searched when larger.
        Each graph (every sealed segment and the growing one) is searched
        with this width.
    segment_size : int, default=4_194_304
        The most nodes a graph holds before it is sealed into an immutable
        segment (at least 1024; see Notes).  Not structural: changing it
        after fit only changes when the next segments are sealed.
    n_subspaces, n_codewords, init, max_iter, n_init, tol, max_train_samples, codebooks, rotation
        Product quantizer parameters, as in :class:`PQTransformer`.
    metric : {"euclidean", "sqeuclidean", "cosine", "dot", "l2", "minkowski"}, \
            default="euclidean"
        ``"l2"``, and ``"minkowski"`` with ``p=2``, are ``"euclidean"``
        (``effective_metric_``).
        As in :class:`PQNeighbors`.
    refine_factor : int, default=10
        If positive, the raw vectors are kept and up to
        ``max(refine_factor * n_neighbors, ef_search)`` ADC candidates of
        the beam are re-ranked by exact distance.  The default costs
        ``4 * n_features`` bytes per vector (none for a memmap, kept by
        reference); recall@10 at the defaults with and without it is in
        ``benchmarks/results/defaults.md``.  0 keeps only the codes and
        the graph.
    refine_dtype : {"float32", "float16", "int8"}, default="float32"
        What re-ranking reads: the raw vectors (``vectors_``), or a compact
        tier of the prepared rows (``refine_rows_``, 2 or 1 bytes per
        feature; the raw vectors are then not kept): see :class:`PQNeighbors`.
    walk : {"auto", "codes", "tier"}, default="auto"
        What scores the nodes a search visits: ``"codes"`` their ADC
        distances (tables + additions on the PQ codes), ``"tier"`` their
        rows of the compact re-ranking tier (``refine_rows_``, decoded in
        the kernel: the distance re-ranking gives, nearly exact, so the beam
        follows the true neighbours; ``walk="tier"`` raises ValueError at
        search without a tier), ``"auto"`` the tier when the index has one.
        A search parameter (may change after fit).  Whatever it is, appends
        to an index with a tier and no ``rotation`` decode the old nodes they
        meet from their tier rows, not their codes (see Notes).  Figures:
        ``benchmarks/results/hnsw_tier.md``.
    mode : {"distance", "connectivity"}, default="distance"
    n_jobs : int, default=None
        Threads for training, encoding and search (parallel over queries).
        The graph is always built on one thread, so it is deterministic
        for a given ``random_state``.
    anisotropic_threshold : float > 0 or None, default=None
        Score-aware (anisotropic) quantization, as in :class:`PQTransformer`:
        None is the k-means loss; a float T (0.2 for unit-norm data, the
        ScaNN default) weights the error parallel to each vector by
        ``eta = (d - 1) s / (1 - s)``, ``s = (T / ||x||)^2``, over the
        orthogonal error, in training and in every encoding (``fit``,
        ``partial_fit``, ``refit_codebooks``).  Only for
        ``metric="dot"`` or ``"cosine"`` (fit raises ValueError for L2
        metrics).  Structural: the value used is ``anisotropic_threshold_``,
        and ``partial_fit`` raises if the parameter changed since fit.
    random_state : int, RandomState instance or None, default=None
        Seeds the quantizer training and the node levels.
    verbose : int, default=0
        Progress on stderr: 1 shows the stages and progress bars for
        training, encoding and the graph build, 2 also a line per
        sub-space.
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
    The graph is built with exact float32 distances between the vectors
    (the vectors are dropped afterwards unless ``refine_factor > 0``), so
    its links follow the true geometry rather than the quantization
    noise.  Internally all graph work is float32; distances are returned
    in the fitted dtype.

    ``partial_fit`` inserts the new rows into the existing graph, in
    place, at a cost that depends on the rows added, not on the index
    size: the graph arrays grow with spare capacity (``memory_usage_``
    reports it as ``"reserved"``), and distances to old nodes use their
    decoded PQ codes, decoded on the fly where the insertion goes (no
    vector of the old nodes is kept or copied, also when the raw vectors
    are kept for re-ranking; new rows are linked by their raw vectors; with
    a compact tier and no rotation, old nodes are decoded from their tier rows).
    Old nodes gain back-links, so arrays read before a ``partial_fit``
    (``links0_``...) may change with it.  Reachability from the entry
    point is checked locally after an append (the new nodes, and the nodes
    whose link from their ``level0_parent_`` was dropped, get a parent
    again), and by a full linear pass
    at fit, at ``compact``, and when the entry point changes.  Appends
    keep 12 bytes per node of build scratch (in-degrees, copy chains,
    visited marks), counted in ``"reserved"``.

    Memory: X is validated and encoded chunk by chunk (see
    :class:`BasePQNeighbors`), but the rows being inserted are linked by
    their float32 vectors, one graph's share at a time: ``fit`` holds
    ``min(n_samples, segment_size) * n_features * 4`` bytes while it
    builds a graph, and ``partial_fit`` that much for its batch (old nodes
    are read from their codes).  ``compact`` re-links the live nodes of
    one graph at a time from the raw vectors when kept (normalised for
    cosine), else their decoded codes.

    Segments: the graph that takes appends (the attributes ``codes_``,
    ``links0_``...) is the *growing* graph.  When an append finds it
    holding ``segment_size`` nodes, it is sealed: its rows become an
    immutable :class:`~pqsk._segments.Segment` in ``segments_`` (a graph of
    its own, never modified again) and a new, empty growing graph takes the
    rows; a batch is split so that each graph holds at most
    ``segment_size`` nodes (``fit`` of n rows builds ceil(n /
    ``segment_size``) graphs of consecutive rows, the last one growing).
    A query searches every graph with the same ``ef_search`` and merges
    their answers (fan-out and top-k merge): it costs the sum of the
    searches, so time grows with the number of segments; a neighbour is
    found whenever the search of its own graph finds it, so recall is at
    least that of one graph searched alone.  With refine_factor > 0 the
    merged candidates are re-ranked by exact distance, as for one graph.
    Removed nodes stay in their graph as tombstones; ``remove`` rebuilds
    a sealed segment as soon as more than ``COMPACT_SHARE`` (1/2) of its
    nodes are removed, and ``compact`` rebuilds every graph holding
    removed nodes, one at a time, each new segment replacing the old one
    in ``segments_`` by one reference swap (queries go on meanwhile;
    see ``compact``).  ``save`` writes each sealed segment's arrays once,
    under ``segments/`` of the index directory: saving again to the same
    path writes only the segments made since (and the growing graph), and
    ``load(..., mmap_mode="r")`` maps them from those files.

    Attributes
    ----------
    codebooks_ : ndarray of shape (n_subspaces, n_codewords, ds)
    segments_ : tuple of Segment
        The sealed graphs, oldest first (empty until the growing graph
        first reaches ``segment_size``).  Each holds the arrays ``codes``,
        ``levels``, ``links0``, ``upper_links``, ``upper_offsets`` (as the
        attributes below) and ``ids`` (int64, ascending: the id of each
        node), and ``meta`` ``entry_point`` and ``max_level``.
    codes_ : ndarray of shape (n_nodes, n_subspaces), uint8 or uint16
        Codes of the growing graph's nodes (``n_nodes`` is
        ``n_samples_fit_`` while nothing was sealed or removed); this and
        the graph attributes below describe the growing graph.
    levels_ : ndarray of shape (n_nodes,), int32
        Level of each node.
    links0_ : ndarray of shape (n_nodes, 2 * n_links), int32
        Level-0 neighbours, -1 for unused slots.
    upper_links_ : ndarray of shape (n_upper_rows, n_links), int32
        Upper-level neighbours, one row per (node, level >= 1) pair
        (``n_upper_rows`` is the sum of the levels); node i's level l (1 <= l <= levels_[i]) is
        row ``upper_offsets_[i] + l - 1``.
    upper_offsets_ : ndarray of shape (n_nodes,), int64
    level0_parent_ : ndarray of shape (n_nodes,), int32
        For each node, a node that links to it on level 0 (-1 for the entry
        point), such that following them from any node leads to the entry
        point: a certificate that every node is reachable, which lets
        ``partial_fit`` check only the nodes it touched.
    entry_point_ : int
        A node of the top level, where every search starts.
    max_level_ : int
    ids_ : ndarray of shape (n_nodes,), int64, or None
        Id of each node of the growing graph, ascending; None when node i
        is id i (before any sealing or ``compact``).
    removed_ : ndarray of shape (n_samples_fit,), bool, or None
        Tombstones by id (see ``remove``); None before any removal.
    n_removed_ : int
    vectors_ : RowStore of shape (n_samples_fit, n_features) or None
        Raw vectors (as given, also for cosine), kept only when ``refine_factor
        > 0`` and ``refine_dtype="float32"``; memmap input kept by reference.
    refine_dtype_, refine_rows_, refine_offset_, refine_scale_
        The re-ranking tier, as in :class:`PQNeighbors`.
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
    anisotropic_threshold_ : float or None
        ``anisotropic_threshold`` at fit: the loss every encoding uses.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)

    See Also
    --------
    IVFPQNeighbors : inverted-file search over PQ codes.
    PQNeighbors : exhaustive ADC search.

    Examples
    --------
    >>> import numpy as np
    >>> from pqsk import HNSWPQNeighbors
    >>> rng = np.random.RandomState(0)
    >>> X = rng.rand(2000, 16).astype(np.float32)
    >>> nn = HNSWPQNeighbors(n_neighbors=3, n_links=8, ef_construction=64,
    ...                      n_subspaces=4, n_codewords=32, random_state=0).fit(X)
    >>> nn.links0_.shape
    (2000, 16)
    >>> dist, ind = nn.kneighbors(X[:2])
    >>> ind.shape
    (2, 3)
    """

    _parameter_constraints = {
        **PQParamsMixin._pq_parameter_constraints,
        **BasePQNeighbors._neighbors_parameter_constraints,
        "n_links": [Interval(Integral, 2, MAX_LINKS, closed="both")],
        "ef_construction": [Interval(Integral, 1, None, closed="left")],
        "ef_search": [Interval(Integral, 1, None, closed="left")],
        "walk": [StrOptions(set(WALKS))],
        **SEGMENT_PARAMETER_CONSTRAINTS,
    }

    # segment_size is read by every append: validated at every call too.
    _search_params = BasePQNeighbors._search_params + ("ef_search", "segment_size", "walk")
    _kernel_dtype = np.float32  # the graph is built and walked in float32

    def __init__(
        self,
        n_neighbors=5,
        *,
        n_links=16,
        ef_construction=200,
        ef_search=64,
        segment_size=DEFAULT_SEGMENT_SIZE,
        n_subspaces="auto",
        n_codewords="auto",
        metric="euclidean",
        refine_factor=10,
        refine_dtype="float32",
        walk="auto",
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
        self.n_links = n_links
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.segment_size = segment_size
        self.n_subspaces = n_subspaces
        self.n_codewords = n_codewords
        self.metric = metric
        self.refine_factor = refine_factor
        self.refine_dtype = refine_dtype
        self.walk = walk
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

    def _fitted_values(self):
        return {**super()._fitted_values(), "n_links": self.links0_.shape[1] // 2}

    def _start_empty(self):
        m, k = self.codebooks_.shape[:2]
        self._levels_rng_ = check_random_state(self.random_state)
        self.__dict__.update(empty_graph(m, self.n_links, _quantizer.code_dtype(k)))
        self.ids_ = None
        self.segments_ = ()
        self._forget_tombstones()

    def _node_vectors(self, codes, ids):
        """float32 vectors of a graph's nodes (``codes``, ``ids``: theirs,
        in node order): raw when kept, else from the re-ranking tier (both
        normalised for cosine), else decoded (in the codebooks' padded layout,
        as the build reads them); all at once: n_nodes x n_features."""
        tier = self._tier
        if self.vectors_ is None and tier is None:
            vectors = _quantizer.decode(codes, self.codebooks_)
        else:
            src, at = ((self.vectors_, ids) if tier is None else
                       (tier.take(ids, self._fit_dtype_), np.arange(ids.shape[0])))
            vectors = FitRows(src, self._fit_dtype_,
                              self.effective_metric_ == "cosine", self._rotation).take(at)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _add_rows(self, X, n_threads, progress):
        """Append X to the growing graph, sealing it into a segment whenever
        it holds ``segment_size`` nodes: a batch is inserted in pieces that
        fill the growing graph up to that size, so ``fit`` builds
        ceil(n / segment_size) graphs of consecutive rows and holds the
        float32 rows of one piece at a time."""
        codes = _scorers.encode_rows(progress.rows(X, "encoding"), self.codebooks_,
                                       n_threads, **self._anisotropic_kw())
        progress(f"encoded {X.shape[0]} vectors")
        b, size = X.shape[0], self.segment_size
        start = 0
        committed = False
        try:
            while start < b:
                if self.codes_.shape[0] >= size:
                    self._seal()
                n_old = self.codes_.shape[0]
                stop = min(b, start + size - n_old)
                piece = X if (start, stop) == (0, b) else FitRows(
                    X.raw[start:stop], X.dtype, X.unit_norm, X.rotation)
                self._add_piece(piece, codes[start:stop], progress)
                start = stop
                committed = committed or n_old > 0
                if committed and start < b:
                    # The pieces so far rewrote old nodes' links: if a later
                    # piece fails, the index keeps them (_after_failed_write).
                    runtime(self).pending = dict(self.__dict__)
        finally:
            if start >= b:
                runtime(self).pending = None

    def _add_piece(self, X, codes, progress):
        n_nodes, first_id, b = self.codes_.shape[0], self.n_samples_fit_, X.shape[0]
        state = self._grown_graph({a: getattr(self, a) for a in GRAPH_ATTRS}, codes)
        if self.ids_ is not None or first_id != n_nodes:
            old = np.arange(n_nodes) if self.ids_ is None else self.ids_
            ids = _growable.grow(self, "ids", old, b)
            ids[n_nodes:] = np.arange(first_id, first_id + b)
            state["ids_"] = ids
        state.update(self._grown_refine(X))
        old_removed = self.removed_
        state.update(self._size_state(first_id + b))
        mask = self._extended_tombstones(b)
        # The new nodes are linked by their raw vectors (float32, all of
        # them at once: b x n_features x 4 bytes); old nodes' come from
        # their codes, decoded by the kernel where it needs them.
        new = np.empty((b, X.shape[1]), dtype=np.float32)
        for sl, chunk in _scorers.row_chunks(X):
            new[sl] = chunk
        self._link(state, n_nodes, new, progress)
        if mask is not None:
            runtime(self).growing_tombstones = (self.removed_, self.ids_, self.n_removed_,
                                                mask)
        # The sealed segments' tombstones do not change with an append.
        self._note_grown(old_removed)

    def _seal(self):
        """Turn the growing graph into a sealed segment (trimmed copies of
        its published rows; the capacity buffers are dropped) and start an
        empty growing graph."""
        n = self.codes_.shape[0]
        ids = (np.arange(n, dtype=np.int64) if self.ids_ is None
               else np.array(self.ids_, dtype=np.int64))
        arrays = {name: np.array(getattr(self, name + "_")) for name in SEGMENT_ARRAYS
                  if name != "ids"}
        arrays["ids"] = ids
        seg = Segment(arrays, {"entry_point": int(self.entry_point_),
                               "max_level": int(self.max_level_)})
        rt = runtime(self)
        cached = rt.growing_tombstones
        m = self.codebooks_.shape[0]
        self.__dict__.update(empty_graph(m, self.links0_.shape[1] // 2, self.codes_.dtype))
        self.ids_ = np.empty(0, np.int64)
        self.segments_ = self.segments_ + (seg,)
        for name in ("codes", "levels", "links0", "upper_links", "upper_offsets",
                     "level0_parent", "ids", "node_tombstones", "build_indeg",
                     "build_copies", "build_visited"):
            _growable.discard(self, name)
        rt.build = rt.growing_tombstones = None
        mask = None
        if self.n_removed_:
            # The growing graph's node mask, when current, is the segment's.
            if (cached is not None and cached[0] is self.removed_
                    and cached[2] == self.n_removed_ and cached[3].size == n):
                mask = np.array(cached[3], dtype=np.uint8)
            else:
                mask = self.removed_[ids].view(np.uint8)
        self._note_segment(seg, mask)

    def _extended_tombstones(self, b):
        """The cached node-order tombstones (after a ``compact``) with b live
        nodes appended, grown in place; None when there is nothing cached
        to extend (``_tombstones`` then computes it when next needed)."""
        cached = runtime(self).growing_tombstones
        if (self.ids_ is None or cached is None or cached[0] is not self.removed_
                or cached[1] is not self.ids_ or cached[2] != self.n_removed_
                or cached[3].size == 0):
            return None
        return _growable.grow(self, "node_tombstones", cached[3], b, 0)

    def _grown_graph(self, graph, codes, owner=None):
        """The graph arrays with ``codes`` appended as unlinked nodes (see
        ``_graph.grow``), grown in the buffers of ``owner`` (by default the
        estimator), with ``_levels_rng_`` advanced past their levels."""
        rng = copy.deepcopy(self._levels_rng_)  # published only with the append
        state = _graph.grow(graph, codes, rng, self if owner is None else owner)
        state["_levels_rng_"] = rng
        return state

    def _link(self, state, n_old, vectors, progress, owner=None, publish=True):
        """Link nodes n_old .. n - 1 of the grown ``state`` (``vectors``: their
        float32 rows; see ``_graph.link``), and publish ``state``.

        Everything that can fail is done before the build kernel runs; from
        then on the old nodes' rows are being rewritten, so ``state`` is
        the index (``_after_failed_write``) even if an interrupt comes.

        With ``publish=False`` (a new graph, ``n_old == 0``, built beside
        the index: compaction) nothing of the estimator changes; the
        caller publishes ``state`` and the returned build scratch.
        ``owner`` holds the growable buffers (default: the estimator).
        """
        kept = runtime(self).build  # the last build's scratch, if of this graph
        if kept is not None and kept["links0"] is not self.links0_:
            kept = None

        def before_write(st):
            if n_old:
                runtime(self).pending = state
            runtime(self).build = st

        # Old nodes are decoded from the tier, if any (it holds unrotated rows).
        walk = (TierWalk.choose("auto", self._tier, False)
                if n_old and self._rotation is None else None)
        st = _graph.link(state, n_old, vectors, self.codebooks_, self.ef_construction,
                         self._inner_product, progress, self if owner is None else owner,
                         kept, before_write if publish else None, walk)
        if publish:
            self.__dict__.update(state)
            runtime(self).pending = None
        return st

    def _after_failed_write(self):
        # A partial_fit interrupted after the kernel started rewriting old
        # nodes' links cannot be undone: keep the new state (see _link),
        # whose nodes may lack a parent: the next append looks for them all.
        # (Or the pieces of a batch committed before the failing one: see
        # _add_rows.)
        state, runtime(self).pending = runtime(self).pending, None
        if state is not None:
            self.__dict__.update(state)
            st = runtime(self).build
            if st is not None:
                st["recheck"] = True

    # -- removal and compaction (the policy: SegmentWritesMixin) --------------
    _node_masks = True  # the graph search reads each segment's node mask

    def _remove_rows(self, ids, removed):
        # Tombstones: the nodes stay in the graph for routing; searches
        # read ``removed_`` (updated in place by ``remove``) in node order
        # and never return them.  See ``compact``.  The cached masks (the
        # sealed segments', the growing graph's) are updated in place too.
        super()._remove_rows(ids, removed)
        rt = runtime(self)
        cached = rt.growing_tombstones
        if (self.ids_ is None or cached is None or cached[0] is not removed
                or cached[1] is not self.ids_ or cached[3].size == 0):
            return  # the view of removed_ is current, or computed at next use
        cached[3][positions(self.ids_, ids)] = 1
        rt.growing_tombstones = (removed, self.ids_, self.n_removed_, cached[3])

    def compact(self):
        """Rebuild, one graph at a time, every graph holding removed nodes.

        After many ``remove`` calls the tombstoned nodes still cost memory
        and search time (they are walked through).  ``compact`` re-inserts
        the live nodes of each such graph (every sealed segment, then the
        growing graph) into a fresh graph (same codes, same ids; the build
        uses the raw vectors if kept, else the decoded ones), so it costs
        about as much as building those graphs anew.  A sealed segment left
        with no live node is dropped.

        Queries go on meanwhile: each new graph is built under the index's
        read lock, and the write lock is held only to swap it in (one
        reference: ``segments_``, or the growing graph's attributes).
        Other writers (``partial_fit``, ``remove``...) wait.

        Returns
        -------
        self : HNSWPQNeighbors
        """
        return self._compact_all()

    def _compacted_segment(self, seg):
        """(A segment of ``seg``'s live nodes, or None when none is left;
        the advanced level generator), built beside the index."""
        mask, n_dead = self._segment_tombstones(seg)
        if not n_dead:
            return seg, {}
        live = mask == 0
        ids = np.ascontiguousarray(seg["ids"][live])
        if not ids.size:
            return None, {}
        # BufferOwner: the new graph's buffers are not the estimator's.
        state, _ = self._rebuilt_graph(np.ascontiguousarray(seg["codes"][live]), ids,
                                       BufferOwner())
        arrays = {name: trimmed(state[name + "_"]) for name in SEGMENT_ARRAYS}
        new = Segment(arrays, {"entry_point": int(state["entry_point_"]),
                               "max_level": int(state["max_level_"])})
        return new, {"_levels_rng_": state["_levels_rng_"]}

    def _compact_growing(self):
        """Rebuild the growing graph from its live nodes, if it holds removed
        ones; the caller holds the writer mutex."""
        lock = index_lock(self)
        with lock.read():
            if not self.n_removed_ or self._tombstones().size == 0:
                return
            node_ids = (np.arange(self.codes_.shape[0], dtype=np.int64) if self.ids_ is None
                        else self.ids_)
            live = ~self.removed_[node_ids]
            # The new arrays are the estimator's growable buffers (appends
            # continue in them); the published views stay those of the old.
            state, st = self._rebuilt_graph(self.codes_[live],
                                            node_ids[live].astype(np.int64), self)
        with lock.write():
            self.__dict__.update(state)
            runtime(self).build = st

    def _rebuilt_graph(self, codes, ids, owner):
        """A new graph of the nodes ``codes`` (their ``ids``), built beside
        the index in ``owner``'s growable buffers and not published:
        (graph state, build scratch).  Linked from the raw vectors when
        kept, else the decoded codes."""
        m = codes.shape[1]
        state = self._grown_graph(empty_graph(m, self.links0_.shape[1] // 2, codes.dtype),
                                  codes, owner)
        state["ids_"] = ids
        st = self._link(state, 0, self._node_vectors(codes, ids),
                        Progress(self.verbose, type(self).__name__), owner=owner,
                        publish=False)
        return state, st

    def _check_loaded_state(self):
        """Loaded-index invariants (see ``BasePQNeighbors``) and the graphs':
        every sealed segment and the growing graph pass ``_graph.check_graph``
        (links in range, padded with -1 only at the end of a row, an
        upper-level link at level l pointing at a node of level >= l,
        every live node reachable on level 0 from the entry point), and
        every id is stored in at most one graph, every live id in one."""
        from ._utils import range_bound

        super()._check_loaded_state()
        cb, d = self.codebooks_, self.n_features_in_
        # The graph is searched and extended in float32.
        bound = range_bound(d, np.dtype(np.float32))
        check_float_array(cb, "codebooks_", cb.shape, cb.dtype, bound)
        # vectors_: checked by the base class against the float32 bound
        # (_kernel_dtype), chunk by chunk.
        if not hasattr(self, "segments_"):  # saved before sealed segments
            self.segments_ = ()
        segments = self.segments_
        require(isinstance(segments, tuple)
                and all(isinstance(s, Segment) for s in segments),
                "segments_ must be a tuple of segments")
        require(len({s.uid for s in segments}) == len(segments),
                "segments_ holds a segment twice")
        require(isinstance(self._levels_rng_, np.random.RandomState),
                "_levels_rng_ must be a RandomState")
        removed = (np.zeros(self.n_samples_fit_, bool) if self.removed_ is None
                   else self.removed_)
        m, k = cb.shape[:2]
        _graph.check_graphs(self._growing_graph(), segments, m, k,
                            _quantizer.code_dtype(k), removed)
        self._check_growing_state()

    def _check_growing_state(self):
        """The level-0 parent tree, after ``load``.  It is derived state (no
        kernel reads it; appends use it to keep every node reachable): one
        that does not hold (in range, one root at the entry point, each
        parent linking to its child) is rebuilt from the links, as it is
        for an index saved before the tree existed."""
        if hasattr(self, "level0_parent_"):  # absent: saved before appends grew in place
            try:
                _graph.check_parent_tree(self.links0_, self.level0_parent_,
                                         self.entry_point_)
                return
            except ValueError:
                pass
        self.level0_parent_ = level0_parents(self.links0_, self.entry_point_)

    # -- data drift (see RefitMixin.refit_codebooks) --------------------------
    def _refit_training_rows(self, sample):
        return sample

    def _refit_state(self, codebooks, recode, progress):
        # The graphs keep their links: they were built from the vectors
        # (raw when kept, else decoded), and the new codes describe the
        # same vectors better.
        segments = []
        for i, seg in enumerate(self.segments_):
            arrays = {a: seg[a] for a in seg.names}
            arrays["codes"] = recode(seg["ids"])
            segments.append(Segment(arrays, seg.meta))
            progress(f"re-encoded graph {i + 1} of {len(self.segments_) + 1}")
        n_nodes = self.codes_.shape[0]
        growing = recode(np.arange(n_nodes) if self.ids_ is None else self.ids_)
        return {"segments_": tuple(segments), "codes_": growing}, ("codes",)

    @property
    def _radius_first_k(self):
        # radius_neighbors starts at the beam width: the first search
        # costs what kneighbors does.
        return self.ef_search

    def kneighbors(self, X=None, n_neighbors=None, return_distance=True, *, filter=None):
        """As for every searcher (see :class:`PQNeighbors`); warns (``UserWarning``)
        when ``ef_search < n_neighbors``: the beam is then widened to
        ``n_neighbors``, so the search costs more than ``ef_search`` says
        (hnswlib raises the beam the same way).

        With a ``filter`` the beam walks through the nodes the filter
        rejects (they still lead to others) but never returns them; a
        query whose filter allows fewer than ``max(FILTER_SCAN_MIN,
        FILTER_SCAN_FRACTION * live points)`` ids (256, 2 %) scans those
        ids' codes instead (see :ref:`filtering`)."""
        result = super().kneighbors(X, n_neighbors, return_distance, filter=filter)
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if self.ef_search < k:
            warnings.warn(
                f"ef_search={self.ef_search} is smaller than n_neighbors={k}: the "
                f"search used a beam of {k}. Set ef_search >= n_neighbors (recall "
                "grows with it).", UserWarning, stacklevel=2)
        return result

    def _n_candidates(self, n_neighbors):
        n = super()._n_candidates(n_neighbors)
        if self.refine_factor > 0:
            # The beam ends holding ef_search ADC candidates anyway: re-rank
            # them all, so a wider beam also buys exact-distance recall.
            n = max(n, min(self.ef_search, self._n_live))
        return n

    def _ef(self, n_out, n_nodes=None):
        # A beam wider than the graph holds nothing more: cap it there
        # (this also bounds the scratch memory of a huge ef_search).
        n_nodes = self.codes_.shape[0] if n_nodes is None else n_nodes
        return max(1, min(max(self.ef_search, n_out), n_nodes))

    def _tombstones(self):
        """uint8 mask of removed nodes of the growing graph in node order,
        or an empty array when no node of it is removed (none ever was, or
        ``compact`` dropped them all); the kernel then skips the check.

        Before any ``compact`` or sealing (``ids_`` is None) it is
        ``removed_`` itself, viewed as uint8.  Otherwise it is computed once
        (O(n)) and cached in the runtime state, keyed by (``removed_``,
        ``ids_``, ``n_removed_``): ``remove`` marks ids in place in both,
        and ``partial_fit`` extends both (see ``_remove_rows``,
        ``_extended_tombstones``), so neither pays O(n) again.  Sealed
        segments have theirs (``_segment_tombstones``).
        """
        if not self.n_removed_:
            return NO_TOMBSTONES
        cached = runtime(self).growing_tombstones
        if (cached is not None and cached[0] is self.removed_ and cached[1] is self.ids_
                and cached[2] == self.n_removed_):
            return cached[3]
        if self.ids_ is None:
            mask = self.removed_.view(np.uint8)
        else:
            mask = self.removed_[self.ids_]
            mask = mask.view(np.uint8) if mask.any() else NO_TOMBSTONES
        runtime(self).growing_tombstones = (self.removed_, self.ids_, self.n_removed_, mask)
        return mask

    def _graphs(self):
        """The graphs a query fans out to, as (graph, tombstones, live
        nodes): every sealed segment then the growing graph, those with a
        live node only.  ``graph`` holds the growing graph's attribute names
        (``codes_``, ``links0_``, ..., ``ids_``: None when node i is id i).
        O(number of segments): the masks and counts are cached."""
        out = []
        live_sealed = 0
        for seg in self.segments_:
            mask, n_dead = self._segment_tombstones(seg)
            live = seg["ids"].shape[0] - n_dead
            live_sealed += live
            if live:
                out.append((segment_graph(seg), mask, live))
        # Every live id is stored exactly once: the rest are the growing
        # graph's.
        live = self._n_live - live_sealed
        if live > 0 and self.codes_.shape[0]:
            out.append((self._growing_graph(), self._tombstones(), live))
        return out

    def _growing_graph(self):
        """The growing graph as ``_graphs`` gives it (no parent tree)."""
        return {a: getattr(self, a) for a in SEARCH_ATTRS}

    def _search(self, Q, n_candidates, n_threads, ranking_only=False, blocked=None):
        if blocked is not None:
            return self._search_blocked(Q, n_candidates, n_threads, blocked)
        return _graph.search_graphs(self._graphs(), np.ascontiguousarray(Q, dtype=np.float32),
                                    n_candidates, self._ef, self.codebooks_,
                                    self._inner_product, n_threads, self._walk())

    def _walk(self):
        """The search's :class:`~pqsk._tierwalk.TierWalk`, or None (ADC)."""
        return TierWalk.choose(self.walk, self._tier, self.effective_metric_ == "cosine",
                               self._rotation)

    def _search_blocked(self, Q, n_candidates, n_threads, blocked):
        """Filtered ``_search``: ``blocked`` (by id, removed ones included)
        replaces the tombstones; queries allowing few ids scan them."""
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        nq = Q.shape[0]
        dist = np.full((nq, n_candidates), np.inf, dtype=np.float32)
        ind = np.full((nq, n_candidates), NO_ID, dtype=np.int64)
        n_allowed = blocked.allowed_counts(nq)
        scan = n_allowed < max(FILTER_SCAN_MIN, FILTER_SCAN_FRACTION * self._n_live)
        graphs = [(g, g["ids_"], g["codes_"].shape[0]) for g, _, _ in self._graphs()]
        walk = np.flatnonzero(~scan)
        if walk.size:
            d, i = _graph.search_blocked(graphs, blocked.take(walk), Q[walk], n_candidates,
                                         self._ef, self.codebooks_, self._inner_product,
                                         n_threads, self._walk())
            dist[walk], ind[walk] = d, i
        rows = np.flatnonzero(scan)
        if rows.size:
            sub = blocked.take(rows)
            parts = [(g["codes_"], ids, sub.for_nodes(ids).rows[:, :n_nodes])
                     for g, ids, n_nodes in graphs]
            d, i = _scorers.adc_search_allowed(Q[rows], self.codebooks_, parts, n_candidates,
                                               self._inner_product, n_threads)
            dist[rows], ind[rows] = d, i
        return dist, ind

    def _decode_parts(self):
        def part(codes, ids):
            return ids, lambda pos: _quantizer.decode(codes[pos], self.codebooks_,
                                                      self.n_features_in_)
        parts = [part(seg["codes"], seg["ids"]) for seg in self.segments_]
        if self.codes_.shape[0]:
            ids = self.ids_
            if ids is None and self.segments_:
                ids = np.arange(self.codes_.shape[0])
            parts.append(part(self.codes_, ids))  # None: entry i is id i
        return parts

    def search_stats(self, X, n_neighbors=None):
        """Work done per query by a search of X (no results returned).

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
        n_neighbors : int, default=None

        Returns
        -------
        stats : dict
            ``"distance_computations"``: mean number of ADC (or tier, see
            ``walk``) distances evaluated per query, summed over the graphs searched (every
            sealed segment and the growing graph); ``"ef"``: the beam width
            used (which accounts for ``refine_factor``, as ``kneighbors``
            does); ``"n_graphs"``: the number of graphs searched.
        """
        self._check_fitted()
        self._check_params_at_call()
        n_neighbors = check_n_neighbors(self.n_neighbors if n_neighbors is None
                                        else n_neighbors)
        Q = self._rotate(self._validate_queries(X))
        n_threads = effective_n_threads(self.n_jobs)
        with index_lock(self).read():
            graphs = self._graphs()
            total, ef = _graph.search_work(graphs, Q, self._n_candidates(n_neighbors),
                                           self._ef, self.codebooks_, self._inner_product,
                                           n_threads, self._walk())
        return {"distance_computations": float(total.mean()), "ef": ef,
                "n_graphs": len(graphs)}

    def _memory_parts(self):
        # Sealed segments count in the same parts as the growing graph
        # (memory-mapped ones included: their pages are read on demand).
        parts = {"codes": self.codes_.nbytes, "links0": self.links0_.nbytes,
                 "upper_links": self.upper_links_.nbytes, "levels": self.levels_.nbytes,
                 "upper_offsets": self.upper_offsets_.nbytes,
                 "level0_parent": self.level0_parent_.nbytes,
                 "ids": 0 if self.ids_ is None else self.ids_.nbytes}
        for seg in self.segments_:
            for name in SEGMENT_ARRAYS:
                parts[name] += seg[name].nbytes
        return parts, {"codebooks": self.codebooks_.nbytes}

    def _n_stored(self):
        return self.codes_.shape[0] + sum(seg["ids"].shape[0] for seg in self.segments_)

    def _reserved_bytes(self):
        spare = sum(_growable.spare_bytes(self, name, getattr(self, name + "_"))
                    for name in ("codes", "levels", "links0", "upper_links",
                                 "upper_offsets", "level0_parent", "ids"))
        rt = runtime(self)
        st = rt.build
        if st is not None and st["links0"] is self.links0_:
            spare += _graph.build_scratch_bytes(st, self)
        cached = rt.growing_tombstones
        if cached is not None and cached[1] is not None and cached[1] is self.ids_:
            spare += cached[3].nbytes
        # By segment, not over the records: queries may add some meanwhile.
        records = [rt.segment_tombstones.get(seg.uid) for seg in self.segments_]
        spare += sum(r.mask.nbytes for r in records if r is not None and r.mask is not None)
        return super()._reserved_bytes() + spare

