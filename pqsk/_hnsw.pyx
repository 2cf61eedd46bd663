"""Hierarchical navigable small-world graph kernels (Malkov & Yashunin,
"Efficient and robust approximate nearest neighbor search using
Hierarchical Navigable Small World graphs", IEEE TPAMI 2018).

The graph is link structure only, in flat int32 arrays:

* ``links0[i, :]``: the (at most 2 * M) level-0 neighbours of node i;
* node i with level L >= 1 owns rows ``upper_off[i] .. upper_off[i] + L - 1``
  of ``upper`` (at most M neighbours per row), row ``upper_off[i] + l - 1``
  being level l;
* unused slots hold -1.

Distances come from a ``Dist`` context, so the same graph code serves the
build (exact distances between float32 vectors) and the search (ADC: a
query's lookup tables against the stored codes).  All functions are
``noexcept nogil`` and never allocate: scratch space is passed in.

Appends insert into the existing graph: the build is given float32
vectors for the new nodes only, and decodes an old node from its PQ code
(m codewords copied, as cheap as one distance) whenever a distance
involves it, so no vector of the old nodes is kept or copied.
"""

cimport cython
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uintptr_t
from libc.string cimport memcmp, memcpy, memset
from libc.math cimport INFINITY
from libc.stdint cimport INT64_MAX

from ._heap cimport heap_sort, vheap_push, vheap_pop
from ._kernels cimport build_table

cdef enum:
    EXACT = 0
    ADC = 1
    TIER = 2                 # a compact tier's rows (the tier walk)

cdef extern from "_tierwalk.h" nogil:
    ctypedef struct pqsk_tw_tier:
        const uintptr_t* part_ptr
        const int64_t* part_start
        Py_ssize_t n_parts
        const int64_t* ids
        Py_ssize_t d
        Py_ssize_t row_bytes
        int is_int8
        const float* off
        const float* sc
        int unit_norm
        int inner_product
        int simd
        double eps10
    int pqsk_rr_cpu_has_avx2_f16c()
    float pqsk_tw_dist(const pqsk_tw_tier* t, const float* q, double qn, int64_t node)
    void pqsk_tw_prefetch(const pqsk_tw_tier* t, int64_t node)
    void pqsk_tw_decode(const pqsk_tw_tier* t, int64_t node, float* out)

cdef extern from *:
    """
    #if defined(__GNUC__) || defined(__clang__)
    #define PQSK_PREFETCH(p) __builtin_prefetch((const void *)(p))
    #else
    #define PQSK_PREFETCH(p) ((void)0)
    #endif
    """
    void PQSK_PREFETCH(const void* p) noexcept nogil


cdef struct Graph:
    int32_t* links0
    int32_t* upper
    const int64_t* upper_off
    Py_ssize_t M
    Py_ssize_t M0


cdef struct Dist:
    int kind                 # EXACT, ADC or TIER
    bint inner_product       # distance = -<q, x> instead of ||q - x||^2
    const float* vectors     # EXACT: (n - first_new, dim) float32, nodes first_new..
    int64_t first_new        # EXACT: nodes below it are decoded from their codes
    Py_ssize_t dim
    const float* query       # EXACT: (dim,) the vector being inserted
    const float* codebooks   # EXACT: (m, k, ds) float32, to decode old nodes
    Py_ssize_t ds
    float* dec_a             # EXACT: scratch (dim,) each, for decoded vectors
    float* dec_b
    const float* table       # ADC: (m, k)
    const uint8_t* codes8    # (n, m), one of codes8 / codes16 (ADC: every node;
    const uint16_t* codes16  #  EXACT: at least the nodes below first_new)
    Py_ssize_t m
    Py_ssize_t k
    const pqsk_tw_tier* tier # TIER: the nodes' tier rows (query: d.query); EXACT:
                             #  if not NULL, where old nodes are decoded from
    double qn                # TIER: ||query||^2
    int64_t count            # distance computations so far


cdef struct Work:
    const uint8_t* deleted   # (n,) tombstones (route through, never return) or NULL
    uint32_t* visited        # (n,) generation marks
    uint32_t gen
    float* cand_d            # (capacity,) candidate min-heap, distances negated
    int64_t* cand_i
    float* res_d             # (ef,) result max-heap
    int64_t* res_i


cdef inline int32_t* node_links(Graph* g, int64_t node, int level,
                                Py_ssize_t* cap) noexcept nogil:
    if level == 0:
        cap[0] = g.M0
        return g.links0 + node * g.M0
    cap[0] = g.M
    return g.upper + (g.upper_off[node] + level - 1) * g.M


cdef inline float vec_dist(Dist* d, const float* a, const float* b) noexcept nogil:
    """Squared L2 (or minus the dot product) of two float32 vectors.

    Four partial sums: without them every addition waits for the previous
    one (no -ffast-math, so the compiler may not reorder the sum itself).
    """
    cdef Py_ssize_t t = 0, n = d.dim
    cdef float s0 = 0, s1 = 0, s2 = 0, s3 = 0, x0, x1, x2, x3
    if d.inner_product:
        while t + 4 <= n:
            s0 -= a[t] * b[t]
            s1 -= a[t + 1] * b[t + 1]
            s2 -= a[t + 2] * b[t + 2]
            s3 -= a[t + 3] * b[t + 3]
            t += 4
        while t < n:
            s0 -= a[t] * b[t]
            t += 1
    else:
        while t + 4 <= n:
            x0 = a[t] - b[t]
            x1 = a[t + 1] - b[t + 1]
            x2 = a[t + 2] - b[t + 2]
            x3 = a[t + 3] - b[t + 3]
            s0 += x0 * x0
            s1 += x1 * x1
            s2 += x2 * x2
            s3 += x3 * x3
            t += 4
        while t < n:
            x0 = a[t] - b[t]
            s0 += x0 * x0
            t += 1
    return (s0 + s1) + (s2 + s3)


