"""The HNSW graph: grow, link, repair, check and search one graph.

A hierarchical navigable small-world graph (Malkov and Yashunin, IEEE
TPAMI 2018) over PQ codes.  A graph is a dict of arrays named as the
growing graph's attributes of :class:`~pqsk.HNSWPQNeighbors` (see
``GRAPH_ATTRS`` and ``SEARCH_ATTRS``): ``codes_`` (n, m), ``levels_``
(n,) int32, ``links0_`` (n, 2 * M) int32, ``upper_links_`` (sum of the
levels, M) int32, ``upper_offsets_`` (n,) int64, ``level0_parent_`` (n,)
int32, ``entry_point_`` and ``max_level_`` (ints), and for a search
``ids_`` (int64, or None when node i is id i).  Unused link slots hold -1,
after the used ones.

The graph holds link structure only.  Distances come from the nodes'
float32 vectors while linking (the new nodes' rows, the old nodes'
decoded codes) and from ADC lookups on the codes while searching, both
computed by the kernels of ``_hnsw.pyx`` (their ``Dist`` context).
Nothing here reads an estimator: the caller passes the codebooks, the
metric, the beam widths and the owner of the growable buffers
(``_growable``) that the graph's arrays grow in.
"""

import threading
import warnings

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import breadth_first_order, connected_components

from . import _growable, _hnsw, _quantizer
from ._checks import check_int_array, check_scalar_int, require
from ._segments import NO_ID, merge_topk

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

# The arrays and scalars of a graph, as the estimator's attributes.
GRAPH_ATTRS = ("codes_", "levels_", "links0_", "upper_links_", "upper_offsets_",
               "level0_parent_", "entry_point_", "max_level_")
# What a search (and a load check) reads of a graph.
SEARCH_ATTRS = ("codes_", "levels_", "links0_", "upper_links_", "upper_offsets_",
                "entry_point_", "max_level_", "ids_")
# Arrays of a sealed segment (a graph, as the growing graph's attributes
# without the trailing underscore) and its scalars.
SEGMENT_ARRAYS = ("codes", "levels", "links0", "upper_links", "upper_offsets", "ids")
SEGMENT_META = ("entry_point", "max_level")

_MARKS = threading.local()  # this Python thread's visited marks (visited_marks)


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


def empty_graph(m, n_links, code_dtype):
    """The graph attributes of an index with no node (fresh arrays)."""
    return {"codes_": np.empty((0, m), code_dtype), "levels_": np.empty(0, np.int32),
            "links0_": np.empty((0, 2 * n_links), np.int32),
            "upper_links_": np.empty((0, n_links), np.int32),
            "upper_offsets_": np.empty(0, np.int64),
            "level0_parent_": np.empty(0, np.int32), "entry_point_": -1,
            "max_level_": -1}


def segment_graph(seg):
    """A sealed segment's graph under the growing graph's attribute names."""
    graph = {name + "_": seg[name] for name in SEGMENT_ARRAYS}
    meta = seg.meta
    graph["entry_point_"], graph["max_level_"] = meta["entry_point"], meta["max_level"]
    return graph


class _NodeVectors:
    """Float32 vectors of a graph's nodes, made on demand (``vectors[idx]``):
    the PQ codes decoded for nodes before ``first_new``, the given rows
    after.  The level-0 repair reads the few nodes it links this way, so
    an append never decodes the whole index."""

    def __init__(self, codes, codebooks, new_rows, first_new, walk=None, ids=None):
        self.codes, self.codebooks = codes, codebooks
        self.new_rows, self.first_new = new_rows, first_new
        self.walk, self.ids = walk, ids  # old nodes from the tier (see link)

    def __getitem__(self, idx):
        idx = np.asarray(idx)
        out = np.empty(idx.shape + (self.new_rows.shape[1],), np.float32)
        old = idx < self.first_new
        if self.walk is not None:
            nodes = idx[old]
            out[old] = self.walk.node_rows(nodes if self.ids is None else self.ids[nodes],
                                           out.shape[-1])
        else:
            out[old] = _quantizer.decode(self.codes[idx[old]], self.codebooks)
        out[~old] = self.new_rows[idx[~old] - self.first_new]
        return out


class BufferOwner:
    """Holds the growable buffers of a graph built beside the index (a
    compacted segment), so that the estimator's own are not replaced."""


def trimmed(a):
    """``a`` without the spare capacity of the buffer it views."""
    return np.array(a) if a.base is not None and a.base.nbytes != a.nbytes else a


# -- growing and linking ------------------------------------------------------

