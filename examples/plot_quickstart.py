"""
=========================
Getting started with pqsk
=========================

pqsk compresses vectors with product quantization (PQ) and searches the
compressed vectors for nearest neighbours, behind the usual scikit-learn
estimator API.  This example walks through the basic calls on the 8x8
images of :func:`~sklearn.datasets.load_digits` (64 features each):

* :class:`~pqsk.PQTransformer`: ``fit`` learns the codebooks,
  ``transform`` turns vectors into short integer codes,
  ``inverse_transform`` turns codes back into (approximate) vectors, and
  ``score`` measures how much was lost;
* :class:`~pqsk.PQNeighbors`: ``fit`` stores only the codes of the
  indexed vectors, ``kneighbors`` answers queries against them;
* how many bytes a vector takes before and after.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# Load the data
# -------------
#
# Each image is a row of 64 pixel intensities (0 to 16).  We keep 300
# images aside as queries and index the rest.  pqsk works in float32 (or
# float64 if given float64), so we convert once.
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.neighbors import NearestNeighbors

from pqsk import PQNeighbors, PQTransformer

digits = load_digits()
X = digits.data.astype(np.float32)
y = digits.target
X_index, X_query, y_index, y_query = train_test_split(
    X, y, test_size=300, random_state=0
)
print(f"{X_index.shape[0]} vectors to index, {X_query.shape[0]} queries, "
      f"{X.shape[1]} features")

# %%
# Compress with PQTransformer
# ---------------------------
#
# ``n_subspaces=8`` cuts the 64 columns into 8 blocks of 8 (here, one block
# per image row).  ``n_codewords=64`` gives each block 64 codewords, found
# by k-means on that block's columns.  ``transform`` replaces each block by
# the index of its nearest codeword, so a vector becomes 8 small integers.
pq = PQTransformer(n_subspaces=8, n_codewords=64, random_state=0)
pq.fit(X_index)
print("codebooks_ shape:", pq.codebooks_.shape, "(sub-spaces, codewords, width)")

codes = pq.transform(X_query)
print("codes shape:", codes.shape, "dtype:", codes.dtype)
print("codes of the first query:", codes[0])

# %%
# Decompress and measure the loss
# -------------------------------
#
# ``inverse_transform`` concatenates the codewords named by a code.  The
# result is close to the original, not equal to it.  ``score`` returns
# minus the mean squared reconstruction error (higher is better, as
# scikit-learn scores are), here on the held-out queries.
X_rec = pq.inverse_transform(codes)
mse = np.mean(np.sum((X_query - X_rec) ** 2, axis=1))
print(f"mean squared reconstruction error: {mse:.1f}")
print(f"pq.score(X_query):                 {pq.score(X_query):.1f}")
print(f"mean squared norm of the queries:  {np.mean(np.sum(X_query**2, axis=1)):.1f}")

# %%
# The trade-off between code length and quality is easiest to see on the
# images.  Each row below uses a different quantizer; the number of bytes
# per image is ``n_subspaces`` (one byte per sub-space while
# ``n_codewords <= 256``), against 256 bytes for 64 float32 values.
configs = [(4, 16), (8, 64), (16, 256)]
n_show = 8
fig, axes = plt.subplots(len(configs) + 1, n_show, figsize=(8, 4.6))
for col in range(n_show):
    axes[0, col].imshow(X_query[col].reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
axes[0, 0].set_ylabel("original\n256 B", rotation=0, ha="right", va="center")
for row, (m, k) in enumerate(configs, start=1):
    pq_mk = PQTransformer(n_subspaces=m, n_codewords=k, random_state=0).fit(X_index)
    rec = pq_mk.inverse_transform(pq_mk.transform(X_query[:n_show]))
    for col in range(n_show):
        axes[row, col].imshow(rec[col].reshape(8, 8), cmap="gray_r", vmin=0, vmax=16)
    axes[row, 0].set_ylabel(f"m={m}, k={k}\n{m} B", rotation=0, ha="right",
                            va="center")
    print(f"m={m:2d}, k={k:3d}: {m:2d} bytes per image, "
          f"reconstruction error {-pq_mk.score(X_query):6.1f}")
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
fig.suptitle("Held-out digits and their PQ reconstructions")
fig.subplots_adjust(left=0.16, right=0.98, top=0.92, bottom=0.02, hspace=0.1)

# %%
# Search the compressed vectors with PQNeighbors
# ----------------------------------------------
#
# :class:`~pqsk.PQNeighbors` trains the same kind of quantizer, keeps only
# the codes of the indexed vectors (in ``codes_``), and compares each query
# with every code through small lookup tables.  Its interface is the one
# of :class:`~sklearn.neighbors.NearestNeighbors`.
nn = PQNeighbors(n_neighbors=5, n_subspaces=8, n_codewords=64, random_state=0, refine_factor=0)
nn.fit(X_index)
dist, ind = nn.kneighbors(X_query)
print("distances of the first query:", np.round(dist[0], 1))
print("indices of the first query:  ", ind[0])

# %%
# How good are these neighbours?  We compare them with the exact ones from
# :class:`~sklearn.neighbors.NearestNeighbors`: *recall@5* is the fraction
# of the true 5 nearest neighbours that PQ found.  For a classification
# view, we also count how many neighbours show the same digit as the query.
exact = NearestNeighbors(n_neighbors=5).fit(X_index)
ind_exact = exact.kneighbors(X_query, return_distance=False)
recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ind, ind_exact)])
same_pq = np.mean(y_index[ind] == y_query[:, None])
same_exact = np.mean(y_index[ind_exact] == y_query[:, None])
print(f"recall@5 against exact search: {recall:.2f}")
print(f"neighbours with the query's label: PQ {same_pq:.3f}, exact {same_exact:.3f}")

# %%
# Some queries (left column) and the five neighbours PQ returned for them.
# The neighbours are the original images, looked up by index; the index
# itself never stores them.
n_rows = 5
fig, axes = plt.subplots(n_rows, 6, figsize=(6, 5.4))
for r in range(n_rows):
    axes[r, 0].imshow(X_query[r].reshape(8, 8), cmap="gray_r")
    for c in range(5):
        axes[r, c + 1].imshow(X_index[ind[r, c]].reshape(8, 8), cmap="gray_r")
        axes[r, c + 1].set_title(f"{dist[r, c]:.1f}", fontsize=8)
for ax in axes.ravel():
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_title("query", fontsize=8)
fig.suptitle("PQNeighbors: queries and their 5 neighbours (ADC distance)")
fig.tight_layout()

# %%
# ``transform`` gives the same answer as a sparse graph, exactly as
# :class:`~sklearn.neighbors.KNeighborsTransformer` does, so the estimator
# can be put in front of anything that accepts ``metric="precomputed"``
# (see the other examples).  In ``mode="distance"`` each row holds
# ``n_neighbors + 1`` entries.
graph = nn.transform(X_query[:3])
print(repr(graph))

# %%
# Memory
# ------
#
# A float32 vector costs ``4 * n_features`` bytes; a PQ code costs
# ``n_subspaces`` bytes (``2 * n_subspaces`` when ``n_codewords > 256``).
# The codebooks are a fixed cost shared by all vectors: ``n_subspaces *
# n_codewords * (n_features / n_subspaces)`` float32 values, i.e. as much as
# ``n_codewords`` float32 vectors.
n = nn.n_samples_fit_
float_bytes = X_index.astype(np.float32).nbytes
code_bytes = nn.codes_.nbytes
print(f"float32 vectors: {float_bytes / n:6.0f} bytes per vector, "
      f"{float_bytes / 1024:7.1f} KiB in total")
print(f"PQ codes:        {code_bytes / n:6.0f} bytes per vector, "
      f"{code_bytes / 1024:7.1f} KiB in total "
      f"(+ {nn.codebooks_.nbytes / 1024:.1f} KiB of codebooks)")
print(f"compression of the vectors: {float_bytes / code_bytes:.0f}x")

# %%
# With only 1,497 vectors the codebooks still outweigh the codes; the
# fixed cost fades as the index grows.  At a million vectors the same
# codebooks would be 0.2 % of an 8 MB index, against 256 MB of float32.
plt.show()
