"""pqsk.dask.ShardedNeighbors as complete as one process (issue 22, item 4):
``filter=`` in global ids, ``radius_neighbors``, ``tune_search`` on the
sharded index, and queries sent as one batch per shard; on a real
dask.distributed LocalCluster (2 worker processes, one thread each)."""

import numpy as np
import pytest
from scipy import sparse

from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors, tune_search

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

from pqsk.dask import ShardedNeighbors  # noqa: E402
from test_dask import GraphCounter, Q, X, local_client, n_graphs, reference  # noqa: E402


class TaskCounter(distributed.diagnostics.plugin.SchedulerPlugin):
    """Counts the tasks of each function (key prefix) that finished."""

    name = "pqsk-task-counter"

    def __init__(self):
        self.done = {}

    def transition(self, key, start, finish, *args, **kwargs):
        if start == "processing" and finish == "memory":
            name = str(key[0] if isinstance(key, tuple) else key).split("-")[0]
            self.done[name] = self.done.get(name, 0) + 1


def tasks_done(client, name):
    """Tasks of the function ``name`` run so far."""
    return client.run_on_scheduler(
        lambda dask_scheduler: dask_scheduler.plugins[TaskCounter.name].done.get(name, 0))


@pytest.fixture(scope="module")
def client():
    yield from local_client(GraphCounter(), TaskCounter())


def flat(**kw):
    return PQNeighbors(n_subspaces=4, n_codewords=32, random_state=0,
                       **{"refine_factor": 0, **kw})


def ivf_all(**kw):
    # n_probe = n_lists: every shard scans every list, as one index does.
    return IVFPQNeighbors(n_lists=16, n_probe=16, n_subspaces=4, n_codewords=32,
                          random_state=0, **{"refine_factor": 0, **kw})


RS = np.random.RandomState(7)
MASK = RS.rand(3000) < 0.2
PER_QUERY = sparse.random(60, 3000, density=0.05, random_state=RS, format="csr") > 0


@pytest.fixture(scope="module", params=["flat", "ivf"])
def pair(request, client):
    """(sharded index of 5 shards, one index of all the rows built with its
    quantizers), with a partial_fit appended and some ids removed."""
    make = flat if request.param == "flat" else ivf_all
    sharded = ShardedNeighbors(make()).fit(da.from_array(X[:2500], chunks=(700, 16)))
    sharded.partial_fit(X[2500:])  # a new shard of global ids 2500..2999
    ref = reference(sharded, X)
    return sharded, ref


@pytest.mark.parametrize("form", ["ids", "mask", "per_query", "few"])
def test_filter_equals_one_process(pair, form):
    sharded, ref = pair
    flt = {"ids": np.flatnonzero(MASK), "mask": MASK, "per_query": PER_QUERY,
           "few": np.array([4, 1401, 2999])}[form]
    d, i = sharded.kneighbors(Q, n_neighbors=6, filter=flt)
    d0, i0 = ref.kneighbors(Q, n_neighbors=6, filter=flt)
    np.testing.assert_array_equal(i, i0)
    np.testing.assert_allclose(d, d0, rtol=1e-6)
    if form == "few":  # fewer allowed ids than k: -1 at +inf, as one process
        assert (i[:, 3:] == -1).all() and np.isinf(d[:, 3:]).all()
    # Queries of the indexed points, each excluded from its own row.
    np.testing.assert_array_equal(sharded.kneighbors(n_neighbors=3, filter=MASK)[1],
                                  ref.kneighbors(n_neighbors=3, filter=MASK)[1])
    # Dask-array queries: each block gets its rows of a per-query filter.
    di = sharded.kneighbors(da.from_array(Q, chunks=(25, 16)), n_neighbors=6,
                            return_distance=False, filter=flt).compute()
    np.testing.assert_array_equal(di, i0)
    g = sharded.kneighbors_graph(Q, n_neighbors=6, mode="connectivity", filter=flt)
    assert (g != ref.kneighbors_graph(Q, n_neighbors=6, filter=flt)).nnz == 0


