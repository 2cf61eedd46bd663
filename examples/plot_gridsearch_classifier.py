"""
========================================
Choosing the code size with GridSearchCV
========================================

pqsk's estimators are ordinary scikit-learn estimators, so their
parameters can be tuned with :class:`~sklearn.model_selection.GridSearchCV`
like any other.  This example does it twice on the digits data set
(:func:`~sklearn.datasets.load_digits`, 1,797 images of 64 pixels):

1. for a *classifier*: :class:`~pqsk.PQNeighbors` computes a sparse graph
   of approximate nearest neighbours, and
   :class:`~sklearn.neighbors.KNeighborsClassifier` with
   ``metric="precomputed"`` votes among them.  The grid search picks the
   number of sub-spaces (``n_subspaces``) and codewords (``n_codewords``)
   that classify best;
2. for the *quantizer alone*: :class:`~pqsk.PQTransformer`'s ``score`` is
   minus the mean squared reconstruction error, so a grid search needs no
   scorer, and the results show how error falls with code size.
"""

# SPDX-License-Identifier: BSD-3-Clause

# %%
# Data
# ----
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.neighbors import KNeighborsClassifier, KNeighborsTransformer
from sklearn.pipeline import make_pipeline

from pqsk import PQNeighbors, PQTransformer

X, y = load_digits(return_X_y=True)
X = X.astype(np.float32)
X_train, X_test, y_train, y_test = train_test_split(
    X, y, test_size=0.25, stratify=y, random_state=0
)

# %%
# A k-NN classifier on compressed vectors
# ---------------------------------------
#
# The pipeline has two steps.  :class:`~pqsk.PQNeighbors` with
# ``mode="distance"`` behaves as
# :class:`~sklearn.neighbors.KNeighborsTransformer`: ``fit`` encodes the
# training images, ``transform`` returns for each image a sparse row with
# the ADC distances to its ``n_neighbors + 1`` nearest training images.
# The classifier then only reads those rows.  Its ``n_neighbors`` must not
# exceed the transformer's.
#
# Since the training images are stored as codes only, memory per image is
# ``n_subspaces`` bytes instead of 256; the grid explores how far that can
# be pushed before accuracy suffers.
K = 5
pipe = make_pipeline(
    PQNeighbors(n_neighbors=K, mode="distance", random_state=0,
                n_subspaces=8, n_codewords=256, refine_factor=0),
    KNeighborsClassifier(n_neighbors=K, metric="precomputed"),
)
n_subspaces = [2, 4, 8, 16, 32]
n_codewords = [4, 16, 64, 256]
param_grid = {
    "pqneighbors__n_subspaces": n_subspaces,
    "pqneighbors__n_codewords": n_codewords,
}
search = GridSearchCV(pipe, param_grid, cv=4)
search.fit(X_train, y_train)
print("best parameters:", search.best_params_)
print(f"best cross-validated accuracy: {search.best_score_:.3f}")
print(f"test accuracy of the refitted best pipeline: "
      f"{search.score(X_test, y_test):.3f}")

# %%
# For reference, the same pipeline with exact neighbours on the float32
# images.
exact = make_pipeline(
    KNeighborsTransformer(n_neighbors=K, mode="distance"),
    KNeighborsClassifier(n_neighbors=K, metric="precomputed"),
).fit(X_train, y_train)
exact_accuracy = exact.score(X_test, y_test)
print(f"exact k-NN test accuracy: {exact_accuracy:.3f}")

# %%
# The results table
# -----------------
#
# ``cv_results_`` holds one entry per combination, with its parameters in
# ``params``.  We place each mean accuracy in an ``n_subspaces x
# n_codewords`` table by looking its parameters up, rather than relying on
# the order in which the grid was explored.
res = search.cv_results_
acc = np.empty((len(n_subspaces), len(n_codewords)))
for idx, params in enumerate(res["params"]):
    i = n_subspaces.index(params["pqneighbors__n_subspaces"])
    j = n_codewords.index(params["pqneighbors__n_codewords"])
    acc[i, j] = res["mean_test_score"][idx]