cdef inline const float* node_vec(Dist* d, int64_t node, float* buf) noexcept nogil:
    """A build node's float32 vector: its row of ``d.vectors`` if it is new,
    else its decoded PQ code, written to ``buf`` (dim,)."""
    cdef Py_ssize_t j
    cdef int64_t c
    if node >= d.first_new:
        return d.vectors + (node - d.first_new) * d.dim
    if d.tier != NULL:                   # its tier row, zero-padded to dim
        pqsk_tw_decode(d.tier, node, buf)
        if d.tier.d < d.dim:
            memset(buf + d.tier.d, 0, (d.dim - d.tier.d) * sizeof(float))
        return buf
    for j in range(d.m):
        c = d.codes8[node * d.m + j] if d.codes8 != NULL else d.codes16[node * d.m + j]
        memcpy(buf + j * d.ds, d.codebooks + (j * d.k + c) * d.ds, d.ds * sizeof(float))
    return buf


cdef inline void prefetch_node(Dist* d, int64_t node) noexcept nogil:
    """Ask for a node's data ahead of its distance: graph walks jump
    around memory, and the load latency, not the arithmetic, dominates."""
    cdef Py_ssize_t off
    if d.kind == TIER or (d.kind == EXACT and node < d.first_new and d.tier != NULL):
        pqsk_tw_prefetch(d.tier, node)
    elif d.kind == EXACT and node >= d.first_new:
        node -= d.first_new
        off = 0
        while off < d.dim:
            PQSK_PREFETCH(d.vectors + node * d.dim + off)
            off += 16                      # one 64-byte line of float32
    elif d.codes8 != NULL:
        PQSK_PREFETCH(d.codes8 + node * d.m)
    else:
        PQSK_PREFETCH(d.codes16 + node * d.m)


cdef inline float dist_q(Dist* d, int64_t node) noexcept nogil:
    """Distance between the context's query and a node."""
    cdef Py_ssize_t j
    cdef float s = 0
    cdef const float* t = d.table
    d.count += 1
    if d.kind == EXACT:
        return vec_dist(d, d.query, node_vec(d, node, d.dec_a))
    if d.kind == TIER:
        return pqsk_tw_dist(d.tier, d.query, d.qn, node)
    if d.codes8 != NULL:
        for j in range(d.m):
            s += t[d.codes8[node * d.m + j]]
            t += d.k
    else:
        for j in range(d.m):
            s += t[d.codes16[node * d.m + j]]
            t += d.k
    return s


cdef inline float dist_nodes(Dist* d, int64_t a, int64_t b) noexcept nogil:
    """Distance between two stored nodes (build only)."""
    d.count += 1
    return vec_dist(d, node_vec(d, a, d.dec_a), node_vec(d, b, d.dec_b))


cdef inline void next_generation(Work* w, Py_ssize_t n) noexcept nogil:
    w.gen += 1
    if w.gen == 0:                       # wrapped: clear once every 2**32 searches
        memset(w.visited, 0, n * sizeof(uint32_t))
        w.gen = 1


cdef int64_t greedy(Graph* g, Dist* d, int64_t cur, float* d_cur,
                    int level) noexcept nogil:
    """Move to the nearest neighbour while it is closer (ef = 1)."""
    cdef bint changed = True
    cdef Py_ssize_t cap, t
    cdef int32_t* links
    cdef int64_t e
    cdef float de
    while changed:
        changed = False
        links = node_links(g, cur, level, &cap)
        for t in range(cap):
            if links[t] < 0:
                break
            prefetch_node(d, links[t])
        for t in range(cap):
            e = links[t]
            if e < 0:
                break
            de = dist_q(d, e)
            if de < d_cur[0] or (de == d_cur[0] and e < cur):
                d_cur[0] = de
                cur = e
                changed = True
    return cur


cdef Py_ssize_t search_layer(Graph* g, Dist* d, Work* w, Py_ssize_t n,
                             int64_t entry, float d_entry, Py_ssize_t ef,
                             int level) noexcept nogil:
    """Best-first beam search of width ``ef`` on one level.

    Leaves the (at most ef) best nodes found in the max-heap
    ``w.res_d / w.res_i`` and returns their number.  Tombstoned nodes
    (``w.deleted``) are walked through but never enter the results.
    """
    cdef Py_ssize_t n_cand = 0, n_res = 0, cap, t
    cdef int32_t* links
    cdef int64_t c, e
    cdef float dc, de
    next_generation(w, n)
    w.visited[entry] = w.gen
    vheap_push(w.cand_d, w.cand_i, &n_cand, -d_entry, -entry)
    if w.deleted == NULL or not w.deleted[entry]:
        vheap_push(w.res_d, w.res_i, &n_res, d_entry, entry)
    while n_cand > 0:
        dc = -w.cand_d[0]
        c = -w.cand_i[0]
        if n_res >= ef and dc > w.res_d[0]:
            break
        vheap_pop(w.cand_d, w.cand_i, &n_cand)
        links = node_links(g, c, level, &cap)
        for t in range(cap):
            e = links[t]
            if e < 0:
                break
            if w.visited[e] != w.gen:
                prefetch_node(d, e)
        for t in range(cap):
            e = links[t]
            if e < 0:
                break
            if w.visited[e] == w.gen:
                continue
            w.visited[e] = w.gen
            de = dist_q(d, e)
            if n_res < ef or de < w.res_d[0] or (de == w.res_d[0] and e < w.res_i[0]):
                vheap_push(w.cand_d, w.cand_i, &n_cand, -de, -e)
                if w.deleted != NULL and w.deleted[e]:
                    continue
                vheap_push(w.res_d, w.res_i, &n_res, de, e)
                if n_res > ef:
                    vheap_pop(w.res_d, w.res_i, &n_res)
    return n_res


