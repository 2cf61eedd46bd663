"""HNSWPQNeighbors: a hierarchical navigable small-world graph over PQ codes."""

import copy
from numbers import Integral

import threading
import warnings
import weakref

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import breadth_first_order, connected_components
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted

from . import _growable, _hnsw, _quantizer, _scorers
from ._quantizer import scratch
from ._segments import (DEFAULT_SEGMENT_SIZE, SEGMENT_PARAMETER_CONSTRAINTS, Segment,
                        merge_topk)
from ._store import FitRows
from ._base import (BasePQNeighbors, PQParamsMixin, RefitMixin, RemovalMixin,
                    _check_n_neighbors)
from ._persist import IndexIOMixin, check_int_array, require
from ._utils import Progress, effective_n_threads, index_lock, index_writer

MAX_LEVEL = 32
MAX_LINKS = 2048  # more links per node than this is never useful
BUILD_CHUNK = 20000  # nodes inserted per call of the build kernel
PROGRESS_CHUNK = 2048  # the same when a progress bar is shown
REPAIR_PASSES = 8  # level-0 repair passes before giving up (each is linear)
REPAIR_SAMPLE = 4096  # reachable nodes tried for a component with no way out
# After an append only the nodes it touched are checked, through a parent
# tree kept on level 0 (see ``_hnsw.fix_parents``); the full level-0 repair
# (one linear pass) runs at fit and compact, when the entry point changes,
# and when the local check cannot give a node a parent.
LOST_PER_NODE = 4  # room to record nodes that lost their parent, per inserted node
# ``remove`` rebuilds a sealed segment (see ``compact``) as soon as more than
# this share of its nodes are removed: tombstoned nodes are still walked
# through by every query, so past half of them a segment costs about twice
# what its live nodes need.
COMPACT_SHARE = 0.5
# Arrays of a sealed segment (a graph, as the growing graph's attributes
# without the trailing underscore) and its scalars.
SEGMENT_ARRAYS = ("codes", "levels", "links0", "upper_links", "upper_offsets", "ids")
SEGMENT_META = ("entry_point", "max_level")
_NO_ID = np.iinfo(np.int64).max


_BUILD = weakref.WeakKeyDictionary()    # estimator -> build scratch (_build_scratch)
_PENDING = weakref.WeakKeyDictionary()  # estimator -> state an append is publishing


_MARKS = threading.local()
# estimator -> (removed_, ids_, n_removed_, node mask): the growing graph's
_TOMBSTONES = weakref.WeakKeyDictionary()
# estimator -> {segment uid: [removed_, n_removed_, node mask, removed nodes]}:
# each sealed segment's node-order tombstones (uint8, one per node)
_SEGMENT_TOMBSTONES = weakref.WeakKeyDictionary()
_NO_TOMBSTONES = np.empty(0, np.uint8)

# Filtered search: a query whose filter allows fewer than
# max(FILTER_SCAN_MIN, FILTER_SCAN_FRACTION * live points) ids scans those
# ids (ADC over their codes, then re-ranking) instead of walking the graph.
# A beam that must collect ef allowed nodes visits about ef / s nodes at
# selectivity s, while the scan reads s * n codes: they cost the same near
# s = sqrt(ef / n), 1.8 % for ef = 64 and n = 200,000.
FILTER_SCAN_FRACTION = 0.02
FILTER_SCAN_MIN = 256


