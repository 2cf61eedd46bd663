"""Small helpers shared by the estimators: threads and progress messages."""

import ctypes
import functools
import os
import sys
import threading
import time
import weakref
from contextlib import contextmanager
from numbers import Integral

import numpy as np

from ._openmp import omp_max_threads


@functools.lru_cache(maxsize=64)
def range_bound(n_features, dtype):
    """Largest absolute value whose squared distances cannot overflow ``dtype``
    over ``n_features`` features: ``sqrt(max / (4 D))``.  Used when data
    come in (``_base.check_range``) and when a saved index is loaded."""
    return float(np.sqrt(np.finfo(dtype).max / (4 * max(1, int(n_features)))))


def check_n_jobs(n_jobs):
    """Validate ``n_jobs`` as scikit-learn does: None or a non-zero int."""
    if n_jobs is None:
        return None
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, Integral):
        raise TypeError(
            f"n_jobs must be None or an int, got {n_jobs!r} "
            f"({type(n_jobs).__name__}).")
    if n_jobs == 0:
        raise ValueError("n_jobs == 0 has no meaning; use None, a positive number of "
                         "threads, or -1 for all CPUs.")
    return int(n_jobs)


def effective_n_threads(n_jobs):
    """Threads the kernels use for a given ``n_jobs``.

    ``None`` means every thread OpenMP allows (``OMP_NUM_THREADS`` and
    threadpoolctl limits are respected); a positive number is taken as is,
    up to the number of CPUs; ``-1`` means all CPUs, ``-2`` all but one,
    and so on.  Anything else (0, a float, a bool) raises: ``n_jobs`` can
    be changed with ``set_params`` after fit, so it is checked at every
    call.
    """
    n_jobs = check_n_jobs(n_jobs)
    n_cpus = os.cpu_count() or 1
    if n_jobs is None:
        return max(1, min(omp_max_threads(), n_cpus))
    if n_jobs < 0:
        return max(1, n_cpus + 1 + n_jobs)
    return max(1, min(int(n_jobs), n_cpus))


class Progress:
    """Progress messages on stderr when ``verbose`` is positive.

    Library code never prints to stdout; a user who sets ``verbose`` sees
    these lines on stderr.
    """

    def __init__(self, verbose, name):
        self.verbose = verbose
        self.name = name
        self._t0 = time.perf_counter()

    def __call__(self, msg, level=1):
        if self.verbose >= level:
            t = time.perf_counter() - self._t0
            sys.stderr.write(f"[{self.name}] {t:8.2f}s {msg}\n")
            sys.stderr.flush()


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
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

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


_LOCKS = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def index_lock(estimator):
    """The estimator's RWLock, kept outside its ``__dict__`` so that pickling,
    cloning and saving never see it."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(estimator)
        if lock is None:
            lock = _LOCKS[estimator] = RWLock()
        return lock


_WRITERS = weakref.WeakKeyDictionary()


def index_writer(estimator):
    """The estimator's writer mutex (a ``threading.Lock``), kept like
    ``index_lock``'s RWLock.  Writers (``fit``, ``partial_fit``, ``remove``,
    ``compact``) take it before the RWLock, so that one of them may do long
    work under the *read* lock (a compaction building a new segment while
    queries go on) and take the write lock only to publish: no other
    writer can change the index in between.  Not re-entrant."""
    with _LOCKS_GUARD:
        lock = _WRITERS.get(estimator)
        if lock is None:
            lock = _WRITERS[estimator] = threading.Lock()
        return lock


@contextmanager
def restore_on_error(estimator):
    """Put back the estimator's attributes if the block raises.

    Writers (``fit``, ``partial_fit``, ``compact``) build new arrays and
    replace attributes; an error half-way (bad input found late, memory)
    must not leave a half-modified index.  Attributes are references to
    arrays that are never modified in place, so a shallow copy of
    ``__dict__`` is the whole previous state.

    Arrays that grow in place (``pqsk._growable``) are written past their
    published rows only, so the saved views still show the old index.  The
    exception is a writer that rewrites rows of the old state in place (an
    HNSW append links old nodes to new ones): past that point it cannot be
    undone, and the estimator's ``_after_failed_write`` hook, called after
    the restore, puts back the new state instead.
    """
    saved = dict(estimator.__dict__)
    try:
        yield
    except BaseException:
        estimator.__dict__.clear()
        estimator.__dict__.update(saved)
        hook = getattr(estimator, "_after_failed_write", None)
        if hook is not None:
            hook()
        raise


_CONTROLLER = None


@contextmanager
def openmp_region(n_threads):
    """Keep BLAS on one thread while pqsk's OpenMP kernels use several.

    OpenBLAS's worker threads keep spinning for a while after each matrix
    product; with several kernel threads on the same cores they compete,
    and 2 threads ran slower than 1.  scikit-learn's KMeans does the same.
    """
    global _CONTROLLER
    if n_threads <= 1:
        yield
        return
    if _CONTROLLER is None:
        from threadpoolctl import ThreadpoolController

        _CONTROLLER = ThreadpoolController()
    with _CONTROLLER.limit(limits=1, user_api="blas"):
        yield


_MALLOC_TRIM = None


def release_memory():
    """Give the heap memory freed so far back to the operating system.

    glibc keeps freed blocks of up to 32 MiB (its adaptive mmap threshold)
    in its heaps, per thread, rather than returning them: after a phase of
    chunk-sized temporaries (training, a chunked pass), tens of MiB stay
    resident and add to the next phase's peak.  ``fit`` calls this between
    its phases so that its peak is the index + one phase's working set
    (``malloc_trim(0)``; a no-op where the C library has no such call).
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
        except (OSError, AttributeError, TypeError):  # not glibc; Windows
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)