cdef inline bint same_vector(Dist* d, int64_t a, int64_t b) noexcept nogil:
    """Whether two stored nodes hold byte-identical vectors (build only)."""
    return memcmp(node_vec(d, a, d.dec_a), node_vec(d, b, d.dec_b),
                  d.dim * sizeof(float)) == 0


cdef Py_ssize_t select_heuristic(Dist* d, const float* cand_d, const int64_t* cand_i,
                                 Py_ssize_t n_cand, Py_ssize_t max_links,
                                 int64_t* out, float* out_d,
                                 uint8_t* kept, float* rows,
                                 int64_t* out_a) noexcept nogil:
    """HNSW neighbour selection: walk the candidates nearest first and keep
    one only if it is closer to the base than to every one already kept.

    A candidate that is an exact copy of one already kept is dropped too.
    Copies are as close to each other as to the base, so the rule above
    never prunes them: a group of copies would fill every list with
    itself, a region that searches enter and cannot leave.  One copy per
    list routes into the group; ``hnsw_build`` chains its members.

    ``cand_*`` must be sorted ascending by distance to the base.  Kept ids
    go to ``out`` (their distances to ``out_d``); ``kept[a]`` (if not NULL)
    is set to whether candidate a was kept.  Scratch: ``rows`` (n_cand,
    dim) holds candidate a's vector in row a when it is decoded (each is
    decoded once), ``out_a`` (max_links,) the candidate number of each
    kept one.
    """
    cdef Py_ssize_t a, b, n_out = 0
    cdef int64_t e
    cdef bint good
    cdef const float* pe
    cdef const float* pb
    for a in range(n_cand):
        if kept != NULL:
            kept[a] = 0
        if n_out >= max_links:
            if kept == NULL:
                break
            continue
        e = cand_i[a]
        pe = node_vec(d, e, rows + a * d.dim)
        good = True
        for b in range(n_out):
            pb = d.vectors + (out[b] - d.first_new) * d.dim if out[b] >= d.first_new \
                else rows + out_a[b] * d.dim          # decoded when it was candidate
            if out_d[b] == cand_d[a] and memcmp(pe, pb, d.dim * sizeof(float)) == 0:
                good = False
                break
            d.count += 1
            if vec_dist(d, pe, pb) < cand_d[a]:
                good = False
                break
        if good:
            out[n_out] = e
            out_d[n_out] = cand_d[a]
            out_a[n_out] = a
            n_out += 1
            if kept != NULL:
                kept[a] = 1
    return n_out


cdef inline int append_link(Graph* g, int64_t src, int64_t dst, int level) noexcept nogil:
    """Put dst in the first free slot of src's list: 1 if done, 2 if dst
    was already there, 0 if the list is full."""
    cdef Py_ssize_t cap, t
    cdef int32_t* links = node_links(g, src, level, &cap)
    for t in range(cap):
        if links[t] < 0:
            links[t] = <int32_t> dst
            return 1
        if links[t] == dst:
            return 2
    return 0


cdef enum:
    ROOT = -1                # parent of the entry point
    LOST = -2                # no parent known: to be found by fix_parents
    CHAIN_LIMIT = 4096       # parent chains longer than this count as broken

PARENT_ROOT = ROOT
PARENT_LOST = LOST


cdef struct Tree:
    # A certificate that every node is reachable on level 0: each node but
    # the entry point names a parent that links to it, and following
    # parents from any node reaches the entry point (no cycle).  Dropping
    # a node's parent link marks it LOST and records it; fix_parents finds
    # it a new parent, so an append checks the nodes it touched only.
    int32_t* parent          # (n,) ROOT, LOST, or a node linking to this one
    int64_t* lost            # (cap,) nodes marked LOST (only the first cap kept)
    Py_ssize_t cap
    Py_ssize_t n             # how many were marked


cdef inline void dropped(Tree* tr, int64_t src, int64_t y) noexcept nogil:
    """The level-0 link src -> y was removed."""
    if tr == NULL or tr.parent[y] != src:
        return
    tr.parent[y] = LOST
    if tr.n < tr.cap:
        tr.lost[tr.n] = y
    tr.n += 1


cdef void add_link(Graph* g, Dist* d, int64_t src, int64_t dst, int level,
                   int32_t* indeg, float* sd, int64_t* si, int64_t* sel,
                   float* sel_d, uint8_t* kept, float* rows, int64_t* sel_a,
                   Tree* tree) noexcept nogil:
    """Link src -> dst (dst: the node being inserted).

    When src's list is full it is re-selected by the heuristic among its
    old links and dst, dst ranking first among equal distances: with the
    id order, a newcomer identical to an old neighbour would always be the
    one dropped, and a group of copies would strand each new member.

    On level 0 (``indeg`` given: the in-degree of every node, kept up to
    date here), an old neighbour that the re-selection drops and that has
    no other incoming link is kept anyway while a slot is free, else handed
    over to dst (dst -> it, so it stays reachable through src -> dst).
    Every level-0 link dropped is reported to ``tree`` (if not NULL).
    Scratch: ``cap + 1`` entries each (``rows``: ``cap + 1`` vectors).
    """
    cdef Py_ssize_t cap, t, n_c, n_sel, a
    cdef int32_t* links
    cdef float td
    cdef int64_t ti, y
    cdef bint dst_kept, still
    cdef const float* ps
    cdef int r = append_link(g, src, dst, level)
    if r:
        if r == 1 and indeg != NULL:
            indeg[dst] += 1
        return
    links = node_links(g, src, level, &cap)
    # Full: dst and the old links with their distances to src, sorted by
    # (distance, dst first, id).
    ps = node_vec(d, src, d.dec_b)         # decoded once (if old)
    d.count += 1
    sd[0] = vec_dist(d, ps, node_vec(d, dst, d.dec_a))
    si[0] = dst
    n_c = 1
    for t in range(cap):
        d.count += 1
        sd[n_c] = vec_dist(d, ps, node_vec(d, links[t], d.dec_a))
        si[n_c] = links[t]
        n_c += 1
    for t in range(1, n_c):              # insertion sort, n_c <= cap + 1
        td = sd[t]
        ti = si[t]
        a = t - 1
        while a >= 0 and (sd[a] > td or (sd[a] == td and si[a] != dst and si[a] > ti)):
            sd[a + 1] = sd[a]
            si[a + 1] = si[a]
            a -= 1
        sd[a + 1] = td
        si[a + 1] = ti
    n_sel = select_heuristic(d, sd, si, n_c, cap, sel, sel_d, kept, rows, sel_a)
    if indeg != NULL:
        for t in range(cap):
            indeg[links[t]] -= 1
        dst_kept = False
        for a in range(n_sel):
            if sel[a] == dst:
                dst_kept = True
        for a in range(n_c):
            y = si[a]
            if kept[a] or y == dst or indeg[y] > 0:
                continue
            # y's only incoming link was src's.
            if n_sel < cap:
                sel[n_sel] = y
                n_sel += 1
            elif dst_kept and append_link(g, dst, y, 0) == 1:
                indeg[y] += 1
        for a in range(n_sel):
            indeg[sel[a]] += 1
        for t in range(cap):
            still = False
            for a in range(n_sel):
                if sel[a] == links[t]:
                    still = True
                    break
            if not still:
                dropped(tree, src, links[t])
    for t in range(cap):
        links[t] = <int32_t> sel[t] if t < n_sel else -1


