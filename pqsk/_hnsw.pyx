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
"""

cimport cython
from cython.parallel cimport prange, parallel, threadid
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t
from libc.string cimport memcmp, memset
from libc.math cimport INFINITY
from libc.stdint cimport INT64_MAX

from ._heap cimport heap_sort, vheap_push, vheap_pop
from ._kernels cimport build_table

cdef enum:
    EXACT = 0
    ADC = 1

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
    int kind                 # EXACT or ADC
    bint inner_product       # distance = -<q, x> instead of ||q - x||^2
    const float* vectors     # EXACT: (n, dim) float32
    Py_ssize_t dim
    const float* query       # EXACT: (dim,) the vector being inserted
    const float* table       # ADC: (m, k)
    const uint8_t* codes8    # ADC: (n, m), one of codes8 / codes16
    const uint16_t* codes16
    Py_ssize_t m
    Py_ssize_t k
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


cdef inline void prefetch_node(Dist* d, int64_t node) noexcept nogil:
    """Ask for a node's data ahead of its distance: graph walks jump
    around memory, and the load latency, not the arithmetic, dominates."""
    cdef Py_ssize_t off
    if d.kind == EXACT:
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
        return vec_dist(d, d.query, d.vectors + node * d.dim)
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
    return vec_dist(d, d.vectors + a * d.dim, d.vectors + b * d.dim)


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
    return memcmp(d.vectors + a * d.dim, d.vectors + b * d.dim,
                  d.dim * sizeof(float)) == 0


cdef Py_ssize_t select_heuristic(Dist* d, const float* cand_d, const int64_t* cand_i,
                                 Py_ssize_t n_cand, Py_ssize_t max_links,
                                 int64_t* out, float* out_d,
                                 uint8_t* kept) noexcept nogil:
    """HNSW neighbour selection: walk the candidates nearest first and keep
    one only if it is closer to the base than to every one already kept.

    A candidate that is an exact copy of one already kept is dropped too.
    Copies are as close to each other as to the base, so the rule above
    never prunes them: a group of copies would fill every list with
    itself, a region that searches enter and cannot leave.  One copy per
    list routes into the group; ``hnsw_build`` chains its members.

    ``cand_*`` must be sorted ascending by distance to the base.  Kept ids
    go to ``out`` (their distances to ``out_d``); ``kept[a]`` (if not NULL)
    is set to whether candidate a was kept.
    """
    cdef Py_ssize_t a, b, n_out = 0
    cdef int64_t e
    cdef bint good
    for a in range(n_cand):
        if kept != NULL:
            kept[a] = 0
        if n_out >= max_links:
            if kept == NULL:
                break
            continue
        e = cand_i[a]
        good = True
        for b in range(n_out):
            if out_d[b] == cand_d[a] and same_vector(d, e, out[b]):
                good = False
                break
            if dist_nodes(d, e, out[b]) < cand_d[a]:
                good = False
                break
        if good:
            out[n_out] = e
            out_d[n_out] = cand_d[a]
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


cdef void add_link(Graph* g, Dist* d, int64_t src, int64_t dst, int level,
                   int32_t* indeg, float* sd, int64_t* si, int64_t* sel,
                   float* sel_d, uint8_t* kept) noexcept nogil:
    """Link src -> dst (dst: the node being inserted).

    When src's list is full it is re-selected by the heuristic among its
    old links and dst, dst ranking first among equal distances: with the
    id order, a newcomer identical to an old neighbour would always be the
    one dropped, and a group of copies would strand each new member.

    On level 0 (``indeg`` given: the in-degree of every node, kept up to
    date here), an old neighbour that the re-selection drops and that has
    no other incoming link is kept anyway while a slot is free, else handed
    over to dst (dst -> it, so it stays reachable through src -> dst).
    Scratch: ``cap + 1`` entries each.
    """
    cdef Py_ssize_t cap, t, n_c, n_sel, a
    cdef int32_t* links
    cdef float td
    cdef int64_t ti, y
    cdef bint dst_kept
    cdef int r = append_link(g, src, dst, level)
    if r:
        if r == 1 and indeg != NULL:
            indeg[dst] += 1
        return
    links = node_links(g, src, level, &cap)
    # Full: dst and the old links with their distances to src, sorted by
    # (distance, dst first, id).
    sd[0] = dist_nodes(d, src, dst)
    si[0] = dst
    n_c = 1
    for t in range(cap):
        sd[n_c] = dist_nodes(d, src, links[t])
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
    n_sel = select_heuristic(d, sd, si, n_c, cap, sel, sel_d, kept)
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
        links[t] = <int32_t> sel[t] if t < n_sel else -1


cdef void rescue(Graph* g, Dist* d, int64_t q, const int64_t* nb, Py_ssize_t n_nb,
                 int32_t* indeg) noexcept nogil:
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
            links[best_t] = <int32_t> q
            indeg[q] += 1
            return


def hnsw_build(const float[:, ::1] vectors,         # IN  (n, D) float32
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
               int32_t[::1] last_copies,            # INOUT (n,), all -1 at first
               uint32_t[::1] visited,               # scratch (n,)
               float[::1] cand_d, int64_t[::1] cand_i,  # scratch (n,)
               float[::1] res_d, int64_t[::1] res_i,    # scratch (ef_construction + 1,)
               int64_t[::1] fsel, float[::1] fsel_d,    # scratch (M0 + 1,)
               float[::1] sd, int64_t[::1] si,          # scratch (M0 + 1,)
               int64_t[::1] sel, float[::1] sel_d,      # scratch (M0 + 1,)
               uint8_t[::1] kept,                       # scratch (M0 + 1,)
               int64_t[::1] stats):                     # OUT (1,) distance count
    """Insert nodes ``start .. stop - 1`` in order; nodes before ``start``
    are already linked.  Returns (entry_point, max_level); entry_point -1
    means an empty graph.  Deterministic: one thread, fixed order.

    ``indeg`` must hold the level-0 in-degree of every node (zero for the
    new ones); it is kept up to date, so that no link is dropped from a
    node that has no other (``add_link``), and a node that every neighbour
    dropped gets one (``rescue``).

    Exact copies: a new node whose selected neighbour h holds the same
    vector is linked on level 0 from the copy of h inserted last
    (``last_copies[h]``, kept across calls on one build, all -1 at
    first), not from h, whose list would fill with copies and then drop
    them.  The copies of a vector form a chain in insertion order, so ids
    grow along it: a beam, which breaks distance ties by the smaller id,
    walks no further than it needs, and building n copies costs O(n).
    """
    cdef Py_ssize_t n = vectors.shape[0]
    cdef Graph g
    cdef Dist d
    cdef Work w
    cdef Py_ssize_t q, n_res, n_sel, t
    cdef int lev, L, top
    cdef int64_t cur
    cdef float d_cur
    cdef int32_t* links
    cdef int32_t* deg = &indeg[0] if n > 0 else NULL
    cdef int32_t* last_copy = &last_copies[0] if n > 0 else NULL
    cdef int r
    cdef Py_ssize_t cap
    g.links0 = &links0[0, 0] if links0.shape[0] > 0 else NULL
    g.upper = &upper[0, 0] if upper.shape[0] > 0 else NULL
    g.upper_off = &upper_off[0] if upper_off.shape[0] > 0 else NULL
    g.M = upper.shape[1]
    g.M0 = links0.shape[1]
    d.kind = EXACT
    d.inner_product = inner_product
    d.vectors = &vectors[0, 0] if n > 0 else NULL
    d.dim = vectors.shape[1]
    d.count = 0
    w.deleted = NULL
    w.visited = &visited[0] if n > 0 else NULL
    w.gen = 0
    if n > 0:
        memset(w.visited, 0, n * sizeof(uint32_t))
    w.cand_d = &cand_d[0] if n > 0 else NULL
    w.cand_i = &cand_i[0] if n > 0 else NULL
    w.res_d = &res_d[0]
    w.res_i = &res_i[0]
    with nogil:
        for q in range(start, stop):
            L = levels[q]
            if entry_point < 0:
                entry_point = q
                max_level = L
                continue
            d.query = d.vectors + q * d.dim
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
                                         &fsel[0], &fsel_d[0], NULL)
                for t in range(cap):
                    links[t] = <int32_t> fsel[t] if t < n_sel else -1
                if lev == 0:
                    for t in range(n_sel):
                        deg[fsel[t]] += 1
                for t in range(n_sel):
                    if lev == 0 and same_vector(&d, fsel[t], q):
                        # q copies fsel[t] (the one copy the selection
                        # keeps): append q to the chain of its copies.
                        r = append_link(&g, last_copy[fsel[t]], q, 0) \
                            if last_copy[fsel[t]] >= 0 else 0
                        if r == 1:
                            deg[q] += 1
                        else:
                            add_link(&g, &d, fsel[t], q, 0, deg,
                                     &sd[0], &si[0], &sel[0], &sel_d[0], &kept[0])
                        last_copy[fsel[t]] = <int32_t> q
                        continue
                    add_link(&g, &d, fsel[t], q, lev, deg if lev == 0 else NULL,
                             &sd[0], &si[0], &sel[0], &sel_d[0], &kept[0])
                if lev == 0 and deg[q] == 0:
                    rescue(&g, &d, q, &fsel[0], n_sel, deg)
                cur = w.res_i[0]
                d_cur = w.res_d[0]
            if L > max_level:
                entry_point = q
                max_level = L
    stats[0] += d.count
    return entry_point, max_level


cdef void search_one(Graph* g, const float* query, const float* cbt,
                     Py_ssize_t m, Py_ssize_t ds, Py_ssize_t k,
                     const uint8_t* codes8, const uint16_t* codes16,
                     const uint8_t* deleted, Py_ssize_t n,
                     int64_t entry_point, int max_level, Py_ssize_t ef,
                     bint inner_product, float* table, uint32_t* visited,
                     uint32_t* gen, float* cand_d, int64_t* cand_i,
                     float* res_d, int64_t* res_i,
                     float* out_dist, int64_t* out_idx, Py_ssize_t n_out,
                     int64_t* n_dist) noexcept nogil:
    """One query: tables, greedy descent, level-0 beam, sorted output."""
    cdef Dist d
    cdef Work w
    cdef Py_ssize_t n_res, t
    cdef int lev
    cdef int64_t cur
    cdef float d_cur
    build_table(query, cbt, m, ds, k, inner_product, table)
    d.kind = ADC
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
                int n_threads):
    """ADC search: greedy descent through the upper levels, then a beam of
    width ``ef`` (>= n_out) on level 0.  Rows come out sorted by
    (distance, id); slots beyond the nodes found hold (+inf, INT64_MAX).
    Parallel over queries; each thread has its own scratch row.  ``visited``
    and ``gens`` persist across calls (a row's marks are valid for its
    generation counter, which only grows): start them at zero once."""
    cdef Py_ssize_t nq = Q.shape[0]
    cdef Py_ssize_t n = links0.shape[0]
    cdef Py_ssize_t n_out = out_dist.shape[1]
    cdef Py_ssize_t q
    cdef int tid
    cdef Graph g
    if nq == 0 or n == 0 or entry_point < 0 or n_out == 0:
        return
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
                       &deleted[0] if deleted.shape[0] > 0 else NULL,
                       n, entry_point, max_level, ef, inner_product,
                       &tables[tid, 0], &visited[tid, 0], &gens[tid, 0],
                       &cand_d[tid, 0], &cand_i[tid, 0], &res_d[tid, 0], &res_i[tid, 0],
                       &out_dist[q, 0], &out_idx[q, 0], n_out, &n_dist[q])
