"""
=================================================
Approximate nearest neighbours in TSNE and Isomap
=================================================

:class:`~sklearn.manifold.TSNE` and :class:`~sklearn.manifold.Isomap`
only need each sample's nearest neighbours, and both accept them
precomputed, as a sparse graph, with ``metric="precomputed"``.  Any
estimator that produces such a graph in ``transform``, as
:class:`~sklearn.neighbors.KNeighborsTransformer` does, can therefore be
put in front of them in a :class:`~sklearn.pipeline.Pipeline`.

pqsk's search estimators follow that contract.  Here
:class:`~pqsk.IVFPQNeighbors` and :class:`~pqsk.HNSWPQNeighbors` replace
the exact :class:`~sklearn.neighbors.KNeighborsTransformer` in front of
TSNE and Isomap on the digits data set, and we compare the neighbour
graphs and the embeddings they lead to.

The digits are small (1,797 images of 64 pixels), so the exact search is
fast and nothing is gained in time here; the point is that the compressed
indexes (16 bytes per image instead of 256) yield embeddings of the same
quality, which is what matters when the data no longer fit in memory as
float32.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# Data and parameters
# -------------------
#
# TSNE with perplexity ``p`` looks at ``3 * p + 1`` neighbours per sample
# (91 for the default perplexity of 30).  A transformer in
# ``mode="distance"`` returns ``n_neighbors + 1`` entries per row, because
# each sample finds itself first when the data is queried against itself;
# so ``n_neighbors = 91`` is exactly enough.  Isomap uses fewer.
#
# TSNE squares the distances it is given, so the transformers return plain
# Euclidean distances (``metric="euclidean"``, pqsk's default).
import time

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.manifold import TSNE, Isomap, trustworthiness
from sklearn.neighbors import KNeighborsTransformer
from sklearn.pipeline import make_pipeline
from threadpoolctl import threadpool_limits

from pqsk import HNSWPQNeighbors, IVFPQNeighbors

X, y = load_digits(return_X_y=True)
X = X.astype(np.float32)

perplexity = 30
tsne_neighbors = int(3 * perplexity + 1)
isomap_neighbors = 10


def make_transformers(n_neighbors):
    """The three neighbour searches compared, for a given n_neighbors."""
    pq = dict(n_subspaces=16, n_codewords=256, refine_factor=0, random_state=0)
    return {
        "exact\n(KNeighborsTransformer)": KNeighborsTransformer(
            n_neighbors=n_neighbors, mode="distance"
        ),
        "IVFPQNeighbors\n(16-byte codes)": IVFPQNeighbors(
            n_neighbors=n_neighbors, mode="distance", n_lists=32, n_probe=8, **pq
        ),
        "HNSWPQNeighbors\n(16-byte codes)": HNSWPQNeighbors(
            n_neighbors=n_neighbors, mode="distance", ef_search=2 * n_neighbors, **pq
        ),
    }


# %%
# How close are the approximate graphs to the exact one?
# -------------------------------------------------------
#
# ``fit_transform`` indexes the images and returns each image's row of
# the neighbour graph.  We compare the sets of neighbours in each row with
# those of the exact graph (the fraction in common is the recall).  The
# times, measured on one core (see below), include building each index.
def neighbour_sets(graph):
    graph = graph.tocsr()
    return [set(graph.indices[graph.indptr[i]:graph.indptr[i + 1]])
            for i in range(graph.shape[0])]


graphs, graph_times = {}, {}
with threadpool_limits(limits=1):
    for name, transformer in make_transformers(tsne_neighbors).items():
        t0 = time.perf_counter()
        graphs[name] = transformer.fit_transform(X)
        graph_times[name] = time.perf_counter() - t0

exact_name = next(iter(graphs))
exact_sets = neighbour_sets(graphs[exact_name])
for name, graph in graphs.items():
    sets = neighbour_sets(graph)
    recall = np.mean([len(a & b) / len(b) for a, b in zip(sets, exact_sets)])
    print(f"{name.splitlines()[0]:<22} graph {graph.shape}, "
          f"{graph.nnz // graph.shape[0]} entries per row, "
          f"recall {recall:.3f}, {graph_times[name]:.2f} s")

# %%
# Embeddings
# ----------
#
# Each pipeline is a transformer followed by the manifold learner with
# ``metric="precomputed"``.  TSNE is run with the same random
# initialisation for every graph, so differences come from the graphs.
# Everything is timed on one core
# (:func:`threadpoolctl.threadpool_limits` caps the OpenMP and BLAS
# threads of scikit-learn and pqsk alike), so the times compare the work
# done rather than how well it spreads over the cores.
# The *trustworthiness* (:func:`~sklearn.manifold.trustworthiness`, 1 is
# best) measures how well each embedding keeps the 10 nearest neighbours
# of the original 64-dimensional space.
embeddings = {}
for method in ("TSNE", "Isomap"):
    n_neighbors = tsne_neighbors if method == "TSNE" else isomap_neighbors
    for name, transformer in make_transformers(n_neighbors).items():
        if method == "TSNE":
            learner = TSNE(metric="precomputed", perplexity=perplexity, init="random",
                           max_iter=500, random_state=0)
        else:
            learner = Isomap(n_neighbors=n_neighbors, metric="precomputed")
        pipe = make_pipeline(transformer, learner)
        with threadpool_limits(limits=1):
            t0 = time.perf_counter()
            Y = pipe.fit_transform(X)
            duration = time.perf_counter() - t0
        score = trustworthiness(X, Y, n_neighbors=10)
        embeddings[method, name] = (Y, duration, score)
        print(f"{method:<7} {name.splitlines()[0]:<22} "
              f"trustworthiness {score:.3f}, {duration:5.2f} s")

# %%
# The plots: one row per method, one column per neighbour search, each
# point an image coloured by its digit.
names = list(graphs)
fig, axes = plt.subplots(2, 3, figsize=(13, 8.5), layout="constrained")
for row, method in enumerate(("TSNE", "Isomap")):
    for col, name in enumerate(names):
        Y, duration, score = embeddings[method, name]
        ax = axes[row, col]
        sc = ax.scatter(Y[:, 0], Y[:, 1], c=y, cmap="tab10", s=4)
        ax.set_title(f"{method} with {name}\n"
                     f"trustworthiness {score:.3f}, {duration:.1f} s", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
fig.colorbar(sc, ax=axes, ticks=range(10), label="digit", shrink=0.6)
plt.show()

# %%
# The approximate graphs miss a few percent of the exact neighbours, yet
# the embeddings keep the same structure: the ten digit groups are
# separated as well as with the exact graph, and the TSNE trustworthiness
# is the same to three decimals.  (For Isomap the approximate graphs even
# score a little higher here: they are different graphs, not worse ones.)
# TSNE in particular depends on the bulk of each neighbourhood, not on its
# exact ranking.
#
# On larger data sets the neighbour search becomes the expensive and
# memory-hungry part of these methods, and an approximate, compressed index
# takes its place without changing anything else in the pipeline.
