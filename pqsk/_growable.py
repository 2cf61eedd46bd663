"""Arrays that grow in place: the storage under every append-only structure.

An index that takes appends (the growing part of an IVF index, an HNSW
graph, the tombstones) keeps each of its arrays in a buffer with spare
rows; the estimator's attribute is a view of the used rows.  Appending b
rows writes them past the used part and then publishes a longer view, so
an append costs O(b) amortized: the buffer is reallocated (doubling its
capacity) only when it is full.

Buffers live in the owner's runtime state (``pqsk._runtime``), outside
the estimator's ``__dict__``: pickling, cloning and ``save`` see only the
views, that is the used rows.  An attribute that is
not a prefix view of the estimator's own buffer (an index loaded from disk
or unpickled, a fresh fit, a memory-mapped array) is copied into a new
buffer on the first append after it: O(n) once.

Rows past a published view are never visible through it, so writing them
changes nothing a reader holding that view sees; the new length is
published last, by assigning the longer view.  The HNSW graph is the one
structure that also rewrites used rows (back-links of old nodes), which is
why appends run under the index's write lock (see ``pqsk._runtime``).
"""

import numpy as np

from ._runtime import runtime

# Rows a buffer is created with at least: a stream of 1-row appends then
# reallocates only O(log n) times.
MIN_CAPACITY = 64

def _is_prefix(view, buf):
    """Whether ``view`` is ``buf[:len(view)]``."""
    return (buf is not None and isinstance(view, np.ndarray) and view.base is buf
            and view.dtype == buf.dtype and view.shape[1:] == buf.shape[1:]
            and view.shape[0] <= buf.shape[0] and view.flags.c_contiguous
            and (view.size == 0 or view.ctypes.data == buf.ctypes.data))


def grow(owner, name, current, extra, fill=None):
    """``current`` followed by ``extra`` more rows, as a writable view of the
    buffer ``owner`` keeps under ``name``.

    The first ``len(current)`` rows hold ``current`` (shared, not copied,
    when ``current`` is already a prefix of that buffer and it has room);
    the new rows hold ``fill`` if given, else anything.  The caller
    publishes the returned view once the new rows are written.

    Parameters
    ----------
    owner : object
        The estimator, or another object holding buffers (a graph built
        beside the index); buffers are kept in its runtime state.
    name : str
        Which of its buffers.
    current : ndarray of shape (n, ...)
    extra : int
        Rows to add, >= 0.
    fill : scalar or None

    Returns
    -------
    view : ndarray of shape (n + extra, ...), C-contiguous, writable
    """
    n = current.shape[0]
    need = n + int(extra)
    bufs = runtime(owner).buffers
    buf = bufs.get(name)
    if not extra and _is_prefix(current, buf):
        return current  # already a writable prefix: the same object
    if not _is_prefix(current, buf) or buf.shape[0] < need:
        old_cap = buf.shape[0] if _is_prefix(current, buf) else n
        cap = max(need, 2 * old_cap, MIN_CAPACITY)
        new = np.empty((cap,) + current.shape[1:], dtype=current.dtype)
        new[:n] = current
        bufs[name] = buf = new
    view = buf[:need]
    if fill is not None and extra:
        view[n:] = fill
    return view


def owned(owner, name, current):
    """``current`` as a writable prefix of ``owner``'s buffer ``name`` (copied
    there first unless it already is one), for in-place updates."""
    return grow(owner, name, current, 0)


def discard(owner, name):
    """Forget ``owner``'s buffer ``name`` (its views stay valid)."""
    runtime(owner).buffers.pop(name, None)


def spare_bytes(owner, name, view):
    """Bytes allocated past ``view`` in ``owner``'s buffer ``name`` (0 when
    ``view`` does not live in it)."""
    buf = runtime(owner).buffers.get(name)
    if view is None or not _is_prefix(view, buf):
        return 0
    return buf.nbytes - view.nbytes