def grow(graph, codes, random_state, owner):
    """``graph`` with ``codes`` appended as unlinked nodes: levels drawn
    from ``random_state`` (advanced), link slots -1, parents
    ``PARENT_LOST``.

    The arrays grow in place past the used rows, in the growable buffers
    of ``owner`` (see ``_growable``); the rows ``graph`` shows are not
    changed.  Returns the new graph dict (the other entries of ``graph``
    are kept).
    """
    n_old, b = graph["codes_"].shape[0], codes.shape[0]
    M = graph["links0_"].shape[1] // 2
    new_levels = sample_levels(b, M, random_state)
    n_rows = graph["upper_links_"].shape[0]  # = the sum of the old levels
    state = dict(graph)
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


def build_scratch(graph, n_old, n, owner, kept=None):
    """In-degrees, copy chains and visited marks for a build that adds
    nodes n_old .. n - 1 to ``graph``, grown in ``owner``'s buffers.

    ``kept`` is the scratch the last build returned, when the graph it
    built is ``graph``'s first n_old nodes unchanged since: it is then
    extended (O(new nodes)), else computed (O(n), after a load or an
    unpickling)."""
    st = kept
    if not (st is not None and n_old and st["indeg"].shape[0] == n_old):
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



def build_scratch_bytes(scratch, owner):
    """Bytes held by a build scratch whose buffers ``owner`` holds, their
    spare capacity included."""
    buffers = (("indeg", "build_indeg"), ("visited", "build_visited"),
               ("last_copies", "build_copies"))
    return sum(_growable.spare_bytes(owner, name, scratch[key]) + scratch[key].nbytes
               for key, name in buffers)

def _split_codes(codes):
    """(codes8, codes16): ``codes`` as the one its dtype fits, the other
    empty, as the kernels take them."""
    m = codes.shape[1]
    return (codes if codes.dtype == np.uint8 else np.empty((0, m), np.uint8),
            codes if codes.dtype == np.uint16 else np.empty((0, m), np.uint16))


def link(state, n_old, vectors, codebooks, ef_construction, inner_product, progress,
         owner, kept=None, before_write=None, walk=None):
    """Link nodes n_old .. n - 1 of the grown graph ``state`` (see ``grow``)
    and make every node reachable from the entry point on level 0.

    Parameters
    ----------
    state : dict
        The graph, modified in place: its arrays (old nodes gain
        back-links), ``entry_point_`` and ``max_level_``.
    n_old : int
        Nodes already linked.
    vectors : ndarray of shape (n - n_old, n_features), float32
        The new nodes' rows; old nodes are decoded from their codes where
        a distance needs them.
    codebooks : ndarray of shape (n_subspaces, n_codewords, ds)
    ef_construction : int
        Beam width of an insertion (capped at n).
    inner_product : bool
        Distances are minus dot products instead of squared L2.
    progress : Progress
    owner : object
        Holds the growable buffers of the build scratch.
    kept : dict, default=None
        The build scratch the last build returned, if it built ``state``'s
        first n_old nodes (see ``build_scratch``).
    before_write : callable, default=None
        Called with the build scratch once everything that can fail
        before the kernel runs is done: from then on the old nodes' rows
        are being rewritten in place, so ``state`` is the graph even if an
        interrupt comes.
    walk : TierWalk, default=None
        The index's compact tier (:class:`pqsk._tierwalk.TierWalk`), in the
        space of ``vectors`` (no rotation): old nodes are then decoded from
        their tier rows (found by ``state["ids_"]``), not their codes.

    Returns
    -------
    scratch : dict
        The build scratch, to pass as ``kept`` to the next build of this
        graph.
    """
    # The kernel reads rows in the codebooks' padded layout (a copy only
    # when n_subspaces does not divide n_features).
    vectors = _quantizer.padded_rows(vectors, codebooks)
    links0, upper = state["links0_"], state["upper_links_"]
    n, M0 = links0.shape
    codes = state["codes_"]
    ip = inner_product
    ep, top = state["entry_point_"], state["max_level_"]
    st = build_scratch(state, n_old, n, owner, kept)
    ef_c = max(1, min(ef_construction, n))
    width = M0 + 1
    D = vectors.shape[1]
    cb = np.ascontiguousarray(codebooks, dtype=np.float32)
    codes8, codes16 = _split_codes(codes)
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
    tier_kw = {} if walk is None or not n_old else walk.build_kw(state.get("ids_"))
    # Point of no return: the kernel rewrites old nodes' rows in place.
    if before_write is not None:
        before_write(st)
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
                lost=lost, counts=counts, **tier_kw,
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
            np.empty(3 * D, np.float32), **tier_kw)

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
                        else _NodeVectors(codes, cb, vectors, n_old, walk if tier_kw else None,
                                          state.get("ids_")))
        with warnings.catch_warnings(record=True):  # fix() has the last word
            warnings.simplefilter("always")
            n_fixed = repair_level0(links0, node_vectors, int(ep), ip)
        if n_fixed:
            progress(f"graph: {n_fixed} level-0 links added so that every node "
                     "is reachable")
            st["indeg"][:] = np.bincount(links0[links0 >= 0], minlength=n)
        parent[:] = level0_parents(links0, int(ep))
        # Nodes the repair could not link: from the nearest reachable
        # node a search for them finds (see fix_parents).
        unreached = np.flatnonzero(parent == _hnsw.PARENT_LOST)
        if unreached.size and fix(unreached):
            warnings.warn("HNSW level-0 repair gave up; some nodes stay unreachable.")
    return st


