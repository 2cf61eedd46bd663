"""Queries first while writers run (issue 21's latency target).

A writer thread yields the GIL between its steps while queries run
(``pqsk._runtime.yield_to_queries``), keeps BLAS on one thread
(``pqsk._utils.openmp_region(..., beside_queries=True)``).  The latencies
themselves are measured by ``benchmarks/bench_ingest.py``, not here.
"""

import threading

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from pqsk import IVFPQNeighbors, _runtime, _scorers
from pqsk._runtime import RWLock, WriterMutex, queries_running, runtime, writing
from pqsk._utils import one_blas_thread, openmp_region

r = np.random.RandomState(0)
X = r.standard_normal((3000, 16)).astype(np.float32)


def _sleeps(monkeypatch):
    calls = []
    monkeypatch.setattr(_runtime.time, "sleep", lambda s: calls.append(s))
    return calls


def test_writers_yield_only_while_a_query_runs(monkeypatch):
    monkeypatch.setattr(_runtime, "QUERY_RECENT_S", 0.0)
    lock = RWLock()
    started, release, done = threading.Event(), threading.Event(), threading.Event()

    def query():
        with lock.read():
            started.set()
            release.wait(10)
        done.set()

    t = threading.Thread(target=query)
    t.start()
    assert started.wait(10)
    calls = _sleeps(monkeypatch)
    assert queries_running()
    _runtime.yield_to_queries()            # not a writer: nothing
    assert calls == []
    with writing():
        _runtime.yield_to_queries()        # a writer while a query runs
        with lock.read():                  # a writer reading is not a query
            pass
    assert calls == [_runtime.YIELD_S]
    release.set()
    t.join(10)
    assert done.is_set() and not queries_running()
    with writing():
        _runtime.yield_to_queries()        # no query: no sleep
    assert calls == [_runtime.YIELD_S]


def test_a_query_hands_the_gil_back_to_a_writer_that_yielded(monkeypatch):
    lock = RWLock()
    calls = _sleeps(monkeypatch)
    with lock.read():
        pass
    assert calls == []                     # no writer waiting: no hand-back
    monkeypatch.setattr(_runtime, "_HANDOVER", [1])
    with lock.read():
        pass
    assert calls == [_runtime.YIELD_S]     # a writer yielded: handed back at the end
    with writing(), lock.read():           # a writer's own read hands nothing back
        pass
    assert calls == [_runtime.YIELD_S]


def test_a_query_that_just_ended_still_counts(monkeypatch):
    monkeypatch.setattr(_runtime, "QUERY_RECENT_S", 60.0)
    with RWLock().read():
        pass
    assert queries_running()   # a reader sending queries one after another
    with writing(), RWLock().read():
        pass
    monkeypatch.setattr(_runtime, "QUERY_RECENT_S", 0.0)
    assert not queries_running()


def test_writer_mutex_marks_its_holder_as_a_writer():
    mutex = WriterMutex()
    assert not _runtime._in_writer()
    with mutex:
        assert _runtime._in_writer()
        with mutex:                        # re-entrant
            assert _runtime._in_writer()
        assert _runtime._in_writer()
    assert not _runtime._in_writer()
    assert mutex.acquire(blocking=False)
    seen = []
    other = threading.Thread(target=lambda: seen.append(mutex.acquire(blocking=False)))
    other.start()
    other.join()
    assert seen == [False] and _runtime._in_writer()
    errors = []

    def release_foreign():
        try:
            mutex.release()                # not the holder: refused
        except RuntimeError as e:
            errors.append(e)
        errors.append(_runtime._in_writer())

    other = threading.Thread(target=release_foreign)
    other.start()
    other.join()
    assert isinstance(errors[0], RuntimeError) and errors[1] is False
    mutex.release()
    assert not _runtime._in_writer()
    est = IVFPQNeighbors(n_lists=4, n_subspaces=4, random_state=0)
    assert isinstance(runtime(est).writer, WriterMutex)


def _blas_threads():
    return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]


needs_blas = pytest.mark.skipif(not _blas_threads(), reason="threadpoolctl finds no BLAS")


@needs_blas
def test_one_blas_thread_regions_overlap_in_any_order():
    before = _blas_threads()
    entered, leave_first = threading.Event(), threading.Event()
    inside = []

    def other():
        with one_blas_thread():
            entered.set()
            leave_first.wait(10)
            inside.append(_blas_threads())

    t = threading.Thread(target=other)
    with one_blas_thread():
        t.start()
        assert entered.wait(10)
        assert set(_blas_threads()) == {1}
        leave_first.set()
        t.join(10)                         # the other region ends first ...
        assert set(_blas_threads()) == {1}  # ... the limit stays for this one
    assert inside and set(inside[0]) == {1}
    assert _blas_threads() == before       # the last one restores the original
    with openmp_region(1):                 # a query on one thread: no limit set
        assert _blas_threads() == before
    with openmp_region(1, beside_queries=True):
        assert set(_blas_threads()) == {1}
    assert _blas_threads() == before


@needs_blas
def test_partial_fit_keeps_blas_on_one_thread(monkeypatch):
    est = IVFPQNeighbors(n_lists=8, n_subspaces=4, n_codewords=16, n_jobs=1,
                         random_state=0).fit(X[:2000])
    seen = []
    assign = _scorers.assign

    def spy(*args, **kwargs):
        seen.append(_blas_threads())
        return assign(*args, **kwargs)

    monkeypatch.setattr(_scorers, "assign", spy)
    before = _blas_threads()
    est.partial_fit(X[2000:2500])
    assert seen and all(set(s) == {1} for s in seen)
    assert _blas_threads() == before
