"""
================================
An index bigger than one machine
================================

:class:`pqsk.dask.ShardedNeighbors` splits a pqsk index into shards held by
the workers of a dask cluster: the quantizers are trained once on a sample
drawn across the chunks of the data, each chunk becomes a shard built on the
worker that holds it, and every query goes to all shards, whose top k are
merged.  Here the cluster is a small local one (two workers in this process);
on several machines only the ``Client`` changes (see the user guide).

Because every shard uses the same coarse centroids and codebooks, an inverted
file probes the same lists in every shard: the sharded answers are those of
one index of all the rows built with the same quantizers (``n_probe`` is set
per call, without rebuilding the shards).  The exception is a query whose
probed lists hold fewer than k rows in some shard: that shard scans further
lists to fill its top k, so the sharded answer can only be closer.
"""

import dask.array as da
import matplotlib.pyplot as plt
import numpy as np
from distributed import Client, LocalCluster
from sklearn.base import clone

from pqsk import IVFPQNeighbors
from pqsk.dask import ShardedNeighbors

rng = np.random.RandomState(0)
centers = rng.randn(50, 32).astype(np.float32) * 3
X = (centers[rng.randint(50, size=20_000)] + rng.randn(20_000, 32)).astype(np.float32)
Q = (centers[rng.randint(50, size=200)] + rng.randn(200, 32)).astype(np.float32)

# Exact top 10 by brute force, to measure recall.
d2 = (Q**2).sum(1)[:, None] - 2 * Q @ X.T + (X**2).sum(1)[None]
true = np.argsort(d2, axis=1)[:, :10]


def recall(ind):
    return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ind, true)])


# %%
# A cluster of two workers, and X as a dask array of four chunks of rows.
cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                       dashboard_address=":0")
client = Client(cluster)
Xd = da.from_array(X, chunks=(5_000, 32))

est = IVFPQNeighbors(n_lists=64, n_subspaces=8, n_neighbors=10, refine_factor=0,
                     random_state=0)
index = ShardedNeighbors(est).fit(Xd)
print("rows per shard:", index.shard_sizes_)

# %%
# One index of all the rows with the same quantizers (what the sharded index
# equals), and a separately trained single-machine index for comparison.
one = clone(index.template_)._shard_from_quantizers(index.template_._shard_quantizers(), X)
single = clone(est).fit(X)

probes = [1, 2, 4, 8, 16, 32]
sharded_r, one_r, single_r = [], [], []
for n_probe in probes:
    index.set_params(estimator__n_probe=n_probe)  # applies to the next call
    dist, ind = index.kneighbors(Q)
    ref_dist, ref = one.set_params(n_probe=n_probe).kneighbors(Q)
    # A shard whose probed lists hold fewer than k rows also scans the next
    # lists (as one index does when all of them hold fewer than k): its
    # answers can then only be closer, never farther.
    assert np.all(dist <= ref_dist * (1 + 1e-6))
    print(f"n_probe={n_probe:2d}: {np.mean(np.all(ind == ref, axis=1)):.3f} of the "
          "queries have the one index's answers")
    sharded_r.append(recall(ind))
    one_r.append(recall(ref))
    single_r.append(recall(single.set_params(n_probe=n_probe).kneighbors(Q)[1]))

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(probes, sharded_r, "o-", label="sharded (4 shards, 2 workers)")
ax.plot(probes, one_r, "x--", label="one index, same quantizers")
ax.plot(probes, single_r, ":", label="one index, own training")
ax.set_xscale("log", base=2)
ax.set_xlabel("n_probe")
ax.set_ylabel("recall@10")
ax.legend()
fig.tight_layout()

# %%
# Queries given as a dask array are answered lazily, block by block.
lazy_dist, lazy_ind = index.kneighbors(da.from_array(Q, chunks=(100, 32)))
print(lazy_ind)
print("first block equal:", np.array_equal(lazy_ind.blocks[0].compute(), ind[:100]))

client.close()
cluster.close()