# -- search -------------------------------------------------------------------

def codebooks_t(codebooks):
    """The codebooks as the search kernel reads them: (m, ds, k) float32."""
    return np.ascontiguousarray(codebooks.transpose(0, 2, 1), dtype=np.float32)


def search(graph, deleted, Q, n_out, ef, codebooks, inner_product, n_threads,
           from_entry=False, cbt=None, deleted_stride=0, walk=None):
    """ADC search of one graph: greedy descent through the upper levels,
    then a beam of width ``ef`` (>= n_out) on level 0.  With a ``walk``
    (a :class:`pqsk._tierwalk.TierWalk`) nodes are scored by their tier
    rows instead of their codes (``ids_`` is then read).

    Parameters
    ----------
    graph : dict
        The graph's arrays (``SEARCH_ATTRS``; ``ids_`` is read by a tier walk only).
    deleted : ndarray of uint8
        Nodes walked through but never returned: (n,) for every query, or
        one row per query ``deleted_stride`` apart; empty for none.
    Q : ndarray of shape (n_queries, n_features)
    n_out : int
    ef : int
    codebooks : ndarray of shape (n_subspaces, n_codewords, ds)
    inner_product : bool
    n_threads : int
    from_entry : bool, default=False
        Skip the descent and start the level-0 beam at the entry point,
        from which every node is reachable (see ``repair_level0``): with
        ``ef = n`` that visits the whole graph.
    cbt : ndarray, default=None
        ``codebooks_t(codebooks)``, when the caller has it.
    deleted_stride : int, default=0
    walk : TierWalk, default=None

    Returns
    -------
    dist : ndarray of shape (n_queries, n_out), float32
    ind : ndarray of shape (n_queries, n_out), int64
        Positions in the graph, sorted by (distance, position); slots past
        the nodes found hold (+inf, INT64_MAX).
    n_dist : ndarray of shape (n_queries,), int64
        Distance computations per query.
    """
    if walk is None:
        Q = _quantizer.padded_rows(np.ascontiguousarray(Q, dtype=np.float32), codebooks)
        walk_kw = {}
    else:
        Q = walk.queries(Q)
        walk_kw = walk.kernel_kw(graph["ids_"])
    codes = graph["codes_"]
    nq, n = Q.shape[0], codes.shape[0]
    m, k = codebooks.shape[:2]
    nt = max(1, n_threads)
    dist = np.empty((nq, n_out), dtype=np.float32)
    ind = np.empty((nq, n_out), dtype=np.int64)
    n_dist = np.zeros(nq, dtype=np.int64)
    codes8, codes16 = _split_codes(codes)
    cbt = codebooks_t(codebooks) if cbt is None else cbt
    scratch = _quantizer.scratch
    _hnsw.hnsw_search(
        Q, cbt, codes8, codes16, deleted, graph["links0_"], graph["upper_links_"],
        graph["upper_offsets_"], graph["entry_point_"],
        0 if from_entry else graph["max_level_"], ef,
        inner_product,
        dist, ind, n_dist,
        *visited_marks(nt, n),
        scratch(nt, n, np.float32), scratch(nt, n, np.int64),
        scratch(nt, ef + 1, np.float32), scratch(nt, ef + 1, np.int64),
        scratch(nt, m * k, np.float32), n_threads, deleted_stride, **walk_kw,
    )
    return dist, ind, n_dist