cdef void rescue(Graph* g, Dist* d, int64_t q, const int64_t* nb, Py_ssize_t n_nb,
                 int32_t* indeg, Tree* tree) noexcept nogil:
    """Give q, which every neighbour's re-selection dropped, an incoming
    level-0 link: a free slot of its nearest neighbour that has one, else,
    in the nearest neighbour that can spare one, the slot of the farthest
    target that keeps another incoming link."""
    cdef Py_ssize_t a, t, cap, best_t
    cdef int32_t* links
    cdef float dt, best_d = 0
    cdef int r
    for a in range(n_nb):
        r = append_link(g, nb[a], q, 0)
        if r:
            indeg[q] += r == 1
            return
    for a in range(n_nb):
        links = node_links(g, nb[a], 0, &cap)
        best_t = -1
        for t in range(cap):
            if indeg[links[t]] >= 2:
                dt = dist_nodes(d, nb[a], links[t])
                if best_t < 0 or dt > best_d:
                    best_t = t
                    best_d = dt
        if best_t >= 0:
            indeg[links[best_t]] -= 1
            dropped(tree, nb[a], links[best_t])
            links[best_t] = <int32_t> q
            indeg[q] += 1
            return


cdef void init_build(Dist* d, Work* w, Graph* g,
                     const float[:, ::1] vectors, Py_ssize_t first_new,
                     const uint8_t[:, ::1] codes8, const uint16_t[:, ::1] codes16,
                     const float[:, :, ::1] codebooks, int32_t[:, ::1] links0,
                     int32_t[:, ::1] upper, const int64_t[::1] upper_off,
                     bint inner_product, float[::1] dec,
                     uint32_t[::1] visited, const uint32_t[::1] gen,
                     float[::1] cand_d, int64_t[::1] cand_i,
                     float[::1] res_d, int64_t[::1] res_i) noexcept:
    """Fill the distance, work and graph contexts of a build or repair."""
    cdef Py_ssize_t n = links0.shape[0]
    g.links0 = &links0[0, 0] if links0.shape[0] > 0 else NULL
    g.upper = &upper[0, 0] if upper.shape[0] > 0 else NULL
    g.upper_off = &upper_off[0] if upper_off.shape[0] > 0 else NULL
    g.M = upper.shape[1]
    g.M0 = links0.shape[1]
    d.kind = EXACT
    d.inner_product = inner_product
    d.vectors = &vectors[0, 0] if vectors.shape[0] > 0 else NULL
    d.first_new = first_new
    d.dim = vectors.shape[1]
    d.codebooks = &codebooks[0, 0, 0]
    d.m = codebooks.shape[0]
    d.k = codebooks.shape[1]
    d.ds = codebooks.shape[2]
    d.codes8 = &codes8[0, 0] if codes8.shape[0] > 0 else NULL
    d.codes16 = &codes16[0, 0] if codes16.shape[0] > 0 else NULL
    d.dec_a = &dec[0]
    d.dec_b = &dec[d.dim]
    d.tier = NULL
    d.count = 0
    w.deleted = NULL
    w.visited = &visited[0] if n > 0 else NULL
    w.gen = gen[0]
    w.cand_d = &cand_d[0] if n > 0 else NULL
    w.cand_i = &cand_i[0] if n > 0 else NULL
    w.res_d = &res_d[0]
    w.res_i = &res_i[0]


cdef pqsk_tw_tier* fill_tier(pqsk_tw_tier* t, const uintptr_t[::1] tier_ptr,
                            const int64_t[::1] tier_start, const int64_t[::1] tier_ids,
                            const float[::1] tier_offset, const float[::1] tier_scale,
                            Py_ssize_t dim, bint unit_norm, bint inner_product,
                            bint simd) noexcept:
    """Fill ``t`` from the ``tier_*`` arguments of the kernels (rows of dim
    features); returns it, or NULL when ``tier_ptr`` is None (no tier)."""
    if tier_ptr is None:
        return NULL
    t.part_ptr = &tier_ptr[0]
    t.part_start = &tier_start[0]
    t.n_parts = tier_ptr.shape[0]
    t.ids = &tier_ids[0] if tier_ids is not None and tier_ids.shape[0] > 0 else NULL
    t.d = dim
    t.is_int8 = tier_offset is not None
    t.row_bytes = dim * (1 if t.is_int8 else 2)
    t.off = &tier_offset[0] if t.is_int8 and dim > 0 else NULL
    t.sc = &tier_scale[0] if t.is_int8 and dim > 0 else NULL
    t.unit_norm = unit_norm
    t.inner_product = inner_product
    t.simd = simd and pqsk_rr_cpu_has_avx2_f16c()
    t.eps10 = 10 * 1.1920928955078125e-07
    return t


