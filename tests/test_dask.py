"""pqsk.dask.ShardedNeighbors on a real dask.distributed LocalCluster
(2 worker processes, one thread each)."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from sklearn.base import clone

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from pqsk.dask import ShardedNeighbors  # noqa: E402

rng = np.random.RandomState(42)
CENTERS = rng.randn(20, 16).astype(np.float32) * 4
X = (CENTERS[rng.randint(20, size=3000)] + rng.randn(3000, 16)).astype(np.float32)
Q = (CENTERS[rng.randint(20, size=60)] + rng.randn(60, 16)).astype(np.float32)


def ivf(**kw):
    # refine_factor=0: the equality guarantee is about the ADC candidates (with
    # re-ranking, shards re-rank k * refine_factor candidates each: closer answers)
    return IVFPQNeighbors(n_lists=16, n_probe=3, n_subspaces=4, n_codewords=32,
                          random_state=0, **{"refine_factor": 0, **kw})


def local_client(*plugins):
    """A client of a LocalCluster of 2 worker processes of one thread each,
    the scheduler ``plugins`` registered (a generator, for fixtures)."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as c:
        for plugin in plugins:
            c.register_plugin(plugin)
        yield c


@pytest.fixture(scope="module")
def client():
    yield from local_client(GraphCounter())


class GraphCounter(distributed.diagnostics.plugin.SchedulerPlugin):
    """Counts the task graphs clients send to the scheduler."""

    name = "pqsk-graph-counter"

    def __init__(self):
        self.n = 0

    def update_graph(self, scheduler, **kwargs):
        self.n += 1


def n_graphs(client):
    """Task graphs the scheduler was sent so far."""
    return client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.plugins[GraphCounter.name].n)


def reference(sharded, X):
    """One index of all the rows, built with the sharded index's quantizers."""
    template = sharded.template_
    return clone(template)._shard_from_quantizers(template._shard_quantizers(), X)


def test_import_pqsk_does_not_import_dask():
    code = ("import sys, pqsk; bad = [m for m in sys.modules if m == 'dask' or "
            "m.startswith(('dask.', 'distributed'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("make", [ivf, lambda: PQNeighbors(n_subspaces=4, n_codewords=32,
                                                           refine_factor=0, random_state=0)])
def test_sharded_equals_one_index_with_same_quantizers(client, make):
    sharded = ShardedNeighbors(make()).fit(da.from_array(X, chunks=(700, 16)))
    assert len(sharded.shards_) == 5 and sum(sharded.shard_sizes_) == 3000
    ref = reference(sharded, X)
    dist, ind = sharded.kneighbors(Q, n_neighbors=7)
    d0, i0 = ref.kneighbors(Q, n_neighbors=7)
    np.testing.assert_array_equal(ind, i0)
    np.testing.assert_allclose(dist, d0, rtol=1e-6)
    # Probed lists holding fewer than k rows in a shard: that shard scans
    # further lists, so its answers can only be closer.
    if hasattr(ref, "n_probe"):
        sharded.set_params(estimator__n_probe=1)
        d1, _ = sharded.kneighbors(Q, n_neighbors=60)
        r1, _ = ref.set_params(n_probe=1).kneighbors(Q, n_neighbors=60)
        assert np.all(d1 <= r1 * (1 + 1e-6)) and np.any(d1 < r1 * (1 - 1e-6))
        sharded.set_params(estimator__n_probe=3)
        ref.set_params(n_probe=3)
    # X=None: every indexed point, itself excluded.
    np.testing.assert_array_equal(sharded.kneighbors(n_neighbors=3)[1],
                                  ref.kneighbors(n_neighbors=3)[1])
    # Dask-array queries: lazy dask arrays, the same answers.
    dd, di = sharded.kneighbors(da.from_array(Q, chunks=(25, 16)), n_neighbors=7)
    assert isinstance(di, da.Array) and di.chunks[0] == (25, 25, 10)
    np.testing.assert_array_equal(di.compute(), i0)
    # (rounding of the batched products differs with the block's rows)
    np.testing.assert_allclose(dd.compute(), d0, rtol=1e-5)
    # Graphs, as the single index's.
    g = sharded.kneighbors_graph(Q, n_neighbors=4, mode="distance")
    assert (g != ref.kneighbors_graph(Q, n_neighbors=4, mode="distance")).nnz == 0
    gt = sharded.transform(da.from_array(Q, chunks=(30, 16))).compute()
    # (float32 distances from products whose rounding depends on the block)
    np.testing.assert_allclose(gt.toarray(), ref.transform(Q).toarray(), rtol=1e-4)


