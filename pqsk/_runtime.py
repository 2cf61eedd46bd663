"""Per-estimator runtime state: what an index holds only while it runs here.

An estimator's ``__dict__`` is its saved, pickled and cloned state: the
fitted attributes.  Some state belongs to the running process only: the
locks that order queries and writers, the spare capacity behind arrays that
grow in place, caches derived from the fitted attributes.  It must not be
pickled, copied, saved or cloned, and a query must not change
``__dict__`` (scikit-learn's ``check_dict_unchanged``).  So it lives in one
:class:`Runtime` object per estimator, reached with :func:`runtime` and
kept in a weak-key dictionary: it goes away with the estimator, and a copy
or an unpickled estimator starts with a fresh one.

Per-thread scratch (visited marks, kernel buffers) is not per-estimator
state and stays in thread-locals beside the kernels that use it.
"""

import threading
import time
import weakref
from contextlib import contextmanager

# --- queries first: writers yield the GIL while queries run ---------------
#
# A writer (``fit``, ``partial_fit``, ``remove``, a merge) spends much of
# its time in Python and NumPy between kernels, holding the GIL for stretches
# of milliseconds; a query that gave up the GIL (in a BLAS product, a sort,
# a kernel) waits for the writer's next release, or for the interpreter's
# switch interval (5 ms).  So a writer thread calls :func:`yield_to_queries`
# between its steps: while a query runs (or ran less than ``QUERY_RECENT_S``
# ago: a reader sending queries one after another), it sleeps
# ``YIELD_S``, long enough for the waiting query thread to take the GIL.
# A query that ends while a writer waits after such a yield hands the GIL
# straight back (:func:`_hand_back`; else a reader querying back to back
# would keep it until the next switch interval).  Writers lose throughput
# only while queries run: bench_ingest's IVF stream took 2.6-3.2 s instead
# of 2.5 s without the yields, for a p99 of ~4.5x the idle p50 instead of
# ~5.2x (benchmarks/results/ingest.md).  Threads are marked as writers by
# :class:`WriterMutex` (the estimators' writer mutex) and :func:`writing`
# (the merge thread); queries are counted by :meth:`RWLock.read` outside
# writers.

YIELD_S = 1e-5          # asked of time.sleep; Linux sleeps ~60 us
QUERY_RECENT_S = 1e-3
_LOCAL = threading.local()
_QUERIES = [0, 0.0]     # queries running, when the last one ended
_HANDOVER = [0]         # writers that yielded and want the GIL back
_GUARD_COUNTS = threading.Lock()  # for both: several threads count


def _in_writer():
    return getattr(_LOCAL, "writing", 0) > 0


def _mark_writer(delta):
    _LOCAL.writing = getattr(_LOCAL, "writing", 0) + delta


@contextmanager
def writing():
    """Mark the current thread as a writer (re-entrant)."""
    _mark_writer(1)
    try:
        yield
    finally:
        _mark_writer(-1)


@contextmanager
def _query():
    with _GUARD_COUNTS:
        _QUERIES[0] += 1
    try:
        yield
    finally:
        with _GUARD_COUNTS:
            _QUERIES[0] -= 1
            _QUERIES[1] = time.perf_counter()


def queries_running():
    """Whether a query runs in this process, or ended less than
    ``QUERY_RECENT_S`` ago."""
    return _QUERIES[0] > 0 or time.perf_counter() - _QUERIES[1] < QUERY_RECENT_S


def yield_to_queries():
    """In a writer thread while queries run: give up the GIL for
    ``YIELD_S`` (see the comment above).  Elsewhere: nothing."""
    if _in_writer() and queries_running():
        with _GUARD_COUNTS:  # the writer and a merge thread may yield at once
            _HANDOVER[0] += 1
        try:
            time.sleep(YIELD_S)
        finally:
            with _GUARD_COUNTS:
                _HANDOVER[0] -= 1


def _hand_back():
    """At the end of a query: a writer that yielded to it gets the GIL
    back now rather than at the next switch interval."""
    if _HANDOVER[0] > 0:
        time.sleep(YIELD_S)


class WriterMutex:
    """A re-entrant mutex whose holder is marked as a writer
    (:func:`writing`) while it holds it."""

    def __init__(self):
        self._lock = threading.RLock()

    def acquire(self, blocking=True):
        got = self._lock.acquire(blocking)
        if got:
            _mark_writer(1)
        return got

    def release(self):
        self._lock.release()  # raises, changing nothing, if not the holder
        _mark_writer(-1)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


