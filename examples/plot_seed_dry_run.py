"""
=======================================
Product quantization by hand: a dry run
=======================================

This example follows five 4-dimensional vectors through product
quantization (PQ) one step at a time, small enough to check every number
with pencil and paper:

1. split each vector into ``m = 2`` sub-vectors of 2 values;
2. give each sub-space ``k = 2`` representatives (codewords);
3. store every vector as the indices of its nearest codeword in each
   sub-space (its *code*);
4. answer a query with two small lookup tables and one addition per stored
   vector (asymmetric distance computation, ADC).

The codewords are first chosen naively, as the first ``k`` training
sub-vectors, and passed to pqsk with ``codebooks=``; the search then ranks
two far-away vectors first.  Learning the codewords with k-means, as pqsk
does by default, repairs the ranking.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# The data
# --------
#
# Five vectors of dimension ``D = 4``: three close to each other (``x0``,
# ``x1``, ``x2``) and two far from them (``x3``, ``x4``).  The query ``q``
# sits among the first three.
import matplotlib.pyplot as plt
import numpy as np

from pqsk import PQNeighbors, PQTransformer

X = np.array(
    [
        [1, 2, 3, 4],  # x0
        [1, 3, 3, 5],  # x1
        [2, 2, 4, 4],  # x2
        [8, 9, 0, 1],  # x3
        [9, 8, 1, 0],  # x4
    ],
    dtype=np.float32,
)
q = np.array([[1, 3, 4, 4]], dtype=np.float32)

m, k = 2, 2  # sub-spaces, codewords per sub-space
ds = X.shape[1] // m  # width of a sub-space
print(f"D = {X.shape[1]}, m = {m}, ds = {ds}, k = {k}")

# %%
# Step 1: split into sub-vectors
# ------------------------------
#
# Sub-space ``j`` holds columns ``j * ds`` to ``(j + 1) * ds - 1``.  PQ
# never mixes columns of different sub-spaces: each one is quantized on its
# own.
for j in range(m):
    print(f"sub-space {j} (columns {j * ds}..{(j + 1) * ds - 1}):")
    print(X[:, j * ds : (j + 1) * ds])

# %%
# Step 2: choose the codewords naively
# ------------------------------------
#
# The simplest rule keeps the first ``k`` training sub-vectors of each
# sub-space.  pqsk takes ready-made codewords as a ``codebooks`` array of
# shape ``(m, k, ds)``; ``fit`` then trains nothing and only checks shapes.
naive_codebooks = np.stack([X[:k, j * ds : (j + 1) * ds] for j in range(m)])
pq = PQTransformer(n_subspaces=m, n_codewords=k, codebooks=naive_codebooks).fit(X)
for j in range(m):
    print(f"codebook of sub-space {j}:\n{pq.codebooks_[j]}")

# %%
# Step 3: encode the vectors
# --------------------------
#
# ``transform`` replaces each sub-vector by the index of its nearest
# codeword (squared Euclidean distance).  For ``x3 = [8, 9, 0, 1]``, the
# sub-vector ``[8, 9]`` is at squared distance 98 from ``[1, 2]`` and 85
# from ``[1, 3]``, so its first index is 1; ``[0, 1]`` is at 18 from
# ``[3, 4]`` and 25 from ``[3, 5]``, so its second index is 0.
sq_to_codewords = [
    ((X[:, None, j * ds : (j + 1) * ds] - pq.codebooks_[j][None]) ** 2).sum(axis=2)
    for j in range(m)
]
for i in range(X.shape[0]):
    print(
        f"x{i} = {X[i].astype(int)}: sub-space 0 -> {sq_to_codewords[0][i]}, "
        f"sub-space 1 -> {sq_to_codewords[1][i]}"
    )

codes = pq.transform(X)
print("codes:")
print(codes)

# %%
# Each vector is now two small integers.  With ``k <= 256`` a code takes
# one byte per sub-space, so these 4-value vectors (16 bytes in float32)
# are stored in 2 bytes.  ``inverse_transform`` shows what the codes still
# know about the vectors: ``x3`` and ``x4`` have been squeezed onto
# codewords of ``x0`` and ``x1``, far from where they really are.
print(f"bytes per vector: {codes.itemsize * codes.shape[1]} "
      f"(float32: {X.itemsize * X.shape[1]})")
print("reconstructions:")
print(pq.inverse_transform(codes))
print(f"mean squared reconstruction error: {-pq.score(X):.1f}")

# %%
# Step 4: lookup tables for the query
# -----------------------------------
#
# The query is *not* encoded.  Instead, each of its sub-vectors is compared
# with the ``k`` codewords of its sub-space, once.  ``distance_tables``
# returns these ``m x k`` squared distances: ``[1, 3]`` is at 1 from
# ``[1, 2]`` and at 0 from ``[1, 3]``; ``[4, 4]`` is at 1 from ``[3, 4]``
# and at 2 from ``[3, 5]``.
tables = pq.distance_tables(q)[0]
for j in range(m):
    print(f"table of sub-space {j}: {tables[j]}")

# %%
# Step 5: distances by lookup and addition
# ----------------------------------------
#
# The approximate squared distance between ``q`` and stored vector ``i`` is
# ``tables[0, codes[i, 0]] + tables[1, codes[i, 1]]``: ``m`` lookups and
# ``m - 1`` additions, whatever the dimension of the vectors.  The exact
# distances are printed alongside for comparison.
adc = tables[np.arange(m), codes].sum(axis=1)
exact = ((X - q) ** 2).sum(axis=1)
for i in range(X.shape[0]):
    parts = " + ".join(f"{tables[j, codes[i, j]]:g}" for j in range(m))
    print(f"x{i}: code {codes[i]} -> {parts} = {adc[i]:g}   (exact: {exact[i]:g})")

# %%
# Step 6: rank, with the search estimator
# ---------------------------------------
#
# :class:`~pqsk.PQNeighbors` stores only the codes and performs steps 4
# and 5 for every query in compiled code.  With ``metric="sqeuclidean"``
# it returns the ADC sums themselves; ties are broken by the smaller
# index.  The top 3 is ``(3, 1), (4, 1), (0, 2)``: the two vectors that are
# really the farthest from ``q`` come first, because the naive codewords
# describe them so badly.
nn = PQNeighbors(
    n_neighbors=3,
    n_subspaces=m,
    n_codewords=k,
    metric="sqeuclidean",
    codebooks=naive_codebooks, refine_factor=0
).fit(X)
dist, ind = nn.kneighbors(q)
print("stored codes:\n", nn.codes_)
print("top 3 (index, distance):", [(int(i), float(d)) for i, d in zip(ind[0], dist[0])])

# %%
# Learned codewords
# -----------------
#
# Without ``codebooks=``, pqsk learns each sub-space's codewords with
# k-means (:class:`~sklearn.cluster.KMeans`): the codeword becomes the mean
# of the sub-vectors assigned to it.  Here each sub-space gets one codeword
# for the group ``x0, x1, x2`` and one for ``x3, x4``, the codes separate
# the two groups, and the top 3 are ``x0``, ``x1`` and ``x2``: the true
# nearest neighbours of ``q``.  (All three get the same approximate
# distance, because they share a code.)
nn_km = PQNeighbors(
    n_neighbors=3, n_subspaces=m, n_codewords=k, metric="sqeuclidean", random_state=0,
    refine_factor=0
).fit(X)
for j in range(m):
    print(f"learned codebook of sub-space {j}:\n{nn_km.codebooks_[j]}")
print("codes:\n", nn_km.codes_)

# The fitted codebooks can be handed to a PQTransformer to look at the
# query's tables.
pq_km = PQTransformer(n_subspaces=m, n_codewords=k, codebooks=nn_km.codebooks_).fit(X)
tables_km = pq_km.distance_tables(q)[0]
print("tables:\n", tables_km)
dist_km, ind_km = nn_km.kneighbors(q)
print("top 3 (index, distance):",
      [(int(i), round(float(d), 3)) for i, d in zip(ind_km[0], dist_km[0])])
print(f"mean squared reconstruction error: {-pq_km.score(X):.2f} "
      f"(naive codewords: {-pq.score(X):.1f})")

# %%
# Both quantizers in pictures
# ---------------------------
#
# Each panel is one sub-space.  Dots are the sub-vectors of ``x0 .. x4``,
# open stars the codewords, the cross the query's sub-vector; a grey line
# joins each sub-vector to the codeword it is encoded with (a sub-vector
# that is itself a codeword sits inside its star).  The naive codewords
# both sit among ``x0 .. x2``, so ``x3`` and ``x4`` travel a long way to
# reach them; the k-means codewords sit in the middle of each group.
fig, axes = plt.subplots(2, 2, figsize=(9, 8), layout="constrained")
for row, (name, est) in enumerate([("naive", nn), ("k-means", nn_km)]):
    for j in range(m):
        ax = axes[row, j]
        sub = X[:, j * ds : (j + 1) * ds]
        cw = est.codebooks_[j]
        for i, (a, b) in enumerate(sub):
            c = cw[est.codes_[i, j]]
            ax.plot([a, c[0]], [b, c[1]], color="0.7", lw=1, zorder=1)
            ax.annotate(f"x{i}", (a, b), textcoords="offset points", xytext=(-4, -14),
                        ha="right")
        ax.scatter(cw[:, 0], cw[:, 1], s=500, marker="*", facecolor="none",
                   edgecolor="tab:orange", linewidth=2, zorder=2, label="codewords")
        ax.scatter(sub[:, 0], sub[:, 1], s=30, color="tab:blue", zorder=3,
                   label="sub-vectors")
        qs = q[0, j * ds : (j + 1) * ds]
        ax.scatter(qs[0], qs[1], s=150, marker="x", color="tab:red", linewidth=2,
                   zorder=4, label="query")
        ax.set_xlim(-1, 11)
        ax.set_ylim(-1, 11)
        ax.set_aspect("equal")
        ax.set_title(f"{name} codewords, sub-space {j} "
                     f"(columns {j * ds}, {j * ds + 1})")
axes[0, 0].legend(loc="upper left")
plt.show()