def test_sharded_ivf_trains_the_quantizers_of_a_single_fit(client):
    """The training sample is the rows a single fit with the same integer
    random_state draws, and the trainer continues its random stream: the
    same centroids and codebooks, hence the same answers as
    ``estimator.fit(X)`` (the recall of the issue's target, exactly)."""
    est = IVFPQNeighbors(n_lists=12, n_probe=3, n_subspaces=4, n_codewords=16,
                         refine_factor=0, random_state=0, max_train_samples=1500)
    single = clone(est).fit(X)
    sharded = ShardedNeighbors(est).fit(da.from_array(X, chunks=(700, 16)))
    np.testing.assert_array_equal(sharded.template_.cluster_centers_, single.cluster_centers_)
    np.testing.assert_array_equal(sharded.template_.codebooks_, single.codebooks_)
    np.testing.assert_array_equal(sharded.kneighbors(Q, n_neighbors=5)[1],
                                  single.kneighbors(Q, n_neighbors=5)[1])


def test_sharded_int8_tier_shares_the_trained_offset_and_scale(client):
    """An int8 re-ranking tier's offset and scale are trained quantizers:
    trained once on the sample, the same in every shard, so shards'
    re-ranked distances compare; with every list probed and every row
    re-ranked, the answers are those of one index of every row."""
    est = ivf(refine_factor=3000, refine_dtype="int8").set_params(n_probe=16)
    sharded = ShardedNeighbors(est).fit(da.from_array(X, chunks=(700, 16)))
    tpl = sharded.template_
    assert tpl.refine_offset_.shape == tpl.refine_scale_.shape == (16,)
    assert tpl.refine_rows_.shape == (0, 16) and tpl.vectors_ is None
    got = [s.compute() for s in sharded.shards_]
    for shard in got:
        np.testing.assert_array_equal(shard.refine_offset_, tpl.refine_offset_)
        np.testing.assert_array_equal(shard.refine_scale_, tpl.refine_scale_)
    assert sum(s.refine_rows_.shape[0] for s in got) == 3000
    ref = reference(sharded, X)
    dist, ind = sharded.kneighbors(Q, n_neighbors=7)
    d0, i0 = ref.kneighbors(Q, n_neighbors=7)
    np.testing.assert_array_equal(ind, i0)
    np.testing.assert_allclose(dist, d0, rtol=1e-6)


def test_n_shards_groups_numpy_input_and_partial_fit_remove(client):
    sharded = ShardedNeighbors(ivf(), n_shards=2).fit(X[:2000])
    assert sharded.shard_sizes_ == [1000, 1000]
    futures = [distributed.futures_of(s)[0] for s in sharded.shards_]
    who = client.who_has(futures)
    assert len({w for f in futures for w in who[f.key]}) == 2  # one shard per worker
    ref = reference(sharded, X[:2000])
    sharded.partial_fit(da.from_array(X[2000:], chunks=(600, 16)))
    ref.partial_fit(X[2000:])
    assert len(sharded.shards_) == 2 and sorted(sharded.shard_sizes_) == [1400, 1600]
    removed = rng.choice(3000, 300, replace=False)
    sharded.remove(removed)
    ref.remove(removed)
    assert sharded.n_removed_ == 300 and sum(sharded.shard_sizes_) == 2700
    ind = sharded.kneighbors(X[:50], n_neighbors=5, return_distance=False)
    np.testing.assert_array_equal(ind, ref.kneighbors(X[:50], n_neighbors=5)[1])
    assert not np.isin(ind, removed).any()