class RWLock:
    """Many readers or one writer.  Waiting writers block new readers, so
    a stream of queries cannot starve ``partial_fit``.  Not re-entrant."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._waiting:
                self._cond.wait()
            self._readers += 1
        query = not _in_writer()
        try:
            if not query:
                yield
            else:  # a query: writers yield to it (see yield_to_queries)
                with _query():
                    yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()
        if query:
            _hand_back()

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class Runtime:
    """The runtime state of one estimator (or of another owner of growable
    buffers, such as a graph built beside an index).

    Attributes
    ----------
    lock : RWLock
        Queries and saves hold it to read; writers take it to publish.
    writer : WriterMutex
        The writer mutex (see :func:`index_writer`).
    buffers : dict of str to ndarray
        The buffers with spare rows under the arrays that grow in place
        (see :mod:`pqsk._growable`).
    checked_params : tuple or None
        The search-time parameter values last found valid
        (``BasePQNeighbors._check_params_at_call``).
    segment_tombstones : dict of str to pqsk._segments.SegmentTombstones
        Per sealed segment uid: how many of its entries are removed, and
        for graphs their node-order mask (see :mod:`pqsk._segments`).
    growing_tombstones : tuple or None
        HNSW: the growing graph's node-order tombstones, as
        (``removed_``, ``ids_``, ``n_removed_``, mask), the key first.
    build : dict or None
        HNSW: the build scratch (in-degrees, copy chains, visited marks)
        left by the last graph build, reused by the next append.
    pending : dict or None
        HNSW: the state an append is publishing, put back if it fails
        after old nodes' links were rewritten.
    assembled : tuple or None
        IVF: (``segments_``, (codes, ids, list offsets)), the sealed
        segments as one sorted index (``codes_``, ``ids_``...).
    rerank_slack : tuple or None
        (owner, setting, live rows, slack): the calibrated slack of bounded
        re-ranking for one fitted quantizer and search setting, at a number
        of live rows (see ``pqsk._reorder.calibrated_slack``).
    rerank_rows : int
        How many candidate rows the reorder stage has re-ranked (a counter
        for benchmarks and tests).
    merges : pqsk._merges.MergeState or None
        IVF: the background merge thread, its request and its error.
    publish_beside : bool
        IVF: ``partial_fit`` is building an append beside the index
        (without the write lock), to publish it with ``_publish``.
    centroid_norms : tuple or None
        IVF: (``cluster_centers_``, their squared norms), the array held
        so that the norms are recomputed when it is replaced.
    views : dict
        A shard of :mod:`pqsk.dask`: its copies with other search
        parameters, by the sorted (name, value) pairs (see
        ``pqsk.dask._view``, which guards it).
    """

    __slots__ = ("lock", "writer", "buffers", "checked_params", "segment_tombstones",
                 "growing_tombstones", "build", "pending", "assembled", "views",
                 "rerank_slack", "rerank_rows", "merges", "publish_beside",
                 "centroid_norms")

    def __init__(self):
        self.lock = RWLock()
        self.writer = WriterMutex()
        self.buffers = {}
        self.checked_params = None
        self.segment_tombstones = {}
        self.growing_tombstones = None
        self.build = None
        self.pending = None
        self.assembled = None
        self.views = {}
        self.rerank_slack = None
        self.rerank_rows = 0
        self.merges = None
        self.publish_beside = False
        self.centroid_norms = None


_RUNTIMES = weakref.WeakKeyDictionary()  # owner -> Runtime
_GUARD = threading.Lock()


def runtime(owner):
    """The :class:`Runtime` of ``owner``, created on first use."""
    state = _RUNTIMES.get(owner)
    if state is None:
        with _GUARD:  # two threads asking first get the same one
            state = _RUNTIMES.get(owner)
            if state is None:
                state = _RUNTIMES[owner] = Runtime()
    return state


def index_writer(estimator):
    """The estimator's writer mutex: writers (``fit``, ``partial_fit``,
    ``remove``, ``compact``) hold it for their whole run, so that one of
    them may build new segments under the *read* lock (queries go on) and
    take the write lock only to switch to them, knowing no other writer
    changed the index in between.  Re-entrant."""
    return runtime(estimator).writer


def index_lock(estimator):
    """The estimator's :class:`RWLock`."""
    return runtime(estimator).lock
