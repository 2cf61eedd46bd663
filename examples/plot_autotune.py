"""
================================================
Automatic tuning of the search parameters
================================================

:func:`pqsk.tune_search` measures recall@10 and query time of a fitted
index for settings of its search-time parameters (``n_probe`` or
``ef_search``, and ``refine_factor``), walking each from cheap to
expensive, and sets the fastest setting that reaches a recall target.  It
returns every setting it measured: the *frontier* of the speed / recall
trade-off, plotted here for an inverted-file index and a graph index.

See :ref:`tuning` for what is measured, and the example *Tuning n_probe,
ef_search and refine_factor* for a full manual sweep of the same knobs.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# An index and held-out queries
# -----------------------------
#
# 20,000 vectors in 32 dimensions around 200 centres, and 300 held-out
# rows drawn the same way as queries.  Both indexes are fitted with
# ``refine_factor=8``, so that they keep the raw vectors: the tuner can
# then try re-ranking, and computes the exact neighbours from them.
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import make_blobs

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, tune_search

data, _ = make_blobs(n_samples=20_300, n_features=32, centers=200, cluster_std=6.0,
                     random_state=0)
data = data.astype(np.float32)
X, queries = data[:20_000], data[20_000:]

common = dict(n_subspaces=8, refine_factor=8, random_state=0)
ivf = IVFPQNeighbors(n_lists=128, **common).fit(X)
hnsw = HNSWPQNeighbors(n_links=12, ef_construction=64, **common).fit(X)

# %%
# Tune for recall@10 >= 0.95
# --------------------------
#
# Each call walks the grid and sets the cheapest setting that reaches the
# target on the estimator, with ``set_params``: no rebuild.
TARGET = 0.95
results = {}
for name, est in (("IVFPQNeighbors", ivf), ("HNSWPQNeighbors", hnsw)):
    res = tune_search(est, queries, target_recall=TARGET, n_neighbors=10,
                      n_queries=300, random_state=0)
    results[name] = res
    print(f"{name}: {len(res.frontier['recall'])} settings measured; chose "
          f"{res.params}: recall@10 {res.recall:.3f}, "
          f"{res.queries_per_second:,.0f} queries/s")

# %%
# The estimator now searches with the chosen setting:
print(f"ivf.n_probe={ivf.n_probe}, ivf.refine_factor={ivf.refine_factor}")
print(f"hnsw.ef_search={hnsw.ef_search}, hnsw.refine_factor={hnsw.refine_factor}")

# %%
# The frontier
# ------------
#
# One point per setting measured, one colour per ``refine_factor``; the
# line joins the Pareto-optimal settings (no other is both faster and more
# accurate) and the star is the setting chosen.  Each ``refine_factor``'s
# walk stops at its first setting reaching the target, so the points above
# the dashed line are few: settings beyond them would only cost more.
# ``pandas.DataFrame(result.frontier)`` gives the same data as a table.
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained")
for ax, (name, res) in zip(axes, results.items()):
    f = res.frontier
    knob = "n_probe" if "n_probe" in f else "ef_search"
    refine = np.unique(f["refine_factor"])
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(refine)))
    for rf, color in zip(refine, colors):
        row = f["refine_factor"] == rf
        ax.scatter(f["recall"][row], f["queries_per_second"][row], color=color,
                   label=f"refine_factor={rf}")
        for r, qps, v in zip(f["recall"][row], f["queries_per_second"][row], f[knob][row]):
            ax.annotate(str(v), (r, qps), textcoords="offset points", xytext=(3, 3),
                        fontsize=7, color=color)
    front = np.flatnonzero(f["pareto"])
    front = front[np.argsort(f["recall"][front])]
    ax.plot(f["recall"][front], f["queries_per_second"][front], "k-", lw=1,
            label="Pareto front")
    ax.scatter([res.recall], [res.queries_per_second], marker="*", s=250,
               color="crimson", zorder=3, label="chosen")
    ax.axvline(TARGET, color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("recall@10")
    ax.set_title(f"{name} (labels: {knob})")
    ax.grid(True, alpha=0.3)
axes[0].set_ylabel("queries per second")
axes[0].legend(loc="lower left", fontsize=8)
fig.suptitle("tune_search: settings measured on 300 held-out queries")
plt.show()

# %%
# Notes
# -----
#
# * The query rate is measured with the estimator's ``n_jobs`` on this
#   machine: tune where the index will serve queries.
# * Timing noise only adds time, and a setting never costs more than one
#   fetching more candidates, so each point's time is the least measured
#   for it and for the dearer settings (``measured_time_per_query`` keeps
#   its own).
# * With ``X_sample=None`` the queries are indexed points, each left out
#   of its own neighbours: the setting for ``kneighbors(X=None)`` and
#   ``transform`` on the training data (a k-NN graph).