def test_filter_brute_force(client):
    """With re-ranking of every row of a shard the answers are the exact
    nearest allowed rows (numpy brute force)."""
    sharded = ShardedNeighbors(ivf_all(refine_factor=200), n_shards=3).fit(X)
    allowed = np.flatnonzero(MASK)
    _, ind = sharded.kneighbors(Q, n_neighbors=5, filter=allowed)
    d2 = ((Q[:, None, :].astype(np.float64) - X[allowed][None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(ind, allowed[np.argsort(d2, axis=1)[:, :5]])
    # removed ids are never returned, whatever the filter allows
    gone = np.unique(ind[:, 0])
    sharded.remove(gone)
    _, again = sharded.kneighbors(Q, n_neighbors=5, filter=allowed)
    assert not np.isin(again, gone).any()


def test_bad_filters_raise_the_single_process_errors_before_any_task(client, pair):
    sharded, ref = pair
    bad = [np.array([3000]), np.array([-2, 5]), np.ones(3000, np.int8), np.zeros(7, bool),
           np.array([1.5]), "ids", sparse.csr_matrix((3, 3000), dtype=bool),
           -sparse.identity(3000, dtype=np.int8, format="csr")[:60]]
    for flt in bad:
        with pytest.raises((ValueError, TypeError)) as expected:
            ref.kneighbors(Q, n_neighbors=3, filter=flt)
        before = n_graphs(client)
        for call in (lambda: sharded.kneighbors(Q, n_neighbors=3, filter=flt),
                     lambda: sharded.radius_neighbors(Q, 1.0, filter=flt)):
            with pytest.raises(type(expected.value)) as got:
                call()
            assert str(got.value) == str(expected.value)
        assert n_graphs(client) == before  # no task was submitted


def _same_radius(a, b, exact):
    for (da_, ia), (db, ib) in zip(zip(*a), zip(*b)):
        if exact:
            np.testing.assert_array_equal(ia, ib)
            np.testing.assert_array_equal(da_, db)
        else:  # the same points; ADC sums may round apart by an ulp (order of ties)
            assert set(ia) == set(ib)
            np.testing.assert_allclose(np.sort(da_), np.sort(db), rtol=1e-5)
        assert np.all(np.diff(da_) >= 0)


def test_radius_equals_one_process(pair):
    sharded, ref = pair
    exact = isinstance(ref, PQNeighbors)
    radius = float(np.median(ref.kneighbors(Q, n_neighbors=8)[0][:, -1]))
    _same_radius(sharded.radius_neighbors(Q, radius), ref.radius_neighbors(Q, radius), exact)
    _same_radius(sharded.radius_neighbors(Q, radius, filter=PER_QUERY),
                 ref.radius_neighbors(Q, radius, filter=PER_QUERY), exact)
    _same_radius(sharded.radius_neighbors(radius=radius / 2, filter=MASK),
                 ref.radius_neighbors(radius=radius / 2, filter=MASK), exact)
    ind = sharded.radius_neighbors(Q[:3], radius, return_distance=False)
    assert ind.dtype == object and ind.shape == (3,)
    for call in (lambda e: e.radius_neighbors(Q, -1.0),
                 lambda e: e.radius_neighbors(Q, radius, return_distance=False,
                                              sort_results=True),
                 lambda e: e.radius_neighbors(Q[:, :5], radius)):
        with pytest.raises(ValueError) as expected:
            call(ref)
        with pytest.raises(ValueError) as got:
            call(sharded)
        assert str(got.value) == str(expected.value)


def test_queries_go_as_one_batch_per_shard(client, pair):
    sharded, _ = pair
    before = tasks_done(client, "search_shard")
    sharded.kneighbors(Q, n_neighbors=4)
    assert tasks_done(client, "search_shard") - before == len(sharded.shards_)
    before = tasks_done(client, "radius_shard")
    sharded.radius_neighbors(Q, 1.0, filter=MASK)
    assert tasks_done(client, "radius_shard") - before == len(sharded.shards_)


@pytest.mark.parametrize("make", [
    lambda: IVFPQNeighbors(n_lists=16, n_subspaces=4, n_codewords=32, refine_factor=4,
                           random_state=0),
    lambda: HNSWPQNeighbors(n_links=8, ef_construction=40, n_subspaces=4, n_codewords=32,
                            refine_factor=4, random_state=0)])
def test_tune_search_on_a_sharded_index(client, make):
    sharded = ShardedNeighbors(make(), n_shards=3).fit(X)
    sharded.remove(np.arange(0, 3000, 11))
    result = tune_search(sharded, Q, target_recall=0.9, n_neighbors=5, n_queries=40,
                         n_repeats=1, random_state=0)
    assert result.target_reached and result.recall >= 0.9
    for name, value in result.params.items():  # set on the wrapped estimator
        assert getattr(sharded.estimator, name) == value
    # The recall it reports is the sharded index's own, against the truth.
    _, ind = sharded.kneighbors(Q, n_neighbors=5)
    live = np.flatnonzero(~np.isin(np.arange(3000), np.arange(0, 3000, 11)))
    d2 = ((Q[:, None, :].astype(np.float64) - X[live][None].astype(np.float64)) ** 2).sum(-1)
    truth = live[np.argsort(d2, axis=1)[:, :5]]
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ind, truth)])
    assert recall >= 0.85
    # Indexed points as queries (X_sample=None): gathered from the shards.
    result = tune_search(sharded, None, target_recall=0.8, n_neighbors=3, n_queries=30,
                         n_repeats=1, random_state=1)
    assert result.recall >= 0.8