def visited_marks(n_threads, n):
    """This Python thread's visited-mark rows and generation counters,
    kept across searches so that a query never clears O(n) memory: marks
    are compared with a generation counter that only grows (the rows are
    replaced by zeroed ones before a counter can wrap)."""
    cached = getattr(_MARKS, "arrays", None)
    if (cached is None or cached[0].shape[0] < n_threads or cached[0].shape[1] < n
            or cached[1].max() > 2**31):  # fresh rows long before a counter wraps
        per_line = 16  # uint32 per 64-byte line: pad rows as scratch() does
        width = (-(-max(n, 1) // per_line) + 1) * per_line
        cached = (np.zeros((n_threads, width), np.uint32),
                  np.zeros((n_threads, per_line), np.uint32))
        _MARKS.arrays = cached
    return cached


def sample_levels(n, n_links, random_state):
    """Insertion levels ``floor(-ln(U) / ln(M))``: P(level >= l) = M**-l."""
    u = 1.0 - random_state.random_sample(n)          # in (0, 1]
    levels = np.floor(-np.log(u) / np.log(n_links)).astype(np.int32)
    return np.minimum(levels, MAX_LEVEL)


class HNSWPQNeighbors(IndexIOMixin, RefitMixin, RemovalMixin, PQParamsMixin,
                      BasePQNeighbors):
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
        If positive, the raw vectors are kept and the best
        ``max(refine_factor * n_neighbors, ef_search)`` ADC candidates of
        the beam are re-ranked by exact distance.  The default costs
        ``4 * n_features`` bytes per vector (none for a memmap, kept by
        reference); recall@10 at the defaults with and without it is in
        ``benchmarks/results/defaults.md``.  0 keeps only the codes and
        the graph.
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
    are kept for re-ranking; new rows are linked by their raw vectors).
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
        Raw vectors (as given, also for cosine), kept only when
        ``refine_factor > 0``; memmap input is kept by reference.
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
        **SEGMENT_PARAMETER_CONSTRAINTS,
    }

    # segment_size is read by every append: validated at every call too.
    _search_params = BasePQNeighbors._search_params + ("ef_search", "segment_size")
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

    def _fit_index(self, X, progress):
        self.codebooks_ = self._fit_codebooks(X, progress)
        self._start_empty()
        self._add_rows(X, effective_n_threads(self.n_jobs), progress)

    def _start_empty(self):
        m, k = self.codebooks_.shape[:2]
        self._levels_rng_ = check_random_state(self.random_state)
        self.__dict__.update(_empty_graph(m, self.n_links, _quantizer.code_dtype(k)))
        self.ids_ = None
        self.segments_ = ()
        _SEGMENT_TOMBSTONES.pop(self, None)

    def _node_vectors(self, codes, ids):
        """float32 vectors of a graph's nodes (``codes``, ``ids``: theirs,
        in node order): raw when kept (normalised for cosine), else
        decoded (in the codebooks' padded layout, as the build reads
        them).  All at once (the graph build needs them):
        n_nodes x n_features."""
        if self.vectors_ is None:
            vectors = _quantizer.decode(codes, self.codebooks_)
        else:
            vectors = FitRows(self.vectors_, self._fit_dtype_,
                              self.effective_metric_ == "cosine", self._rotation).take(ids)
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
                    _PENDING[self] = dict(self.__dict__)
        finally:
            if start >= b:
                _PENDING.pop(self, None)

    def _add_piece(self, X, codes, progress):
        n_nodes, first_id, b = self.codes_.shape[0], self.n_samples_fit_, X.shape[0]
        state = self._grown_graph({a: getattr(self, a) for a in GRAPH_ATTRS}, codes)
        if self.ids_ is not None or first_id != n_nodes:
            old = np.arange(n_nodes) if self.ids_ is None else self.ids_
            ids = _growable.grow(self, "ids", old, b)
            ids[n_nodes:] = np.arange(first_id, first_id + b)
            state["ids_"] = ids
        state["vectors_"] = self._grown_vectors(X)
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
            _TOMBSTONES[self] = (self.removed_, self.ids_, self.n_removed_, mask)
        # The sealed segments' tombstones do not change with an append:
        # their cached masks now go with the grown removed_.
        for entry in _SEGMENT_TOMBSTONES.get(self, {}).values():
            if entry[0] is old_removed and entry[1] == self.n_removed_:
                entry[0] = self.removed_

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
        cached = _TOMBSTONES.get(self)
        m = self.codebooks_.shape[0]
        self.__dict__.update(_empty_graph(m, self.links0_.shape[1] // 2, self.codes_.dtype))
        self.ids_ = np.empty(0, np.int64)
        self.segments_ = self.segments_ + (seg,)
        for name in ("codes", "levels", "links0", "upper_links", "upper_offsets",
                     "level0_parent", "ids", "node_tombstones", "build_indeg",
                     "build_copies", "build_visited"):
            _growable.discard(self, name)
        _BUILD.pop(self, None)
        _TOMBSTONES.pop(self, None)
        if self.n_removed_:
            # The growing graph's node mask, when current, is the segment's.
            if (cached is not None and cached[0] is self.removed_
                    and cached[2] == self.n_removed_ and cached[3].size == n):
                mask = np.array(cached[3], dtype=np.uint8)
            else:
                mask = self.removed_[ids].view(np.uint8)
            self._segment_cache()[seg.uid] = [self.removed_, self.n_removed_, mask,
                                              int(np.count_nonzero(mask))]

    def _extended_tombstones(self, b):
        """The cached node-order tombstones (after a ``compact``) with b live
        nodes appended, grown in place; None when there is nothing cached
        to extend (``_tombstones`` then computes it when next needed)."""
        cached = _TOMBSTONES.get(self)
        if (self.ids_ is None or cached is None or cached[0] is not self.removed_
                or cached[1] is not self.ids_ or cached[2] != self.n_removed_
                or cached[3].size == 0):
            return None
        return _growable.grow(self, "node_tombstones", cached[3], b, 0)

    def _grown_graph(self, graph, codes, owner=None):
        """The graph arrays with ``codes`` appended as unlinked nodes (levels
        drawn, link slots -1), grown in place past the used rows (in the
        buffers of ``owner``, by default the estimator: see ``_growable``)."""
        owner = self if owner is None else owner
        n_old, b = graph["codes_"].shape[0], codes.shape[0]
        M = graph["links0_"].shape[1] // 2
        rng = copy.deepcopy(self._levels_rng_)  # advanced only if the append is
        new_levels = sample_levels(b, M, rng)   # published
        n_rows = graph["upper_links_"].shape[0]  # = the sum of the old levels
        state = dict(graph)
        state["_levels_rng_"] = rng
        state["codes_"] = _growable.grow(owner, "codes", graph["codes_"], b)
        state["codes_"][n_old:] = codes
        state["levels_"] = _growable.grow(owner, "levels", graph["levels_"], b)
        state["levels_"][n_old:] = new_levels
        state["upper_offsets_"] = off = _growable.grow(owner, "upper_offsets",
                                                       graph["upper_offsets_"], b)
        off[n_old:] = n_rows
        off[n_old + 1:] += np.cumsum(new_levels[:-1])
        state["links0_"] = _growable.grow(owner, "links0", graph["links0_"], b, -1)
        state["upper_links_"] = _growable.grow(owner, "upper_links", graph["upper_links_"],
                                               int(new_levels.sum()), -1)
        state["level0_parent_"] = _growable.grow(owner, "level0_parent",
                                                 graph["level0_parent_"], b,
                                                 _hnsw.PARENT_LOST)
        return state

    def _build_scratch(self, graph, n_old, n, owner):
        """In-degrees, copy chains and visited marks for a
        build that adds nodes n_old .. n - 1 to ``graph``: kept from the
        last build when it left the published graph (O(new nodes)), else
        computed (O(n), after a load or an unpickling)."""
        st = _BUILD.get(self)
        if not (st is not None and n_old and st["links0"] is self.links0_
                and st["indeg"].shape[0] == n_old):
            old = graph["links0_"][:n_old]
            st = {"indeg": np.bincount(old[old >= 0], minlength=n_old).astype(np.int32),
                  "last_copies": np.full(n_old, -1, np.int32),
                  "visited": np.zeros(n_old, np.uint32), "gen": np.zeros(1, np.uint32)}
        extra = n - n_old
        grow = _growable.grow
        return {"indeg": grow(owner, "build_indeg", st["indeg"], extra, 0),
                "last_copies": grow(owner, "build_copies", st["last_copies"], extra, -1),
                "visited": grow(owner, "build_visited", st["visited"], extra, 0),
                "gen": st["gen"], "links0": graph["links0_"],
                "recheck": st.get("recheck", False)}

    def _link(self, state, n_old, vectors, progress, owner=None, publish=True):
        """Link nodes n_old .. n - 1 of the grown ``state`` (``vectors``: their
        float32 rows), check reachability, and publish ``state``.

        Everything that can fail is done before the build kernel runs; from
        then on the old nodes' rows are being rewritten, so ``state`` is
        the index (``_after_failed_write``) even if an interrupt comes.

        With ``publish=False`` (a new graph, ``n_old == 0``, built beside
        the index: compaction) nothing of the estimator changes; the
        caller publishes ``state`` and the returned build scratch.
        ``owner`` holds the growable buffers (default: the estimator).
        """
        owner = self if owner is None else owner
        # The kernel reads rows in the codebooks' padded layout (a copy only
        # when n_subspaces does not divide n_features).
        vectors = _quantizer.padded_rows(vectors, self.codebooks_)
        links0, upper = state["links0_"], state["upper_links_"]
        n, M0 = links0.shape
        codes = state["codes_"]
        m = codes.shape[1]
        ip = self._inner_product
        ep, top = state["entry_point_"], state["max_level_"]
        st = self._build_scratch(state, n_old, n, owner)
        ef_c = max(1, min(self.ef_construction, n))
        width = M0 + 1
        D = vectors.shape[1]
        cb = np.ascontiguousarray(self.codebooks_, dtype=np.float32)
        codes8 = codes if codes.dtype == np.uint8 else np.empty((0, m), np.uint8)
        codes16 = codes if codes.dtype == np.uint16 else np.empty((0, m), np.uint16)
        lost = np.empty(LOST_PER_NODE * (n - n_old), np.int64)
        parent = state["level0_parent_"]
        counts = np.zeros(2, np.int64)
        kernel_scratch = dict(
            cand_d=np.empty(n, np.float32), cand_i=np.empty(n, np.int64),
            res_d=np.empty(ef_c + 1, np.float32), res_i=np.empty(ef_c + 1, np.int64),
            fsel=np.empty(width, np.int64), fsel_d=np.empty(width, np.float32),
            sd=np.empty(width, np.float32), si=np.empty(width, np.int64),
            sel=np.empty(width, np.int64), sel_d=np.empty(width, np.float32),
            kept=np.empty(width, np.uint8), sel_a=np.empty(width, np.int64),
            rows=np.empty((max(ef_c, M0) + 1, D), np.float32),
            dec=np.empty(2 * D, np.float32),
        )
        data = (vectors, n_old, codes8, codes16, cb)
        # Point of no return: the kernel rewrites old nodes' rows in place.
        if publish:
            if n_old:
                _PENDING[self] = state
            _BUILD[self] = st
        first_ep = ep
        bar = progress.bar(n - n_old, "graph", unit="nodes")
        # Insertion is sequential: the graph does not depend on the chunks.
        step = BUILD_CHUNK if not bar.active else PROGRESS_CHUNK
        with bar:
            for start in range(n_old, n, step):
                stop = min(n, start + step)
                ep, top = _hnsw.hnsw_build(
                    *data, state["levels_"], links0, upper, state["upper_offsets_"],
                    start, stop, ep, top, ef_c, ip, st["indeg"], st["last_copies"],
                    n_old, st["visited"], st["gen"], **kernel_scratch, parent=parent,
                    lost=lost, counts=counts,
                )
                state["entry_point_"], state["max_level_"] = int(ep), int(top)
                bar.update(stop - start)
        progress(f"graph: {n - n_old} nodes inserted "
                 f"({counts[0] / max(1, n - n_old):.0f} distances per node)")

        def fix(nodes):
            """fix_parents on ``nodes``: how many stay without a parent."""
            room = max(M0 * (M0 + 1), ef_c)  # candidate parents
            return _hnsw.fix_parents(
                nodes, *data, links0, upper, state["upper_offsets_"], int(ep), int(top),
                ef_c, st["indeg"], parent, ip, st["visited"], st["gen"],
                kernel_scratch["cand_d"], kernel_scratch["cand_i"],
                kernel_scratch["res_d"], kernel_scratch["res_i"],
                np.empty(room, np.float32), np.empty(room, np.int64),
                np.empty(3 * D, np.float32))

        full = not n_old or ep != first_ep
        if n > n_old and not full:
            # Local check: the new nodes, and the old ones whose parent link
            # was dropped, get a parent again.
            if counts[1] <= lost.shape[0] and not st["recheck"]:
                cand = np.concatenate([np.arange(n_old, n), lost[:counts[1]]])
            else:
                cand = np.flatnonzero(parent == _hnsw.PARENT_LOST)
            st["recheck"] = False
            full = fix(cand) > 0
        if n > n_old and full:
            node_vectors = (vectors if not n_old
                            else _NodeVectors(codes, cb, vectors, n_old))
            with warnings.catch_warnings(record=True):  # fix() has the last word
                warnings.simplefilter("always")
                n_fixed = repair_level0(links0, node_vectors, int(ep), ip)
            if n_fixed:
                progress(f"graph: {n_fixed} level-0 links added so that every node "
                         "is reachable")
                st["indeg"][:] = np.bincount(links0[links0 >= 0], minlength=n)
            parent[:] = _parents(links0, int(ep))
            # Nodes the repair could not link: from the nearest reachable
            # node a search for them finds (see fix_parents).
            unreached = np.flatnonzero(parent == _hnsw.PARENT_LOST)
            if unreached.size and fix(unreached):
                warnings.warn("HNSW level-0 repair gave up; some nodes stay unreachable.")
        if publish:
            self.__dict__.update(state)
            _PENDING.pop(self, None)
        return st

    def _after_failed_write(self):
        # A partial_fit interrupted after the kernel started rewriting old
        # nodes' links cannot be undone: keep the new state (see _link),
        # whose nodes may lack a parent: the next append looks for them all.
        # (Or the pieces of a batch committed before the failing one: see
        # _add_rows.)
        state = _PENDING.pop(self, None)
        if state is not None:
            self.__dict__.update(state)
            st = _BUILD.get(self)
            if st is not None:
                st["recheck"] = True

    def _remove_rows(self, ids, removed):
        # Tombstones: the nodes stay in the graph for routing; searches
        # read ``removed_`` (updated in place by ``remove``) in node order
        # and never return them.  See ``compact``.  The sealed segments'
        # cached masks are updated in place too: O(len(ids)) per segment.
        cache = _SEGMENT_TOMBSTONES.get(self)
        if cache:
            previous = self.n_removed_ - ids.size
            for seg in self.segments_:
                entry = cache.get(seg.uid)
                if entry is None or entry[0] is not removed or entry[1] != previous:
                    cache.pop(seg.uid, None)  # computed again at next use
                    continue
                pos = _positions(seg["ids"], ids)
                entry[2][pos] = 1
                entry[1], entry[3] = self.n_removed_, entry[3] + int(pos.size)
        cached = _TOMBSTONES.get(self)
        if (self.ids_ is None or cached is None or cached[0] is not removed
                or cached[1] is not self.ids_ or cached[3].size == 0):
            return  # the view of removed_ is current, or computed at next use
        cached[3][_positions(self.ids_, ids)] = 1
        _TOMBSTONES[self] = (removed, self.ids_, self.n_removed_, cached[3])

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
        check_is_fitted(self)
        with index_writer(self):
            for seg in self.segments_:
                self._compact_segment(seg)
            self._compact_growing()
        return self

    def _after_remove(self):
        # Sealed segments past COMPACT_SHARE of removed nodes are rebuilt,
        # one at a time (see compact).  The removal itself is done: a
        # compaction that fails (memory) is reported, not raised, so that
        # remove keeps its contract (on error nothing is removed).
        for seg in self.segments_:
            with index_lock(self).read():
                _, n_dead = self._segment_tombstones(seg)
            if n_dead > COMPACT_SHARE * seg["ids"].shape[0]:
                try:
                    self._compact_segment(seg)
                except Exception as e:  # noqa: BLE001 - reported as a warning
                    warnings.warn(
                        f"the ids are removed, but compacting a segment failed "
                        f"({type(e).__name__}: {e}); call compact() to retry.",
                        RuntimeWarning)
                    return

    def _compact_segment(self, seg):
        """Replace ``seg`` by a segment of its live nodes (or drop it when
        none is left); the caller holds the writer mutex."""
        lock = index_lock(self)
        with lock.read():
            mask, n_dead = self._segment_tombstones(seg)
            if not n_dead:
                return
            live = mask == 0
            ids = np.ascontiguousarray(seg["ids"][live])
            new, rng = None, self._levels_rng_
            if ids.size:
                # _Owner: the new graph's buffers are not the estimator's.
                state, _ = self._rebuilt_graph(np.ascontiguousarray(seg["codes"][live]), ids,
                                               _Owner())
                arrays = {name: _trimmed(state[name + "_"]) for name in SEGMENT_ARRAYS}
                new = Segment(arrays, {"entry_point": int(state["entry_point_"]),
                                       "max_level": int(state["max_level_"])})
                rng = state["_levels_rng_"]
                fresh = [None, None, np.zeros(ids.size, np.uint8), 0]
        # Publishing is a reference swap (and the cache entry's).
        with lock.write():
            self.segments_ = tuple(s for s in (new if s is seg else s
                                               for s in self.segments_) if s is not None)
            self._levels_rng_ = rng
            cache = self._segment_cache()
            cache.pop(seg.uid, None)
            if new is not None:
                fresh[:2] = self.removed_, self.n_removed_
                cache[new.uid] = fresh

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
            _BUILD[self] = st

    def _rebuilt_graph(self, codes, ids, owner):
        """A new graph of the nodes ``codes`` (their ``ids``), built beside
        the index in ``owner``'s growable buffers and not published:
        (graph state, build scratch).  Linked from the raw vectors when
        kept, else the decoded codes."""
        m = codes.shape[1]
        state = self._grown_graph(_empty_graph(m, self.links0_.shape[1] // 2, codes.dtype),
                                  codes, owner)
        state["ids_"] = ids
        st = self._link(state, 0, self._node_vectors(codes, ids),
                        Progress(self.verbose, type(self).__name__), owner=owner,
                        publish=False)
        return state, st

    def _segment_cache(self):
        cache = _SEGMENT_TOMBSTONES.get(self)
        if cache is None:
            cache = _SEGMENT_TOMBSTONES[self] = {}
        return cache

    def _segment_tombstones(self, seg):
        """(uint8 node mask, number of removed nodes) of a sealed segment;
        the mask is empty when none is removed (the kernel then skips the
        check).  Computed once (O(segment)) and cached outside ``__dict__``,
        keyed by (segment uid, ``removed_``, ``n_removed_``); ``remove``
        and ``partial_fit`` keep it current at O(their ids)."""
        if not self.n_removed_:
            return _NO_TOMBSTONES, 0
        cache = self._segment_cache()
        entry = cache.get(seg.uid)
        if entry is None or entry[0] is not self.removed_ or entry[1] != self.n_removed_:
            mask = self.removed_[seg["ids"]].view(np.uint8)
            entry = [self.removed_, self.n_removed_, mask, int(np.count_nonzero(mask))]
            cache[seg.uid] = entry
        return (entry[2] if entry[3] else _NO_TOMBSTONES), entry[3]

    def _check_loaded_state(self):
        """Loaded-index invariants (see ``BasePQNeighbors``) and the graphs':
        every sealed segment and the growing graph pass ``check_graph``
        (links in range, padded with -1 only at the end of a row, an
        upper-level link at level l pointing at a node of level >= l,
        every live node reachable on level 0 from the entry point), and
        every id is stored in at most one graph, every live id in one."""
        from ._persist import check_float_array

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
        n, n_nodes = self.n_samples_fit_, self.codes_.shape[0]
        removed = (np.zeros(n, bool) if self.removed_ is None else self.removed_)
        if self.ids_ is None:
            require(n_nodes == n and not segments, "codes_ and n_samples_fit_ differ")
        upper = self.upper_links_
        require(isinstance(upper, np.ndarray) and upper.ndim == 2
                and 2 <= upper.shape[1] <= MAX_LINKS, "upper_links_ must be (rows, M)")
        m, k = cb.shape[:2]
        form = (m, k, upper.shape[1], _quantizer.code_dtype(k))
        require(isinstance(self._levels_rng_, np.random.RandomState),
                "_levels_rng_ must be a RandomState")
        stored = [check_graph(self._growing_graph(), "", *form, removed)]
        for i, seg in enumerate(segments):
            where = f"segment {i} "
            require(seg.names == sorted(SEGMENT_ARRAYS),
                    f"{where}must hold the arrays {sorted(SEGMENT_ARRAYS)}")
            require(sorted(seg.meta) == sorted(SEGMENT_META),
                    f"{where}must hold {sorted(SEGMENT_META)}")
            require(seg["ids"].shape[0] > 0, f"{where}is empty")
            stored.append(check_graph(_segment_graph(seg), where, *form, removed))
        if segments or self.ids_ is not None:
            seen = np.zeros(n, bool)
            for ids in stored:  # each graph's ids are distinct (ascending)
                require(not seen[ids].any(), "an id is stored in two graphs")
                seen[ids] = True
            require(bool(np.all(seen | removed)), "an id is neither a node nor removed")
        self._check_growing_state()

    def _check_growing_state(self):
        """The level-0 parent tree, after ``load``.  It is derived state (no
        kernel reads it; appends use it to keep every node reachable): one
        that does not hold (in range, one root at the entry point, each
        parent linking to its child) is rebuilt from the links, as it is
        for an index saved before the tree existed."""
        if not hasattr(self, "level0_parent_"):  # saved before appends grew in place
            self.level0_parent_ = _parents(self.links0_, self.entry_point_)
            return
        try:
            self._check_parent_tree()
        except ValueError:
            self.level0_parent_ = _parents(self.links0_, self.entry_point_)

    def _check_parent_tree(self):
        n = self.codes_.shape[0]
        par = self.level0_parent_
        check_int_array(par, "level0_parent_", (n,), -1, max(1, n))
        require(par.dtype == np.int32, "level0_parent_ must be int32")
        if n:
            roots = np.flatnonzero(par < 0)
            require(roots.size == 1 and roots[0] == self.entry_point_,
                    "level0_parent_ must have the entry point as its only root")
            for lo in range(0, n, 1 << 20):  # chunks bound the (rows, 2M) temporary
                child = lo + np.flatnonzero(par[lo:lo + (1 << 20)] >= 0)
                require(bool(np.all(np.any(self.links0_[par[child]] == child[:, None],
                                           axis=1))),
                        "level0_parent_ names a parent that does not link to its child")

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
        (O(n)) and cached outside ``__dict__``, keyed by (``removed_``,
        ``ids_``, ``n_removed_``): ``remove`` marks ids in place in both,
        and ``partial_fit`` extends both (see ``_remove_rows``,
        ``_extend_tombstones``), so neither pays O(n) again.  Sealed
        segments have theirs (``_segment_tombstones``).
        """
        if not self.n_removed_:
            return _NO_TOMBSTONES
        cached = _TOMBSTONES.get(self)
        if (cached is not None and cached[0] is self.removed_ and cached[1] is self.ids_
                and cached[2] == self.n_removed_):
            return cached[3]
        if self.ids_ is None:
            mask = self.removed_.view(np.uint8)
        else:
            mask = self.removed_[self.ids_]
            mask = mask.view(np.uint8) if mask.any() else _NO_TOMBSTONES
        _TOMBSTONES[self] = (self.removed_, self.ids_, self.n_removed_, mask)
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
                out.append((_segment_graph(seg), mask, live))
        # Every live id is stored exactly once: the rest are the growing
        # graph's.
        live = self._n_live - live_sealed
        if live > 0 and self.codes_.shape[0]:
            out.append((self._growing_graph(), self._tombstones(), live))
        return out

    def _growing_graph(self):
        """The growing graph as ``_graphs`` gives it (no parent tree)."""
        return {a: getattr(self, a) for a in SEARCH_ATTRS}

    def _codebooks_t(self):
        """The codebooks as the search kernel reads them: (m, ds, k) float32."""
        return np.ascontiguousarray(self.codebooks_.transpose(0, 2, 1), dtype=np.float32)

    def _graph_search(self, graph, deleted, Q, n_out, n_threads, ef=None,
                      from_entry=False, cbt=None, deleted_stride=0):
        """(dist float32, node int64, distance computations per query) of
        one graph; nodes are positions in that graph.

        ``from_entry`` skips the descent and starts the level-0 beam at the
        entry point, from which every node is reachable (see
        ``repair_level0``): with ``ef = n`` that visits the whole graph.
        """
        Q = _quantizer.padded_rows(np.ascontiguousarray(Q, dtype=np.float32),
                                   self.codebooks_)
        codes = graph["codes_"]
        nq, n = Q.shape[0], codes.shape[0]
        m, k = self.codebooks_.shape[:2]
        ef = self._ef(n_out, n) if ef is None else ef
        nt = max(1, n_threads)
        dist = np.empty((nq, n_out), dtype=np.float32)
        ind = np.empty((nq, n_out), dtype=np.int64)
        n_dist = np.zeros(nq, dtype=np.int64)
        codes8 = codes if codes.dtype == np.uint8 else np.empty((0, m), np.uint8)
        codes16 = codes if codes.dtype == np.uint16 else np.empty((0, m), np.uint16)
        cbt = self._codebooks_t() if cbt is None else cbt
        _hnsw.hnsw_search(
            Q, cbt, codes8, codes16, deleted, graph["links0_"], graph["upper_links_"],
            graph["upper_offsets_"], graph["entry_point_"],
            0 if from_entry else graph["max_level_"], ef,
            self._inner_product,
            dist, ind, n_dist,
            *visited_marks(nt, n),
            scratch(nt, n, np.float32), scratch(nt, n, np.int64),
            scratch(nt, ef + 1, np.float32), scratch(nt, ef + 1, np.int64),
            scratch(nt, m * k, np.float32), n_threads, deleted_stride,
        )
        return dist, ind, n_dist

    def _search(self, Q, n_candidates, n_threads, ranking_only=False, blocked=None):
        if blocked is not None:
            return self._search_blocked(Q, n_candidates, n_threads, blocked)
        # Fan out: each graph gives its best min(n_candidates, its live
        # nodes), mapped to ids; merge_topk keeps the best n_candidates.
        parts = []
        cbt = self._codebooks_t()
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        for graph, deleted, live in self._graphs():
            n_out = min(n_candidates, live)
            dist, ind, _ = self._graph_search(graph, deleted, Q, n_out, n_threads, cbt=cbt)
            # A beam can end with fewer live nodes than asked for (many
            # tombstones, or a start node from which few nodes are
            # reachable): search those queries again over the whole graph.
            short = ind[:, -1] == _NO_ID
            if short.any():
                d2, i2, _ = self._graph_search(graph, deleted, Q[short], n_out, n_threads,
                                               ef=graph["codes_"].shape[0], from_entry=True,
                                               cbt=cbt)
                dist[short], ind[short] = d2, i2
            if graph["ids_"] is not None:
                ind = graph["ids_"][ind]
            parts.append((dist, ind))
        return merge_topk(parts, n_candidates)

    def _search_blocked(self, Q, n_candidates, n_threads, blocked):
        """Filtered ``_search``: ``blocked`` (by id, removed ones included)
        replaces the tombstones; queries allowing few ids scan them."""
        Q = np.ascontiguousarray(Q, dtype=np.float32)
        nq = Q.shape[0]
        dist = np.full((nq, n_candidates), np.inf, dtype=np.float32)
        ind = np.full((nq, n_candidates), _NO_ID, dtype=np.int64)
        n_allowed = blocked.allowed_counts(nq)
        scan = n_allowed < max(FILTER_SCAN_MIN, FILTER_SCAN_FRACTION * self._n_live)
        graphs = [(g, g["ids_"], g["codes_"].shape[0]) for g, _, _ in self._graphs()]
        walk = np.flatnonzero(~scan)
        if walk.size:
            d, i = self._walk_blocked(Q[walk], n_candidates, n_threads,
                                      blocked.take(walk), graphs)
            dist[walk], ind[walk] = d, i
        rows = np.flatnonzero(scan)
        if rows.size:
            d, i = self._scan_blocked(Q[rows], n_candidates, n_threads,
                                      blocked.take(rows), graphs)
            dist[rows], ind[rows] = d, i
        return dist, ind

    def _walk_blocked(self, Q, n_candidates, n_threads, blocked, graphs):
        """Beam search of every graph, blocked nodes walked through."""
        nq = Q.shape[0]
        cbt = self._codebooks_t()
        parts = []
        for graph, ids, n_nodes in graphs:
            gb = blocked.for_nodes(ids)
            counts = gb.allowed_counts(nq, n_nodes if ids is None else None)
            n_out = min(n_candidates, int(counts.max()))
            if n_out == 0:
                continue
            d, i, _ = self._graph_search(graph, gb.mask, Q, n_out, n_threads, cbt=cbt,
                                         deleted_stride=gb.stride)
            # A beam that ends with fewer allowed nodes than the graph holds
            # (up to n_out): search those queries again over the whole graph.
            found = np.count_nonzero(i != _NO_ID, axis=1)
            short = np.flatnonzero(found < np.minimum(n_out, counts))
            if short.size:
                sb = gb.take(short)
                d[short], i[short], _ = self._graph_search(
                    graph, sb.mask, Q[short], n_out, n_threads, ef=n_nodes,
                    from_entry=True, cbt=cbt, deleted_stride=sb.stride)
            if ids is not None:
                ok = i != _NO_ID
                i[ok] = ids[i[ok]]
            parts.append((d, i))
        if not parts:
            return (np.full((nq, n_candidates), np.inf, np.float32),
                    np.full((nq, n_candidates), _NO_ID, np.int64))
        return merge_topk(parts, n_candidates)

    def _scan_blocked(self, Q, n_candidates, n_threads, blocked, graphs):
        """Exhaustive ADC over the allowed nodes' codes only (the few-ids
        case of a filtered search): exact ADC top ``n_candidates``."""
        nq = Q.shape[0]
        cb = self.codebooks_.astype(np.float32)
        dist = np.full((nq, n_candidates), np.inf, dtype=np.float32)
        ind = np.full((nq, n_candidates), _NO_ID, dtype=np.int64)
        per_graph = [(graph["codes_"], ids, blocked.for_nodes(ids).rows[:, :n_nodes])
                     for graph, ids, n_nodes in graphs]
        shared = not blocked.stride
        for q in range(1 if shared else nq):
            codes, owners = [], []
            for g_codes, ids, rows in per_graph:
                nodes = np.flatnonzero(rows[0 if shared else q] == 0)
                codes.append(g_codes[nodes])
                owners.append(nodes if ids is None else ids[nodes])
            if not codes:
                continue
            codes = np.concatenate(codes)
            owners = np.concatenate(owners)
            kn = min(n_candidates, codes.shape[0])
            if kn == 0:
                continue
            sel = slice(None) if shared else slice(q, q + 1)
            d, i = _scorers.adc_search(Q[sel], cb, codes, kn, self._inner_product,
                                       n_threads)
            dist[sel, :kn], ind[sel, :kn] = d, owners[i]
        return dist, ind

    def _reconstruct(self):
        d = self.n_features_in_
        if not self.segments_ and self.ids_ is None:
            return _quantizer.decode(self.codes_, self.codebooks_, d)
        out = np.zeros((self.n_samples_fit_, d), self.codebooks_.dtype)
        for seg in self.segments_:
            out[seg["ids"]] = _quantizer.decode(seg["codes"], self.codebooks_, d)
        if self.codes_.shape[0]:
            ids = np.arange(self.codes_.shape[0]) if self.ids_ is None else self.ids_
            out[ids] = _quantizer.decode(self.codes_, self.codebooks_, d)
        return out

    def search_stats(self, X, n_neighbors=None):
        """Work done per query by a search of X (no results returned).

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features)
        n_neighbors : int, default=None

        Returns
        -------
        stats : dict
            ``"distance_computations"``: mean number of ADC distances
            evaluated per query, summed over the graphs searched (every
            sealed segment and the growing graph); ``"ef"``: the beam width
            used (which accounts for ``refine_factor``, as ``kneighbors``
            does); ``"n_graphs"``: the number of graphs searched.
        """
        self._check_fitted()
        self._check_params_at_call()
        n_neighbors = _check_n_neighbors(self.n_neighbors if n_neighbors is None
                                         else n_neighbors)
        Q = self._rotate(self._validate_queries(X))
        n_threads = effective_n_threads(self.n_jobs)
        with index_lock(self).read():
            n_out = self._n_candidates(n_neighbors)
            total = np.zeros(Q.shape[0], np.int64)
            graphs = self._graphs()
            for graph, deleted, live in graphs:
                _, _, n_dist = self._graph_search(graph, deleted, Q, min(n_out, live),
                                                  n_threads)
                total += n_dist
            ef = max([self._ef(n_out, g["codes_"].shape[0]) for g, _, _ in graphs],
                     default=1)
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
        st = _BUILD.get(self)
        if st is not None and st["links0"] is self.links0_:
            spare += sum(_growable.spare_bytes(self, "build_" + key, st[key])
                         + st[key].nbytes for key in ("indeg", "visited"))
            spare += (_growable.spare_bytes(self, "build_copies", st["last_copies"])
                      + st["last_copies"].nbytes)
        cached = _TOMBSTONES.get(self)
        if cached is not None and cached[1] is not None and cached[1] is self.ids_:
            spare += cached[3].nbytes
        # By segment, not over the cache: queries may add entries meanwhile.
        cache = _SEGMENT_TOMBSTONES.get(self, {})
        entries = [cache.get(seg.uid) for seg in self.segments_]
        spare += sum(entry[2].nbytes for entry in entries if entry is not None)
        return super()._reserved_bytes() + spare


def _segment_graph(seg):
    """A sealed segment's graph under the growing graph's attribute names."""
    graph = {name + "_": seg[name] for name in SEGMENT_ARRAYS}
    meta = seg.meta
    graph["entry_point_"], graph["max_level_"] = meta["entry_point"], meta["max_level"]
    return graph


def _level0_adjacency(links0):
    """Level-0 links as a CSR matrix (row i: node i's out-links)."""
    n = links0.shape[0]
    used = links0 >= 0
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(used.sum(axis=1), out=indptr[1:])
    indices = links0[used]
    return sparse.csr_matrix((np.ones(indices.size, np.int8), indices, indptr),
                             shape=(n, n))


def _parents(links0, entry_point):
    """Level-0 parent of each node in a breadth-first tree from the entry
    point: ROOT for it, LOST for nodes it does not reach (int32)."""
    n = links0.shape[0]
    parent = np.full(n, _hnsw.PARENT_LOST, np.int32)
    if n and entry_point >= 0:
        _, pred = breadth_first_order(_level0_adjacency(links0), entry_point,
                                      directed=True, return_predecessors=True)
        reached = pred >= 0
        parent[reached] = pred[reached]
        parent[entry_point] = _hnsw.PARENT_ROOT
    return parent


def _reachable(links0, start, adjacency=None):
    """Boolean mask of the nodes reachable from ``start`` on level 0 (one
    breadth-first pass)."""
    adj = _level0_adjacency(links0) if adjacency is None else adjacency
    reach = np.zeros(links0.shape[0], bool)
    reach[breadth_first_order(adj, start, directed=True, return_predecessors=False)] = True
    return reach


def _pair_distances(vectors, a, b, inner_product, chunk=1 << 16):
    """Distances between ``vectors[a[i]]`` and ``vectors[b[i]]``, as the
    build computes them (squared L2, or minus the dot product)."""
    out = np.empty(len(a), np.float64)
    for s in range(0, len(a), chunk):
        va, vb = vectors[a[s:s + chunk]], vectors[b[s:s + chunk]]
        if inner_product:
            out[s:s + chunk] = -np.einsum("ij,ij->i", va, vb)
        else:
            diff = va - vb
            out[s:s + chunk] = np.einsum("ij,ij->i", diff, diff)
    return out


def _link_into(links0, vectors, x, u, indeg, full, inner_product):
    """Add x -> u: in a free slot of x, else instead of x's farthest link
    whose target has another incoming link from the reachable part
    (``indeg``, updated).  Returns whether a link was made; marks x in
    ``full`` when it cannot take one (in-degrees only fall during a pass,
    so it stays so)."""
    if full[x]:
        return False
    row = links0[x]
    if row[-1] < 0:  # used slots come first
        row[np.argmax(row < 0)] = u
        return True
    spare = np.flatnonzero(indeg[row] >= 2)
    if not spare.size:
        full[x] = True
        return False
    d = _pair_distances(vectors, np.full(spare.size, x), row[spare], inner_product)
    slot = spare[np.argmax(d)]
    indeg[row[slot]] -= 1
    row[slot] = u
    return True


def _nearest_first(vectors, u, cand, full, inner_product):
    cand = np.unique(cand[~full[cand]])
    d = _pair_distances(vectors, np.full(len(cand), u), cand, inner_product)
    return cand[np.argsort(d, kind="stable")]


def _link_unreachable(links0, vectors, reach, adj, inner_product):
    """One repair pass: give every source component of the unreachable
    part (a strongly connected set of unreachable nodes that no other
    unreachable node links to) one incoming link from a reachable node;
    linking the sources makes everything downstream of them reachable.

    The link x -> u is tried from the reachable nodes x that members u of
    the component link to (making the link two-way), nearest pair first,
    then from the reachable nodes those x link to, then from a bounded
    sample of the reachable nodes: the work per component is bounded, so a
    pass is linear in the size of the graph.
    """
    n = links0.shape[0]
    unreached = np.flatnonzero(~reach)
    sub = adj[unreached][:, unreached].tocoo()
    n_comp, comp = connected_components(sub, directed=True, connection="strong")
    cross = comp[sub.row] != comp[sub.col]
    is_source = np.ones(n_comp, bool)
    is_source[comp[sub.col[cross]]] = False
    # Pairs (u, x): u in a source component, x a reachable node u links to.
    rows = links0[unreached]
    pos, slot = np.nonzero(rows >= 0)
    targets = rows[pos, slot]
    keep = is_source[comp[pos]] & reach[targets]
    pos, targets = pos[keep], targets[keep]
    dist = _pair_distances(vectors, unreached[pos], targets, inner_product)
    order = np.lexsort((targets, unreached[pos], dist, comp[pos]))
    pos, targets = pos[order], targets[order]
    starts = np.searchsorted(comp[pos], np.arange(n_comp + 1))
    first_member = np.full(n_comp, -1, np.int64)
    first_member[comp[::-1]] = unreached[::-1]
    reached = np.flatnonzero(reach)
    sample = reached[np.unique(np.linspace(0, len(reached) - 1,
                                           min(len(reached), REPAIR_SAMPLE)).astype(np.int64))]
    indeg = np.bincount(links0[reached][links0[reached] >= 0], minlength=n)
    full = np.zeros(n, bool)
    added = 0
    for c in np.flatnonzero(is_source):
        lo, hi = starts[c], starts[c + 1]
        members, near = unreached[pos[lo:hi]], targets[lo:hi]
        if any(_link_into(links0, vectors, x, u, indeg, full, inner_product)
               for u, x in zip(members, near)):
            added += 1
            continue
        u = members[0] if hi > lo else first_member[c]
        hop2 = links0[near[members == u]].ravel()
        hop2 = hop2[hop2 >= 0]
        for cand in (hop2[reach[hop2]], sample):
            if any(_link_into(links0, vectors, x, u, indeg, full, inner_product)
                   for x in _nearest_first(vectors, u, cand, full, inner_product)):
                added += 1
                break
    return added


def repair_level0(links0, vectors, entry_point, inner_product=False):
    """Link every node unreachable from the entry point on level 0.

    HNSW's pruning can leave a node with no incoming link.  Each pass finds the unreachable nodes with one
    breadth-first search, groups them into strongly connected components
    and links each component that no other unreachable node reaches to the
    reachable part, from the nearest reachable node one of its members
    links to: in a free slot, else instead of a link whose target keeps
    another incoming link.  A replaced link can still cut off a cycle, so
    passes repeat (at most ``REPAIR_PASSES``).  Cost: linear in the number
    of links per pass.  Modifies ``links0`` in place; returns the number of
    links added.
    """
    n = links0.shape[0]
    added = 0
    if n == 0:
        return added
    for _ in range(REPAIR_PASSES):
        adj = _level0_adjacency(links0)
        reach = _reachable(links0, entry_point, adjacency=adj)
        if reach.all():
            return added
        added += _link_unreachable(links0, vectors, reach, adj, inner_product)
    # Rare (tiny M, inner products in very few dimensions): the nearest
    # links kept cutting other nodes off.  Link the rest without cutting
    # anything, whatever the distances.
    return added + _link_unreachable_safely(links0, vectors, entry_point, inner_product)


def _link_unreachable_safely(links0, vectors, entry_point, inner_product):
    """Make every node reachable from ``entry_point`` on level 0, for sure.

    Each pass takes a breadth-first tree of the reachable part R and gives
    every source component of the unreachable part one link from R, into a
    free slot or in place of a link that is not a tree edge.  Tree edges
    are never touched, so R stays reachable, and linking the source
    components reaches everything downstream of them: R grows every pass
    (R's links hold |R| * 2M slots and its tree only |R| - 1 edges), so the
    loop ends.  Among the slots it may use, the nearest reachable node that
    a member links to comes first.  Returns the number of links written.
    """
    n = links0.shape[0]
    added = 0
    while True:
        adj = _level0_adjacency(links0)
        order, pred = breadth_first_order(adj, entry_point, directed=True,
                                          return_predecessors=True)
        reach = np.zeros(n, bool)
        reach[order] = True
        if reach.all():
            return added
        unreached = np.flatnonzero(~reach)
        sub = adj[unreached][:, unreached].tocoo()
        n_comp, comp = connected_components(sub, directed=True, connection="strong")
        is_source = np.ones(n_comp, bool)
        cross = comp[sub.row] != comp[sub.col]
        is_source[comp[sub.col[cross]]] = False
        # Slots of reachable nodes that can take a new link: free ones, and
        # links that are not edges of the tree.
        rows = links0[order]
        usable = (rows < 0) | (pred[np.maximum(rows, 0)] != order[:, None])
        spare = {int(x): list(np.flatnonzero(ok)) for x, ok in zip(order, usable) if ok.any()}
        linked = 0
        for c in np.flatnonzero(is_source):
            u = int(unreached[np.argmax(comp == c)])
            near = links0[u][links0[u] >= 0]
            near = [int(x) for x in near[reach[near]] if int(x) in spare]
            cand = near or list(spare)[:4096]
            if not cand:
                break
            if len(cand) > 1:
                d = _pair_distances(vectors, np.full(len(cand), u), np.asarray(cand),
                                    inner_product)
                cand = [cand[i] for i in np.lexsort((cand, d))]
            x = cand[0]
            # The smallest usable slot: a link that is not a tree edge, or
            # else the first free slot (free slots trail, so -1 stays padding).
            slot = spare[x].pop(0)
            links0[x, slot] = u
            if not spare[x]:
                del spare[x]
            linked += 1
        added += linked
        if not linked:  # cannot happen (see above); never loop forever
            warnings.warn("HNSW level-0 repair gave up; some nodes stay unreachable.")
            return added


GRAPH_ATTRS = ("codes_", "levels_", "links0_", "upper_links_", "upper_offsets_",
               "level0_parent_", "entry_point_", "max_level_")
# What a search (and a load check) reads of a graph.
SEARCH_ATTRS = ("codes_", "levels_", "links0_", "upper_links_", "upper_offsets_",
                "entry_point_", "max_level_", "ids_")


def _empty_graph(m, n_links, code_dtype):
    """The graph attributes of an index with no node (fresh arrays)."""
    return {"codes_": np.empty((0, m), code_dtype), "levels_": np.empty(0, np.int32),
            "links0_": np.empty((0, 2 * n_links), np.int32),
            "upper_links_": np.empty((0, n_links), np.int32),
            "upper_offsets_": np.empty(0, np.int64),
            "level0_parent_": np.empty(0, np.int32), "entry_point_": -1,
            "max_level_": -1}


class _NodeVectors:
    """Float32 vectors of a graph's nodes, made on demand (``vectors[idx]``):
    the PQ codes decoded for nodes before ``first_new``, the given rows
    after.  The level-0 repair reads the few nodes it links this way, so
    an append never decodes the whole index."""

    def __init__(self, codes, codebooks, new_rows, first_new):
        self.codes, self.codebooks = codes, codebooks
        self.new_rows, self.first_new = new_rows, first_new

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        out = np.empty(idx.shape + (self.new_rows.shape[1],), np.float32)
        old = idx < self.first_new
        out[old] = _quantizer.decode(self.codes[idx[old]], self.codebooks)
        out[~old] = self.new_rows[idx[~old] - self.first_new]
        return out


class _Owner:
    """Holds the growable buffers of a graph built beside the index (a
    compacted segment), so that the estimator's own are not replaced."""


def _trimmed(a):
    """``a`` without the spare capacity of the buffer it views."""
    return np.array(a) if a.base is not None and a.base.nbytes != a.nbytes else a


def _positions(node_ids, ids):
    """Positions in ``node_ids`` (ascending) of those of ``ids`` it holds."""
    pos = np.searchsorted(node_ids, ids)
    inside = pos < node_ids.shape[0]
    pos, ids = pos[inside], ids[inside]
    return pos[node_ids[pos] == ids]


def check_graph(graph, where, m, k, M, code_dtype, removed):
    """Check one loaded graph (the growing graph's attribute names:
    ``codes_``, ``levels_``, ``links0_``, ``upper_links_``,
    ``upper_offsets_``, ``entry_point_``, ``max_level_``, ``ids_``) for
    what the kernels rely on; raise ValueError (``require``) otherwise.

    ``where`` prefixes the messages (empty for the growing graph); m, k:
    the codebooks'; M: links per upper-level row; ``removed``: the bool
    tombstones by id (``n_samples_fit_`` of them).  Returns the graph's
    node ids (int64, ascending)."""
    from ._persist import check_scalar_int

    n = removed.shape[0]
    codes = graph["codes_"]
    check_int_array(codes, f"{where}codes_", (None, m), 0, k, dtype=code_dtype)
    n_nodes = codes.shape[0]
    ids = graph["ids_"]
    if ids is None:
        require(n_nodes <= n, f"{where}codes_ and n_samples_fit_ differ")
        ids = np.arange(n_nodes, dtype=np.int64)
    else:
        check_int_array(ids, f"{where}ids_", (n_nodes,), 0, n, dtype=np.int64)
        require(bool(np.all(ids[1:] > ids[:-1])), f"{where}ids_ must be increasing")
    levels, links0, upper = graph["levels_"], graph["links0_"], graph["upper_links_"]
    check_int_array(levels, f"{where}levels_", (n_nodes,), 0, MAX_LEVEL + 1, dtype=np.int32)
    off = np.zeros(n_nodes, np.int64)
    np.cumsum(levels[:-1], out=off[1:])
    check_int_array(graph["upper_offsets_"], f"{where}upper_offsets_", (n_nodes,), 0, 2**62,
                    dtype=np.int64)
    require(np.array_equal(graph["upper_offsets_"], off),
            f"{where}upper_offsets_ do not match levels_")
    check_int_array(links0, f"{where}links0_", (n_nodes, 2 * M), -1, n_nodes, dtype=np.int32)
    n_rows = int(levels.sum(dtype=np.int64))
    check_int_array(upper, f"{where}upper_links_", (n_rows, M), -1, n_nodes, dtype=np.int32)
    for name, links in (("links0_", links0), ("upper_links_", upper)):
        unused = links < 0  # the kernels stop at the first -1 of a row
        require(bool(np.all(unused[:, 1:] >= unused[:, :-1])),
                f"{where}{name} has links after an unused (-1) slot")
    # Row r of upper_links_ is level row_level[r] of its node: its links
    # must reach nodes that have that level.
    row_level = np.arange(n_rows) - np.repeat(off, levels) + 1
    used = upper >= 0
    require(bool(np.all(levels[upper[used]] >= np.broadcast_to(
        row_level[:, None], upper.shape)[used])),
        f"{where}an upper-level link points at a node without that level")
    entry = check_scalar_int(graph["entry_point_"], f"{where}entry_point_", -1,
                             max(n_nodes, 0))
    top = check_scalar_int(graph["max_level_"], f"{where}max_level_", -1, MAX_LEVEL + 1)
    if n_nodes == 0:
        require(entry == -1 and top == -1, f"{where}an empty graph has no entry point")
        return ids
    require(entry >= 0 and levels[entry] == top == int(levels.max()),
            f"{where}entry_point_ is not on the top level")
    require(bool(np.all(_reachable(links0, entry) | removed[ids])),
            f"{where}a live node is unreachable from the entry point on level 0")
    return ids
