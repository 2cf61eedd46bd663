"""
=========================================
How many vectors fit in memory? A planner
=========================================

Before indexing a large collection, one wants to know how many vectors a
given amount of RAM can hold with each kind of index.  This example
answers it for embeddings of dimension 128, 384, 768 and 1536 and a
16 GiB budget, comparing:

* **float32, flat**: the raw vectors, as an exact search
  (:class:`~sklearn.neighbors.NearestNeighbors`) keeps them;
* **PQ**: :class:`~pqsk.PQNeighbors`, codes only;
* **IVF-PQ**: :class:`~pqsk.IVFPQNeighbors`, codes plus an id per vector
  and a coarse quantizer;
* **HNSW-PQ**: :class:`~pqsk.HNSWPQNeighbors`, codes plus a graph;
* the last two **with re-ranking** (``refine_factor > 0``), which also
  keeps the raw float32 vectors.

Rather than trusting a formula, we fit small indexes of each kind, read
what they hold from ``memory_usage_``, separate the part that grows with
the number of vectors from the fixed part, and extrapolate.  Only the
sizes matter, not the search quality, so the indexes are fitted on random
data with random codebooks passed through ``codebooks=``, which skips the
k-means training and makes the planner fast.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# The plan's parameters
# ---------------------
#
# Every code gets one byte per 8 dimensions (``n_subspaces = D / 8``, 256
# codewords): 32 times smaller than float32.  The graph has ``n_links=16``
# (32 links per vector on its bottom level).  The number of inverted lists
# follows pqsk's ``n_lists="auto"`` rule, ``4 * sqrt(n)``.
import matplotlib.pyplot as plt
import numpy as np
from sklearn.utils import check_random_state

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

DIMS = [128, 384, 768, 1536]
BUDGET = 16 * 2**30  # bytes
DIMS_PER_BYTE = 8
N_CODEWORDS = 256
N_LINKS = 16
METRIC = "cosine"

N_SMALL, N_LARGE = 1_000, 2_000  # sizes of the small indexes we measure
LISTS_SMALL, LISTS_LARGE = 8, 16

rng = check_random_state(0)


def index_bytes(est):
    """Total bytes held by a fitted index."""
    if isinstance(est, PQNeighbors):
        # PQNeighbors has no memory_usage_: codes and codebooks are all it holds.
        return est.codes_.nbytes + est.codebooks_.nbytes
    return est.memory_usage_["total"]


def random_codebooks(n_features):
    """Codebooks of the right shape, (n_subspaces, n_codewords, width)."""
    m = n_features // DIMS_PER_BYTE
    return rng.standard_normal((m, N_CODEWORDS, DIMS_PER_BYTE)).astype(np.float32)


def fit(kind, X, n_lists=LISTS_SMALL):
    """Fit a small index of the given kind on X, with random codebooks."""
    m = X.shape[1] // DIMS_PER_BYTE
    common = dict(n_subspaces=m, n_codewords=N_CODEWORDS,
                  codebooks=random_codebooks(X.shape[1]), metric=METRIC,
                  random_state=0)
    refine = 1 if kind.endswith("+ refine") else 0
    if kind == "PQ":
        return PQNeighbors(refine_factor=0, **common).fit(X)
    if kind.startswith("IVF-PQ"):
        return IVFPQNeighbors(n_lists=n_lists, refine_factor=refine, **common).fit(X)
    return HNSWPQNeighbors(n_links=N_LINKS, ef_construction=16, refine_factor=refine,
                           **common).fit(X)


# %%
# Measure and extrapolate
# -----------------------
#
# For each dimension and kind of index we fit two indexes, of 1,000 and
# 2,000 vectors.  The difference of their totals, divided by 1,000, is the
# cost of one more vector; what remains is fixed (the codebooks, for
# instance).  For IVF-PQ a third index, with twice the lists, gives the
# cost of one more list (its centroid and bookkeeping).  The graph's
# ``ef_construction`` is set low: it changes the build time, not the
# memory.
#
# The float32 flat index is just the array: ``4 * D`` bytes per vector.
KINDS = ["float32, flat", "PQ", "IVF-PQ", "HNSW-PQ",
         "IVF-PQ + refine", "HNSW-PQ + refine"]

costs = {}  # (kind, D) -> (bytes per vector, bytes per list, fixed bytes)
for D in DIMS:
    X = rng.standard_normal((N_LARGE, D)).astype(np.float32)
    costs["float32, flat", D] = (X[0].nbytes, 0.0, 0.0)
    for kind in KINDS[1:]:
        small = index_bytes(fit(kind, X[:N_SMALL]))
        large = index_bytes(fit(kind, X))
        per_vector = (large - small) / (N_LARGE - N_SMALL)
        per_list = 0.0
        if kind.startswith("IVF-PQ"):
            more_lists = index_bytes(fit(kind, X[:N_SMALL], n_lists=LISTS_LARGE))
            per_list = (more_lists - small) / (LISTS_LARGE - LISTS_SMALL)
        fixed = small - per_vector * N_SMALL - per_list * LISTS_SMALL
        costs[kind, D] = (per_vector, per_list, fixed)

# %%
# What one fitted index reports, for reference (D = 128, 1,000 vectors):
# the parts of ``memory_usage_`` in bytes.
for kind in ("IVF-PQ", "HNSW-PQ"):
    X = rng.standard_normal((N_SMALL, 128)).astype(np.float32)
    usage = fit(kind, X).memory_usage_
    print(f"{kind}: " + ", ".join(f"{k}={v:,.0f}" for k, v in usage.items()))

# %%
# The largest collection that fits
# --------------------------------
#
# With ``n_lists = 4 * sqrt(n)``, the memory of ``n`` vectors is
# ``a * n + b * 4 * sqrt(n) + c`` for the per-vector cost ``a``, per-list
# cost ``b`` and fixed cost ``c``; setting it equal to the budget gives a
# quadratic equation in ``sqrt(n)``.


def max_vectors(per_vector, per_list, fixed, budget=BUDGET):
    a, b, c = per_vector, 4 * per_list, fixed - budget
    root = (-b + np.sqrt(b * b - 4 * a * c)) / (2 * a)
    return int(root**2)


capacity = {key: max_vectors(*cost) for key, cost in costs.items()}

print(f"\nvectors in {BUDGET / 2**30:.0f} GiB (bytes per vector in brackets)")
print(f"{'index':<18}" + "".join(f"{f'D={D}':>22}" for D in DIMS))
for kind in KINDS:
    cells = [f"{capacity[kind, D] / 1e6:9,.0f} M ({costs[kind, D][0]:5.0f} B)"
             for D in DIMS]
    print(f"{kind:<18}" + "".join(f"{c:>22}" for c in cells))

# %%
# The same numbers as a picture: bytes per vector on the left, the
# capacity of the budget on the right (both on log scales).
fig, (ax_bytes, ax_cap) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
width = 0.8 / len(KINDS)
x = np.arange(len(DIMS))
colors = plt.cm.tab10(np.arange(len(KINDS)))
for i, kind in enumerate(KINDS):
    offset = (i - (len(KINDS) - 1) / 2) * width
    ax_bytes.bar(x + offset, [costs[kind, D][0] for D in DIMS], width,
                 color=colors[i], label=kind)
    ax_cap.bar(x + offset, [capacity[kind, D] / 1e6 for D in DIMS], width,
               color=colors[i], label=kind)
for ax in (ax_bytes, ax_cap):
    ax.set_xticks(x, [f"D = {D}\n(m = {D // DIMS_PER_BYTE})" for D in DIMS])
    ax.set_yscale("log")
    ax.grid(True, axis="y", which="both", alpha=0.3)
ax_bytes.set_ylabel("bytes per vector")
ax_bytes.set_title("memory per indexed vector")
ax_cap.set_ylabel("millions of vectors")
ax_cap.set_title(f"vectors that fit in {BUDGET / 2**30:.0f} GiB")
ax_bytes.legend(loc="upper left", fontsize=9)
plt.show()

# %%
# Reading the plan
# ----------------
#
# * PQ codes alone hold 32 times more vectors than float32, at every
#   dimension; the codebooks (256 codewords per sub-space, as much as 256
#   float32 vectors) are negligible at this scale.
# * IVF-PQ adds a 4-byte id per vector and a centroid per list: a small
#   overhead, largest in relative terms for short codes (D = 128).  Past
#   ``2**31`` vectors the ids become 8 bytes.
# * HNSW-PQ adds about ``2 * n_links`` 4-byte links per vector (plus its
#   upper levels and their bookkeeping), which for short codes costs more
#   than the codes themselves: at D = 128 the graph is most of the index.
#   Fewer links (``n_links``) shrink it, at some cost in recall.
# * Re-ranking keeps the raw vectors, so the index is then *larger* than
#   the float32 flat array: it buys recall, not memory.  An index saved
#   with ``save`` and opened with ``pqsk.load(path, mmap_mode="r")`` leaves
#   its arrays on disk and reads pages on demand; as re-ranking touches
#   only ``refine_factor * n_neighbors`` raw vectors per query, they can
#   stay there while the codes that every query scans are cached in RAM.
#
# These figures count the index only: the process also needs working
# memory for queries and, while building, for the training sample and the
# data being added.
#
# With ``metric="euclidean"`` or ``"sqeuclidean"``,
# :class:`~pqsk.IVFPQNeighbors` also precomputes, for every list, a table
# of ``n_subspaces * n_codewords`` values that speeds up the search; it
# appears as ``list_terms`` in ``memory_usage_`` and grows with the number
# of lists.  Its size at the ``n_lists`` of each plan above:
for D in DIMS:
    X = rng.standard_normal((N_SMALL, D)).astype(np.float32)
    est = IVFPQNeighbors(
        n_lists=LISTS_SMALL, n_subspaces=D // DIMS_PER_BYTE, n_codewords=N_CODEWORDS,
        codebooks=random_codebooks(D), metric="euclidean", refine_factor=0, n_probe=8
    ).fit(X)
    per_list = est.memory_usage_["list_terms"] / est.n_lists_
    n_lists = int(4 * np.sqrt(capacity["IVF-PQ", D]))
    print(f"D={D:<5d} n_lists={n_lists:>7,d}: list_terms "
          f"{per_list * n_lists / 2**30:6.2f} GiB")
