"""``ShardedNeighbors(partition="kmeans")``: rows split by region, queries
routed to the shards near them (pqsk._routing), on a real LocalCluster,
with the naive checks of the routing itself."""

import json
import os

import numpy as np
import pytest
from sklearn.utils._param_validation import InvalidParameterError

from pqsk import HNSWPQNeighbors, IVFPQNeighbors
from pqsk import _routing
from pqsk._sharded_ops import global_ids

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from pqsk.dask import ShardedNeighbors  # noqa: E402
from test_dask import Q, X, ivf, local_client, reference  # noqa: E402


@pytest.fixture(scope="module")
def client():
    yield from local_client()


def routed(est=None, **kw):
    return ShardedNeighbors(est or ivf(), n_shards=2, partition="kmeans", **kw)


# -- the routing alone ---------------------------------------------------------

def test_balanced_bias_evens_out_lopsided_regions():
    rng = np.random.RandomState(0)
    P = np.vstack([rng.randn(900, 4) + 5, rng.randn(100, 4) - 5])
    c, b, scale = _routing.train_centroids(P, 2, rng)
    share = np.bincount(_routing.assign(P, c, b), minlength=2) / 1000
    assert np.all(np.abs(share - 0.5) <= 0.02 + 1e-9), share
    assert scale > 0 and abs(b.sum()) < 1e-9
    # Without the bias, k-means alone follows the blobs: 90% / 10%.
    assert sorted(np.bincount(_routing.assign(P, c, np.zeros(2)))) == [100, 900]


def naive_visits(P, routing, margin, live, k):
    c, b, scale = routing
    out = np.zeros((P.shape[0], c.shape[0]), bool)
    for q, p in enumerate(P):
        d = np.array([((p - cj) ** 2).sum() for cj in c]) + b
        d[np.asarray(live) == 0] = np.inf
        out[q] = d <= d.min() + margin * scale
        for j in np.argsort(d, kind="stable"):
            if np.sum(np.asarray(live)[out[q]]) >= k:
                break
            out[q, j] = True
    return out


@pytest.mark.parametrize("margin", [0.0, 0.3, 1e9])
@pytest.mark.parametrize("live,k", [([50, 50, 50, 50], 5), ([3, 0, 2, 40], 6),
                                    ([1, 1, 1, 1], 4)])
def test_visits_equal_the_naive_rule(margin, live, k):
    rng = np.random.RandomState(1)
    P = rng.randn(40, 3)
    routing = (rng.randn(4, 3), rng.randn(4) * 0.1, 1.5)
    got = _routing.visits(P, routing, margin, live, k)
    np.testing.assert_array_equal(got, naive_visits(P, routing, margin, live, k))
    assert not got[:, np.asarray(live) == 0].any()
    assert (got.sum(axis=1) >= 1).all()


def test_runs_are_the_ranges_of_the_ids():
    ids = np.array([0, 1, 2, 7, 9, 10, 30])
    r = _routing.runs(ids, first_local=0)
    np.testing.assert_array_equal(r, [[0, 0, 3], [3, 7, 1], [4, 9, 2], [6, 30, 1]])
    np.testing.assert_array_equal(global_ids(r), ids)
    r5 = _routing.runs(ids, first_local=5)
    assert r5[0, 0] == 5 and _routing.runs([]).shape == (0, 3)


# -- on the cluster ----------------------------------------------------------------

def test_each_shard_holds_its_region(client):
    sharded = routed().fit(da.from_array(X, chunks=(700, 16)))
    sizes = sharded.shard_sizes_
    assert sum(sizes) == 3000 and abs(sizes[0] - sizes[1]) <= 0.1 * 3000, sizes
    tpl = sharded.template_
    region = _routing.assign(tpl._shard_prepare_queries(X), sharded.shard_centroids_,
                             sharded.shard_bias_)
    for j, r in enumerate(sharded._ranges):
        np.testing.assert_array_equal(global_ids(r), np.flatnonzero(region == j))


def test_a_wide_margin_answers_as_one_index(client):
    """Every shard visited: the answers of one index of all the rows with
    the same quantizers, as with ``partition="rows"``."""
    sharded = routed(probe_margin=1e9).fit(X)
    ref = reference(sharded, X)
    np.testing.assert_array_equal(sharded.kneighbors(Q, n_neighbors=7)[1],
                                  ref.kneighbors(Q, n_neighbors=7)[1])
    np.testing.assert_array_equal(sharded.kneighbors(n_neighbors=3)[1],
                                  ref.kneighbors(n_neighbors=3)[1])