def test_sharded_spilled_ivf_equals_one_spilled_index(client, tmp_path):
    """spill_lambda passes through the shard protocol: every shard stores
    each of its vectors twice (SOAR) and the merged answers, with appends,
    removals and a save / load, are those of one spilled index."""
    est = ivf(spill_lambda=1.5)
    sharded = ShardedNeighbors(est).fit(da.from_array(X[:2400], chunks=(800, 16)))
    from dask import delayed

    entries = [delayed(lambda s: (s.spill_lambda_, s._n_stored()))(shard).compute()
               for shard in sharded.shards_]
    assert entries == [(1.5, 1600)] * 3
    ref = reference(sharded, X[:2400])
    assert ref.ids_.shape[0] == 4800
    sharded.partial_fit(da.from_array(X[2400:], chunks=(300, 16)))
    ref.partial_fit(X[2400:])
    removed = rng.choice(3000, 200, replace=False)
    sharded.remove(removed)
    ref.remove(removed)
    dist, ind = sharded.kneighbors(Q, n_neighbors=9)
    d0, i0 = ref.kneighbors(Q, n_neighbors=9)
    np.testing.assert_array_equal(ind, i0)
    np.testing.assert_allclose(dist, d0, rtol=1e-6)
    assert all(len(set(row)) == 9 for row in ind.tolist())
    assert not np.isin(ind, removed).any()
    sharded.save(tmp_path / "spilled")
    loaded = ShardedNeighbors.load(tmp_path / "spilled")
    np.testing.assert_array_equal(loaded.kneighbors(Q, n_neighbors=9)[1], i0)


def test_search_params_per_call_without_rebuilding(client):
    sharded = ShardedNeighbors(ivf(refine_factor=0)).fit(da.from_array(X, chunks=1000))
    keys = [s.key for s in sharded.shards_]
    ref = reference(sharded, X)
    for n_probe in (1, 8):
        sharded.set_params(estimator__n_probe=n_probe, estimator__n_neighbors=4)
        ref.set_params(n_probe=n_probe, n_neighbors=4)
        np.testing.assert_array_equal(sharded.kneighbors(Q)[1], ref.kneighbors(Q)[1])
    assert [s.key for s in sharded.shards_] == keys
    with pytest.raises(ValueError, match="n_subspaces=8 was set after fit"):
        sharded.set_params(estimator__n_subspaces=8).kneighbors(Q)


def test_bad_input_raises_single_machine_errors_before_any_task(client):
    sharded = ShardedNeighbors(ivf()).fit(X[:1000])
    single = ivf().fit(X[:1000])
    bad_nan = Q.copy()
    bad_nan[3, 2] = np.nan
    cases = [
        (lambda e: e.kneighbors(Q[:, :5]), ValueError),
        (lambda e: e.kneighbors(bad_nan), ValueError),
        (lambda e: e.partial_fit(bad_nan), ValueError),
        (lambda e: e.partial_fit(Q[:, :5]), ValueError),
        (lambda e: e.remove([5, 1000]), ValueError),
        (lambda e: e.remove([5, 5]), ValueError),
        (lambda e: e.remove([1.5]), TypeError),
        (lambda e: e.kneighbors(Q, n_neighbors=1001), ValueError),
        (lambda e: e.kneighbors(da.from_array(Q[:, :5])), ValueError),
    ]
    assert n_graphs(client) > 0  # the counter sees graphs (fit sent some)
    for call, exc in cases:
        with pytest.raises(exc) as expected:
            call(single)
        before = n_graphs(client)
        with pytest.raises(exc) as got:
            call(sharded)
        assert str(got.value) == str(expected.value)
        assert n_graphs(client) == before  # no task was submitted
    with pytest.raises(ValueError, match="NaN"):
        ShardedNeighbors(ivf()).fit(bad_nan)
    bad = X[:1000].copy()
    bad[900, 1] = np.inf
    with pytest.raises(ValueError, match="infinity"):  # found by the checking tasks
        ShardedNeighbors(ivf()).fit(da.from_array(bad, chunks=300))