def search_complete(graph, deleted, Q, n_out, ef, codebooks, inner_product, n_threads,
                    cbt=None, deleted_stride=0, wanted=None, walk=None):
    """``search`` (same parameters), with the queries whose beam ended
    holding fewer than ``wanted`` nodes (int or (n_queries,); default
    n_out) searched again over the whole graph.

    A beam can come short when many nodes are marked ``deleted``, or when
    few nodes are reachable from where the descent ended; a beam as wide
    as the graph from the entry point, from which every node is
    reachable, finds every node it may return.  Returns (dist, ind).
    """
    cbt = codebooks_t(codebooks) if cbt is None else cbt
    dist, ind, _ = search(graph, deleted, Q, n_out, ef, codebooks, inner_product, n_threads,
                          cbt=cbt, deleted_stride=deleted_stride, walk=walk)
    found = np.count_nonzero(ind != NO_ID, axis=1)
    short = np.flatnonzero(found < (n_out if wanted is None else wanted))
    if short.size:
        if deleted_stride:  # one row of marks per query
            deleted = np.ascontiguousarray(deleted.reshape(-1, deleted_stride)[short]).ravel()
        dist[short], ind[short], _ = search(
            graph, deleted, np.asarray(Q)[short], n_out, graph["codes_"].shape[0], codebooks,
            inner_product, n_threads, from_entry=True, cbt=cbt, deleted_stride=deleted_stride,
            walk=walk)
    return dist, ind


def search_graphs(graphs, Q, n_candidates, ef_of, codebooks, inner_product, n_threads,
                  walk=None):
    """Beam search of several graphs (an index's sealed segments and its
    growing graph) and merge of their answers (``walk``: see ``search``).

    ``graphs``: (graph, tombstones (uint8 by node, or empty), live nodes)
    of each graph; ``ef_of(n_out, n_nodes)``: the beam width.  Each graph
    gives its best min(n_candidates, live nodes), queries whose beam came
    short searched again over the whole graph (:func:`search_complete`),
    mapped to ids (``graph["ids_"]``; None: node i is id i).  Returns
    (dist (nq, n_candidates) float32, ids (nq, n_candidates) int64), rows
    sorted by (distance, id), empty slots (+inf, NO_ID).
    """
    cbt = codebooks_t(codebooks)
    parts = []
    for graph, deleted, live in graphs:
        n_out = min(n_candidates, live)
        dist, ind = search_complete(graph, deleted, Q, n_out,
                                    ef_of(n_out, graph["codes_"].shape[0]), codebooks,
                                    inner_product, n_threads, cbt=cbt, walk=walk)
        if graph["ids_"] is not None:
            ind = graph["ids_"][ind]
        parts.append((dist, ind))
    return merge_topk(parts, n_candidates)


def search_work(graphs, Q, n_candidates, ef_of, codebooks, inner_product, n_threads,
                walk=None):
    """(distance computations per query (nq,) int64, summed over the
    graphs, the widest beam used) of a :func:`search_graphs` of Q, one
    beam per graph (no second search of short beams)."""
    cbt = codebooks_t(codebooks)
    total = np.zeros(Q.shape[0], np.int64)
    for graph, deleted, live in graphs:
        n_out = min(n_candidates, live)
        _, _, n_dist = search(graph, deleted, Q, n_out,
                              ef_of(n_out, graph["codes_"].shape[0]), codebooks,
                              inner_product, n_threads, cbt=cbt, walk=walk)
        total += n_dist
    ef = max([ef_of(n_candidates, g["codes_"].shape[0]) for g, _, _ in graphs], default=1)
    return total, ef


def search_blocked(graphs, blocked, Q, n_candidates, ef_of, codebooks, inner_product,
                   n_threads, walk=None):
    """Filtered beam search of several graphs, blocked nodes walked through.

    ``graphs``: (graph, node ids or None, n_nodes) of each graph (sealed
    segments, then the growing graph); ``blocked``: a
    :class:`pqsk._filter.Blocked` by id; ``ef_of(n_out, n_nodes)``: the
    beam width.  Each graph gives its best min(n_candidates, allowed
    nodes), queries whose beam came short searched again over the whole
    graph (:func:`search_complete`); the parts are merged.  Returns (dist
    (nq, n_candidates) float32, ids (nq, n_candidates) int64), rows sorted,
    empty slots (+inf, NO_ID).
    """
    nq = Q.shape[0]
    cbt = codebooks_t(codebooks)
    parts = []
    for graph, ids, n_nodes in graphs:
        gb = blocked.for_nodes(ids)
        counts = gb.allowed_counts(nq, n_nodes if ids is None else None)
        n_out = min(n_candidates, int(counts.max()))
        if n_out == 0:
            continue
        d, i = search_complete(graph, gb.mask, Q, n_out, ef_of(n_out, n_nodes), codebooks,
                               inner_product, n_threads, cbt=cbt, deleted_stride=gb.stride,
                               wanted=np.minimum(n_out, counts), walk=walk)
        if ids is not None:
            ok = i != NO_ID
            i[ok] = ids[i[ok]]
        parts.append((d, i))
    if not parts:
        return (np.full((nq, n_candidates), np.inf, np.float32),
                np.full((nq, n_candidates), NO_ID, np.int64))
    return merge_topk(parts, n_candidates)


