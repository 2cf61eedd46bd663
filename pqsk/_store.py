"""Raw rows: fit input read chunk by chunk, and the row store of raw vectors.

Two pieces of storage shared by the estimators, with no estimator state:

* :class:`FitRows` wraps validated ``fit`` / ``partial_fit`` input (any
  2-D ndarray, a ``np.memmap`` or ``np.load(..., mmap_mode="r")`` included)
  and hands it out chunk by chunk, converted to the fitted dtype and
  normalised for ``metric="cosine"``; nothing larger than a chunk is ever
  materialised, except by the caller who asks for an array.
* :class:`RowStore` keeps the raw vectors of an index fitted with
  ``refine_factor > 0``: an append-only sequence of row chunks addressed
  by id.  A file-backed chunk (a memmap) is kept by reference, not copied;
  appends add chunks and never copy what is there.  Re-ranking gathers
  only the candidate rows (:meth:`RowStore.take`).

Memory model of a chunked pass: one chunk of ``rows_per_chunk(row_bytes)``
rows, at most ``CHUNK_ROWS`` rows and ``CHUNK_BYTES`` bytes, plus the
temporaries of the work done on it (a few times the chunk).
"""

import mmap

import numpy as np

# Every chunked pass over the rows of fit input or of the row store reads
# at most CHUNK_ROWS rows, and at most CHUNK_BYTES bytes, at a time.
CHUNK_ROWS = 65536
CHUNK_BYTES = 32 * 2**20