def _wait_replaced(client, dead, n=2, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            workers = client.run(os.getpid)
        except (OSError, distributed.comm.CommClosedError):  # the dead one, not removed yet
            workers = {}
        if len(workers) == n and dead not in workers.values():
            return
        time.sleep(0.2)
    raise TimeoutError("the nanny did not restart the killed worker")


def _kill_a_shard_holder(client, sharded):
    pids = client.run(os.getpid)
    futures = [f for s in sharded.shards_ for f in distributed.futures_of(s)]
    who = client.who_has(futures)
    victim = sorted({w for f in futures for w in who[f.key]})[0]
    os.kill(pids[victim], signal.SIGKILL)
    _wait_replaced(client, pids[victim])


@pytest.mark.parametrize("make", [ivf, lambda: HNSWPQNeighbors(
    n_subspaces=4, n_codewords=32, n_links=8, ef_construction=40, random_state=0)])
def test_worker_killed_between_queries_costs_no_answer(client, make, tmp_path):
    sharded = ShardedNeighbors(make()).fit(da.from_array(X, chunks=(750, 16)))
    sharded.remove([1, 2, 3])
    before = sharded.kneighbors(Q, n_neighbors=5)
    _kill_a_shard_holder(client, sharded)
    after = sharded.kneighbors(Q, n_neighbors=5)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    # A loaded index reads a lost shard again from the saved directory.
    sharded.save(tmp_path / "index")
    loaded = ShardedNeighbors.load(tmp_path / "index")
    np.testing.assert_array_equal(loaded.kneighbors(Q, n_neighbors=5)[1], before[1])
    _kill_a_shard_holder(client, loaded)
    np.testing.assert_array_equal(loaded.kneighbors(Q, n_neighbors=5)[1], before[1])


def test_save_serve_saved_reads_lost_shards_from_disk(client, tmp_path):
    sharded = ShardedNeighbors(ivf()).fit(da.from_array(X, chunks=(750, 16)))
    sharded.remove([4, 5])
    before = sharded.kneighbors(Q, n_neighbors=5)
    sharded.save(tmp_path / "index", serve_saved=True)
    futures = [f for s in sharded.shards_ for f in distributed.futures_of(s)]
    # the shards are now the saved files, memory-mapped on the workers
    assert all(str(f.key).startswith("_loaded-") for f in futures)
    mapped = client.gather(client.map(
        lambda s: any(isinstance(v, np.memmap) or isinstance(getattr(v, "base", None),
                                                             np.memmap)
                      for v in vars(s).values()), futures, pure=False))
    assert all(mapped)
    np.testing.assert_array_equal(sharded.kneighbors(Q, n_neighbors=5)[1], before[1])
    _kill_a_shard_holder(client, sharded)
    after = sharded.kneighbors(Q, n_neighbors=5)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    # appends and removals still work on served shards (copies in memory)
    sharded.partial_fit(X[:10]).remove([0])
    assert sharded.n_samples_fit_ == X.shape[0] + 10
    assert 0 not in sharded.kneighbors(Q, n_neighbors=5)[1]


def test_save_load_round_trip_and_overwrite(client, tmp_path):
    sharded = ShardedNeighbors(ivf(), n_shards=3).fit(X)
    sharded.remove([0, 10])
    path = tmp_path / "idx"
    sharded.save(path)
    with pytest.raises(FileExistsError):
        sharded.save(path)
    loaded = ShardedNeighbors.load(path)
    assert loaded.n_removed_ == 2 and loaded.shard_sizes_ == sharded.shard_sizes_
    np.testing.assert_array_equal(loaded.kneighbors(Q)[1], sharded.kneighbors(Q)[1])
    loaded.partial_fit(X[:10]).save(path, overwrite=True)
    again = ShardedNeighbors.load(path)
    assert again.n_samples_fit_ == 3010
    assert len([p for p in os.listdir(path) if p.startswith("data-")]) == 1
    with pytest.raises(ValueError, match="were already removed"):
        again.remove([10])


def test_sharded_hnsw_recall_close_to_one_index(client):
    est = HNSWPQNeighbors(n_subspaces=8, n_codewords=64, refine_factor=4, random_state=0)
    sharded = ShardedNeighbors(est).fit(da.from_array(X, chunks=1000))
    single = clone(est).fit(X)
    d2 = ((Q[:, None, :] - X[None]) ** 2).sum(-1)
    true = np.argsort(d2, axis=1)[:, :10]

    def recall(ind):
        return np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ind, true)])

    r_sharded = recall(sharded.kneighbors(Q, n_neighbors=10)[1])
    r_single = recall(single.kneighbors(Q, n_neighbors=10)[1])
    assert r_sharded > 0.8 and r_sharded >= r_single - 0.05


