"""Stateful tests (run by tests/test_stateful.py in a child interpreter):
random sequences of every call, checked against a model.

A hypothesis ``RuleBasedStateMachine`` drives fit / partial_fit / remove /
compact / set_params / save / load / pickle / kneighbors on each search
estimator, keeping a brute-force model of the live ids and their raw
vectors.  After every step:

* no call crashes; refused calls leave the index exactly as it was;
* ``kneighbors`` returns only live ids, each at most once per row, sorted
  by distance;
* where the settings make the search exhaustive (``PQNeighbors``; IVF with
  ``n_probe = n_lists_``; HNSW with ``ef_search >= n``) the answers are the
  exact top k over the index's own reconstructions (ADC is the exact
  distance to the decoded vector), and with re-ranking over every live row
  the exact top k over the raw vectors.
"""

import os
import pickle
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant,
                                 precondition, rule)
from numpy.testing import assert_allclose

import pqsk
from pqsk import HNSWPQNeighbors, IVFPQNeighbors, PQNeighbors
from pqsk import _lists
from test_fitted_state import same_state



def small_segments():
    """The IVF machine works on ~100 rows: seal the growing part past 8
    entries, merge size-tiered (ratio 2), and cap segments at 48 rows
    (below the public minimum of segment_size), so that sequences of calls
    go through sealing, merging, per-segment compaction and multi-segment
    fits.  Patches the module: only for the child process test_stateful.py
    runs (pytest imports this file in the main process too, for doctests)."""
    _lists.GROWING_MIN = 8
    _lists.MERGE_RATIO = 2
    IVFPQNeighbors._segment_size = lambda self: 48

D = 8
METRICS = ["euclidean", "sqeuclidean", "cosine", "dot"]
N_EXAMPLES = int(os.environ.get("PQSK_STATEFUL_EXAMPLES", "25"))

# Small data on purpose: IVF warns that 4 lists want more training rows.
pytestmark = pytest.mark.filterwarnings("ignore:.*training samples for n_lists")