def rows_per_chunk(row_bytes):
    """Rows in a chunk of rows of ``row_bytes`` bytes each: ``CHUNK_ROWS``,
    or fewer for wide rows, so that a chunk stays within ``CHUNK_BYTES``."""
    return int(max(1, min(CHUNK_ROWS, CHUNK_BYTES // max(1, int(row_bytes)))))


def chunk_slices(n, rows):
    """Slices of ``rows`` consecutive rows covering ``range(n)``."""
    for start in range(0, n, rows):
        yield slice(start, min(n, start + rows))


def decoded_chunks(parts, n, d, dtype, step):
    """(slice, rows) pairs of decoded points in id order, ``step`` ids at
    a time, so that memory grows with ``step`` and not with ``n``.

    ``parts``: list of ``(ids, decode)``: ``ids`` the (n_p,) int ids of
    the part's entries (None: entry i is id i), ``decode(positions)`` the
    (len(positions), d) rows of those entries.  Ids held by no part
    (removed from a graph) are rows of zeros.  An id a part holds twice
    (a spilled vector) is decoded from its first entry there."""
    for sl in chunk_slices(n, step):
        out = np.zeros((sl.stop - sl.start, d), dtype)
        for ids, decode in parts:
            if ids is None:
                pos = np.arange(sl.start, sl.stop)
                if pos.size:
                    out[:] = decode(pos)
                continue
            pos = np.flatnonzero((ids >= sl.start) & (ids < sl.stop))
            if pos.size:
                pos = pos[np.unique(ids[pos], return_index=True)[1]]
                out[np.asarray(ids[pos], np.intp) - sl.start] = decode(pos)
        yield sl, out


def is_file_backed(a):
    """Whether the ndarray ``a`` views memory mapped from a file (an
    ``np.memmap``, ``np.load(..., mmap_mode=...)``, or a view of one)."""
    while a is not None:
        if isinstance(a, (np.memmap, mmap.mmap)):
            return True
        a = getattr(a, "base", None)
    return False


def unit_rows(rows, out=None):
    """``rows`` scaled to unit L2 norm, bit for bit as
    :func:`sklearn.preprocessing.normalize` scales them (norms below
    ``10 * eps`` count as 1, so rows of zeros stay zero), into ``out``
    (may be ``rows`` itself) or a new array."""
    norms = np.sqrt(np.einsum("ij,ij->i", rows, rows))
    norms[norms < 10 * np.finfo(norms.dtype).eps] = 1.0
    return np.divide(rows, norms[:, None], out=out)


def prepare_rows(chunk, dtype, unit_norm, out=None):
    """``chunk`` as a C-contiguous array of ``dtype``, its rows scaled to
    unit L2 norm when ``unit_norm`` (see :func:`unit_rows`), written into
    ``out`` if given (a buffer of at least as many rows).  Never modifies
    ``chunk``; returns it unchanged when nothing is to be done."""
    if not unit_norm:
        return np.ascontiguousarray(chunk, dtype=dtype)
    if out is None:
        out = np.empty(chunk.shape, dtype=dtype)
    else:
        out = out[:chunk.shape[0]]
    if chunk.dtype != dtype:
        out[...] = chunk
        chunk = out
    return unit_rows(chunk, out=out)


class FitRows:
    """Validated ``fit`` / ``partial_fit`` input, read chunk by chunk.

    Parameters
    ----------
    X : ndarray of shape (n_samples, n_features)
        Validated rows (finite, within range), any memory order, a float or
        integer dtype; a memmap is read chunk by chunk, never copied whole.
    dtype : numpy.dtype
        The fitted dtype, float32 or float64.
    unit_norm : bool
        Normalise each row (``metric="cosine"``).
    rotation : ndarray of shape (n_features, n_features) or None
        Orthogonal matrix R (OPQ) each prepared row is multiplied by, after
        normalisation: rows come out as ``x @ R``.

    Rows come out "prepared": C-contiguous, of ``dtype``, normalised when
    ``unit_norm``, rotated when ``rotation`` is given.  ``raw`` is X
    itself, for the row store.  ``__array__`` materialises every prepared
    row at once (n_samples x n_features of ``dtype``): only for callers
    that need the whole array anyway (the HNSW graph build, small inputs).
    """

    def __init__(self, X, dtype, unit_norm, rotation=None):
        self.raw = X
        self.dtype = np.dtype(dtype)
        self.unit_norm = bool(unit_norm)
        self.rotation = rotation
        self.shape = X.shape
        self.ndim = 2

    def __len__(self):
        return self.shape[0]

    def chunk_rows(self):
        return rows_per_chunk(self.shape[1] * self.dtype.itemsize)

    def chunks(self, rows=None):
        """(slice, prepared rows) pairs covering every row in order.

        A chunk is valid until the next one is produced: normalised rows
        are written into one buffer reused for the whole pass (no memory
        churn), and unconverted rows are views of X.  Copy a chunk to keep
        it."""
        step = rows or self.chunk_rows()
        buf = (np.empty((min(step, self.shape[0]), self.shape[1]), dtype=self.dtype)
               if self.unit_norm else None)
        for sl in chunk_slices(self.shape[0], step):
            yield sl, self._rotated(prepare_rows(self.raw[sl], self.dtype,
                                                 self.unit_norm, out=buf))

    def _rotated(self, rows):
        if self.rotation is None:
            return rows
        return np.ascontiguousarray(rows @ self.rotation, dtype=self.dtype)

    def take(self, rows):
        """Prepared rows at the (preferably sorted) indices ``rows``,
        gathered a chunk at a time."""
        rows = np.asarray(rows, dtype=np.intp)
        out = np.empty((rows.shape[0], self.shape[1]), dtype=self.dtype)
        for sl in chunk_slices(rows.shape[0], self.chunk_rows()):
            part = self.raw[rows[sl]]
            if self.unit_norm:
                prepare_rows(part, self.dtype, True, out=out[sl])
            else:
                out[sl] = part
            if self.rotation is not None:
                out[sl] = out[sl] @ self.rotation
        return out

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            key = np.arange(start, stop, step)
        return self.take(key)

    def __array__(self, dtype=None, copy=None):
        if (not self.unit_norm and self.rotation is None and self.raw.dtype == self.dtype
                and self.raw.flags.c_contiguous and not copy):
            out = np.asarray(self.raw)
        else:
            out = np.empty(self.shape, dtype=self.dtype)
            for sl, chunk in self.chunks():
                out[sl] = chunk
        return out if dtype is None else out.astype(dtype, copy=False)


class _Buffer:
    """A row buffer a store appends into: ``claimed`` rows are in use by
    some store; rows past it are free.  A store appends in place only when
    its rows end exactly at ``claimed`` (no other store has appended past
    it), so two estimators sharing a store (a shallow copy, or an index put
    back after a failed ``partial_fit``) never overwrite each other's rows.
    """

    __slots__ = ("array", "claimed")

    def __init__(self, array, claimed):
        self.array, self.claimed = array, claimed


class RowStore:
    """Raw vectors addressed by id, in append-only chunks.

    ``vectors_`` of an index fitted with ``refine_factor > 0``.  It behaves
    as a read-only array of shape (n_samples_fit, n_features) for what an
    index needs: ``shape``, ``dtype``, ``len``, ``np.asarray(store)`` (every
    row; concatenates the chunks when there are several), and
    ``store[ids]`` / :meth:`take` to gather rows by id (``store[mask]``
    and ``store[start:stop]`` too).

    A chunk is either a file-backed array kept by reference (the rows a
    memmap passed to ``fit`` or ``partial_fit`` holds, when they are
    C-contiguous and of the fitted dtype) or an array the store owns.
    :meth:`appended` returns a new store that shares every chunk of this
    one: appends never copy existing rows, and cost O(batch) amortized
    (owned chunks grow by doubling, up to ``CHUNK_BYTES``).  A store is
    never modified once made, so an index can be restored by keeping the
    previous store object.

    Rows are stored as given: for ``metric="cosine"`` the estimator
    normalises the rows it gathers, at re-rank time.
    """

    def __init__(self, n_features, dtype, parts=(), tail=None, tail_start=0, saved=()):
        self.dtype = np.dtype(dtype)
        self._n_features = int(n_features)
        self._parts = tuple(parts)     # 2-D arrays, the used rows of each chunk
        # The owned buffer behind the last part, if any, and the row of that
        # buffer where the last part starts.
        self._tail, self._tail_start = tail, int(tail_start)
        sizes = [p.shape[0] for p in self._parts]
        self._starts = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self._starts[1:])
        # The blocks of rows already written to files (``pqsk._pages``):
        # records of consecutive row ranges from row 0, each naming a file
        # that holds those rows.  A cache, shared with the stores appended
        # from this one (their first rows are these): a save writes only
        # the rows past them.  Never pickled.
        self.saved_blocks = tuple(saved)

    # -- array-like ----------------------------------------------------------
    @property
    def shape(self):
        return (int(self._starts[-1]), self._n_features)

    ndim = 2

    @property
    def size(self):
        return self.shape[0] * self.shape[1]

    def __len__(self):
        return self.shape[0]

    @property
    def chunks(self):
        """The chunks, in id order (read-only views)."""
        return self._parts

    @property
    def nbytes(self):
        """Bytes of the rows, in memory and mapped from files."""
        return self.size * self.dtype.itemsize

    @property
    def memory_nbytes(self):
        """Bytes held in memory: the owned chunks (their whole capacity)."""
        total, seen = 0, set()
        for p in self._parts:
            if is_file_backed(p):
                continue
            base = self._owner(p)
            if id(base) not in seen:
                seen.add(id(base))
                total += base.nbytes
        return total

    @property
    def mapped_nbytes(self):
        """Bytes of the rows read from memory-mapped files."""
        return sum(p.nbytes for p in self._parts if is_file_backed(p))

    @staticmethod
    def _owner(p):
        while isinstance(getattr(p, "base", None), np.ndarray):
            p = p.base
        return p

    def __repr__(self):
        return (f"RowStore(shape={self.shape}, dtype={self.dtype}, "
                f"chunks={len(self._parts)}, mapped={self.mapped_nbytes} bytes)")

    def __eq__(self, other):
        """Same shape, dtype and rows (reads every row of both)."""
        if not isinstance(other, RowStore):
            return NotImplemented
        if other.shape != self.shape or other.dtype != self.dtype:
            return False
        step = rows_per_chunk(self._n_features * self.dtype.itemsize)
        return all(np.array_equal(self.take(np.arange(sl.start, sl.stop)),
                                  other.take(np.arange(sl.start, sl.stop)))
                   for sl in chunk_slices(self.shape[0], step))

    __hash__ = None

    def __array__(self, dtype=None, copy=None):
        if len(self._parts) == 1 and not copy:
            out = np.asarray(self._parts[0])
        else:
            out = np.empty(self.shape, dtype=self.dtype)
            for start, p in zip(self._starts, self._parts):
                out[start:start + p.shape[0]] = p
        return out if dtype is None else out.astype(dtype, copy=False)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            raise IndexError("a RowStore is indexed by row ids only")
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            key = np.arange(start, stop, step)
        if isinstance(key, (int, np.integer)):
            return self.take(np.asarray([key]))[0]
        key = np.asarray(key)
        if key.dtype == bool:
            if key.shape != (self.shape[0],):
                raise IndexError(f"a boolean mask of a RowStore has shape ({self.shape[0]},)")
            key = np.flatnonzero(key)
        return self.take(key)

    def take(self, ids):
        """Rows at ``ids`` (an integer array of any shape, values in
        ``[-n, n)``): an array of shape ``ids.shape + (n_features,)``.
        Reads only those rows."""
        ids = np.asarray(ids)
        if ids.dtype.kind not in "iu":
            raise IndexError(f"row ids must be integers, got dtype {ids.dtype}")
        flat = ids.reshape(-1).astype(np.int64, copy=False)
        n = self.shape[0]
        if flat.size and (flat.min() < -n or flat.max() >= n):
            raise IndexError(f"row ids must lie in [{-n}, {n})")
        flat = np.where(flat < 0, flat + n, flat)
        if len(self._parts) == 1:
            out = self._parts[0][flat]
        else:
            out = np.empty((flat.size, self._n_features), dtype=self.dtype)
            part = np.searchsorted(self._starts, flat, side="right") - 1
            for p in np.unique(part):
                mask = part == p
                out[mask] = self._parts[p][flat[mask] - self._starts[p]]
        return np.asarray(out).reshape(ids.shape + (self._n_features,))

    # -- appends ---------------------------------------------------------------
    @classmethod
    def empty(cls, n_features, dtype):
        return cls(n_features, dtype)

    def appended(self, rows, spare=True):
        """A new store: these rows, then ``rows``.

        ``rows`` is a :class:`FitRows` (its raw rows are stored) or a 2-D
        array.  Rows that are file-backed, C-contiguous and of the store's
        dtype are kept by reference; others are copied, chunk by chunk, into
        owned chunks.  Existing chunks are shared, never copied.  A new
        owned chunk has spare capacity for later appends (amortized O(batch)
        growth) unless ``spare`` is False: then it holds these rows exactly
        (the end of a fit, where spare rows would only be held memory).
        """
        raw = rows.raw if isinstance(rows, FitRows) else rows
        n_new = raw.shape[0]
        if n_new == 0:
            return self
        if raw.shape[1] != self._n_features:
            raise ValueError(f"rows have {raw.shape[1]} features, the store "
                             f"{self._n_features}")
        if (isinstance(raw, np.ndarray) and raw.dtype == self.dtype
                and raw.flags.c_contiguous and is_file_backed(raw)):
            return RowStore(self._n_features, self.dtype, self._parts + (raw,), None,
                            saved=self.saved_blocks)
        parts, tail, tail_start = list(self._parts), self._tail, self._tail_start
        done = 0
        # Fill the spare capacity of the last owned chunk, if no other store
        # has appended past this one's end.
        if tail is not None and tail.claimed == tail_start + parts[-1].shape[0]:
            used = tail.claimed
            done = min(n_new, tail.array.shape[0] - used)
            if done:
                self._copy(raw, 0, done, tail.array[used:used + done])
                tail.claimed = used + done
                parts[-1] = tail.array[tail_start:used + done]
        if done < n_new:
            # A new owned chunk: twice the previous one, at least the rest
            # of the batch, at most CHUNK_BYTES unless the batch is larger.
            rest = n_new - done
            prev = 0 if tail is None else tail.array.shape[0]
            step = rows_per_chunk(self._n_features * self.dtype.itemsize)
            capacity = max(rest, min(max(2 * prev, 1024), step)) if spare else rest
            tail, tail_start = _Buffer(np.empty((capacity, self._n_features),
                                                dtype=self.dtype), rest), 0
            self._copy(raw, done, n_new, tail.array[:rest])
            parts.append(tail.array[:rest])
        return RowStore(self._n_features, self.dtype, parts, tail, tail_start,
                        saved=self.saved_blocks)

    def row_pieces(self, start, stop):
        """Views of rows ``start:stop`` in order, each within one chunk and
        at most ``rows_per_chunk`` rows (what a chunked writer reads)."""
        step = rows_per_chunk(self._n_features * self.dtype.itemsize)
        for p, part in enumerate(self._parts):
            lo, hi = int(self._starts[p]), int(self._starts[p + 1])
            a, b = max(lo, start), min(hi, stop)
            for sl in chunk_slices(b - a, step) if a < b else ():
                yield part[a - lo + sl.start:a - lo + sl.stop]

    def _copy(self, raw, start, stop, out):
        step = rows_per_chunk(self._n_features * self.dtype.itemsize)
        for s in range(start, stop, step):
            e = min(stop, s + step)
            out[s - start:e - start] = raw[s:e]

    # -- pickling: the used rows of each chunk, no spare capacity ---------------
    def __getstate__(self):
        return {"n_features": self._n_features, "dtype": self.dtype.str,
                "parts": [np.ascontiguousarray(p) for p in self._parts]}

    def __setstate__(self, state):
        self.__init__(state["n_features"], np.dtype(state["dtype"]), state["parts"])