def hnsw_build(const float[:, ::1] vectors,         # IN  (n - first_new, D) float32
               Py_ssize_t first_new,
               const uint8_t[:, ::1] codes8,        # IN  (>= first_new, m) or (0, m)
               const uint16_t[:, ::1] codes16,      # IN  (>= first_new, m) or (0, m)
               const float[:, :, ::1] codebooks,    # IN  (m, k, ds) float32
               const int32_t[::1] levels,           # IN  (n,)
               int32_t[:, ::1] links0,              # INOUT (n, M0)
               int32_t[:, ::1] upper,               # INOUT (n_upper_rows, M)
               const int64_t[::1] upper_off,        # IN  (n,)
               Py_ssize_t start,
               Py_ssize_t stop,
               int64_t entry_point,
               int max_level,
               Py_ssize_t ef_construction,
               bint inner_product,
               int32_t[::1] indeg,                  # INOUT (n,) level-0 in-degrees
               int32_t[::1] last_copies,            # INOUT (n,)
               Py_ssize_t copies_from,
               uint32_t[::1] visited,               # INOUT (>= n,) generation marks
               uint32_t[::1] gen,                   # INOUT (1,) their generation
               float[::1] cand_d, int64_t[::1] cand_i,  # scratch (>= n,)
               float[::1] res_d, int64_t[::1] res_i,    # scratch (ef_construction + 1,)
               int64_t[::1] fsel, float[::1] fsel_d,    # scratch (M0 + 1,)
               float[::1] sd, int64_t[::1] si,          # scratch (M0 + 1,)
               int64_t[::1] sel, float[::1] sel_d,      # scratch (M0 + 1,)
               uint8_t[::1] kept, int64_t[::1] sel_a,   # scratch (M0 + 1,)
               float[:, ::1] rows,                      # scratch (max(ef, M0) + 1, D)
               float[::1] dec,                          # scratch (2 * D,)
               int32_t[::1] parent,                     # INOUT (n,) see below
               int64_t[::1] lost,                       # OUT (cap,) see below
               int64_t[::1] counts,                     # INOUT (2,) distances, lost
               const uintptr_t[::1] tier_ptr=None,      # IN  as hnsw_search, or None
               const int64_t[::1] tier_start=None,
               const int64_t[::1] tier_ids=None,
               const float[::1] tier_offset=None,
               const float[::1] tier_scale=None,
               Py_ssize_t tier_dim=0):                  # features of a tier row (<= D)
    """Insert nodes ``start .. stop - 1`` in order; nodes before ``start``
    are already linked.  Returns (entry_point, max_level); entry_point -1
    means an empty graph.  Deterministic: one thread, fixed order.

    Node i's vector is row ``i - first_new`` of ``vectors`` for
    ``i >= first_new`` (``first_new <= start``), else its PQ code
    decoded with ``codebooks``, or, given a compact tier (``tier_*``, as
    ``hnsw_search`` takes them; rows in the space of ``vectors``), its tier
    row decoded and zero-padded to D: an append passes the new rows only,
    and the old nodes' data is read only where the insertion goes.

    ``indeg`` must hold the level-0 in-degree of every node (zero for the
    new ones); it is kept up to date, so that no link is dropped from a
    node that has no other (``add_link``), and a node that every neighbour
    dropped gets one (``rescue``).

    ``parent`` is the reachability certificate (see ``Tree``): ROOT for
    the entry point, LOST for the new nodes; a node whose parent link is
    dropped is marked LOST and written to ``lost`` (``counts[1]`` counts
    them all, also those beyond its length).  ``fix_parents`` then gives
    every LOST node a parent again.

    Exact copies: a new node whose selected neighbour h holds the same
    vector is linked on level 0 from the copy of h inserted last
    (``last_copies[h]``, valid when ``>= copies_from``: the first node of
    this build, so entries left by earlier builds are ignored), not from
    h, whose list would fill with copies and then drop them.  The copies
    of a vector form a chain in insertion order, so ids grow along it: a
    beam, which breaks distance ties by the smaller id, walks no further
    than it needs, and building n copies costs O(n).

    ``visited`` marks are valid for generation ``gen[0]``, which only
    grows (the marks are cleared when it wraps): start them at zero once,
    and nothing is cleared per call.
    """
    cdef Py_ssize_t n = links0.shape[0]
    cdef Graph g
    cdef Dist d
    cdef Work w
    cdef Tree tree
    cdef Py_ssize_t q, n_res, n_sel, t
    cdef int lev, L, top
    cdef int64_t cur, h
    cdef float d_cur
    cdef int32_t* links
    cdef int32_t* deg = &indeg[0] if n > 0 else NULL
    cdef int32_t* last_copy = &last_copies[0] if n > 0 else NULL
    cdef int r
    cdef Py_ssize_t cap
    cdef pqsk_tw_tier tier
    init_build(&d, &w, &g, vectors, first_new, codes8, codes16, codebooks, links0,
               upper, upper_off, inner_product, dec, visited, gen, cand_d, cand_i,
               res_d, res_i)
    d.tier = fill_tier(&tier, tier_ptr, tier_start, tier_ids, tier_offset, tier_scale,
                       tier_dim, False, inner_product, False)
    tree.parent = &parent[0] if n > 0 else NULL
    tree.lost = &lost[0] if lost.shape[0] > 0 else NULL
    tree.cap = lost.shape[0]
    tree.n = counts[1]
    with nogil:
        for q in range(start, stop):
            L = levels[q]
            if entry_point < 0:
                entry_point = q
                max_level = L
                continue
            d.query = d.vectors + (q - d.first_new) * d.dim
            cur = entry_point
            d_cur = dist_q(&d, cur)
            lev = max_level
            while lev > L:
                cur = greedy(&g, &d, cur, &d_cur, lev)
                lev -= 1
            top = L if L < max_level else max_level
            for lev in range(top, -1, -1):
                n_res = search_layer(&g, &d, &w, n, cur, d_cur, ef_construction, lev)
                heap_sort(w.res_d, w.res_i, n_res)           # ascending
                links = node_links(&g, q, lev, &cap)
                n_sel = select_heuristic(&d, w.res_d, w.res_i, n_res, cap,
                                         &fsel[0], &fsel_d[0], NULL, &rows[0, 0],
                                         &sel_a[0])
                for t in range(cap):
                    links[t] = <int32_t> fsel[t] if t < n_sel else -1
                if lev == 0:
                    for t in range(n_sel):
                        deg[fsel[t]] += 1
                for t in range(n_sel):
                    if lev == 0 and same_vector(&d, fsel[t], q):
                        # q copies fsel[t] (the one copy the selection
                        # keeps): append q to the chain of its copies.
                        h = last_copy[fsel[t]]
                        r = append_link(&g, h, q, 0) if h >= copies_from else 0
                        if r == 1:
                            deg[q] += 1
                        else:
                            add_link(&g, &d, fsel[t], q, 0, deg, &sd[0], &si[0],
                                     &sel[0], &sel_d[0], &kept[0], &rows[0, 0],
                                     &sel_a[0], &tree)
                        last_copy[fsel[t]] = <int32_t> q
                        continue
                    add_link(&g, &d, fsel[t], q, lev, deg if lev == 0 else NULL,
                             &sd[0], &si[0], &sel[0], &sel_d[0], &kept[0],
                             &rows[0, 0], &sel_a[0], &tree)
                if lev == 0 and deg[q] == 0:
                    rescue(&g, &d, q, &fsel[0], n_sel, deg, &tree)
                cur = w.res_i[0]
                d_cur = w.res_d[0]
            if L > max_level:
                entry_point = q
                max_level = L
    gen[0] = w.gen
    counts[0] += d.count
    counts[1] = tree.n
    return entry_point, max_level