def test_tune_search_without_raw_rows_needs_X(client):
    sharded = ShardedNeighbors(ivf_all(refine_factor=0), n_shards=2).fit(X)
    with pytest.raises(ValueError, match="pass X"):
        tune_search(sharded, Q, target_recall=0.5, n_neighbors=3, n_queries=20)
    result = tune_search(sharded, Q, target_recall=0.15, n_neighbors=3, n_queries=20,
                         X=X, n_repeats=1, random_state=0)
    assert set(result.params) == {"refine_factor", "n_probe"}
    # The recall of each setting is one process's (the same quantizers).
    one = tune_search(reference(sharded, X), Q, target_recall=0.15, n_neighbors=3,
                      n_queries=20, X=X, n_repeats=1, random_state=0)
    np.testing.assert_array_equal(result.frontier["n_probe"], one.frontier["n_probe"])
    np.testing.assert_array_equal(result.frontier["recall"], one.frontier["recall"])


def test_filtered_hnsw_shards_return_allowed_ids_only(client):
    """HNSW shards are other graphs than one index's: their filtered answers
    are allowed ids only, close to the exact allowed neighbours."""
    sharded = ShardedNeighbors(HNSWPQNeighbors(n_links=8, ef_construction=40, n_subspaces=4,
                                               n_codewords=32, refine_factor=8,
                                               random_state=0), n_shards=2).fit(X)
    allowed = np.flatnonzero(MASK)
    _, ind = sharded.kneighbors(Q, n_neighbors=5, filter=allowed)
    assert np.isin(ind, allowed).all()
    d2 = ((Q[:, None, :].astype(np.float64) - X[allowed][None].astype(np.float64)) ** 2).sum(-1)
    truth = allowed[np.argsort(d2, axis=1)[:, :5]]
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ind, truth)]) >= 0.9
    dist, ind = sharded.radius_neighbors(Q[:10], 20.0, filter=allowed)
    assert all(np.isin(i, allowed).all() and (d <= 20.0).all() for d, i in zip(dist, ind))
