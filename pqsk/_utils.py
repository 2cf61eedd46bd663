"""Small helpers shared by the estimators: threads and progress messages."""

import ctypes
import functools
import os
import sys
import threading
import time
from contextlib import contextmanager
from numbers import Integral

import numpy as np

from ._openmp import omp_max_threads


@functools.lru_cache(maxsize=64)
def range_bound(n_features, dtype):
    """Largest absolute value whose squared distances cannot overflow ``dtype``
    over ``n_features`` features: ``sqrt(max / (4 D))``.  Used when data
    come in (``_checks.check_range``) and when a saved index is loaded."""
    return float(np.sqrt(np.finfo(dtype).max / (4 * max(1, int(n_features)))))


# A kernel call with less work than this (about 0.1 ms) keeps the GIL.
# Releasing it costs nothing when no other thread wants it; when one does
# (a writer's ``partial_fit`` beside a serving thread), the thread that
# released it waits, once its kernel is done, until the other lets go: up
# to the interpreter's switch interval (5 ms), many times a short kernel's
# own run.  Threads asked for (``n_jobs`` > 1) always release it.
GIL_WORK = 1 << 18


def release_gil(work):
    """Whether a kernel call of ``work`` units (the kernel's inner-loop
    steps: candidates times dimensions, codes times sub-spaces) releases
    the GIL."""
    return work >= GIL_WORK


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


_N_CPUS = os.cpu_count() or 1  # read once: the call reads a file (~15 us a query)


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
    n_cpus = _N_CPUS
    if n_jobs is None:
        return max(1, min(omp_max_threads(), n_cpus))
    if n_jobs < 0:
        return max(1, n_cpus + 1 + n_jobs)
    return max(1, min(int(n_jobs), n_cpus))


class Progress:
    """Progress messages and bars on stderr when ``verbose`` is positive.

    Library code never prints to stdout; a user who sets ``verbose`` sees
    these on stderr.  ``progress(msg, level=1)`` writes one timestamped
    line when ``verbose >= level``; ``progress.bar(total, desc)`` gives a
    :class:`ProgressBar` for a loop of known length (``tqdm``'s look, no
    dependency); ``progress.rows(X, desc)`` wraps chunked rows so that
    reading them advances a bar.
    """

    def __init__(self, verbose, name, stream=None):
        self.verbose = verbose
        self.name = name
        self._t0 = time.perf_counter()
        self._stream = stream  # None: sys.stderr when writing (pytest swaps it)
        self._bar = None  # the bar drawn on the terminal's last line, if any
        self._lock = threading.RLock()

    @property
    def stream(self):
        return sys.stderr if self._stream is None else self._stream

    def __call__(self, msg, level=1):
        if self.verbose >= level:
            t = time.perf_counter() - self._t0
            with self._lock:
                bar = self._bar
                if bar is not None:
                    bar._clear()  # the message goes above the bar
                self.stream.write(f"[{self.name}] {t:8.2f}s {msg}\n")
                if bar is not None:
                    bar._draw()
                self.stream.flush()

    def bar(self, total, desc, unit="it", level=1):
        """A :class:`ProgressBar` of ``total`` steps (None: unknown), drawn
        when ``verbose >= level``; use it as a context manager."""
        return ProgressBar(self, total, desc, unit, active=self.verbose >= level)

    def rows(self, X, desc, unit="vectors", level=1):
        """X (a :class:`~pqsk._store.FitRows`, read with ``X.chunks()``) as
        an object whose chunks advance a bar of ``X.shape[0]`` rows; X
        itself when nothing is shown or X is not read in chunks."""
        if self.verbose < level or not hasattr(X, "chunks"):
            return X
        return _CountedRows(X, self.bar(X.shape[0], desc, unit, level))


class _CountedRows:
    """Rows that advance a progress bar as their chunks are read (the bar
    closes after the last chunk); everything else is X's."""

    def __init__(self, X, bar):
        self._rows = X
        self._bar = bar

    def __getattr__(self, name):
        return getattr(self._rows, name)

    @property
    def shape(self):
        return self._rows.shape

    def chunks(self):
        try:
            for sl, chunk in self._rows.chunks():
                yield sl, chunk
                self._bar.update(sl.stop - sl.start)
        finally:
            self._bar.close()


def _si(x):
    """x with an SI suffix, tqdm-like: 950, 9.50k, 12.3M."""
    for suffix in ("", "k", "M", "G", "T"):
        if abs(x) < 999.5:
            if suffix == "":
                return f"{x:.3g}" if x != int(x) or abs(x) < 1 else f"{int(x)}"
            return f"{x:.3g}{suffix}"
        x /= 1000
    return f"{x:.3g}P"