cdef bint chain_ok(const int32_t* parent, int64_t x, int64_t y) noexcept nogil:
    """Whether x's parent chain reaches the entry point without meeting y
    (then y may take x as parent without closing a cycle)."""
    cdef Py_ssize_t steps
    for steps in range(CHAIN_LIMIT):
        if x == y:
            return False
        if parent[x] == ROOT:
            return True
        if parent[x] < 0:
            return False
        x = parent[x]
    return False


cdef inline bint links_to(Graph* g, int64_t x, int64_t y) noexcept nogil:
    cdef Py_ssize_t cap, t
    cdef int32_t* links = node_links(g, x, 0, &cap)
    for t in range(cap):
        if links[t] < 0:
            return False
        if links[t] == y:
            return True
    return False


cdef Py_ssize_t add_candidate(Dist* d, const int32_t* par, int64_t y, int64_t x,
                              float* sd, int64_t* si, Py_ssize_t n_nb,
                              Py_ssize_t room) noexcept nogil:
    """Append x to the candidate parents of y if its chain avoids y and it
    is not there yet (and there is room); returns the new count."""
    cdef Py_ssize_t b
    if x == y or n_nb >= room or not chain_ok(par, x, y):
        return n_nb
    for b in range(n_nb):
        if si[b] == x:
            return n_nb
    si[n_nb] = x
    sd[n_nb] = dist_nodes(d, y, x)
    return n_nb + 1


cdef bint link_from_nearest(Graph* g, Dist* d, int32_t* par, int32_t* indeg,
                            int64_t y, float* sd, int64_t* si,
                            Py_ssize_t n_nb) noexcept nogil:
    """Link y from the nearest candidate that can take it: in a free slot,
    else instead of its farthest link that is not a tree link (the target
    keeps its own parent); that candidate becomes y's parent."""
    cdef Py_ssize_t t, b, cap, best_t
    cdef int64_t x, z, ti
    cdef float td, dt, best_d = 0
    cdef int32_t* xl
    cdef int r
    for t in range(1, n_nb):              # nearest first, ties by id
        td = sd[t]
        ti = si[t]
        b = t - 1
        while b >= 0 and (sd[b] > td or (sd[b] == td and si[b] > ti)):
            sd[b + 1] = sd[b]
            si[b + 1] = si[b]
            b -= 1
        sd[b + 1] = td
        si[b + 1] = ti
    for b in range(n_nb):
        x = si[b]
        r = append_link(g, x, y, 0)
        if r:
            indeg[y] += r == 1
            par[y] = <int32_t> x
            return True
        xl = node_links(g, x, 0, &cap)
        best_t = -1
        for t in range(cap):
            z = xl[t]
            if par[z] != x:
                dt = dist_nodes(d, x, z)
                if best_t < 0 or dt > best_d:
                    best_t = t
                    best_d = dt
        if best_t >= 0:
            indeg[xl[best_t]] -= 1
            xl[best_t] = <int32_t> y
            indeg[y] += 1
            par[y] = <int32_t> x
            return True
    return False