@pytest.mark.parametrize("est", [ivf(), HNSWPQNeighbors(n_subspaces=4, n_codewords=32,
                                                         refine_factor=0, random_state=0)])
def test_margin_zero_searches_the_query_s_region_only(client, est):
    sharded = routed(est, probe_margin=0.0).fit(X)
    tpl = sharded.template_
    region = _routing.assign(tpl._shard_prepare_queries(Q), sharded.shard_centroids_,
                             sharded.shard_bias_)
    owner = np.empty(3000, np.int64)
    for j, r in enumerate(sharded._ranges):
        owner[global_ids(r)] = j
    _, ind = sharded.kneighbors(Q, n_neighbors=5)
    assert (owner[ind] == region[:, None]).all()
    # Most neighbours lie in the query's region; a margin finds the rest.
    _, full = routed(est, probe_margin=1e9).fit(X).kneighbors(Q, n_neighbors=5)
    agree = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ind, full)])
    assert 0.8 <= agree < 1.0 + 1e-9, agree
    # The margin is read at every query.
    sharded.set_params(probe_margin=1e9)
    np.testing.assert_array_equal(sharded.kneighbors(Q, n_neighbors=5)[1], full)
    sharded.set_params(probe_margin=-1.0)
    with pytest.raises(InvalidParameterError, match="probe_margin"):
        sharded.kneighbors(Q)


def test_dask_queries_filters_and_radius(client):
    sharded = routed(probe_margin=0.0).fit(X)
    d0, i0 = sharded.kneighbors(Q, n_neighbors=6)
    dd, di = sharded.kneighbors(da.from_array(Q, chunks=(25, 16)), n_neighbors=6)
    np.testing.assert_array_equal(di.compute(), i0)
    np.testing.assert_allclose(dd.compute(), d0, rtol=1e-5)
    # Filtered queries search every shard: those of one index.
    ref = reference(sharded, X)
    allowed = np.arange(0, 3000, 3)
    np.testing.assert_array_equal(sharded.kneighbors(Q, 6, filter=allowed)[1],
                                  ref.kneighbors(Q, 6, filter=allowed)[1])
    rd, ri = sharded.radius_neighbors(Q[:5], radius=2.0)
    ed, ei = ref.radius_neighbors(Q[:5], radius=2.0, sort_results=True)
    for a, b in zip(ri, ei):
        assert sorted(a) == sorted(b)


def test_partial_fit_routes_new_rows_to_their_region(client):
    sharded = routed(probe_margin=0.0).fit(X[:2000])
    sharded.partial_fit(da.from_array(X[2000:], chunks=(400, 16)))
    assert sharded.n_samples_fit_ == 3000 and sum(sharded.shard_sizes_) == 3000
    tpl = sharded.template_
    region = _routing.assign(tpl._shard_prepare_queries(X), sharded.shard_centroids_,
                             sharded.shard_bias_)
    for j, r in enumerate(sharded._ranges):
        np.testing.assert_array_equal(global_ids(r), np.flatnonzero(region == j))
    # Every row indexed under its global id: with every shard visited, the
    # answers of one index of all the rows.
    sharded.set_params(probe_margin=1e9)
    np.testing.assert_array_equal(sharded.kneighbors(Q, n_neighbors=7)[1],
                                  reference(sharded, X).kneighbors(Q, n_neighbors=7)[1])
    sharded.remove(np.arange(2000, 2050))
    _, ind = sharded.kneighbors(X[2000:2050], n_neighbors=3)
    assert not np.isin(ind, np.arange(2000, 2050)).any()


def test_more_regions_than_distinct_rows(client):
    """Three distinct rows, four regions: empty shards, never visited."""
    Xd = np.repeat(np.eye(3, 16, dtype=np.float32) * 5, 40, axis=0)
    est = IVFPQNeighbors(n_lists=2, n_probe=2, n_subspaces=2, n_codewords=4,
                         refine_factor=0, random_state=0)
    sharded = ShardedNeighbors(est, n_shards=4, partition="kmeans").fit(Xd)
    assert sum(sharded.shard_sizes_) == 120 and 0 in sharded.shard_sizes_
    _, ind = sharded.kneighbors(Xd[[0, 40, 80]], n_neighbors=50)
    assert (ind >= 0).all() and len(np.unique(ind[0])) == 50
    assert sharded.kneighbors(n_neighbors=2)[1].shape == (120, 2)