def rows(seed, n, duplicates):
    r = np.random.RandomState(seed)
    X = r.randn(n, D).astype(np.float32)
    if duplicates and n > 4:
        X[n // 2:] = X[r.randint(0, n // 2, size=n - n // 2)]
    return X


def true_distances(metric, Q, V):
    """Distances under ``metric`` as pqsk reports them (cosine: on unit
    vectors, half the squared L2), float64."""
    Q = Q.astype(np.float64)
    V = V.astype(np.float64)
    if metric == "cosine":
        Q = Q / np.maximum(np.linalg.norm(Q, axis=1, keepdims=True), 1e-300)
    if metric == "dot":
        return -(Q @ V.T)
    d2 = ((Q[:, None, :] - V[None, :, :]) ** 2).sum(-1)
    if metric == "euclidean":
        return np.sqrt(d2)
    if metric == "cosine":
        return d2 / 2
    return d2


class IndexMachine(RuleBasedStateMachine):
    """Subclasses set ``kind``."""

    kind = None

    def __init__(self):
        super().__init__()
        self.tmp = tempfile.mkdtemp(prefix="pqsk-stateful-")
        self.est = None

    def teardown(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- building ----------------------------------------------------------
    def make(self, metric, refine):
        common = dict(n_subspaces=4, n_codewords=16, metric=metric, refine_factor=refine,
                      random_state=0, n_jobs=1)
        if self.kind == "pq":
            return PQNeighbors(3, **common)
        if self.kind == "ivf":
            small_segments()
            return IVFPQNeighbors(3, n_lists=4, n_probe=2, **common)
        # The smallest segment_size: the seal rules below make segments.
        return HNSWPQNeighbors(3, n_links=4, ef_construction=16, ef_search=8,
                               segment_size=1024, **common)

    @initialize(seed=st.integers(0, 2**16), n=st.integers(40, 90),
                metric=st.sampled_from(METRICS), refine=st.sampled_from([0, 0, 3]),
                duplicates=st.booleans())
    def fit(self, seed, n, metric, refine, duplicates):
        X = rows(seed, n, duplicates)
        self.est = self.make(metric, refine).fit(X)
        self.metric = metric
        self.vectors = {i: X[i] for i in range(n)}  # live id -> raw vector
        self.n_total = n

    @rule(seed=st.integers(0, 2**16), n=st.integers(40, 80),
          metric=st.sampled_from(METRICS), refine=st.sampled_from([0, 2]))
    def refit(self, seed, n, metric, refine):
        self.est.set_params(metric=metric, refine_factor=refine)
        self.fit(seed, n, metric, refine, duplicates=False)

    @rule(seed=st.integers(0, 2**16), b=st.integers(1, 12), duplicates=st.booleans())
    def partial_fit(self, seed, b, duplicates):
        X = rows(seed, b, duplicates)
        if duplicates and self.vectors:
            X[0] = next(iter(self.vectors.values()))
        self.est.partial_fit(X)
        for i in range(b):
            self.vectors[self.n_total + i] = X[i]
        self.n_total += b
        assert self.est.n_samples_fit_ == self.n_total

    @precondition(lambda self: self.kind != "pq")
    @rule(data=st.data())
    def remove(self, data):
        live = sorted(self.vectors)
        if len(live) <= 4:
            return
        ids = data.draw(st.lists(st.sampled_from(live), min_size=1,
                                 max_size=min(10, len(live) - 4), unique=True))
        self.est.remove(ids)
        for i in ids:
            del self.vectors[i]

    @precondition(lambda self: self.kind != "pq")
    @rule(data=st.data())
    def remove_bad_ids_is_refused_whole(self, data):
        dead = sorted(set(range(self.n_total)) - set(self.vectors))
        live = sorted(self.vectors)
        bad = data.draw(st.sampled_from(
            [[self.n_total], [-1]] + ([[dead[0]]] if dead else [])))
        before = pickle.loads(pickle.dumps(self.est))
        with pytest.raises(ValueError):
            self.est.remove(live[:1] + bad)
        assert same_state(self.est, before)

    @precondition(lambda self: self.kind != "pq")
    @rule()
    def compact(self):
        self.est.compact()

    @precondition(lambda self: self.kind == "hnsw")
    @rule(seed=st.integers(0, 2**16), extra=st.integers(0, 40))
    def partial_fit_that_seals(self, seed, extra):
        # Fill the growing graph to segment_size and go past it.
        # (At least one row: a full growing graph is sealed by the next append.)
        self.partial_fit(seed, max(1, 1024 - self.est.codes_.shape[0] + extra),
                         duplicates=False)

    @precondition(lambda self: self.kind == "hnsw" and self.est.segments_)
    @rule(data=st.data())
    def remove_most_of_a_segment(self, data):
        # Past half of a sealed segment removed: remove compacts it.
        seg = data.draw(st.sampled_from(self.est.segments_))
        live = [int(i) for i in seg["ids"] if int(i) in self.vectors]
        if len(self.vectors) - len(live) < 8:
            return
        share = data.draw(st.sampled_from([0.6, 1.0]))
        ids = live[:int(np.ceil(share * len(live)))]
        self.est.remove(ids)
        for i in ids:
            del self.vectors[i]

    # -- parameters ----------------------------------------------------------
    @rule(k=st.integers(1, 6), probe=st.integers(1, 4), ef=st.integers(1, 40),
          refine=st.integers(0, 4))
    def set_search_params(self, k, probe, ef, refine):
        params = {"n_neighbors": k}
        if self.est.vectors_ is not None:
            params["refine_factor"] = refine
        if self.kind == "ivf":
            params["n_probe"] = probe
        if self.kind == "hnsw":
            params["ef_search"] = ef
        self.est.set_params(**params)

    @rule(metric=st.sampled_from(METRICS), bad=st.sampled_from(
        [{"n_subspaces": 2}, {"n_codewords": 8}, {"n_probe": 0}, {"ef_search": -1},
         {"n_neighbors": 0}, {"refine_factor": -1}, {"n_jobs": 0}]))
    def changed_params_are_refused_until_set_back(self, metric, bad):
        Q = rows(1, 3, False)
        old = self.est.get_params()
        changes = dict(bad)
        if metric != self.metric:
            changes = {"metric": metric}
        if set(changes) <= set(old):
            before = pickle.loads(pickle.dumps(self.est))
            self.est.set_params(**changes)
            with pytest.raises((ValueError, TypeError)):
                self.est.kneighbors(Q)
            with pytest.raises((ValueError, TypeError)):
                self.est.partial_fit(Q)
            self.est.set_params(**{k: old[k] for k in changes})
            assert same_state(self.est, before)

    # -- persistence ---------------------------------------------------------
    @rule(mmap=st.sampled_from([None, "r"]))
    def save_and_load(self, mmap):
        path = os.path.join(self.tmp, "index")
        self.est.save(path, overwrite=True)
        self.est = pqsk.load(path, mmap_mode=mmap)

    @rule()
    def pickle_round_trip(self):
        self.est = pickle.loads(pickle.dumps(self.est))

    # -- queries -------------------------------------------------------------
    @rule(seed=st.integers(0, 2**16), k=st.integers(1, 8))
    def kneighbors_is_valid(self, seed, k):
        Q = rows(seed + 7, 4, False)
        live = np.array(sorted(self.vectors))
        if k > live.size:
            with pytest.raises(ValueError, match="n_neighbors"):
                self.est.kneighbors(Q, n_neighbors=k)
            return
        dist, ind = self.est.kneighbors(Q, n_neighbors=k)
        assert ind.shape == (4, k) and dist.shape == (4, k)
        assert np.isin(ind, live).all(), "a removed or unknown id was returned"
        for row in ind:
            assert np.unique(row).size == k, "an id was returned twice"
        assert np.all(np.diff(dist, axis=1) >= -1e-5 * (1 + np.abs(dist[:, 1:])))
        if self.exhaustive():
            self.check_exact(Q, k, dist, ind, live)

    @rule()
    def self_queries(self):
        if self.est.n_removed_:
            with pytest.raises(ValueError, match="removed"):
                self.est.kneighbors()
            return
        ind = self.est.kneighbors(n_neighbors=1, return_distance=False)
        assert ind.shape == (self.n_total, 1)

    def exhaustive(self):
        est = self.est
        if self.kind == "ivf":
            return est.n_probe >= est.n_lists_
        if self.kind == "hnsw":
            return est.ef_search >= max([est.codes_.shape[0]]
                                        + [s["ids"].shape[0] for s in est.segments_])
        return True

    def check_exact(self, Q, k, dist, ind, live):
        est = self.est
        refine_all = (est.refine_factor > 0
                      and est.refine_factor * k >= live.size)
        if est.refine_factor > 0 and not refine_all:
            return  # re-ranks an ADC shortlist: exact only over the shortlist
        if refine_all:
            V = np.stack([self.vectors[i] for i in live])
            if self.metric == "cosine":
                V = V / np.linalg.norm(V, axis=1, keepdims=True)
        else:
            V = est._reconstruct()[live]
        ref = true_distances(self.metric, Q, V)
        scale = 1e-3 * (1 + np.abs(ref).max())
        pos = {int(i): j for j, i in enumerate(live)}
        for q in range(Q.shape[0]):
            mine = ref[q, [pos[int(i)] for i in ind[q]]]
            assert_allclose(dist[q], mine, atol=scale)       # distances are right
            kth = np.sort(ref[q])[k - 1]
            assert mine.max() <= kth + scale                 # and they are the top k

    @invariant()
    def size_is_consistent(self):
        if self.est is None:
            return
        assert self.est.n_samples_fit_ == self.n_total
        assert self.est.n_samples_fit_ - self.est.n_removed_ == len(self.vectors)


def machine(kind):
    cls = type(f"{kind.upper()}Machine", (IndexMachine,), {"kind": kind})
    cls.TestCase.settings = settings(
        max_examples=N_EXAMPLES, stateful_step_count=25, deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    return cls


TestPQStateful = machine("pq").TestCase
TestIVFStateful = machine("ivf").TestCase
TestHNSWStateful = machine("hnsw").TestCase