def test_wrong_estimator_and_local_scheduler():
    from sklearn.neighbors import NearestNeighbors

    with pytest.raises(TypeError, match="pqsk neighbours estimator"):
        ShardedNeighbors(NearestNeighbors()).fit(X)
    # dask's local scheduler (no cluster): the same answers.
    import dask

    with dask.config.set(scheduler="sync"):
        sharded = ShardedNeighbors(ivf(), n_shards=3).fit(X)
        ref = reference(sharded, X)
        np.testing.assert_array_equal(sharded.kneighbors(Q)[1], ref.kneighbors(Q)[1])
        with pytest.raises(AttributeError, match="no remove"):
            ShardedNeighbors(PQNeighbors(n_subspaces=4, n_codewords=16)).fit(X).remove([1])


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], np.ndarray):
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            assert a[name] == b[name], name


@pytest.mark.parametrize("coarse", ["kmeans", "lloyd", "streamed"])
@pytest.mark.parametrize("make", [ivf, lambda: PQNeighbors(n_subspaces=4, n_codewords=32,
                                                           refine_factor=0, random_state=0)])
def test_training_task_state_independent_of_threads_and_indexes_no_row(
        make, coarse, monkeypatch):
    from pqsk import _partition
    from pqsk.dask import _train

    if coarse != "kmeans":  # the coarse k-means in threaded tasks at any size
        if not hasattr(make(), "n_lists"):
            pytest.skip("no coarse quantizer")
        monkeypatch.setattr(_partition, "LLOYD_THRESHOLD", 0)
        if coarse == "streamed":
            monkeypatch.setattr(_partition, "STREAMED_THRESHOLD", 0)
    one = _train(make(), 1, len(X), X[:1500], X[1500:])
    two = _train(make(), 2, len(X), X[:1500], X[1500:])
    _assert_same_state(one, two)
    # Training without indexing the sample gives the quantizers of a fit.
    _assert_same_state(one, make().set_params(n_jobs=1).fit(X)._shard_quantizers())


def _set_lloyd_threshold(value):
    """Set pqsk._partition.LLOYD_THRESHOLD (here or in a worker); returns
    the old value."""
    from pqsk import _partition

    old, _partition.LLOYD_THRESHOLD = _partition.LLOYD_THRESHOLD, value
    return old