def fix_parents(const int64_t[::1] nodes,           # IN  (n_nodes,) candidates
                const float[:, ::1] vectors,        # IN  as hnsw_build
                Py_ssize_t first_new,
                const uint8_t[:, ::1] codes8,
                const uint16_t[:, ::1] codes16,
                const float[:, :, ::1] codebooks,
                int32_t[:, ::1] links0,             # INOUT (n, M0)
                int32_t[:, ::1] upper,              # IN  as hnsw_build
                const int64_t[::1] upper_off,
                int64_t entry_point,
                int max_level,
                Py_ssize_t ef,
                int32_t[::1] indeg,                 # INOUT (n,)
                int32_t[::1] parent,                # INOUT (n,)
                bint inner_product,
                uint32_t[::1] visited,              # INOUT as hnsw_build
                uint32_t[::1] gen,
                float[::1] cand_d, int64_t[::1] cand_i,  # scratch (>= n,)
                float[::1] res_d, int64_t[::1] res_i,    # scratch (ef + 1,)
                float[::1] sd, int64_t[::1] si,     # scratch (>= M0 * (M0 + 1), >= ef)
                float[::1] dec,                     # scratch (3 * D,)
                const uintptr_t[::1] tier_ptr=None, # IN  as hnsw_build
                const int64_t[::1] tier_start=None,
                const int64_t[::1] tier_ids=None,
                const float[::1] tier_offset=None,
                const float[::1] tier_scale=None,
                Py_ssize_t tier_dim=0):
    """Give every listed LOST node a parent: the local reachability check
    after an append, O(listed nodes * M0**2), never a walk of the graph.

    First, among the node's level-0 neighbours that link back to it, one
    whose parent chain reaches the entry point without passing through it
    (repeated while that finds parents: a fixed node mends the chains
    through it).  Then, for those left, a link from the nearest neighbour
    (else neighbour of a neighbour) with such a chain that can take it
    (``link_from_nearest``); when the whole neighbourhood hangs below the
    node, from the nearest of the nodes a search of width ``ef`` for it
    finds, coming from the entry point.  Returns how many nodes stay LOST
    (the caller then runs the full repair)."""
    cdef Graph g
    cdef Dist d
    cdef Work w
    cdef Py_ssize_t a, t, b, cap, n_nb, left = 0, passes, hop
    cdef Py_ssize_t room = si.shape[0]
    cdef int64_t y, x
    cdef int32_t* links
    cdef int32_t* xl
    cdef int32_t* par = &parent[0] if parent.shape[0] > 0 else NULL
    cdef Py_ssize_t n = links0.shape[0], n_res
    cdef int lev
    cdef int64_t cur
    cdef float d_cur
    cdef bint changed = True
    cdef pqsk_tw_tier tier
    init_build(&d, &w, &g, vectors, first_new, codes8, codes16, codebooks, links0,
               upper, upper_off, inner_product, dec, visited, gen, cand_d, cand_i,
               res_d, res_i)
    d.tier = fill_tier(&tier, tier_ptr, tier_start, tier_ids, tier_offset, tier_scale,
                       tier_dim, False, inner_product, False)
    with nogil:
        passes = 0
        while changed and passes < 64:
            changed = False
            passes += 1
            for a in range(nodes.shape[0]):
                y = nodes[a]
                if par[y] != LOST:
                    continue
                links = node_links(&g, y, 0, &cap)
                for t in range(cap):
                    x = links[t]
                    if x < 0:
                        break
                    if links_to(&g, x, y) and chain_ok(par, x, y):
                        par[y] = <int32_t> x
                        changed = True
                        break
        for a in range(nodes.shape[0]):
            y = nodes[a]
            if par[y] != LOST:
                continue
            # From y's neighbours, else their neighbours, whose chains avoid
            # y (all of y's own neighbours may hang below it, or have no
            # slot to spare).
            links = node_links(&g, y, 0, &cap)
            for hop in range(2):
                n_nb = 0
                for t in range(cap):
                    if links[t] < 0:
                        break
                    if hop == 0:
                        n_nb = add_candidate(&d, par, y, links[t], &sd[0], &si[0],
                                             n_nb, room)
                        continue
                    xl = node_links(&g, links[t], 0, &cap)
                    for b in range(cap):
                        if xl[b] < 0:
                            break
                        n_nb = add_candidate(&d, par, y, xl[b], &sd[0], &si[0],
                                             n_nb, room)
                if link_from_nearest(&g, &d, par, &indeg[0], y, &sd[0], &si[0], n_nb):
                    break
            if par[y] == LOST and entry_point >= 0:
                d.query = node_vec(&d, y, &dec[2 * d.dim])
                cur = entry_point
                d_cur = dist_q(&d, cur)
                for lev in range(max_level, 0, -1):
                    cur = greedy(&g, &d, cur, &d_cur, lev)
                n_res = search_layer(&g, &d, &w, n, cur, d_cur, ef, 0)
                n_nb = 0
                for t in range(n_res):
                    n_nb = add_candidate(&d, par, y, w.res_i[t], &sd[0], &si[0],
                                         n_nb, room)
                link_from_nearest(&g, &d, par, &indeg[0], y, &sd[0], &si[0], n_nb)
            if par[y] == LOST:
                left += 1
    gen[0] = w.gen
    return left


cdef void search_one(Graph* g, const float* query, const float* cbt,
                     Py_ssize_t m, Py_ssize_t ds, Py_ssize_t k,
                     const uint8_t* codes8, const uint16_t* codes16,
                     const uint8_t* deleted, Py_ssize_t n,
                     int64_t entry_point, int max_level, Py_ssize_t ef,
                     bint inner_product, float* table, uint32_t* visited,
                     uint32_t* gen, float* cand_d, int64_t* cand_i,
                     float* res_d, int64_t* res_i,
                     float* out_dist, int64_t* out_idx, Py_ssize_t n_out,
                     int64_t* n_dist, const pqsk_tw_tier* tier) noexcept nogil:
    """One query: tables (or, with a ``tier``, the query itself), greedy
    descent, level-0 beam, sorted output."""
    cdef Dist d
    cdef Work w
    cdef Py_ssize_t n_res, t
    cdef int lev
    cdef int64_t cur
    cdef float d_cur
    d.kind = ADC
    d.tier = tier
    if tier != NULL:
        d.kind = TIER
        d.query = query
        d.qn = 0
        for t in range(tier.d):
            d.qn += <double> query[t] * query[t]
    else:
        build_table(query, cbt, m, ds, k, inner_product, table)
    d.inner_product = inner_product
    d.table = table
    d.codes8 = codes8
    d.codes16 = codes16
    d.m = m
    d.k = k
    d.count = 0
    w.deleted = deleted
    w.visited = visited
    w.gen = gen[0]
    w.cand_d = cand_d
    w.cand_i = cand_i
    w.res_d = res_d
    w.res_i = res_i
    cur = entry_point
    d_cur = dist_q(&d, cur)
    for lev in range(max_level, 0, -1):
        cur = greedy(g, &d, cur, &d_cur, lev)
    n_res = search_layer(g, &d, &w, n, cur, d_cur, ef, 0)
    heap_sort(res_d, res_i, n_res)
    for t in range(n_out):
        if t < n_res:
            out_dist[t] = res_d[t]
            out_idx[t] = res_i[t]
        else:
            out_dist[t] = INFINITY
            out_idx[t] = INT64_MAX
    gen[0] = w.gen
    n_dist[0] = d.count