# -- reachability on level 0 --------------------------------------------------

def _level0_adjacency(links0):
    """Level-0 links as a CSR matrix (row i: node i's out-links)."""
    n = links0.shape[0]
    used = links0 >= 0
    indptr = np.zeros(n + 1, np.int64)
    np.cumsum(used.sum(axis=1), out=indptr[1:])
    indices = links0[used]
    return sparse.csr_matrix((np.ones(indices.size, np.int8), indices, indptr),
                             shape=(n, n))


def level0_parents(links0, entry_point):
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

    HNSW's pruning can leave a node with no incoming link.  Each pass
    finds the unreachable nodes with one breadth-first search, groups them
    into strongly connected components
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


# -- checks of a loaded graph ------------------------------------------------

def check_graph(graph, where, m, k, M, code_dtype, removed):
    """Check one loaded graph (the growing graph's attribute names:
    ``codes_``, ``levels_``, ``links0_``, ``upper_links_``,
    ``upper_offsets_``, ``entry_point_``, ``max_level_``, ``ids_``) for
    what the kernels rely on; raise ValueError (``require``) otherwise.

    ``where`` prefixes the messages (empty for the growing graph); m, k:
    the codebooks'; M: links per upper-level row; ``removed``: the bool
    tombstones by id (``n_samples_fit_`` of them).  Returns the graph's
    node ids (int64, ascending)."""
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



def check_graphs(growing, segments, m, k, code_dtype, removed):
    """Check a loaded index's graphs: the growing one (a graph dict with
    ``ids_``) and the sealed ``segments`` (each a
    :class:`~pqsk._segments.Segment` of ``SEGMENT_ARRAYS`` and
    ``SEGMENT_META``).  Each passes ``check_graph``, every id is stored in
    at most one graph and every live id in one; raise ValueError
    (``require``) otherwise.

    m, k, code_dtype: the codebooks' shape and the codes' dtype;
    ``removed``: the bool tombstones by id (``n_samples_fit_`` of them).
    """
    n, n_nodes = removed.shape[0], growing["codes_"].shape[0]
    if growing["ids_"] is None:
        require(n_nodes == n and not segments, "codes_ and n_samples_fit_ differ")
    upper = growing["upper_links_"]
    require(isinstance(upper, np.ndarray) and upper.ndim == 2
            and 2 <= upper.shape[1] <= MAX_LINKS, "upper_links_ must be (rows, M)")
    form = (m, k, upper.shape[1], code_dtype)
    stored = [check_graph(growing, "", *form, removed)]
    for i, seg in enumerate(segments):
        where = f"segment {i} "
        require(seg.names == sorted(SEGMENT_ARRAYS),
                f"{where}must hold the arrays {sorted(SEGMENT_ARRAYS)}")
        require(sorted(seg.meta) == sorted(SEGMENT_META),
                f"{where}must hold {sorted(SEGMENT_META)}")
        require(seg["ids"].shape[0] > 0, f"{where}is empty")
        stored.append(check_graph(segment_graph(seg), where, *form, removed))
    if segments or growing["ids_"] is not None:
        seen = np.zeros(n, bool)
        for ids in stored:  # each graph's ids are distinct (ascending)
            require(not seen[ids].any(), "an id is stored in two graphs")
            seen[ids] = True
        require(bool(np.all(seen | removed)), "an id is neither a node nor removed")


def check_parent_tree(links0, parent, entry_point):
    """Check a level-0 parent tree (see ``level0_parents``): int32, in range, one
    root at the entry point, each parent linking to its child; raise
    ValueError (``require``) otherwise."""
    n = links0.shape[0]
    check_int_array(parent, "level0_parent_", (n,), -1, max(1, n))
    require(parent.dtype == np.int32, "level0_parent_ must be int32")
    if n:
        roots = np.flatnonzero(parent < 0)
        require(roots.size == 1 and roots[0] == entry_point,
                "level0_parent_ must have the entry point as its only root")
        for lo in range(0, n, 1 << 20):  # chunks bound the (rows, 2M) temporary
            child = lo + np.flatnonzero(parent[lo:lo + (1 << 20)] >= 0)
            require(bool(np.all(np.any(links0[parent[child]] == child[:, None], axis=1))),
                    "level0_parent_ names a parent that does not link to its child")