header = "".join(f"{f'k={k}':>9}" for k in n_codewords)
print(f"mean CV accuracy         {header}")
for i, m in enumerate(n_subspaces):
    print(f"m={m:<3d}({m:2d} bytes/image)  " + "".join(f"{a:9.3f}" for a in acc[i]))

# %%
# As a heat map:


def heatmap(ax, values, title):
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(n_codewords)), [str(k) for k in n_codewords])
    ax.set_yticks(range(len(n_subspaces)), [str(m) for m in n_subspaces])
    ax.set_xlabel("n_codewords")
    ax.set_ylabel("n_subspaces (= bytes per image)")
    ax.set_title(title)
    threshold = values.min() + 0.5 * (values.max() - values.min())
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.3f}", ha="center", va="center",
                color="white" if v < threshold else "black")
    return im


fig, ax = plt.subplots(figsize=(6, 4.5), layout="constrained")
im = heatmap(ax, acc, f"mean CV accuracy\n(exact k-NN, test set: {exact_accuracy:.3f})")
fig.colorbar(im, ax=ax)
plt.show()

# %%
# Accuracy suffers only for the shortest codes (2 or 4 bytes with few
# codewords); from 8 bytes per image, a 32x compression, it is on a par
# with the exact classifier.  Because pqsk stores each index in one byte whenever
# ``n_codewords <= 256``, more codewords cost no memory per image, only
# training time: within a row, take the largest ``n_codewords`` the
# training budget allows.

# %%
# Tuning the quantizer alone
# --------------------------
#
# Without labels, the natural criterion is reconstruction error, and
# :meth:`PQTransformer.score <pqsk.PQTransformer.score>` returns minus the
# mean squared error on the data it is given: on each validation fold
# here.  ``GridSearchCV`` uses it when no ``scoring`` is passed.
pq_search = GridSearchCV(
    PQTransformer(random_state=0, n_subspaces=8, n_codewords=256),
    {"n_subspaces": n_subspaces, "n_codewords": n_codewords},
    cv=4,
)
pq_search.fit(X_train)
print("best parameters:", pq_search.best_params_)
print(f"best mean squared reconstruction error: {-pq_search.best_score_:.1f}")

# %%
# The best parameters are simply the largest code: more sub-spaces and
# more codewords always reconstruct better, so the search is only useful
# under a constraint.  A better view plots the error against the size of
# the code.  The information in a code is ``n_subspaces * log2(n_codewords)``
# bits, which decides the error; the memory pqsk uses is
# ``n_subspaces`` bytes (up to 256 codewords), which decides the cost.
pq_res = pq_search.cv_results_
fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), layout="constrained", sharey=True)
for k in n_codewords:
    rows = [i for i, p in enumerate(pq_res["params"]) if p["n_codewords"] == k]
    ms = np.array([pq_res["params"][i]["n_subspaces"] for i in rows])
    err = -pq_res["mean_test_score"][rows]
    order = np.argsort(ms)
    axes[0].plot(ms[order] * np.log2(k), err[order], "o-", label=f"n_codewords={k}")
    axes[1].plot(ms[order], err[order], "o-", label=f"n_codewords={k}")
axes[0].set_xlabel("information per image (bits) = n_subspaces x log2(n_codewords)")
axes[1].set_xlabel("memory per image (bytes) = n_subspaces")
axes[0].set_ylabel("mean squared reconstruction error (validation folds)")
for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
axes[1].legend()
fig.suptitle("PQTransformer on digits: GridSearchCV results")
plt.show()

# %%
# On the left, at an equal number of bits, fewer sub-spaces with larger
# codebooks reconstruct better: a codeword describes a block of pixels
# jointly, correlations included, while many tiny codebooks treat the
# blocks independently.  The price of large codebooks is training time
# and the size of the lookup tables (``n_codewords`` entries per sub-space
# and query), which is why 256 codewords, one byte, is the usual choice.
# On the right, what pqsk actually stores: at a fixed number of bytes, 256
# codewords always give the lowest error.  With 32 sub-spaces of two
# pixels, each with 17 grey levels, there are at most 289 distinct
# sub-vectors, so 256 codewords almost enumerate them and the error nearly
# vanishes.