def hnsw_search(const float[:, ::1] Q,                 # IN  (nq, D) float32
                const float[:, :, ::1] codebooks_t,    # IN  (m, ds, k)
                const uint8_t[:, ::1] codes8,          # IN  (n, m) or (0, m)
                const uint16_t[:, ::1] codes16,        # IN  (n, m) or (0, m)
                const uint8_t[::1] deleted,            # IN  (n,) tombstones, or (0,)
                const int32_t[:, ::1] links0,          # IN  (n, M0)
                const int32_t[:, ::1] upper,           # IN  (n_upper_rows, M)
                const int64_t[::1] upper_off,          # IN  (n,)
                int64_t entry_point,
                int max_level,
                Py_ssize_t ef,
                bint inner_product,
                float[:, ::1] out_dist,                # OUT (nq, n_out)
                int64_t[:, ::1] out_idx,               # OUT (nq, n_out)
                int64_t[::1] n_dist,                   # OUT (nq,) distance computations
                uint32_t[:, ::1] visited,              # INOUT (n_threads, >= n) marks
                uint32_t[:, ::1] gens,                 # INOUT (n_threads, >= 1) generations
                float[:, ::1] cand_d, int64_t[:, ::1] cand_i,   # scratch (n_threads, n)
                float[:, ::1] res_d, int64_t[:, ::1] res_i,     # scratch (n_threads, ef + 1)
                float[:, ::1] tables,                  # scratch (n_threads, m * k)
                int n_threads,
                Py_ssize_t deleted_stride=0,
                const uintptr_t[::1] tier_ptr=None,   # IN  (P,) tier row parts, or None
                const int64_t[::1] tier_start=None,   # IN  (P + 1,) their first ids
                const int64_t[::1] tier_ids=None,     # IN  (n,) node ids, or None: node i is id i
                const float[::1] tier_offset=None,    # IN  (D,) int8 tier (None: float16)
                const float[::1] tier_scale=None,     # IN  (D,)
                bint tier_unit_norm=False,
                bint tier_simd=False):
    """ADC search: greedy descent through the upper levels, then a beam of
    width ``ef`` (>= n_out) on level 0.  Rows come out sorted by
    (distance, id); slots beyond the nodes found hold (+inf, INT64_MAX).
    Parallel over queries; each thread has its own scratch row.  ``visited``
    and ``gens`` persist across calls (a row's marks are valid for its
    generation counter, which only grows): start them at zero once.
    Query q reads its tombstones at ``deleted[q * deleted_stride:]`` (0:
    one mask for every query; a filtered search marks the nodes it must
    not return, which the beam still walks through).

    The tier walk: with ``tier_ptr`` (the parts of a compact tier, rows by
    id: uint8 codes when ``tier_offset`` is given, else float16 bits) the
    nodes are scored by their tier rows instead of their codes, as
    ``pqsk._rerank.compact_rerank`` scores them (``tier_unit_norm``: rows
    scaled to unit norm; ``tier_simd``: AVX2 sums, which the caller checks
    the CPU has); Q is then (nq, D) in the tier's space and the codebooks
    are not read.  The caller checks the shapes."""
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t n = links0.shape[0]
    cdef Py_ssize_t n_out = out_dist.shape[1]
    cdef Py_ssize_t q
    cdef int tid
    cdef Graph g
    cdef pqsk_tw_tier tier
    cdef pqsk_tw_tier* tp = NULL
    if nq == 0 or n == 0 or entry_point < 0 or n_out == 0:
        return
    tp = fill_tier(&tier, tier_ptr, tier_start, tier_ids, tier_offset, tier_scale,
                   Q.shape[1], tier_unit_norm, inner_product, tier_simd)
    g.links0 = <int32_t*> &links0[0, 0]
    g.upper = <int32_t*> &upper[0, 0] if upper.shape[0] > 0 else NULL
    g.upper_off = &upper_off[0]
    g.M = upper.shape[1]
    g.M0 = links0.shape[1]
    with nogil:
        for q in prange(nq, schedule="dynamic", num_threads=n_threads):
            tid = threadid()
            search_one(&g, &Q[q, 0], &codebooks_t[0, 0, 0], codebooks_t.shape[0],
                       codebooks_t.shape[1], codebooks_t.shape[2],
                       &codes8[0, 0] if codes8.shape[0] > 0 else NULL,
                       &codes16[0, 0] if codes16.shape[0] > 0 else NULL,
                       &deleted[q * deleted_stride] if deleted.shape[0] > 0 else NULL,
                       n, entry_point, max_level, ef, inner_product,
                       &tables[tid, 0], &visited[tid, 0], &gens[tid, 0],
                       &cand_d[tid, 0], &cand_i[tid, 0], &res_d[tid, 0], &res_i[tid, 0],
                       &out_dist[q, 0], &out_idx[q, 0], n_out, &n_dist[q], tp)