def test_metric_dot_is_refused(client):
    with pytest.raises(ValueError, match="metric='dot'"):
        routed(ivf(metric="dot")).fit(X)


def test_save_and_load_keep_the_routing(client, tmp_path):
    sharded = routed(probe_margin=0.0).fit(X)
    before = sharded.kneighbors(Q, n_neighbors=5)
    sharded.save(tmp_path / "idx")
    loaded = ShardedNeighbors.load(tmp_path / "idx")
    assert loaded.partition == "kmeans" and loaded.probe_margin == 0.0
    np.testing.assert_array_equal(loaded.shard_centroids_, sharded.shard_centroids_)
    np.testing.assert_array_equal(loaded.shard_bias_, sharded.shard_bias_)
    after = loaded.kneighbors(Q, n_neighbors=5)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])


def _hostile(m):
    """Manifests changed in one field each, every one refused."""
    yield "routing", dict(m, routing=None)
    yield "routing", dict(m, partition="rows")
    yield "routing", dict(m, routing=dict(m["routing"], scale=float("nan")))
    yield "routing", dict(m, routing=dict(m["routing"], bias=[0.0]))
    yield "routing", dict(m, routing=dict(m["routing"], centroids=[[1.0, 2.0]] * 2))
    yield "routing", dict(m, probe_margin=-1)
    yield "routing", dict(m, routing="abc")
    shards = [dict(s) for s in m["shards"]]
    shards[0]["live"] += 1
    yield "live counts", dict(m, shards=shards)
    yield "shard list", dict(m, shards=[dict(s, live="x") for s in m["shards"]])


def _hostile_tables(t):
    """ranges.npy tables changed one way each, every one refused."""
    bad = t.copy()
    bad[0, 2] += 1  # a global id moved: one id twice, one never
    yield "id ranges|live counts", bad
    bad = t.copy()
    bad[:, 0] = 0  # every run in shard 0: local ids not contiguous
    yield "id ranges|live counts", bad
    bad = t.copy()
    bad[0, 0] = 7  # no such shard
    yield "id ranges", bad
    yield "id ranges", t.astype(np.int32)
    yield "id ranges", t[:, :3]
    bad = t.copy()
    bad[-1, 3] += 5  # past n_samples_fit
    yield "id ranges", bad


def test_a_hostile_manifest_is_refused(client, tmp_path):
    routed().fit(X).save(tmp_path / "idx")
    path = tmp_path / "idx" / "manifest.json"
    good = json.loads(path.read_text())
    assert good["format_version"] == 2 and "ranges" not in good["shards"][0]
    for what, m in _hostile(good):
        path.write_text(json.dumps(m))
        with pytest.raises(ValueError, match=f"manifest's ({what})"):
            ShardedNeighbors.load(tmp_path / "idx")
    path.write_text(json.dumps(good))
    table_path = tmp_path / "idx" / good["data"] / "ranges.npy"
    table = np.load(table_path)
    for what, bad in _hostile_tables(table):
        np.save(table_path, bad)
        with pytest.raises(ValueError, match=f"manifest's ({what})"):
            ShardedNeighbors.load(tmp_path / "idx")
    table_path.write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="ranges.npy is unreadable"):
        ShardedNeighbors.load(tmp_path / "idx")
    np.save(table_path, table)
    assert ShardedNeighbors.load(tmp_path / "idx").shard_sizes_ == [
        s["live"] for s in good["shards"]]


def test_a_version_1_manifest_is_still_read(client, tmp_path):
    """Version 1 kept the id ranges in the manifest."""
    sharded = ShardedNeighbors(ivf(), n_shards=2).fit(X)
    before = sharded.kneighbors(Q, n_neighbors=4)
    sharded.save(tmp_path / "idx")
    path = tmp_path / "idx" / "manifest.json"
    m = json.loads(path.read_text())
    table = np.load(tmp_path / "idx" / m["data"] / "ranges.npy")
    for j, s in enumerate(m["shards"]):
        s["ranges"] = table[table[:, 0] == j, 1:].tolist()
    m["format_version"] = 1
    for key in ("partition", "probe_margin", "routing"):
        del m[key]
    os.remove(tmp_path / "idx" / m["data"] / "ranges.npy")
    path.write_text(json.dumps(m))
    loaded = ShardedNeighbors.load(tmp_path / "idx")
    assert loaded.partition == "rows" and loaded.shard_centroids_ is None
    np.testing.assert_array_equal(loaded.kneighbors(Q, n_neighbors=4)[1], before[1])