@pytest.mark.parametrize("coarse", ["kmeans", "lloyd"])
def test_train_n_jobs_on_the_cluster(client, coarse):
    chunks = da.from_array(X, chunks=(1000, 16))
    # "lloyd": the coarse k-means in threaded tasks, in the workers and here.
    threshold = 0 if coarse == "lloyd" else None
    if threshold is not None:
        old = client.run(_set_lloyd_threshold, threshold)
        old_here = _set_lloyd_threshold(threshold)
    try:
        states = [ShardedNeighbors(ivf(), train_n_jobs=t).fit(chunks)
                  .template_._shard_quantizers() for t in (1, None)]
        # The sample is every row, in order: the quantizers of a local fit.
        local = ivf().set_params(n_jobs=1).fit(X)._shard_quantizers()
    finally:
        if threshold is not None:
            client.run(_set_lloyd_threshold, next(iter(old.values())))
            _set_lloyd_threshold(old_here)
    _assert_same_state(*states)
    _assert_same_state(states[0], local)
    if coarse == "lloyd":  # the workers took the other path
        assert not np.array_equal(local["cluster_centers_"],
                                  ivf().fit(X).cluster_centers_)
    before = n_graphs(client)
    for bad in (0, 1.5, "all"):
        with pytest.raises(ValueError, match="train_n_jobs"):
            ShardedNeighbors(ivf(), train_n_jobs=bad).fit(chunks)
    assert n_graphs(client) == before


@pytest.mark.parametrize("max_train_samples", ["auto", None, 500, 100_000])
@pytest.mark.parametrize("n", [300, 5000, 200_000])
def test_shard_sample_size_is_what_a_fit_trains_on(max_train_samples, n):
    # "auto": 256 rows per codeword (PQ, HNSW), per list (IVF); else the cap.
    cap = {"auto": None, None: n}.get(max_train_samples, max_train_samples)
    for est, auto in [(PQNeighbors(n_subspaces=4, n_codewords=16), 256 * 16),
                      (HNSWPQNeighbors(n_subspaces=4, n_codewords=8), 256 * 8),
                      (ivf(), 256 * 16)]:
        est.set_params(max_train_samples=max_train_samples)
        expected = min(n, auto if cap is None else cap)
        assert est._shard_sample_size(n) == expected, type(est).__name__
    # n_lists="auto": as a fit of n rows resolves it.
    est = ivf(max_train_samples=max_train_samples).set_params(n_lists="auto")
    assert est._shard_params(n) == {"n_lists": est._resolve_n_lists(n)}
    if max_train_samples == "auto":
        assert est._shard_sample_size(n) == min(n, 256 * est._resolve_n_lists(n))


def test_query_tasks_run_one_shard_per_worker(client):
    """A shard copied to both workers (as an earlier task may do) does not
    draw every shard's query task to one worker: each runs where its shard
    is, one per worker, and the answers are those of the index."""
    from distributed import futures_of

    from pqsk._placement import _query_places

    sh = ShardedNeighbors(ivf(), n_shards=2).fit(X)
    who = client.who_has([futures_of(s)[0] for s in sh.shards_])
    holders = [who[futures_of(s)[0].key] for s in sh.shards_]
    assert len(set(h for hs in holders for h in hs)) == 2, holders
    # Copy the second shard to the worker holding the first.
    first = holders[0][0]
    client.replicate([futures_of(sh.shards_[1])[0]], n=2)
    assert len(client.who_has([futures_of(sh.shards_[1])[0]])[
        futures_of(sh.shards_[1])[0].key]) == 2
    places = _query_places(sh.shards_)
    assert places[0] == first and places[1] != first and places[1] is not None
    before = sh.kneighbors(Q)
    with distributed.get_task_stream(client) as ts:
        again = sh.kneighbors(Q)
    ran = {t["worker"] for t in ts.data if str(t["key"]).startswith(("search_shard",
                                                                        "('search_shard"))}
    assert len(ran) == 2, ts.data
    for a, b in zip(before, again):
        np.testing.assert_array_equal(a, b)