def _clock(seconds):
    """mm:ss, or h:mm:ss past an hour."""
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class ProgressBar:
    """A progress bar in the style of ``tqdm``, on the :class:`Progress`'s
    stream::

        [HNSWPQNeighbors] graph:  42%|████▏     | 4.20k/10.0k [00:06<00:08, 6.81k nodes/s]

    percentage, done / total, elapsed < remaining time, and the rate.
    When the stream is a terminal the line is redrawn in place (``\\r``)
    at most every ``TTY_INTERVAL`` seconds; otherwise (a log file, a
    notebook, a pipe) a plain line is written at most every
    ``PLAIN_INTERVAL`` seconds.  Both write the final state on
    :meth:`close`.  Thread-safe: ``update`` may be called from several
    threads.  An inactive bar (``verbose`` too low) writes nothing.
    """

    TTY_INTERVAL = 0.1
    PLAIN_INTERVAL = 5.0
    WIDTH = 10  # characters of the bar itself

    def __init__(self, progress, total, desc, unit="it", active=True):
        self.progress = progress
        self.total = None if total is None else int(total)
        self.desc = desc
        self.unit = unit
        self.active = active
        self.n = 0
        self.closed = False
        self._t0 = self._last = time.perf_counter()
        self._shown = 0  # characters of the line on the terminal
        stream = progress.stream
        isatty = getattr(stream, "isatty", None)
        try:
            self._tty = bool(isatty()) if isatty is not None else False
        except (ValueError, OSError):  # closed stream
            self._tty = False
        enc = getattr(stream, "encoding", None) or ""
        self._blocks = "utf" in enc.lower()
        if active and self._tty:
            with progress._lock:
                progress._bar = self
                self._draw()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def update(self, n=1):
        """Advance the bar by n steps."""
        if not self.active:
            return
        with self.progress._lock:
            if self.closed:
                return
            self.n += n
            now = time.perf_counter()
            wait = self.TTY_INTERVAL if self._tty else self.PLAIN_INTERVAL
            if now - self._last >= wait:
                self._last = now
                if self._tty:
                    self._draw()
                else:
                    self.progress.stream.write(self.format() + "\n")
                self.progress.stream.flush()

    def close(self):
        """Write the final state and end the line."""
        if not self.active:
            return
        with self.progress._lock:
            if self.closed:
                return
            self.closed = True
            stream = self.progress.stream
            if self._tty:
                self._draw()
                stream.write("\n")
                if self.progress._bar is self:
                    self.progress._bar = None
            else:
                stream.write(self.format() + "\n")
            stream.flush()

    def format(self):
        """The bar's line (no line ending)."""
        elapsed = time.perf_counter() - self._t0
        rate = self.n / elapsed if elapsed > 0 else 0.0
        head = f"[{self.progress.name}] {self.desc}: "
        rate_s = f"{_si(rate)} {self.unit}/s" if rate else f"? {self.unit}/s"
        if self.total is None:
            return f"{head}{_si(self.n)} {self.unit} [{_clock(elapsed)}, {rate_s}]"
        frac = min(1.0, self.n / self.total) if self.total else 1.0
        filled = frac * self.WIDTH
        full = int(filled)
        if self._blocks:
            partial = " ▏▎▍▌▋▊▉"[int((filled - full) * 8)] if full < self.WIDTH else ""
            bar = "█" * full + partial
        else:
            bar = "#" * full
        bar = bar.ljust(self.WIDTH)
        left = (self.total - self.n) / rate if rate and self.n < self.total else 0.0
        return (f"{head}{100 * frac:3.0f}%|{bar}| {_si(self.n)}/{_si(self.total)} "
                f"[{_clock(elapsed)}<{_clock(left)}, {rate_s}]")

    def _draw(self):
        line = self.format()
        pad = max(0, self._shown - len(line))
        self.progress.stream.write("\r" + line + " " * pad)
        self._shown = len(line)

    def _clear(self):
        self.progress.stream.write("\r" + " " * self._shown + "\r")
        self._shown = 0


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
_ONE_BLAS = {"depth": 0, "limiter": None}
_ONE_BLAS_GUARD = threading.Lock()


@contextmanager
def one_blas_thread():
    """BLAS on one thread while this runs, in every thread of the process
    (BLAS's thread count is global).  Reference-counted: regions of
    several threads may overlap in any order, the first sets the limit
    and the last restores the original one."""
    global _CONTROLLER
    with _ONE_BLAS_GUARD:
        if _ONE_BLAS["depth"] == 0:
            if _CONTROLLER is None:
                from threadpoolctl import ThreadpoolController

                _CONTROLLER = ThreadpoolController()
            _ONE_BLAS["limiter"] = _CONTROLLER.limit(limits=1, user_api="blas")
        _ONE_BLAS["depth"] += 1
    try:
        yield
    finally:
        with _ONE_BLAS_GUARD:
            _ONE_BLAS["depth"] -= 1
            if _ONE_BLAS["depth"] == 0:
                limiter, _ONE_BLAS["limiter"] = _ONE_BLAS["limiter"], None
                limiter.restore_original_limits()


@contextmanager
def openmp_region(n_threads, beside_queries=False):
    """Keep BLAS on one thread while pqsk's OpenMP kernels use several,
    and in writers that run beside queries (``beside_queries``:
    ``partial_fit``, ``refit_codebooks``) whatever ``n_threads``.

    OpenBLAS's worker threads keep spinning for a while after each matrix
    product; with several kernel threads on the same cores they compete,
    and 2 threads ran slower than 1.  scikit-learn's KMeans does the same.
    A writer's products spread over every core took them from the queries
    running beside it: on 2 cores, a one-row query waited 2-5 ms for a
    core behind the spinning BLAS threads of a ``partial_fit`` with
    ``n_jobs=1`` (``benchmarks/bench_ingest.py``).
    """
    if n_threads <= 1 and not beside_queries:
        yield
        return
    with one_blas_thread():
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
